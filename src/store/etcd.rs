//! The membership store on etcd v3, and the one watch through which a gateway follows its
//! prefix. This is the IO edge: it reads, watches and writes, and converts etcd's types;
//! what a read or an event *means* is decided by the pure functions of `state`.
//!
//! - **Claims and renewals** follow the table in the `store` module docs. A claim is one
//!   txn, `If(create_revision == 0) Then Put(key, lease)`, so expiry is decided by the etcd
//!   leader's lease clock, and the key's `create_revision` is the holder's epoch. A renewal
//!   confirms the holding through a txn (`create_revision == last_seen`, and the value is
//!   the sender's) and then keeps the lease alive: no Put per beat, so no revision is
//!   burned and no watcher is woken.
//! - **The watch** (`run`): read the whole prefix, then watch from `revision + 1`. Events
//!   apply in revision order, duplicates are skipped, a compacted or backwards revision
//!   forces a full read, a lost stream is watched again from the applied revision (never
//!   from a later one), with jittered backoff. `require_leader` makes a member cut off from
//!   quorum cancel the watch instead of hanging, and a progress request every second tells
//!   a silent stream from a dead one.
//! - **etcd down**: the last applied state keeps serving (membership is frozen, nothing
//!   expires locally), writes answer `Unavailable`, and the state is on disk (`snapshot`)
//!   for a start while etcd is unreachable.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, OnceCell};

use super::state::{
    judge, Applied, Event, HolderValue, Kv, StoreState, TableValue, WatchVerdict, ALIAS_DIR,
    LAST_DIR, TABLE,
};
use super::{Entry, Heartbeat, HeartbeatOutcome, Listed, MembershipStore, Primary, StoreError};
use crate::health::now_ms;
use crate::metrics::metrics;
use crate::model::Specs;

/// How often the watch asks etcd for a progress notification.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// A watch that has heard nothing for this long is taken as dead.
const SILENT_LIMIT: Duration = Duration::from_secs(3);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Keys per page of a full read.
const PAGE: i64 = 2000;
/// The largest watch response accepted. etcd sends all the events of one revision in one
/// response (a lease that expires with many keys is one revision), and splitting them
/// (`fragment`) would put one revision in several responses, which the dedupe rule would
/// then cut. So the limit is raised well above tonic's 4 MiB default instead.
const MAX_WATCH_MESSAGE: usize = 256 << 20;
/// Snapshot writes are at most this frequent.
const SNAPSHOT_DEBOUNCE: Duration = Duration::from_millis(200);

/// What `[store]` says about etcd, as the store needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// Client URLs.
    pub endpoints: Vec<String>,
    /// The key prefix, e.g. `/hagate/prod`.
    pub prefix: String,
    /// `(username, password)`.
    pub auth: Option<(String, String)>,
    /// The most one read or write may take.
    pub request_timeout: Duration,
    /// Where the applied state is written.
    pub snapshot: Option<PathBuf>,
}

/// Where the applied state goes: the gateway, which merges and publishes it.
pub trait StoreSink: Send + Sync {
    /// A new applied state, to publish as one swap. Called on a blocking thread, one state
    /// at a time, in order: it may block (host name lookups) and take long (a big table).
    fn apply(&self, state: &StoreState);
    /// The table to seed an etcd that has none with (the config's `[instances]`).
    fn seed(&self) -> Specs;
}

/// Runs `job` on a blocking thread and waits for it: parsing a table, and merging and
/// building a table of 100k aliases take tens of milliseconds, which the control plane's one
/// runtime thread (health checks, reloads, this watch's own timers) must not wait on
/// (`hagate_control_plane_lag_seconds`). The watch waits, so states still apply in order.
async fn off_runtime(job: impl FnOnce() + Send + 'static) {
    if let Err(error) = tokio::task::spawn_blocking(job).await {
        tracing::error!(%error, "etcd: applying a state failed; the last applied one serves");
    }
}

/// The etcd store; see the module docs.
pub struct EtcdStore {
    settings: EtcdSettings,
    client: OnceCell<Client>,
    /// T in milliseconds: the TTL of new leases, rounded up to whole seconds.
    timeout_ms: AtomicU64,
    applied: ArcSwap<StoreState>,
    /// Whether a full read was applied and the watch after it is running.
    in_sync: AtomicBool,
    /// When etcd last answered the watch (`now_ms()`), 0 before the first answer.
    last_heard_ms: AtomicU64,
    revision: AtomicI64,
    /// Bumped after every applied change, so writers can wait for their own change.
    changes: watch::Sender<i64>,
    snapshots: watch::Sender<Option<Arc<StoreState>>>,
}

/// Whether etcd refused a request for its size: its own limit (`--max-request-bytes`:
/// "etcdserver: request is too large") or its gRPC server's, which is that plus 512 KiB
/// ("grpc: received message larger than max").
fn too_large(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    text.contains("request is too large") || text.contains("larger than max")
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("etcd {what}: {e}"))
}

/// The end of the key range of every key that starts with `prefix` (etcd's convention).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn to_kv(kv: &etcd_client::KeyValue) -> Kv {
    Kv {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

/// The first key-value of a txn's Get result at `index`.
fn txn_get(ops: &[TxnOpResponse], index: usize) -> Option<Kv> {
    match ops.get(index) {
        Some(TxnOpResponse::Get(g)) => g.kvs().first().map(to_kv),
        _ => None,
    }
}

/// Jittered exponential backoff.
struct Backoff(Duration);

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        // 50-100% of the base, so gateways that lost etcd together do not return together.
        base.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
    fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
}

/// How a watch ended.
enum WatchEnd {
    /// Read everything again, for this reason (a `hagate_store_resyncs_total` label).
    Resync(&'static str),
    /// The stream was lost; watch again from the applied revision after a backoff.
    Lost(String),
}

impl EtcdStore {
    /// A store that has applied `initial` (from a snapshot, or empty). Nothing connects
    /// until `run` or the first request.
    pub fn new(settings: EtcdSettings, timeout: Duration, initial: StoreState) -> Self {
        let revision = initial.revision;
        EtcdStore {
            settings,
            client: OnceCell::new(),
            timeout_ms: AtomicU64::new(timeout.as_millis() as u64),
            applied: ArcSwap::from_pointee(initial),
            in_sync: AtomicBool::new(false),
            last_heard_ms: AtomicU64::new(0),
            revision: AtomicI64::new(revision),
            changes: watch::channel(revision).0,
            snapshots: watch::channel(None).0,
        }
    }

    fn key(&self, dir: &str, alias: &str) -> String {
        format!("{}{dir}{alias}", self.settings.prefix)
    }

    fn table_key(&self) -> String {
        format!("{}{TABLE}", self.settings.prefix)
    }

    /// The connected client (connecting on first use).
    async fn client(&self) -> Result<Client, StoreError> {
        let s = &self.settings;
        let connect = async {
            let mut opts = ConnectOptions::new()
                .with_require_leader(true)
                .with_connect_timeout(s.request_timeout)
                .with_keep_alive(Duration::from_secs(1), s.request_timeout)
                .with_keep_alive_while_idle(true);
            if let Some((user, password)) = &s.auth {
                opts = opts
                    .with_user(user.clone(), password.clone())
                    .with_auto_token_refresh(true);
            }
            tokio::time::timeout(s.request_timeout, Client::connect(&s.endpoints, Some(opts)))
                .await
                .map_err(|_| unavailable("connect", "timed out"))?
                .map_err(|e| unavailable("connect", e))
        };
        self.client.get_or_try_init(|| connect).await.cloned()
    }

    /// Runs `f` with a timeout of `request_timeout`.
    async fn timed<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.settings.request_timeout, f)
            .await
            .map_err(|_| unavailable(what, "timed out"))?
            .map_err(|e| unavailable(what, e))
    }

    fn ttl_secs(&self) -> i64 {
        let ms = self.timeout_ms.load(Ordering::Relaxed);
        (ms.div_ceil(1000)).max(2) as i64
    }

    /// The state applied so far.
    pub fn applied(&self) -> Arc<StoreState> {
        self.applied.load_full()
    }

    /// Whether the watch is running on a fully read state and etcd answered recently.
    pub fn in_sync(&self) -> bool {
        self.in_sync.load(Ordering::Relaxed) && self.last_heard_age() < SILENT_LIMIT
    }

    /// How long since etcd last answered the watch (a large value before it ever has).
    pub fn last_heard_age(&self) -> Duration {
        match self.last_heard_ms.load(Ordering::Relaxed) {
            0 => Duration::from_secs(u32::MAX.into()),
            t => Duration::from_millis(now_ms().saturating_sub(t)),
        }
    }

    /// Waits until the applied revision reaches `revision`, for at most `within`.
    pub async fn wait_applied(&self, revision: i64, within: Duration) -> bool {
        let mut rx = self.changes.subscribe();
        tokio::time::timeout(within, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Writes the alias table (the body of `PUT /v1/aliases`); its revision.
    pub async fn put_table(&self, instances: &Specs) -> Result<i64, StoreError> {
        let value = serde_json::to_vec(&TableValue {
            instances: Arc::clone(instances),
        })
        .map_err(|e| unavailable("encode", e))?;
        let size = value.len();
        let mut c = self.client().await?;
        // Sent and not answered in time, the write may still land: say so, not "refused".
        let resp = tokio::time::timeout(
            self.settings.request_timeout,
            c.put(self.table_key(), value, None),
        )
        .await
        .map_err(|_| {
            StoreError::Unconfirmed(format!(
                "etcd put: no answer within store.request_timeout ({:?})",
                self.settings.request_timeout
            ))
        })?
        .map_err(|e| match too_large(&e) {
            true => StoreError::TooLarge(format!(
                "etcd refused the table ({size} bytes) as too large: {e}; raise etcd's \
                 --max-request-bytes (1.5 MiB by default) or write a smaller table"
            )),
            false => unavailable("put", e),
        })?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Writes `instances` as the table only if etcd has none (a create-only txn).
    async fn seed_table(&self, c: &mut Client, instances: &Specs) -> Result<bool, StoreError> {
        let value = serde_json::to_vec(&TableValue {
            instances: Arc::clone(instances),
        })
        .map_err(|e| unavailable("encode", e))?;
        let key = self.table_key();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)]);
        Ok(self.timed("seed", c.txn(txn)).await?.succeeded())
    }

    /// Reads the whole prefix, in pages of `PAGE` keys all read at the revision of the
    /// first page (one consistent snapshot, and no response near gRPC's size limit).
    async fn full_read(&self, c: &mut Client) -> Result<(StoreState, Applied), StoreError> {
        let start = self.settings.prefix.clone() + "/";
        let end = prefix_end(start.as_bytes());
        let mut kv = c.kv_client();
        let mut key = start.into_bytes();
        let mut revision = 0;
        let mut kvs: Vec<Kv> = Vec::new();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = self.timed("read", kv.get(key.clone(), Some(opts))).await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            kvs.extend(resp.kvs().iter().map(to_kv));
            let Some(last) = resp.kvs().last().filter(|_| resp.more()) else {
                break;
            };
            key = last.key().to_vec();
            key.push(0); // the next key after `last`
        }
        // parsed on a blocking thread, as the watch's events are (`off_runtime`)
        let prefix = self.settings.prefix.clone();
        tokio::task::spawn_blocking(move || StoreState::from_full_read(&prefix, revision, &kvs))
            .await
            .map_err(|e| unavailable("parse the full read", e))
    }

    /// Applies a watch response's events to a copy of the applied state (its holders are
    /// shared with it, not copied) and, if they changed it, publishes the copy. Blocking:
    /// the parse and the sink's merge and build grow with the table (`off_runtime`).
    fn apply_events(&self, events: &[Event], sink: &dyn StoreSink) {
        let mut state = StoreState::clone(&self.applied());
        let out = state.apply(&self.settings.prefix, events);
        self.report(&out);
        if out.changed() {
            self.publish(state, sink);
        } else {
            // Duplicates or keys we ignore still move the applied revision.
            self.revision.store(state.revision, Ordering::Relaxed);
            self.applied.store(Arc::new(state));
        }
    }

    /// Blocking: the sink merges and builds the table.
    fn publish(&self, state: StoreState, sink: &dyn StoreSink) {
        let state = Arc::new(state);
        self.applied.store(Arc::clone(&state));
        self.revision.store(state.revision, Ordering::Relaxed);
        metrics().store_revision.set(state.revision);
        sink.apply(&state);
        self.changes.send_replace(state.revision);
        self.snapshots.send_replace(Some(state));
    }

    fn heard(&self) {
        self.last_heard_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn lost(&self) {
        self.in_sync.store(false, Ordering::Relaxed);
        metrics().store_up.set(0);
    }

    fn report(&self, out: &Applied) {
        let m = metrics();
        m.store_events
            .with_label_values(&["applied"])
            .inc_by(out.applied as u64);
        m.store_events
            .with_label_values(&["skipped"])
            .inc_by(out.skipped as u64);
        for bad in &out.bad {
            m.store_events.with_label_values(&["bad"]).inc();
            tracing::warn!(key = %bad.key, reason = %bad.reason, "etcd: skipping a value that does not parse");
        }
    }

    /// Follows the prefix until the process ends: full read, then watch; see the module docs.
    pub async fn run(self: Arc<Self>, sink: Arc<dyn StoreSink>) {
        if let Some(path) = self.settings.snapshot.clone() {
            tokio::spawn(write_snapshots(path, self.snapshots.subscribe()));
        }
        let mut backoff = Backoff(BACKOFF_MIN);
        let mut resync: Option<&'static str> = Some("start");
        loop {
            let mut c = match self.client().await {
                Ok(c) => c,
                Err(error) => {
                    self.lost();
                    tracing::warn!(%error, "etcd unreachable; serving the last applied state");
                    tokio::time::sleep(backoff.next()).await;
                    continue;
                }
            };
            if let Some(reason) = resync {
                match self.resync(&mut c, &sink, reason).await {
                    Ok(()) => resync = None,
                    Err(error) => {
                        self.lost();
                        tracing::warn!(%error, "etcd: full read failed; serving the last applied state");
                        tokio::time::sleep(backoff.next()).await;
                        continue;
                    }
                }
            }
            match self.watch(&mut c, &sink, &mut backoff).await {
                WatchEnd::Resync(reason) => resync = Some(reason),
                WatchEnd::Lost(error) => {
                    self.lost();
                    tracing::warn!(%error, revision = self.revision.load(Ordering::Relaxed),
                        "etcd watch lost; serving the last applied state, watching again from it");
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        }
    }

    /// Reads everything and applies it as one swap; seeds an etcd that has no table.
    async fn resync(
        self: &Arc<Self>,
        c: &mut Client,
        sink: &Arc<dyn StoreSink>,
        reason: &'static str,
    ) -> Result<(), StoreError> {
        let (mut state, mut out) = self.full_read(c).await?;
        if state.table.is_none() {
            let seed = sink.seed();
            if !seed.is_empty() && self.seed_table(c, &seed).await? {
                tracing::info!(
                    aliases = seed.len(),
                    "etcd had no alias table: seeded it from the config's [instances]"
                );
                (state, out) = self.full_read(c).await?;
            }
        }
        let before = self.revision.load(Ordering::Relaxed);
        if state.revision < before {
            tracing::warn!(applied = before, etcd = state.revision, "etcd's revision is below the applied one (was it wiped or restored?); taking etcd's state");
        }
        self.report(&out);
        metrics().store_resyncs.with_label_values(&[reason]).inc();
        tracing::info!(
            reason,
            revision = state.revision,
            holders = state.holders.len(),
            table_revision = state.table.as_ref().map(|t| t.revision),
            "etcd: full read applied"
        );
        self.heard();
        let (this, sink) = (Arc::clone(self), Arc::clone(sink));
        off_runtime(move || this.publish(state, sink.as_ref())).await;
        Ok(())
    }

    async fn watch(
        self: &Arc<Self>,
        c: &mut Client,
        sink: &Arc<dyn StoreSink>,
        backoff: &mut Backoff,
    ) -> WatchEnd {
        let from = self.revision.load(Ordering::Relaxed) + 1;
        let opts = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut watcher = c
            .watch_client()
            .max_decoding_message_size(MAX_WATCH_MESSAGE);
        let mut stream = match self
            .timed(
                "watch",
                watcher.watch(self.settings.prefix.clone() + "/", Some(opts)),
            )
            .await
        {
            Ok(s) => s,
            Err(e) => return WatchEnd::Lost(e.to_string()),
        };
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = progress.tick() => {
                    if self.in_sync.load(Ordering::Relaxed) && self.last_heard_age() > SILENT_LIMIT {
                        return WatchEnd::Lost("etcd stopped answering the watch".into());
                    }
                    if let Err(e) = stream.request_progress().await {
                        return WatchEnd::Lost(e.to_string());
                    }
                    continue;
                }
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => return WatchEnd::Lost("the watch stream ended".into()),
                Err(e) => return WatchEnd::Lost(e.to_string()),
            };
            self.heard();
            let applied = self.revision.load(Ordering::Relaxed);
            let header = resp.header().map_or(0, |h| h.revision());
            match judge(applied, header, resp.compact_revision(), resp.canceled()) {
                WatchVerdict::Continue => {}
                WatchVerdict::ResyncCompacted => {
                    tracing::warn!(
                        applied,
                        compacted_to = resp.compact_revision(),
                        "etcd compacted past the applied revision: reading everything again"
                    );
                    return WatchEnd::Resync("compacted");
                }
                WatchVerdict::ResyncBackwards => {
                    tracing::warn!(applied, etcd = header,
                        "etcd's revision went backwards (wiped and restarted?): reading everything again");
                    return WatchEnd::Resync("revision_backwards");
                }
                WatchVerdict::Rewatch => {
                    return WatchEnd::Lost(format!(
                        "the watch was cancelled: {}",
                        resp.cancel_reason()
                    ));
                }
            }
            if resp.created() {
                self.in_sync.store(true, Ordering::Relaxed);
                metrics().store_up.set(1);
                backoff.reset();
                tracing::info!(from, "etcd watch running");
            }
            if resp.events().is_empty() {
                continue; // created, or a progress reply: nothing to copy or apply
            }
            let events: Vec<Event> = resp
                .events()
                .iter()
                .filter_map(|e| {
                    let kv = e.kv()?;
                    Some(match e.event_type() {
                        EventType::Put => Event::Put(to_kv(kv)),
                        EventType::Delete => Event::Delete {
                            key: kv.key().to_vec(),
                            mod_revision: kv.mod_revision(),
                        },
                    })
                })
                .collect();
            let (this, sink) = (Arc::clone(self), Arc::clone(sink));
            off_runtime(move || this.apply_events(&events, sink.as_ref())).await;
        }
    }

    async fn keep_alive(&self, c: &mut Client, lease: i64) -> Result<i64, StoreError> {
        self.timed("keep-alive", async {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            Ok(stream.message().await?.map_or(0, |r| r.ttl()))
        })
        .await
    }

    fn holder_of(&self, kv: &Kv) -> Option<Entry> {
        let alias = std::str::from_utf8(&kv.key)
            .ok()?
            .strip_prefix(&self.key(ALIAS_DIR, ""))?;
        let v: HolderValue = serde_json::from_slice(&kv.value).ok()?;
        let epoch = u64::try_from(kv.create_revision).ok()?;
        Some(Entry {
            uuid: v.uuid,
            alias: crate::model::Alias::try_from(alias.to_string()).ok()?,
            address: v.address,
            timestamp_ms: v.claimed_ms,
            revision: epoch,
            epoch,
        })
    }

    async fn claim(&self, c: &mut Client, hb: &Heartbeat) -> Result<HeartbeatOutcome, StoreError> {
        let key = self.key(ALIAS_DIR, hb.alias.as_str());
        let last = self.key(LAST_DIR, hb.alias.as_str());
        let lease = self
            .timed("lease", c.lease_grant(self.ttl_secs(), None))
            .await?
            .id();
        let value = serde_json::to_vec(&HolderValue {
            uuid: hb.uuid.clone(),
            address: hb.address.clone(),
            claimed_ms: unix_ms(),
        })
        .map_err(|e| unavailable("encode", e))?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::get(last.clone(), None),
                TxnOp::put(
                    key.clone(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::put(last, hb.uuid.clone(), None),
            ])
            .or_else([TxnOp::get(key, None)]);
        let resp = match self.timed("claim", c.txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                self.revoke(c, lease);
                return Err(e);
            }
        };
        let ops = resp.op_responses();
        if !resp.succeeded() {
            self.revoke(c, lease);
            let current = txn_get(&ops, 0).and_then(|kv| self.holder_of(&kv));
            return Ok(HeartbeatOutcome::Stale { current });
        }
        let revision = resp.header().map_or(0, |h| h.revision()) as u64;
        let took_over = txn_get(&ops, 0)
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .filter(|prev| *prev != hb.uuid);
        Ok(HeartbeatOutcome::Accepted {
            entry: Entry {
                uuid: hb.uuid.clone(),
                alias: hb.alias.clone(),
                address: hb.address.clone(),
                timestamp_ms: unix_ms(),
                revision,
                epoch: revision,
            },
            took_over,
        })
    }

    /// Revokes a lease that no key uses, without waiting (it would expire anyway).
    fn revoke(&self, c: &Client, lease: i64) {
        let mut c = c.clone();
        tokio::spawn(async move {
            let _ = c.lease_revoke(lease).await;
        });
    }

    async fn renew(&self, c: &mut Client, hb: &Heartbeat) -> Result<HeartbeatOutcome, StoreError> {
        let key = self.key(ALIAS_DIR, hb.alias.as_str());
        let last_seen = i64::try_from(hb.last_seen).unwrap_or(i64::MAX);
        // Confirm the holding through the txn: the key is the one this holder was told of.
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                last_seen,
            )])
            .and_then([TxnOp::get(key.clone(), None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.timed("renew", c.txn(txn)).await?;
        let kv = txn_get(&resp.op_responses(), 0);
        let current = kv.as_ref().and_then(|kv| self.holder_of(kv));
        if !resp.succeeded() {
            return Ok(HeartbeatOutcome::Stale { current });
        }
        let (Some(kv), Some(entry)) = (kv, current) else {
            return Ok(HeartbeatOutcome::Stale { current: None });
        };
        if entry.uuid != hb.uuid {
            return Ok(HeartbeatOutcome::Rejected { current: entry });
        }
        if self.keep_alive(c, kv.lease).await? <= 0 {
            // The lease ran out between the read and the keep-alive: the holding is gone.
            return Ok(HeartbeatOutcome::Stale { current: None });
        }
        Ok(HeartbeatOutcome::Accepted {
            entry,
            took_over: None,
        })
    }
}

#[async_trait]
impl MembershipStore for EtcdStore {
    async fn update_heartbeat(&self, hb: &Heartbeat) -> Result<HeartbeatOutcome, StoreError> {
        let mut c = self.client().await?;
        if hb.last_seen == 0 {
            self.claim(&mut c, hb).await
        } else {
            self.renew(&mut c, hb).await
        }
    }

    async fn get_primary(&self, alias: &str) -> Result<Primary, StoreError> {
        let mut c = self.client().await?;
        let resp = self
            .timed("read", c.get(self.key(ALIAS_DIR, alias), None))
            .await?;
        let Some(kv) = resp.kvs().first().map(to_kv) else {
            return Ok(Primary {
                holder: None,
                token: 0,
            });
        };
        let holder = self.holder_of(&kv);
        if holder.is_none() {
            tracing::warn!(
                alias,
                "etcd: the holder key does not parse; delete it to free the alias"
            );
        }
        Ok(Primary {
            holder,
            token: kv.create_revision as u64,
        })
    }

    /// The holders as last applied from the watch: no round trip, so listing (and
    /// `/metrics`) still answers while etcd is down. Keys exist only while their lease
    /// lives, so every entry is fresh, and its age is unknown.
    async fn list(&self) -> Result<Vec<Listed>, StoreError> {
        Ok(self
            .applied()
            .holders
            .values()
            .map(|e| Listed {
                entry: e.clone(),
                age: None,
                fresh: true,
            })
            .collect())
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
    }
}

/// The snapshot file: the applied state, and when it was written.
#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    /// The format, 1.
    format: u32,
    /// Unix milliseconds.
    written_unix_ms: u64,
    state: StoreState,
}

/// Why a snapshot could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a snapshot.
    #[error("{path}: not a hagate snapshot: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// Reads a snapshot: the state, and when it was written. `Ok(None)` if there is no file.
pub fn read_snapshot(path: &Path) -> Result<Option<(StoreState, u64)>, SnapshotError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SnapshotError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let snap: Snapshot = serde_json::from_slice(&bytes).map_err(|e| SnapshotError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(Some((snap.state, snap.written_unix_ms)))
}

/// Writes `state` to `path` atomically: a temporary file beside it, fsync, rename, and an
/// fsync of the directory.
pub fn write_snapshot(path: &Path, state: &StoreState) -> std::io::Result<()> {
    use std::io::Write;
    let snap = Snapshot {
        format: 1,
        written_unix_ms: unix_ms(),
        state: state.clone(),
    };
    let bytes = serde_json::to_vec(&snap).map_err(std::io::Error::other)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("snapshot")
    ));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Writes each new applied state, at most every `SNAPSHOT_DEBOUNCE`, off the runtime.
async fn write_snapshots(path: PathBuf, mut rx: watch::Receiver<Option<Arc<StoreState>>>) {
    while rx.changed().await.is_ok() {
        tokio::time::sleep(SNAPSHOT_DEBOUNCE).await;
        let Some(state) = rx.borrow_and_update().clone() else {
            continue;
        };
        let p = path.clone();
        let result = tokio::task::spawn_blocking(move || write_snapshot(&p, &state)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::error!(%error, path = %path.display(), "cannot write the store snapshot")
            }
            Err(error) => tracing::error!(%error, "the snapshot writer failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_round_trips_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert!(read_snapshot(&path).unwrap().is_none());
        let state = StoreState {
            revision: 42,
            ..Default::default()
        };
        write_snapshot(&path, &state).unwrap();
        let (back, written) = read_snapshot(&path).unwrap().unwrap();
        assert_eq!(back, state);
        assert!(written > 0);
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(
            read_snapshot(&path),
            Err(SnapshotError::Parse { .. })
        ));
    }

    #[test]
    fn the_prefix_range_ends_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/hagate/"), b"/hagate0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn backoff_grows_with_jitter_and_stays_bounded() {
        let mut b = Backoff(BACKOFF_MIN);
        let mut last_cap = BACKOFF_MIN;
        for _ in 0..20 {
            let d = b.next();
            assert!(d <= last_cap && d >= last_cap / 2, "{d:?} vs {last_cap:?}");
            last_cap = (last_cap * 2).min(BACKOFF_MAX);
        }
        b.reset();
        assert!(b.next() <= BACKOFF_MIN);
    }
}
