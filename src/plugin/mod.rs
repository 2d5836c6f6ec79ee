//! Wasm placement plugins: loading them from config, choosing one per request, and
//! applying its fail policy.
//!
//! `PluginSet` is what the gateway swaps in on reload. Its `place` is the gateway's placement
//! policy: the first plugin whose `match` fits the request places it; a failed call counts its outcome and
//! then falls back to the native `LeastLoaded` or rejects, as the plugin's `fail_policy`
//! says. With no plugin matching, the native policy places.
//!
//! Loading checks everything before anything is swapped: the file exists, hashes to its
//! `sha256`, compiles as a `hagate:policy` component (0.2.0 or 0.1.0), instantiates within its limits,
//! and accepts its `config`. A plugin whose file and settings did not change is reused, not
//! recompiled. No pingora here.

pub mod bindings;
pub mod host;
mod nonblocking;

use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

pub use host::{CallError, Limits, LoadError, Plugin};

use crate::config::{ConfigError, FailPolicy, PluginConfig};
use crate::metrics::metrics;
use crate::placement::{
    Candidates, Choice, LeastLoaded, Placement, PlacementError, PlacementRequest,
};

/// One configured plugin: its settings and its loaded code.
#[derive(Debug)]
pub struct Loaded {
    /// The `[[plugins]]` entry it was loaded from.
    pub spec: PluginConfig,
    /// The compiled plugin with its instance pool.
    pub plugin: Arc<Plugin>,
}

/// The placement policy of one config: plugins in priority order, and the native fallback.
#[derive(Debug, Default)]
pub struct PluginSet {
    plugins: Vec<Loaded>,
    native: LeastLoaded,
}

/// Reads the file of `spec` and checks its hash.
pub fn read_checked(spec: &PluginConfig, field: &str) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(&spec.path).map_err(|e| ConfigError::Invalid {
        field: format!("{field}.path"),
        message: format!("cannot read {}: {e}", spec.path.display()),
    })?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if !actual.eq_ignore_ascii_case(&spec.sha256) {
        return Err(ConfigError::Invalid {
            field: format!("{field}.sha256"),
            message: format!(
                "{} has sha256 {actual}, but the config says {}; refusing it",
                spec.path.display(),
                spec.sha256
            ),
        });
    }
    Ok(bytes)
}

/// One plugin of a set being loaded: kept from the previous set, or compiling.
enum Step<'s> {
    Reused(Loaded),
    Loading(std::thread::ScopedJoinHandle<'s, Result<Loaded, ConfigError>>),
}

/// Loads one plugin on the calling thread (with a runtime of its own), counting and
/// logging the outcome.
fn load_fresh(spec: &PluginConfig, field: &str) -> Result<Loaded, ConfigError> {
    let started = Instant::now();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ConfigError::Invalid {
            field: field.to_string(),
            message: format!("cannot start a runtime to load the plugin: {e}"),
        })
        .and_then(|rt| rt.block_on(load_one(spec, field)));
    let label = if result.is_ok() { "ok" } else { "error" };
    metrics()
        .plugin_reloads
        .with_label_values(&[&spec.name, label])
        .inc();
    let plugin = result?;
    tracing::info!(
        plugin = %spec.name,
        path = %spec.path.display(),
        wit = plugin.version(),
        took_ms = started.elapsed().as_millis() as u64,
        "placement plugin loaded"
    );
    Ok(Loaded {
        spec: spec.clone(),
        plugin: Arc::new(plugin),
    })
}

/// The limits `spec` asks for.
pub fn limits(spec: &PluginConfig) -> Limits {
    Limits::new(spec.deadline, spec.memory_limit)
}

/// Loads one plugin from a checked file.
pub async fn load_one(spec: &PluginConfig, field: &str) -> Result<Plugin, ConfigError> {
    let bytes = read_checked(spec, field)?;
    Plugin::load(&bytes, &spec.config, limits(spec))
        .await
        .map_err(|e| ConfigError::Invalid {
            field: match e {
                LoadError::Configure(_) => format!("{field}.config"),
                _ => format!("{field}.path"),
            },
            message: format!("plugin `{}` ({}) {e}", spec.name, spec.path.display()),
        })
}

impl PluginSet {
    /// Loads every plugin of `specs`, reusing those of `previous` whose settings are
    /// unchanged and whose file still matches. Any failure refuses the whole set.
    ///
    /// Blocking, and never on the caller's runtime: each plugin that needs compiling gets
    /// a thread of its own (with a small runtime for the async instantiation), so the
    /// plugins compile in parallel and the set is complete when the slowest is ready. The
    /// gateway calls it through `spawn_blocking`, so the control plane (admin API, health
    /// checks, heartbeats) never waits on a compile.
    pub fn load(specs: &[PluginConfig], previous: Option<&PluginSet>) -> Result<Self, ConfigError> {
        let outcomes: Vec<Result<Loaded, ConfigError>> = std::thread::scope(|s| {
            let handles: Vec<_> = specs
                .iter()
                .enumerate()
                .map(|(i, spec)| {
                    let field = format!("plugins[{i}]");
                    let reuse = previous
                        .and_then(|p| p.plugins.iter().find(|l| l.spec == *spec))
                        .filter(|_| read_checked(spec, &field).is_ok())
                        .map(|old| Arc::clone(&old.plugin));
                    match reuse {
                        Some(plugin) => Step::Reused(Loaded {
                            spec: spec.clone(),
                            plugin,
                        }),
                        None => Step::Loading(s.spawn(move || load_fresh(spec, &field))),
                    }
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Step::Reused(reused) => Ok(reused),
                    Step::Loading(thread) => thread.join().unwrap_or_else(|_| {
                        Err(ConfigError::Invalid {
                            field: "plugins".into(),
                            message: "loading a plugin panicked".into(),
                        })
                    }),
                })
                .collect()
        });
        Ok(PluginSet {
            plugins: outcomes.into_iter().collect::<Result<_, _>>()?,
            native: LeastLoaded::default(),
        })
    }

    /// The loaded plugins, in priority order.
    pub fn plugins(&self) -> &[Loaded] {
        &self.plugins
    }

    /// The plugin that places a request with this path and tenant, if any.
    pub fn select(&self, path: &str, tenant: Option<&str>) -> Option<&Loaded> {
        self.plugins.iter().find(|l| {
            l.spec.matches.is_empty() || l.spec.matches.iter().any(|m| m.fits(path, tenant))
        })
    }
}

impl PluginSet {
    /// Places a new context: the matching plugin, its fail policy, or the native policy.
    pub async fn place(
        &self,
        request: &PlacementRequest<'_>,
        candidates: &Candidates<'_>,
    ) -> Result<Choice, PlacementError> {
        let Some(loaded) = self.select(request.path, request.tenant) else {
            return self.native.place(request, candidates);
        };
        let name = loaded.spec.name.as_str();
        let m = metrics();
        let started = Instant::now();
        let result = loaded.plugin.place(request, candidates).await;
        m.plugin_call_seconds
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(choice) => {
                m.plugin_calls.with_label_values(&[name, "ok"]).inc();
                return Ok(choice);
            }
            Err(e) => e,
        };
        m.plugin_calls
            .with_label_values(&[name, error.outcome()])
            .inc();
        match loaded.spec.fail_policy {
            FailPolicy::Fallback => {
                tracing::warn!(plugin = name, %error, "placement plugin failed; placing natively");
                m.plugin_calls.with_label_values(&[name, "fallback"]).inc();
                self.native.place(request, candidates)
            }
            FailPolicy::Reject => {
                tracing::warn!(plugin = name, %error, "placement plugin failed; rejecting");
                Err(PlacementError::Rejected {
                    plugin: name.to_string(),
                    reason: error.to_string(),
                })
            }
        }
    }
}
