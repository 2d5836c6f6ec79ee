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
use crate::gateway::Gateway;
use crate::proxy::Proxy;
use crate::store::etcd::StoreSink;
use crate::{admin, health, reload};

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
}

#[async_trait]
impl BackgroundService for ControlPlane {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let listener = self.admin.lock().ok().and_then(|mut l| l.take());
        if let Some(listener) = listener {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    let gw = Arc::clone(&self.gateway);
                    tokio::spawn(crate::http_server::serve(listener, move |req| {
                        admin::handle(Arc::clone(&gw), req)
                    }));
                }
                Err(error) => tracing::error!(%error, "admin listener failed"),
            }
        }
        tokio::spawn(health::active::supervise(Arc::clone(&self.gateway)));
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

    let mut proxy =
        pingora::proxy::http_proxy_service(&server.configuration, Proxy::new(Arc::clone(&gateway)));
    proxy.add_tcp(&listen.to_string());
    server.add_service(proxy);
    server.add_service(background_service(
        "control plane",
        ControlPlane {
            gateway: Arc::clone(&gateway),
            admin: Mutex::new(Some(admin)),
        },
    ));
    tracing::info!(%listen, admin = %admin_addr, "hagate is serving");
    server.bootstrap();
    server.run_forever()
}
