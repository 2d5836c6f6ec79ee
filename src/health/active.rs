//! Active health checks: one task per instance address, all running in parallel, each an
//! HTTP GET of `health.active.path` every `interval` with a `timeout`.
//!
//! The supervisor re-reads the table after every swap, starting checks for new addresses
//! and stopping them for removed ones. Results go into the shared `InstanceState`.

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
    loop {
        let cfg = owner.active_config();
        if last_cfg.as_ref() != Some(&cfg) {
            for (_, (_, task)) in running.drain() {
                task.abort();
            }
        }
        // Disabled, nothing runs (the drain above stopped it); enabled, the targets are
        // read for this pass only, not kept while waiting (a copy of every alias).
        if cfg.enabled {
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
                    let task = tokio::spawn(check_loop((*target).clone(), cfg.clone(), ca.clone()));
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

/// The HTTP client and URL that check `target`: plain HTTP, or HTTPS verified against
/// `ca` (else the system's roots) with the target's server name.
fn check_client(
    target: &CheckTarget,
    cfg: &ActiveHealthConfig,
    ca: Option<&std::path::Path>,
) -> Result<(reqwest::Client, String), String> {
    let mut builder = reqwest::Client::builder()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        .pool_max_idle_per_host(1)
        .no_proxy();
    let addr = target.addr;
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

async fn check_loop(target: CheckTarget, cfg: ActiveHealthConfig, ca: Option<std::path::PathBuf>) {
    let (client, url) = match check_client(&target, &cfg, ca.as_deref()) {
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
