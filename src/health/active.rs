//! Active health checks: one task per instance address, all running in parallel, each an
//! HTTP GET of `health.active.path` every `interval` with a `timeout`.
//!
//! The supervisor re-reads the table after every swap, starting checks for new addresses
//! and stopping them for removed ones. Results go into the shared `InstanceState`.
//!
//! Plain-HTTP checks share one client per health config (it keeps one idle connection per
//! address). Building a client reads the system's root certificates, tens of milliseconds
//! in a debug build, so clients are built on a blocking thread: built on the runtime, once
//! per address, they stalled every check whenever the table gained an address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio::time::{interval, MissedTickBehavior};

use tokio::sync::watch;

use crate::health::{InstanceState, Transition};
use crate::metrics::metrics;
use crate::model::ActiveHealthConfig;

/// What the checks need from whoever owns the table: the settings, the instances to
/// check, and a signal when either changes. The gateway implements it; health imports
/// nothing above itself.
pub trait CheckTargets: Send + Sync + 'static {
    /// The current `[health.active]` settings.
    fn active_config(&self) -> ActiveHealthConfig;
    /// Every instance to check.
    fn targets(&self) -> Vec<CheckTarget>;
    /// The CA certificates (PEM file) that TLS instances are verified against; `None`:
    /// the system's roots.
    fn ca_file(&self) -> Option<std::path::PathBuf>;
    /// A receiver that changes whenever the targets or the settings may have changed.
    fn subscribe(&self) -> watch::Receiver<u64>;
}

/// One instance to check.
#[derive(Debug, Clone)]
pub struct CheckTarget {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its alias.
    pub alias: String,
    /// Its shared health state.
    pub state: Arc<InstanceState>,
    /// `Some(server name)` to check it over TLS (an empty name: verify the IP).
    pub tls: Option<String>,
}

/// Runs the checks until the owner's change channel closes; restarts them whenever the
/// table or the health config changes.
pub async fn supervise(owner: Arc<impl CheckTargets>) {
    let mut changes = owner.subscribe();
    // per address: (alias, TLS name) and its check task
    type Key = (String, Option<String>);
    let mut running: HashMap<SocketAddr, (Key, JoinHandle<()>)> = HashMap::new();
    let mut last_cfg: Option<ActiveHealthConfig> = None;
    // the plain-HTTP client of `last_cfg`, shared by its checks
    let mut plain: Option<reqwest::Client> = None;
    loop {
        let cfg = owner.active_config();
        if last_cfg.as_ref() != Some(&cfg) {
            for (_, (_, task)) in running.drain() {
                task.abort();
            }
            plain = None;
        }
        // Disabled, nothing runs (the drain above stopped it); enabled, the targets are
        // read for this pass only, not kept while waiting (a copy of every alias).
        if cfg.enabled {
            if plain.is_none() {
                let c = cfg.clone();
                plain = tokio::task::spawn_blocking(move || plain_client(&c))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
                    .inspect_err(|error| {
                        tracing::error!(%error, "cannot build the health-check client");
                    })
                    .ok();
            }
            let targets = owner.targets();
            let wanted: HashMap<SocketAddr, &CheckTarget> =
                targets.iter().map(|t| (t.addr, t)).collect();
            running.retain(|addr, (key, task)| {
                let keep = wanted
                    .get(addr)
                    .is_some_and(|t| *key == (t.alias.clone(), t.tls.clone()));
                if !keep {
                    task.abort();
                }
                keep
            });
            let ca = owner.ca_file();
            for (addr, target) in &wanted {
                running.entry(*addr).or_insert_with(|| {
                    let task = tokio::spawn(check_loop(
                        (*target).clone(),
                        cfg.clone(),
                        ca.clone(),
                        plain.clone(),
                    ));
                    ((target.alias.clone(), target.tls.clone()), task)
                });
            }
        }
        last_cfg = Some(cfg);
        if changes.changed().await.is_err() {
            break;
        }
    }
    for (_, (_, task)) in running {
        task.abort();
    }
}

/// A client builder with the check's timeouts and one idle connection per address.
fn client_builder(cfg: &ActiveHealthConfig) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        .pool_max_idle_per_host(1)
        .no_proxy()
}

/// The client shared by every plain-HTTP check of `cfg`. Blocking: it reads the roots.
fn plain_client(cfg: &ActiveHealthConfig) -> Result<reqwest::Client, String> {
    client_builder(cfg).build().map_err(|e| e.to_string())
}

/// The URL that checks `target`, and its client: `plain` for plain HTTP, else one of its
/// own for HTTPS, verified against `ca` (else the system's roots) with the target's server
/// name. Blocking when it builds a client.
fn check_client(
    target: &CheckTarget,
    cfg: &ActiveHealthConfig,
    ca: Option<&std::path::Path>,
    plain: Option<reqwest::Client>,
) -> Result<(reqwest::Client, String), String> {
    let addr = target.addr;
    if let (None, Some(client)) = (&target.tls, plain) {
        return Ok((client, format!("http://{addr}{}", cfg.path)));
    }
    let mut builder = client_builder(cfg);
    let url = match &target.tls {
        None => format!("http://{addr}{}", cfg.path),
        Some(name) => {
            builder = builder.use_rustls_tls();
            if let Some(ca) = ca {
                let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
                for cert in
                    reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| e.to_string())?
                {
                    builder = builder.add_root_certificate(cert);
                }
                builder = builder.tls_built_in_root_certs(false);
            }
            if name.is_empty() {
                format!("https://{addr}{}", cfg.path)
            } else {
                builder = builder.resolve(name, addr);
                format!("https://{name}:{}{}", addr.port(), cfg.path)
            }
        }
    };
    Ok((builder.build().map_err(|e| e.to_string())?, url))
}

async fn check_loop(
    target: CheckTarget,
    cfg: ActiveHealthConfig,
    ca: Option<std::path::PathBuf>,
    plain: Option<reqwest::Client>,
) {
    let built = match (&target.tls, plain) {
        (None, Some(client)) => check_client(&target, &cfg, None, Some(client)),
        // a client of its own: built on a blocking thread, not on the checks' runtime
        (_, plain) => {
            let (t, c) = (target.clone(), cfg.clone());
            tokio::task::spawn_blocking(move || check_client(&t, &c, ca.as_deref(), plain))
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
        }
    };
    let (client, url) = match built {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(%error, alias = target.alias, "cannot build the health-check client");
            return;
        }
    };
    let CheckTarget {
        addr, alias, state, ..
    } = target;
    let mut ticks = interval(cfg.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let m = metrics();
    loop {
        ticks.tick().await;
        let passed = match client.get(&url).send().await {
            Ok(resp) => resp.status().is_success() || resp.status().is_redirection(),
            // Out of descriptors here is not the instance failing: skip this check.
            Err(e) if crate::health::is_local_resource_error(&e) => {
                m.local_resource_errors
                    .with_label_values(&["health_check"])
                    .inc();
                tracing::warn!(alias, %addr, error = %e, "health check skipped: the gateway is out of local resources");
                continue;
            }
            Err(e) => {
                let mut error = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    error = format!("{error}: {cause}");
                    source = cause.source();
                }
                tracing::debug!(alias, %addr, error, "health check failed");
                false
            }
        };
        m.health_checks
            .with_label_values(&[alias.as_str(), if passed { "pass" } else { "fail" }])
            .inc();
        match state.record_check(passed, cfg.rise, cfg.fall) {
            Transition::Same => {}
            Transition::Up => {
                m.health_transitions
                    .with_label_values(&[alias.as_str(), "up"])
                    .inc();
                tracing::info!(alias, %addr, "instance is up");
            }
            Transition::Down => {
                m.health_transitions
                    .with_label_values(&[alias.as_str(), "down"])
                    .inc();
                tracing::warn!(alias, %addr, "instance is down");
            }
        }
    }
}
