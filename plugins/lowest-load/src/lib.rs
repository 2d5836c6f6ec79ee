//! `lowest-load`: the main is the least-loaded live instance, and the backup the
//! lowest-load live instance among the rest, preferring another `zone` label. Ties are
//! broken uniformly at random, as the Linkis design asks.
//!
//! Config (JSON, every field optional): `{"metric": "inflight" | "latency" | "reported"}`.

use std::cell::RefCell;

use placement_kit::{choose, facts, parse_config, Known, Metric, Rng};

wit_bindgen::generate!({ path: "../../wit/v0.2", world: "placement" });

placement_kit::conversions!();

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    metric: Option<String>,
}

#[derive(Default)]
struct State {
    metric: Metric,
    known: Known,
    rng: Rng,
    /// Why the last `place` returned `none`.
    why: &'static str,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::default();
}

struct LowestLoad;

impl Guest for LowestLoad {
    fn configure(config: String) -> Result<Wants, String> {
        let c: Config = parse_config(&config)?;
        let metric = Metric::parse(c.metric.as_deref().unwrap_or("inflight"))?;
        STATE.with_borrow_mut(|s| s.metric = metric);
        // Nothing of the request: the loads decide.
        Ok(Wants::empty())
    }

    fn set_instances(instances: Vec<Instance>) {
        let known = known(instances);
        STATE.with_borrow_mut(|s| s.known = known);
    }

    fn place(_request: Request, loads: Vec<u32>) -> Option<Choice> {
        STATE.with_borrow_mut(|s| {
            let nodes = s.known.nodes(facts(&loads));
            let all = |_| true;
            let Some((main, backup)) = choose(&nodes, s.metric, &mut s.rng, all, all) else {
                s.why = "no live instance can take a new context";
                return None;
            };
            Some(Choice {
                main: main as u32,
                backup: backup.map(|b| b as u32),
            })
        })
    }

    fn why() -> String {
        STATE.with_borrow(|s| s.why.to_string())
    }
}

export!(LowestLoad);
