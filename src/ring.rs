//! Re-placement: when both instances of a HAID are dead and no standby holds either alias,
//! a consistent-hash ring over the live instances, keyed by the context id, names a
//! replacement. Every gateway with the same table and the same health verdicts picks the
//! same one, and a change of the live set moves only about K/n of the keys.
//!
//! The ring is `hashring`'s (SipHash with fixed keys, so it is the same in every gateway
//! process), with `VNODES` virtual nodes per instance, hashed by alias. It is rebuilt only
//! when the table version or the live set changes. No pingora here.

use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use hashring::HashRing;

use crate::aliases::AliasTable;
use crate::health::HealthView;

/// Virtual nodes per instance: about 10% spread of load between instances.
pub const VNODES: u32 = 100;

/// One virtual node: hashed by alias and replica number only.
#[derive(Debug, Clone)]
struct VNode {
    alias: Box<str>,
    replica: u32,
    index: usize,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.alias.hash(state);
        self.replica.hash(state);
    }
}

/// A ring over `members` (index, alias).
fn build<'a>(members: impl Iterator<Item = (usize, &'a str)>) -> HashRing<VNode> {
    let mut ring = HashRing::new();
    let nodes: Vec<VNode> = members
        .flat_map(|(index, alias)| {
            (0..VNODES).map(move |replica| VNode {
                alias: alias.into(),
                replica,
                index,
            })
        })
        .collect();
    ring.batch_add(nodes);
    ring
}

struct Cached {
    version: u64,
    live: Vec<bool>,
    ring: HashRing<VNode>,
}

/// The replacement ring of a gateway, cached per (table version, live set).
#[derive(Default)]
pub struct ReplacementRing {
    cache: Mutex<Option<Cached>>,
}

impl ReplacementRing {
    /// The live instance of `table` that `context_id` maps to, if any is live.
    pub fn pick(
        &self,
        table: &AliasTable,
        health: &impl HealthView,
        context_id: &str,
    ) -> Option<usize> {
        let live: Vec<bool> = table
            .instances()
            .iter()
            .map(|i| health.is_live(i.alias.as_str(), &i.state))
            .collect();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let stale = cache
            .as_ref()
            .is_none_or(|c| c.version != table.version() || c.live != live);
        if stale {
            let ring = build(
                table
                    .instances()
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| live[*i])
                    .map(|(i, inst)| (i, inst.alias.as_str())),
            );
            *cache = Some(Cached {
                version: table.version(),
                live,
                ring,
            });
        }
        cache.as_ref()?.ring.get(&context_id).map(|v| v.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(ring: &HashRing<VNode>, key: &str) -> usize {
        ring.get(&key).unwrap().index
    }

    #[test]
    fn removing_one_of_n_moves_about_k_over_n_keys_and_only_its_own() {
        let aliases: Vec<String> = (0..10).map(|i| format!("cs_{i}")).collect();
        let all = build(aliases.iter().enumerate().map(|(i, a)| (i, a.as_str())));
        let without_3 = build(
            aliases
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 3)
                .map(|(i, a)| (i, a.as_str())),
        );
        let keys: Vec<String> = (0..20_000).map(|k| (1_000_000 + k).to_string()).collect();
        let mut moved = 0;
        let mut per_node = [0usize; 10];
        for k in &keys {
            let (before, after) = (owner(&all, k), owner(&without_3, k));
            per_node[before] += 1;
            if before != after {
                assert_eq!(before, 3, "key {k} moved from a node that stayed");
                moved += 1;
            }
        }
        let expected = keys.len() / 10;
        assert!(
            moved > expected / 2 && moved < expected * 3 / 2,
            "moved {moved}, about {expected} expected"
        );
        // 100 virtual nodes each: no instance gets more than twice its share
        assert!(per_node.iter().all(|&n| n < 2 * expected), "{per_node:?}");
    }
}
