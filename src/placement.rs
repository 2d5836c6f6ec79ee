//! Placement of new contexts (requests that carry no HAID): which instance becomes the
//! main and which the backup.
//!
//! `Placement` is the seam for policies. The built-in `LeastLoaded` is the native policy
//! (and the fallback for plugin policies): the least-loaded live instance is the main, and
//! the lowest-load instance among the rest is the backup. `check_choice` is the rule every
//! plugin answer must pass. Pure: no IO, no pingora, no wasmtime.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::aliases::AliasTable;
use crate::health::HealthView;
pub use crate::model::Labels;

/// The facts about the request being placed.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlacementRequest<'a> {
    /// The tenant, from the configured tenant header.
    pub tenant: Option<&'a str>,
    /// The request path.
    pub path: &'a str,
    /// The context id, if the client already has one.
    pub context_id: Option<&'a str>,
    /// Candidate indices that must not be chosen (re-placement).
    pub exclude: &'a [usize],
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
    /// Response-time EWMA in microseconds (0 before the first answer).
    pub latency_ewma_us: u32,
    /// The load the instance last reported itself (`x-hagate-load`), if any.
    pub reported_load: Option<f32>,
    /// Relative capacity; 0 means "place nothing new here".
    pub weight: u32,
    /// Its labels (zone, tenant, ...).
    pub labels: &'a Labels,
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

/// The candidates of one placement: every instance of one alias-table version, in table
/// order. `version` lets a policy cache what it derives from the static facts.
#[derive(Debug, Clone)]
pub struct Candidates<'a> {
    /// The alias-table version the list was built from.
    pub version: u64,
    /// One entry per instance.
    pub list: Vec<Candidate<'a>>,
}

impl<'a> Candidates<'a> {
    /// The candidates of `table` as `health` sees them now.
    pub fn of(table: &'a AliasTable, health: &impl HealthView) -> Self {
        Candidates {
            version: table.version(),
            list: table
                .instances()
                .iter()
                .map(|i| Candidate {
                    alias: i.alias.as_str(),
                    live: health.is_live(i.alias.as_str(), &i.state),
                    inflight: i.state.inflight(),
                    latency_ewma_us: i.state.latency_ewma_us(),
                    reported_load: i.state.reported_load(),
                    weight: i.weight,
                    labels: &i.labels,
                })
                .collect(),
        }
    }
}

/// Why placement found nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// No live instance with a non-zero weight.
    #[error("no live instance can take a new context")]
    NoLiveInstance,
    /// A plugin with fail policy `reject` failed.
    #[error("placement plugin `{plugin}` failed ({reason}) and its fail policy is `reject`")]
    Rejected {
        /// The plugin's name.
        plugin: String,
        /// What went wrong.
        reason: String,
    },
}

/// A placement policy.
pub trait Placement: Send + Sync {
    /// Chooses a main and a backup among `candidates`.
    fn place(
        &self,
        request: &PlacementRequest<'_>,
        candidates: &Candidates<'_>,
    ) -> Result<Choice, PlacementError>;
}

/// Checks a policy's answer (indices as a plugin returns them): the main must be a live,
/// weighted, not-excluded candidate; the backup must be another, not-excluded candidate,
/// and live unless no other candidate is. `Err` says what is wrong.
pub fn check_choice(
    main: u32,
    backup: Option<u32>,
    candidates: &[Candidate<'_>],
    exclude: &[usize],
) -> Result<Choice, String> {
    let n = candidates.len();
    let index = |role: &str, i: u32| -> Result<usize, String> {
        let i = i as usize;
        if i >= n {
            return Err(format!(
                "{role} is instance {i}, which does not exist ({n} candidates): unknown alias"
            ));
        }
        if exclude.contains(&i) {
            return Err(format!("{role} {:?} is excluded", candidates[i].alias));
        }
        Ok(i)
    };
    let m = index("main", main)?;
    let c = &candidates[m];
    if !c.live {
        return Err(format!("main {:?} is not live", c.alias));
    }
    if c.weight == 0 {
        return Err(format!("main {:?} has weight 0", c.alias));
    }
    let other_live = |skip: usize| {
        candidates
            .iter()
            .enumerate()
            .any(|(i, c)| i != m && i != skip && c.live && !exclude.contains(&i))
    };
    let backup = match backup {
        Some(b) => {
            let b = index("backup", b)?;
            if b == m {
                return Err(format!("backup {:?} is also the main", c.alias));
            }
            if !candidates[b].live && other_live(b) {
                return Err(format!(
                    "backup {:?} is not live while another candidate is",
                    candidates[b].alias
                ));
            }
            Some(b)
        }
        None if (0..n).any(|i| i != m && !exclude.contains(&i)) => {
            return Err("no backup, though another candidate could be one".into());
        }
        None => None,
    };
    Ok(Choice { main: m, backup })
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
        request: &PlacementRequest<'_>,
        candidates: &Candidates<'_>,
    ) -> Result<Choice, PlacementError> {
        let ex = request.exclude;
        let candidates = &candidates.list;
        let main = self
            .lowest(candidates, |i, c| {
                c.live && c.weight > 0 && !ex.contains(&i)
            })
            .ok_or(PlacementError::NoLiveInstance)?;
        let zone = candidates[main].labels.get("zone");
        let other_zone = |c: &Candidate| zone.is_none() || c.labels.get("zone") != zone;
        let other = |i: usize| i != main && !ex.contains(&i);
        let backup = self
            .lowest(candidates, |i, c| {
                other(i) && c.live && c.weight > 0 && other_zone(c)
            })
            .or_else(|| self.lowest(candidates, |i, c| other(i) && c.live && c.weight > 0))
            .or_else(|| self.lowest(candidates, |i, c| other(i) && c.live))
            .or_else(|| self.lowest(candidates, |i, _| other(i)));
        Ok(Choice { main, backup })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn cands<'a>(spec: &[(&'a str, bool, u64, u32)], labels: &'a [Labels]) -> Candidates<'a> {
        let list = spec
            .iter()
            .zip(labels)
            .map(|(&(alias, live, inflight, weight), labels)| Candidate {
                alias,
                live,
                inflight,
                latency_ewma_us: 0,
                reported_load: None,
                weight,
                labels,
            })
            .collect();
        Candidates { version: 1, list }
    }

    #[test]
    fn least_loaded_main_and_lowest_load_backup() {
        let p = LeastLoaded::default();
        let none = vec![Labels::default(); 4];
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
        assert_eq!(
            (c.list[r.main].alias, c.list[r.backup.unwrap()].alias),
            ("b", "c")
        );
        // weight scales load; weight 0 is never chosen while another is live
        let c = cands(
            &[("a", true, 4, 4), ("b", true, 2, 1), ("c", true, 0, 0)],
            &none,
        );
        let r = p.place(&Default::default(), &c).unwrap();
        assert_eq!(
            (c.list[r.main].alias, c.list[r.backup.unwrap()].alias),
            ("a", "b")
        );
        // only one live: it is main, the backup is a dead one (so a HAID can still be minted)
        let c = cands(&[("a", false, 0, 1), ("b", true, 9, 1)], &none);
        let r = p.place(&Default::default(), &c).unwrap();
        assert_eq!(
            (c.list[r.main].alias, c.list[r.backup.unwrap()].alias),
            ("b", "a")
        );
        let c = cands(&[("a", false, 0, 1)], &none);
        assert_eq!(
            p.place(&Default::default(), &c),
            Err(PlacementError::NoLiveInstance)
        );
        // excluded instances are never chosen
        let c = cands(
            &[("a", true, 0, 1), ("b", true, 5, 1), ("c", true, 9, 1)],
            &none,
        );
        let req = PlacementRequest {
            exclude: &[0],
            ..Default::default()
        };
        let r = p.place(&req, &c).unwrap();
        assert_eq!((r.main, r.backup), (1, Some(2)));
    }

    #[test]
    fn plugin_answers_are_checked() {
        let none = vec![Labels::default(); 3];
        let c = cands(
            &[("a", true, 0, 1), ("b", false, 0, 1), ("c", true, 0, 0)],
            &none,
        );
        let ok = |m, b| check_choice(m, b, &c.list, &[]);
        assert_eq!(
            ok(0, Some(2)),
            Ok(Choice {
                main: 0,
                backup: Some(2)
            })
        );
        assert!(ok(9, None).unwrap_err().contains("unknown alias"));
        assert!(ok(1, None).unwrap_err().contains("not live"));
        assert!(ok(2, Some(0)).unwrap_err().contains("weight 0"));
        assert!(ok(0, Some(0)).unwrap_err().contains("also the main"));
        assert!(ok(0, Some(1))
            .unwrap_err()
            .contains("not live while another"));
        assert!(ok(0, None).unwrap_err().contains("no backup"));
        assert!(check_choice(0, Some(2), &c.list, &[2])
            .unwrap_err()
            .contains("excluded"));
        // a dead backup is accepted when no other candidate is live
        assert_eq!(
            check_choice(0, Some(1), &c.list, &[2]),
            Ok(Choice {
                main: 0,
                backup: Some(1)
            })
        );
        let one = cands(&[("a", true, 0, 1)], &none[..1]);
        assert_eq!(
            check_choice(0, None, &one.list, &[]),
            Ok(Choice {
                main: 0,
                backup: None
            })
        );
    }

    #[test]
    fn ties_spread_evenly_and_backup_prefers_another_zone() {
        let p = LeastLoaded::default();
        let z = |v: &str| Labels::from([("zone".to_string(), v.to_string())]);
        let labels = [z("a"), z("a"), z("b")];
        let c = cands(
            &[("x", true, 0, 1), ("y", true, 0, 1), ("w", true, 0, 1)],
            &labels,
        );
        let mut mains = BTreeMap::new();
        for _ in 0..300 {
            let r = p.place(&Default::default(), &c).unwrap();
            *mains.entry(c.list[r.main].alias).or_insert(0) += 1;
            let (m, b) = (&c.list[r.main], &c.list[r.backup.unwrap()]);
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
