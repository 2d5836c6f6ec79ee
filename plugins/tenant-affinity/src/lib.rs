//! `tenant-affinity`: multi-tenant placement (the "MultiTenantBackupInstanceGenerator" that
//! Linkis reserved but never built).
//!
//! A tenant's group is the set of instances whose `label` (default `tenant`) equals the
//! tenant's group name: `tenants[tenant]` if the config maps it, else the tenant name itself.
//! The group supplies the main and the backup (least-loaded, backup in another zone where
//! possible; ties random). A group with a single live instance takes its backup from the
//! shared pool (instances without the label).
//!
//! A request with no tenant, a tenant with no group, or a group with no live instance
//! is handled by `fallback`:
//! - `"shared"` (default): place in the shared pool;
//! - `"any"`: place among all instances;
//! - `"refuse"`: return an error, so the gateway applies the plugin's fail policy
//!   (`reject` gives the client a 503).
//!
//! Config (JSON, every field optional):
//! `{"label": "tenant", "tenants": {"acme": "gold"}, "fallback": "shared", "metric": "inflight"}`

use std::cell::RefCell;
use std::collections::BTreeMap;

use placement_kit::{can_take, choose, facts, parse_config, Known, Metric, Rng};

wit_bindgen::generate!({ path: "../../wit/v0.2", world: "placement" });

placement_kit::conversions!();

#[derive(serde::Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Fallback {
    #[default]
    Shared,
    Any,
    Refuse,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    tenants: BTreeMap<String, String>,
    #[serde(default)]
    fallback: Fallback,
    #[serde(default)]
    metric: Option<String>,
}

#[derive(Default)]
struct State {
    label: String,
    tenants: BTreeMap<String, String>,
    fallback: Fallback,
    metric: Metric,
    known: Known,
    rng: Rng,
    /// Why the last `place` returned `none`.
    why: String,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::default();
}

/// The main and backup for `tenant` (see the module docs).
fn place_tenant(
    s: &mut State,
    tenant: Option<&str>,
    loads: &[u32],
) -> Result<(usize, Option<usize>), String> {
    let State {
        label,
        tenants,
        fallback,
        metric,
        known,
        rng,
        why: _,
    } = s;
    let nodes = known.nodes(facts(loads));
    let group = tenant.map(|t| tenants.get(t).map(String::as_str).unwrap_or(t));
    let group_of = |i: usize| known.label(i, label);
    let in_group = |i: usize| group.is_some() && group_of(i) == group;
    let shared = |i: usize| group_of(i).is_none();
    if nodes
        .iter()
        .enumerate()
        .any(|(i, n)| in_group(i) && can_take(n))
    {
        if let Some(placed) = choose(&nodes, *metric, rng, in_group, shared) {
            return Ok(placed);
        }
    }
    let who = tenant.unwrap_or("(none)");
    let placed = match fallback {
        Fallback::Shared => choose(&nodes, *metric, rng, shared, shared),
        Fallback::Any => choose(&nodes, *metric, rng, |_| true, |_| true),
        Fallback::Refuse => return Err(format!("tenant {who}: no live instance in its group")),
    };
    placed
        .ok_or_else(|| format!("tenant {who}: no live instance in its group or the fallback pool"))
}

struct TenantAffinity;

impl Guest for TenantAffinity {
    fn configure(config: String) -> Result<Wants, String> {
        let c: Config = parse_config(&config)?;
        let metric = Metric::parse(c.metric.as_deref().unwrap_or("inflight"))?;
        let label = c.label.unwrap_or_else(|| "tenant".into());
        if label.is_empty() {
            return Err("config: `label` must not be empty".into());
        }
        STATE.with_borrow_mut(|s| {
            s.label = label;
            s.tenants = c.tenants;
            s.fallback = c.fallback;
            s.metric = metric;
        });
        // The tenant picks the group; nothing else of the request matters.
        Ok(Wants::TENANT)
    }

    fn set_instances(instances: Vec<Instance>) {
        let known = known(instances);
        STATE.with_borrow_mut(|s| s.known = known);
    }

    fn place(request: Request, loads: Vec<u32>) -> Option<Choice> {
        STATE.with_borrow_mut(
            |s| match place_tenant(s, request.tenant.as_deref(), &loads) {
                Ok((main, backup)) => Some(Choice {
                    main: main as u32,
                    backup: backup.map(|b| b as u32),
                }),
                Err(why) => {
                    s.why = why;
                    None
                }
            },
        )
    }

    fn why() -> String {
        STATE.with_borrow(|s| s.why.clone())
    }
}

export!(TenantAffinity);
