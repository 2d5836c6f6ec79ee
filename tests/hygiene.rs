//! Hostile and careless clients against the real gateway: idle, half-sent, trickling and
//! keep-alive connections are closed within their timeouts; under `ulimit -n 256` a crowd
//! of idle clients cannot starve it of descriptors; a host that stops answering (SYNs
//! dropped, not refused) fails over within the connect timeout and is marked down by the
//! active checks.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUTS: &str = "keepalive_timeout = \"1s\"\nheader_timeout = \"600ms\"\n";

/// A gateway with short connection timeouts on both listeners.
async fn strict_gateway(up: &Upstream) -> Gateway {
    Gateway::start_full(
        &format!("{FAST_HEALTH}{}", instances(&[("cs_1", up), ("cs_2", up)])),
        TIMEOUTS,
        "header_timeout = \"600ms\"\n",
        None,
    )
    .await
}

/// Reads until the peer closes the connection (EOF or reset); how long that took from
/// `since`. Panics if it stays open past `within`.
async fn closed_within(stream: &mut TcpStream, since: Instant, within: Duration) -> Duration {
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(since.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => panic!("still open after {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return since.elapsed(),
            Ok(Ok(_)) => {} // a response; keep reading
        }
    }
}

const REQUEST: &[u8] = b"GET /x HTTP/1.1\r\nHost: gw\r\ncontextID: 4-4--cs_1cs_21\r\n\r\n";

/// Reads one response (headers and a Content-Length body).
async fn read_response(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before a full response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_half_sent_trickling_and_keepalive_connections_are_closed_in_time() {
    let up = Upstream::start("A");
    let gw = strict_gateway(&up).await;
    let keepalive = Duration::from_secs(1);
    let header = Duration::from_millis(600);
    let slack = Duration::from_secs(2);

    // a connection that never sends a byte
    let mut idle = TcpStream::connect(gw.proxy).await.unwrap();
    let t = closed_within(&mut idle, Instant::now(), keepalive + slack).await;
    eprintln!("idle: closed after {t:?}");
    assert!(t >= keepalive - Duration::from_millis(50), "{t:?}");

    // half a request, then silence
    let mut half = TcpStream::connect(gw.proxy).await.unwrap();
    half.write_all(b"GET /x HTTP/1.1\r\nHost: gw\r\n")
        .await
        .unwrap();
    let t = closed_within(&mut half, Instant::now(), header + slack).await;
    eprintln!("half-sent: closed after {t:?}");

    // a slowloris: one byte every 100ms, never finishing
    let mut slow = TcpStream::connect(gw.proxy).await.unwrap();
    let started = Instant::now();
    // the attack's own pace: a byte every 100ms (pacing, not waiting for anything)
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    let trickle = async {
        for b in b"GET /x HTTP/1.1\r\nHost: gw\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            .iter()
            .cycle()
        {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            pace.tick().await;
            if started.elapsed() > header + slack {
                panic!("the trickling client was not cut off");
            }
        }
        started.elapsed()
    };
    let t = trickle.await;
    eprintln!("slowloris: cut off after {t:?}");

    // a keep-alive connection: served, then idle
    let mut ka = TcpStream::connect(gw.proxy).await.unwrap();
    ka.write_all(REQUEST).await.unwrap();
    assert!(read_response(&mut ka).await.starts_with("HTTP/1.1 200"));
    let t = closed_within(&mut ka, Instant::now(), keepalive + slack).await;
    eprintln!("keep-alive idle after a request: closed after {t:?}");

    // a keep-alive connection whose second request stops halfway
    let mut ka2 = TcpStream::connect(gw.proxy).await.unwrap();
    ka2.write_all(REQUEST).await.unwrap();
    assert!(read_response(&mut ka2).await.starts_with("HTTP/1.1 200"));
    ka2.write_all(b"GET /y HTTP/1.1\r\nHo").await.unwrap();
    let t = closed_within(&mut ka2, Instant::now(), header + slack).await;
    eprintln!("half a second request: closed after {t:?}");
    assert!(
        t < keepalive,
        "the header deadline, not the idle one: {t:?}"
    );

    // the admin listener has its own
    let mut admin = TcpStream::connect(gw.admin).await.unwrap();
    admin
        .write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let t = closed_within(&mut admin, Instant::now(), header + slack).await;
    eprintln!("admin, half-sent: closed after {t:?}");

    for reason in ["keepalive_timeout", "header_timeout"] {
        assert!(
            gw.metric("hagate_connections_closed_total", &[("reason", reason)])
                .await
                >= 2.0,
            "{reason}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_hundred_idle_clients_under_ulimit_256_cannot_starve_the_gateway() {
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let gw = Gateway::start_with_nofile(
        &format!("{FAST_HEALTH}{}", instances(&[("cs_1", &a), ("cs_2", &b)])),
        256,
    )
    .await;
    assert!(gw.log().contains("soft=256"), "{}", gw.log());
    let checks_before = gw
        .metric(
            "hagate_health_checks_total",
            &[("alias", "cs_1"), ("result", "pass")],
        )
        .await;
    // 400 clients connect and say nothing
    let mut idle = Vec::new();
    for _ in 0..400 {
        idle.push(TcpStream::connect(gw.proxy).await.unwrap());
    }
    // the gateway made room by closing the longest-idle ones, and kept serving
    let c = client();
    let haid = hagate::haid::encode("cs_1", &["cs_2"], "9").unwrap();
    let (status, body) = get_haid(&c, &gw, &haid).await;
    assert_eq!(
        (status, body["server"].as_str()),
        (200, Some("A")),
        "{body}"
    );
    assert!(
        gw.metric(
            "hagate_connections_closed_total",
            &[("reason", "evicted_idle")]
        )
        .await
            > 0.0
    );
    let r = c.get(gw.admin_url("/v1/aliases")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // health checks keep running, and every instance stays live
    eventually(
        "several health checks under pressure",
        Duration::from_secs(10),
        || async {
            let now = gw
                .metric(
                    "hagate_health_checks_total",
                    &[("alias", "cs_1"), ("result", "pass")],
                )
                .await;
            (now >= checks_before + 5.0).then_some(())
        },
    )
    .await;
    for alias in ["cs_1", "cs_2"] {
        assert_eq!(
            gw.metric("hagate_instance_up", &[("alias", alias)]).await,
            1.0,
            "{alias}"
        );
    }
    assert!(!gw.log().contains("Too many open files"), "{}", gw.log());
    drop(idle);
}

/// Sends `raw` on a fresh connection and reads the answer (status line, headers, body).
async fn raw(gw: &Gateway, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

fn json_body(answer: &str) -> serde_json::Value {
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_pingora_would_answer_bare_gets_a_json_answer() {
    let up = Upstream::start("A");
    let gw = Gateway::start(&format!(
        "{FAST_HEALTH}{}",
        instances(&[("cs_1", &up), ("cs_2", &up)])
    ))
    .await;
    // an oversized header block: 431 with JSON
    let big = format!(
        "GET /x HTTP/1.1\r\nHost: gw\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let answer = raw(&gw, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.200}");
    assert_eq!(json_body(&answer)["error"], "request_header_too_large");
    // too many header lines: 431 as well
    let many: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    let answer = raw(
        &gw,
        format!("GET /x HTTP/1.1\r\nHost: gw\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.200}");
    // two identical Content-Length headers are forwarded as one
    let answer = raw(
        &gw,
        b"POST /x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\ncontextID: 4-4--cs_1cs_21\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = json_body(&answer);
    assert_eq!(
        (
            body["content_length_headers"].as_u64(),
            body["body_bytes"].as_u64()
        ),
        (Some(1), Some(5)),
        "{body}"
    );
    // two that differ are refused (by pingora's parser): no framing can be trusted
    let answer = raw(
        &gw,
        b"POST /x HTTP/1.1\r\nHost: gw\r\ncontextID: 4-4--cs_1cs_21\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(json_body(&answer)["error"], "bad_request");
    // a head pingora cannot parse (it answers before any hook runs): the guard puts a
    // JSON body in place of its bare 400
    let answer = raw(&gw, b"GET /x HTTP/1.1\r\nHost: gw\r\nBad Header\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(json_body(&answer)["error"], "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_instances_failing_mid_request_gets_a_json_502() {
    let (mut a, mut b) = (Upstream::start("A"), Upstream::start("B"));
    let gw = Gateway::start(&format!(
        "[health.active]\nenabled = false\n[health.passive]\nenabled = false\n{}",
        instances(&[("cs_1", &a), ("cs_2", &b)])
    ))
    .await;
    a.kill();
    b.kill();
    let (status, body) = get_haid(&client(), &gw, "4-4--cs_1cs_21").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"], "upstream_failed", "{body}");
}

/// A tiny HTTP server on a listener with a backlog of one, that can vanish: drop every
/// connection and stop accepting, with its backlog full, so that new SYNs are dropped
/// (not refused), as when a host stops answering.
struct Vanishing {
    addr: std::net::SocketAddr,
    listener: std::sync::Arc<tokio::net::TcpListener>,
    server: tokio::task::JoinHandle<()>,
    fillers: Vec<TcpStream>,
}

impl Vanishing {
    async fn start() -> Vanishing {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = std::sync::Arc::new(sock.listen(1).unwrap());
        let addr = listener.local_addr().unwrap();
        let l = std::sync::Arc::clone(&listener);
        let server = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                conns.spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let body = r#"{"server":"V"}"#;
                        let answer = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Vanishing {
            addr,
            listener,
            server,
            fillers: Vec::new(),
        }
    }

    /// Stops answering: closes every connection, stops accepting, fills the backlog.
    async fn vanish(&mut self) {
        self.server.abort(); // drops the accept loop and, with its JoinSet, every connection
        let _ = (&mut self.server).await;
        loop {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(self.addr))
                .await
            {
                Ok(Ok(s)) => self.fillers.push(s),
                Ok(Err(e)) => panic!("the vanished host refused instead of dropping: {e}"),
                Err(_) => break, // a SYN that got no answer: the host has vanished
            }
            assert!(self.fillers.len() < 64, "the backlog never filled");
        }
        let _ = &self.listener;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_stops_answering_fails_over_within_the_connect_timeout() {
    let mut v = Vanishing::start().await;
    let b = Upstream::start("B");
    let connect_timeout = Duration::from_millis(500);
    let (interval, timeout, fall) = (Duration::from_millis(200), Duration::from_millis(200), 2u32);
    let gw = Gateway::start(&format!(
        "[upstream]\nconnect_timeout = \"{}ms\"\nread_timeout = \"5s\"\n\
         [health.active]\ninterval = \"{}ms\"\ntimeout = \"{}ms\"\nfall = {fall}\nrise = 2\n\
         [health.passive]\nenabled = false\n\
         [instances.cs_1]\naddress = \"{}\"\n[instances.cs_2]\naddress = \"{}\"\n",
        connect_timeout.as_millis(),
        interval.as_millis(),
        timeout.as_millis(),
        v.addr,
        b.addr
    ))
    .await;
    let c = client();
    let haid = hagate::haid::encode("cs_1", &["cs_2"], "5").unwrap();
    eventually("the main to serve", Duration::from_secs(10), || async {
        (get_haid(&c, &gw, &haid).await.1["server"] == "V").then_some(())
    })
    .await;
    v.vanish().await;
    let gone = Instant::now();
    // a request now: the main's connect hangs until connect_timeout, then the backup answers
    let sent = Instant::now();
    let (status, body) = get_haid(&c, &gw, &haid).await;
    let took = sent.elapsed();
    eprintln!("request to a vanished main: answered by {} in {took:?} (connect_timeout {connect_timeout:?})", body["server"]);
    assert_eq!(
        (status, body["server"].as_str()),
        (200, Some("B")),
        "{body}"
    );
    assert!(took <= connect_timeout + Duration::from_secs(1), "{took:?}");
    // and the active checks mark it down within fall x interval + timeout
    let down = eventually(
        "the vanished main to be marked down",
        Duration::from_secs(10),
        || async {
            (gw.metric("hagate_instance_up", &[("alias", "cs_1")]).await == 0.0)
                .then(|| gone.elapsed())
        },
    )
    .await;
    let bound = interval * fall + timeout;
    eprintln!("marked down {down:?} after vanishing (fall x interval + timeout = {bound:?})");
    assert!(down <= bound + Duration::from_secs(1), "{down:?}");
}
