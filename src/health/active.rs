//! Active health checks: one task per instance address, all running in parallel, each an
//! HTTP GET of `health.active.path` every `interval` with a `timeout`.
//!
//! The supervisor re-reads the table after every swap, starting checks for new addresses
//! and stopping them for removed ones. Results go into the shared `InstanceState`.
//!
//! A plain-HTTP check is hagate's own: it sends the GET, reads the status line, and keeps
//! the connection for the next check when the answer is framed by a short
//! `Content-Length` (a kept connection that the server closed meanwhile is replaced at
//! once). Between checks a target holds its task and at most that socket, no buffer.
//! Through a shared reqwest client each address kept a hyper connection with its buffers
//! and its task, about 23 KiB, and 10k addresses took 250 MiB (docs/performance.md,
//! "Active health checks at 10k aliases"). HTTPS checks go through a reqwest client of
//! their own, built on a blocking thread: building one reads the system's root
//! certificates.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{interval, MissedTickBehavior};

use tokio::sync::watch;

use crate::health::{InstanceState, Transition};
use crate::http1::{response_framing, Framed, Framing};
use crate::metrics::{metrics, InstanceMetrics};
use crate::model::ActiveHealthConfig;

/// What the checks need from whoever owns the table: the settings, the instances to
/// check, and a signal when either changes. The gateway implements it; health imports
/// nothing above itself.
pub trait CheckTargets: Send + Sync + 'static {
    /// The current `[health.active]` settings.
    fn active_config(&self) -> ActiveHealthConfig;
    /// Every instance to check.
    fn targets(&self) -> Vec<CheckTarget>;
    /// The CA certificates (PEM file) that TLS instances are verified against; `None`:
    /// the system's roots.
    fn ca_file(&self) -> Option<std::path::PathBuf>;
    /// A receiver that changes whenever the targets or the settings may have changed.
    fn subscribe(&self) -> watch::Receiver<u64>;
}

/// One instance to check.
#[derive(Debug, Clone)]
pub struct CheckTarget {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its alias.
    pub alias: String,
    /// Its shared health state.
    pub state: Arc<InstanceState>,
    /// `Some(server name)` to check it over TLS (an empty name: verify the IP).
    pub tls: Option<String>,
}

/// Runs the checks until the owner's change channel closes; restarts them whenever the
/// table or the health config changes.
pub async fn supervise(owner: Arc<impl CheckTargets>) {
    let mut changes = owner.subscribe();
    // per address: (alias, TLS name) and its check task
    type Key = (String, Option<String>);
    let mut running: HashMap<SocketAddr, (Key, JoinHandle<()>)> = HashMap::new();
    let mut last_cfg: Option<ActiveHealthConfig> = None;
    loop {
        let cfg = owner.active_config();
        if last_cfg.as_ref() != Some(&cfg) {
            for (_, (_, task)) in running.drain() {
                task.abort();
            }
        }
        // Disabled, nothing runs (the drain above stopped it); enabled, the targets are
        // read for this pass only, not kept while waiting (a copy of every alias).
        if cfg.enabled {
            let targets = owner.targets();
            let wanted: HashMap<SocketAddr, &CheckTarget> =
                targets.iter().map(|t| (t.addr, t)).collect();
            running.retain(|addr, (key, task)| {
                let keep = wanted
                    .get(addr)
                    .is_some_and(|t| *key == (t.alias.clone(), t.tls.clone()));
                if !keep {
                    task.abort();
                }
                keep
            });
            let ca = owner.ca_file();
            for (addr, target) in &wanted {
                running.entry(*addr).or_insert_with(|| {
                    let task = tokio::spawn(check_loop((*target).clone(), cfg.clone(), ca.clone()));
                    ((target.alias.clone(), target.tls.clone()), task)
                });
            }
        }
        last_cfg = Some(cfg);
        if changes.changed().await.is_err() {
            break;
        }
    }
    for (_, (_, task)) in running {
        task.abort();
    }
}

/// The client of one HTTPS check: verified against `ca` (else the system's roots) with
/// the target's server name `name` (empty: verify the IP), and its URL. Blocking: it reads
/// the roots.
fn tls_client(
    addr: SocketAddr,
    name: &str,
    cfg: &ActiveHealthConfig,
    ca: Option<&std::path::Path>,
) -> Result<(reqwest::Client, String), String> {
    let mut builder = reqwest::Client::builder()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        .pool_max_idle_per_host(1)
        .no_proxy()
        .use_rustls_tls();
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| e.to_string())? {
            builder = builder.add_root_certificate(cert);
        }
        builder = builder.tls_built_in_root_certs(false);
    }
    let url = if name.is_empty() {
        format!("https://{addr}{}", cfg.path)
    } else {
        builder = builder.resolve(name, addr);
        format!("https://{name}:{}{}", addr.port(), cfg.path)
    };
    Ok((builder.build().map_err(|e| e.to_string())?, url))
}

/// How one target is checked.
enum Checker {
    /// Plain HTTP: this request, on the connection kept from the last check if there is one.
    Plain {
        request: Box<[u8]>,
        kept: Option<TcpStream>,
    },
    /// HTTPS, through reqwest.
    Tls(reqwest::Client, String),
}

/// Why a check failed.
#[derive(Debug)]
enum CheckError {
    /// Out of local resources (descriptors, buffers, memory): not the instance's fault.
    Local(String),
    /// The instance's.
    Failed(String),
}

impl CheckError {
    fn of(error: &(dyn std::error::Error + 'static)) -> CheckError {
        let mut text = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            text = format!("{text}: {cause}");
            source = cause.source();
        }
        if crate::health::is_local_resource_error(error) {
            CheckError::Local(text)
        } else {
            CheckError::Failed(text)
        }
    }

    fn io(error: std::io::Error) -> CheckError {
        CheckError::of(&error)
    }
}

/// The request of a plain check: `GET path` with the address as `Host`.
fn plain_request(addr: SocketAddr, path: &str) -> Box<[u8]> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: hagate-health-check/{}\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes()
    .into_boxed_slice()
}

/// The longest answer head read, and the longest body read to keep the connection.
const MAX_HEAD: usize = 8 * 1024;
const MAX_BODY: usize = 64 * 1024;

/// What the head of an answer says, once its status line is whole.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    /// The head's length and the body's (`Content-Length`), when the connection can serve
    /// the next check once that body is read: HTTP/1.1, no `Connection: close`, no other
    /// framing.
    reuse: Option<(usize, usize)>,
}

/// The answer that begins with `head`: `Ok(None)` while its status line is not all there.
/// The status line decides; a head that is not whole, or not clean, only costs the
/// connection.
fn answer_of(head: &[u8]) -> Result<Option<Answer>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let parsed = response.parse(head);
    let Some(status) = response.code else {
        return match parsed {
            Ok(_) => Ok(None),
            Err(e) => Err(format!("not an HTTP/1 answer ({e})")),
        };
    };
    let reuse = match parsed {
        // the forwarding loop's framing rules: kept after a body framed by its length
        Ok(httparse::Status::Complete(len)) => match response_framing(&response, false) {
            Ok(Framed {
                framing,
                reusable: true,
                ..
            }) => match framing {
                Framing::Empty => Some((len, 0)),
                Framing::Length(n) => usize::try_from(n).ok().map(|n| (len, n)),
                Framing::Chunked | Framing::Close => None,
            },
            _ => None,
        },
        // the status line is whole and the head not yet: the rest, up to MAX_HEAD
        Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => return Ok(None),
        Ok(_) => None,
        Err(
            httparse::Error::TooManyHeaders
            | httparse::Error::HeaderName
            | httparse::Error::HeaderValue,
        ) => None,
        Err(e) => return Err(format!("not an HTTP/1 answer ({e})")),
    };
    Ok(Some(Answer { status, reuse }))
}

/// How an exchange on a connection ended.
enum Exchanged {
    /// The status, and the connection if it can serve the next check.
    Answered(u16, Option<TcpStream>),
    /// Closed (or reset, with the error) before any byte of an answer: on a kept
    /// connection, the server had closed it while idle.
    Closed(Option<std::io::Error>),
}

/// Sends `request` on `conn` and reads the answer's status, and its body when it is short
/// and framed by length, so that the connection can be kept.
async fn exchange(mut conn: TcpStream, request: &[u8]) -> Result<Exchanged, CheckError> {
    if let Err(e) = conn.write_all(request).await {
        return Ok(Exchanged::Closed(Some(e)));
    }
    let mut buf = Vec::with_capacity(512);
    let answer = loop {
        match conn.read_buf(&mut buf).await {
            Ok(0) if buf.is_empty() => return Ok(Exchanged::Closed(None)),
            Err(e) if buf.is_empty() => return Ok(Exchanged::Closed(Some(e))),
            Ok(0) => {
                return Err(CheckError::Failed(
                    "the connection closed before a status line".into(),
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(CheckError::io(e)),
        }
        if let Some(answer) = answer_of(&buf).map_err(CheckError::Failed)? {
            break answer;
        }
        if buf.len() >= MAX_HEAD {
            return Err(CheckError::Failed(format!(
                "no status line in the first {MAX_HEAD} bytes"
            )));
        }
    };
    let Some((head, body)) = answer.reuse.filter(|&(_, body)| body <= MAX_BODY) else {
        return Ok(Exchanged::Answered(answer.status, None));
    };
    // the body, to keep the connection; any failure here only costs the connection
    while buf.len() < head + body {
        match conn.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => return Ok(Exchanged::Answered(answer.status, None)),
        }
    }
    let kept = (buf.len() == head + body).then_some(conn);
    Ok(Exchanged::Answered(answer.status, kept))
}

/// One plain check: on the kept connection, else (or when the server had closed it) on a
/// new one. The connection is kept for the next check when the answer allows it.
async fn plain_check(
    addr: SocketAddr,
    request: &[u8],
    kept: &mut Option<TcpStream>,
) -> Result<u16, CheckError> {
    if let Some(conn) = kept.take() {
        if let Exchanged::Answered(status, conn) = exchange(conn, request).await? {
            *kept = conn;
            return Ok(status);
        }
    }
    let conn = TcpStream::connect(addr).await.map_err(CheckError::io)?;
    match exchange(conn, request).await? {
        Exchanged::Answered(status, conn) => {
            *kept = conn;
            Ok(status)
        }
        // on a new connection the error is the check's (or the gateway's: out of buffers)
        Exchanged::Closed(Some(e)) => Err(CheckError::io(e)),
        Exchanged::Closed(None) => Err(CheckError::Failed(
            "the connection closed before a status line".into(),
        )),
    }
}

impl Checker {
    /// One check within `timeout`: `Ok(true)` for a 2xx or 3xx answer.
    async fn check(
        &mut self,
        addr: SocketAddr,
        timeout: std::time::Duration,
    ) -> Result<bool, CheckError> {
        let status = match self {
            Checker::Plain { request, kept } => {
                tokio::time::timeout(timeout, plain_check(addr, request, kept))
                    .await
                    .map_err(|_| CheckError::Failed(format!("no answer within {timeout:?}")))??
            }
            // reqwest applies the timeout
            Checker::Tls(client, url) => client
                .get(&*url)
                .send()
                .await
                .map_err(|e| CheckError::of(&e))?
                .status()
                .as_u16(),
        };
        Ok((200..400).contains(&status))
    }
}

async fn check_loop(target: CheckTarget, cfg: ActiveHealthConfig, ca: Option<std::path::PathBuf>) {
    let mut checker = match &target.tls {
        None => Checker::Plain {
            request: plain_request(target.addr, &cfg.path),
            kept: None,
        },
        // a client of its own: built on a blocking thread, not on the checks' runtime
        Some(name) => {
            let (addr, name, c) = (target.addr, name.clone(), cfg.clone());
            let built =
                tokio::task::spawn_blocking(move || tls_client(addr, &name, &c, ca.as_deref()))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
            match built {
                Ok((client, url)) => Checker::Tls(client, url),
                Err(error) => {
                    tracing::error!(%error, alias = target.alias, "cannot build the health-check client");
                    return;
                }
            }
        }
    };
    let CheckTarget {
        addr, alias, state, ..
    } = target;
    let mut ticks = interval(cfg.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let counts = InstanceMetrics::for_alias(&alias);
    loop {
        ticks.tick().await;
        let passed = match checker.check(addr, cfg.timeout).await {
            Ok(passed) => passed,
            // Out of descriptors here is not the instance failing: skip this check.
            Err(CheckError::Local(error)) => {
                metrics()
                    .local_resource_errors
                    .with_label_values(&["health_check"])
                    .inc();
                tracing::warn!(alias, %addr, error, "health check skipped: the gateway is out of local resources");
                continue;
            }
            Err(CheckError::Failed(error)) => {
                tracing::debug!(alias, %addr, error, "health check failed");
                false
            }
        };
        counts.checked(passed);
        match state.record_check(passed, cfg.rise, cfg.fall) {
            Transition::Same => {}
            Transition::Up => {
                counts.turned(true);
                tracing::info!(alias, %addr, "instance is up");
            }
            Transition::Down => {
                counts.turned(false);
                tracing::warn!(alias, %addr, "instance is down");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(head: &str) -> Result<Option<Answer>, String> {
        answer_of(head.as_bytes())
    }

    fn reuse(status: u16, head: &str, body: usize) -> Result<Option<Answer>, String> {
        Ok(Some(Answer {
            status,
            reuse: Some((head.len(), body)),
        }))
    }

    fn no_reuse(status: u16) -> Result<Option<Answer>, String> {
        Ok(Some(Answer {
            status,
            reuse: None,
        }))
    }

    #[test]
    fn the_status_line_decides_and_a_clean_head_keeps_the_connection() {
        assert_eq!(answer("HTTP/1.1 20"), Ok(None));
        // the rest of the head is awaited, to know whether the connection can be kept
        assert_eq!(answer("HTTP/1.1 200 OK\r\nContent-Len"), Ok(None));
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(answer(head), reuse(200, head, 2));
        let head = "HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(answer(head), reuse(204, head, 0));
        let head = "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n";
        assert_eq!(answer(head), reuse(304, head, 0));
        for other in [
            "HTTP/1.1 200 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, close\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 100 Continue\r\n\r\n",
        ] {
            let status = other[9..12].parse().unwrap();
            assert_eq!(answer(other), no_reuse(status), "{other:?}");
        }
        // headers that do not fit or do not parse only cost the connection
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "A: b\r\n".repeat(100));
        assert_eq!(answer(&many), no_reuse(200));
        assert_eq!(
            answer("HTTP/1.1 302 Found\r\nbad header\r\n"),
            no_reuse(302)
        );
        let long = format!("HTTP/1.1 503 Busy\r\nA: {}", "b".repeat(MAX_HEAD));
        assert_eq!(answer(&long), no_reuse(503));
        assert!(answer("SSH-2.0-OpenSSH\r\n").is_err());
        assert!(answer("HTTP/1.1 2000 OK\r\n").is_err());
    }

    /// A server on 127.0.0.1:0 that answers every request with `answer` and, when
    /// `close_idle`, closes each connection after one answer; it counts its connections.
    async fn server(
        answer: &'static str,
        close_idle: bool,
    ) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        match conn.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            if conn.write_all(answer.as_bytes()).await.is_err() || close_idle {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn a_plain_check_keeps_its_connection_and_replaces_one_the_server_closed() {
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (addr, accepted) = server(ok, false).await;
        let request = plain_request(addr, "/health");
        let mut kept = None;
        for _ in 0..5 {
            assert_eq!(plain_check(addr, &request, &mut kept).await.unwrap(), 200);
            assert!(kept.is_some());
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);

        // a server that closes each connection after its answer: every check still
        // passes, each on a new connection once the kept one is found closed
        let (addr, accepted) = server(ok, true).await;
        let mut kept = None;
        for _ in 0..3 {
            assert_eq!(plain_check(addr, &request, &mut kept).await.unwrap(), 200);
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);

        // nothing listening: the OS's error, the instance's failure
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let nobody = closed.local_addr().unwrap();
        drop(closed);
        match plain_check(nobody, &request, &mut None).await {
            Err(CheckError::Failed(error)) => assert!(error.contains("refused"), "{error}"),
            other => panic!("{other:?}"),
        }

        // an answer the connection cannot be kept after: the status still counts
        let (addr, _) = server("HTTP/1.1 503 Busy\r\n\r\nbusy", false).await;
        let mut kept = None;
        assert_eq!(plain_check(addr, &request, &mut kept).await.unwrap(), 503);
        assert!(kept.is_none());
    }

    #[test]
    fn a_plain_check_asks_for_the_path() {
        let addr: SocketAddr = "127.0.0.1:9101".parse().unwrap();
        let request = plain_request(addr, "/health?x=1");
        let text = std::str::from_utf8(&request).unwrap();
        assert!(text.starts_with("GET /health?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9101\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
        assert!(!text.to_ascii_lowercase().contains("connection:"));
    }
}
