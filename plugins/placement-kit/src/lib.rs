//! Plain-Rust placement helpers shared by hagate's example plugins.
//!
//! Nothing here knows the WIT types: each plugin converts its generated bindings into
//! `Node`s (a few lines) and calls `choose`. That keeps the policy logic testable with
//! `cargo test` on the host, and the same in every plugin.
//!
//! The kit speaks `hagate:policy@0.2.0` (`wit/v0.2`): `facts` reads `place`'s flat
//! `loads` list.

pub use fastrand::Rng;

/// The per-call facts about one instance, as `place`'s `loads` carry them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadFacts {
    /// Live according to the gateway.
    pub live: bool,
    /// Must not be chosen in this call.
    pub excluded: bool,
    /// Requests in flight.
    pub inflight: u32,
    /// Response-time EWMA in microseconds.
    pub latency_us: u32,
    /// Self-reported load.
    pub reported: Option<f32>,
}

/// The static facts a plugin keeps from `set-instances`: weights and labels, by index.
#[derive(Debug, Clone, Default)]
pub struct Known {
    weights: Vec<u32>,
    labels: Vec<Vec<(String, String)>>,
    /// Each instance's `zone` label, looked up once per table, not once per call.
    zones: Vec<Option<String>>,
}

impl Known {
    /// Builds from `(weight, labels)` pairs in instance order.
    pub fn new(instances: impl Iterator<Item = (u32, Vec<(String, String)>)>) -> Known {
        let (weights, labels): (Vec<u32>, Vec<Vec<(String, String)>>) = instances.unzip();
        let zones = labels
            .iter()
            .map(|l| l.iter().find(|(k, _)| k == "zone").map(|(_, v)| v.clone()))
            .collect();
        Known {
            weights,
            labels,
            zones,
        }
    }

    /// The value of label `key` of instance `i`.
    pub fn label(&self, i: usize, key: &str) -> Option<&str> {
        self.labels
            .get(i)?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// One `Node` per instance in `loads` (an index past the known instances gets
    /// weight 0).
    pub fn nodes(&self, loads: impl Iterator<Item = LoadFacts>) -> Vec<Node<'_>> {
        loads
            .enumerate()
            .map(|(i, l)| Node {
                live: l.live,
                weight: self.weights.get(i).copied().unwrap_or(0),
                inflight: l.inflight,
                latency_us: l.latency_us,
                reported: l.reported,
                zone: self.zones.get(i).and_then(|z| z.as_deref()),
                excluded: l.excluded,
            })
            .collect()
    }
}

/// The numbers per instance in `place`'s `loads` (0.2).
pub const WORDS: usize = 4;
/// The flags word's bits (`loads[4*i]`).
const LIVE: u32 = 1;
const EXCLUDED: u32 = 2;
const REPORTED: u32 = 4;

/// The facts of each instance in `place`'s `loads` (0.2: four numbers per instance, the
/// layout in `wit/v0.2/placement.wit`), in instance order.
pub fn facts(loads: &[u32]) -> impl Iterator<Item = LoadFacts> + '_ {
    loads.chunks_exact(WORDS).map(|w| LoadFacts {
        live: w[0] & LIVE != 0,
        excluded: w[0] & EXCLUDED != 0,
        inflight: w[1],
        latency_us: w[2],
        reported: (w[0] & REPORTED != 0).then(|| f32::from_bits(w[3])),
    })
}

/// Reads a plugin's JSON config; blank text gives the defaults.
pub fn parse_config<T: Default + for<'de> serde::Deserialize<'de>>(
    text: &str,
) -> Result<T, String> {
    if text.trim().is_empty() {
        return Ok(T::default());
    }
    serde_json::from_str(text).map_err(|e| format!("config: {e}"))
}

/// What a policy needs to know about one instance for one call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Node<'a> {
    /// Live according to the gateway's health checks.
    pub live: bool,
    /// Relative capacity; 0 takes no new contexts.
    pub weight: u32,
    /// Requests in flight through the gateway.
    pub inflight: u32,
    /// Response-time EWMA in microseconds.
    pub latency_us: u32,
    /// Load the instance reported itself.
    pub reported: Option<f32>,
    /// Its `zone` label.
    pub zone: Option<&'a str>,
    /// In the call's exclude set.
    pub excluded: bool,
}

/// Which load figure ranks instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Metric {
    /// In-flight requests divided by weight (the default).
    #[default]
    Inflight,
    /// Response-time EWMA divided by weight.
    Latency,
    /// The instance's own reported load; instances that reported nothing rank by inflight
    /// after every instance that did.
    Reported,
}

impl Metric {
    /// Parses `"inflight"`, `"latency"` or `"reported"`.
    pub fn parse(s: &str) -> Result<Metric, String> {
        match s {
            "inflight" => Ok(Metric::Inflight),
            "latency" => Ok(Metric::Latency),
            "reported" => Ok(Metric::Reported),
            other => Err(format!(
                "unknown metric {other:?}: use \"inflight\", \"latency\" or \"reported\""
            )),
        }
    }

    /// The load of `n` (lower is better), as a pair compared in order.
    pub fn score(self, n: &Node) -> (f64, f64) {
        let w = f64::from(n.weight.max(1));
        let inflight = f64::from(n.inflight) / w;
        match self {
            Metric::Inflight => (inflight, 0.0),
            Metric::Latency => (f64::from(n.latency_us) / w, inflight),
            Metric::Reported => match n.reported {
                Some(r) if r.is_finite() => (0.0, f64::from(r)),
                _ => (1.0, inflight),
            },
        }
    }
}

/// Whether `n` may be a main: live, weighted, not excluded.
pub fn can_take(n: &Node) -> bool {
    n.live && n.weight > 0 && !n.excluded
}

/// The index of the lowest-load node among those `eligible` accepts. Ties are broken
/// uniformly at random (reservoir sampling over the tied nodes, in one pass).
pub fn lowest(
    nodes: &[Node],
    metric: Metric,
    rng: &mut fastrand::Rng,
    eligible: impl Fn(usize, &Node) -> bool,
) -> Option<usize> {
    let mut best: Option<((f64, f64), usize)> = None;
    let mut ties = 0u32;
    for (i, n) in nodes.iter().enumerate() {
        if !eligible(i, n) {
            continue;
        }
        let s = metric.score(n);
        match best {
            Some((b, _)) if s > b => {}
            Some((b, _)) if s == b => {
                ties += 1;
                if rng.u32(0..ties) == 0 {
                    best = Some((s, i));
                }
            }
            _ => {
                best = Some((s, i));
                ties = 1;
            }
        }
    }
    best.map(|(_, i)| i)
}

/// The main from `pool`, and the backup from the rest: the lowest-load node of `pool`
/// (preferring another zone), else of `spill`, a wider pool (again preferring another
/// zone), else any other live node, else any other node that is not excluded (so a HAID
/// can still be minted).
pub fn choose(
    nodes: &[Node],
    metric: Metric,
    rng: &mut fastrand::Rng,
    pool: impl Fn(usize) -> bool,
    spill: impl Fn(usize) -> bool,
) -> Option<(usize, Option<usize>)> {
    let main = lowest(nodes, metric, rng, |i, n| pool(i) && can_take(n))?;
    let zone = nodes[main].zone;
    let other = |i: usize, n: &Node| i != main && can_take(n);
    let far = |n: &Node| zone.is_some() && n.zone != zone;
    let backup = lowest(nodes, metric, rng, |i, n| other(i, n) && pool(i) && far(n))
        .or_else(|| lowest(nodes, metric, rng, |i, n| other(i, n) && pool(i)))
        .or_else(|| lowest(nodes, metric, rng, |i, n| other(i, n) && spill(i) && far(n)))
        .or_else(|| lowest(nodes, metric, rng, |i, n| other(i, n) && spill(i)))
        .or_else(|| {
            lowest(nodes, metric, rng, |i, n| {
                i != main && n.live && !n.excluded
            })
        })
        .or_else(|| lowest(nodes, metric, rng, |i, n| i != main && !n.excluded));
    Some((main, backup))
}

/// Expands, inside a plugin crate (after `wit_bindgen::generate!`), to the conversion
/// from the generated instance records: `known(instances) -> Known`.
#[macro_export]
macro_rules! conversions {
    () => {
        fn known(instances: Vec<hagate::policy::types::Instance>) -> $crate::Known {
            $crate::Known::new(instances.into_iter().map(|i| {
                let labels = i.labels.into_iter().map(|l| (l.key, l.value)).collect();
                (i.weight, labels)
            }))
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(inflight: u32, zone: &'static str) -> Node<'static> {
        Node {
            live: true,
            weight: 1,
            inflight,
            latency_us: 0,
            reported: None,
            zone: Some(zone),
            excluded: false,
        }
    }

    #[test]
    fn facts_reads_four_words_per_instance() {
        let loads = [
            LIVE,
            3,
            700,
            0,
            REPORTED | EXCLUDED,
            9,
            0,
            0.25f32.to_bits(),
            LIVE,
            1,
        ];
        let got: Vec<LoadFacts> = facts(&loads).collect();
        assert_eq!(
            got,
            [
                LoadFacts {
                    live: true,
                    excluded: false,
                    inflight: 3,
                    latency_us: 700,
                    reported: None,
                },
                LoadFacts {
                    live: false,
                    excluded: true,
                    inflight: 9,
                    latency_us: 0,
                    reported: Some(0.25),
                },
            ],
            "a trailing partial instance is ignored"
        );
        let known = Known::new([(2, vec![("zone".into(), "a".into())])].into_iter());
        let nodes = known.nodes(got.into_iter());
        assert_eq!((nodes[0].weight, nodes[0].zone), (2, Some("a")));
        assert_eq!((nodes[1].weight, nodes[1].excluded), (0, true));
    }

    #[test]
    fn ties_are_uniform() {
        let nodes = [node(1, "a"), node(1, "a"), node(1, "b"), node(2, "b")];
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts = [0u32; 4];
        for _ in 0..3000 {
            counts[lowest(&nodes, Metric::Inflight, &mut rng, |_, _| true).unwrap()] += 1;
        }
        assert_eq!(counts[3], 0);
        for c in &counts[..3] {
            assert!((850..=1150).contains(c), "{counts:?}");
        }
    }

    #[test]
    fn backup_prefers_another_zone_then_spills() {
        let nodes = [node(0, "a"), node(1, "a"), node(5, "b")];
        let mut rng = fastrand::Rng::with_seed(1);
        let all = |_| true;
        assert_eq!(
            choose(&nodes, Metric::Inflight, &mut rng, all, all),
            Some((0, Some(2)))
        );
        // pool {0}: nothing else in the pool, so the backup spills to the wider pool,
        // still preferring another zone
        let only0 = |i| i == 0;
        assert_eq!(
            choose(&nodes, Metric::Inflight, &mut rng, only0, all),
            Some((0, Some(2)))
        );
        let only01 = |i| i < 2;
        assert_eq!(
            choose(&nodes, Metric::Inflight, &mut rng, only0, only01),
            Some((0, Some(1)))
        );
        let mut dead = nodes;
        dead[1].live = false;
        dead[2].live = false;
        assert_eq!(
            choose(&dead, Metric::Inflight, &mut rng, all, all)
                .unwrap()
                .0,
            0
        );
        dead[0].excluded = true;
        assert_eq!(choose(&dead, Metric::Inflight, &mut rng, all, all), None);
    }
}
