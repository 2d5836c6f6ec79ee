//! The membership store: one heartbeat entry per alias, read and written with the two
//! operations of the hpcpack HA algorithm, `UpdateHeartBeat` and `GetPrimary`.
//!
//! `MembershipStore` is the seam. `embedded::EmbeddedStore` (the default) keeps entries in
//! the gateway's memory. `etcd::EtcdStore` maps the same trait onto etcd v3, so that
//! several gateways share one truth:
//!
//! | here | etcd v3 |
//! |---|---|
//! | one entry per alias | key `<prefix>/alias/<alias>`, value `{uuid, address}`, on the holder's lease (TTL = T) |
//! | `Revision` token, and the epoch | the key's `create_revision` (0: no key) |
//! | a claim | `txn(If create_revision == 0, Then put key with the lease)` |
//! | a renewal | `txn(If create_revision == last_seen and value == ours)`, then a lease keep-alive (no put) |
//! | "fresh" (`now − ts ≤ T`) | the key exists (its lease has not expired) |
//! | the store's clock | the etcd leader's lease clock |
//!
//! `state` is the pure part of the etcd store: what a watch event or a full read means for
//! the applied state, tested without etcd. Time is always the store's clock, never the
//! caller's. No pingora and no HTTP here.

pub mod embedded;
pub mod etcd;
pub mod state;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::model::Alias;

/// A compare-and-set token: the revision of the entry the caller last saw, or 0 for
/// "there was no entry". Revisions only grow, and never repeat across restarts.
pub type Revision = u64;

/// One heartbeat entry: the holder of an alias.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The holder's instance uuid (a fresh one each time an agent starts).
    pub uuid: String,
    /// The alias held (the role, `utype` in hpcpack).
    pub alias: Alias,
    /// Where the holder serves (`uname` in hpcpack), `ip:port`.
    pub address: String,
    /// When the store accepted the last heartbeat, in the store's milliseconds.
    pub timestamp_ms: u64,
    /// The entry's revision: the token for the next compare-and-set.
    pub revision: Revision,
    /// The fencing token of this holding: set when the holder claimed the alias, kept by
    /// its renewals, and larger for every later claim. Forwarded as `x-hagate-epoch`.
    #[serde(default)]
    pub epoch: Revision,
}

/// A heartbeat: `UpdateHeartBeat(uuid, alias, address, last_seen)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The sender's uuid.
    pub uuid: String,
    /// The alias it holds or claims.
    pub alias: Alias,
    /// Where it serves, `ip:port`.
    pub address: String,
    /// The revision of the entry it last saw (from `GetPrimary`), 0 if none.
    pub last_seen: Revision,
}

/// What a heartbeat did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    /// Written. `took_over` is set when it replaced an expired entry of another uuid.
    Accepted {
        /// The entry as written (its revision is the next token).
        entry: Entry,
        /// The uuid it replaced, if this was a takeover.
        took_over: Option<String>,
    },
    /// The entry changed since the sender read it: a concurrent update won. Discarded.
    Stale {
        /// The entry now, if any.
        current: Option<Entry>,
    },
    /// The token is current, but another uuid holds the alias and its heartbeat is not yet
    /// older than T. Discarded.
    Rejected {
        /// The holder.
        current: Entry,
    },
}

impl HeartbeatOutcome {
    /// The `result` label of `hagate_membership_heartbeats_total`.
    pub fn label(&self) -> &'static str {
        match self {
            HeartbeatOutcome::Accepted { .. } => "accepted",
            HeartbeatOutcome::Stale { .. } => "stale",
            HeartbeatOutcome::Rejected { .. } => "rejected",
        }
    }
}

/// What `GetPrimary` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primary {
    /// The holder while its heartbeat is fresh (`now − ts ≤ T`), else `None`.
    pub holder: Option<Entry>,
    /// The token a candidate passes as `last_seen` to claim or renew.
    pub token: Revision,
}

/// An entry with its age, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The entry.
    pub entry: Entry,
    /// `now − timestamp` on the store's clock, where the store knows it (etcd renews by
    /// lease keep-alive, which leaves no timestamp: `None`).
    pub age: Option<Duration>,
    /// Whether the age is at most T.
    pub fresh: bool,
}

/// Why the store could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The backing store is unreachable (never for the embedded store).
    #[error("membership store unavailable: {0}")]
    Unavailable(String),
    /// A write was sent but not answered in time: it may or may not have been applied.
    #[error("membership store did not confirm the write: {0}; it may still be applied")]
    Unconfirmed(String),
    /// The store refused a value as too large for it (etcd's `--max-request-bytes`).
    #[error("{0}")]
    TooLarge(String),
}

/// The heartbeat table.
#[async_trait]
pub trait MembershipStore: Send + Sync {
    /// `UpdateHeartBeat`: writes the entry only if `hb.last_seen` is still the entry's
    /// revision, and, when another uuid holds the alias, only if that holder's heartbeat
    /// is older than T.
    async fn update_heartbeat(&self, hb: &Heartbeat) -> Result<HeartbeatOutcome, StoreError>;

    /// `GetPrimary`: the holder while fresh, and the token for a compare-and-set.
    async fn get_primary(&self, alias: &str) -> Result<Primary, StoreError>;

    /// Every entry, fresh or not, with its age.
    async fn list(&self) -> Result<Vec<Listed>, StoreError>;

    /// The fresh holders, for alias resolution.
    async fn holders(&self) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|l| l.fresh)
            .map(|l| l.entry)
            .collect())
    }

    /// T, the heartbeat timeout.
    fn timeout(&self) -> Duration;

    /// Changes T (a config reload). For etcd, the lease length of the next puts.
    fn set_timeout(&self, timeout: Duration);
}
