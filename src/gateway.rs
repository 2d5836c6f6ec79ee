//! The gateway's shared state: the current config, the alias table holder, the placement
//! policy, the membership store, and the reload paths (config file, SIGHUP, admin API,
//! membership changes, the etcd watch) that replace them.
//!
//! The published alias table is the static table merged with the live holders of the
//! membership store: for an alias with a live holder, the holder's address wins unless
//! `prefer = "static"`. Where the static table comes from depends on the store:
//!
//! - **embedded**: the config's `[instances]`, or what `PUT /v1/aliases` set (until the
//!   next config reload);
//! - **etcd**: the table key in etcd, the one source of truth for every gateway. The
//!   config's `[instances]` only seed an etcd that has no table (a create-only txn);
//!   `PUT /v1/aliases` writes etcd, and every gateway applies it from its watch.
//!
//! Every replacement is validate-then-swap: a bad config or table is refused with the reason
//! and the old one keeps serving. No pingora here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::HeaderName;
use tokio::sync::watch;

use crate::aliases::{AliasTable, InstanceSpec, TableError, TableHolder};
use crate::config::{Config, ConfigError, FilesRead, StoreConfig, StoreKind};
use crate::merge::{changed_holdings, merge, patch, same_holding};
use crate::metrics::metrics;
use crate::model::{Prefer, Specs};
use crate::plugin::PluginSet;
use crate::ring::ReplacementRing;
use crate::store::embedded::EmbeddedStore;
use crate::store::etcd::{read_snapshot, EtcdSettings, EtcdStore, StoreSink};
use crate::store::state::StoreState;
use crate::store::{Entry, MembershipStore, StoreError};

/// How long `PUT /v1/aliases` on etcd waits for its own write to come back on the watch.
const PUT_APPLY_WAIT: Duration = Duration::from_secs(2);

/// A validated config plus what request handling derives from it once.
#[derive(Debug)]
pub struct Settings {
    /// The config as loaded.
    pub config: Config,
    /// `context_id.header`, parsed.
    pub context_header: HeaderName,
    /// `routing.tenant_header`, parsed.
    pub tenant_header: HeaderName,
    /// `membership.claimable`, compiled.
    pub claimable: globset::GlobSet,
}

impl Settings {
    /// Derives settings from a config that passed `validate()`; private so that only
    /// `Gateway::new` and `reload` (both validate first) can call it.
    fn new(config: Config) -> Self {
        let context_header = HeaderName::from_bytes(config.context_id.header.as_bytes())
            .expect("validated by Config::validate");
        let tenant_header = HeaderName::from_bytes(config.routing.tenant_header.as_bytes())
            .expect("validated by Config::validate");
        let claimable = config
            .membership
            .claimable_set()
            .expect("validated by Config::validate");
        Settings {
            config,
            context_header,
            tenant_header,
            claimable,
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
    /// The etcd watch: a table or holder change made through any gateway.
    Etcd,
    /// A host name in the table resolves to a new address.
    Dns,
}

impl SwapSource {
    /// Every source, for the swap counter's series to exist from the start.
    const ALL: [SwapSource; 6] = [
        SwapSource::ConfigFile,
        SwapSource::Sighup,
        SwapSource::Api,
        SwapSource::Membership,
        SwapSource::Etcd,
        SwapSource::Dns,
    ];

    fn label(self) -> &'static str {
        match self {
            SwapSource::ConfigFile => "config",
            SwapSource::Sighup => "sighup",
            SwapSource::Api => "api",
            SwapSource::Membership => "membership",
            SwapSource::Etcd => "etcd",
            SwapSource::Dns => "dns",
        }
    }
}

/// Where the static table in use came from, for `GET /v1/aliases`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableOrigin {
    /// The config file's `[instances]`.
    Config,
    /// `PUT /v1/aliases` on this gateway (embedded store).
    Api,
    /// etcd's table key, written at this revision.
    Etcd(i64),
    /// The snapshot file, as applied at this etcd revision (etcd not reached yet).
    Snapshot(i64),
}

impl TableOrigin {
    /// `"config"`, `"api"`, `"etcd"` or `"snapshot"`.
    pub fn label(self) -> &'static str {
        match self {
            TableOrigin::Config => "config",
            TableOrigin::Api => "api",
            TableOrigin::Etcd(_) => "etcd",
            TableOrigin::Snapshot(_) => "snapshot",
        }
    }

    /// The etcd revision, if the table came from etcd.
    pub fn revision(self) -> Option<i64> {
        match self {
            TableOrigin::Etcd(r) | TableOrigin::Snapshot(r) => Some(r),
            _ => None,
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
    /// The thread that loaded the config failed.
    #[error("loading the config failed: {0}")]
    Join(String),
}

/// Why `PUT /v1/aliases` was refused.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    /// The table is invalid.
    #[error("{field}: {source}", field = .0.field(), source = .0)]
    Table(#[from] TableError),
    /// The store (etcd) could not take the write.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The table as `PUT /v1/aliases` left it.
#[derive(Debug)]
pub struct PutOutcome {
    /// The table now published on this gateway.
    pub table: Arc<AliasTable>,
    /// The etcd revision of the write (etcd store only).
    pub revision: Option<i64>,
    /// Whether this gateway has applied the write yet (always, for the embedded store).
    pub applied: bool,
}

/// Shared state of one running gateway.
pub struct Gateway {
    settings: ArcSwap<Settings>,
    tables: TableHolder,
    placement: ArcSwap<PluginSet>,
    config_path: Option<PathBuf>,
    /// Bumped after every successful swap; the health checker watches it.
    changes: watch::Sender<u64>,
    /// The static table (see the module docs for where it comes from).
    static_specs: Mutex<Specs>,
    origin: Mutex<TableOrigin>,
    /// What was last published (static merged with holders). Its lock also serialises
    /// publishing.
    published: Mutex<Specs>,
    /// What `published` was merged from; locked only under `published`'s lock.
    merged_from: Mutex<Option<MergeInputs>>,
    /// The membership store, used only through its trait for heartbeats and listings.
    store: Arc<dyn MembershipStore>,
    /// The same store when it is etcd: its watch feeds the table, and it takes table writes.
    etcd: Option<Arc<EtcdStore>>,
    /// The live holders as last read from the store; the table is merged from these.
    holders: Mutex<Holders>,
    ring: ReplacementRing,
    /// Serialises reloads (file watch and SIGHUP may fire together), and holds the files
    /// as the last reload read them: the config and its `table.file`, each not parsed
    /// again while it holds the same bytes.
    reloading: tokio::sync::Mutex<Option<FilesRead>>,
}

/// What a published table was merged from: the static table (by identity: it is kept, so
/// its address cannot be reused), each holder's alias, address and epoch, and the default
/// preference. A heartbeat that renews a holding changes none of these, so it costs a
/// comparison over the holders, not a merge and a comparison over the whole table: at 100k
/// aliases that was about 50 ms of the admin thread per heartbeat.
struct MergeInputs {
    statics: Specs,
    holders: Holders,
    prefer: Prefer,
}

impl MergeInputs {
    fn new(statics: &Specs, holders: &Holders, prefer: Prefer) -> MergeInputs {
        MergeInputs {
            statics: Arc::clone(statics),
            holders: Arc::clone(holders),
            prefer,
        }
    }

    /// The same static table and default, the holders in the same holdings.
    fn same(&self, other: &MergeInputs) -> bool {
        self.same_base(other)
            && (Arc::ptr_eq(&self.holders, &other.holders)
                || (self.holders.len() == other.holders.len()
                    && self
                        .holders
                        .iter()
                        .zip(other.holders.iter())
                        .all(|(a, b)| same_holding(a, b))))
    }

    /// The same static table and default: a merge of `other` differs from one of `self`
    /// only where their holders do.
    fn same_base(&self, other: &MergeInputs) -> bool {
        Arc::ptr_eq(&self.statics, &other.statics) && self.prefer == other.prefer
    }
}

/// The live holders, as last read, shared by the gateway and what a table was merged from.
type Holders = Arc<[Entry]>;

/// Resolves the host names in `specs` that were never resolved, on a blocking thread.
async fn resolve_names(specs: &BTreeMap<String, InstanceSpec>) {
    let names: Vec<String> = crate::dns::unresolved(specs.values().map(|s| s.address.as_str()))
        .into_iter()
        .map(str::to_string)
        .collect();
    if !names.is_empty() {
        let _ = tokio::task::spawn_blocking(move || {
            crate::dns::resolve(names.iter().map(String::as_str))
        })
        .await;
    }
}

/// Whether `specs` builds a table on its own (without holders merged in).
fn validate_table(specs: &BTreeMap<String, InstanceSpec>) -> Result<(), TableError> {
    AliasTable::validate(specs)
}

fn etcd_settings(store: &StoreConfig) -> EtcdSettings {
    EtcdSettings {
        endpoints: store.endpoints.clone(),
        prefix: store.prefix.clone(),
        auth: store.username.clone().zip(store.password.clone()),
        request_timeout: store.request_timeout,
        snapshot: store.snapshot.clone(),
    }
}

/// The state an etcd gateway starts from: its snapshot if it has a readable one.
fn initial_state(store: &StoreConfig) -> StoreState {
    let Some(path) = &store.snapshot else {
        return StoreState::default();
    };
    match read_snapshot(path) {
        Ok(Some((state, written))) => {
            tracing::info!(
                path = %path.display(),
                revision = state.revision,
                written_unix_ms = written,
                holders = state.holders.len(),
                table = state.table.is_some(),
                "starting from the store snapshot; etcd replaces it once reachable"
            );
            state
        }
        Ok(None) => StoreState::default(),
        Err(error) => {
            tracing::warn!(%error, "ignoring the store snapshot");
            StoreState::default()
        }
    }
}

/// How long the phases of a reload took, for its log event.
#[derive(Debug, Default)]
struct ReloadPhases {
    read_ms: u64,
    plugins_ms: u64,
    /// The reload left the alias table as it was (not built again).
    table_kept: bool,
    /// The config file held the bytes last read, so it was not parsed again.
    config_unchanged: bool,
    /// `table.file` held the bytes last read, so it was not parsed again; `None` without one.
    table_file_unchanged: Option<bool>,
}

impl ReloadPhases {
    /// The `table` field of `config reloaded`.
    fn table(&self) -> &'static str {
        if self.table_kept {
            "kept"
        } else {
            "rebuilt"
        }
    }

    /// The `config_file` field of `config reloaded`.
    fn config_file(&self) -> &'static str {
        if self.config_unchanged {
            "unchanged"
        } else {
            "read"
        }
    }

    /// The `table_file` field of `config reloaded`.
    fn table_file(&self) -> &'static str {
        match self.table_file_unchanged {
            None => "none",
            Some(true) => "unchanged",
            Some(false) => "read",
        }
    }
}

impl Gateway {
    /// Validates `config` and builds the gateway state from it. Everything downstream
    /// (`Settings`, the listen addresses) relies on this validation.
    pub fn new(config: Config, config_path: Option<PathBuf>) -> Result<Arc<Self>, ConfigError> {
        config.validate()?;
        let placement = PluginSet::load(&config.plugins, None)?;
        let timeout = config.membership.timeout;
        let (store, etcd, mut statics, holders, mut origin): (
            Arc<dyn MembershipStore>,
            _,
            _,
            _,
            _,
        ) = match config.store.kind {
            StoreKind::Embedded => (
                Arc::new(EmbeddedStore::new(timeout)),
                None,
                config.instances.clone(),
                Holders::from([]),
                TableOrigin::Config,
            ),
            StoreKind::Etcd => {
                let initial = initial_state(&config.store);
                let holders: Holders = initial.holders.values().cloned().collect();
                let (statics, origin) = match &initial.table {
                    Some(t) => (t.instances.clone(), TableOrigin::Snapshot(initial.revision)),
                    None => (config.instances.clone(), TableOrigin::Config),
                };
                let etcd = Arc::new(EtcdStore::new(
                    etcd_settings(&config.store),
                    timeout,
                    initial,
                ));
                (etcd.clone(), Some(etcd), statics, holders, origin)
            }
        };
        let live = if config.membership.enabled {
            &holders[..]
        } else {
            &[]
        };
        let mut merged = merge(&statics, live, config.membership.prefer);
        let built = validate_table(&statics).and_then(|()| TableHolder::new(&merged));
        let tables = match built {
            Ok(t) => t,
            Err(error) if origin != TableOrigin::Config => {
                tracing::warn!(%error, field = %error.field(), "the snapshot's table does not build; starting from the config's [instances]");
                statics = config.instances.clone();
                origin = TableOrigin::Config;
                merged = statics.clone();
                TableHolder::new(&merged)?
            }
            Err(e) => return Err(e.into()),
        };
        let first = tables.load();
        metrics().observe_table(first.version(), first.len());
        metrics().config_applied(true);
        // every series of the swap counter exists from the start, at 0, for rate()
        for source in SwapSource::ALL {
            for result in ["ok", "error"] {
                metrics()
                    .table_swaps
                    .with_label_values(&[source.label(), result]);
            }
        }
        let (changes, _) = watch::channel(1);
        Ok(Arc::new(Gateway {
            static_specs: Mutex::new(statics),
            origin: Mutex::new(origin),
            published: Mutex::new(merged),
            merged_from: Mutex::new(None),
            settings: ArcSwap::from_pointee(Settings::new(config)),
            tables,
            placement: ArcSwap::from_pointee(placement),
            config_path,
            changes,
            store,
            etcd,
            holders: Mutex::new(holders),
            ring: ReplacementRing::default(),
            reloading: tokio::sync::Mutex::new(None),
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

    /// The etcd store, when the gateway runs on one.
    pub fn etcd(&self) -> Option<&Arc<EtcdStore>> {
        self.etcd.as_ref()
    }

    /// Where the static table came from.
    pub fn table_origin(&self) -> TableOrigin {
        *self.origin.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Ok` while the gateway's store is in sync (always for the embedded store); else why not.
    pub fn ready(&self) -> Result<(), String> {
        match &self.etcd {
            None => Ok(()),
            Some(e) if e.in_sync() => Ok(()),
            Some(e) => Err(format!(
                "the etcd store is not in sync (last heard {:.1}s ago); serving the last applied state at revision {}",
                e.last_heard_age().as_secs_f64().min(1e9),
                e.applied().revision
            )),
        }
    }

    /// The re-placement ring.
    pub fn ring(&self) -> &ReplacementRing {
        &self.ring
    }

    /// The live holders as last read, when membership is enabled.
    fn holders(&self, config: &Config) -> Holders {
        if !config.membership.enabled {
            return Holders::from([]);
        }
        Arc::clone(&self.holders.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Publishes `statics` merged with the live holders, unless that is what is already
    /// published (and `force` is off). The caller holds the `published` lock.
    fn publish_locked(
        &self,
        published: &mut Specs,
        config: &Config,
        statics: &Specs,
        force: bool,
    ) -> Result<Option<Arc<AliasTable>>, TableError> {
        let holders = self.holders(config);
        let prefer = config.membership.prefer;
        let inputs = MergeInputs::new(statics, &holders, prefer);
        let mut merged_from = self.merged_from.lock().unwrap_or_else(|p| p.into_inner());
        if !force && merged_from.as_ref().is_some_and(|m| m.same(&inputs)) {
            return Ok(None);
        }
        // Over the same static table, a claim or a takeover changes a few holdings: the
        // published table is patched where they changed, in place, not merged again whole.
        let changed = merged_from
            .as_ref()
            .filter(|m| !force && m.same_base(&inputs))
            .and_then(|m| changed_holdings(&m.holders, &holders));
        if let Some(changed) = changed {
            let undo = patch(published, statics, &holders, &changed, prefer);
            if undo.is_empty() {
                *merged_from = Some(inputs);
                return Ok(None);
            }
            return match self.tables.publish(published) {
                Ok(table) => {
                    *merged_from = Some(inputs);
                    Ok(Some(table))
                }
                Err(e) => {
                    // the table in use stays, and what was published with it
                    undo.revert(published);
                    Err(e)
                }
            };
        }
        let merged = merge(statics, &holders, prefer);
        if !force && (Arc::ptr_eq(published, &merged) || *published == merged) {
            *merged_from = Some(inputs);
            return Ok(None);
        }
        let table = self.tables.publish(&merged)?;
        *published = merged;
        *merged_from = Some(inputs);
        Ok(Some(table))
    }

    /// Reads the live holders from the embedded store, re-merges them with the static
    /// table and swaps the table in if that changed anything: after a heartbeat is
    /// accepted, and periodically to notice heartbeats that expired. On etcd this does
    /// nothing: holders arrive through the watch.
    pub async fn sync_membership(&self) {
        if self.etcd.is_some() {
            return;
        }
        match self.store.holders().await {
            Ok(h) => *self.holders.lock().unwrap_or_else(|p| p.into_inner()) = h.into(),
            Err(error) => tracing::warn!(%error, "membership store: keeping the last holders"),
        }
        self.republish(SwapSource::Membership, false);
    }

    /// Merges the static table with the holders again and swaps the result in, counted
    /// under `source`: only if it changed, unless `force` (the specs are equal but an
    /// address behind a host name moved).
    fn republish(&self, source: SwapSource, force: bool) {
        let settings = self.settings();
        let statics = self.lock_statics().clone();
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        match self.publish_locked(&mut published, &settings.config, &statics, force) {
            Ok(Some(t)) => self.swapped(source, &t),
            Ok(None) => {}
            Err(e) => self.refused(source, &format!("{}: {e}", e.field())),
        }
    }

    /// Applies a state from the etcd watch as one swap: its holders, and its table if the
    /// table builds (else the last good table stays, with the new holders).
    fn apply_store_state(&self, state: &StoreState) {
        *self.holders.lock().unwrap_or_else(|p| p.into_inner()) =
            state.holders.values().cloned().collect();
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        // read under the lock: a reload swaps its settings in while it holds it
        let settings = self.settings();
        if let Some(t) = &state.table {
            let names = crate::dns::unresolved(t.instances.values().map(|s| s.address.as_str()));
            if !names.is_empty() {
                // A table written by another gateway names a host this one never resolved.
                // The store calls its sink on a blocking thread, so this may block.
                crate::dns::resolve(names.iter().copied());
            }
            // Validate the table on its own only when it changed (a holder change reuses
            // the table already validated); building 100k aliases is not free.
            let unchanged = *self.lock_statics() == t.instances;
            let checked = (if unchanged {
                Ok(())
            } else {
                validate_table(&t.instances)
            })
            .and_then(|()| {
                self.publish_locked(&mut published, &settings.config, &t.instances, false)
            });
            match checked {
                Ok(swapped) => {
                    *self.lock_statics() = t.instances.clone();
                    *self.origin.lock().unwrap_or_else(|p| p.into_inner()) =
                        TableOrigin::Etcd(t.revision);
                    if let Some(table) = swapped {
                        self.swapped(SwapSource::Etcd, &table);
                    }
                    return;
                }
                Err(e) => self.refused(
                    SwapSource::Etcd,
                    &format!(
                        "{}: {e} (the etcd table at revision {})",
                        e.field(),
                        t.revision
                    ),
                ),
            }
        }
        let statics = self.lock_statics().clone();
        match self.publish_locked(&mut published, &settings.config, &statics, false) {
            Ok(Some(t)) => self.swapped(SwapSource::Etcd, &t),
            Ok(None) => {}
            Err(e) => self.refused(SwapSource::Etcd, &format!("{}: {e}", e.field())),
        }
    }

    /// The host names among the addresses of the table in use (static and merged).
    pub fn host_names(&self) -> Vec<String> {
        let published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        let statics = self.lock_statics();
        let mut names: Vec<String> = statics
            .values()
            .chain(published.values())
            .map(|s| s.address.clone())
            .filter(|a| crate::dns::is_host_name(a))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Builds the table again from the same specs: a host name in it resolves to a new
    /// address. The swap counts with source `dns`.
    pub fn rebuild_for_dns(&self) {
        self.republish(SwapSource::Dns, true);
    }

    fn lock_statics(&self) -> std::sync::MutexGuard<'_, Specs> {
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
        count_swap(source, "ok");
        metrics().observe_table(table.version(), table.len());
        // an alias that left takes its series with it
        metrics().forget_aliases(|alias| table.resolve(alias).is_some());
        self.changes.send_modify(|v| *v += 1);
        tracing::info!(
            source = source.label(),
            version = table.version(),
            aliases = table.len(),
            "alias table swapped"
        );
    }

    fn refused(&self, source: SwapSource, error: &dyn std::fmt::Display) {
        count_failed_swap(source);
        tracing::error!(source = source.label(), %error, "refused; the old config keeps serving");
    }

    /// Keeps the files as the start read them (`Config::load_reusing`), so that the first
    /// reload need not parse them again if they did not change. Before any reload.
    pub fn started_with(&self, read: FilesRead) {
        if let Ok(mut kept) = self.reloading.try_lock() {
            *kept = Some(read);
        }
    }

    /// Re-reads the config file, validates it (plugins compile off this runtime, in
    /// parallel) and swaps config and table in.
    pub async fn reload(
        self: &Arc<Self>,
        source: SwapSource,
    ) -> Result<Arc<AliasTable>, ReloadError> {
        let mut last_read = self.reloading.lock().await;
        let started = Instant::now();
        let mut phases = ReloadPhases::default();
        let result = self.try_reload(&mut phases, &mut last_read).await;
        if !matches!(result, Err(ReloadError::NoFile)) {
            metrics().config_applied(result.is_ok());
            metrics()
                .config_reload_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        match &result {
            Ok(_) if phases.table_kept => {
                // counted as a swap of the config, though the table is the one in use
                count_swap(source, "ok");
                self.changes.send_modify(|v| *v += 1);
            }
            Ok(t) => self.swapped(source, t),
            Err(e) => self.refused(source, e),
        }
        if result.is_ok() {
            // read_ms: read, parse, validate, resolve; plugins_ms: load plugins;
            // swap_ms: build the table and swap everything in.
            let took_ms = started.elapsed().as_millis() as u64;
            tracing::info!(
                source = source.label(),
                took_ms,
                read_ms = phases.read_ms,
                plugins_ms = phases.plugins_ms,
                swap_ms = took_ms.saturating_sub(phases.read_ms + phases.plugins_ms),
                table = phases.table(),
                config_file = phases.config_file(),
                table_file = phases.table_file(),
                "config reloaded"
            );
        }
        result
    }

    async fn try_reload(
        self: &Arc<Self>,
        phases: &mut ReloadPhases,
        last_read: &mut Option<FilesRead>,
    ) -> Result<Arc<AliasTable>, ReloadError> {
        let path = self.config_path.clone().ok_or(ReloadError::NoFile)?;
        // reading, validating and resolving host names happen off the runtime
        let started = Instant::now();
        // on a thread of its own at a lower priority
        let current = Arc::clone(&self.settings().config.instances);
        let previous = last_read.clone();
        let (config, read) = crate::background::run("hagate-reload", move || {
            Config::load_reusing(&path, previous.as_ref()).map(|(mut config, mut read)| {
                // An unchanged table keeps the map in use; a new copy is freed here, not
                // kept beside it, in the config or in what the next reload takes back.
                // (Taken back from an unchanged file, it is the map in use already, and
                // `==` sees the same `Arc` at once.)
                if config.instances == current {
                    read.share_instances(&current);
                    config.instances = current;
                }
                (config, read)
            })
        })
        .await
        .map_err(|e| ReloadError::Join(e.to_string()))??;
        phases.read_ms = started.elapsed().as_millis() as u64;
        let last = last_read.as_ref();
        phases.config_unchanged = last.is_some_and(|p| p.config.same_bytes(&read.config));
        phases.table_file_unchanged = read.table.as_ref().map(|r| {
            last.and_then(|p| p.table.as_ref())
                .is_some_and(|p| p.same_bytes(r))
        });
        let old = self.settings();
        for (field, changed) in [
            (
                "server.listen",
                old.config.server.listen != config.server.listen,
            ),
            (
                "admin.listen",
                old.config.admin.listen != config.admin.listen,
            ),
            ("store", old.config.store != config.store),
            ("log.format", old.config.log.format != config.log.format),
            ("server.tls", old.config.server.tls != config.server.tls),
        ] {
            if changed {
                tracing::warn!(
                    field,
                    "changed in the config file; restart hagate (or `hagate run --upgrade`) to apply it"
                );
            }
        }
        // Plugins first: a plugin that fails to load refuses the whole reload. Compiling
        // happens on blocking threads, never on the control plane's runtime.
        let previous = self.placement.load_full();
        let specs = config.plugins.clone();
        let started = Instant::now();
        let placement =
            tokio::task::spawn_blocking(move || PluginSet::load(&specs, Some(&previous)))
                .await
                .map_err(|e| ConfigError::Invalid {
                    field: "plugins".into(),
                    message: format!("loading the plugins failed: {e}"),
                })??;
        phases.plugins_ms = started.elapsed().as_millis() as u64;
        // Building a table takes tens of milliseconds at 100k aliases: on a blocking
        // thread, so that the control plane's other tasks (health checks, the etcd watch)
        // are not held up (`hagate_control_plane_lag_seconds`).
        let this = Arc::clone(self);
        let built =
            tokio::task::spawn_blocking(move || this.swap_reloaded(&old, config, placement))
                .await
                .map_err(|e| ReloadError::Join(e.to_string()))??;
        phases.table_kept = built.is_none();
        let table = built.unwrap_or_else(|| self.table());
        *last_read = Some(read);
        Ok(table)
    }

    /// Swaps a reloaded `config` and its plugins in, with its table, built and published
    /// unless it merges as before (the same static table, the same holders: a build
    /// depends on nothing else), in which case `None`. All under the `published` lock, so a
    /// publish that takes it next sees the new settings. Blocking.
    fn swap_reloaded(
        &self,
        old: &Settings,
        config: Config,
        placement: PluginSet,
    ) -> Result<Option<Arc<AliasTable>>, ReloadError> {
        let statics = if self.etcd.is_some() {
            if old.config.instances != config.instances {
                tracing::warn!(
                    "[instances] changed in the config file, but on etcd they only seed an empty table; \
                     change the table with PUT /v1/aliases"
                );
            }
            self.lock_statics().clone()
        } else {
            config.instances.clone()
        };
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        let built = self.publish_locked(&mut published, &config, &statics, false)?;
        if self.etcd.is_none() {
            *self.lock_statics() = statics;
            *self.origin.lock().unwrap_or_else(|p| p.into_inner()) = TableOrigin::Config;
        }
        self.store.set_timeout(config.membership.timeout);
        crate::retire::later(self.placement.swap(Arc::new(placement)));
        crate::retire::later(self.settings.swap(Arc::new(Settings::new(config))));
        drop(published);
        Ok(built)
    }

    /// Replaces the static alias table (`PUT /v1/aliases`). On the embedded store it is
    /// published here and lasts until the next config reload; on etcd it is written to
    /// etcd, and every gateway (this one too) applies it from its watch.
    pub async fn put_aliases(&self, specs: &Specs) -> Result<PutOutcome, PutError> {
        let result = self.try_put_aliases(specs).await;
        match &result {
            Err(PutError::Store(e @ StoreError::Unconfirmed(_))) => {
                count_failed_swap(SwapSource::Api);
                tracing::warn!(source = SwapSource::Api.label(), error = %e, "alias table write not confirmed; the watch applies it if etcd took it");
            }
            Err(e) => self.refused(SwapSource::Api, e),
            Ok(_) => {}
        }
        result
    }

    async fn try_put_aliases(&self, specs: &Specs) -> Result<PutOutcome, PutError> {
        if specs.is_empty() {
            return Err(TableError::Empty.into());
        }
        resolve_names(specs).await;
        let settings = self.settings();
        let merged = merge(
            specs,
            &self.holders(&settings.config),
            settings.config.membership.prefer,
        );
        // The table on its own: a live holder must not hide a bad static address. When no
        // holder changes it, the merged table is this one, and building it validates it.
        if !Arc::ptr_eq(&merged, specs) {
            validate_table(specs)?;
        }
        if let Some(etcd) = &self.etcd {
            // Validate exactly as publishing would, before anything reaches etcd.
            AliasTable::validate(&merged)?;
            let revision = etcd.put_table(specs).await?;
            let applied = etcd.wait_applied(revision, PUT_APPLY_WAIT).await;
            if !applied {
                tracing::warn!(
                    revision,
                    "the alias table was written to etcd but this gateway has not applied it yet"
                );
            }
            return Ok(PutOutcome {
                table: self.table(),
                revision: Some(revision),
                applied,
            });
        }
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        let table = self
            .publish_locked(&mut published, &settings.config, specs, true)?
            .expect("a forced publish always publishes");
        *self.lock_statics() = specs.clone();
        *self.origin.lock().unwrap_or_else(|p| p.into_inner()) = TableOrigin::Api;
        self.swapped(SwapSource::Api, &table);
        Ok(PutOutcome {
            table,
            revision: None,
            applied: true,
        })
    }
}

impl StoreSink for Gateway {
    fn apply(&self, state: &StoreState) {
        self.apply_store_state(state);
    }

    fn seed(&self) -> Specs {
        self.settings().config.instances.clone()
    }
}

/// Counts a swap from `source` that did not happen (refused, or not confirmed).
fn count_failed_swap(source: SwapSource) {
    count_swap(source, "error");
}

/// One more `hagate_alias_table_swaps_total{source, result}`.
fn count_swap(source: SwapSource, result: &str) {
    metrics()
        .table_swaps
        .with_label_values(&[source.label(), result])
        .inc();
}

impl crate::health::active::CheckTargets for Gateway {
    fn active_config(&self) -> crate::model::ActiveHealthConfig {
        self.settings().config.health.active.clone()
    }

    fn targets(&self) -> Vec<crate::health::active::CheckTarget> {
        self.table()
            .instances()
            .iter()
            .map(|i| crate::health::active::CheckTarget {
                addr: i.address,
                alias: i.alias.to_string(),
                state: Arc::clone(&i.state),
                tls: i.tls.then(|| i.sni.clone()),
            })
            .collect()
    }

    fn ca_file(&self) -> Option<std::path::PathBuf> {
        self.settings().config.upstream.ca_file.clone()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        Gateway::subscribe(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::merge::tests::spec;

    fn holder(alias: &str, address: &str) -> Entry {
        crate::merge::tests::holder(alias, address, 1)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_reload_with_the_same_instances_keeps_the_map_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hagate.toml");
        let write = |comment: &str, port: u16| {
            std::fs::write(
                &path,
                format!(
                    "# {comment}\n[instances.cs_1]\naddress = \"127.0.0.1:{port}\"\nlabels = {{ zone = \"a\" }}\n"
                ),
            )
            .unwrap()
        };
        write("first", 9001);
        let gw = Gateway::new(Config::load(&path).unwrap(), Some(path.clone())).unwrap();
        let before = Arc::clone(&gw.settings().config.instances);
        assert!(
            Arc::ptr_eq(&before, &gw.lock_statics()),
            "statics share the config's map"
        );
        write("only a comment changed", 9001);
        let version = gw.reload(SwapSource::Sighup).await.unwrap().version();
        assert_eq!(
            version, 1,
            "a table that merges as before is kept, not rebuilt"
        );
        let after = Arc::clone(&gw.settings().config.instances);
        assert!(
            Arc::ptr_eq(&before, &after),
            "unchanged [instances]: the same map"
        );
        assert!(Arc::ptr_eq(&after, &gw.published.lock().unwrap()));
        // what the next reload takes back holds that map too, not the copy just parsed
        let kept = gw
            .reloading
            .lock()
            .await
            .clone()
            .expect("the reload kept what it read");
        assert!(Arc::ptr_eq(&kept.config.parsed.instances, &after));
        // the same with a table.file written anew with the same table (other bytes)
        let table = dir.path().join("aliases.json");
        let aliases =
            r#"{"instances": {"cs_1": {"address": "127.0.0.1:9001", "labels": {"zone": "a"}}}}"#;
        std::fs::write(&table, aliases).unwrap();
        std::fs::write(&path, "[table]\nfile = \"aliases.json\"\n").unwrap();
        gw.reload(SwapSource::Sighup).await.unwrap();
        std::fs::write(&table, format!("{aliases}\n")).unwrap();
        gw.reload(SwapSource::Sighup).await.unwrap();
        let kept = gw.reloading.lock().await.clone().unwrap();
        assert!(Arc::ptr_eq(&kept.table.unwrap().parsed, &after));
        assert!(Arc::ptr_eq(&gw.settings().config.instances, &after));
        assert_eq!(gw.table().version(), 1);
        write("a new address", 9002);
        gw.reload(SwapSource::Sighup).await.unwrap();
        let changed = Arc::clone(&gw.settings().config.instances);
        assert!(!Arc::ptr_eq(&before, &changed));
        assert_eq!(changed["cs_1"].address, "127.0.0.1:9002");
        assert_eq!(gw.table().get(0).address.port(), 9002);
        assert_eq!(gw.table().version(), 2);
    }

    #[tokio::test]
    async fn a_holder_that_breaks_the_table_is_undone_and_a_later_change_patches_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hagate.toml");
        std::fs::write(
            &path,
            "[membership]\nenabled = true\ntoken = \"t\"\n[instances.cs_1]\naddress = \"127.0.0.1:9001\"\n",
        )
        .unwrap();
        let gw = Gateway::new(Config::load(&path).unwrap(), None).unwrap();
        let hold = |holders: Vec<Entry>| {
            *gw.holders.lock().unwrap() = holders.into();
            gw.republish(SwapSource::Membership, false);
        };
        hold(vec![holder("cs_1", "127.0.0.1:9011")]);
        assert_eq!(gw.table().version(), 2);
        let good = gw.published.lock().unwrap().clone();
        // a new holder at an address no table takes: refused, and undone
        hold(vec![
            holder("cs_1", "127.0.0.1:9011"),
            holder("cs_2", "0.0.0.0:9"),
        ]);
        assert_eq!(gw.table().version(), 2, "the table in use stays");
        assert_eq!(
            *gw.published.lock().unwrap(),
            good,
            "and what was published"
        );
        let map = Arc::as_ptr(&gw.published.lock().unwrap());
        // cs_1 moves, cs_2 is gone: patched into the same map, not merged into a new one
        hold(vec![holder("cs_1", "127.0.0.1:9012")]);
        let table = gw.table();
        assert_eq!(table.version(), 3);
        assert_eq!((table.len(), table.get(0).address.port()), (1, 9012));
        assert_eq!(Arc::as_ptr(&gw.published.lock().unwrap()), map);
    }

    #[test]
    fn a_renewal_is_no_new_merge_input_but_a_moved_holder_or_a_new_table_is() {
        let statics = Arc::new(BTreeMap::from([(
            "cs_1".to_string(),
            spec("127.0.0.1:1", None),
        )]));
        let inputs = |statics: &Specs, holders: &[Entry], prefer| {
            MergeInputs::new(statics, &Holders::from(holders), prefer)
        };
        let held = [holder("cs_1", "127.0.0.1:11")];
        let last = inputs(&statics, &held, Prefer::Membership);
        let mut renewed = holder("cs_1", "127.0.0.1:11");
        renewed.timestamp_ms = 700;
        renewed.revision = 9;
        assert!(last.same(&inputs(&statics, &[renewed], Prefer::Membership)));
        let moved = holder("cs_1", "127.0.0.1:12");
        assert!(!last.same(&inputs(&statics, &[moved], Prefer::Membership)));
        let mut reclaimed = holder("cs_1", "127.0.0.1:11");
        reclaimed.epoch = 2;
        assert!(!last.same(&inputs(&statics, &[reclaimed], Prefer::Membership)));
        assert!(!last.same(&inputs(&statics, &[], Prefer::Membership)));
        assert!(!last.same(&inputs(&statics, &held, Prefer::Static)));
        // a new table is a new input even when equal: identity is what is compared
        let copy = Arc::new((*statics).clone());
        assert!(!last.same(&inputs(&copy, &held, Prefer::Membership)));
    }
}
