//! Placement of new contexts (requests that carry no HAID): which instance becomes the
//! main and which the backup.
//!
//! `Placement` is the seam for policies. The built-in `LeastLoaded` is the native policy
//! (and the fallback for plugin policies): the least-loaded live instance is the main, and
//! the lowest-load instance among the rest is the backup. Pure: no IO, no pingora.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The facts about the request being placed.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlacementRequest<'a> {
    /// The tenant, from the configured tenant header.
    pub tenant: Option<&'a str>,
    /// The request path.
    pub path: &'a str,
    /// The context id, if the client already has one.
    pub context_id: Option<&'a str>,
}

/// One instance placement may choose.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// Its alias.
    pub alias: &'a str,
    /// Whether health says it is live.
    pub live: bool,
    /// Requests in flight to it through this gateway.
    pub inflight: u64,
    /// Relative capacity; 0 means "place nothing new here".
    pub weight: u32,
    /// Its labels (zone, tenant, ...).
    pub labels: &'a BTreeMap<String, String>,
}

impl Candidate<'_> {
    /// Load relative to weight, comparable across candidates.
    fn load(&self) -> f64 {
        self.inflight as f64 / f64::from(self.weight.max(1))
    }
}

/// A placement: indices into the candidate slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// The main instance.
    pub main: usize,
    /// The backup instance, when there is another instance.
    pub backup: Option<usize>,
}

/// Why placement found nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// No live instance with a non-zero weight.
    #[error("no live instance can take a new context")]
    NoLiveInstance,
}

/// A placement policy.
pub trait Placement: Send + Sync {
    /// Chooses a main and a backup among `candidates`.
    fn place(
        &self,
        request: &PlacementRequest<'_>,
        candidates: &[Candidate<'_>],
    ) -> Result<Choice, PlacementError>;
}

/// The native policy: least-loaded main, lowest-load backup among the rest (live ones
/// first, and preferring another `zone` label), ties taken in turn so they spread evenly.
#[derive(Debug, Default)]
pub struct LeastLoaded {
    turn: AtomicUsize,
}

impl LeastLoaded {
    /// The index among `eligible` with the lowest load; ties rotate with `turn`.
    fn lowest<'c>(
        &self,
        candidates: &[Candidate<'c>],
        eligible: impl Fn(usize, &Candidate<'c>) -> bool,
    ) -> Option<usize> {
        let mut best: Option<f64> = None;
        let mut ties = 0usize;
        for (i, c) in candidates.iter().enumerate() {
            if !eligible(i, c) {
                continue;
            }
            match best {
                Some(b) if c.load() > b => {}
                Some(b) if c.load() == b => ties += 1,
                _ => {
                    best = Some(c.load());
                    ties = 1;
                }
            }
        }
        let best = best?;
        let pick = self.turn.fetch_add(1, Ordering::Relaxed) % ties;
        candidates
            .iter()
            .enumerate()
            .filter(|(i, c)| eligible(*i, c) && c.load() == best)
            .nth(pick)
            .map(|(i, _)| i)
    }
}

impl Placement for LeastLoaded {
    fn place(
        &self,
        _request: &PlacementRequest<'_>,
        candidates: &[Candidate<'_>],
    ) -> Result<Choice, PlacementError> {
        let main = self
            .lowest(candidates, |_, c| c.live && c.weight > 0)
            .ok_or(PlacementError::NoLiveInstance)?;
        let zone = candidates[main].labels.get("zone");
        let other_zone = |c: &Candidate| zone.is_none() || c.labels.get("zone") != zone;
        let backup = self
            .lowest(candidates, |i, c| {
                i != main && c.live && c.weight > 0 && other_zone(c)
            })
            .or_else(|| self.lowest(candidates, |i, c| i != main && c.live && c.weight > 0))
            .or_else(|| self.lowest(candidates, |i, _| i != main));
        Ok(Choice { main, backup })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands<'a>(
        spec: &[(&'a str, bool, u64, u32)],
        labels: &'a [BTreeMap<String, String>],
    ) -> Vec<Candidate<'a>> {
        spec.iter()
            .zip(labels)
            .map(|(&(alias, live, inflight, weight), labels)| Candidate {
                alias,
                live,
                inflight,
                weight,
                labels,
            })
            .collect()
    }

    #[test]
    fn least_loaded_main_and_lowest_load_backup() {
        let p = LeastLoaded::default();
        let none = vec![BTreeMap::new(); 4];
        let c = cands(
            &[
                ("a", true, 5, 1),
                ("b", true, 1, 1),
                ("c", true, 3, 1),
                ("d", false, 0, 1),
            ],
            &none,
        );
        let r = p.place(&Default::default(), &c).unwrap();
        assert_eq!((c[r.main].alias, c[r.backup.unwrap()].alias), ("b", "c"));
        // weight scales load; weight 0 is never chosen while another is live
        let c = cands(
            &[("a", true, 4, 4), ("b", true, 2, 1), ("c", true, 0, 0)],
            &none,
        );
        let r = p.place(&Default::default(), &c).unwrap();
        assert_eq!((c[r.main].alias, c[r.backup.unwrap()].alias), ("a", "b"));
        // only one live: it is main, the backup is a dead one (so a HAID can still be minted)
        let c = cands(&[("a", false, 0, 1), ("b", true, 9, 1)], &none);
        let r = p.place(&Default::default(), &c).unwrap();
        assert_eq!((c[r.main].alias, c[r.backup.unwrap()].alias), ("b", "a"));
        let c = cands(&[("a", false, 0, 1)], &none);
        assert_eq!(
            p.place(&Default::default(), &c),
            Err(PlacementError::NoLiveInstance)
        );
    }

    #[test]
    fn ties_spread_evenly_and_backup_prefers_another_zone() {
        let p = LeastLoaded::default();
        let z = |v: &str| BTreeMap::from([("zone".to_string(), v.to_string())]);
        let labels = [z("a"), z("a"), z("b")];
        let c = cands(
            &[("x", true, 0, 1), ("y", true, 0, 1), ("w", true, 0, 1)],
            &labels,
        );
        let mut mains = BTreeMap::new();
        for _ in 0..300 {
            let r = p.place(&Default::default(), &c).unwrap();
            *mains.entry(c[r.main].alias).or_insert(0) += 1;
            let (m, b) = (&c[r.main], &c[r.backup.unwrap()]);
            assert_ne!(
                m.labels.get("zone"),
                b.labels.get("zone"),
                "{} {}",
                m.alias,
                b.alias
            );
        }
        assert_eq!(mains.len(), 3);
        assert!(
            mains.values().all(|&n| (60..=140).contains(&n)),
            "{mains:?}"
        );
    }
}
