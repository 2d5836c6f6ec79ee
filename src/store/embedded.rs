//! The embedded membership store: entries in the gateway's memory, behind one mutex.
//!
//! State across a restart: nothing is persisted. A restarted gateway starts empty and
//! the table is rebuilt from heartbeats: every live holder re-claims its alias at its
//! next heartbeat (within I, so well within T). Revisions start from the wall clock in
//! microseconds, so a token from before the restart never matches a new entry.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::{
    Entry, Heartbeat, HeartbeatOutcome, Listed, MembershipStore, Primary, Revision, StoreError,
};
use crate::model::Alias;

/// The store's clock, in milliseconds. Production uses the process's monotonic clock;
/// tests drive a manual one.
pub trait Clock: Send + Sync {
    /// Now, in milliseconds.
    fn now_ms(&self) -> u64;
}

/// The process's monotonic clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now_ms(&self) -> u64 {
        crate::health::now_ms()
    }
}

#[derive(Debug)]
struct State {
    entries: BTreeMap<Alias, Entry>,
    next_revision: Revision,
}

/// Entries in memory; see the module docs.
pub struct EmbeddedStore {
    state: Mutex<State>,
    /// T in milliseconds; a config reload may change it.
    timeout_ms: AtomicU64,
    clock: Arc<dyn Clock>,
}

impl EmbeddedStore {
    /// An empty store with heartbeat timeout `timeout` (T) on the monotonic clock.
    pub fn new(timeout: Duration) -> Self {
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        Self::with_clock(timeout, Arc::new(MonotonicClock), start)
    }

    /// An empty store on `clock`, whose first revision is `first_revision` (at least 1).
    pub fn with_clock(timeout: Duration, clock: Arc<dyn Clock>, first_revision: Revision) -> Self {
        EmbeddedStore {
            state: Mutex::new(State {
                entries: BTreeMap::new(),
                next_revision: first_revision.max(1),
            }),
            timeout_ms: AtomicU64::new(timeout.as_millis() as u64),
            clock,
        }
    }

    fn fresh(&self, entry: &Entry, now: u64) -> bool {
        now.saturating_sub(entry.timestamp_ms) <= self.timeout_ms.load(Ordering::Relaxed)
    }

    /// `UpdateHeartBeat`, synchronously (the trait method wraps it).
    pub fn update(&self, hb: &Heartbeat) -> HeartbeatOutcome {
        let now = self.clock.now_ms();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let current = state.entries.get(&hb.alias);
        let revision = current.map_or(0, |e| e.revision);
        if hb.last_seen != revision {
            return HeartbeatOutcome::Stale {
                current: current.cloned(),
            };
        }
        let took_over = match current {
            Some(e) if e.uuid != hb.uuid && self.fresh(e, now) => {
                return HeartbeatOutcome::Rejected { current: e.clone() };
            }
            Some(e) if e.uuid != hb.uuid => Some(e.uuid.clone()),
            _ => None,
        };
        // A renewal keeps the epoch of the claim; a claim (new entry or takeover) starts one.
        let epoch = match current {
            Some(e) if e.uuid == hb.uuid => e.epoch,
            _ => state.next_revision,
        };
        let entry = Entry {
            uuid: hb.uuid.clone(),
            alias: hb.alias.clone(),
            address: hb.address.clone(),
            timestamp_ms: now,
            revision: state.next_revision,
            epoch,
        };
        state.next_revision += 1;
        state.entries.insert(hb.alias.clone(), entry.clone());
        HeartbeatOutcome::Accepted { entry, took_over }
    }

    /// `GetPrimary`, synchronously.
    pub fn primary(&self, alias: &str) -> Primary {
        let now = self.clock.now_ms();
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match state.entries.get(alias) {
            Some(e) if self.fresh(e, now) => Primary {
                holder: Some(e.clone()),
                token: e.revision,
            },
            Some(e) => Primary {
                holder: None,
                token: e.revision,
            },
            None => Primary {
                holder: None,
                token: 0,
            },
        }
    }

    /// Every entry with its age, synchronously.
    pub fn entries(&self) -> Vec<Listed> {
        let now = self.clock.now_ms();
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .entries
            .values()
            .map(|e| Listed {
                entry: e.clone(),
                age: Some(Duration::from_millis(now.saturating_sub(e.timestamp_ms))),
                fresh: self.fresh(e, now),
            })
            .collect()
    }
}

#[async_trait]
impl MembershipStore for EmbeddedStore {
    async fn update_heartbeat(&self, hb: &Heartbeat) -> Result<HeartbeatOutcome, StoreError> {
        Ok(self.update(hb))
    }

    async fn get_primary(&self, alias: &str) -> Result<Primary, StoreError> {
        Ok(self.primary(alias))
    }

    async fn list(&self) -> Result<Vec<Listed>, StoreError> {
        Ok(self.entries())
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock the test moves by hand.
    #[derive(Default)]
    struct Manual(AtomicU64);
    impl Clock for Manual {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn hb(uuid: &str, last_seen: Revision) -> Heartbeat {
        Heartbeat {
            uuid: uuid.into(),
            alias: Alias::try_from("cs_1".to_string()).unwrap(),
            address: format!("127.0.0.1:{}", uuid.len()),
            last_seen,
        }
    }

    #[test]
    fn claim_renew_reject_then_take_over_after_t() {
        let clock = Arc::new(Manual::default());
        let store = EmbeddedStore::with_clock(Duration::from_millis(300), clock.clone(), 10);
        assert_eq!(
            store.primary("cs_1"),
            Primary {
                holder: None,
                token: 0
            }
        );
        let HeartbeatOutcome::Accepted { entry, took_over } = store.update(&hb("a", 0)) else {
            panic!()
        };
        assert_eq!((entry.revision, entry.epoch, took_over), (10, 10, None));
        // a renewal moves the revision but keeps the epoch
        let HeartbeatOutcome::Accepted { entry, .. } = store.update(&hb("a", 10)) else {
            panic!()
        };
        assert_eq!((entry.revision, entry.epoch), (11, 10));
        // a concurrent claim with the same (old) token loses
        assert!(matches!(
            store.update(&hb("b", 0)),
            HeartbeatOutcome::Stale { .. }
        ));
        // b read the entry, but a is fresh: rejected
        clock.0.store(300, Ordering::SeqCst);
        assert!(matches!(
            store.update(&hb("b", 11)),
            HeartbeatOutcome::Rejected { .. }
        ));
        assert_eq!(store.primary("cs_1").holder.unwrap().uuid, "a");
        // a stops; past T the entry is not returned, but its token is
        clock.0.store(301, Ordering::SeqCst);
        assert_eq!(
            store.primary("cs_1"),
            Primary {
                holder: None,
                token: 11
            }
        );
        let HeartbeatOutcome::Accepted { entry, took_over } = store.update(&hb("b", 11)) else {
            panic!()
        };
        assert_eq!(
            (entry.uuid.as_str(), took_over.as_deref(), entry.epoch),
            ("b", Some("a"), 12),
            "a takeover starts a new, larger epoch"
        );
        // a comes back with its old token: stale
        assert!(matches!(
            store.update(&hb("a", 11)),
            HeartbeatOutcome::Stale { .. }
        ));
        assert_eq!(store.entries().len(), 1);
    }
}
