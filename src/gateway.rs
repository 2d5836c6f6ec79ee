//! The gateway's shared state: the current config, the alias table holder, the placement
//! policy, the membership store, and the reload paths (config file, SIGHUP, admin API,
//! membership changes) that replace them.
//!
//! The published alias table is the static table (the config's `[instances]`, or what
//! `PUT /v1/aliases` set) merged with the live holders of the membership store: for an
//! alias with a live holder, the holder's address wins unless `prefer = "static"`.
//!
//! Every replacement is validate-then-swap: a bad config or table is refused with the reason
//! and the old one keeps serving. No pingora here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::HeaderName;
use tokio::sync::watch;

use crate::aliases::{AliasTable, InstanceSpec, TableError, TableHolder};
use crate::config::{Config, ConfigError, Prefer};
use crate::metrics::metrics;
use crate::plugin::PluginSet;
use crate::ring::ReplacementRing;
use crate::store::embedded::EmbeddedStore;
use crate::store::{Entry, MembershipStore};

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
    /// A membership change: a new holder, or a holder's heartbeat expired.
    Membership,
}

impl SwapSource {
    fn label(self) -> &'static str {
        match self {
            SwapSource::ConfigFile => "config",
            SwapSource::Sighup => "sighup",
            SwapSource::Api => "api",
            SwapSource::Membership => "membership",
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
    /// The static table: the config's `[instances]`, or what `PUT /v1/aliases` set.
    static_specs: Mutex<BTreeMap<String, InstanceSpec>>,
    /// What was last published (static merged with holders). Its lock also serialises
    /// publishing.
    published: Mutex<BTreeMap<String, InstanceSpec>>,
    /// The membership store, used only through its trait (so another store can replace
    /// the embedded one).
    store: Arc<dyn MembershipStore>,
    /// The live holders as last read from the store; the table is merged from these.
    holders: Mutex<Vec<Entry>>,
    ring: ReplacementRing,
}

/// The table to publish: `statics`, with each alias that has a live holder pointed at the
/// holder (unless it prefers its static address), plus aliases only membership knows.
pub fn merge(
    statics: &BTreeMap<String, InstanceSpec>,
    holders: &[Entry],
    default: Prefer,
) -> BTreeMap<String, InstanceSpec> {
    let mut merged = statics.clone();
    for h in holders {
        match merged.get_mut(h.alias.as_str()) {
            Some(spec) if spec.prefer.unwrap_or(default) == Prefer::Static => {}
            Some(spec) => spec.address.clone_from(&h.address),
            None => {
                merged.insert(
                    h.alias.to_string(),
                    InstanceSpec {
                        address: h.address.clone(),
                        labels: BTreeMap::new(),
                        weight: 1,
                        prefer: None,
                    },
                );
            }
        }
    }
    merged
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
        let store: Arc<dyn MembershipStore> =
            Arc::new(EmbeddedStore::new(config.membership.timeout));
        Ok(Arc::new(Gateway {
            static_specs: Mutex::new(config.instances.clone()),
            published: Mutex::new(config.instances.clone()),
            settings: ArcSwap::from_pointee(Settings::new(config)),
            tables,
            placement: ArcSwap::from_pointee(placement),
            config_path,
            changes,
            store,
            holders: Mutex::new(Vec::new()),
            ring: ReplacementRing::default(),
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

    /// The membership store.
    pub fn store(&self) -> &dyn MembershipStore {
        &*self.store
    }

    /// The re-placement ring.
    pub fn ring(&self) -> &ReplacementRing {
        &self.ring
    }

    /// The live holders as last read, when membership is enabled.
    fn holders(&self, config: &Config) -> Vec<Entry> {
        if !config.membership.enabled {
            return Vec::new();
        }
        self.holders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Publishes `statics` merged with the live holders, unless that is what is already
    /// published (and `force` is off). The caller holds the `published` lock.
    fn publish_locked(
        &self,
        published: &mut BTreeMap<String, InstanceSpec>,
        config: &Config,
        statics: &BTreeMap<String, InstanceSpec>,
        force: bool,
    ) -> Result<Option<Arc<AliasTable>>, TableError> {
        let merged = merge(statics, &self.holders(config), config.membership.prefer);
        if !force && *published == merged {
            return Ok(None);
        }
        let table = self.tables.publish(&merged)?;
        *published = merged;
        Ok(Some(table))
    }

    /// Reads the live holders from the store, re-merges them with the static table and
    /// swaps the table in if that changed anything: after a heartbeat is accepted, and
    /// periodically to notice heartbeats that expired. If the store cannot answer, the
    /// last holders stay.
    pub async fn sync_membership(&self) {
        match self.store.holders().await {
            Ok(h) => *self.holders.lock().unwrap_or_else(|p| p.into_inner()) = h,
            Err(error) => tracing::warn!(%error, "membership store: keeping the last holders"),
        }
        let settings = self.settings();
        let statics = self.lock_statics().clone();
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        match self.publish_locked(&mut published, &settings.config, &statics, false) {
            Ok(Some(t)) => self.swapped(SwapSource::Membership, &t),
            Ok(None) => {}
            Err(e) => self.refused(SwapSource::Membership, &format!("{}: {e}", e.field())),
        }
    }

    fn lock_statics(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, InstanceSpec>> {
        self.static_specs.lock().unwrap_or_else(|p| p.into_inner())
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
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        let table = self
            .publish_locked(&mut published, &config, &config.instances, true)?
            .expect("a forced publish always publishes");
        *self.lock_statics() = config.instances.clone();
        self.store.set_timeout(config.membership.timeout);
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
        let settings = self.settings();
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        let result = self
            .publish_locked(&mut published, &settings.config, specs, true)
            .map(|t| t.expect("a forced publish always publishes"));
        match result {
            Ok(t) => {
                *self.lock_statics() = specs.clone();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aliases::Alias;

    fn spec(address: &str, prefer: Option<Prefer>) -> InstanceSpec {
        InstanceSpec {
            address: address.into(),
            labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
            weight: 2,
            prefer,
        }
    }

    fn holder(alias: &str, address: &str) -> Entry {
        Entry {
            uuid: format!("u-{alias}"),
            alias: Alias::try_from(alias.to_string()).unwrap(),
            address: address.into(),
            timestamp_ms: 0,
            revision: 1,
        }
    }

    #[test]
    fn holders_win_unless_the_alias_prefers_its_static_address() {
        let statics = BTreeMap::from([
            ("cs_1".to_string(), spec("127.0.0.1:1", None)),
            (
                "cs_2".to_string(),
                spec("127.0.0.1:2", Some(Prefer::Static)),
            ),
            ("cs_3".to_string(), spec("127.0.0.1:3", None)),
        ]);
        let holders = [
            holder("cs_1", "127.0.0.1:11"),
            holder("cs_2", "127.0.0.1:12"),
            holder("cs_9", "127.0.0.1:19"),
        ];
        let m = merge(&statics, &holders, Prefer::Membership);
        assert_eq!(m["cs_1"].address, "127.0.0.1:11");
        assert_eq!(m["cs_1"].labels, statics["cs_1"].labels, "labels stay");
        assert_eq!(m["cs_2"].address, "127.0.0.1:2", "prefer = static");
        assert_eq!(m["cs_3"].address, "127.0.0.1:3", "no holder: static");
        assert_eq!(m["cs_9"].address, "127.0.0.1:19", "membership-only alias");
        // the global default can prefer static, and an alias can still prefer membership
        let mut statics = statics;
        statics.get_mut("cs_3").unwrap().prefer = Some(Prefer::Membership);
        let m = merge(
            &statics,
            &[
                holder("cs_1", "127.0.0.1:11"),
                holder("cs_3", "127.0.0.1:13"),
            ],
            Prefer::Static,
        );
        assert_eq!(
            (m["cs_1"].address.as_str(), m["cs_3"].address.as_str()),
            ("127.0.0.1:1", "127.0.0.1:13")
        );
    }
}
