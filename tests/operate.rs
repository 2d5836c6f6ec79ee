//! What an operator runs hagate with: JSON logs and the access log, per-instance metrics,
//! quiet logs for clients that go away. Real gateway, real demo servers.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The log's JSON lines (every line must be one).
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn access_events(log: &str) -> Vec<Value> {
    json_lines(log)
        .into_iter()
        .filter(|v| v["target"] == "hagate::access")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_one_access_event_per_request_and_clients_leaving_are_no_errors() {
    let b = Upstream::start("B");
    // cs_1 refuses connections: its requests fail over to cs_2 (with no active checks,
    // the failover happens on the request, not by routing)
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let gw = Gateway::start(&format!(
        "[log]\nformat = \"json\"\naccess = true\n\n[health.active]\nenabled = false\n\n[instances.cs_1]\naddress = \"{dead_addr}\"\n{}",
        instances(&[("cs_2", &b)])
    ))
    .await;
    let c = client();
    let haid = hagate::haid::encode("cs_2", &["cs_1"], "4711").unwrap();
    let r = c
        .get(gw.url("/api/v1/ctx"))
        .header("contextID", &haid)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let over = hagate::haid::encode("cs_1", &["cs_2"], "4712").unwrap();
    let r = c
        .post(gw.url("/api/v1/over"))
        .header("contextID", &over)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // a client that sends half a body and leaves
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    let head = format!(
        "POST /api/v1/gone HTTP/1.1\r\nHost: gw\r\ncontextID: {haid}\r\nContent-Length: 1000\r\n\r\nabc"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    drop(s);

    let events = eventually("three access events", Duration::from_secs(10), || {
        let log = gw.log();
        async move {
            let events = access_events(&log);
            (events.len() >= 3).then_some(events)
        }
    })
    .await;
    let by_path = |p: &str| {
        events
            .iter()
            .find(|e| e["path"] == p)
            .unwrap_or_else(|| panic!("no access event for {p}: {events:?}"))
            .clone()
    };
    let ok = by_path("/api/v1/ctx");
    assert_eq!(ok["level"], "INFO");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["role"], "main");
    assert_eq!(ok["alias"], "cs_2");
    assert_eq!(ok["upstream"], b.addr.to_string());
    assert_eq!(ok["attempts"], 1);
    assert_eq!(ok["failed_over"], false);
    assert_eq!(ok["context_id"], "4711");
    assert!(ok["duration_us"].as_u64().is_some_and(|d| d > 0), "{ok}");

    let over = by_path("/api/v1/over");
    assert_eq!(over["status"], 200);
    assert_eq!(over["role"], "backup");
    assert_eq!(over["alias"], "cs_2");
    assert_eq!(over["attempts"], 2);
    assert_eq!(over["failed_over"], true);
    assert_eq!(over["context_id"], "4712");

    let gone = by_path("/api/v1/gone");
    assert_eq!(gone["alias"], "cs_2");

    // per-instance request metrics
    assert_eq!(
        gw.metric(
            "hagate_instance_requests_total",
            &[("alias", "cs_2"), ("class", "2xx")]
        )
        .await,
        2.0
    );
    assert!(
        gw.metric(
            "hagate_instance_request_duration_seconds_count",
            &[("alias", "cs_2")]
        )
        .await
            >= 2.0
    );
    // the client that left is not an ERROR (pingora logs it as one)
    let errors: Vec<Value> = json_lines(&gw.log())
        .into_iter()
        .filter(|v| v["level"] == "ERROR")
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_is_off_by_default_and_text_is_the_default_format() {
    let a = Upstream::start("A");
    let gw = Gateway::start(&instances(&[("cs_1", &a), ("cs_2", &a)])).await;
    let haid = hagate::haid::encode("cs_1", &["cs_2"], "1").unwrap();
    let (status, _) = get_haid(&client(), &gw, &haid).await;
    assert_eq!(status, 200);
    gw.wait_metric(
        "hagate_instance_requests_total",
        &[("alias", "cs_1"), ("class", "2xx")],
        1.0,
    )
    .await;
    let log = gw.log();
    assert!(log.contains("hagate is serving"), "{log}");
    assert!(!log.contains("hagate::access"), "{log}");
    assert!(log.lines().all(|l| !l.starts_with('{')), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_load_fails_no_request_and_the_new_process_serves() {
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let mut gw = Gateway::start_full(
        &instances(&[("cs_1", &a), ("cs_2", &b)]),
        "pid_file = \"hagate.pid\"\nupgrade_sock = \"upgrade.sock\"",
        "",
        None,
    )
    .await;
    let pid_file = gw.dir.path().join("hagate.pid");
    let old_pid = gw.pid();
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        old_pid.to_string()
    );
    let haid = hagate::haid::encode("cs_1", &["cs_2"], "7").unwrap();
    // keep-alive clients, each sending one request after another, all the way through
    let load = {
        let (proxy, haid) = (gw.proxy, haid.clone());
        Load::start(4, move |c, _, i| {
            c.post(format!("http://{proxy}/api/v1/n/{i}"))
                .header("contextID", &haid)
                .body("x".repeat(64))
        })
    };
    load.served(50, "requests before the upgrade").await;
    gw.upgrade().await;
    let new_pid = gw.pid();
    assert_ne!(new_pid, old_pid);
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        new_pid.to_string()
    );
    // the new process serves the proxy and the admin API
    load.served(50, "requests after the upgrade").await;
    let served = gw
        .metric(
            "hagate_requests_total",
            &[("role", "main"), ("status", "200")],
        )
        .await;
    assert!(served > 0.0, "the new process served nothing");
    let (ok, errors) = load.finish().await;
    assert!(
        errors.is_empty(),
        "{} failed of {}: {errors:?}",
        errors.len(),
        ok + errors.len() as u64
    );
    let log = gw.log();
    assert!(log.contains("upgraded=true"), "{log}");
}

/// A test CA and a server certificate it signed for `localhost` and 127.0.0.1, made with
/// openssl in `dir`: (CA certificate, server certificate, server key). (rustls refuses a
/// self-signed CA certificate used as the server's own.)
fn make_cert(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let p = |name: &str| dir.join(name);
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (scripts/setup.sh installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "1",
                "-subj",
                "/CN=hagate test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=localhost",
                "-keyout",
                "key.pem",
                "-out",
                "server.csr",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        p("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "server.ext",
        "-out",
        "cert.pem",
    ]);
    (p("ca.pem"), p("cert.pem"), p("key.pem"))
}

/// `curl` over TLS, trusting `ca`: (status, body).
fn curl_tls(ca: &std::path::Path, url: &str, headers: &[&str]) -> (u16, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
        "--cacert",
    ])
    .arg(ca);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("curl (scripts/setup.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        status.trim().parse().unwrap_or(0),
        format!("{body}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_the_proxy_listener_routes_by_haid_and_refuses_plaintext() {
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_cert(certs.path());
    let gw = Gateway::start_full(
        &instances(&[("cs_1", &a), ("cs_2", &b)]),
        &format!(
            "tls = {{ cert = {:?}, key = {:?} }}",
            cert.display().to_string(),
            key.display().to_string()
        ),
        "",
        None,
    )
    .await;
    let haid = hagate::haid::encode("cs_2", &["cs_1"], "77").unwrap();
    let port = gw.proxy.port();
    for host in ["localhost", "127.0.0.1"] {
        let url = format!("https://{host}:{port}/api/v1/x");
        let (status, body) = tokio::task::spawn_blocking({
            let (ca, haid) = (ca.clone(), haid.clone());
            move || curl_tls(&ca, &url, &[&format!("contextID: {haid}")])
        })
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(body.lines().next().unwrap_or("")).unwrap();
        assert_eq!(
            (v["server"].as_str(), v["context_id"].as_str()),
            (Some("B"), Some("77"))
        );
    }
    // plain HTTP on the TLS port gets no HTTP answer
    let plain = client()
        .get(format!("http://127.0.0.1:{port}/api/v1/x"))
        .header("contextID", &haid)
        .send()
        .await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status() != 200));
    assert!(gw.log().contains("tls=true"), "{}", gw.log());
}

#[test]
fn a_bad_tls_key_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, _) = make_cert(dir.path());
    let config = dir.path().join("hagate.toml");
    // the certificate given as the key
    std::fs::write(
        &config,
        format!(
            "[server]\ntls = {{ cert = {:?}, key = {:?} }}\n[instances.cs_1]\naddress = \"127.0.0.1:9\"\n",
            cert.display().to_string(),
            cert.display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.tls.key") && err.contains("PRIVATE KEY"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_named_by_host_name_are_resolved_in_the_background_and_routed() {
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let gw = Gateway::start(&format!(
        "{FAST_HEALTH}dns_refresh = \"200ms\"\n\n[instances.cs_1]\naddress = \"localhost:{}\"\n{}",
        a.addr.port(),
        instances(&[("cs_2", &b)])
    ))
    .await;
    let haid = hagate::haid::encode("cs_1", &["cs_2"], "9").unwrap();
    gw.wait_served_by(&haid, "A").await;
    // health belongs to the resolved address
    let up = gw.metrics_text().await;
    assert!(
        up.lines().any(|l| l.starts_with("hagate_instance_up{")
            && l.contains("alias=\"cs_1\"")
            && l.contains(&format!("127.0.0.1:{}", a.addr.port()))
            && l.ends_with(" 1")),
        "{up}"
    );
    // resolved again every dns_refresh, in the background
    let first = gw
        .metric("hagate_dns_lookups_total", &[("result", "ok")])
        .await;
    gw.wait_metric("hagate_dns_lookups_total", &[("result", "ok")], first + 3.0)
        .await;
    // a table naming a host that does not resolve is refused, with the field named
    let r = client()
        .put(gw.admin_url("/v1/aliases"))
        .json(&serde_json::json!({"instances": {
            "cs_1": {"address": format!("localhost:{}", a.addr.port())},
            "cs_2": {"address": "no-such-host.invalid:80"},
        }}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["field"], "instances.cs_2.address", "{body}");
    // and the old table still routes
    gw.wait_served_by(&haid, "A").await;
}

/// Kills a process that is not our child (the successor a gateway started) when dropped.
struct Successor(Option<u32>);

impl Drop for Successor {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

/// The messages the gateway sent to the `NOTIFY_SOCKET` bound at `sock`, until `until`
/// holds for one of them.
async fn notified(sock: &std::os::unix::net::UnixDatagram, until: impl Fn(&str) -> bool) -> String {
    eventually("an sd_notify message", Duration::from_secs(60), || {
        let mut buf = [0u8; 256];
        let got = sock
            .recv(&mut buf)
            .ok()
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
        let found = got.filter(|m| until(m));
        async move { found }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_starts_a_successor_that_tells_the_service_manager_its_pid() {
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut gw = Gateway::start_env(
        &instances(&[("cs_1", &a), ("cs_2", &b)]),
        "pid_file = \"hagate.pid\"\nupgrade_sock = \"upgrade.sock\"",
        "",
        None,
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    )
    .await;
    let old = gw.pid();
    let first = notified(&sock, |m| m.contains("READY=1")).await;
    assert!(first.contains(&format!("MAINPID={old}")), "{first}");

    // as `systemctl kill -s USR2 hagate` would
    signal(gw.pid(), "USR2");
    let second = notified(&sock, |m| {
        m.contains("READY=1") && !m.contains(&format!("MAINPID={old}"))
    })
    .await;
    let new: u32 = second
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in {second:?}"));
    let _successor = Successor(Some(new));
    // the old process hands over and exits; the successor serves
    eventually("the old gateway to exit", Duration::from_secs(60), || {
        let running = gw.still_running();
        async move { (!running).then_some(()) }
    })
    .await;
    let pid_file = gw.dir.path().join("hagate.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        new.to_string()
    );
    let haid = hagate::haid::encode("cs_1", &["cs_2"], "3").unwrap();
    let (status, body) = get_haid(&client(), &gw, &haid).await;
    assert_eq!(
        (status, body["server"].as_str()),
        (200, Some("A")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_upstreams_verifies_the_server_name_for_requests_and_health_checks() {
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_cert(certs.path());
    // the TLS upstreams: gateways with a TLS listener, in front of A (two, because health
    // belongs to an address, and the two aliases below must not share one)
    let tls_body = instances(&[("cs_1", &a), ("cs_2", &a)]);
    let tls_server = format!(
        "tls = {{ cert = {:?}, key = {:?} }}",
        cert.display().to_string(),
        key.display().to_string()
    );
    let tls_gateway = || Gateway::start_full(&tls_body, &tls_server, "", None);
    let (tls_1, tls_3) = (tls_gateway().await, tls_gateway().await);
    let (port, port_3) = (tls_1.proxy.port(), tls_3.proxy.port());
    let gw = Gateway::start(&format!(
        "{FAST_HEALTH}ca_file = {:?}\n\n\
         [instances.cs_1]\naddress = \"127.0.0.1:{port}\"\ntls = true\nsni = \"localhost\"\n\n\
         [instances.cs_3]\naddress = \"127.0.0.1:{port_3}\"\ntls = true\nsni = \"wrong.example\"\n\n{}",
        ca.display().to_string(),
        instances(&[("cs_2", &b)])
    ))
    .await;
    let c = client();
    // the name matches the certificate: served over TLS by A, and healthy
    let haid = hagate::haid::encode("cs_1", &["cs_2"], "21").unwrap();
    let (status, body) = get_haid(&c, &gw, &haid).await;
    assert_eq!(
        (status, body["server"].as_str()),
        (200, Some("A")),
        "{body}"
    );
    let checks = gw
        .metric(
            "hagate_health_checks_total",
            &[("alias", "cs_1"), ("result", "pass")],
        )
        .await;
    gw.wait_metric(
        "hagate_health_checks_total",
        &[("alias", "cs_1"), ("result", "pass")],
        checks + 2.0,
    )
    .await;
    // a name the certificate does not carry: refused by verification, so its checks fail
    // and its contexts are served by their backup
    gw.wait_metric(
        "hagate_health_checks_total",
        &[("alias", "cs_3"), ("result", "fail")],
        2.0,
    )
    .await;
    assert_eq!(
        gw.metric("hagate_instance_up", &[("alias", "cs_3")]).await,
        0.0
    );
    let haid = hagate::haid::encode("cs_3", &["cs_2"], "22").unwrap();
    let (status, body) = get_haid(&c, &gw, &haid).await;
    assert_eq!(
        (status, body["server"].as_str()),
        (200, Some("B")),
        "{body}"
    );
}

/// The variables of a running process.
fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap()
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// `hagate run` sets mimalloc's purge delay to 10 ms by executing itself again (same process
/// id), unless the operator set it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_sets_the_allocator_purge_delay_unless_the_operator_did() {
    if !cfg!(feature = "mimalloc") || std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return; // built without mimalloc, or the test runner's own value would be kept
    }
    let a = Upstream::start("cs_1");
    let body = instances(&[("cs_1", &a)]);
    let gw = Gateway::start(&body).await;
    let vars = environ(gw.pid());
    assert!(
        vars.iter().any(|v| v == "MIMALLOC_PURGE_DELAY=10"),
        "{vars:?}"
    );
    let own = Gateway::start_env(&body, "", "", None, &[("MIMALLOC_PURGE_DELAY", "50")]).await;
    let vars = environ(own.pid());
    let set: Vec<&String> = vars
        .iter()
        .filter(|v| v.starts_with("MIMALLOC_PURGE_DELAY="))
        .collect();
    assert_eq!(set, ["MIMALLOC_PURGE_DELAY=50"], "{vars:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lines_logged_as_the_gateway_stops_are_in_its_log() {
    // A graceful stop's last lines (pingora's, then the gateway's own, logged just before
    // the exit) reach the log, so an operator can tell a clean stop from a crash.
    let a = Upstream::start("A");
    let mut gw = Gateway::start_env(
        &instances(&[("cs_1", &a)]),
        "",
        "",
        None,
        &[("RUST_LOG", "info")],
    )
    .await;
    signal(gw.pid(), "TERM");
    eventually("the gateway to exit", Duration::from_secs(30), || {
        let exited = !gw.still_running();
        async move { exited.then_some(()) }
    })
    .await;
    let log = gw.log();
    assert!(log.contains("All runtimes exited, exiting now"), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(last.ends_with("hagate stopped"), "{log}");
}

#[test]
fn an_upgrade_refuses_a_pid_file_that_names_another_program() {
    // a gateway killed with SIGKILL leaves its pid file; its pid may since have gone to
    // another program, which the upgrade's SIGQUIT would stop
    let mut other = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hagate.pid"), format!("{}\n", other.id())).unwrap();
    let config = dir.path().join("hagate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\npid_file = \"hagate.pid\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n[instances.cs_1]\naddress = \"127.0.0.1:9\"\n",
            gateway_port(),
            gateway_port(),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "--upgrade", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let alive = other.try_wait().unwrap().is_none();
    let _ = other.kill();
    let _ = other.wait();
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("server.pid_file") && err.contains("`sleep`"),
        "{err}"
    );
    assert!(alive, "the upgrade signalled another program");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_written_beside_the_config_is_named_in_a_warning() {
    // inotify reports every write in the config's directory, so a log there wakes the
    // watcher once per line; the gateway says so.
    let a = Upstream::start("A");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hagate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\npid_file = \"hagate.pid\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n{}",
            gateway_port(),
            gateway_port(),
            instances(&[("cs_1", &a)])
        ),
    )
    .unwrap();
    let log = dir.path().join("hagate.log");
    let mut child = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let warned = eventually("the warning", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move {
            text.lines()
                .find(|l| l.contains("config watcher watches"))
                .map(String::from)
        }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(warned.contains("WARN"), "{warned}");
    let canonical = std::fs::canonicalize(&log).unwrap();
    assert!(warned.contains(canonical.to_str().unwrap()), "{warned}");
    // a log elsewhere (the harness writes it to a subdirectory) gets no warning
    let gw = Gateway::start(&instances(&[("cs_1", &a)])).await;
    let log = eventually("the watcher to start", Duration::from_secs(20), || {
        let log = gw.log();
        async move { log.contains("watching the config's files").then_some(log) }
    })
    .await;
    assert!(!log.contains("config watcher watches"), "{log}");
}
