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
//! recompiled; a file is compiled once, and entries on the same file (or a changed entry on
//! a file the previous set compiled) share its code. No pingora here.

pub mod bindings;
pub mod host;
mod nonblocking;

use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

pub use host::{CallError, Code, Limits, LoadError, Plugin};

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

/// Loads one plugin on compiled `code` on the calling thread (with a runtime of its own,
/// for `configure`), counting and logging the outcome. `compiled` says whether the code was
/// compiled for it, or shared with another entry on the same file.
fn load_fresh(
    spec: &PluginConfig,
    field: &str,
    code: Result<Arc<Code>, ConfigError>,
    compiled: bool,
    started: Instant,
) -> Result<Loaded, ConfigError> {
    let result = code.and_then(|code| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ConfigError::Invalid {
                field: field.to_string(),
                message: format!("cannot start a runtime to load the plugin: {e}"),
            })?;
        rt.block_on(Plugin::new(code, &spec.config, limits(spec)))
            .map_err(|e| load_error(spec, field, e))
    });
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
        code = if compiled { "compiled" } else { "shared" },
        took_ms = started.elapsed().as_millis() as u64,
        "placement plugin loaded"
    );
    Ok(Loaded {
        spec: spec.clone(),
        plugin: Arc::new(plugin),
    })
}

/// A load error as a config error naming the field it comes from.
fn load_error(spec: &PluginConfig, field: &str, e: LoadError) -> ConfigError {
    ConfigError::Invalid {
        field: match e {
            LoadError::Configure(_) => format!("{field}.config"),
            _ => format!("{field}.path"),
        },
        message: format!("plugin `{}` ({}) {e}", spec.name, spec.path.display()),
    }
}

/// For an entry that shares the file of entry `j`, whose load failed: the set is refused
/// at `j` before this is reached.
fn failed_before(j: usize) -> ConfigError {
    ConfigError::Invalid {
        field: format!("plugins[{j}].path"),
        message: "did not load".into(),
    }
}

/// The limits `spec` asks for.
pub fn limits(spec: &PluginConfig) -> Limits {
    Limits::new(spec.deadline, spec.memory_limit)
}

/// Reads and compiles the file of one plugin.
fn compile(spec: &PluginConfig, field: &str) -> Result<Arc<Code>, ConfigError> {
    let bytes = read_checked(spec, field)?;
    Code::compile(&bytes)
        .map(Arc::new)
        .map_err(|e| load_error(spec, field, e))
}

/// Where one entry of a set being loaded gets its plugin or its code.
enum Source<'s> {
    /// The whole plugin is kept from the previous set: the same settings, the same file.
    Reused(Arc<Plugin>),
    /// Code the previous set compiled from the same file (checked again).
    Shared(Arc<Code>),
    /// Compiled now, on a thread of its own: the first entry with this file's hash.
    Compiling(std::thread::ScopedJoinHandle<'s, Result<Arc<Code>, ConfigError>>),
    /// The same file as an earlier entry that compiles it now (its index).
    SameAs(usize),
}

/// What a `Source` came to once every compile is done.
enum Ready {
    Reused(Arc<Plugin>),
    Shared(Arc<Code>),
    Compiled(Result<Arc<Code>, ConfigError>),
    SameAs(usize),
}

impl PluginSet {
    /// Loads every plugin of `specs`, reusing those of `previous` whose settings are
    /// unchanged and whose file still matches. Any failure refuses the whole set.
    ///
    /// A file is compiled once: entries that name the same file (by its hash) share its
    /// code, and an entry on a file that the previous set compiled (with a changed
    /// `config`, say) takes that code once the file is checked. Each entry has its own
    /// config, limits and instances.
    ///
    /// Blocking, and never on the caller's runtime: each file that needs compiling gets a
    /// thread of its own, so the plugins compile in parallel and the set is complete when
    /// the slowest is ready. The gateway calls it through `spawn_blocking`, so the control
    /// plane (admin API, health checks, heartbeats) never waits on a compile.
    pub fn load(specs: &[PluginConfig], previous: Option<&PluginSet>) -> Result<Self, ConfigError> {
        let started = Instant::now();
        let field = |i: usize| format!("plugins[{i}]");
        let same_file =
            |a: &PluginConfig, b: &PluginConfig| a.sha256.eq_ignore_ascii_case(&b.sha256);
        let old = previous.map_or(&[][..], |p| &p.plugins[..]);
        let ready: Vec<Ready> = std::thread::scope(|s| {
            let mut sources: Vec<Source<'_>> = Vec::with_capacity(specs.len());
            for (i, spec) in specs.iter().enumerate() {
                let compiling = |j: usize| matches!(sources[j], Source::Compiling(_));
                // The same settings keep the whole plugin, the same file its code; either
                // only once the file is read and checked (once) against the hash.
                let same = old.iter().find(|l| l.spec == *spec);
                let kept = same
                    .or_else(|| old.iter().find(|l| same_file(&l.spec, spec)))
                    .filter(|_| read_checked(spec, &field(i)).is_ok());
                let source = if let Some(l) = kept {
                    if same.is_some() {
                        Source::Reused(Arc::clone(&l.plugin))
                    } else {
                        Source::Shared(Arc::clone(l.plugin.code()))
                    }
                } else if let Some(j) = (0..i).find(|&j| same_file(&specs[j], spec) && compiling(j))
                {
                    Source::SameAs(j)
                } else {
                    Source::Compiling(s.spawn(move || compile(spec, &field(i))))
                };
                sources.push(source);
            }
            sources
                .into_iter()
                .map(|source| match source {
                    Source::Reused(plugin) => Ready::Reused(plugin),
                    Source::Shared(code) => Ready::Shared(code),
                    Source::SameAs(j) => Ready::SameAs(j),
                    Source::Compiling(thread) => {
                        Ready::Compiled(thread.join().unwrap_or_else(|_| {
                            Err(ConfigError::Invalid {
                                field: "plugins".into(),
                                message: "compiling a plugin panicked".into(),
                            })
                        }))
                    }
                })
                .collect()
        });
        let mut codes: Vec<Option<Arc<Code>>> = Vec::with_capacity(specs.len());
        let mut plugins = Vec::with_capacity(specs.len());
        for (i, (spec, ready)) in specs.iter().zip(ready).enumerate() {
            let (code, compiled) = match ready {
                Ready::Reused(plugin) => {
                    codes.push(None);
                    plugins.push(Loaded {
                        spec: spec.clone(),
                        plugin,
                    });
                    continue;
                }
                Ready::Shared(code) => (Ok(code), false),
                Ready::Compiled(code) => (code, true),
                // the entry it shares with loaded first, or the set was refused then
                Ready::SameAs(j) => (codes[j].clone().ok_or_else(|| failed_before(j)), false),
            };
            codes.push(code.as_ref().ok().cloned());
            plugins.push(load_fresh(spec, &field(i), code, compiled, started)?);
        }
        Ok(PluginSet {
            plugins,
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
