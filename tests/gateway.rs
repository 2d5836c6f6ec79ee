//! End-to-end: the real gateway in front of real demo context servers on loopback.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hagate::haid;
use serde_json::{json, Value};

fn haid_for(main: &str, backup: &str, id: &str) -> String {
    haid::encode(main, &[backup], id).unwrap()
}

async fn three() -> (Upstream, Upstream, Upstream, Gateway) {
    let a = Upstream::start("cs_1");
    let b = Upstream::start("cs_2");
    let c = Upstream::start("cs_3");
    let body = format!(
        "{FAST_HEALTH}\n{}",
        instances(&[("cs_1", &a), ("cs_2", &b), ("cs_3", &c)])
    );
    let gw = Gateway::start(&body).await;
    (a, b, c, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_to_the_main_from_header_query_and_wrapped_json() {
    let (_a, _b, _c, gw) = three().await;
    let c = client();
    let haid = haid_for("cs_1", "cs_2", "1024");

    let (status, body) = get_haid(&c, &gw, &haid).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["server"], "cs_1");
    assert_eq!(body["role"], "main");
    assert_eq!(body["context_id"], "1024");

    // the query parameter is percent-decoded, and may carry the Gson wrapper (a header
    // that disagrees with it is refused: see conflicting_context_ids_...)
    let wrapped = json!({"type": "HAWorkFlowContextID", "value": json!({"contextId": haid_for("cs_3", "cs_1", "7")}).to_string()}).to_string();
    let r: Value = json_of(
        c.get(gw.url("/x"))
            .query(&[("contextID", wrapped.as_str())]),
    )
    .await;
    assert_eq!(
        (r["server"].as_str(), r["context_id"].as_str()),
        (Some("cs_3"), Some("7"))
    );

    // client-sent x-hagate-* headers are stripped before ours are added
    let r: Value = json_of(
        c.get(gw.url("/x"))
            .header("contextID", &haid)
            .header("x-hagate-role", "forged")
            .header("x-hagate-main-alias", "forged"),
    )
    .await;
    assert_eq!(r["role"], "main");
    assert_eq!(r["main_alias"], Value::Null);

    // requests are counted in pingora's logging phase, after the client has its answer
    gw.wait_metric(
        "hagate_requests_total",
        &[("role", "main"), ("status", "200")],
        3.0,
    )
    .await;
    assert_eq!(gw.metric("hagate_alias_table_size", &[]).await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_of_the_main_under_concurrent_load_costs_no_client_error() {
    let (mut a, b, _c, gw) = three().await;
    let haid = haid_for("cs_1", "cs_2", "42");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let by_backup = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (stop, ok, by_backup) = (stop.clone(), ok.clone(), by_backup.clone());
        let url = gw.url("/api/rest_j/v1/contextservice/getContextValue");
        let haid = haid.clone();
        workers.push(tokio::spawn(async move {
            let c = client();
            let mut errors = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 20_000 {
                n += 1;
                match c.get(&url).header("contextID", &haid).send().await {
                    Ok(r) if r.status() == 200 => {
                        let body: Value = r.json().await.unwrap();
                        if body["server"] == "cs_2" {
                            assert_eq!(body["role"], "backup");
                            by_backup.fetch_add(1, Ordering::Relaxed);
                        }
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => errors.push(format!("status {}", r.status())),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            errors
        }));
    }
    eventually("traffic to flow", Duration::from_secs(10), || {
        let n = ok.load(Ordering::Relaxed);
        async move { (n > 200).then_some(()) }
    })
    .await;
    a.kill();
    eventually(
        "the backup to serve 500 requests",
        Duration::from_secs(20),
        || {
            let n = by_backup.load(Ordering::Relaxed);
            async move { (n > 500).then_some(()) }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for w in workers {
        errors.extend(w.await.unwrap());
    }
    let total = ok.load(Ordering::Relaxed);
    assert!(
        errors.is_empty(),
        "{} client errors in {} requests: {:?}",
        errors.len(),
        total,
        &errors[..errors.len().min(5)]
    );
    assert!(b.stats().await["requests"].as_u64().unwrap() > 500);
    let failovers = gw
        .metric("hagate_failovers_total", &[("reason", "main_down")])
        .await;
    assert!(failovers > 0.0);
    eprintln!(
        "kill -9 under load: {total} requests, 0 errors; retried on connect failure: {}, replayed in flight: {}",
        gw.metric("hagate_failovers_total", &[("reason", "connect_failure")]).await,
        gw.metric("hagate_failovers_total", &[("reason", "in_flight")]).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_to_the_main_only_after_rise_checks() {
    let (mut a, _b, _c, gw) = three().await;
    let c = client();
    let haid = haid_for("cs_1", "cs_2", "9");
    assert_eq!(get_haid(&c, &gw, &haid).await.1["server"], "cs_1");

    a.kill();
    eventually(
        "the main to be marked down",
        Duration::from_secs(10),
        || {
            let gw = &gw;
            async move {
                (gw.metric("hagate_instance_up", &[("alias", "cs_1")]).await == 0.0).then_some(())
            }
        },
    )
    .await;
    eventually("the backup to answer", Duration::from_secs(10), || {
        let (c, gw, haid) = (&c, &gw, &haid);
        async move {
            let (s, body) = get_haid(c, gw, haid).await;
            (s == 200 && body["server"] == "cs_2" && body["role"] == "backup").then_some(())
        }
    })
    .await;

    a.restart();
    let checks_at_failback = eventually("failback to the main", Duration::from_secs(15), || {
        let (c, gw, haid, a) = (&c, &gw, &haid, &a);
        async move {
            let (s, body) = get_haid(c, gw, haid).await;
            assert_eq!(s, 200, "{body}");
            if body["server"] == "cs_1" {
                Some(a.stats().await["health_checks"].as_u64().unwrap())
            } else {
                None
            }
        }
    })
    .await;
    // the restarted main served nothing before it passed `rise` (2) checks in a row
    assert!(
        checks_at_failback >= 2,
        "failback after {checks_at_failback} checks"
    );
    let stats = a.stats().await;
    assert_eq!(stats["requests"], 1, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_answer_is_json_and_clear() {
    let (mut a, mut b, _c, gw) = three().await;
    let c = client();

    // malformed HAID: 400
    for bad in [
        "9-9--nope",
        "8-8--cs_1_devcs_2_devX",
        "4-4--cs_1cs_2",
        "{\"value\":\"{}\"}",
    ] {
        let (s, body) = get_haid(&c, &gw, bad).await;
        assert_eq!(s, 400, "{bad}: {body}");
        assert_eq!(body["error"], "invalid_haid", "{body}");
        assert!(body["detail"].as_str().unwrap().len() > 5);
    }
    // an empty contextID is no context id (as in Linkis): the request is placed
    let (s, body) = get_haid(&c, &gw, "").await;
    assert_eq!((s, body["role"].as_str()), (200, Some("main")), "{body}");
    let r = c.get(gw.url("/x?contextID=%FF")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        gw.metric("hagate_haid_errors_total", &[("reason", "not_numeric")])
            .await
            >= 1.0
    );

    // unknown alias: 404 naming it
    let (s, body) = get_haid(&c, &gw, &haid_for("cs_9", "cs_8", "1")).await;
    assert_eq!(s, 404, "{body}");
    assert_eq!(
        body,
        json!({"error": "unknown_alias", "alias": "cs_9", "detail": "no instance has alias \"cs_9\""})
    );

    // no live instance: 503 with Retry-After
    a.kill();
    b.kill();
    let haid = haid_for("cs_1", "cs_2", "5");
    let (retry_after, body) =
        eventually("a 503 once both are down", Duration::from_secs(10), || {
            let (c, gw, haid) = (&c, &gw, &haid);
            async move {
                let r = send_haid(c, gw, haid).await;
                if r.status() != 503 {
                    return None;
                }
                let ra = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                Some((ra, r.json::<Value>().await.unwrap()))
            }
        })
        .await;
    assert_eq!(retry_after.as_deref(), Some("5"));
    assert_eq!(body["error"], "no_live_instance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_haid_are_placed_and_the_minted_haid_routes_back() {
    let (_a, _b, _c, gw) = three().await;
    let c = client();
    let r: Value = json_of(c.post(gw.url("/api/rest_j/v1/contextservice/createContextID"))).await;
    let main = r["main_alias"].as_str().unwrap().to_string();
    let backup = r["backup_alias"].as_str().unwrap();
    assert_ne!(main, backup);
    assert_eq!(r["server"], main.as_str());
    let minted = r["haid"].as_str().unwrap();
    let (s, body) = get_haid(&c, &gw, minted).await;
    assert_eq!((s, body["server"].as_str()), (200, Some(main.as_str())));
    assert_eq!(
        gw.metric("hagate_placements_total", &[("outcome", "ok")])
            .await,
        1.0
    );
}

fn specs(pairs: &[(&str, &Upstream)]) -> Value {
    let m: BTreeMap<&str, Value> = pairs
        .iter()
        .map(|(a, u)| (*a, json!({"address": u.addr.to_string()})))
        .collect();
    json!({"instances": m})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_table_swaps_under_load_cost_no_errors() {
    let (a, b, c3, gw) = three().await;
    let haid = haid_for("cs_1", "cs_2", "77");
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..6 {
        let (stop, served) = (stop.clone(), served.clone());
        let url = gw.url("/x");
        let haid = haid.clone();
        workers.push(tokio::spawn(async move {
            let c = client();
            let (mut ok, mut errors) = (0usize, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).header("contextID", &haid).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok += 1;
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => errors.push(format!(
                        "{} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            (ok, errors)
        }));
    }
    let c = client();
    // 40 swaps through the admin API, moving cs_1 between two live servers; each swap
    // waits for 5 more requests to be served, so every swap happens under traffic
    // whatever the speed of the machine
    for i in 0..40 {
        let seen = served.load(Ordering::Relaxed);
        eventually("traffic between swaps", Duration::from_secs(10), || {
            let n = served.load(Ordering::Relaxed);
            async move { (n >= seen + 5).then_some(()) }
        })
        .await;
        let target = if i % 2 == 0 { &c3 } else { &a };
        let r = c
            .put(gw.admin_url("/v1/aliases"))
            .json(&specs(&[("cs_1", target), ("cs_2", &b), ("cs_3", &c3)]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    // a bad table is refused with the field named, and the old one keeps serving
    put_bad_table(&gw).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut errors) = (0, Vec::new());
    for w in workers {
        let (o, e) = w.await.unwrap();
        ok += o;
        errors.extend(e);
    }
    assert!(
        errors.is_empty(),
        "{} errors in {ok} requests: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests");
    assert_eq!(gw.metric("hagate_alias_table_version", &[]).await, 41.0);
    assert_eq!(
        gw.metric(
            "hagate_alias_table_swaps_total",
            &[("source", "api"), ("result", "error")]
        )
        .await,
        1.0
    );
    // the last swap put cs_1 on `a`
    assert_eq!(get_haid(&c, &gw, &haid).await.1["server"], "cs_1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_edits_and_sighup_swap_the_table_and_bad_ones_are_refused() {
    let (a, _b, c3, gw) = three().await;
    let c = client();
    let haid = haid_for("cs_1", "cs_2", "3");
    assert_eq!(get_haid(&c, &gw, &haid).await.1["server"], "cs_1");

    // edit the file: cs_1 now points at the server named cs_3
    let a_addr = a.addr.to_string();
    let c3_addr = c3.addr.to_string();
    gw.rewrite(|old| old.replacen(&a_addr, &c3_addr, 1));
    gw.wait_served_by(&haid, "cs_3").await;

    // a broken edit is refused and the old table keeps serving
    let before = gw.metric("hagate_alias_table_version", &[]).await;
    gw.rewrite(|old| old.replace("rise = 2", "rise = 0"));
    gw.wait_metric(
        "hagate_alias_table_swaps_total",
        &[("source", "config"), ("result", "error")],
        1.0,
    )
    .await;
    assert!(
        gw.log().contains("health.active.rise: must be at least 1"),
        "{}",
        gw.log()
    );
    assert_eq!(gw.metric("hagate_alias_table_version", &[]).await, before);
    assert_eq!(get_haid(&c, &gw, &haid).await.1["server"], "cs_3");
    // the refusal shows in the gauge an alert watches, the last success stays
    assert_eq!(
        gw.metric("hagate_config_last_reload_successful", &[]).await,
        0.0
    );
    let applied = gw
        .metric("hagate_config_last_reload_success_timestamp_seconds", &[])
        .await;
    assert!(applied > 1.7e9, "{applied}");
    let reloads = gw
        .metric("hagate_config_reload_duration_seconds_count", &[])
        .await;
    assert!(reloads >= 2.0, "{reloads}");

    // fix it and signal: SIGHUP reloads too
    gw.rewrite(|old| {
        old.replace("rise = 0", "rise = 2")
            .replacen(&c3_addr, &a_addr, 1)
    });
    sighup(&gw);
    gw.wait_served_by(&haid, "cs_1").await;
    gw.wait_metric(
        "hagate_alias_table_swaps_total",
        &[("source", "sighup"), ("result", "ok")],
        1.0,
    )
    .await;
    assert_eq!(
        gw.metric("hagate_config_last_reload_successful", &[]).await,
        1.0
    );
    assert!(
        gw.metric("hagate_config_last_reload_success_timestamp_seconds", &[])
            .await
            >= applied
    );

    // SIGHUP with nothing changed: the config is not parsed again, the table is kept
    let version = gw.metric("hagate_alias_table_version", &[]).await;
    let last = sighup_reloaded(&gw, 2.0).await;
    assert!(
        last.as_deref()
            .is_some_and(|l| l.contains("config_file=\"unchanged\"")
                && l.contains("table=\"kept\"")
                && l.contains("table_file=\"none\"")),
        "{last:?}"
    );
    assert_eq!(gw.metric("hagate_alias_table_version", &[]).await, version);
    assert_eq!(get_haid(&c, &gw, &haid).await.1["server"], "cs_1");
}

/// Sends SIGHUP and waits for the `n`th reload by SIGHUP; the log line of the last one.
async fn sighup_reloaded(gw: &Gateway, n: f64) -> Option<String> {
    sighup(gw);
    gw.wait_metric(
        "hagate_alias_table_swaps_total",
        &[("source", "sighup"), ("result", "ok")],
        n,
    )
    .await;
    gw.log()
        .lines()
        .rfind(|l| l.contains("config reloaded") && l.contains("source=\"sighup\""))
        .map(str::to_string)
}

/// Sends SIGHUP to the gateway.
fn sighup(gw: &Gateway) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// `[table] file`: the alias table from a JSON file of its own; editing it swaps the table,
/// and a bad edit is refused naming the field and the file while the old table serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_file_is_watched_and_a_bad_one_is_refused() {
    let (a, b) = (Upstream::start("cs_1"), Upstream::start("cs_2"));
    let c3 = Upstream::start("cs_3");
    let files = tempfile::tempdir().unwrap();
    let table = files.path().join("aliases.json");
    // written beside and renamed in, as a deploy tool would
    let put = |text: String| {
        let tmp = files.path().join("aliases.json.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &table).unwrap();
    };
    let write = |main: &Upstream| {
        put(json!({"instances": {
            "cs_1": {"address": main.addr.to_string(), "labels": {"zone": "a"}},
            "cs_2": {"address": b.addr.to_string(), "weight": 2},
        }})
        .to_string())
    };
    write(&a);
    let body = format!(
        "{FAST_HEALTH}\n[table]\nfile = {:?}\n",
        table.display().to_string()
    );
    let gw = Gateway::start(&body).await;
    let c = client();
    let haid = haid_for("cs_1", "cs_2", "5");
    assert_eq!(get_haid(&c, &gw, &haid).await.1["server"], "cs_1");
    let aliases: Value = json_of(c.get(gw.admin_url("/v1/aliases"))).await;
    assert_eq!(aliases["instances"]["cs_2"]["weight"], 2, "{aliases}");

    // the first reload finds the file as the start read it: not parsed again
    let first = sighup_reloaded(&gw, 1.0).await;
    assert!(
        first
            .as_deref()
            .is_some_and(|l| l.contains("table=\"kept\"")
                && l.contains("table_file=\"unchanged\"")
                && l.contains("config_file=\"unchanged\"")),
        "{first:?}"
    );

    // an edit of the file swaps the table: cs_1 now points at the server named cs_3
    write(&c3);
    gw.wait_served_by(&haid, "cs_3").await;

    // a bad address is refused, naming the field and the file; the old table serves
    let before = gw.metric("hagate_alias_table_version", &[]).await;
    put(json!({"instances": {"cs_1": {"address": "nowhere"}}}).to_string());
    gw.wait_metric(
        "hagate_alias_table_swaps_total",
        &[("source", "config"), ("result", "error")],
        1.0,
    )
    .await;
    let log = gw.log();
    assert!(
        log.contains("instances.cs_1.address") && log.contains("aliases.json"),
        "{log}"
    );
    assert_eq!(gw.metric("hagate_alias_table_version", &[]).await, before);
    assert_eq!(get_haid(&c, &gw, &haid).await.1["server"], "cs_3");

    // fixed: served by cs_1 again
    write(&a);
    gw.wait_served_by(&haid, "cs_1").await;

    // A reload that finds the table file as it was keeps the table in use: the edit of
    // the config applies, and the table's version stays, by the config's watch and by
    // SIGHUP alike.
    let version = gw.metric("hagate_alias_table_version", &[]).await;
    for (n, source) in [(1, "config"), (1, "sighup"), (2, "config")] {
        let done = [("source", source), ("result", "ok")];
        let before = gw.metric("hagate_alias_table_swaps_total", &done).await;
        if source == "sighup" {
            sighup(&gw);
        } else {
            gw.rewrite(|old| format!("{old}\n# edit {n}, beside the table\n"));
        }
        gw.wait_metric("hagate_alias_table_swaps_total", &done, before + 1.0)
            .await;
        assert_eq!(
            gw.metric("hagate_alias_table_version", &[]).await,
            version,
            "{source} {n}"
        );
    }
    let count = |what: &str| {
        gw.log()
            .lines()
            .filter(|l| l.contains("config reloaded") && l.contains(what))
            .count()
    };
    // the three here and the first one
    assert_eq!(count("table=\"kept\""), 4, "{}", gw.log());
    assert_eq!(count("table_file=\"unchanged\""), 4, "{}", gw.log());
    // the config itself was read again only where it was edited
    assert_eq!(count("config_file=\"read\""), 2, "{}", gw.log());
    assert_eq!(get_haid(&c, &gw, &haid).await.1["server"], "cs_1");
    // and a change of the file is still read and swapped in
    write(&c3);
    gw.wait_served_by(&haid, "cs_3").await;
    assert!(gw.metric("hagate_alias_table_version", &[]).await > version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_writes_need_the_token() {
    let a = Upstream::start("cs_1");
    let body = format!("{FAST_HEALTH}\n{}", instances(&[("cs_1", &a)]));
    let gw = Gateway::start_with_admin(&body, "token = \"s3cret\"").await;
    let c = client();
    let put = |auth: Option<&'static str>| {
        let mut r = c
            .put(gw.admin_url("/v1/aliases"))
            .json(&specs(&[("cs_1", &a)]));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    assert_eq!(put(None).await.unwrap().status(), 401);
    assert_eq!(put(Some("Bearer wrong")).await.unwrap().status(), 403);
    assert_eq!(put(Some("Bearer s3cret")).await.unwrap().status(), 200);
    let aliases: Value = json_of(c.get(gw.admin_url("/v1/aliases"))).await;
    assert_eq!(aliases["version"], 2);
    assert_eq!(aliases["instances"]["cs_1"]["address"], a.addr.to_string());
}

/// One raw request to the admin listener (`connection: close`); the answer's status line
/// and body.
async fn admin_raw(gw: &Gateway, request: &[u8]) -> (String, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a complete answer");
    let status = head.lines().next().unwrap().to_string();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// `admin.max_body` bounds `PUT /v1/aliases`: a bigger body gets 413 naming the setting,
/// whether it declares its length or is chunked, and the table in use stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_over_admin_max_body_is_refused_with_413_and_the_old_one_serves() {
    let a = Upstream::start("cs_1");
    let body = format!("{FAST_HEALTH}\n{}", instances(&[("cs_1", &a)]));
    let gw = Gateway::start_with_admin(&body, "max_body = \"2KiB\"").await;
    let big: BTreeMap<String, Value> = (0..100)
        .map(|i| (format!("cs_{i}"), json!({"address": a.addr.to_string()})))
        .collect();
    let big = serde_json::to_string(&json!({ "instances": big })).unwrap();
    assert!(big.len() > 2048);
    let head = "PUT /v1/aliases HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\
                content-type: application/json\r\n";
    // declared too long: refused from the head alone
    let declared = format!("{head}content-length: {}\r\n\r\n", big.len());
    // chunked: refused once the chunks pass the limit
    let mut chunked = format!("{head}transfer-encoding: chunked\r\n\r\n");
    for piece in big.as_bytes().chunks(700) {
        chunked += &format!(
            "{:x}\r\n{}\r\n",
            piece.len(),
            std::str::from_utf8(piece).unwrap()
        );
    }
    chunked += "0\r\n\r\n";
    for request in [declared, chunked] {
        let (status, answer) = admin_raw(&gw, request.as_bytes()).await;
        assert!(status.starts_with("HTTP/1.1 413"), "{status}: {answer}");
        assert_eq!(answer["error"], "body_too_large", "{answer}");
        assert_eq!(answer["field"], "admin.max_body", "{answer}");
    }
    let c = client();
    let aliases: Value = json_of(c.get(gw.admin_url("/v1/aliases"))).await;
    assert_eq!(aliases["version"], 1);
    // under the limit, the same endpoint takes a table
    let small = c
        .put(gw.admin_url("/v1/aliases"))
        .json(&specs(&[("cs_9", &a)]))
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), 200);
    let aliases: Value = json_of(c.get(gw.admin_url("/v1/aliases"))).await;
    assert_eq!(aliases["version"], 2);
    assert_eq!(aliases["instances"]["cs_9"]["address"], a.addr.to_string());
}

/// A table body bigger than 256 KiB is parsed on a thread of its own (at nice +10, so that
/// it yields to the proxy): a good one is applied whole, and a bad one is refused with a
/// JSON 400 that names what was wrong, while the table in use keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_table_is_parsed_off_the_admin_thread_and_a_bad_one_named() {
    let a = Upstream::start("cs_1");
    let gw = Gateway::start(&format!("{FAST_HEALTH}\n{}", instances(&[("cs_1", &a)]))).await;
    let table = |bad: bool| {
        let mut m: BTreeMap<String, Value> = (0..8000)
            .map(|i| (format!("cs_{i}"), json!({"address": a.addr.to_string()})))
            .collect();
        if bad {
            m.insert("cs_7999".into(), json!({"adress": a.addr.to_string()}));
        }
        serde_json::to_string(&json!({ "instances": m })).unwrap()
    };
    let (good, bad) = (table(false), table(true));
    assert!(
        good.len() > 256 << 10 && bad.len() > 256 << 10,
        "{}",
        good.len()
    );
    let c = client();
    let put = |body: String| {
        c.put(gw.admin_url("/v1/aliases"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let answer = put(good).await.unwrap();
    assert_eq!(answer.status(), 200);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["size"], 8000, "{answer}");
    let answer = put(bad).await.unwrap();
    assert_eq!(answer.status(), 400);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["error"], "invalid_alias_table", "{answer}");
    let detail = answer["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("unknown field `adress`"), "{answer}");
    let aliases: Value = json_of(c.get(gw.admin_url("/v1/aliases"))).await;
    assert_eq!(aliases["version"], 2);
    assert_eq!(
        aliases["instances"].as_object().map(|m| m.len()),
        Some(8000)
    );
    // and it routes by aliases only the new table has (all on `a`)
    let (status, body) = get_haid(&c, &gw, &haid_for("cs_7998", "cs_7999", "1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["server"], "cs_1", "{body}");
}

/// Makes `main` (named as its alias) answer 500 and sends it `haid` until it is ejected:
/// consecutive_failures = 3, so three 500s reach the client (the answer is the server's own).
async fn eject_the_main(main: &Upstream, gw: &Gateway, haid: &str) {
    let c = client();
    main.set_status(500).await;
    for _ in 0..3 {
        let (s, body) = get_haid(&c, gw, haid).await;
        assert_eq!(
            (s, body["server"].as_str()),
            (500, Some(main.name.as_str()))
        );
    }
    assert_eq!(
        gw.metric("hagate_passive_ejections_total", &[("alias", &main.name)])
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_eject_the_main_until_it_passes_rise_checks() {
    let (a, _b, _c, gw) = three().await;
    let c = client();
    let haid = haid_for("cs_1", "cs_2", "55");
    eject_the_main(&a, &gw, &haid).await;
    // ejected: the backup serves while the main keeps passing its /health checks
    let (s, body) = get_haid(&c, &gw, &haid).await;
    assert_eq!(
        (s, body["server"].as_str(), body["role"].as_str()),
        (200, Some("cs_2"), Some("backup"))
    );
    // once fixed, the main comes back after the ejection time and `rise` passing checks
    a.set_status(200).await;
    gw.wait_served_by(&haid, "cs_1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_that_leaves_the_table_takes_its_series_with_it() {
    let (a, b, c3, gw) = three().await;
    let c = client();
    let haid = haid_for("cs_1", "cs_2", "56");
    // cs_1 serves, is checked, and is ejected by three 500s
    eject_the_main(&a, &gw, &haid).await;
    let checked = [("alias", "cs_1"), ("result", "pass")];
    gw.wait_metric("hagate_health_checks_total", &checked, 1.0)
        .await;
    let checked_2 = [("alias", "cs_2"), ("result", "pass")];
    gw.wait_metric("hagate_health_checks_total", &checked_2, 1.0)
        .await;
    gw.wait_metric(
        "hagate_instance_requests_total",
        &[("alias", "cs_1"), ("class", "5xx")],
        3.0,
    )
    .await;
    let ejected = [("alias", "cs_1")];
    let names = |text: &str, alias: &str| {
        let label = format!("alias=\"{alias}\"");
        text.lines()
            .filter(|l| l.contains(&label))
            .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
            .collect::<std::collections::BTreeSet<_>>()
    };
    let before = names(&gw.metrics_text().await, "cs_1");
    for series in [
        "hagate_instance_requests_total",
        "hagate_health_checks_total",
        "hagate_passive_ejections_total",
        "hagate_instance_up",
    ] {
        assert!(before.contains(series), "{before:?}");
    }
    // a table without cs_1: none of its series is left, and cs_2's are
    let put = |pairs: &[(&str, &Upstream)]| {
        c.put(gw.admin_url("/v1/aliases"))
            .json(&specs(pairs))
            .send()
    };
    let r = put(&[("cs_2", &b), ("cs_3", &c3)]).await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let after = gw.metrics_text().await;
    assert!(names(&after, "cs_1").is_empty(), "{after}");
    for series in ["hagate_health_checks_total", "hagate_instance_up"] {
        assert!(names(&after, "cs_2").contains(series), "{after}");
    }
    assert!(gw.metric("hagate_health_checks_total", &checked_2).await >= 1.0);
    // back: its counts start again from zero
    let r = put(&[("cs_1", &a), ("cs_2", &b), ("cs_3", &c3)])
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    a.set_status(200).await;
    let (s, body) = get_haid(&c, &gw, &haid).await;
    assert_eq!((s, body["server"].as_str()), (200, Some("cs_1")));
    let served = [("alias", "cs_1"), ("class", "2xx")];
    gw.wait_metric("hagate_instance_requests_total", &served, 1.0)
        .await;
    let failed = [("alias", "cs_1"), ("class", "5xx")];
    assert_eq!(
        gw.metric("hagate_instance_requests_total", &failed).await,
        0.0
    );
    assert_eq!(
        gw.metric("hagate_passive_ejections_total", &ejected).await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_health_config_restarts_the_checks() {
    let (a, _b, _c, gw) = three().await;
    let haid = haid_for("cs_1", "cs_2", "8");
    gw.wait_served_by(&haid, "cs_1").await;
    // cs_1 answers 500 on every path but /health; point the checks at another path
    a.set_status(500).await;
    gw.rewrite(|old| old.replace("path = \"/health\"", "path = \"/status\""));
    gw.wait_metric(
        "hagate_health_transitions_total",
        &[("alias", "cs_1"), ("to", "down")],
        1.0,
    )
    .await;
    let (s, body) = get_haid(&client(), &gw, &haid).await;
    assert_eq!((s, body["server"].as_str()), (200, Some("cs_2")));
    // and back: the checks follow the config again
    gw.rewrite(|old| old.replace("path = \"/status\"", "path = \"/health\""));
    gw.wait_served_by(&haid, "cs_1").await;
}

/// Servers A (`cs_1`) and B (`cs_2`) behind one gateway.
async fn two() -> (Upstream, Upstream, Gateway) {
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let gw = Gateway::start(&format!(
        "{FAST_HEALTH}{}",
        instances(&[("cs_1", &a), ("cs_2", &b)])
    ))
    .await;
    (a, b, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_include_process_and_build_info() {
    let (_a, _b, gw) = two().await;
    let text = gw.metrics_text().await;
    for series in [
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "hagate_build_info{version=\"",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(series)),
            "{series} missing"
        );
    }
    assert!(gw.metric("process_open_fds", &[]).await > 0.0);
    assert_eq!(
        gw.metric(
            "hagate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_context_ids_are_refused_and_identical_ones_routed() {
    let (_a, _b, gw) = two().await;
    let c = client();
    let one = hagate::haid::encode("cs_1", &["cs_2"], "7").unwrap();
    let other = hagate::haid::encode("cs_2", &["cs_1"], "7").unwrap();
    let url = gw.url("/api/rest_j/v1/contextservice/getContextValue");
    let ambiguous = [
        // two headers that name different HAIDs
        c.get(&url)
            .header("contextID", &one)
            .header("contextID", &other),
        // two query parameters that differ
        c.get(format!("{url}?contextID={one}&contextID={other}")),
        // a query parameter that disagrees with the header
        c.get(format!("{url}?contextID={one}"))
            .header("contextID", &other),
    ];
    for req in ambiguous {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 400);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "ambiguous_context_id", "{body}");
    }
    // identical duplicates are one value, routed
    for req in [
        c.get(&url)
            .header("contextID", &one)
            .header("contextID", &one),
        c.get(format!("{url}?contextID={one}"))
            .header("contextID", &one),
    ] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<serde_json::Value>().await.unwrap()["server"], "A");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_haid_split_inside_a_surrogate_pair_is_accepted_as_linkis_does() {
    let (_a, _b, gw) = two().await;
    let c = client();
    // main cs_1; the backup is "cs" plus a lone high surrogate; a third alias takes the
    // low half: Linkis accepts it, and the broken backup matches nothing
    let (status, body) = get_haid(&c, &gw, "4-3-1--cs_1cs\u{1F600}7").await;
    assert_eq!(
        (status, body["server"].as_str()),
        (200, Some("A")),
        "{body}"
    );
    // both aliases broken: valid for Linkis, but no instance has either alias
    let (status, body) = get_haid(&c, &gw, "1-2--\u{1F600}b7").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "unknown_alias");
    assert_eq!(body["alias"], "?");
}
