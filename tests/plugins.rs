//! Placement plugins, for real: `.wasm` components built from `plugins/`, run by the
//! gateway's wasmtime host in-process (policy scenarios) and inside a running `hagate run`
//! (misbehaving fixtures, fail policies, hot reload under load).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hagate::config::Config;
use hagate::placement::{Candidate, Candidates, Labels, PlacementRequest};
use hagate::plugin::{CallError, Limits, LoadError, Plugin, PluginSet};
use serde_json::Value;

const LIMITS: Limits = Limits {
    deadline: Duration::from_millis(200),
    memory: 16 << 20,
};

/// One candidate: (alias, live, inflight, weight, labels "k=v,k=v").
type Spec<'a> = (&'a str, bool, u64, u32, &'a str);
/// (main, backup) alias pairs a scenario allows.
type Allowed<'a> = &'a [(&'a str, &'a str)];

fn labels(spec: &[Spec]) -> Vec<Labels> {
    spec.iter()
        .map(|s| {
            s.4.split(',')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap();
                    (k.to_string(), v.to_string())
                })
                .collect::<BTreeMap<_, _>>()
                .into()
        })
        .collect()
}

/// Candidates as a new alias-table version (plugins cache the static facts per version).
fn candidates<'a>(spec: &'a [Spec<'a>], labels: &'a [Labels]) -> Candidates<'a> {
    static VERSION: AtomicU64 = AtomicU64::new(1);
    Candidates {
        version: VERSION.fetch_add(1, Ordering::Relaxed),
        list: spec
            .iter()
            .zip(labels)
            .map(|(s, l)| Candidate {
                alias: s.0,
                live: s.1,
                inflight: s.2,
                latency_ewma_us: 0,
                reported_load: None,
                weight: s.3,
                labels: l,
            })
            .collect(),
    }
}

/// Runs a plugin future to completion (the tests that call plugins in-process are sync).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn load(name: &str, config: &str) -> Plugin {
    let bytes = std::fs::read(plugin_wasm(name)).unwrap();
    block_on(Plugin::load(&bytes, config, LIMITS)).unwrap()
}

/// Places `n` times and returns how often each (main, backup) alias pair came out.
fn place_n(
    plugin: &Plugin,
    tenant: Option<&str>,
    exclude: &[usize],
    cands: &Candidates,
    n: usize,
) -> BTreeMap<(String, String), usize> {
    let req = PlacementRequest {
        tenant,
        path: "/",
        context_id: None,
        exclude,
    };
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let c = block_on(plugin.place(&req, cands)).unwrap();
        let backup = c.backup.map_or("-", |b| cands.list[b].alias);
        *seen
            .entry((cands.list[c.main].alias.to_string(), backup.to_string()))
            .or_default() += 1;
    }
    seen
}

fn pairs(seen: &BTreeMap<(String, String), usize>) -> BTreeSet<(&str, &str)> {
    seen.keys().map(|(m, b)| (m.as_str(), b.as_str())).collect()
}

#[test]
fn lowest_load_picks_the_least_loaded_main_and_lowest_load_backup() {
    let p = load("lowest_load", "");
    // (scenario, candidates, exclude, the (main, backup) pairs allowed)
    let table: &[(&str, &[Spec], &[usize], Allowed)] = &[
        (
            "least loaded main, lowest-load live backup",
            &[
                ("a", true, 5, 1, ""),
                ("b", true, 1, 1, ""),
                ("c", true, 3, 1, ""),
                ("d", false, 0, 1, ""),
            ],
            &[],
            &[("b", "c")],
        ),
        (
            "the backup prefers another zone over a lower load",
            &[
                ("a", true, 0, 1, "zone=x"),
                ("b", true, 1, 1, "zone=x"),
                ("c", true, 7, 1, "zone=y"),
            ],
            &[],
            &[("a", "c")],
        ),
        (
            "load is relative to weight; weight 0 takes no new context",
            &[
                ("a", true, 4, 4, ""),
                ("b", true, 2, 1, ""),
                ("c", true, 0, 0, ""),
            ],
            &[],
            &[("a", "b")],
        ),
        (
            "excluded instances are never chosen",
            &[
                ("a", true, 0, 1, ""),
                ("b", true, 2, 1, ""),
                ("c", true, 3, 1, ""),
            ],
            &[0],
            &[("b", "c")],
        ),
        (
            "a single live instance gets a dead backup, so a HAID can be minted",
            &[("a", false, 0, 1, ""), ("b", true, 9, 1, "")],
            &[],
            &[("b", "a")],
        ),
        (
            "ties are broken at random, with the backup in the other zone",
            &[
                ("a", true, 1, 1, "zone=x"),
                ("b", true, 1, 1, "zone=x"),
                ("c", true, 1, 1, "zone=y"),
            ],
            &[],
            &[("a", "c"), ("b", "c"), ("c", "a"), ("c", "b")],
        ),
    ];
    for (name, spec, exclude, allowed) in table {
        let l = labels(spec);
        let cands = candidates(spec, &l);
        let seen = place_n(&p, None, exclude, &cands, 200);
        let allowed: BTreeSet<(&str, &str)> = allowed.iter().copied().collect();
        assert!(
            pairs(&seen).is_subset(&allowed),
            "{name}: got {seen:?}, allowed {allowed:?}"
        );
    }
}

#[test]
fn lowest_load_breaks_ties_uniformly_and_can_rank_by_reported_load() {
    let p = load("lowest_load", "");
    let spec: &[Spec] = &[
        ("a", true, 2, 1, ""),
        ("b", true, 2, 1, ""),
        ("c", true, 2, 1, ""),
        ("d", true, 3, 1, ""),
    ];
    let l = labels(spec);
    let cands = candidates(spec, &l);
    let mut mains = BTreeMap::<String, usize>::new();
    for ((m, _), n) in place_n(&p, None, &[], &cands, 900) {
        *mains.entry(m).or_default() += n;
    }
    assert_eq!(mains.len(), 3, "d is never the main: {mains:?}");
    // each of three equal choices: 300 expected; 200..400 is over 7 standard deviations
    assert!(
        mains.values().all(|&n| (200..=400).contains(&n)),
        "{mains:?}"
    );

    let p = load("lowest_load", r#"{"metric": "reported"}"#);
    let mut cands = candidates(spec, &l);
    cands.list[3].reported_load = Some(0.1);
    cands.list[1].reported_load = Some(0.7);
    let seen = place_n(&p, None, &[], &cands, 50);
    assert!(
        pairs(&seen).iter().all(|&(m, b)| m == "d" && b == "b"),
        "{seen:?}"
    );

    let bytes = std::fs::read(plugin_wasm("lowest_load")).unwrap();
    let err = block_on(Plugin::load(&bytes, r#"{"metric": "vibes"}"#, LIMITS)).unwrap_err();
    assert!(
        matches!(&err, LoadError::Configure(m) if m.contains("vibes")),
        "{err}"
    );
    // nothing live: the plugin declines, and the gateway applies the fail policy
    let dead: &[Spec] = &[("a", false, 0, 1, "")];
    let l = labels(dead);
    let req = PlacementRequest::default();
    let answer = block_on(p.place(&req, &candidates(dead, &l)));
    assert!(matches!(answer, Err(CallError::Declined(_))), "{answer:?}");
}

#[test]
fn tenant_affinity_keeps_tenants_in_their_groups_and_falls_back() {
    let spec: &[Spec] = &[
        ("g1", true, 0, 1, "tenant=acme,zone=a"),
        ("g2", true, 3, 1, "tenant=acme,zone=b"),
        ("g3", true, 0, 1, "tenant=acme,zone=a"),
        ("h1", true, 5, 1, "tenant=globex,zone=a"),
        ("s1", true, 1, 1, "zone=a"),
        ("s2", true, 2, 1, "zone=b"),
    ];
    let l = labels(spec);
    let cands = candidates(spec, &l);
    let p = load("tenant_affinity", r#"{"tenants": {"umbrella": "acme"}}"#);
    let cases: &[(&str, Option<&str>, Allowed)] = &[
        // main is the least loaded of the group, backup in the group's other zone
        ("group, zones", Some("acme"), &[("g1", "g2"), ("g3", "g2")]),
        (
            "mapped to a group",
            Some("umbrella"),
            &[("g1", "g2"), ("g3", "g2")],
        ),
        // a one-instance group takes its backup from the shared pool, other zone first
        ("one-instance group", Some("globex"), &[("h1", "s2")]),
        ("no group: shared pool", Some("initech"), &[("s1", "s2")]),
        ("no tenant: shared pool", None, &[("s1", "s2")]),
    ];
    for (name, tenant, allowed) in cases {
        let seen = place_n(&p, *tenant, &[], &cands, 100);
        let allowed: BTreeSet<(&str, &str)> = allowed.iter().copied().collect();
        assert!(pairs(&seen).is_subset(&allowed), "{name}: {seen:?}");
    }
    // ties inside the group go both ways
    let seen = place_n(&p, Some("acme"), &[], &cands, 200);
    assert_eq!(pairs(&seen).len(), 2, "{seen:?}");

    // the whole group is dead: fall back to the shared pool
    let mut dead = cands.clone();
    for i in 0..3 {
        dead.list[i].live = false;
    }
    let seen = place_n(&p, Some("acme"), &[], &dead, 20);
    assert_eq!(pairs(&seen), BTreeSet::from([("s1", "s2")]));
    // ... or refuse, so the plugin's fail policy decides
    let strict = load("tenant_affinity", r#"{"fallback": "refuse"}"#);
    let req = PlacementRequest {
        tenant: Some("acme"),
        ..Default::default()
    };
    let err = block_on(strict.place(&req, &dead)).unwrap_err();
    assert!(
        matches!(&err, CallError::Declined(m) if m.contains("acme")),
        "{err}"
    );
    // `any` uses every instance, the other group included
    let any = load("tenant_affinity", r#"{"fallback": "any"}"#);
    let seen = place_n(&any, Some("acme"), &[], &dead, 20);
    assert_eq!(pairs(&seen), BTreeSet::from([("s1", "s2")]));
    // a new table version is handed to the plugin: s1 joins acme's group
    let relabeled = Labels::from([
        ("tenant".to_string(), "acme".to_string()),
        ("zone".to_string(), "b".to_string()),
    ]);
    let mut next = dead.clone();
    next.version += 1000;
    next.list[4].labels = &relabeled;
    let seen = place_n(&strict, Some("acme"), &[], &next, 20);
    // (with the old facts acme has no live instance and `refuse` would decline)
    assert_eq!(pairs(&seen), BTreeSet::from([("s1", "s2")]), "{seen:?}");
}

#[test]
fn one_host_speaks_both_released_versions_of_the_world() {
    // the example plugins implement 0.2; the misbehave fixture still implements 0.1
    let v2 = load("lowest_load", "");
    let v1 = load("misbehave", "error");
    assert_eq!(load("tenant_affinity", "").version(), "0.2.0");
    assert_eq!((v2.version(), v1.version()), ("0.2.0", "0.1.0"));
    let spec: &[Spec] = &[
        ("a", false, 0, 1, ""),
        ("b", true, 5, 1, ""),
        ("c", true, 1, 1, ""),
        ("d", true, 0, 1, ""),
    ];
    let l = labels(spec);
    let cands = candidates(spec, &l);
    // the same facts reach both: 0.1 takes the first live instances, 0.2 the least loaded
    // that is not excluded (d is)
    assert_eq!(
        pairs(&place_n(&v1, None, &[], &cands, 5)),
        BTreeSet::from([("b", "c")])
    );
    assert_eq!(
        pairs(&place_n(&v2, None, &[3], &cands, 5)),
        BTreeSet::from([("c", "b")])
    );
    // a refusal reaches the operator from either: 0.1's error string, 0.2's `why`
    let req = PlacementRequest {
        tenant: Some("misbehave"),
        ..Default::default()
    };
    let err = block_on(v1.place(&req, &cands)).unwrap_err();
    assert_eq!(
        err,
        CallError::Declined("misbehave: error on purpose".into())
    );
    let mut dead = cands.clone();
    for c in &mut dead.list {
        c.live = false;
    }
    let err = block_on(v2.place(&req, &dead)).unwrap_err();
    assert_eq!(
        err,
        CallError::Declined("no live instance can take a new context".into())
    );
}

#[test]
fn entries_on_one_file_share_its_code_and_a_changed_config_compiles_nothing() {
    let wasm = plugin_wasm("lowest_load");
    let entry = |name: &str, metric: &str| {
        plugin_entry(
            name,
            &wasm,
            &format!("config = '{{\"metric\": \"{metric}\"}}'"),
        )
    };
    let specs = |body: String| {
        Config::parse(&format!(
            "[instances.cs_1]\naddress = \"127.0.0.1:9\"\n{body}"
        ))
        .unwrap()
        .plugins
    };
    let set = PluginSet::load(
        &specs(entry("a", "inflight") + &entry("b", "latency")),
        None,
    )
    .unwrap();
    let [a, b] = set.plugins() else {
        panic!("two plugins")
    };
    assert!(
        Arc::ptr_eq(a.plugin.code(), b.plugin.code()),
        "compiled twice"
    );
    // each places by its own config: x has fewer requests in flight, y answers faster
    let labels = Labels::default();
    let cand = |alias, inflight, latency_ewma_us| Candidate {
        alias,
        live: true,
        inflight,
        latency_ewma_us,
        reported_load: None,
        weight: 1,
        labels: &labels,
    };
    let cands = Candidates {
        version: 1,
        list: vec![cand("x", 0, 900), cand("y", 5, 100)],
    };
    let main = |p: &Plugin| {
        let c = block_on(p.place(&PlacementRequest::default(), &cands)).unwrap();
        cands.list[c.main].alias
    };
    assert_eq!((main(&a.plugin), main(&b.plugin)), ("x", "y"));
    // a reload that changes b's config only: a is kept whole, b is new on the same code
    let next = PluginSet::load(
        &specs(entry("a", "inflight") + &entry("b", "reported")),
        Some(&set),
    )
    .unwrap();
    assert!(Arc::ptr_eq(&next.plugins()[0].plugin, &a.plugin));
    assert!(!Arc::ptr_eq(&next.plugins()[1].plugin, &b.plugin));
    assert!(Arc::ptr_eq(
        next.plugins()[1].plugin.code(),
        b.plugin.code()
    ));
    // another file compiles its own
    let other = plugin_entry("t", &plugin_wasm("tenant_affinity"), "");
    let third = PluginSet::load(&specs(entry("a", "inflight") + &other), Some(&next)).unwrap();
    assert!(!Arc::ptr_eq(
        third.plugins()[1].plugin.code(),
        a.plugin.code()
    ));
    assert_eq!(third.plugins()[1].plugin.version(), "0.2.0");
}

/// Three upstreams, and one `misbehave` plugin per mode, each on its own path prefix.
async fn misbehaving_gateway() -> (Vec<Upstream>, Gateway) {
    misbehave_modes(&[
        // generous deadlines: a normal call must not time out on a loaded machine
        ("spin", "deadline = \"50ms\""),
        ("bomb", "deadline = \"2s\"\nmemory_limit = \"4MiB\""),
        ("trap", "deadline = \"200ms\""),
        ("unknown-alias", "deadline = \"200ms\""),
        ("error", "deadline = \"200ms\"\nfail_policy = \"reject\""),
    ])
    .await
}

/// Three upstreams, and a `misbehave` plugin for each `(mode, extra TOML)`, named after its
/// mode and matching the path prefix `/{mode}/`.
async fn misbehave_modes(modes: &[(&str, &str)]) -> (Vec<Upstream>, Gateway) {
    let ups: Vec<Upstream> = ["cs_1", "cs_2", "cs_3"]
        .iter()
        .map(|n| Upstream::start(n))
        .collect();
    let wasm = plugin_wasm("misbehave");
    let mut body = String::from(FAST_HEALTH);
    body += &instances(&[("cs_1", &ups[0]), ("cs_2", &ups[1]), ("cs_3", &ups[2])]);
    for (mode, extra) in modes {
        let extra =
            format!("config = {mode:?}\nmatch = [{{ path_prefix = \"/{mode}/\" }}]\n{extra}");
        body += &plugin_entry(mode, &wasm, &extra);
    }
    (ups, Gateway::start(&body).await)
}

async fn create(
    c: &reqwest::Client,
    gw: &Gateway,
    path: &str,
    tenant: &str,
) -> (u16, Value, Option<String>) {
    let r = c
        .post(gw.url(path))
        .header("x-hagate-tenant", tenant)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, r.json().await.unwrap_or(Value::Null), retry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_plugins_are_contained_and_counted() {
    let (_ups, mut gw) = misbehaving_gateway().await;
    let c = client();
    for (mode, outcome) in [
        ("spin", "timeout"),
        ("bomb", "trap"),
        ("trap", "trap"),
        ("unknown-alias", "invalid"),
    ] {
        let path = format!("/{mode}/createContextID");
        // the misbehaving call fails, and the native fallback still serves the request
        let (status, body, _) = create(&c, &gw, &path, "misbehave").await;
        assert_eq!(status, 200, "{mode}: {body}");
        assert!(
            body["main_alias"].is_string(),
            "{mode}: placed anyway: {body}"
        );
        let gw_ref = &gw;
        let calls = |o: &'static str| async move {
            gw_ref
                .metric(
                    "hagate_plugin_calls_total",
                    &[("plugin", mode), ("outcome", o)],
                )
                .await
        };
        assert_eq!(calls(outcome).await, 1.0, "{mode} counted as {outcome}");
        assert_eq!(calls("fallback").await, 1.0, "{mode} fell back");
        // the next call is normal: a fresh instance replaced a trapped one
        let (status, body, _) = create(&c, &gw, &path, "someone").await;
        assert_eq!(status, 200, "{mode}: {body}");
        assert_eq!(
            calls("ok").await,
            1.0,
            "{mode}: the next call is answered by the plugin"
        );
        assert_eq!(
            body["main_alias"], "cs_1",
            "{mode}: the fixture's own placement"
        );
    }
    let log = gw.log();
    assert!(
        log.contains("forcing trap when growing memory"),
        "the bomb hit the memory cap:\n{log}"
    );
    // fail policy `reject`: a 503 with Retry-After, naming the plugin
    let (status, body, retry) = create(&c, &gw, "/error/createContextID", "misbehave").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("placement_rejected")),
        "{body}"
    );
    assert!(
        body["detail"].as_str().unwrap().contains("`error`"),
        "{body}"
    );
    assert_eq!(retry.as_deref(), Some("5"));
    assert_eq!(
        gw.metric(
            "hagate_plugin_calls_total",
            &[("plugin", "error"), ("outcome", "declined")]
        )
        .await,
        1.0
    );
    // other paths match no plugin and are placed natively
    let (status, _, _) = create(&c, &gw, "/createContextID", "misbehave").await;
    assert_eq!(status, 200);
    // through all of it the gateway process stayed up
    assert!(gw.still_running(), "the gateway exited");
    assert!(
        gw.metric("hagate_plugin_call_seconds_count", &[("plugin", "spin")])
            .await
            >= 2.0
    );
}

/// Calls are synchronous on a proxy thread, so a plugin may not wait in WASI: a `sleep` is
/// trapped at once, naming what waited, long before its deadline would cut it. Writing to
/// stdout and stderr (a panic message, a debugging line) does not wait and is allowed.
/// Guest code runs on the proxy thread's stack, so endless recursion must stop at
/// wasmtime's stack limit with a trap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_waits_or_recurses_is_trapped_and_one_that_prints_is_not() {
    // a deadline the sleep would reach if it were not trapped: then it would count as a
    // timeout, not a trap
    let deadline = "deadline = \"5s\"";
    let (_ups, mut gw) = misbehave_modes(&[
        ("sleep", deadline),
        ("print", deadline),
        ("trap", deadline),
        ("recurse", deadline),
    ])
    .await;
    let c = client();
    for (mode, outcome) in [
        ("sleep", "trap"),
        ("print", "ok"),
        ("trap", "trap"),
        ("recurse", "trap"),
    ] {
        let path = format!("/{mode}/createContextID");
        let (status, body, _) = create(&c, &gw, &path, "misbehave").await;
        assert_eq!(status, 200, "{mode}: {body}");
        assert_eq!(
            gw.metric(
                "hagate_plugin_calls_total",
                &[("plugin", mode), ("outcome", outcome)]
            )
            .await,
            1.0,
            "{mode} counted as {outcome}"
        );
    }
    let log = gw.log();
    let warned = |plugin: &str| -> Vec<String> {
        log.lines()
            .filter(|l| {
                l.contains("placement plugin failed") && l.contains(&format!("plugin=\"{plugin}\""))
            })
            .map(str::to_string)
            .collect()
    };
    let sleep = warned("sleep");
    assert!(
        sleep.len() == 1 && sleep[0].contains("a placement plugin may not wait: wasi:io/poll"),
        "the sleep was trapped, naming the wait:\n{log}"
    );
    // the panic message went to stderr without waiting: the trap is the guest's own
    let trap = warned("trap");
    assert!(
        trap.len() == 1 && trap[0].contains("unreachable") && !trap[0].contains("may not wait"),
        "the panic trapped as the guest's own trap:\n{log}"
    );
    assert!(
        warned("print").is_empty(),
        "printing is not a failure:\n{log}"
    );
    // on the proxy thread's own stack: wasmtime's stack limit, not a crash
    let recurse = warned("recurse");
    assert!(
        recurse.len() == 1 && recurse[0].contains("call stack exhausted"),
        "the recursion trapped at the stack limit:\n{log}"
    );
    assert!(gw.still_running(), "the gateway exited");
}

/// The voluntary context switches of the gateway's epoch ticker thread: they climb by
/// about 1000 a second while it ticks, and stand still while it is parked.
fn ticker_switches(pid: u32) -> u64 {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim() == "hagate-wasm-epo" {
            let status = std::fs::read_to_string(task.join("status")).unwrap();
            return status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("the status names its switches");
        }
    }
    panic!("no epoch ticker thread in {pid}");
}

/// An idle gateway's epoch ticker parks (no 1000 wake-ups a second), and the next call wakes
/// it: a spinning plugin is still cut at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epoch_ticker_parks_when_idle_and_a_spinning_call_is_still_cut() {
    let (_ups, gw) = misbehaving_gateway().await;
    let pid = gw.pid();
    // parked: no switch over 10 polls in a row (20 ms apart), which ticking would fill
    // with about 200
    let mut seen = (0, 0); // the last count, and how many polls in a row have seen it
    eventually("the epoch ticker to park", Duration::from_secs(30), || {
        let now = ticker_switches(pid);
        seen = if now == seen.0 {
            (now, seen.1 + 1)
        } else {
            (now, 0)
        };
        let parked = seen.1 >= 10;
        async move { parked.then_some(()) }
    })
    .await;
    let c = client();
    let (status, body, _) = create(&c, &gw, "/spin/createContextID", "misbehave").await;
    assert_eq!(status, 200, "placed by the fallback: {body}");
    assert_eq!(
        gw.metric(
            "hagate_plugin_calls_total",
            &[("plugin", "spin"), ("outcome", "timeout")]
        )
        .await,
        1.0,
        "the spinning call was cut by the woken ticker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_mints_haids_with_the_same_placement() {
    let ups: Vec<Upstream> = ["g1", "g2", "s1"]
        .iter()
        .map(|n| Upstream::start(n))
        .collect();
    // Placement is under test, not health: with 200 ms checks, both cores busy once made
    // the instances fail theirs, and a placement was (rightly) answered 503.
    let mut body = String::from("[health.active]\nenabled = false\n");
    for (alias, u, labels) in [
        ("g1", &ups[0], "{ tenant = \"acme\", zone = \"a\" }"),
        ("g2", &ups[1], "{ tenant = \"acme\", zone = \"b\" }"),
        ("s1", &ups[2], "{ zone = \"a\" }"),
    ] {
        body += &format!(
            "[instances.{alias}]\naddress = \"{}\"\nlabels = {labels}\n",
            u.addr
        );
    }
    body += &plugin_entry(
        "tenants",
        &plugin_wasm("tenant_affinity"),
        "deadline = \"200ms\"\nmatch = [{ tenant = \"acme\" }]",
    );
    let gw = Gateway::start(&body).await;
    let c = client();
    let post = |v: Value| c.post(gw.admin_url("/v1/placements")).json(&v).send();
    let r = post(serde_json::json!({"tenant": "acme", "context_id": "1024"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let (main, backup) = (v["main"].as_str().unwrap(), v["backup"].as_str().unwrap());
    assert_eq!(
        BTreeSet::from([main, backup]),
        BTreeSet::from(["g1", "g2"]),
        "{v}"
    );
    assert_eq!(
        v["haid"],
        hagate::haid::encode(main, &[backup], "1024").unwrap()
    );
    // the minted HAID routes to its main
    let (s, served) = get_haid(&c, &gw, v["haid"].as_str().unwrap()).await;
    assert_eq!((s, served["server"].as_str()), (200, Some(main)));
    // excluding an instance re-places around it
    let v: Value =
        post(serde_json::json!({"tenant": "acme", "context_id": "7", "exclude": ["g1"]}))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(v["main"], "g2", "{v}");
    // bad input: a JSON 4xx naming the problem
    let r = post(serde_json::json!({"context_id": "12ab"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("context_id"));
    let r = post(serde_json::json!({"context_id": "1", "exclude": ["nope"]}))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["alias"], "nope");
    assert_eq!(
        post(serde_json::json!({"tenant": 5}))
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        gw.metric(
            "hagate_plugin_calls_total",
            &[("plugin", "tenants"), ("outcome", "ok")]
        )
        .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_whose_file_does_not_match_its_sha256_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = plugin_wasm("lowest_load");
    let wrong = "0".repeat(64);
    let config = format!(
        "[instances.cs_1]\naddress = \"127.0.0.1:9\"\n[[plugins]]\nname = \"ll\"\npath = {:?}\nsha256 = \"{wrong}\"\n",
        wasm.display().to_string()
    );
    let path = dir.path().join("hagate.toml");
    std::fs::write(&path, &config).unwrap();
    for cmd in ["check", "run"] {
        let out = std::process::Command::new(BIN)
            .args([cmd, "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd} accepted a mismatching plugin");
        assert!(
            err.contains("plugins[0].sha256") && err.contains(&sha256_of(&wasm)),
            "{cmd}: {err}"
        );
    }
    // with the right hash, check compiles and configures it
    std::fs::write(&path, config.replace(&wrong, &sha256_of(&wasm))).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 plugins"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_concurrent_creations_costs_no_errors() {
    let ups: Vec<Upstream> = ["cs_1", "cs_2", "cs_3"]
        .iter()
        .map(|n| Upstream::start(n))
        .collect();
    let inst = instances(&[("cs_1", &ups[0]), ("cs_2", &ups[1]), ("cs_3", &ups[2])]);
    let dir = tempfile::tempdir().unwrap();
    // the plugin files live beside the config, so replacing one on disk is seen too
    let lowest = dir.path().join("policy.wasm");
    std::fs::copy(plugin_wasm("lowest_load"), &lowest).unwrap();
    let tenant = dir.path().join("tenant.wasm");
    std::fs::copy(plugin_wasm("tenant_affinity"), &tenant).unwrap();
    let gw = Gateway::start(&format!(
        "{FAST_HEALTH}{inst}{}",
        plugin_entry("policy", &lowest, "")
    ))
    .await;

    let url = gw.url("/createContextID");
    let load = Load::start(6, move |c, _, _| c.post(&url));
    let calls = |plugin: &'static str| {
        let gw = &gw;
        async move {
            gw.metric(
                "hagate_plugin_calls_total",
                &[("plugin", plugin), ("outcome", "ok")],
            )
            .await
        }
    };
    eventually(
        "calls to the first plugin",
        Duration::from_secs(20),
        || async { (calls("policy").await > 20.0).then_some(()) },
    )
    .await;

    // 1. swap in a different plugin by editing the config
    gw.rewrite(|old| {
        old.replace(
            &plugin_entry("policy", &lowest, ""),
            &plugin_entry("tenants", &tenant, ""),
        )
    });
    gw.wait_plugin_reload("tenants", "ok").await;
    eventually(
        "calls to the new plugin",
        Duration::from_secs(20),
        || async { (calls("tenants").await > 20.0).then_some(()) },
    )
    .await;

    // 2. a broken plugin (not a component, but with its true hash) refuses the whole reload
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm but not really").unwrap();
    gw.rewrite(|old| {
        format!(
            "{old}{}",
            plugin_entry("junk", &junk, "match = [{ tenant = \"x\" }]")
        )
    });
    gw.wait_plugin_reload("junk", "error").await;
    gw.wait_metric(
        "hagate_alias_table_swaps_total",
        &[("source", "config"), ("result", "error")],
        1.0,
    )
    .await;

    // 3. the running plugin's file replaced on disk without a new hash: refused as well
    gw.rewrite(|old| {
        old.replace(
            &plugin_entry("junk", &junk, "match = [{ tenant = \"x\" }]"),
            "",
        )
    });
    gw.wait_metric(
        "hagate_alias_table_swaps_total",
        &[("source", "config"), ("result", "ok")],
        2.0,
    )
    .await;
    std::fs::copy(&lowest, &tenant).unwrap();
    gw.wait_metric(
        "hagate_alias_table_swaps_total",
        &[("source", "config"), ("result", "error")],
        2.0,
    )
    .await;

    // the old plugin keeps serving through the refusals
    let before = calls("tenants").await;
    eventually(
        "the old plugin to keep serving",
        Duration::from_secs(20),
        || async { (calls("tenants").await > before + 20.0).then_some(()) },
    )
    .await;
    let (ok, errors) = load.finish().await;
    eprintln!(
        "hot reload under load: {ok} creations, {} errors",
        errors.len()
    );
    assert!(errors.is_empty(), "{ok} ok: {errors:?}");
    let log = gw.log();
    assert!(
        log.contains("plugins[1].path") && log.contains("plugins[0].sha256"),
        "refusals name the field:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_load_and_latency_reach_the_plugin_and_the_header_is_stripped() {
    let ups: Vec<Upstream> = ["cs_1", "cs_2", "cs_3"]
        .iter()
        .map(|n| Upstream::start(n))
        .collect();
    let mut body = String::from(FAST_HEALTH);
    body += &instances(&[("cs_1", &ups[0]), ("cs_2", &ups[1]), ("cs_3", &ups[2])]);
    body += &plugin_entry(
        "by-report",
        &plugin_wasm("lowest_load"),
        "deadline = \"200ms\"\nconfig = '{\"metric\": \"reported\"}'",
    );
    let gw = Gateway::start(&body).await;
    let c = client();
    for (u, load) in ups.iter().zip(["0.9", "0.2", "0.5"]) {
        u.set_load(load).await;
    }
    // one request to each instance carries its report back through the gateway
    for alias in ["cs_1", "cs_2", "cs_3"] {
        let haid = hagate::haid::encode(alias, &["cs_1"], "5").unwrap();
        let r = send_haid(&c, &gw, &haid).await;
        assert_eq!(r.status(), 200);
        assert!(
            r.headers().get("x-hagate-load").is_none(),
            "the report is stripped"
        );
    }
    let table = json_of(c.get(gw.admin_url("/v1/aliases"))).await;
    let reported = |a: &str| table["instances"][a]["reported_load"].as_f64().unwrap();
    assert!((reported("cs_2") - 0.2).abs() < 1e-6, "{table}");
    assert!(
        table["instances"]["cs_1"]["latency_ewma_us"]
            .as_u64()
            .unwrap()
            > 0
    );
    // the plugin ranks by reported load: cs_2 is the main, cs_3 the backup
    for _ in 0..5 {
        let (status, body, _) = create(&c, &gw, "/createContextID", "t").await;
        assert_eq!(status, 200);
        assert_eq!(
            (body["main_alias"].as_str(), body["backup_alias"].as_str()),
            (Some("cs_2"), Some("cs_3")),
            "{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_answers_while_a_slow_reload_compiles() {
    let ups: Vec<Upstream> = ["cs_1", "cs_2"]
        .iter()
        .map(|n| Upstream::start(n))
        .collect();
    let inst = instances(&[("cs_1", &ups[0]), ("cs_2", &ups[1])]);
    let gw = Gateway::start(&format!("{FAST_HEALTH}{inst}")).await;
    // A reload that compiles two components (a debug build's cranelift is slow).
    let entries: String = [("a", "lowest_load"), ("b", "tenant_affinity")]
        .iter()
        .map(|(name, crate_name)| {
            plugin_entry(
                name,
                &plugin_wasm(crate_name),
                "match = [{ path_prefix = \"/nothing\" }]",
            )
        })
        .collect();
    let c = client();
    let admin = gw.admin_url("/v1/aliases");
    let done = || async {
        let mut n = 0.0;
        for p in ["a", "b"] {
            n += gw
                .metric(
                    "hagate_plugin_reloads_total",
                    &[("plugin", p), ("result", "ok")],
                )
                .await;
        }
        n
    };
    gw.rewrite(|old| format!("{old}\n{entries}"));
    // Ask the admin API over and over until the reload has finished; keep the slowest.
    let mut slowest = Duration::ZERO;
    let mut answers = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while done().await < 2.0 {
        let sent = Instant::now();
        let r = c.get(&admin).send().await.unwrap();
        assert_eq!(r.status(), 200);
        slowest = slowest.max(sent.elapsed());
        answers += 1;
        assert!(Instant::now() < deadline, "the reload did not finish");
    }
    // The gateway logged how long each compile took.
    let log = gw.log();
    let compile_ms: u64 = log
        .lines()
        .filter(|l| l.contains("placement plugin loaded"))
        .filter_map(|l| {
            l.split("took_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .max()
        .expect("the reload logged its compile times");
    eprintln!("reload: slowest compile {compile_ms} ms; {answers} admin answers meanwhile, the slowest in {slowest:?}");
    // Had the compile run on the control plane's runtime, some answer would have waited
    // for most of it.
    assert!(answers >= 2, "{answers}");
    assert!(
        slowest.as_millis() < u128::from(compile_ms) / 2,
        "an admin answer took {slowest:?} while a compile took {compile_ms} ms"
    );
}
