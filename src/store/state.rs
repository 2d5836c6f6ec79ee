//! What the etcd store's keys mean, as pure functions: the applied state of one prefix,
//! and how a full read or a batch of watch events changes it. No IO and no etcd types:
//! `etcd.rs` converts what it reads into `Kv` and `Event` and calls in here.
//!
//! Keys under the prefix:
//!
//! | key | value | lease |
//! |---|---|---|
//! | `<prefix>/table` | `{"instances": {"cs_1": {"address": "10.0.0.5:9116"}}}` | none |
//! | `<prefix>/alias/<alias>` | `{"uuid": "...", "address": "ip:port", "claimed_ms": 0}` | the holder's, TTL = T |
//! | `<prefix>/last/<alias>` | the uuid of the alias's last holder (for takeover logs) | none |
//!
//! Rules, from how gateways on etcd lost events (APISIX, Traefik):
//! - events apply in revision order; an event at or below the applied revision is skipped
//!   (etcd 3.4 can deliver duplicates);
//! - a watch that reports a revision below the applied one means etcd was wiped: resync;
//! - a compacted watch means events were lost: resync;
//! - nothing here ever moves the applied revision without an event or a full read.

use serde::{Deserialize, Serialize};

use super::Entry;
use crate::model::Alias;

/// The key of the alias table, under the prefix.
pub const TABLE: &str = "/table";
/// The directory of holder keys, under the prefix.
pub const ALIAS_DIR: &str = "/alias/";
/// The directory of last-holder keys, under the prefix.
pub const LAST_DIR: &str = "/last/";

/// One key-value pair as etcd returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The full key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// The revision that created the key (the holder's epoch for alias keys).
    pub create_revision: i64,
    /// The revision of the last change.
    pub mod_revision: i64,
    /// The lease attached, 0 if none.
    pub lease: i64,
}

/// One watch event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A key was written.
    Put(Kv),
    /// A key was deleted (or its lease expired).
    Delete {
        /// The full key.
        key: Vec<u8>,
        /// The revision of the deletion.
        mod_revision: i64,
    },
}

impl Event {
    fn revision(&self) -> i64 {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// What a key under the prefix is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key<'a> {
    /// The alias table.
    Table,
    /// The holder key of an alias.
    Holder(&'a str),
    /// Anything else (last-holder keys, keys of a newer hagate): ignored.
    Other,
}

/// Classifies `key` under `prefix`.
pub fn classify<'a>(prefix: &str, key: &'a [u8]) -> Key<'a> {
    let Some(rest) = key.strip_prefix(prefix.as_bytes()) else {
        return Key::Other;
    };
    if rest == TABLE.as_bytes() {
        return Key::Table;
    }
    match rest
        .strip_prefix(ALIAS_DIR.as_bytes())
        .map(std::str::from_utf8)
    {
        Some(Ok(alias)) if !alias.is_empty() => Key::Holder(alias),
        _ => Key::Other,
    }
}

/// The value of a holder key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HolderValue {
    /// The holder's uuid.
    pub uuid: String,
    /// Where it serves, `ip:port`.
    pub address: String,
    /// When the claim was written, in Unix milliseconds of the writing gateway (for
    /// display only: expiry is the lease's business).
    #[serde(default)]
    pub claimed_ms: u64,
}

/// The value of the table key: the body of `PUT /v1/aliases`.
pub use crate::model::TableValue;

/// The alias table as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableState {
    /// The instances, by alias.
    #[serde(deserialize_with = "crate::model::deserialize_specs")]
    pub instances: crate::model::Specs,
    /// The revision that wrote it.
    pub revision: i64,
}

/// Everything one gateway has applied from its prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreState {
    /// The revision applied so far: the header of the last full read, or the last event.
    pub revision: i64,
    /// The alias table, once etcd has one.
    pub table: Option<TableState>,
    /// The live holders, by alias.
    pub holders: imbl::OrdMap<String, Entry>,
}

/// A value that could not be used; it is skipped and logged, and the rest still applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadValue {
    /// The key.
    pub key: String,
    /// Why.
    pub reason: String,
}

/// What applying a batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Events that changed the state.
    pub applied: usize,
    /// Events at or below the applied revision (duplicates), skipped.
    pub skipped: usize,
    /// Values that did not parse, skipped.
    pub bad: Vec<BadValue>,
}

impl Applied {
    /// Whether the state changed.
    pub fn changed(&self) -> bool {
        self.applied > 0
    }
}

/// What a watch response means for the watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchVerdict {
    /// Apply its events (if any) and go on.
    Continue,
    /// Events were compacted away: read everything again.
    ResyncCompacted,
    /// etcd's revision is below what was applied (it was wiped): read everything again.
    ResyncBackwards,
    /// The watch was cancelled for another reason (no leader, auth): watch again.
    Rewatch,
}

/// Judges one watch response from its header revision, compact revision and cancel flag.
pub fn judge(
    applied: i64,
    header_revision: i64,
    compact_revision: i64,
    canceled: bool,
) -> WatchVerdict {
    if compact_revision > 0 {
        WatchVerdict::ResyncCompacted
    } else if header_revision > 0 && header_revision < applied {
        WatchVerdict::ResyncBackwards
    } else if canceled {
        WatchVerdict::Rewatch
    } else {
        WatchVerdict::Continue
    }
}

fn holder_entry(alias: &str, kv: &Kv) -> Result<Entry, String> {
    let alias = Alias::try_from(alias.to_string()).map_err(|e| e.to_string())?;
    let v: HolderValue = serde_json::from_slice(&kv.value).map_err(|e| e.to_string())?;
    if v.address.parse::<std::net::SocketAddr>().is_err() {
        return Err(format!("invalid socket address {:?}", v.address));
    }
    let epoch = u64::try_from(kv.create_revision).map_err(|_| "negative revision".to_string())?;
    Ok(Entry {
        uuid: v.uuid,
        alias,
        address: v.address,
        timestamp_ms: v.claimed_ms,
        revision: epoch,
        epoch,
    })
}

fn table_state(kv: &Kv) -> Result<TableState, String> {
    let v: TableValue = crate::model::from_json(&kv.value).map_err(|e| e.to_string())?;
    Ok(TableState {
        instances: v.instances,
        revision: kv.mod_revision,
    })
}

impl StoreState {
    /// The state a full read of the prefix gives: `kvs` at `header_revision`.
    pub fn from_full_read(prefix: &str, header_revision: i64, kvs: &[Kv]) -> (Self, Applied) {
        let mut state = StoreState {
            revision: header_revision,
            ..StoreState::default()
        };
        let mut outcome = Applied::default();
        for kv in kvs {
            if state.put(prefix, kv, &mut outcome.bad) {
                outcome.applied += 1;
            }
        }
        (state, outcome)
    }

    /// Applies one key-value; whether it changed anything.
    fn put(&mut self, prefix: &str, kv: &Kv, bad: &mut Vec<BadValue>) -> bool {
        let mut refuse = |reason: String| {
            bad.push(BadValue {
                key: String::from_utf8_lossy(&kv.key).into_owned(),
                reason,
            });
            false
        };
        match classify(prefix, &kv.key) {
            Key::Table => match table_state(kv) {
                Ok(t) => {
                    self.table = Some(t);
                    true
                }
                Err(e) => refuse(e),
            },
            Key::Holder(alias) => match holder_entry(alias, kv) {
                Ok(e) => {
                    self.holders.insert(alias.to_string(), e);
                    true
                }
                Err(e) => refuse(e),
            },
            Key::Other => false,
        }
    }

    /// Applies a batch of watch events in order, skipping any at or below the applied
    /// revision. The applied revision moves only with events.
    pub fn apply(&mut self, prefix: &str, events: &[Event]) -> Applied {
        let mut outcome = Applied::default();
        for event in events {
            let rev = event.revision();
            if rev <= self.revision {
                outcome.skipped += 1;
                continue;
            }
            self.revision = rev;
            let changed = match event {
                Event::Put(kv) => self.put(prefix, kv, &mut outcome.bad),
                Event::Delete { key, .. } => match classify(prefix, key) {
                    // Deleting the table key leaves the last table serving: an empty table
                    // would be a full outage, and that is never what a delete means.
                    Key::Table => false,
                    Key::Holder(alias) => self.holders.remove(alias).is_some(),
                    Key::Other => false,
                },
            };
            if changed {
                outcome.applied += 1;
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/hagate/t";

    fn kv(key: &str, value: &str, create: i64, modr: i64) -> Kv {
        Kv {
            key: format!("{P}{key}").into_bytes(),
            value: value.as_bytes().to_vec(),
            create_revision: create,
            mod_revision: modr,
            lease: 7,
        }
    }

    fn holder(uuid: &str, port: u16) -> String {
        format!(r#"{{"uuid":"{uuid}","address":"127.0.0.1:{port}"}}"#)
    }

    fn table(port: u16) -> String {
        format!(r#"{{"instances":{{"cs_1":{{"address":"127.0.0.1:{port}"}}}}}}"#)
    }

    #[test]
    fn keys_are_classified_under_the_prefix_only() {
        assert_eq!(classify(P, b"/hagate/t/table"), Key::Table);
        assert_eq!(classify(P, b"/hagate/t/alias/cs_1"), Key::Holder("cs_1"));
        assert_eq!(classify(P, b"/hagate/t/alias/"), Key::Other);
        assert_eq!(classify(P, b"/hagate/t/last/cs_1"), Key::Other);
        assert_eq!(
            classify(P, b"/hagate/tt/table"),
            Key::Other,
            "another prefix"
        );
        assert_eq!(classify(P, b"/hagate/t/tablex"), Key::Other);
    }

    #[test]
    fn a_full_read_builds_the_state_and_skips_bad_values() {
        let (s, out) = StoreState::from_full_read(
            P,
            40,
            &[
                kv("/table", &table(1), 3, 30),
                kv("/alias/cs_1", &holder("a", 2), 35, 35),
                kv("/alias/cs_2", "not json", 36, 36),
                kv("/last/cs_1", "a", 35, 35),
            ],
        );
        assert_eq!(s.revision, 40);
        assert_eq!(s.table.as_ref().unwrap().revision, 30);
        assert_eq!(s.holders["cs_1"].epoch, 35);
        assert_eq!(s.holders["cs_1"].address, "127.0.0.1:2");
        assert!(!s.holders.contains_key("cs_2"));
        assert_eq!(out.bad.len(), 1);
        assert_eq!(out.bad[0].key, "/hagate/t/alias/cs_2");
    }

    #[test]
    fn events_apply_in_order_and_duplicates_are_skipped() {
        let mut s = StoreState {
            revision: 10,
            ..Default::default()
        };
        let claim = Event::Put(kv("/alias/cs_1", &holder("a", 2), 11, 11));
        let out = s.apply(
            P,
            &[claim.clone(), Event::Put(kv("/table", &table(1), 5, 12))],
        );
        assert_eq!((out.applied, out.skipped, s.revision), (2, 0, 12));
        // etcd 3.4 may send the same events again: nothing changes
        let out = s.apply(P, &[claim]);
        assert_eq!((out.applied, out.skipped, s.revision), (0, 1, 12));
        assert!(!out.changed());
        // the lease expires: the holder goes
        let out = s.apply(
            P,
            &[Event::Delete {
                key: format!("{P}/alias/cs_1").into_bytes(),
                mod_revision: 13,
            }],
        );
        assert!(out.changed());
        assert!(s.holders.is_empty());
        // a takeover: a new key with a larger create revision, a larger epoch
        s.apply(P, &[Event::Put(kv("/alias/cs_1", &holder("b", 3), 14, 14))]);
        assert_eq!(
            (s.holders["cs_1"].uuid.as_str(), s.holders["cs_1"].epoch),
            ("b", 14)
        );
    }

    #[test]
    fn a_deleted_or_bad_table_leaves_the_last_table_serving() {
        let mut s = StoreState::default();
        s.apply(P, &[Event::Put(kv("/table", &table(1), 2, 2))]);
        let out = s.apply(
            P,
            &[
                Event::Put(kv("/table", "{\"instances\": 5}", 2, 3)),
                Event::Delete {
                    key: format!("{P}/table").into_bytes(),
                    mod_revision: 4,
                },
            ],
        );
        assert_eq!((out.applied, out.bad.len(), s.revision), (0, 1, 4));
        assert_eq!(s.table.unwrap().revision, 2);
    }

    #[test]
    fn watch_responses_are_judged() {
        assert_eq!(judge(10, 12, 0, false), WatchVerdict::Continue);
        assert_eq!(judge(10, 10, 0, false), WatchVerdict::Continue);
        assert_eq!(judge(10, 12, 8, true), WatchVerdict::ResyncCompacted);
        assert_eq!(judge(10, 3, 0, false), WatchVerdict::ResyncBackwards);
        assert_eq!(judge(10, 12, 0, true), WatchVerdict::Rewatch);
        // a header without a revision is not taken as "backwards"
        assert_eq!(judge(10, 0, 0, false), WatchVerdict::Continue);
    }
}
