//! The alias table: alias -> instance (address, labels, weight, shared health state), and
//! the `ArcSwap` holder that lets it be replaced atomically while requests are served.
//!
//! Building a table is where aliases and addresses are validated; a table that exists is
//! valid. A request loads the current table once and keeps that `Arc` for its whole life,
//! so it never sees a half-built table. No IO and no pingora here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use crate::health::{InstanceState, StateRegistry};
use crate::metrics::InstanceMetrics;
pub use crate::model::{Alias, AliasError, InstanceSpec, Labels};

/// One resolved instance.
#[derive(Debug)]
pub struct Instance {
    /// Its alias.
    pub alias: Alias,
    /// Where it listens.
    pub address: SocketAddr,
    /// Labels for placement.
    pub labels: Labels,
    /// Placement weight.
    pub weight: u32,
    /// Health and load, shared with every table that has this address.
    pub state: Arc<InstanceState>,
    /// The membership holder's epoch, when a holder's address is in use: forwarded as
    /// `x-hagate-epoch` so that a context server can refuse a stale route.
    pub epoch: Option<u64>,
    /// Speak TLS to it.
    pub tls: bool,
    /// The TLS server name: `sni`, else the host name of its address, else empty.
    pub sni: String,
    /// Its request metrics, resolved at its first request (not at build: a 100k-alias
    /// table is built without touching the registry).
    metrics: OnceLock<Arc<InstanceMetrics>>,
}

impl Instance {
    /// Its request metrics (`hagate_instance_requests_total{alias}`, ...).
    pub fn metrics(&self) -> &InstanceMetrics {
        self.metrics
            .get_or_init(|| InstanceMetrics::for_alias(self.alias.as_str()))
    }
}

/// Why a table could not be built. `field()` gives the TOML path of the culprit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// A bad alias name.
    #[error("{source}")]
    Alias {
        /// The alias as written.
        alias: String,
        /// Why.
        #[source]
        source: AliasError,
    },
    /// A bad address.
    #[error("invalid socket address {address:?}")]
    Address {
        /// The alias whose address is bad.
        alias: String,
        /// The address as written.
        address: String,
    },
    /// A host name that has never resolved.
    #[error("cannot resolve the host name of {address:?}")]
    Unresolved {
        /// The alias whose address it is.
        alias: String,
        /// The address as written.
        address: String,
    },
    /// An address no connection can reach (port 0, unspecified, broadcast, multicast).
    #[error("{address}: {reason}")]
    Unroutable {
        /// The alias whose address it is.
        alias: String,
        /// The address as written.
        address: String,
        /// Why.
        reason: crate::model::Unroutable,
    },
    /// No instances at all.
    #[error("at least one instance is required")]
    Empty,
}

impl TableError {
    /// The TOML path of the bad field, e.g. `instances.cs_1.address`.
    pub fn field(&self) -> String {
        match self {
            TableError::Alias { alias, .. } => format!("instances.{alias}"),
            TableError::Address { alias, .. }
            | TableError::Unresolved { alias, .. }
            | TableError::Unroutable { alias, .. } => {
                format!("instances.{alias}.address")
            }
            TableError::Empty => "instances".into(),
        }
    }
}

/// One spec's address, checked, and the host name it was written with (empty for an IP
/// address).
struct Checked<'a> {
    address: SocketAddr,
    host: &'a str,
}

/// Checks the alias and the address of one spec.
fn check<'a>(name: &str, spec: &'a InstanceSpec) -> Result<Checked<'a>, TableError> {
    Alias::check(name).map_err(|source| alias_error(name, source))?;
    check_address(name, spec)
}

fn alias_error(name: &str, source: AliasError) -> TableError {
    TableError::Alias {
        alias: name.to_string(),
        source,
    }
}

/// Checks the address of one spec; a host name takes its last resolved address (tables
/// never wait on DNS).
fn check_address<'a>(name: &str, spec: &'a InstanceSpec) -> Result<Checked<'a>, TableError> {
    let (address, host) = match spec.address.parse() {
        Ok(a) => (a, ""),
        Err(_) if crate::dns::is_host_name(&spec.address) => {
            let a = crate::dns::cached(&spec.address).ok_or_else(|| TableError::Unresolved {
                alias: name.to_string(),
                address: spec.address.clone(),
            })?;
            (a, spec.address.rsplit_once(':').map_or("", |(h, _)| h))
        }
        Err(_) => {
            return Err(TableError::Address {
                alias: name.to_string(),
                address: spec.address.clone(),
            })
        }
    };
    crate::model::routable(&address).map_err(|reason| TableError::Unroutable {
        alias: name.to_string(),
        address: spec.address.clone(),
        reason,
    })?;
    Ok(Checked { address, host })
}

/// The hash of an alias in the table's index.
fn alias_hash(alias: &str) -> u64 {
    use std::hash::BuildHasher;
    rustc_hash::FxBuildHasher.hash_one(alias)
}

/// A table just built, and what its publisher needs to tidy the health registry.
struct Built {
    table: AliasTable,
    /// Its build's number (`StateRegistry::new_build`).
    build: u64,
    /// The addresses of the previous table that it did not take over alias by alias.
    gone: Vec<SocketAddr>,
}

/// An immutable, validated alias table.
#[derive(Debug)]
pub struct AliasTable {
    version: u64,
    instances: Vec<Instance>,
    /// Positions in `instances`, by the hash of their alias: no copy of the alias (a 100k
    /// table is built with one allocation per alias, not two). FxHash: keys come from
    /// trusted config, and lookups of hostile strings cannot create collisions among the
    /// stored keys.
    index: hashbrown::HashTable<usize>,
    /// Whether any instance has `tls = true`.
    tls: bool,
}

impl AliasTable {
    /// Validates `specs` and builds a table, taking each address's health from `states`.
    /// An empty table is valid here (a gateway on etcd starts with one until it syncs);
    /// the config and the API refuse to *set* one (`TableError::Empty`).
    pub fn build(
        specs: &BTreeMap<String, InstanceSpec>,
        version: u64,
        states: &StateRegistry,
    ) -> Result<Self, TableError> {
        Ok(Self::build_after(specs, version, states, None)?.table)
    }

    /// `build`, after `previous` (the table in use, built from the same `states`): each
    /// alias whose address did not change keeps its state from `previous`, without a
    /// lookup in `states`.
    fn build_after(
        specs: &BTreeMap<String, InstanceSpec>,
        version: u64,
        states: &StateRegistry,
        previous: Option<&AliasTable>,
    ) -> Result<Built, TableError> {
        // Every alias and address checked before the registry is asked for a state: each
        // new instance takes a placeholder until all are checked. Built straight into a
        // list of its final size: a 100k table is mostly fresh pages, and the kernel's
        // page faults are much of what it costs (docs/performance.md, P6).
        let build = states.new_build();
        let unchecked = Arc::new(InstanceState::default());
        let mut instances: Vec<Instance> = Vec::with_capacity(specs.len());
        // `previous`, walked beside `specs`: both are in alias order
        let mut old = previous
            .map_or([].iter(), |t| t.instances.iter())
            .peekable();
        let mut gone = Vec::new();
        for (name, spec) in specs {
            let alias =
                Alias::try_from(name.clone()).map_err(|source| alias_error(name, source))?;
            let c = check_address(name, spec)?;
            while let Some(o) = old.next_if(|o| o.alias.as_str() < name.as_str()) {
                gone.push(o.address);
            }
            let state = match old.next_if(|o| o.alias.as_str() == name.as_str()) {
                Some(o) if o.address == c.address => {
                    o.state.take(build);
                    Arc::clone(&o.state)
                }
                Some(o) => {
                    gone.push(o.address);
                    Arc::clone(&unchecked)
                }
                None => Arc::clone(&unchecked),
            };
            instances.push(Instance {
                alias,
                address: c.address,
                labels: spec.labels.clone(),
                weight: spec.weight,
                state,
                epoch: spec.epoch,
                tls: spec.tls,
                sni: spec.sni.clone().unwrap_or_else(|| c.host.to_string()),
                metrics: OnceLock::new(),
            });
        }
        gone.extend(old.map(|o| o.address));
        // one lock for the new and moved aliases, not one each
        let mut registry = states.lock();
        let mut index = hashbrown::HashTable::with_capacity(instances.len());
        for at in 0..instances.len() {
            if Arc::ptr_eq(&instances[at].state, &unchecked) {
                instances[at].state = registry.state_for(instances[at].address, build);
            }
            // a BTreeMap's keys are unique: every alias is a new entry
            index.insert_unique(alias_hash(instances[at].alias.as_str()), at, |&i| {
                alias_hash(instances[i].alias.as_str())
            });
        }
        let tls = instances.iter().any(|i| i.tls);
        Ok(Built {
            table: AliasTable {
                version,
                instances,
                index,
                tls,
            },
            build,
            gone,
        })
    }

    /// Whether `specs` would build: every check of `build`, without building anything.
    pub fn validate(specs: &BTreeMap<String, InstanceSpec>) -> Result<(), TableError> {
        specs
            .iter()
            .try_for_each(|(name, spec)| check(name, spec).map(|_| ()))
    }

    /// The index of `alias`, if the table has it.
    #[inline]
    pub fn resolve(&self, alias: &str) -> Option<usize> {
        self.index
            .find(alias_hash(alias), |&i| {
                self.instances[i].alias.as_str() == alias
            })
            .copied()
    }

    /// The instance at `idx` (from `resolve`).
    #[inline]
    pub fn get(&self, idx: usize) -> &Instance {
        &self.instances[idx]
    }

    /// Whether any instance speaks TLS (`tls = true`).
    pub fn any_tls(&self) -> bool {
        self.tls
    }

    /// Every instance, in alias order.
    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }

    /// The version this table was published as (1 for the first).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many aliases.
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// Whether the table is empty (never true for a built table).
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// The table as specs, for `GET /v1/aliases`.
    pub fn specs(&self) -> BTreeMap<String, InstanceSpec> {
        self.instances
            .iter()
            .map(|i| {
                (
                    i.alias.to_string(),
                    InstanceSpec {
                        address: i.address.to_string(),
                        labels: i.labels.clone(),
                        weight: i.weight,
                        prefer: None,
                        tls: false,
                        sni: None,
                        epoch: i.epoch,
                    },
                )
            })
            .collect()
    }
}

/// Holds the current table; `load` is wait-free, `publish` swaps atomically.
#[derive(Debug)]
pub struct TableHolder {
    current: ArcSwap<AliasTable>,
    versions: AtomicU64,
    states: StateRegistry,
}

impl TableHolder {
    /// Builds the first table (version 1).
    pub fn new(specs: &BTreeMap<String, InstanceSpec>) -> Result<Self, TableError> {
        let states = StateRegistry::default();
        let table = AliasTable::build(specs, 1, &states)?;
        Ok(TableHolder {
            current: ArcSwap::from_pointee(table),
            versions: AtomicU64::new(1),
            states,
        })
    }

    /// The current table. Keep the `Arc` for the whole request.
    #[inline]
    pub fn load(&self) -> Arc<AliasTable> {
        self.current.load_full()
    }

    /// Validates and builds a new table and swaps it in; the old one is freed off the request
    /// path (`retire`). On error the old table stays. Publishes must not overlap (the gateway
    /// makes them under its `published` lock): a build takes its states from the table in use,
    /// and forgets the addresses that one had and it did not take.
    pub fn publish(
        &self,
        specs: &BTreeMap<String, InstanceSpec>,
    ) -> Result<Arc<AliasTable>, TableError> {
        let version = self.versions.load(Ordering::SeqCst) + 1;
        let previous = self.current.load_full();
        let built = AliasTable::build_after(specs, version, &self.states, Some(&previous))?;
        drop(previous);
        let table = Arc::new(built.table);
        self.versions.store(version, Ordering::SeqCst);
        crate::retire::later(self.current.swap(Arc::clone(&table)));
        self.states.lock().forget_untaken(&built.gone, built.build);
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(pairs: &[(&str, &str)]) -> BTreeMap<String, InstanceSpec> {
        pairs
            .iter()
            .map(|(a, addr)| (a.to_string(), InstanceSpec::at(addr.to_string())))
            .collect()
    }

    #[test]
    fn aliases_are_validated() {
        assert!(Alias::try_from("cs_1_dev".to_string()).is_ok());
        assert!(Alias::try_from("MTAuMC4wLjE6OTAwMQ==".to_string()).is_ok());
        for bad in ["", "a b", "a--b", "-a", "a-", "a\u{7}"] {
            assert!(Alias::try_from(bad.to_string()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn publish_swaps_and_keeps_health_of_kept_addresses() {
        let holder =
            TableHolder::new(&specs(&[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")])).unwrap();
        let old = holder.load();
        let a_state = Arc::clone(&old.get(old.resolve("a").unwrap()).state);
        let err = holder.publish(&specs(&[("a", "nope")])).unwrap_err();
        assert_eq!(err.field(), "instances.a.address");
        assert_eq!(holder.load().version(), 1, "a bad table leaves the old one");
        let new = holder
            .publish(&specs(&[("a2", "127.0.0.1:1"), ("c", "127.0.0.1:3")]))
            .unwrap();
        assert_eq!(new.version(), 2);
        assert!(Arc::ptr_eq(
            &new.get(new.resolve("a2").unwrap()).state,
            &a_state
        ));
        assert_eq!(new.resolve("b"), None);
        // the old Arc still serves requests that loaded it
        assert_eq!(old.resolve("b"), Some(1));
        // b's address left with b: a table that brings it back starts it afresh
        let b_state = Arc::clone(&old.get(old.resolve("b").unwrap()).state);
        let back = holder.publish(&specs(&[("b", "127.0.0.1:2")])).unwrap();
        assert!(!Arc::ptr_eq(&back.get(0).state, &b_state));
        // and a table with many aliases finds each by its index
        let many: Vec<(String, String)> = (0..1000)
            .map(|i| (format!("cs_{i}"), format!("127.0.0.1:{}", i + 1)))
            .collect();
        let pairs: Vec<(&str, &str)> = many.iter().map(|(a, b)| (&**a, &**b)).collect();
        let big = holder.publish(&specs(&pairs)).unwrap();
        for (alias, address) in &pairs {
            let i = big.resolve(alias).unwrap();
            assert_eq!(big.get(i).alias.as_str(), *alias);
            assert_eq!(big.get(i).address.to_string(), *address);
        }
        assert_eq!(big.resolve("cs_1000"), None);
    }

    /// A new table takes each unchanged alias's state from the old one, and asks the
    /// registry only for the rest; either way an address has one state, and the registry
    /// ends up holding exactly the new table's addresses.
    #[test]
    fn a_new_table_keeps_one_state_per_address_however_it_finds_it() {
        let state =
            |t: &AliasTable, alias: &str| Arc::clone(&t.get(t.resolve(alias).unwrap()).state);
        let registered = |h: &TableHolder| h.states.lock().len();
        let holder = TableHolder::new(&specs(&[
            ("a", "127.0.0.1:1"),
            ("b", "127.0.0.1:1"),
            ("c", "127.0.0.1:2"),
            ("d", "127.0.0.1:3"),
        ]))
        .unwrap();
        let one = holder.load();
        assert!(Arc::ptr_eq(&state(&one, "a"), &state(&one, "b")));
        assert_eq!(registered(&holder), 3);
        // b leaves (a keeps :1), c moves to :4, d leaves, e comes on :2 (c's old
        // address), and f on :1
        let two = holder
            .publish(&specs(&[
                ("a", "127.0.0.1:1"),
                ("c", "127.0.0.1:4"),
                ("e", "127.0.0.1:2"),
                ("f", "127.0.0.1:1"),
            ]))
            .unwrap();
        assert!(Arc::ptr_eq(&state(&two, "a"), &state(&one, "a")));
        assert!(Arc::ptr_eq(&state(&two, "f"), &state(&one, "a")));
        assert!(Arc::ptr_eq(&state(&two, "e"), &state(&one, "c")));
        assert!(!Arc::ptr_eq(&state(&two, "c"), &state(&one, "c")));
        assert_eq!(registered(&holder), 3, ":1, :2 and :4; :3 left with d");
        // a refused table changes nothing: the next one still finds every state
        let err = holder
            .publish(&specs(&[("a", "127.0.0.1:1"), ("z", "nope")]))
            .unwrap_err();
        assert_eq!(err.field(), "instances.z.address");
        let three = holder
            .publish(&specs(&[("d", "127.0.0.1:3"), ("f", "127.0.0.1:1")]))
            .unwrap();
        assert!(Arc::ptr_eq(&state(&three, "f"), &state(&one, "a")));
        assert!(
            !Arc::ptr_eq(&state(&three, "d"), &state(&one, "d")),
            "d starts afresh"
        );
        assert_eq!(registered(&holder), 2, ":1 and :3");
        // the same table again: every state kept, none asked for
        let four = holder
            .publish(&specs(&[("d", "127.0.0.1:3"), ("f", "127.0.0.1:1")]))
            .unwrap();
        for alias in ["d", "f"] {
            assert!(Arc::ptr_eq(&state(&four, alias), &state(&three, alias)));
        }
        assert_eq!(registered(&holder), 2);
    }
}
