//! Several gateways on one real etcd (`/usr/bin/etcd`, started by each test on free
//! loopback ports with a temporary data dir, and a prefix of its own): shared membership
//! and alias table, takeovers seen by every gateway, etcd killed, compacted, partitioned
//! and clustered, and restarts from the snapshot.

mod common;

use std::time::{Duration, Instant};

use common::etcd::{store_toml, store_toml_at, write_holder_keys, Cut, Etcd};
use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "s3cret";
/// etcd counts lease TTLs in whole seconds and raises any under 2s: T = 2s, I < T/2.
const I: Duration = Duration::from_millis(500);
const T: Duration = Duration::from_secs(2);
/// What the tests allow on top of a protocol bound for a loaded machine.
const SLACK: Duration = Duration::from_secs(1);

fn membership_toml() -> String {
    format!(
        "[membership]\nenabled = true\ninterval = \"{}ms\"\ntimeout = \"{}s\"\ntoken = \"{TOKEN}\"\n",
        I.as_millis(),
        T.as_secs()
    )
}

fn prefix(test: &str) -> String {
    format!("/hagate-test/{test}")
}

/// A gateway on `etcd` under `prefix`, with membership on and these instances as the seed.
async fn etcd_gateway(store: &str, ups: &[(&str, &Upstream)]) -> Gateway {
    Gateway::start(&format!(
        "{store}{}{FAST_HEALTH}{}",
        membership_toml(),
        instances(ups)
    ))
    .await
}

async fn ready(gw: &Gateway) -> bool {
    client()
        .get(gw.admin_url("/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

async fn wait_ready(gw: &Gateway, want: bool) {
    let what = format!(
        "/readyz on {} to be {}",
        gw.admin,
        if want { 200 } else { 503 }
    );
    eventually(&what, Duration::from_secs(20), || async move {
        (ready(gw).await == want).then_some(())
    })
    .await
}

/// Requests for `haid` from 4 loops, alternating between the two gateways.
fn load_on_both(gw1: &Gateway, gw2: &Gateway, haid: &str) -> Load {
    let (u1, u2) = (gw1.url("/ctx"), gw2.url("/ctx"));
    let haid = haid.to_string();
    Load::start(4, move |c, w, _| {
        c.get(if w % 2 == 0 { &u1 } else { &u2 })
            .header("contextID", &haid)
    })
}

/// A gateway that reaches etcd's first member through a relay the test can cut.
async fn relayed_gateway(etcd: &Etcd, pre: &str, ups: &[(&str, &Upstream)]) -> (Gateway, Cut) {
    let member = format!("127.0.0.1:{}", etcd.members[0].client_port);
    let relay = Cut::start(member.parse().unwrap()).await;
    let gw = etcd_gateway(
        &store_toml_at(&format!("{:?}", relay.url()), pre, None),
        ups,
    )
    .await;
    (gw, relay)
}

fn agent(gws: &[&Gateway], alias: &str, server: &Upstream) -> Agent {
    Agent::start(&AgentArgs::new(gws, alias, server, I, T, TOKEN))
}

/// Polls until `gw` routes `haid` to `server`; how long that took from `since`.
async fn routed_within(gw: &Gateway, haid: &str, server: &str, since: Instant) -> Duration {
    let c = client();
    let what = format!("{haid} to be served by {server} on {}", gw.proxy);
    eventually(&what, Duration::from_secs(20), || {
        let c = &c;
        async move { (get_haid(c, gw, haid).await.1["server"] == server).then(|| since.elapsed()) }
    })
    .await
}

/// `PUT /v1/aliases` on `gw`, and its answer. A write that etcd did not confirm within
/// `store.request_timeout` is answered 503 `store_write_unconfirmed`, which the README
/// documents as "it may still be applied"; that answer is followed by reading the table
/// back until every alias has the address written (the write did land), and the answer
/// is then the revision read, applied on `gw`.
async fn put_aliases(gw: &Gateway, instances: Value) -> Value {
    let r = client()
        .put(gw.admin_url("/v1/aliases"))
        .json(&json!({ "instances": instances }))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    if status == 503 && body["error"] == "store_write_unconfirmed" {
        eprintln!("PUT /v1/aliases was not confirmed in time: {body}");
        let written = instances.as_object().unwrap();
        return eventually(
            "the unconfirmed write to reach the gateway",
            Duration::from_secs(10),
            || async {
                let now = aliases(gw).await;
                let landed = now["instances"].as_object().map(|m| m.len()) == Some(written.len())
                    && written
                        .iter()
                        .all(|(a, spec)| now["instances"][a]["address"] == spec["address"]);
                landed.then(|| json!({ "revision": now["revision"], "applied": true }))
            },
        )
        .await;
    }
    assert_eq!(status, 200, "PUT /v1/aliases: {body}");
    body
}

async fn aliases(gw: &Gateway) -> Value {
    json_of(client().get(gw.admin_url("/v1/aliases"))).await
}

/// The uuid of every holder `alias` had, in etcd's history from revision 1, checking that
/// no holding began while another was live and that epochs strictly increase.
async fn holder_history(etcd: &Etcd, prefix: &str, alias: &str) -> Vec<String> {
    let key = format!("{prefix}/alias/{alias}");
    let c = etcd.client().await;
    let until = etcd.revision().await;
    let mut stream = eventually("a watch on the history", Duration::from_secs(20), || {
        let (mut c, key) = (c.clone(), key.clone());
        async move {
            c.watch(
                key.as_str(),
                Some(etcd_client::WatchOptions::new().with_start_revision(1)),
            )
            .await
            .ok()
        }
    })
    .await;
    let mut holders = Vec::new();
    let mut live: Option<(String, i64)> = None;
    let mut last_epoch = 0;
    loop {
        let Ok(Ok(Some(resp))) =
            tokio::time::timeout(Duration::from_secs(5), stream.message()).await
        else {
            break;
        };
        if resp.created() {
            continue;
        }
        let mut done = false;
        for e in resp.events() {
            let kv = e.kv().unwrap();
            done |= kv.mod_revision() >= until;
            match e.event_type() {
                etcd_client::EventType::Put => {
                    let v: Value = serde_json::from_slice(kv.value()).unwrap();
                    let uuid = v["uuid"].as_str().unwrap().to_string();
                    if let Some((current, epoch)) = &live {
                        assert_eq!(
                            (current, *epoch),
                            (&uuid, kv.create_revision()),
                            "a second holding began while {current} held {alias}"
                        );
                        continue;
                    }
                    assert!(
                        kv.create_revision() > last_epoch,
                        "epochs must strictly increase: {} after {last_epoch}",
                        kv.create_revision()
                    );
                    last_epoch = kv.create_revision();
                    live = Some((uuid.clone(), kv.create_revision()));
                    holders.push(uuid);
                }
                etcd_client::EventType::Delete => live = None,
            }
        }
        if done || resp.header().is_some_and(|h| h.revision() >= until) && resp.events().is_empty()
        {
            break;
        }
    }
    holders
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_holders_and_the_alias_table_within_a_second() {
    let etcd = Etcd::start().await;
    let (a, b, c, d) = (
        Upstream::start("A"),
        Upstream::start("B"),
        Upstream::start("C"),
        Upstream::start("D"),
    );
    let store = store_toml(&etcd, &prefix("share"), None);
    let gw1 = etcd_gateway(&store, &[("cs_1", &a), ("cs_2", &b)]).await;
    let gw2 = etcd_gateway(&store, &[("cs_1", &a), ("cs_2", &b)]).await;
    wait_ready(&gw1, true).await;
    wait_ready(&gw2, true).await;
    // the first gateway seeded the table; both say where it came from
    for gw in [&gw1, &gw2] {
        let t = aliases(gw).await;
        assert_eq!(t["source"], "etcd", "{t}");
        assert!(t["revision"].as_i64().unwrap() > 0);
    }

    // an agent heartbeating to gateway 1 makes gateway 2 route its alias
    let _holder = agent(&[&gw1], "cs_1", &c);
    let h = wait_primary_at(&gw1, "cs_1", &c).await;
    let claimed = Instant::now();
    let haid = hagate::haid::encode("cs_1", &["cs_2"], "11").unwrap();
    let took = routed_within(&gw2, &haid, "C", claimed).await;
    eprintln!("holder on gateway 1 -> routed by gateway 2 in {took:?}");
    assert!(took <= Duration::from_secs(1) + SLACK, "took {took:?}");
    // the route carries the holder's epoch, the key's create_revision
    let (_, body) = get_haid(&client(), &gw2, &haid).await;
    assert_eq!(body["epoch"], h["epoch"].to_string(), "{body}");
    assert!(h["epoch"].as_u64().unwrap() > 0);

    // PUT /v1/aliases on gateway 1 is routed by gateway 2
    let started = Instant::now();
    let put = put_aliases(
        &gw1,
        json!({"cs_1": {"address": a.addr.to_string()}, "cs_2": {"address": d.addr.to_string()}}),
    )
    .await;
    assert_eq!(put["applied"], true, "{put}");
    let haid2 = hagate::haid::encode("cs_2", &["cs_1"], "12").unwrap();
    let took = routed_within(&gw2, &haid2, "D", started).await;
    eprintln!("PUT on gateway 1 -> routed by gateway 2 in {took:?}");
    assert!(took <= Duration::from_secs(1) + SLACK, "took {took:?}");
    let t2 = aliases(&gw2).await;
    assert_eq!(t2["source"], "etcd");
    assert_eq!(t2["revision"], put["revision"], "{t2} vs {put}");
    // the holder still wins over the new static address of cs_1
    assert_eq!(get_haid(&client(), &gw2, &haid).await.1["server"], "C");

    // a bad table is refused with the field named, and the old one keeps serving
    put_bad_table(&gw2).await;
    assert_eq!(aliases(&gw1).await["revision"], put["revision"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_is_replaced_on_both_gateways_within_t_plus_i_with_no_errors() {
    let etcd = Etcd::start().await;
    let (a, b, s) = (
        Upstream::start("A"),
        Upstream::start("B"),
        Upstream::start("S"),
    );
    let mut a = a;
    let store = store_toml(&etcd, &prefix("kill"), None);
    let gw1 = etcd_gateway(&store, &[("cs_1", &a), ("cs_2", &b)]).await;
    let gw2 = etcd_gateway(&store, &[("cs_1", &a), ("cs_2", &b)]).await;
    let mut holder_a = agent(&[&gw1], "cs_1", &a);
    let first = wait_primary_at(&gw1, "cs_1", &a).await;
    // the standby heartbeats to the *other* gateway
    let _standby = agent(&[&gw2], "cs_1", &s);
    let haid = hagate::haid::encode("cs_1", &["cs_2"], "21").unwrap();
    for gw in [&gw1, &gw2] {
        routed_within(gw, &haid, "A", Instant::now()).await;
    }
    let load = load_on_both(&gw1, &gw2, &haid);
    holder_a.kill();
    a.kill();
    let killed = Instant::now();
    let t1 = routed_within(&gw1, &haid, "S", killed).await;
    let t2 = routed_within(&gw2, &haid, "S", killed).await;
    let (ok, errors) = load.finish().await;
    eprintln!("takeover seen by gateway 1 after {t1:?}, gateway 2 after {t2:?} (T + I = {:?}); {ok} requests, {} errors", T + I, errors.len());
    // etcd checks lease expiry every 500ms: the bound is T + I plus that tick.
    let bound = T + I + Duration::from_millis(500) + SLACK;
    assert!(t1 <= bound && t2 <= bound, "{t1:?} {t2:?}");
    assert!(errors.is_empty(), "{errors:?}");
    assert!(ok > 0);
    let second = primary_holder(&gw2, "cs_1").await;
    assert!(
        second["epoch"].as_u64() > first["epoch"].as_u64(),
        "{second} after {first}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_stopped_longer_than_t_is_refused_after_it_continues_and_steps_down() {
    let etcd = Etcd::start().await;
    let (a, s) = (Upstream::start("A"), Upstream::start("S"));
    let store = store_toml(&etcd, &prefix("sigstop"), None);
    let gw1 = etcd_gateway(&store, &[("cs_1", &a)]).await;
    let gw2 = etcd_gateway(&store, &[("cs_1", &a)]).await;
    let mut old = agent(&[&gw1], "cs_1", &a);
    let first = wait_primary_at(&gw1, "cs_1", &a).await;
    // stop it once it acts as the holder (a claimant that is stopped just falls back)
    eventually(
        "the agent to act as holder",
        Duration::from_secs(10),
        || async { old.log().contains("role=\"holder\"").then_some(()) },
    )
    .await;
    let mut standby = agent(&[&gw2], "cs_1", &s);
    old.signal("STOP");
    let stopped = Instant::now();
    let new = wait_primary_at(&gw2, "cs_1", &s).await;
    assert!(stopped.elapsed() > T, "the takeover waited for T");
    // the old holding's renewal is refused by the store (its epoch is gone)...
    let r = client()
        .post(gw1.admin_url("/v1/membership/heartbeat"))
        .bearer_auth(TOKEN)
        .json(&json!({"uuid": first["uuid"], "alias": "cs_1", "address": a.addr.to_string(), "last_seen": first["epoch"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(r.json::<Value>().await.unwrap()["result"], "stale");
    // ...and the old agent, continued, steps down with exit status 3
    old.signal("CONT");
    assert_eq!(old.exit_code(Duration::from_secs(10)).await, 3);
    assert!(old.log().contains("stepping down"), "{}", old.log());
    assert!(standby.running());
    let now = primary_holder(&gw1, "cs_1").await;
    assert_eq!(now["uuid"], new["uuid"], "the standby still holds cs_1");
    assert_eq!(
        holder_history(&etcd, &prefix("sigstop"), "cs_1")
            .await
            .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standbys_racing_through_two_gateways_never_hold_together() {
    let etcd = Etcd::start().await;
    let servers: Vec<Upstream> = (0..3).map(|i| Upstream::start(&format!("S{i}"))).collect();
    let store = store_toml(&etcd, &prefix("race"), None);
    let gw1 = etcd_gateway(&store, &[("cs_1", &servers[0])]).await;
    let gw2 = etcd_gateway(&store, &[("cs_1", &servers[0])]).await;
    let gws = [&gw1, &gw2];
    // three agents for one alias, each on its own gateway first
    let mut agents: Vec<Agent> = (0..3)
        .map(|i| agent(&[gws[i % 2], gws[(i + 1) % 2]], "cs_1", &servers[i]))
        .collect();
    let rounds = 5;
    for round in 0..rounds {
        let h = eventually("a holder", Duration::from_secs(20), || async {
            let h = primary_holder(&gw1, "cs_1").await;
            h["address"].as_str().map(str::to_string)
        })
        .await;
        let i = servers
            .iter()
            .position(|s| s.addr.to_string() == h)
            .unwrap();
        // kill the holder's agent; its replacement starts as a standby
        agents[i].kill();
        let what = format!("round {round}: a new holder");
        eventually(&what, Duration::from_secs(20), || async {
            let now = primary_holder(&gw2, "cs_1").await;
            (now["address"].is_string() && now["address"] != h.as_str()).then_some(())
        })
        .await;
        agents[i] = agent(&[gws[i % 2], gws[(i + 1) % 2]], "cs_1", &servers[i]);
    }
    let history = holder_history(&etcd, &prefix("race"), "cs_1").await;
    assert!(history.len() > rounds, "{history:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_under_load_costs_no_errors_and_everything_resyncs_after() {
    let mut etcd = Etcd::start().await;
    let (a, b, c) = (
        Upstream::start("A"),
        Upstream::start("B"),
        Upstream::start("C"),
    );
    let pre = prefix("etcdkill");
    let gw1 = etcd_gateway(
        &store_toml(&etcd, &pre, None),
        &[("cs_1", &a), ("cs_2", &b)],
    )
    .await;
    // gateway 2 reaches etcd through a relay the test can cut
    let (gw2, relay) = relayed_gateway(&etcd, &pre, &[("cs_1", &a), ("cs_2", &b)]).await;
    let mut holder = agent(&[&gw1, &gw2], "cs_1", &a);
    let first = wait_primary_at(&gw1, "cs_1", &a).await;
    wait_ready(&gw1, true).await;
    wait_ready(&gw2, true).await;
    let haid = hagate::haid::encode("cs_1", &["cs_2"], "31").unwrap();
    let load = load_on_both(&gw1, &gw2, &haid);
    etcd.members[0].kill();
    wait_ready(&gw1, false).await;
    wait_ready(&gw2, false).await;
    // heartbeats get 503, and membership is frozen: the holder still routes
    let r = client()
        .post(gw1.admin_url("/v1/membership/heartbeat"))
        .bearer_auth(TOKEN)
        .json(&json!({"uuid": "x", "alias": "cs_9", "address": "127.0.0.1:9", "last_seen": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "membership_store_unavailable"
    );
    load.served(200, "requests served while etcd is down").await;
    for gw in [&gw1, &gw2] {
        assert_eq!(gw.metric("hagate_store_up", &[]).await, 0.0);
    }
    // no heartbeat is accepted, so the holder steps down within T - I of its last accepted
    // one (README, "When etcd is down"); the outage lasts until it has
    let code = holder.exit_code(T + SLACK).await;
    assert_ne!(code, 0, "{}", holder.log());
    assert!(holder.log().contains("stepping down"), "{}", holder.log());
    // ...and its alias keeps routing to the last known address
    load.served(200, "requests served after the holder stepped down")
        .await;
    // etcd comes back; gateway 2's watch stays down while a change is made
    relay.sever();
    etcd.members[0].restart();
    etcd.wait_healthy().await;
    wait_ready(&gw1, true).await;
    let put = put_aliases(
        &gw1,
        json!({"cs_1": {"address": a.addr.to_string()}, "cs_2": {"address": c.addr.to_string()}}),
    )
    .await;
    assert!(!ready(&gw2).await);
    relay.heal();
    wait_ready(&gw2, true).await;
    let haid2 = hagate::haid::encode("cs_2", &["cs_1"], "32").unwrap();
    routed_within(&gw2, &haid2, "C", Instant::now()).await;
    assert_eq!(aliases(&gw2).await["revision"], put["revision"]);
    let (ok, errors) = load.finish().await;
    eprintln!(
        "etcd kill -9 and restart: {ok} requests, {} errors",
        errors.len()
    );
    assert!(errors.is_empty(), "{errors:?}");
    // restarted as a standby (what its supervisor does), the agent holds cs_1 again once
    // the old lease has run out, with a new epoch, and both gateways agree on it
    let _again = agent(&[&gw1, &gw2], "cs_1", &a);
    let newer = |h: &Value| {
        h["address"] == a.addr.to_string() && h["epoch"].as_u64() > first["epoch"].as_u64()
    };
    let second = eventually(
        "a new holding of cs_1 on gateway 2",
        Duration::from_secs(20),
        || async {
            let h = primary_holder(&gw2, "cs_1").await;
            newer(&h).then_some(h)
        },
    )
    .await;
    eventually(
        "gateway 1 to agree on the new holding",
        Duration::from_secs(20),
        || async {
            let h = primary_holder(&gw1, "cs_1").await;
            (h["uuid"] == second["uuid"] && h["epoch"] == second["epoch"]).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_a_gateway_is_cut_off_forces_one_full_resync_and_loses_nothing() {
    let etcd = Etcd::start().await;
    let ups: Vec<Upstream> = (0..4).map(|i| Upstream::start(&format!("U{i}"))).collect();
    let pre = prefix("compact");
    let gw1 = etcd_gateway(&store_toml(&etcd, &pre, None), &[("cs_1", &ups[0])]).await;
    let (gw2, relay) = relayed_gateway(&etcd, &pre, &[("cs_1", &ups[0])]).await;
    wait_ready(&gw2, true).await;
    relay.sever();
    wait_ready(&gw2, false).await;
    // three changes while gateway 2 is cut off, then compaction past all of them
    let mut last = Value::Null;
    for (n, up) in ups.iter().enumerate().skip(1) {
        last = put_aliases(&gw1, json!({"cs_1": {"address": up.addr.to_string()}, "cs_9": {"address": format!("127.0.0.1:{}", 9000 + n)}})).await;
    }
    let rev = last["revision"].as_i64().unwrap();
    etcd.ctl(&["compact", &rev.to_string()]);
    let resyncs = gw2
        .metric("hagate_store_resyncs_total", &[("reason", "compacted")])
        .await;
    let swaps = gw2
        .metric(
            "hagate_alias_table_swaps_total",
            &[("source", "etcd"), ("result", "ok")],
        )
        .await;
    relay.heal();
    let haid = hagate::haid::encode("cs_1", &["cs_9"], "41").unwrap();
    routed_within(&gw2, &haid, "U3", Instant::now()).await;
    wait_ready(&gw2, true).await;
    assert_eq!(aliases(&gw2).await["revision"], rev);
    assert_eq!(
        gw2.metric("hagate_store_resyncs_total", &[("reason", "compacted")])
            .await,
        resyncs + 1.0,
        "one full resync"
    );
    // the three changes arrive as one swap: nothing replayed, nothing lost
    assert_eq!(
        gw2.metric(
            "hagate_alias_table_swaps_total",
            &[("source", "etcd"), ("result", "ok")]
        )
        .await,
        swaps + 1.0
    );
    assert_eq!(
        aliases(&gw2).await["instances"]["cs_9"]["address"],
        "127.0.0.1:9003"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restarted_while_etcd_is_down_serves_from_its_snapshot() {
    let mut etcd = Etcd::start().await;
    let (a, b, h) = (
        Upstream::start("A"),
        Upstream::start("B"),
        Upstream::start("H"),
    );
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("state.json");
    let store = store_toml(&etcd, &prefix("snapshot"), Some(&snap));
    let gw = etcd_gateway(&store, &[("cs_1", &a)]).await;
    // the table and a holder, both only in etcd
    let put = put_aliases(
        &gw,
        json!({"cs_1": {"address": a.addr.to_string()}, "cs_2": {"address": b.addr.to_string()}}),
    )
    .await;
    let mut holder_agent = agent(&[&gw], "cs_3", &h);
    wait_primary_at(&gw, "cs_3", &h).await;
    let written = eventually(
        "the snapshot to hold the holder",
        Duration::from_secs(10),
        || async {
            let text = std::fs::read_to_string(&snap).ok()?;
            let v: Value = serde_json::from_str(&text).ok()?;
            (v["state"]["holders"]["cs_3"]["address"] == h.addr.to_string()
                && v["state"]["table"]["revision"] == put["revision"])
                .then_some(v)
        },
    )
    .await;
    drop(gw);
    holder_agent.kill();
    etcd.members[0].kill();
    // a fresh gateway with the same config, etcd unreachable
    let gw = etcd_gateway(&store, &[("cs_1", &a)]).await;
    let haid = hagate::haid::encode("cs_3", &["cs_2"], "51").unwrap();
    assert_eq!(get_haid(&client(), &gw, &haid).await.1["server"], "H");
    let haid2 = hagate::haid::encode("cs_2", &["cs_1"], "52").unwrap();
    assert_eq!(get_haid(&client(), &gw, &haid2).await.1["server"], "B");
    let t = aliases(&gw).await;
    assert_eq!(t["source"], "snapshot", "{t}");
    assert_eq!(t["revision"], written["state"]["revision"]);
    assert!(!ready(&gw).await);
    assert!(
        gw.log().contains("starting from the store snapshot"),
        "{}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_of_a_three_member_etcd_keeps_routing_and_one_holder() {
    let mut etcd = Etcd::cluster(3).await;
    let (a, b, s) = (
        Upstream::start("A"),
        Upstream::start("B"),
        Upstream::start("S"),
    );
    let pre = prefix("cluster");
    let store = store_toml(&etcd, &pre, None);
    let gw1 = etcd_gateway(&store, &[("cs_1", &a), ("cs_2", &b)]).await;
    let gw2 = etcd_gateway(&store, &[("cs_1", &a), ("cs_2", &b)]).await;
    let _holder = agent(&[&gw1, &gw2], "cs_1", &a);
    wait_primary_at(&gw1, "cs_1", &a).await;
    let _standby = agent(&[&gw2, &gw1], "cs_1", &s);
    let haid = hagate::haid::encode("cs_1", &["cs_2"], "61").unwrap();
    let load = load_on_both(&gw1, &gw2, &haid);
    let leader = etcd.leader().await;
    etcd.members[leader].kill();
    let killed = Instant::now();
    // a new leader is elected, and both gateways are in sync again
    wait_ready(&gw1, true).await;
    wait_ready(&gw2, true).await;
    load.served(200, "requests after the election").await;
    let (ok, errors) = load.finish().await;
    eprintln!(
        "etcd leader killed: back in sync after {:?}; {ok} requests, {} errors",
        killed.elapsed(),
        errors.len()
    );
    assert!(errors.is_empty(), "{errors:?}");
    let history = holder_history(&etcd, &pre, "cs_1").await;
    assert!(!history.is_empty());
    // someone holds cs_1 (the holder may have stepped down during the election, and a
    // standby taken over), and both gateways name the same one
    eventually(
        "both gateways to name one holder",
        Duration::from_secs(20),
        || async {
            let (h1, h2) = (
                primary_holder(&gw1, "cs_1").await,
                primary_holder(&gw2, "cs_1").await,
            );
            (h1["uuid"].is_string() && h1["uuid"] == h2["uuid"]).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_survives_the_loss_of_its_gateway() {
    let etcd = Etcd::start().await;
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let store = store_toml(&etcd, &prefix("agentfailover"), None);
    let gw1 = etcd_gateway(&store, &[("cs_1", &b), ("cs_2", &b)]).await;
    let gw2 = etcd_gateway(&store, &[("cs_1", &b), ("cs_2", &b)]).await;
    let mut holder_agent = agent(&[&gw1, &gw2], "cs_1", &a);
    let first = wait_primary_at(&gw2, "cs_1", &a).await;
    drop(gw1);
    // several intervals later the agent still holds the alias, through gateway 2
    let since = Instant::now();
    eventually(
        "3T with the same holder",
        Duration::from_secs(20),
        || async {
            let h = primary_holder(&gw2, "cs_1").await;
            assert_eq!(h["uuid"], first["uuid"], "the holding survived");
            (since.elapsed() > T * 3).then_some(())
        },
    )
    .await;
    assert!(holder_agent.running());
    let haid = hagate::haid::encode("cs_1", &["cs_2"], "71").unwrap();
    assert_eq!(get_haid(&client(), &gw2, &haid).await.1["server"], "A");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_two_gateways_and_etcd_costs_no_errors() {
    let etcd = Etcd::start().await;
    let aliases = ["cs_1", "cs_2", "cs_3"];
    let servers: Vec<Upstream> = aliases.iter().map(|a| Upstream::start(a)).collect();
    let store = store_toml(&etcd, &prefix("chaos"), None);
    let ups = [
        ("cs_1", &servers[0]),
        ("cs_2", &servers[1]),
        ("cs_3", &servers[2]),
    ];
    let gw1 = etcd_gateway(&store, &ups).await;
    let gw2 = etcd_gateway(&store, &ups).await;
    // each cycle waits for the dead holder's lease (T = 2s) to run out
    let report = chaos(&[&gw1, &gw2], servers, &aliases, (I, T, TOKEN), 3).await;
    assert!(report.takeovers >= 3.0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_read_larger_than_a_grpc_message_is_paged() {
    // 45k holder keys are about 4.3 MB: over tonic's 4 MiB message limit in one read
    let etcd = Etcd::start().await;
    let pre = prefix("paged");
    let n = 45_000;
    write_holder_keys(&etcd, &pre, n, "-padding-padding").await;
    let up = Upstream::start("A");
    let gw = Gateway::start(&format!(
        "{}{}[health.active]\nenabled = false\n{}",
        store_toml(&etcd, &pre, None),
        membership_toml(),
        instances(&[("seed", &up)])
    ))
    .await;
    wait_ready(&gw, true).await;
    // every key arrived, none twice (a page boundary is the risky part)
    let t = aliases(&gw).await;
    let instances = t["instances"].as_object().unwrap();
    assert_eq!(instances.len(), n + 1);
    for i in [0, 1999, 2000, 2001, 44_999] {
        assert!(instances.contains_key(&format!("h_{i:06}")), "h_{i:06}");
    }
}

/// A table over etcd's request limit is refused with 413 naming that limit, whichever of
/// etcd's two limits it passes (`--max-request-bytes`, 1.5 MiB, and its gRPC server's,
/// 2 MiB), and the table in use stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_too_large_for_etcd_is_refused_with_413_and_the_old_one_serves() {
    let etcd = Etcd::start().await;
    let up = Upstream::start("A");
    let gw = Gateway::start_with_admin(
        &format!(
            "{}{}{}",
            store_toml(&etcd, &prefix("too-large"), None),
            FAST_HEALTH,
            instances(&[("cs_1", &up)])
        ),
        "max_body = \"16MiB\"",
    )
    .await;
    wait_ready(&gw, true).await;
    let before = aliases(&gw).await["revision"].clone();
    // about 65 bytes an alias as etcd would store them: 1.7 MiB and 5 MiB
    let mut limits = std::collections::BTreeSet::new();
    for n in [28_000, 80_000] {
        let table: serde_json::Map<String, Value> = (0..n)
            .map(|i| {
                (
                    format!("cs_{i:06}"),
                    json!({"address": up.addr.to_string()}),
                )
            })
            .collect();
        let r = client()
            .put(gw.admin_url("/v1/aliases"))
            .json(&json!({ "instances": table }))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let answer: Value = r.json().await.unwrap();
        assert_eq!(status, 413, "{n} aliases: {answer}");
        assert_eq!(answer["error"], "table_too_large_for_store", "{answer}");
        let detail = answer["detail"].as_str().unwrap();
        assert!(detail.contains("--max-request-bytes"), "{detail}");
        limits.extend(
            ["request is too large", "larger than max"]
                .into_iter()
                .filter(|l| detail.contains(l)),
        );
    }
    assert_eq!(
        limits.len(),
        2,
        "both of etcd's limits were met: {limits:?}"
    );
    let now = aliases(&gw).await;
    assert_eq!(now["revision"], before, "{now}");
    assert_eq!(now["instances"].as_object().unwrap().len(), 1);
}
