//! The published table: the static table merged with the live holders (pure). `merge`
//! builds it whole; `changed_holdings` and `patch` bring a published table up to date when
//! only some holdings changed over the same static table, touching those aliases alone. At
//! 100k holders a whole merge copies every entry, for each claim or takeover.

use std::sync::Arc;

use crate::model::{InstanceSpec, Labels, Prefer, Specs};
use crate::store::Entry;

/// The table to publish: `statics`, with each alias that has a live holder pointed at the
/// holder (unless it prefers its static address), plus aliases only membership knows.
/// A holder's address carries its epoch. Without a holder that changes anything, the result
/// is `statics` itself, not a copy.
pub fn merge(statics: &Specs, holders: &[Entry], default: Prefer) -> Specs {
    let mut merged = Arc::clone(statics);
    for h in holders {
        if let Some(spec) = held(merged.get(h.alias.as_str()), h, default) {
            set(Arc::make_mut(&mut merged), h.alias.as_str(), spec);
        }
    }
    merged
}

/// What holder `h` makes of its alias's entry `spec`: `None` when it changes nothing (the
/// entry prefers its static address, or already points at the holder).
fn held(spec: Option<&InstanceSpec>, h: &Entry, default: Prefer) -> Option<InstanceSpec> {
    match spec {
        Some(s) if s.prefer.unwrap_or(default) == Prefer::Static => None,
        Some(s) if s.address == h.address && s.epoch == Some(h.epoch) => None,
        Some(s) => Some(InstanceSpec {
            address: h.address.clone(),
            epoch: Some(h.epoch),
            ..s.clone()
        }),
        None => Some(InstanceSpec {
            address: h.address.clone(),
            labels: Labels::default(),
            weight: 1,
            prefer: None,
            tls: false,
            sni: None,
            epoch: Some(h.epoch),
        }),
    }
}

/// Sets `alias`'s entry, without a new key when it has one.
fn set(
    map: &mut std::collections::BTreeMap<String, InstanceSpec>,
    alias: &str,
    spec: InstanceSpec,
) {
    match map.get_mut(alias) {
        Some(s) => *s = spec,
        None => {
            map.insert(alias.to_string(), spec);
        }
    }
}

/// Whether two holders hold the same alias at the same address in the same holding (epoch):
/// all a merge reads of a holder. A renewal changes none of them.
pub fn same_holding(a: &Entry, b: &Entry) -> bool {
    a.alias == b.alias && a.address == b.address && a.epoch == b.epoch
}

/// The aliases whose holding differs between `before` and `after` (changed, gone or new),
/// when both are sorted by alias with no alias twice, as the stores list them; `None`
/// otherwise, and then only a whole `merge` is right.
pub fn changed_holdings<'a>(before: &'a [Entry], after: &'a [Entry]) -> Option<Vec<&'a str>> {
    let sorted = |hs: &[Entry]| {
        hs.windows(2)
            .all(|w| w[0].alias.as_str() < w[1].alias.as_str())
    };
    if !sorted(before) || !sorted(after) {
        return None;
    }
    let (mut b, mut a) = (before.iter().peekable(), after.iter().peekable());
    let mut changed = Vec::new();
    loop {
        match (b.peek(), a.peek()) {
            (None, None) => return Some(changed),
            (Some(x), Some(y)) if x.alias == y.alias => {
                if !same_holding(x, y) {
                    changed.push(y.alias.as_str());
                }
                b.next();
                a.next();
            }
            (Some(x), Some(y)) if x.alias.as_str() > y.alias.as_str() => {
                changed.push(y.alias.as_str()); // new
                a.next();
            }
            (None, Some(y)) => {
                changed.push(y.alias.as_str()); // new
                a.next();
            }
            (Some(x), _) => {
                changed.push(x.alias.as_str()); // gone
                b.next();
            }
        }
    }
}

/// What `patch` replaced: each alias it touched and the entry it had, to put back.
#[derive(Debug, Default)]
pub struct Undo(Vec<(String, Option<InstanceSpec>)>);

impl Undo {
    /// Whether the patch changed nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Puts back what the patch replaced.
    pub fn revert(self, merged: &mut Specs) {
        let map = Arc::make_mut(merged);
        for (alias, old) in self.0.into_iter().rev() {
            match old {
                Some(spec) => set(map, &alias, spec),
                None => {
                    map.remove(&alias);
                }
            }
        }
    }
}

/// Brings `merged`, the `merge` of `statics` with some earlier holders, up to the merge of
/// `statics` with `holders` (sorted by alias), where the two sets of holders differ only in
/// `changed` (`changed_holdings`): each alias in `changed` gets the entry a whole merge would
/// give it, and no other is touched. In place: with `merged` held nowhere else, nothing is
/// copied. Returns what it replaced.
pub fn patch(
    merged: &mut Specs,
    statics: &Specs,
    holders: &[Entry],
    changed: &[&str],
    default: Prefer,
) -> Undo {
    let mut undo = Undo::default();
    for &alias in changed {
        let fixed = statics.get(alias);
        let holder = holders
            .binary_search_by(|h| h.alias.as_str().cmp(alias))
            .ok()
            .map(|i| &holders[i]);
        let want = holder
            .and_then(|h| held(fixed, h, default))
            .or_else(|| fixed.cloned());
        if merged.get(alias) == want.as_ref() {
            continue;
        }
        let map = Arc::make_mut(merged);
        let old = match want {
            Some(spec) => map.insert(alias.to_string(), spec),
            None => map.remove(alias),
        };
        undo.0.push((alias.to_string(), old));
    }
    undo
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::Alias;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A spec at `address` with a label and weight 2 (the gateway's tests use it too).
    pub(crate) fn spec(address: &str, prefer: Option<Prefer>) -> InstanceSpec {
        InstanceSpec {
            address: address.into(),
            labels: Labels::from([("zone".to_string(), "a".to_string())]),
            weight: 2,
            prefer,
            tls: false,
            sni: None,
            epoch: None,
        }
    }

    /// A holder of `alias` at `address` in holding `epoch`.
    pub(crate) fn holder(alias: &str, address: &str, epoch: u64) -> Entry {
        Entry {
            uuid: format!("u-{alias}"),
            alias: Alias::try_from(alias.to_string()).unwrap(),
            address: address.into(),
            timestamp_ms: 0,
            revision: 1,
            epoch,
        }
    }

    #[test]
    fn holders_win_unless_the_alias_prefers_its_static_address() {
        let statics = Arc::new(BTreeMap::from([
            ("cs_1".to_string(), spec("127.0.0.1:1", None)),
            (
                "cs_2".to_string(),
                spec("127.0.0.1:2", Some(Prefer::Static)),
            ),
            ("cs_3".to_string(), spec("127.0.0.1:3", None)),
        ]));
        let holders = [
            holder("cs_1", "127.0.0.1:11", 1),
            holder("cs_2", "127.0.0.1:12", 1),
            holder("cs_9", "127.0.0.1:19", 1),
        ];
        let m = merge(&statics, &holders, Prefer::Membership);
        assert_eq!(m["cs_1"].address, "127.0.0.1:11");
        assert_eq!(m["cs_1"].labels, statics["cs_1"].labels, "labels stay");
        assert_eq!(m["cs_2"].address, "127.0.0.1:2", "prefer = static");
        assert_eq!(m["cs_3"].address, "127.0.0.1:3", "no holder: static");
        assert_eq!(m["cs_9"].address, "127.0.0.1:19", "membership-only alias");
        assert_eq!(
            statics["cs_1"].address, "127.0.0.1:1",
            "the statics are not touched"
        );
        // nothing to change: the static map itself, not a copy
        assert!(Arc::ptr_eq(
            &merge(&statics, &[], Prefer::Membership),
            &statics
        ));
        let only_static = [holder("cs_2", "127.0.0.1:12", 1)];
        assert!(Arc::ptr_eq(
            &merge(&statics, &only_static, Prefer::Membership),
            &statics
        ));
        assert!(Arc::ptr_eq(&merge(&m, &holders, Prefer::Membership), &m));
        // the global default can prefer static, and an alias can still prefer membership
        let mut statics = statics;
        Arc::make_mut(&mut statics).get_mut("cs_3").unwrap().prefer = Some(Prefer::Membership);
        let m = merge(
            &statics,
            &[
                holder("cs_1", "127.0.0.1:11", 1),
                holder("cs_3", "127.0.0.1:13", 1),
            ],
            Prefer::Static,
        );
        assert_eq!(
            (m["cs_1"].address.as_str(), m["cs_3"].address.as_str()),
            ("127.0.0.1:1", "127.0.0.1:13")
        );
    }

    #[test]
    fn a_patch_touches_only_the_changed_aliases_and_copies_nothing() {
        let statics = Arc::new(BTreeMap::from([(
            "cs_1".to_string(),
            spec("127.0.0.1:1", None),
        )]));
        let before = [
            holder("cs_1", "127.0.0.1:11", 1),
            holder("cs_5", "127.0.0.1:15", 2),
            holder("cs_7", "127.0.0.1:17", 3),
        ];
        // cs_1 renewed (a new revision and timestamp, the same holding), cs_5 taken over,
        // cs_7 gone, cs_8 new
        let mut renewed = before[0].clone();
        renewed.revision = 9;
        renewed.timestamp_ms = 99;
        let after = [
            renewed,
            holder("cs_5", "127.0.0.1:25", 4),
            holder("cs_8", "127.0.0.1:18", 5),
        ];
        let changed = changed_holdings(&before, &after).unwrap();
        assert_eq!(changed, ["cs_5", "cs_7", "cs_8"]);
        let mut merged = merge(&statics, &before, Prefer::Membership);
        let map = Arc::as_ptr(&merged);
        let undo = patch(&mut merged, &statics, &after, &changed, Prefer::Membership);
        assert_eq!(merged, merge(&statics, &after, Prefer::Membership));
        assert_eq!(Arc::as_ptr(&merged), map, "patched in place, not copied");
        undo.revert(&mut merged);
        assert_eq!(merged, merge(&statics, &before, Prefer::Membership));
        // unsorted or repeated holders: no patch
        let unsorted = [after[1].clone(), after[0].clone()];
        assert_eq!(changed_holdings(&before, &unsorted), None);
        let twice = [after[0].clone(), after[0].clone()];
        assert_eq!(changed_holdings(&twice, &after), None);
    }

    /// Holders over the aliases `a0`..`a5`, sorted, each at most once.
    fn holders() -> impl Strategy<Value = Vec<Entry>> {
        proptest::collection::btree_map(0..6u8, (0..3u8, 1..4u64), 0..6).prop_map(|m| {
            m.into_iter()
                .map(|(a, (port, epoch))| {
                    holder(&format!("a{a}"), &format!("127.0.0.1:{port}"), epoch)
                })
                .collect()
        })
    }

    fn statics() -> impl Strategy<Value = Specs> {
        let prefer = prop_oneof![
            Just(None),
            Just(Some(Prefer::Static)),
            Just(Some(Prefer::Membership))
        ];
        proptest::collection::btree_map(0..6u8, (0..3u8, prefer), 0..6).prop_map(|m| {
            Arc::new(
                m.into_iter()
                    .map(|(a, (port, prefer))| {
                        (format!("a{a}"), spec(&format!("127.0.0.1:{port}"), prefer))
                    })
                    .collect(),
            )
        })
    }

    proptest! {
        /// Patching the merge with the earlier holders gives the whole merge with the new
        /// ones, and reverting gives the earlier merge back.
        #[test]
        fn a_patch_is_the_whole_merge(
            statics in statics(),
            before in holders(),
            after in holders(),
            membership in any::<bool>(),
        ) {
            let default = if membership { Prefer::Membership } else { Prefer::Static };
            let changed = changed_holdings(&before, &after).expect("sorted, each alias once");
            let earlier = merge(&statics, &before, default);
            let mut merged = earlier.clone();
            let undo = patch(&mut merged, &statics, &after, &changed, default);
            let whole = merge(&statics, &after, default);
            prop_assert_eq!(&merged, &whole);
            prop_assert_eq!(undo.is_empty(), earlier == whole);
            undo.revert(&mut merged);
            prop_assert_eq!(merged, earlier);
        }
    }
}
