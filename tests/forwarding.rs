//! The two HTTP engines (`server.forwarding`): hagate's own forwarding loop for the common
//! HTTP/1.1 request, and pingora's proxy for every other. Each test runs the real gateway
//! in front of a real HTTP/1.1 server on `127.0.0.1:0` that answers in each of the ways
//! HTTP frames a body (length, chunks with trailers, end of connection), and that closes
//! keep-alive connections when told to.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request as the upstream server received it.
#[derive(Debug, Clone)]
struct Seen {
    head: String,
    body: Vec<u8>,
    /// Which of the server's connections it came on (counted from 0).
    conn: usize,
}

impl Seen {
    /// The value of header `name` (lower case), if sent.
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// An HTTP/1.1 server that records every request and answers by path:
/// - `/chunked`: a chunked body with a trailer;
/// - `/close`: a body ended by closing the connection;
/// - `/drop`: a `Content-Length` answer, then it closes the keep-alive connection without
///   saying so (the next request on it finds it closed);
/// - `/hints`: `103 Early Hints` (with `Link`, `x-hagate-load` and a hop-by-hop header),
///   then the answer; `/hints-then-close`: `103 Early Hints`, then it closes;
/// - `/nominates`: an answer whose `Connection` header names `x-secret` (and
///   `content-length`, which frames it);
/// - `/ws` with an `Upgrade` header: `101 Switching Protocols`, then it echoes what it
///   reads until the other side closes;
/// - anything else: `Content-Length` with `x-hagate-load: 0.25`.
struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The connections the gateway closed, by number.
    closed: Arc<Mutex<Vec<usize>>>,
}

impl Server {
    async fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(Mutex::new(Vec::new()));
        let (log, ends) = (Arc::clone(&seen), Arc::clone(&closed));
        tokio::spawn(async move {
            for conn in 0.. {
                let (s, _) = listener.accept().await.unwrap();
                let (log, ends) = (Arc::clone(&log), Arc::clone(&ends));
                tokio::spawn(async move {
                    if serve(s, conn, log).await {
                        ends.lock().unwrap().push(conn);
                    }
                });
            }
        });
        Server { addr, seen, closed }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn closed(&self) -> Vec<usize> {
        self.closed.lock().unwrap().clone()
    }

    fn toml(&self, alias: &str) -> String {
        format!("[instances.{alias}]\naddress = \"{}\"\n", self.addr)
    }
}

/// Serves one connection; whether the gateway closed it (rather than this server).
async fn serve(mut s: TcpStream, conn: usize, log: Arc<Mutex<Vec<Seen>>>) -> bool {
    let mut buf = Vec::new();
    loop {
        let Some(end) = read_until(&mut s, &mut buf, b"\r\n\r\n").await else {
            return true;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end);
        let mut seen = Seen {
            head,
            body: Vec::new(),
            conn,
        };
        if seen
            .header("transfer-encoding")
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
        {
            // Enough for the tests' bodies: chunks of text, no extensions, no trailers.
            let Some(end) = read_until(&mut s, &mut buf, b"0\r\n\r\n").await else {
                return true;
            };
            let raw = String::from_utf8_lossy(&buf[..end]).to_string();
            buf.drain(..end);
            let mut lines = raw.split("\r\n");
            while let (Some(size), Some(data)) = (lines.next(), lines.next()) {
                if usize::from_str_radix(size, 16).unwrap_or(0) > 0 {
                    seen.body.extend_from_slice(data.as_bytes());
                }
            }
        } else {
            let n: usize = seen
                .header("content-length")
                .map_or(0, |v| v.parse().unwrap());
            while buf.len() < n {
                let mut chunk = [0u8; 65536];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return true,
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                }
            }
            seen.body = buf.drain(..n).collect();
        }
        let path = seen.head.split(' ').nth(1).unwrap_or("").to_string();
        let head_request = seen.head.starts_with("HEAD ");
        let upgrade = seen.header("upgrade");
        log.lock().unwrap().push(seen);
        if let ("/ws", Some(protocol)) = (path.as_str(), upgrade) {
            let switch = format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
            );
            if s.write_all(switch.as_bytes()).await.is_err() {
                return true;
            }
            let (mut rd, mut wr) = s.split();
            let _ = wr.write_all(&buf).await;
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
            return true;
        }
        let answer: Vec<u8> = match path.as_str() {
            "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n".to_vec(),
            "/close" => b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end".to_vec(),
            "/hints" => format!("{HINTS}HTTP/1.1 200 OK\r\ncontent-length: 2\r\nkeep-alive: timeout=5\r\n\r\nok").into_bytes(),
            "/hints-then-close" => HINTS.as_bytes().to_vec(),
            "/nominates" => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive, X-Secret, content-length\r\nx-secret: 1\r\nx-public: 1\r\n\r\nok".to_vec(),
            _ => {
                let body = if head_request { "" } else { "ok" };
                format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-hagate-load: 0.25\r\nx-served-by: raw\r\n\r\n{body}").into_bytes()
            }
        };
        if s.write_all(&answer).await.is_err() {
            return true;
        }
        if path == "/close" || path == "/drop" || path == "/hints-then-close" {
            return false;
        }
    }
}

/// An interim answer, as `/hints` sends it.
const HINTS: &str = "HTTP/1.1 103 Early Hints\r\nlink: </s.css>; rel=preload\r\nx-hagate-load: 0.5\r\nkeep-alive: timeout=5\r\n\r\n";

/// Reads into `buf` until it holds `end`; the offset just past it.
async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, end: &[u8]) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(end.len()).position(|w| w == end) {
            return Some(i + end.len());
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The requests each engine served: (hagate's loop, pingora's proxy).
async fn by_engine(gw: &Gateway) -> (f64, f64) {
    let name = "hagate_engine_requests_total";
    let own = gw.metric(name, &[("engine", "hagate")]).await;
    (own, gw.metric(name, &[("engine", "pingora")]).await)
}

const NO_CHECKS: &str = "[health.active]\nenabled = false\n\n";

async fn gateway(engine: &str, body: &str) -> Gateway {
    Gateway::start_full(
        &format!("{NO_CHECKS}{body}"),
        &format!("forwarding = \"{engine}\"\n"),
        "",
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_engines_forward_every_framing_and_fail_over_alike() {
    for engine in ["hagate", "pingora"] {
        let up = Server::start().await;
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let gw = gateway(
            engine,
            &format!(
                "{}[instances.cs_9]\naddress = \"{dead}\"\n",
                up.toml("cs_1")
            ),
        )
        .await;
        let c = client();
        let haid = hagate::haid::encode("cs_1", &["cs_9"], "77").unwrap();
        let get = |path: &str| {
            c.get(gw.url(path))
                .header("contextID", &haid)
                .header("x-hagate-role", "forged")
        };

        // Content-Length: x-hagate-load is taken out, hagate's headers go up, the
        // client's own x-hagate-* do not.
        let r = get("/plain").send().await.unwrap();
        assert_eq!(r.status(), 200, "{engine}");
        assert!(r.headers().get("x-hagate-load").is_none(), "{engine}");
        assert_eq!(r.headers()["x-served-by"], "raw", "{engine}");
        assert_eq!(r.text().await.unwrap(), "ok", "{engine}");
        let first = up.seen().last().cloned().unwrap();
        assert_eq!(
            first.header("x-hagate-role").as_deref(),
            Some("main"),
            "{engine}: {first:?}"
        );
        assert_eq!(
            first.header("x-hagate-context-id").as_deref(),
            Some("77"),
            "{engine}"
        );
        assert_eq!(
            first.head.matches("x-hagate-role").count(),
            1,
            "{engine}: {first:?}"
        );

        // chunks, with a trailer; and a body ended by the upstream closing
        let r = get("/chunked").send().await.unwrap();
        assert_eq!(r.status(), 200, "{engine}");
        assert_eq!(r.text().await.unwrap(), "hello world", "{engine}");
        let r = get("/close").send().await.unwrap();
        assert_eq!(r.status(), 200, "{engine}");
        assert_eq!(r.text().await.unwrap(), "until the end", "{engine}");

        // HEAD: the head only, though the answer names a length
        let r = c
            .head(gw.url("/plain"))
            .header("contextID", &haid)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{engine}");
        assert_eq!(r.headers()["content-length"], "2", "{engine}");
        assert_eq!(r.text().await.unwrap(), "", "{engine}");

        // bodies: small (read whole by hagate's loop), large (over its 64 KiB, so
        // pingora's), and chunked (pingora's); each arrives whole
        for size in [3, 200_000] {
            let body = vec![b'b'; size];
            let r = c
                .post(gw.url("/plain"))
                .header("contextID", &haid)
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{engine} {size}");
            assert_eq!(up.seen().last().unwrap().body, body, "{engine} {size}");
        }
        let mut raw = TcpStream::connect(gw.proxy).await.unwrap();
        let chunked = format!(
            "POST /plain HTTP/1.1\r\nHost: gw\r\ncontextID: {haid}\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nchunk one, \r\n9\r\nchunk two\r\n0\r\n\r\n"
        );
        let (status, _) = exchange(&mut raw, &mut Vec::new(), &chunked).await;
        assert_eq!(status, "HTTP/1.1 200 OK", "{engine}");
        assert_eq!(
            up.seen().last().unwrap().body,
            b"chunk one, chunk two",
            "{engine}"
        );

        // the main refuses connections: the backup answers, the client sees no error
        let over = hagate::haid::encode("cs_9", &["cs_1"], "78").unwrap();
        let r = client()
            .post(gw.url("/plain"))
            .header("contextID", &over)
            .body("replayed")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{engine}");
        let last = up.seen().last().cloned().unwrap();
        assert_eq!(
            last.header("x-hagate-role").as_deref(),
            Some("backup"),
            "{engine}"
        );
        assert_eq!(last.body, b"replayed", "{engine}");
        assert_eq!(
            gw.metric("hagate_failovers_total", &[("reason", "connect_failure")])
                .await,
            1.0,
            "{engine}"
        );
        // every request counted (after its answer: wait for the last)
        gw.wait_metric(
            "hagate_instance_requests_total",
            &[("alias", "cs_1"), ("class", "2xx")],
            8.0,
        )
        .await;
        // by the engine configured: pingora's for all, or hagate's loop for all but the
        // large and the chunked body
        match engine {
            "hagate" => assert_eq!(by_engine(&gw).await, (6.0, 2.0)),
            _ => assert_eq!(by_engine(&gw).await, (0.0, 8.0)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_is_retried_on_a_fresh_one() {
    for engine in ["hagate", "pingora"] {
        let up = Server::start().await;
        let gw = gateway(engine, &format!("{}{}", up.toml("cs_1"), up.toml("cs_2"))).await;
        let c = client();
        let haid = hagate::haid::encode("cs_1", &["cs_2"], "5").unwrap();
        let get = |path: &str| c.get(gw.url(path)).header("contextID", &haid).send();
        // answered, and then the upstream closes that connection while it is pooled
        let r = get("/drop").await.unwrap();
        assert_eq!(r.status(), 200, "{engine}");
        let first = up.seen().len();
        let r = get("/plain").await.unwrap();
        assert_eq!(r.status(), 200, "{engine}");
        let seen = up.seen();
        assert_eq!(seen.len(), first + 1, "{engine}: {seen:?}");
        // on a new connection, from the main, with no failover and no ejection
        assert_ne!(seen[first].conn, seen[first - 1].conn, "{engine}");
        assert_eq!(
            seen[first].header("x-hagate-role").as_deref(),
            Some("main"),
            "{engine}"
        );
        assert_eq!(
            gw.metric("hagate_failovers_total", &[("reason", "in_flight")])
                .await,
            0.0
        );
        assert_eq!(
            gw.metric("hagate_ejections_total", &[("alias", "cs_1")])
                .await,
            0.0
        );
    }
}

/// A server, a gateway on `engine` with cs_1 and cs_2 both on it, the HAID of context `id`
/// with cs_1 as main, and a raw client connection to the gateway.
async fn both_on_one_server(engine: &str, id: &str) -> (Server, Gateway, String, TcpStream) {
    let up = Server::start().await;
    let gw = gateway(engine, &format!("{}{}", up.toml("cs_1"), up.toml("cs_2"))).await;
    let haid = hagate::haid::encode("cs_1", &["cs_2"], id).unwrap();
    let raw = TcpStream::connect(gw.proxy).await.unwrap();
    (up, gw, haid, raw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_engines_pass_interim_answers_on_before_the_final_one() {
    for engine in ["hagate", "pingora"] {
        let (up, gw, haid, mut raw) = both_on_one_server(engine, "6").await;
        let mut buf = Vec::new();
        let request =
            |path: &str| format!("GET {path} HTTP/1.1\r\nHost: gw\r\ncontextID: {haid}\r\n\r\n");
        // 103, with its Link, and without hagate's or hop-by-hop headers; then the answer,
        // on a connection that serves the next request too
        for _ in 0..2 {
            raw.write_all(request("/hints").as_bytes()).await.unwrap();
            let hints = interim(&mut raw, &mut buf).await;
            assert!(hints.starts_with("HTTP/1.1 103"), "{engine}: {hints}");
            assert!(
                hints.contains("link: </s.css>; rel=preload"),
                "{engine}: {hints}"
            );
            assert!(!hints.contains("x-hagate-load"), "{engine}: {hints}");
            assert!(!hints.contains("keep-alive"), "{engine}: {hints}");
            let (head, body) = read_answer_head(&mut raw, &mut buf).await;
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{engine}: {head}");
            assert!(!head.contains("keep-alive:"), "{engine}: {head}");
            assert_eq!(body, "ok", "{engine}");
        }
        // the main fails after its 103: the client had an answer begun, so it gets a JSON
        // 502 that names the failure, and the request is not replayed on the backup
        raw.write_all(request("/hints-then-close").as_bytes())
            .await
            .unwrap();
        let hints = interim(&mut raw, &mut buf).await;
        assert!(hints.starts_with("HTTP/1.1 103"), "{engine}: {hints}");
        let (status, body) = read_answer(&mut raw, &mut buf).await;
        assert_eq!(status, "HTTP/1.1 502 Bad Gateway", "{engine}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], "upstream_failed", "{engine}: {body}");
        let seen = up.seen();
        assert_eq!(seen.len(), 3, "{engine}: {seen:?}");
        assert!(
            seen.iter()
                .all(|s| s.header("x-hagate-role").as_deref() == Some("main")),
            "{engine}: {seen:?}"
        );
        assert_eq!(
            gw.metric("hagate_failovers_total", &[("reason", "in_flight")])
                .await,
            0.0,
            "{engine}"
        );
    }
}

/// A `Connection` header's options name headers that go no further (RFC 9110, 7.6.1), in
/// both directions, as the standard hop-by-hop names do. A request that names any goes to pingora's proxy, which drops them and
/// frames the body again if they included `Content-Length`; an answer's are dropped by
/// either engine (the first request here, which names none, is the loop's under
/// `"hagate"`), except the names that frame it. The connection goes on after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_engines_drop_the_headers_that_a_connection_header_names() {
    for engine in ["hagate", "pingora"] {
        let (up, gw, haid, mut raw) = both_on_one_server(engine, "8").await;
        let mut buf = Vec::new();
        for (round, named) in ["keep-alive", "X-Drop-Me", "X-Drop-Me, Content-Length"]
            .iter()
            .enumerate()
        {
            let request = format!(
                "POST /nominates HTTP/1.1\r\nHost: gw\r\ncontextID: {haid}\r\n\
                 Connection: keep-alive, {named}\r\nx-drop-me: 1\r\nx-keep: 1\r\n\
                 TE: trailers\r\nProxy-Authorization: Basic eA==\r\n\
                 Content-Length: 4\r\n\r\nbody"
            );
            raw.write_all(request.as_bytes()).await.unwrap();
            let (head, body) = read_answer_head(&mut raw, &mut buf).await;
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{engine}: {head}");
            let lower = head.to_ascii_lowercase();
            assert!(!lower.contains("x-secret"), "{engine}: {head}");
            assert!(lower.contains("x-public: 1"), "{engine}: {head}");
            assert_eq!(body, "ok", "{engine}");
            let seen = up.seen();
            assert_eq!(seen.len(), round + 1, "{engine}: {seen:?}");
            let last = &seen[round];
            if round > 0 {
                assert_eq!(last.header("x-drop-me"), None, "{engine}: {last:?}");
            }
            assert_eq!(last.header("x-keep").as_deref(), Some("1"), "{engine}");
            // and the standard hop-by-hop names, by either engine
            for name in ["te", "proxy-authorization"] {
                assert_eq!(last.header(name), None, "{engine}: {last:?}");
            }
            assert_eq!(last.body, b"body", "{engine}: {last:?}");
        }
        // counted after each answer: wait for the last, then see which engine served them
        let ok = [("alias", "cs_1"), ("class", "2xx")];
        gw.wait_metric("hagate_instance_requests_total", &ok, 3.0)
            .await;
        match engine {
            "hagate" => assert_eq!(by_engine(&gw).await, (1.0, 2.0)),
            _ => assert_eq!(by_engine(&gw).await, (0.0, 3.0)),
        }
        // naming a header that routes the request is refused, in JSON that says so
        let request = format!(
            "GET /plain HTTP/1.1\r\nHost: gw\r\ncontextID: {haid}\r\nConnection: Host\r\n\r\n"
        );
        let mut other = TcpStream::connect(gw.proxy).await.unwrap();
        let (status, body) = exchange(&mut other, &mut Vec::new(), &request).await;
        assert_eq!(status, "HTTP/1.1 400 Bad Request", "{engine}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], "bad_request", "{engine}: {body}");
        assert!(
            body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("protected header cannot be nominated")),
            "{engine}: {body}"
        );
        assert_eq!(up.seen().len(), 3, "{engine}");
    }
}

/// A WebSocket upgrade goes through, under either engine (the loop hands it to pingora's
/// proxy): the 101, then bytes both ways on the same connection. Another protocol's
/// upgrade goes up as a plain request, as pingora's proxy forwards only WebSocket ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_engines_carry_a_websocket_upgrade_and_no_other() {
    for engine in ["hagate", "pingora"] {
        let (up, gw, haid, mut raw) = both_on_one_server(engine, "9").await;
        let mut buf = Vec::new();
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: gw\r\ncontextID: {haid}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        raw.write_all(request.as_bytes()).await.unwrap();
        let head = interim(&mut raw, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{engine}: {head}");
        assert!(
            head.to_ascii_lowercase().contains("upgrade: websocket"),
            "{engine}: {head}"
        );
        let seen = up.seen();
        let first = seen.last().unwrap();
        assert_eq!(
            first.header("upgrade").as_deref(),
            Some("websocket"),
            "{engine}"
        );
        assert_eq!(
            first.header("x-hagate-role").as_deref(),
            Some("main"),
            "{engine}"
        );
        // the upstream echoes: what goes up comes back
        for message in ["ping", "and again"] {
            raw.write_all(message.as_bytes()).await.unwrap();
            while buf.len() < message.len() {
                let mut chunk = [0u8; 64];
                let read = tokio::time::timeout(Duration::from_secs(10), raw.read(&mut chunk));
                let k = read.await.expect("the echo within 10 s").unwrap();
                assert!(k > 0, "{engine}: closed before the echo");
                buf.extend_from_slice(&chunk[..k]);
            }
            let echoed: Vec<u8> = buf.drain(..message.len()).collect();
            assert_eq!(echoed, message.as_bytes(), "{engine}");
        }
        // h2c: not forwarded as an upgrade; the upstream answers it as a plain request
        let h2c = format!(
            "GET /ws HTTP/1.1\r\nHost: gw\r\ncontextID: {haid}\r\n\
             Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
             HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
        );
        let mut other = TcpStream::connect(gw.proxy).await.unwrap();
        let (status, body) = exchange(&mut other, &mut Vec::new(), &h2c).await;
        assert_eq!(status, "HTTP/1.1 200 OK", "{engine}");
        assert_eq!(body, "ok", "{engine}");
        let last = up.seen().last().cloned().unwrap();
        assert_eq!(last.header("upgrade"), None, "{engine}: {last:?}");
        assert_eq!(last.header("http2-settings"), None, "{engine}: {last:?}");
    }
}

/// Reads one interim answer's head from `s`.
async fn interim(s: &mut TcpStream, buf: &mut Vec<u8>) -> String {
    let end = tokio::time::timeout(Duration::from_secs(10), read_until(s, buf, b"\r\n\r\n"))
        .await
        .expect("an answer within 10 s")
        .expect("an answer before the connection closed");
    String::from_utf8_lossy(&buf.drain(..end).collect::<Vec<u8>>()).to_string()
}

/// Writes `request` on `s` and reads one answer with a `Content-Length` body; its status
/// line and body.
async fn exchange(s: &mut TcpStream, buf: &mut Vec<u8>, request: &str) -> (String, String) {
    s.write_all(request.as_bytes()).await.unwrap();
    read_answer(s, buf).await
}

async fn read_answer(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, String) {
    let (head, body) = read_answer_head(s, buf).await;
    (head.lines().next().unwrap().to_string(), body)
}

/// Reads one answer with a `Content-Length` body; its whole head and its body.
async fn read_answer_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, String) {
    let end = tokio::time::timeout(Duration::from_secs(10), read_until(s, buf, b"\r\n\r\n"))
        .await
        .expect("an answer within 10 s")
        .expect("an answer before the connection closed");
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    buf.drain(..end);
    let n: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    while buf.len() < n {
        let mut chunk = [0u8; 4096];
        let k = s.read(&mut chunk).await.unwrap();
        assert!(k > 0, "closed in the body");
        buf.extend_from_slice(&chunk[..k]);
    }
    let body = String::from_utf8_lossy(&buf[..n]).to_string();
    buf.drain(..n);
    (head, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_goes_from_hagates_loop_to_pingora_and_back_with_nothing_lost() {
    let up = Server::start().await;
    let gw = gateway("hagate", &format!("{}{}", up.toml("cs_1"), up.toml("cs_2"))).await;
    let haid = hagate::haid::encode("cs_1", &["cs_2"], "9").unwrap();
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    let mut buf = Vec::new();
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: gw\r\ncontextID: {haid}\r\n\r\n");

    // two requests in one write (pipelined), both served by hagate's loop
    let two = format!("{}{}", get("/one"), get("/two"));
    let (status, body) = exchange(&mut s, &mut buf, &two).await;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "ok"));
    let (status, _) = read_answer(&mut s, &mut buf).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    // a chunked request body: handed to pingora, with the bytes already read
    let chunked = format!(
        "POST /three HTTP/1.1\r\nHost: gw\r\ncontextID: {haid}\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n"
    );
    let (status, _) = exchange(&mut s, &mut buf, &chunked).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    // and the connection comes back to hagate's loop
    let (status, _) = exchange(&mut s, &mut buf, &get("/four")).await;
    assert_eq!(status, "HTTP/1.1 200 OK");

    let seen = up.seen();
    let paths: Vec<&str> = seen
        .iter()
        .map(|r| r.head.split(' ').nth(1).unwrap())
        .collect();
    assert_eq!(paths, ["/one", "/two", "/three", "/four"]);
    assert_eq!(seen[2].body, b"body");
    let served = [("alias", "cs_1"), ("class", "2xx")];
    gw.wait_metric("hagate_instance_requests_total", &served, 4.0)
        .await;
    assert_eq!(
        gw.metric("hagate_instance_requests_total", &served).await,
        4.0
    );
    assert_eq!(by_engine(&gw).await, (3.0, 1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_follows_a_config_reload() {
    let up = Server::start().await;
    let gw = gateway("hagate", &format!("{}{}", up.toml("cs_1"), up.toml("cs_2"))).await;
    let haid = hagate::haid::encode("cs_1", &["cs_2"], "3").unwrap();
    // each on a new connection: the engine is chosen per connection and request
    let send = || async {
        let r = client()
            .get(gw.url("/plain"))
            .header("contextID", &haid)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    };
    send().await;
    gw.wait_metric("hagate_engine_requests_total", &[("engine", "hagate")], 1.0)
        .await;
    gw.rewrite(|old| old.replace("forwarding = \"hagate\"", "forwarding = \"pingora\""));
    eventually(
        "a request through pingora",
        Duration::from_secs(10),
        || async {
            send().await;
            (by_engine(&gw).await.1 >= 1.0).then_some(())
        },
    )
    .await;
    // and back
    let own = by_engine(&gw).await.0;
    gw.rewrite(|old| old.replace("forwarding = \"pingora\"", "forwarding = \"hagate\""));
    eventually(
        "a request through hagate's loop",
        Duration::from_secs(10),
        || async {
            send().await;
            (by_engine(&gw).await.0 > own).then_some(())
        },
    )
    .await;
}

/// A gateway over `n` raw servers, `cs_0` to `cs_{n-1}`, with `extra` config; each
/// request names one as main and the next as backup.
async fn over_servers(
    engine: &str,
    n: usize,
    extra: &str,
    nofile: Option<u64>,
) -> (Vec<Server>, Gateway) {
    let mut ups = Vec::new();
    for _ in 0..n {
        ups.push(Server::start().await);
    }
    let table: String = ups
        .iter()
        .enumerate()
        .map(|(i, up)| up.toml(&format!("cs_{i}")))
        .collect();
    let gw = Gateway::start_full(
        &format!("{NO_CHECKS}{extra}\n{table}"),
        &format!("forwarding = \"{engine}\"\n"),
        "",
        nofile,
    )
    .await;
    (ups, gw)
}

/// The HAID with cs_`main` as main and the next of `n` as backup.
fn haid_on(main: usize, n: usize) -> String {
    hagate::haid::encode(
        &format!("cs_{main}"),
        &[format!("cs_{}", (main + 1) % n).as_str()],
        "3",
    )
    .unwrap()
}

/// GET /plain through `gw` with cs_`main` as main; the status.
async fn get_on(c: &reqwest::Client, gw: &Gateway, main: usize, n: usize) -> u16 {
    let haid = haid_on(main, n);
    let r = c.get(gw.url("/plain")).header("contextID", &haid).send();
    r.await.unwrap().status().as_u16()
}

/// GET /plain with cs_`main` as main, on the client connection `s`; the status line.
/// Requests on one client connection are served by one proxy thread, and the loop keeps
/// idle upstream connections per thread, as nginx keeps them per worker: a client such as
/// reqwest may open a second connection (its pool races a new connect against the
/// release of the old one), which the other thread may accept.
async fn get_on_raw(s: &mut TcpStream, buf: &mut Vec<u8>, main: usize, n: usize) -> String {
    let haid = haid_on(main, n);
    let request = format!("GET /plain HTTP/1.1\r\nHost: gw\r\ncontextID: {haid}\r\n\r\n");
    exchange(s, buf, &request).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_upstream_pool_closes_the_least_recently_used_connection() {
    for engine in ["hagate", "pingora"] {
        let (ups, gw) = over_servers(engine, 3, "[upstream]\nmax_idle = 2\n", None).await;
        let (mut s, mut buf) = (TcpStream::connect(gw.proxy).await.unwrap(), Vec::new());
        let mut get = async |main: usize| {
            let status = get_on_raw(&mut s, &mut buf, main, 3).await;
            assert_eq!(status, "HTTP/1.1 200 OK", "{engine}: cs_{main}");
        };
        // one connection to each instance, released to a pool that keeps two
        for i in 0..3 {
            get(i).await;
        }
        eventually(
            &format!("{engine}: the least recent closed"),
            Duration::from_secs(10),
            || async { (ups[0].closed() == [0]).then_some(()) },
        )
        .await;
        assert!(
            ups[1].closed().is_empty() && ups[2].closed().is_empty(),
            "{engine}"
        );
        if engine == "hagate" {
            assert_eq!(
                gw.metric("hagate_upstream_idle_connections", &[]).await,
                2.0
            );
            let by_max = [("reason", "max_idle")];
            assert_eq!(
                gw.metric("hagate_upstream_idle_closed_total", &by_max)
                    .await,
                1.0
            );
        }
        // cs_2 again, on its pooled connection, which becomes the most recent; then cs_0,
        // on a new one, which closes cs_1's
        get(2).await;
        assert_eq!(
            ups[2].seen().iter().map(|s| s.conn).collect::<Vec<_>>(),
            [0, 0],
            "{engine}"
        );
        get(0).await;
        assert_eq!(
            ups[0].seen().iter().map(|s| s.conn).collect::<Vec<_>>(),
            [0, 1],
            "{engine}"
        );
        eventually(
            &format!("{engine}: cs_1's connection closed"),
            Duration::from_secs(10),
            || async { (ups[1].closed() == [0]).then_some(()) },
        )
        .await;
        assert!(ups[2].closed().is_empty(), "{engine}");
        assert_eq!(ups[0].closed(), [0], "{engine}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_idle_upstream_connections_give_way_to_a_new_one() {
    // more servers than the gateway has descriptors, each kept idle after its request
    rlimit::increase_nofile_limit(4096).unwrap();
    let n = 300;
    let (ups, gw) = over_servers("hagate", n, "[upstream]\nmax_idle = 100000\n", Some(256)).await;
    let c = client();
    for i in 0..n {
        assert_eq!(get_on(&c, &gw, i, n).await, 200, "cs_{i}\n{}", gw.log());
    }
    // each on its main, none failed over or refused: the gateway closed idle connections
    // to make room, and connected again
    for (i, up) in ups.iter().enumerate() {
        assert_eq!(up.seen().len(), 1, "cs_{i}");
    }
    let log = gw.log();
    assert!(
        log.contains("out of descriptors: closed idle upstream connections to connect"),
        "{log}"
    );
    assert!(!log.contains("upstream connect failed"), "{log}");
    eventually(
        "the servers see the closed connections",
        Duration::from_secs(10),
        || async { ups.iter().any(|up| up.closed() == [0]).then_some(()) },
    )
    .await;
}
