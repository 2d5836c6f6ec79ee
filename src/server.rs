//! Assembles a running gateway: the pingora server with the proxy service, and one
//! background service for the control plane (admin API, active health checks, reload).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};

use crate::config::Config;
use crate::conn::{Admit, Connections, Guard, Limits};
use crate::gateway::Gateway;
use crate::http_server::ServeLimits;
use crate::metrics::metrics;
use crate::proxy::Proxy;
use crate::store::etcd::StoreSink;
use crate::{admin, health, reload};
use pingora::services::listening::Service;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error("{field}: cannot listen on {addr}: {source}")]
    Bind {
        /// The config field of the address.
        field: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

struct ControlPlane {
    gateway: Arc<Gateway>,
    admin: Mutex<Option<std::net::TcpListener>>,
    conns: Arc<Connections>,
    nofile: u64,
}

#[async_trait]
impl BackgroundService for ControlPlane {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let listener = self.admin.lock().ok().and_then(|mut l| l.take());
        if let Some(listener) = listener {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    let gw = Arc::clone(&self.gateway);
                    let admin = &gw.settings().config.admin;
                    let limits = ServeLimits {
                        max_connections: admin.max_connections,
                        header_timeout: admin.header_timeout,
                    };
                    let open = |n: usize| {
                        metrics()
                            .connections_open
                            .with_label_values(&["admin"])
                            .set(n as i64)
                    };
                    tokio::spawn(crate::http_server::serve(
                        listener,
                        limits,
                        open,
                        move |req| admin::handle(Arc::clone(&gw), req),
                    ));
                }
                Err(error) => tracing::error!(%error, "admin listener failed"),
            }
        }
        tokio::spawn(health::active::supervise(Arc::clone(&self.gateway)));
        tokio::spawn(follow_limits(
            Arc::clone(&self.gateway),
            Arc::clone(&self.conns),
            self.nofile,
        ));
        match self.gateway.etcd() {
            // On etcd, holders and the table arrive through the store's one watch.
            Some(etcd) => {
                let sink: Arc<dyn StoreSink> = Arc::clone(&self.gateway) as _;
                tokio::spawn(Arc::clone(etcd).run(sink));
            }
            None => {
                tokio::spawn(expire_holders(Arc::clone(&self.gateway)));
            }
        }
        tokio::spawn(reload::watch_config(Arc::clone(&self.gateway)));
        tokio::spawn(reload::on_sighup(Arc::clone(&self.gateway)));
        let _ = shutdown.changed().await;
    }
}

/// fds the gateway keeps for itself: the admin listener's connections, health checks,
/// etcd, logs, runtimes, plugin files. The rest is for client and upstream connections.
const FD_RESERVE: u64 = 128;

/// The proxy listener's limits under `config`, with `nofile` descriptors available.
pub fn limits(config: &Config, nofile: u64) -> Limits {
    let derived = nofile.saturating_sub(FD_RESERVE + config.admin.max_connections as u64) / 2;
    Limits {
        max_connections: config
            .server
            .max_connections
            .unwrap_or(derived.max(16) as usize),
        keepalive_timeout: config.server.keepalive_timeout,
        header_timeout: config.server.header_timeout,
        max_header_bytes: config.server.max_header_bytes.as_u64() as usize,
    }
}

/// Keeps the proxy listener's limits equal to the config's, across reloads.
async fn follow_limits(gateway: Arc<Gateway>, conns: Arc<Connections>, nofile: u64) {
    let mut changes = gateway.subscribe();
    loop {
        let now = limits(&gateway.settings().config, nofile);
        if now != conns.limits() {
            tracing::info!(?now, "proxy connection limits changed");
            conns.set_limits(now);
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, logs both, and returns the soft one.
pub fn raise_nofile() -> u64 {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => {
            tracing::info!(
                soft_before = before.0,
                soft,
                hard = before.1,
                "file-descriptor limit (RLIMIT_NOFILE)"
            );
            soft
        }
        Err(error) => {
            tracing::warn!(%error, soft = before.0, hard = before.1, "cannot raise RLIMIT_NOFILE");
            before.0
        }
    }
}

/// Notices holders whose heartbeats expired (nothing else would): re-merges the table
/// every half interval while membership is enabled.
async fn expire_holders(gateway: Arc<Gateway>) {
    loop {
        let settings = gateway.settings();
        let period = (settings.config.membership.interval / 2).max(Duration::from_millis(20));
        let enabled = settings.config.membership.enabled;
        drop(settings);
        tokio::time::sleep(period).await;
        if enabled {
            gateway.sync_membership().await;
        }
    }
}

/// Starts the gateway and serves until the process is told to stop (SIGTERM, SIGINT).
pub fn run(config: Config, path: Option<PathBuf>) -> Result<std::convert::Infallible, StartError> {
    let admin_addr = config.admin_addr()?;
    let listen = config.listen_addr()?;
    let threads = config.server.threads;
    let work_stealing = config.server.work_stealing;
    let grace = config.server.grace_period.as_secs();
    let nofile = raise_nofile();
    let conns = Connections::new(limits(&config, nofile));
    tracing::info!(limits = ?conns.limits(), "proxy connection limits");
    let gateway = Gateway::new(config, path)?;
    let admin = std::net::TcpListener::bind(admin_addr).map_err(|source| StartError::Bind {
        field: "admin.listen",
        addr: admin_addr,
        source,
    })?;
    admin
        .set_nonblocking(true)
        .map_err(|source| StartError::Bind {
            field: "admin.listen",
            addr: admin_addr,
            source,
        })?;
    // Fail with a clear message before pingora tries (it would only log and exit).
    drop(
        std::net::TcpListener::bind(listen).map_err(|source| StartError::Bind {
            field: "server.listen",
            addr: listen,
            source,
        })?,
    );

    let mut conf = ServerConf {
        threads,
        work_stealing,
        grace_period_seconds: Some(grace),
        graceful_shutdown_timeout_seconds: Some(grace),
        ..ServerConf::default()
    };
    // At most: the first choice, once more on a fresh connection if a pooled one was
    // stale, then the fallback. `proxy` decides which attempts happen.
    conf.max_retries = 3;
    let mut server = Server::new_with_opt_and_conf(None, conf);

    let app = pingora::proxy::http_proxy(
        &server.configuration,
        Proxy::new(Arc::clone(&gateway), Arc::clone(&conns)),
    );
    let mut proxy = Service::new(
        "hagate proxy".to_string(),
        Guard::new(app, Arc::clone(&conns)),
    );
    proxy.set_connection_filter(Arc::new(Admit(Arc::clone(&conns))));
    proxy.add_tcp(&listen.to_string());
    server.add_service(proxy);
    server.add_service(background_service(
        "control plane",
        ControlPlane {
            gateway: Arc::clone(&gateway),
            admin: Mutex::new(Some(admin)),
            conns,
            nofile,
        },
    ));
    tracing::info!(%listen, admin = %admin_addr, "hagate is serving");
    server.bootstrap();
    server.run_forever()
}
