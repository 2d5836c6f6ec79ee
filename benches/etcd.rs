//! Several gateways on one real etcd, measured:
//!
//! 1. **Propagation**: from `PUT /v1/aliases` on gateway 1 (a 10k-alias table with one
//!    alias moved) to the first request that gateway 2 routes to the new address; and from
//!    a claim accepted by gateway 1 (a takeover) to the first request gateway 2 routes to
//!    the new holder. p50 and p99 over the rounds.
//! 2. **Full resync**: a gateway starting on a prefix with 100k holder keys: the time to
//!    `/readyz` 200 with all of them in its table, and the CPU the gateway spent on it
//!    (`utime + stime` from `/proc/PID/stat`).
//! 3. **Holder changes at that size**: one holder key rewritten (a new address) 5 times a
//!    second, each once the one before is applied: the gateway's CPU per change, and how
//!    often the control plane's watchdog timer (`hagate_control_plane_lag_seconds`, set
//!    every 100 ms) woke more than 10, 50 and 100 ms late. Each change is patched into the
//!    merged 100k-alias table, which is built again, off the control plane's thread: no
//!    tick should be late.
//!
//! `cargo bench --bench etcd` runs the full sizes. Under `cargo test --all-targets` it runs
//! once at small sizes, as a check that the bench still works.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use common::etcd::{store_toml, write_holder_keys, Etcd};
use common::*;

const TOKEN: &str = "s3cret";

struct Sizes {
    aliases: usize,
    rounds: usize,
    resync_holders: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{what}: p50 {:?}, p99 {:?}, max {:?} over {} rounds",
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples.last().unwrap(),
        samples.len()
    );
}

fn gateway_body(store: &str) -> String {
    // Active checks off: the bench's many aliases point at few addresses, and it measures
    // the store, not health checking.
    format!(
        "{store}[membership]\nenabled = true\ninterval = \"500ms\"\ntimeout = \"2s\"\ntoken = \"{TOKEN}\"\n\
         [health.active]\nenabled = false\n"
    )
}

/// Sends `haid` to `gw` until `server` answers; the time since `since`.
async fn first_routed(
    c: &reqwest::Client,
    gw: &Gateway,
    haid: &str,
    server: &str,
    since: Instant,
) -> Duration {
    let deadline = since + Duration::from_secs(30);
    loop {
        if get_haid(c, gw, haid).await.1["server"] == server {
            return since.elapsed();
        }
        assert!(Instant::now() < deadline, "{haid} never reached {server}");
    }
}

fn table(n: usize, filler: &Upstream, probe: &Upstream) -> Value {
    let mut instances = serde_json::Map::new();
    for i in 0..n {
        instances.insert(
            format!("cs_{i:05}"),
            json!({"address": filler.addr.to_string()}),
        );
    }
    instances.insert("probe".into(), json!({"address": probe.addr.to_string()}));
    Value::Object(instances)
}

async fn propagation(sizes: &Sizes) {
    let etcd = Etcd::start().await;
    let (u0, u1) = (Upstream::start("U0"), Upstream::start("U1"));
    let store = store_toml(&etcd, "/bench/propagation", None);
    let body = format!(
        "{}[instances.seed]\naddress = \"{}\"\n",
        gateway_body(&store),
        u0.addr
    );
    let gw1 = Gateway::start(&body).await;
    let gw2 = Gateway::start(&body).await;
    let c = client();
    let haid = hagate::haid::encode("probe", &["cs_00000"], "1").unwrap();
    let mut puts = Vec::new();
    for round in 0..sizes.rounds {
        let (to, name) = if round % 2 == 0 {
            (&u1, "U1")
        } else {
            (&u0, "U0")
        };
        let t = table(sizes.aliases, &u0, to);
        let started = Instant::now();
        let r = c
            .put(gw1.admin_url("/v1/aliases"))
            .json(&json!({ "instances": t }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        puts.push(first_routed(&c, &gw2, &haid, name, started).await);
    }
    report(
        &format!(
            "PUT /v1/aliases ({} aliases) on gateway 1 -> routed by gateway 2",
            sizes.aliases
        ),
        puts,
    );
    let mut claims = Vec::new();
    for round in 0..sizes.rounds {
        let alias = format!("m_{round}");
        let started = Instant::now();
        let r = c
            .post(gw1.admin_url("/v1/membership/heartbeat"))
            .bearer_auth(TOKEN)
            .json(&json!({"uuid": format!("u{round}"), "alias": alias, "address": u1.addr.to_string(), "last_seen": 0}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let haid = hagate::haid::encode(&alias, &["cs_00000"], "2").unwrap();
        claims.push(first_routed(&c, &gw2, &haid, "U1", started).await);
    }
    report(
        &format!(
            "claim accepted by gateway 1 -> routed by gateway 2 ({} aliases)",
            sizes.aliases
        ),
        claims,
    );
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    // fields[11] and [12] are utime and stime (the 14th and 15th of the whole line)
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

async fn resync(sizes: &Sizes) {
    let etcd = Etcd::start().await;
    let prefix = "/bench/resync";
    let written = Instant::now();
    write_holder_keys(&etcd, prefix, sizes.resync_holders, "").await;
    println!(
        "wrote {} holder keys in {:?}",
        sizes.resync_holders,
        written.elapsed()
    );
    let store = store_toml(&etcd, prefix, None);
    let body = format!(
        "{}[instances.seed]\naddress = \"127.0.0.1:1\"\n",
        gateway_body(&store)
    );
    let started = Instant::now();
    let gw = Gateway::start(&body).await;
    let cpu0 = cpu_seconds(gw.pid());
    let up = Instant::now();
    let want = (sizes.resync_holders + 1) as f64;
    eventually("the full resync", Duration::from_secs(300), || async {
        let ready = client()
            .get(gw.admin_url("/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        (ready && gw.metric("hagate_alias_table_size", &[]).await >= want).then_some(())
    })
    .await;
    let took = up.elapsed();
    let cpu = cpu_seconds(gw.pid()) - cpu0;
    println!(
        "full resync of {} aliases: {took:?} from the gateway up to ready with all of them ({:?} from spawn), {cpu:.2} s of gateway CPU",
        sizes.resync_holders,
        started.elapsed()
    );
    holder_changes(&etcd, prefix, &gw, sizes.rounds.min(50)).await;
}

async fn holder_changes(etcd: &Etcd, prefix: &str, gw: &Gateway, changes: usize) {
    const LAG: &str = "hagate_control_plane_lag_seconds";
    let late = || async {
        // one scrape, so that the count and the buckets agree
        let text = gw.metrics_text().await;
        let ticks = metric_in(&text, &format!("{LAG}_count"), &[]);
        let mut late = [0.0; 3];
        for (n, le) in late.iter_mut().zip(["0.01", "0.05", "0.1"]) {
            *n = ticks - metric_in(&text, &format!("{LAG}_bucket"), &[("le", le)]);
        }
        (ticks, late)
    };
    let moved = Upstream::start("moved");
    let (mut etcd_client, c) = (etcd.client().await, client());
    let (ticks0, late0) = late().await;
    let cpu0 = cpu_seconds(gw.pid());
    for i in 0..changes {
        let alias = format!("h_{i:06}");
        let value = json!({"uuid": format!("uuid-{i:06}"), "address": moved.addr.to_string()});
        etcd_client
            .put(format!("{prefix}/alias/{alias}"), value.to_string(), None)
            .await
            .unwrap();
        // applied once the alias routes to its new address: a request, where a scrape
        // of 100k aliases' series would cost the gateway more than the change
        let haid = hagate::haid::encode(&alias, &[alias.as_str()], "1").unwrap();
        eventually(
            "the holder change routed",
            Duration::from_secs(30),
            || async { (get_haid(&c, gw, &haid).await.1["server"] == "moved").then_some(()) },
        )
        .await;
        // pacing, not synchronising: about the rate of a rolling restart's claims
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cpu = cpu_seconds(gw.pid()) - cpu0;
    let (ticks, late) = late().await;
    println!(
        "{changes} holder changes: {:.1} ms of gateway CPU each; control plane timer ticks: {}, later than 10 ms: {}, 50 ms: {}, 100 ms: {}",
        cpu * 1000.0 / changes as f64,
        ticks - ticks0,
        late[0] - late0[0],
        late[1] - late0[1],
        late[2] - late0[2],
    );
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let sizes = if bench {
        Sizes {
            aliases: 10_000,
            rounds: 100,
            resync_holders: 100_000,
        }
    } else {
        Sizes {
            aliases: 200,
            rounds: 3,
            resync_holders: 500,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        propagation(&sizes).await;
        resync(&sizes).await;
    });
}
