//! The gateway's shared state: the current config, the alias table holder, the placement
//! policy, and the reload paths (config file, SIGHUP, admin API) that replace them.
//!
//! Every replacement is validate-then-swap: a bad config or table is refused with the reason
//! and the old one keeps serving. No pingora here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderName;
use tokio::sync::watch;

use crate::aliases::{AliasTable, InstanceSpec, TableError, TableHolder};
use crate::config::{Config, ConfigError};
use crate::metrics::metrics;
use crate::plugin::PluginSet;

/// A validated config plus what request handling derives from it once.
#[derive(Debug)]
pub struct Settings {
    /// The config as loaded.
    pub config: Config,
    /// `context_id.header`, parsed.
    pub context_header: HeaderName,
    /// `routing.tenant_header`, parsed.
    pub tenant_header: HeaderName,
}

impl Settings {
    /// Derives settings from a config that passed `validate()`; private so that only
    /// `Gateway::new` and `reload` (both validate first) can call it.
    fn new(config: Config) -> Self {
        let context_header = HeaderName::from_bytes(config.context_id.header.as_bytes())
            .expect("validated by Config::validate");
        let tenant_header = HeaderName::from_bytes(config.routing.tenant_header.as_bytes())
            .expect("validated by Config::validate");
        Settings {
            config,
            context_header,
            tenant_header,
        }
    }
}

/// Where a table swap came from, for logs and `hagate_alias_table_swaps_total{source}`.
#[derive(Debug, Clone, Copy)]
pub enum SwapSource {
    /// The config file changed on disk.
    ConfigFile,
    /// The process got SIGHUP.
    Sighup,
    /// `PUT /v1/aliases`.
    Api,
}

impl SwapSource {
    fn label(self) -> &'static str {
        match self {
            SwapSource::ConfigFile => "config",
            SwapSource::Sighup => "sighup",
            SwapSource::Api => "api",
        }
    }
}

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The new alias table is invalid.
    #[error("{field}: {source}", field = .0.field(), source = .0)]
    Table(#[from] TableError),
    /// There is no config file to reload (the gateway runs on an in-memory config).
    #[error("no config file to reload")]
    NoFile,
}

/// Shared state of one running gateway.
pub struct Gateway {
    settings: ArcSwap<Settings>,
    tables: TableHolder,
    placement: ArcSwap<PluginSet>,
    config_path: Option<PathBuf>,
    /// Bumped after every successful swap; the health checker watches it.
    changes: watch::Sender<u64>,
}

impl Gateway {
    /// Validates `config` and builds the gateway state from it. Everything downstream
    /// (`Settings`, the listen addresses) relies on this validation.
    pub fn new(config: Config, config_path: Option<PathBuf>) -> Result<Arc<Self>, ConfigError> {
        config.validate()?;
        let placement = PluginSet::load(&config.plugins, None)?;
        let tables = TableHolder::new(&config.instances)?;
        metrics().observe_table(&tables.load());
        let (changes, _) = watch::channel(1);
        Ok(Arc::new(Gateway {
            settings: ArcSwap::from_pointee(Settings::new(config)),
            tables,
            placement: ArcSwap::from_pointee(placement),
            config_path,
            changes,
        }))
    }

    /// The current settings.
    #[inline]
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    /// The current alias table.
    #[inline]
    pub fn table(&self) -> Arc<AliasTable> {
        self.tables.load()
    }

    /// The placement policy for requests without a HAID (plugins and the native
    /// fallback). Keep the `Arc` for the whole request: a reload does not touch it.
    pub fn placement(&self) -> Arc<PluginSet> {
        self.placement.load_full()
    }

    /// The config file this gateway reloads from.
    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    /// A receiver that changes after every successful swap.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn swapped(&self, source: SwapSource, table: &AliasTable) {
        metrics()
            .table_swaps
            .with_label_values(&[source.label(), "ok"])
            .inc();
        metrics().observe_table(table);
        self.changes.send_modify(|v| *v += 1);
        tracing::info!(
            source = source.label(),
            version = table.version(),
            aliases = table.len(),
            "alias table swapped"
        );
    }

    fn refused(&self, source: SwapSource, error: &dyn std::fmt::Display) {
        metrics()
            .table_swaps
            .with_label_values(&[source.label(), "error"])
            .inc();
        tracing::error!(source = source.label(), %error, "refused; the old config keeps serving");
    }

    /// Re-reads the config file, validates it and swaps config and table in.
    pub fn reload(&self, source: SwapSource) -> Result<Arc<AliasTable>, ReloadError> {
        let result = self.try_reload();
        match &result {
            Ok(t) => self.swapped(source, t),
            Err(e) => self.refused(source, e),
        }
        result
    }

    fn try_reload(&self) -> Result<Arc<AliasTable>, ReloadError> {
        let path = self.config_path.as_deref().ok_or(ReloadError::NoFile)?;
        let config = Config::load(path)?;
        let old = self.settings();
        for (field, old_v, new_v) in [
            (
                "server.listen",
                &old.config.server.listen,
                &config.server.listen,
            ),
            (
                "admin.listen",
                &old.config.admin.listen,
                &config.admin.listen,
            ),
        ] {
            if old_v != new_v {
                tracing::warn!(
                    field,
                    "changed in the config file; restart hagate to apply it"
                );
            }
        }
        // Plugins first: a plugin that fails to load refuses the whole reload.
        let placement = PluginSet::load(&config.plugins, Some(&self.placement.load()))?;
        let table = self.tables.publish(&config.instances)?;
        self.placement.store(Arc::new(placement));
        self.settings.store(Arc::new(Settings::new(config)));
        Ok(table)
    }

    /// Replaces only the alias table (`PUT /v1/aliases`). The next config reload replaces
    /// it again with the file's `[instances]`.
    pub fn put_aliases(
        &self,
        specs: &BTreeMap<String, InstanceSpec>,
    ) -> Result<Arc<AliasTable>, TableError> {
        match self.tables.publish(specs) {
            Ok(t) => {
                self.swapped(SwapSource::Api, &t);
                Ok(t)
            }
            Err(e) => {
                self.refused(SwapSource::Api, &format!("{}: {e}", e.field()));
                Err(e)
            }
        }
    }
}
