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
    /// Every instance to check: address, alias, and its shared state.
    fn targets(&self) -> Vec<(SocketAddr, String, Arc<InstanceState>)>;
    /// A receiver that changes whenever the targets or the settings may have changed.
    fn subscribe(&self) -> watch::Receiver<u64>;
}

/// Runs the checks until the owner's change channel closes; restarts them whenever the
/// table or the health config changes.
pub async fn supervise(owner: Arc<impl CheckTargets>) {
    let mut changes = owner.subscribe();
    let mut running: HashMap<SocketAddr, (String, JoinHandle<()>)> = HashMap::new();
    let mut last_cfg: Option<ActiveHealthConfig> = None;
    loop {
        let cfg = owner.active_config();
        let targets = owner.targets();
        if last_cfg.as_ref() != Some(&cfg) {
            for (_, (_, task)) in running.drain() {
                task.abort();
            }
        }
        let wanted: HashMap<SocketAddr, (&str, &Arc<InstanceState>)> = targets
            .iter()
            .map(|(addr, alias, state)| (*addr, (alias.as_str(), state)))
            .collect();
        running.retain(|addr, (alias, task)| {
            let keep = wanted.get(addr).is_some_and(|(a, _)| a == alias);
            if !keep {
                task.abort();
            }
            keep
        });
        if cfg.enabled {
            for (addr, (alias, state)) in &wanted {
                running.entry(*addr).or_insert_with(|| {
                    let task = tokio::spawn(check_loop(
                        *addr,
                        alias.to_string(),
                        Arc::clone(state),
                        cfg.clone(),
                    ));
                    (alias.to_string(), task)
                });
            }
        }
        last_cfg = Some(cfg);
        drop(wanted);
        if changes.changed().await.is_err() {
            break;
        }
    }
    for (_, (_, task)) in running {
        task.abort();
    }
}

async fn check_loop(
    addr: SocketAddr,
    alias: String,
    state: Arc<InstanceState>,
    cfg: ActiveHealthConfig,
) {
    let client = match reqwest::Client::builder()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        .pool_max_idle_per_host(1)
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(%error, "cannot build the health-check client");
            return;
        }
    };
    let url = format!("http://{addr}{}", cfg.path);
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
            Err(_) => false,
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
