//! Assembles a running gateway: the pingora server with the proxy service, and one
//! background service for the control plane (admin API, active health checks, reload).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::ConnectionFilter;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};

use crate::config::Config;
use crate::conn::{Admit, Connections, Guard, Limits};
use crate::forward::Forwarder;
use crate::gateway::Gateway;
use crate::http_server::ServeLimits;
use crate::metrics::metrics;
use crate::proxy::Proxy;
use crate::store::etcd::StoreSink;
use crate::{admin, health, reload};
use pingora::services::listening::Service;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
    /// The certificate or key of `server.tls` could not be loaded.
    #[error("server.tls: {0}")]
    Tls(String),
    /// `hagate run --upgrade` found no gateway to replace.
    #[error("upgrade: {0}")]
    Upgrade(String),
}

struct ControlPlane {
    gateway: Arc<Gateway>,
    conns: Arc<Connections>,
    forward: Arc<Forwarder>,
    nofile: u64,
}

#[async_trait]
impl BackgroundService for ControlPlane {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        tokio::spawn(crate::lag::watch_control_plane());
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
        tokio::spawn(refresh_host_names(Arc::clone(&self.gateway)));
        tokio::spawn(sweep_idle_upstreams(Arc::clone(&self.forward)));
        let loaded = Arc::new(reload::Loaded::default());
        tokio::spawn(reload::watch_config(
            Arc::clone(&self.gateway),
            Arc::clone(&loaded),
        ));
        tokio::spawn(reload::on_sighup(Arc::clone(&self.gateway), loaded));
        tokio::spawn(crate::notify::upgrade_on_sigusr2(
            self.gateway.config_path().map(std::path::Path::to_path_buf),
        ));
        let _ = shutdown.changed().await;
    }
}

/// The admin API as a pingora app, so that its listener is handed over with the proxy's
/// on `hagate run --upgrade`. Each connection takes one of `admin.max_connections` slots;
/// the slot is taken in the accept loop (a connection filter), so above the cap new
/// connections wait in the listen backlog, as before the cap.
struct AdminApp {
    gateway: Arc<Gateway>,
    limits: ServeLimits,
    slots: Arc<Semaphore>,
    /// Slots taken in the accept loop, for connections not yet handed to the app.
    reserved: Mutex<HashMap<SocketAddr, OwnedSemaphorePermit>>,
}

impl AdminApp {
    fn count(&self) {
        let open = self.limits.max_connections - self.slots.available_permits();
        metrics()
            .connections_open
            .with_label_values(&["admin"])
            .set(open as i64);
    }
}

/// The admin listener's connection filter: waits for a free slot before it lets pingora
/// take a connection on.
#[derive(Debug)]
struct AdminSlots(Arc<AdminApp>);

impl std::fmt::Debug for AdminApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminApp")
            .field("limits", &self.limits)
            .finish()
    }
}

#[async_trait]
impl ConnectionFilter for AdminSlots {
    async fn should_accept(&self, addr: Option<&SocketAddr>) -> bool {
        let Some(peer) = addr.copied() else {
            return true;
        };
        let Ok(permit) = Arc::clone(&self.0.slots).acquire_owned().await else {
            return false;
        };
        let mut reserved = self.0.reserved.lock().unwrap_or_else(|p| p.into_inner());
        reserved.insert(peer, permit);
        true
    }
}

/// The one `AdminApp` of a gateway, shared by the listening service and its filter.
struct SharedAdmin(Arc<AdminApp>);

#[async_trait]
impl ServerApp for SharedAdmin {
    async fn process_new(
        self: &Arc<Self>,
        stream: pingora::protocols::Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<pingora::protocols::Stream> {
        let app = &self.0;
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet().copied()));
        let reserved = peer.and_then(|p| {
            let mut reserved = app.reserved.lock().unwrap_or_else(|p| p.into_inner());
            reserved.remove(&p)
        });
        let permit = match reserved {
            Some(p) => p,
            None => Arc::clone(&app.slots).try_acquire_owned().ok()?,
        };
        app.count();
        let gw = Arc::clone(&app.gateway);
        crate::http_server::serve_connection(stream, app.limits, move |req| {
            admin::handle(Arc::clone(&gw), req)
        })
        .await;
        drop(permit);
        app.count();
        None
    }
}

/// Closes the forwarding loop's pooled upstream connections once they have been idle
/// for `upstream.idle_timeout`, checking every second.
async fn sweep_idle_upstreams(forward: Arc<Forwarder>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        forward.sweep();
    }
}

/// fds the gateway keeps for itself: the admin listener's connections, health checks,
/// etcd, logs, runtimes, plugin files. The rest is for client and upstream connections.
const FD_RESERVE: u64 = 128;

/// `upstream.max_idle` when the config leaves it out (and descriptors are plenty).
const DEFAULT_MAX_IDLE: usize = 1024;

/// The proxy listener's limits under `config`, with `nofile` descriptors available.
pub fn limits(config: &Config, nofile: u64) -> Limits {
    let derived = nofile.saturating_sub(FD_RESERVE + config.admin.max_connections as u64) / 2;
    let max_connections = config
        .server
        .max_connections
        .unwrap_or(derived.max(16) as usize);
    Limits {
        max_connections,
        max_idle: config
            .upstream
            .max_idle
            .unwrap_or((max_connections / 2).min(DEFAULT_MAX_IDLE)),
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

/// Resolves the table's host names again every `upstream.dns_refresh`, on a blocking
/// thread, and rebuilds the table when one resolves to a new address.
async fn refresh_host_names(gateway: Arc<Gateway>) {
    loop {
        let period = gateway.settings().config.upstream.dns_refresh;
        tokio::time::sleep(period).await;
        let names = gateway.host_names();
        if names.is_empty() {
            continue;
        }
        let changed = tokio::task::spawn_blocking(move || {
            crate::dns::resolve(names.iter().map(String::as_str))
        })
        .await
        .unwrap_or(false);
        if changed {
            gateway.rebuild_for_dns();
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
///
/// With `upgrade`, it replaces the gateway running with the same config without dropping a
/// connection (pingora's graceful upgrade): it tells the old process (found through
/// `server.pid_file`) to hand over its listening sockets through `server.upgrade_sock`,
/// serves on them, and the old process finishes its requests and exits.
///
/// `read` is what the config's load read (`Config::load_reusing`), so that the first
/// reload need not parse the config or its `table.file` again if they did not change.
pub fn run(
    config: Config,
    path: Option<PathBuf>,
    read: Option<crate::config::FilesRead>,
    upgrade: bool,
) -> Result<std::convert::Infallible, StartError> {
    let admin_addr = config.admin_addr()?;
    let listen = config.listen_addr()?;
    let threads = config.server.threads;
    let work_stealing = config.server.work_stealing;
    let grace = config.server.grace_period.as_secs();
    let pid_file = config.server.pid_file();
    let upgrade_sock = config.server.upgrade_sock();
    let tls = config.server.tls.clone();
    let ca_file = config.upstream.ca_file.clone();
    let admin_limits = ServeLimits {
        max_connections: config.admin.max_connections,
        header_timeout: config.admin.header_timeout,
    };
    let old = if upgrade {
        Some(running_pid(&pid_file)?)
    } else {
        // Fail with a clear message before pingora tries (it would only log and exit).
        for (field, addr) in [("server.listen", listen), ("admin.listen", admin_addr)] {
            drop(
                std::net::TcpListener::bind(addr).map_err(|source| StartError::Bind {
                    field,
                    addr,
                    source,
                })?,
            );
        }
        None
    };
    let nofile = raise_nofile();
    let conns = Connections::new(limits(&config, nofile));
    tracing::info!(limits = ?conns.limits(), "proxy connection limits");
    let gateway = Gateway::new(config, path)?;
    if let Some(read) = read {
        gateway.started_with(read);
    }

    let mut conf = ServerConf {
        threads,
        work_stealing,
        grace_period_seconds: Some(grace),
        graceful_shutdown_timeout_seconds: Some(grace),
        upgrade_sock: upgrade_sock.display().to_string(),
        ca_file: ca_file.map(|p| p.display().to_string()),
        ..ServerConf::default()
    };
    // At most: the first choice, once more on a fresh connection if a pooled one was
    // stale, then the fallback. `proxy` decides which attempts happen.
    conf.max_retries = 3;
    // pingora's own pool (for what the forwarding loop hands over) keeps as many at most
    // (pingora multiplies its size by the threads). It is sized once, so a reload's
    // `upstream.max_idle` reaches only the loop's pool.
    conf.upstream_keepalive_pool_size = conns.limits().max_idle.div_ceil(threads.max(1));
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);

    let app = pingora::proxy::http_proxy(
        &server.configuration,
        Proxy::new(Arc::clone(&gateway), Arc::clone(&conns)),
    );
    let forward = Forwarder::new(Arc::clone(&gateway), Arc::clone(&conns));
    let mut proxy = Service::new(
        "hagate proxy".to_string(),
        Guard::new(app, Arc::clone(&conns), Some(Arc::clone(&forward))),
    );
    proxy.set_connection_filter(Arc::new(Admit(Arc::clone(&conns))));
    match &tls {
        Some(tls) => proxy
            .add_tls(
                &listen.to_string(),
                &tls.cert.to_string_lossy(),
                &tls.key.to_string_lossy(),
            )
            .map_err(|e| StartError::Tls(e.to_string()))?,
        None => proxy.add_tcp(&listen.to_string()),
    }
    server.add_service(proxy);

    let admin_app = Arc::new(AdminApp {
        gateway: Arc::clone(&gateway),
        limits: admin_limits,
        slots: Arc::new(Semaphore::new(admin_limits.max_connections)),
        reserved: Mutex::new(HashMap::new()),
    });
    let mut admin = Service::with_listeners(
        "hagate admin".to_string(),
        pingora::listeners::Listeners::tcp(&admin_addr.to_string()),
        SharedAdmin(Arc::clone(&admin_app)),
    );
    admin.threads = Some(1);
    admin.set_connection_filter(Arc::new(AdminSlots(admin_app)));
    server.add_service(admin);

    server.add_service(background_service(
        "control plane",
        ControlPlane {
            gateway: Arc::clone(&gateway),
            conns,
            forward,
            nofile,
        },
    ));
    if let Some(old) = old {
        // The old process connects to our upgrade socket (retrying for 5 s) once told;
        // bootstrap below listens on it and takes the sockets.
        tracing::info!(pid = old, sock = %upgrade_sock.display(), "upgrading: asking the running gateway for its listeners");
        if let Err(error) = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(old),
            nix::sys::signal::Signal::SIGQUIT,
        ) {
            return Err(StartError::Upgrade(format!(
                "cannot signal the running gateway (pid {old}): {error}"
            )));
        }
    }
    server.bootstrap();
    write_pid_file(&pid_file);
    crate::notify::ready();
    tracing::info!(%listen, admin = %admin_addr, tls = tls.is_some(), upgraded = upgrade, "hagate is serving");
    server.run(pingora::server::RunArgs::default());
    remove_pid_file(&pid_file);
    tracing::info!("hagate stopped");
    std::process::exit(0)
}

/// The pid in `pid_file`, if that process is running.
fn running_pid(pid_file: &std::path::Path) -> Result<i32, StartError> {
    let text = std::fs::read_to_string(pid_file).map_err(|e| {
        StartError::Upgrade(format!(
            "server.pid_file {}: {e} (is a gateway with this config running?)",
            pid_file.display()
        ))
    })?;
    let pid: i32 = text.trim().parse().map_err(|_| {
        StartError::Upgrade(format!(
            "server.pid_file {} holds {text:?}, not a pid",
            pid_file.display()
        ))
    })?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).map_err(|e| {
        StartError::Upgrade(format!(
            "server.pid_file {} names pid {pid}, which is not running: {e}",
            pid_file.display()
        ))
    })?;
    // A pid file left by a gateway that was killed may name a pid the system has since
    // given to another program, which SIGQUIT would stop: the process must be this program.
    let name = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|c| c.trim_end().to_string())
    };
    match (name(&pid.to_string()), name("self")) {
        (Ok(theirs), Ok(ours)) if theirs != ours => Err(StartError::Upgrade(format!(
            "server.pid_file {} names pid {pid}, which is `{theirs}`, not a `{ours}` gateway \
             (a pid file left by a gateway that did not stop cleanly?); refusing to signal it",
            pid_file.display()
        ))),
        _ => Ok(pid),
    }
}

fn write_pid_file(pid_file: &std::path::Path) {
    if let Err(error) = std::fs::write(pid_file, format!("{}\n", std::process::id())) {
        tracing::warn!(%error, path = %pid_file.display(), "cannot write server.pid_file; `hagate run --upgrade` will not find this gateway");
    }
}

/// Removes the pid file if it still names this process (after an upgrade it names the
/// new one).
fn remove_pid_file(pid_file: &std::path::Path) {
    let ours =
        std::fs::read_to_string(pid_file).is_ok_and(|t| t.trim() == std::process::id().to_string());
    if ours {
        let _ = std::fs::remove_file(pid_file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!("{extra}\n[instances.cs_1]\naddress = \"127.0.0.1:1\"\n");
        Config::parse(&text).unwrap()
    }

    #[test]
    fn idle_upstream_connections_leave_descriptors_for_live_ones() {
        assert_eq!(limits(&config(""), 1 << 20).max_idle, 1024);
        // under ulimit -n 256: (256 - 128 - 64) / 2 = 32 connections, half of that idle
        let low = limits(&config(""), 256);
        assert_eq!((low.max_connections, low.max_idle), (32, 16));
        let set = config("[server]\nmax_connections = 100\n");
        assert_eq!(limits(&set, 1 << 20).max_idle, 50);
        // as the config says, if it says
        let set = config("[upstream]\nmax_idle = 5000\n");
        assert_eq!(limits(&set, 256).max_idle, 5000);
    }
}
