//! Connection hygiene on the proxy listener, as nginx and HAProxy have it: a cap on open
//! connections, an idle (keep-alive) timeout, and a deadline for a request's headers. It
//! wraps pingora's transport (`Stream`) and its `ServerApp`; it knows nothing of request
//! phases, except that `proxy` tells it when a request has ended (`Connections::idle`).
//!
//! - **`server.max_connections`.** Each accepted connection takes a slot. When all slots
//!   are taken, the connection that has been idle longest (waiting for its first or next
//!   request) is closed to make room, as nginx reuses keep-alive connections when it runs
//!   out; if none is idle, the new connection is closed. So silent clients can never
//!   starve the gateway of descriptors, and a client that sends a request gets served.
//!   The decision is made in pingora's accept loop (a connection filter, `Admit`), which
//!   waits for an evicted connection to close before it accepts again: the open
//!   descriptors never exceed the cap, however busy the runtime is.
//! - **`server.keepalive_timeout`.** A connection idle that long is closed: before its first
//!   request, and between requests. (Pingora itself re-arms HTTP/1.1 keep-alive with no
//!   timeout after each request.)
//! - **`server.header_timeout`.** From the first byte of a request (the first, or a later
//!   one on a keep-alive connection) to the blank line that ends its headers. A slowloris
//!   client that trickles bytes is closed when it runs out.
//!
//! The header deadline ends at the first `\r\n\r\n` after a request starts; the body and
//! the response are then governed by the upstream and pingora timeouts. An upgraded
//! connection (WebSocket) stays busy until its request ends, so no deadline cuts it.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::listeners::ConnectionFilter;
use pingora::protocols::http::ServerSession;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::forward::{Forwarder, Served};
use crate::health::now_ms;
use crate::metrics::metrics;

/// The limits of the proxy listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most connections open at once.
    pub max_connections: usize,
    /// How long a connection may wait for its first or next request.
    pub keepalive_timeout: Duration,
    /// How long a request may take from its first byte to the end of its headers.
    pub header_timeout: Duration,
    /// The largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
    /// The most idle upstream connections kept (`upstream.max_idle`).
    pub max_idle: usize,
}

/// The most header lines a request may have; pingora refuses more than 256 headers with
/// an empty 400, so the guard answers first.
const MAX_HEADER_LINES: usize = 250;

/// The answer to a request head that is too large, written by the guard itself (pingora
/// would answer it with an empty 400).
static TOO_LARGE: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let body = format!(
        "{}\n",
        serde_json::json!({
            "error": "request_header_too_large",
            "detail": format!("the request head is larger than server.max_header_bytes or has more than {MAX_HEADER_LINES} lines"),
        })
    );
    format!(
        "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// One open connection's shared state.
#[derive(Debug)]
struct Slot {
    /// `now_ms()` when it became idle, or 0 while a request is in progress.
    idle_since: AtomicU64,
    /// Told to close (it was the oldest idle connection when the slots ran out).
    evict: Arc<Notify>,
    /// It was told to close (and counts in `Connections::evicting` until it has).
    evicted: AtomicBool,
}

/// Every open connection of the proxy listener.
#[derive(Debug)]
pub struct Connections {
    limits: Mutex<Limits>,
    open: AtomicUsize,
    slots: Mutex<HashMap<SocketAddr, Arc<Slot>>>,
    /// Connections told to close that have not closed yet.
    evicting: AtomicUsize,
    /// Told whenever a connection closes.
    closed: Notify,
    /// Slots taken in the accept loop, for connections not yet handed to the app.
    reserved: Mutex<HashMap<SocketAddr, (Ticket, Instant)>>,
}

impl Connections {
    /// No connections yet.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Connections {
            limits: Mutex::new(limits),
            open: AtomicUsize::new(0),
            slots: Mutex::new(HashMap::new()),
            evicting: AtomicUsize::new(0),
            closed: Notify::new(),
            reserved: Mutex::new(HashMap::new()),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// New limits (a config reload); open connections keep the deadlines they have.
    pub fn set_limits(&self, limits: Limits) {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner()) = limits;
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Marks the connection from `peer` idle: its request has ended (called by the proxy
    /// when it logs a request).
    pub fn idle(&self, peer: &SocketAddr) {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get(peer) {
            slot.idle_since.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// Decides on a connection just accepted from `peer`: a slot for it (kept in
    /// `reserved` until `Guard::process_new` takes it), or a wait for an evicted
    /// connection to close, or a refusal (every connection is busy).
    fn try_admit(self: &Arc<Self>, peer: SocketAddr) -> Admission {
        let max = self.limits().max_connections;
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if self.open.load(Ordering::Relaxed) < max {
            self.open.fetch_add(1, Ordering::Relaxed);
            metrics()
                .connections_open
                .with_label_values(&["proxy"])
                .inc();
            let slot = Arc::new(Slot {
                idle_since: AtomicU64::new(now_ms()),
                evict: Arc::new(Notify::new()),
                evicted: AtomicBool::new(false),
            });
            slots.insert(peer, Arc::clone(&slot));
            return Admission::Admitted(Ticket {
                conns: Arc::clone(self),
                peer,
                slot,
            });
        }
        if self.evicting.load(Ordering::Relaxed) > 0 {
            return Admission::Wait;
        }
        let oldest = slots
            .iter()
            .filter_map(|(peer, s)| {
                let t = s.idle_since.load(Ordering::Relaxed);
                (t != 0).then_some((t, *peer))
            })
            .min();
        match oldest.and_then(|(_, p)| slots.remove(&p)) {
            Some(victim) => {
                victim.evicted.store(true, Ordering::Relaxed);
                self.evicting.fetch_add(1, Ordering::Relaxed);
                victim.evict.notify_one();
                metrics()
                    .connections_closed
                    .with_label_values(&["evicted_idle"])
                    .inc();
                Admission::Wait
            }
            None => Admission::Refuse,
        }
    }

    /// Admits a connection just accepted from `peer`, waiting (at most `EVICTION_WAIT`)
    /// for the longest-idle connection to close if every slot is taken. Runs in pingora's
    /// accept loop, so while it waits no other connection is accepted: the descriptors
    /// open never exceed `max_connections` plus the one being decided.
    async fn admit(self: &Arc<Self>, peer: SocketAddr) -> Option<Ticket> {
        let deadline = Instant::now() + EVICTION_WAIT;
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            match self.try_admit(peer) {
                Admission::Admitted(ticket) => return Some(ticket),
                Admission::Wait => {
                    if tokio::time::timeout_at(deadline, closed).await.is_err() {
                        break;
                    }
                }
                Admission::Refuse => break,
            }
        }
        metrics()
            .connections_closed
            .with_label_values(&["refused_full"])
            .inc();
        None
    }

    /// The slot reserved for `peer` by the connection filter, if any.
    fn take_reserved(&self, peer: &SocketAddr) -> Option<Ticket> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        // a connection whose handshake failed never reaches the app: free its slot
        if reserved.len() > 1 {
            reserved.retain(|_, (_, at)| at.elapsed() < HANDSHAKE_LIMIT);
        }
        reserved.remove(peer).map(|(ticket, _)| ticket)
    }
}

/// How long an accepted connection may wait for an evicted one to close.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// Longer than pingora's handshake timeout (60 s): a reserved slot not taken by then
/// belongs to a connection that never reached the app.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(65);

/// What to do with a connection just accepted.
enum Admission {
    Admitted(Ticket),
    /// Every slot is taken and an evicted connection is closing.
    Wait,
    /// Every slot is taken by a busy connection.
    Refuse,
}

/// Pingora's accept loop asks here before it takes a connection on: the cap is enforced
/// before the connection has a task of its own, so refusals and evictions cannot pile up
/// behind a busy runtime.
/// The connection filter that admits connections to the proxy listener (installed on
/// pingora's listening service with `set_connection_filter`).
#[derive(Debug)]
pub struct Admit(pub Arc<Connections>);

#[async_trait]
impl ConnectionFilter for Admit {
    async fn should_accept(&self, addr: Option<&SocketAddr>) -> bool {
        let Some(peer) = addr.copied() else {
            return true;
        };
        match self.0.admit(peer).await {
            Some(ticket) => {
                let mut reserved = self.0.reserved.lock().unwrap_or_else(|p| p.into_inner());
                // a peer address is unique among open connections
                reserved.insert(peer, (ticket, Instant::now()));
                true
            }
            None => false,
        }
    }
}

/// A connection's hold on its slot; dropping it frees the slot.
#[derive(Debug)]
struct Ticket {
    conns: Arc<Connections>,
    peer: SocketAddr,
    slot: Arc<Slot>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.conns.open.fetch_sub(1, Ordering::Relaxed);
        metrics()
            .connections_open
            .with_label_values(&["proxy"])
            .dec();
        let mut slots = self.conns.slots.lock().unwrap_or_else(|p| p.into_inner());
        // An evicted slot was already removed, and its peer may since belong to another.
        if slots
            .get(&self.peer)
            .is_some_and(|s| Arc::ptr_eq(s, &self.slot))
        {
            slots.remove(&self.peer);
        }
        drop(slots);
        if self.slot.evicted.load(Ordering::Relaxed) {
            self.conns.evicting.fetch_sub(1, Ordering::Relaxed);
        }
        self.conns.closed.notify_waiters();
    }
}

/// Where a connection is in its current request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first byte of a request; the keep-alive deadline runs.
    Idle,
    /// Reading request headers; the header deadline runs. `tail` holds the last three
    /// bytes seen, to find a `\r\n\r\n` split across reads; `bytes` and `lines` count
    /// the head so far.
    Headers {
        tail: [u8; 3],
        bytes: usize,
        lines: usize,
    },
    /// The head was too large: writing the 431 answer (this many bytes done), then closing.
    Refusing { written: usize },
    /// Headers complete: the body and the response are someone else's business.
    Busy,
}

/// A proxy connection with the deadlines of its phase.
struct Guarded {
    inner: Stream,
    ticket: Ticket,
    limits: Limits,
    phase: Phase,
    deadline: Pin<Box<Sleep>>,
    evicted: Pin<Box<tokio::sync::futures::OwnedNotified>>,
    /// Bytes of the JSON 400 written in place of pingora's bare one.
    replaced: usize,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .finish()
    }
}

/// Where in `bytes`, read after `tail`, a header block ends (the offset just past its
/// `\r\n\r\n`), if it does; and the new tail.
fn ends_headers(tail: [u8; 3], bytes: &[u8]) -> (Option<usize>, [u8; 3]) {
    let mut last = tail;
    for (i, &b) in bytes.iter().enumerate() {
        if [last[0], last[1], last[2], b] == *b"\r\n\r\n" {
            return (Some(i + 1), last);
        }
        last = [last[1], last[2], b];
    }
    (None, last)
}

impl Guarded {
    fn new(inner: Stream, ticket: Ticket, limits: Limits) -> Self {
        let evicted = Box::pin(Arc::clone(&ticket.slot.evict).notified_owned());
        Guarded {
            inner,
            ticket,
            limits,
            phase: Phase::Idle,
            deadline: Box::pin(tokio::time::sleep(limits.keepalive_timeout)),
            evicted,
            replaced: 0,
        }
    }

    fn slot(&self) -> &Slot {
        &self.ticket.slot
    }

    /// The proxy logged a request on this connection: it is idle again.
    fn notice_idle(&mut self) {
        if self.phase != Phase::Idle && self.slot().idle_since.load(Ordering::Relaxed) != 0 {
            self.phase = Phase::Idle;
            let until = Instant::now() + self.limits.keepalive_timeout;
            self.deadline.as_mut().reset(until);
        }
    }
}

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, what.to_string())
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Phase::Refusing { written } = &mut this.phase {
            while *written < TOO_LARGE.len() {
                match Pin::new(&mut this.inner).poll_write(cx, &TOO_LARGE[*written..]) {
                    Poll::Ready(Ok(n)) if n > 0 => *written += n,
                    Poll::Ready(_) => return Poll::Ready(Ok(())),
                    Poll::Pending => return Poll::Pending,
                }
            }
            let _ = ready!(Pin::new(&mut this.inner).poll_flush(cx));
            return Poll::Ready(Ok(())); // end of stream: pingora closes the connection
        }
        this.notice_idle();
        if this.phase == Phase::Idle && this.evicted.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(())); // end of stream: the connection closes
        }
        if this.phase != Phase::Busy && this.deadline.as_mut().poll(cx).is_ready() {
            let label = if this.phase == Phase::Idle {
                "keepalive_timeout"
            } else {
                "header_timeout"
            };
            metrics()
                .connections_closed
                .with_label_values(&[label])
                .inc();
            return match this.phase {
                Phase::Idle => Poll::Ready(Ok(())),
                _ => Poll::Ready(Err(timed_out(
                    "the request headers did not arrive within server.header_timeout",
                ))),
            };
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if new.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if this.phase == Phase::Idle {
            // The first byte of a request: busy, and the header deadline starts.
            this.slot().idle_since.store(0, Ordering::Relaxed);
            this.phase = Phase::Headers {
                tail: [0; 3],
                bytes: 0,
                lines: 0,
            };
            let until = Instant::now() + this.limits.header_timeout;
            this.deadline.as_mut().reset(until);
        }
        if let Phase::Headers { tail, bytes, lines } = this.phase {
            let (end, tail) = ends_headers(tail, new);
            let head = &new[..end.unwrap_or(new.len())];
            let bytes = bytes + head.len();
            let lines = lines + head.iter().filter(|&&b| b == b'\n').count();
            this.phase = if bytes > this.limits.max_header_bytes || lines > MAX_HEADER_LINES {
                metrics()
                    .connections_closed
                    .with_label_values(&["header_too_large"])
                    .inc();
                buf.set_filled(before); // pingora never sees this head
                this.phase = Phase::Refusing { written: 0 };
                return Pin::new(&mut *self).poll_read(cx, buf);
            } else if end.is_some() {
                Phase::Busy
            } else {
                Phase::Headers { tail, bytes, lines }
            };
        }
        Poll::Ready(Ok(()))
    }
}

/// The start of the bare 400 that pingora writes for a request it cannot parse (bad
/// framing, bad header syntax, conflicting Content-Length), before any hook can answer.
const PINGORA_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\n";

/// What the guard writes instead: the same status, with a JSON body.
static BAD_REQUEST: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let body = format!(
        "{}\n",
        serde_json::json!({
            "error": "bad_request",
            "detail": "the request could not be parsed: bad framing (for example conflicting Content-Length headers) or bad header syntax",
        })
    );
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// Whether `buf` is exactly pingora's canned bare 400: its status and server lines, an
/// empty body, and nothing after the header block.
fn is_pingora_400(buf: &[u8]) -> bool {
    buf.starts_with(PINGORA_400)
        && buf.ends_with(b"\r\n\r\n")
        && buf.windows(19).any(|w| w == b"Content-Length: 0\r\n")
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        // Pingora's own bare 400, written whole in one piece: write the JSON answer in its
        // place, and report the original as written. (Only pingora's canned error pages
        // carry `Server: Pingora` with an empty body; hagate's answers and proxied ones
        // pass through untouched.)
        if this.replaced > 0 || is_pingora_400(buf) {
            while this.replaced < BAD_REQUEST.len() {
                let n = ready!(
                    Pin::new(&mut this.inner).poll_write(cx, &BAD_REQUEST[this.replaced..])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                this.replaced += n;
            }
            this.replaced = 0;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// The peer address of a pingora stream, if it is an inet socket.
fn peer_of(stream: &Stream) -> Option<SocketAddr> {
    stream.get_socket_digest()?.peer_addr()?.as_inet().copied()
}

/// Wraps a pingora app (the HTTP proxy) so that every connection goes through
/// `Connections`: a slot, and the deadlines of `Guarded`.
pub struct Guard<A> {
    inner: Arc<A>,
    conns: Arc<Connections>,
    forward: Option<Arc<Forwarder>>,
}

impl<A> Guard<A> {
    /// Guards `inner` with `conns`. With `forward`, each connection is first served by
    /// hagate's own forwarding loop, and goes to `inner` only when the loop hands it over.
    pub fn new(inner: A, conns: Arc<Connections>, forward: Option<Arc<Forwarder>>) -> Self {
        Guard {
            inner: Arc::new(inner),
            conns,
            forward,
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Guard<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(peer) = peer_of(&stream) else {
            return self.inner.process_new(stream, shutdown).await;
        };
        let ticket = match self.conns.take_reserved(&peer) {
            Some(ticket) => ticket,
            None => self.conns.admit(peer).await?,
        };
        let limits = self.conns.limits();
        let h2 = stream.selected_alpn_proto() == Some(pingora::protocols::ALPN::H2);
        let mut stream: Stream = Box::new(Guarded::new(stream, ticket, limits));
        let Some(forward) = self.forward.as_ref().filter(|_| !h2) else {
            return self.inner.process_new(stream, shutdown).await;
        };
        // hagate's loop serves what it can; each request it hands over is pingora's, with
        // the bytes already read, and then the connection comes back to the loop.
        loop {
            let read = match forward.serve(&mut stream, Some(peer), shutdown).await {
                Served::Closed => return None,
                Served::HandOver(read) => read,
            };
            let mut session = ServerSession::new_http1(stream);
            // As pingora's own HTTP/1 loop sets it (`ServerApp for HttpServerApp`).
            session.set_keepalive((!*shutdown.borrow()).then_some(60));
            session.set_keepalive_reuses_remaining(
                self.inner
                    .server_options()
                    .and_then(|o| o.keepalive_request_limit),
            );
            if !read.is_empty() {
                session.set_pipelined_prefix(read);
            }
            // `None`: pingora closed it (no keep-alive, or the request failed).
            let reused = self.inner.process_new_http(session, shutdown).await?;
            // Its settings carry a pipelined prefix only with pingora's pipelining on,
            // which hagate leaves off; the rest is pingora's keep-alive, set again above.
            stream = reused.consume().0;
        }
    }

    /// The listener stopped accepting (SIGTERM, or an upgrade handed it to a new process).
    /// Pingora's cleanup would close every idle keep-alive connection at once, and a client
    /// sending its next request on one at that instant would get a reset. So first let each
    /// open connection end by itself: pingora answers every request from now on with
    /// `Connection: close`. What is still open at the end of the grace period is closed.
    async fn cleanup(&self) {
        let deadline = Instant::now() + self.conns.limits().keepalive_timeout;
        loop {
            let closed = self.conns.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.conns.open() == 0 || tokio::time::timeout_at(deadline, closed).await.is_err() {
                break;
            }
        }
        self.inner.cleanup().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_headers_is_found_across_reads() {
        assert_eq!(
            ends_headers([0; 3], b"GET / HTTP/1.1\r\n\r\nbody").0,
            Some(18)
        );
        let (end, tail) = ends_headers([0; 3], b"GET / HTTP/1.1\r\nHost: x\r");
        assert_eq!(end, None);
        let (end, tail) = ends_headers(tail, b"\n\r");
        assert_eq!(end, None);
        assert_eq!(ends_headers(tail, b"\nxyz").0, Some(1));
        assert_eq!(ends_headers([0; 3], b"\r\n\r").0, None);
        assert_eq!(ends_headers([0; 3], b"").0, None);
    }

    fn limits(max: usize) -> Limits {
        Limits {
            max_connections: max,
            keepalive_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 65536,
            max_idle: 0,
        }
    }

    fn admitted(a: Admission) -> Ticket {
        match a {
            Admission::Admitted(t) => t,
            Admission::Wait => panic!("wait"),
            Admission::Refuse => panic!("refused"),
        }
    }

    #[tokio::test]
    async fn full_slots_evict_the_oldest_idle_connection_and_wait_for_it_or_refuse() {
        let conns = Connections::new(limits(2));
        let p = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let a = admitted(conns.try_admit(p(1)));
        let b = admitted(conns.try_admit(p(2)));
        // both idle: the oldest is told to close (a, idle since it connected)
        b.slot.idle_since.store(now_ms() + 5, Ordering::Relaxed);
        a.slot.idle_since.store(1, Ordering::Relaxed);
        assert!(matches!(conns.try_admit(p(3)), Admission::Wait));
        let told = Arc::clone(&a.slot.evict).notified_owned();
        assert!(tokio::time::timeout(Duration::from_secs(1), told)
            .await
            .is_ok());
        // while it has not closed, nobody else is told and nobody is admitted
        assert!(matches!(conns.try_admit(p(3)), Admission::Wait));
        assert_eq!(conns.evicting.load(Ordering::Relaxed), 1);
        // it closes: the waiting connection gets its slot
        let waiting = tokio::spawn({
            let conns = Arc::clone(&conns);
            async move { conns.admit(p(3)).await }
        });
        drop(a);
        let c = waiting.await.unwrap().expect("admitted once a closed");
        assert_eq!(
            (conns.open(), conns.evicting.load(Ordering::Relaxed)),
            (2, 0)
        );
        // both busy: refused at once
        b.slot.idle_since.store(0, Ordering::Relaxed);
        c.slot.idle_since.store(0, Ordering::Relaxed);
        assert!(conns.admit(p(4)).await.is_none());
        // a request ends: idle again, so it can make room
        conns.idle(&p(2));
        assert!(matches!(conns.try_admit(p(4)), Admission::Wait));
        drop(b);
        let d = admitted(conns.try_admit(p(4)));
        drop((c, d));
        assert_eq!(conns.open(), 0);
    }

    #[tokio::test]
    async fn a_reserved_slot_goes_to_its_connection() {
        let conns = Connections::new(limits(1));
        let peer = SocketAddr::from(([127, 0, 0, 1], 9));
        assert!(Admit(Arc::clone(&conns)).should_accept(Some(&peer)).await);
        assert_eq!(conns.open(), 1);
        let ticket = conns.take_reserved(&peer).expect("reserved");
        assert!(conns.take_reserved(&peer).is_none());
        drop(ticket);
        assert_eq!(conns.open(), 0);
    }
}
