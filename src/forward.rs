//! hagate's own HTTP/1.1 forwarding loop (`server.forwarding = "hagate"`, the default).
//!
//! Pingora's proxy costs about twice nginx's CPU per request (docs/performance.md): two
//! tasks and two channels per request, every head parsed into `HeaderMap`s and cloned, a
//! task per connection released to the pool. This loop serves the common request with the
//! client connection's own task and no copies beyond its buffers:
//! - the request head is parsed in place (httparse) and forwarded as bytes, with hagate's
//!   edits: client `x-hagate-*` headers and hop-by-hop `Connection` headers dropped,
//!   hagate's own headers added;
//! - a request body with `Content-Length` of at most 64 KiB goes up as it arrives, and is
//!   kept until the answer comes, so that a retry on the fallback can send it again;
//! - the response head is parsed in place and forwarded with `x-hagate-load` and
//!   hop-by-hop headers taken out (those its `Connection` header names too),
//!   after any interim (1xx) heads, which go on to the client as they come; its body
//!   passes through as it arrives, framed by `Content-Length`, chunked coding, or
//!   the end of the upstream connection (then the client connection closes after it);
//! - idle upstream connections wait in a pool per thread and address, with no task each,
//!   closed after `upstream.idle_timeout` (`sweep`, from the control plane).
//!
//! Every decision is `proxy`'s: the plan, each attempt and what its failure means (`Ctx`),
//! the JSON answers, the metrics and the access log. So both engines route, retry, fail
//! over, eject and count alike, and the integration suite runs over both.
//!
//! What this loop does not serve goes to pingora's proxy with the bytes already read
//! (`Served::HandOver`); `conn::Guard` gives pingora that one request, and the connection
//! comes back to the loop if pingora keeps it open. Pingora's are: HTTP/1.0, an
//! `Upgrade`, `Expect`, a `Connection` header with an option other than `close` and
//! `keep-alive` (it names headers to drop), a chunked or larger request body, duplicate
//! `Content-Length` headers, a head httparse refuses or with more than 64 headers
//! (pingora answers it), a table with a `tls = true` instance, and a gateway that is
//! shutting down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use pingora::prelude::timeout;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Forwarding;
use crate::conn::Connections;
use crate::gateway::Gateway;
use crate::http1::{self, digits, response_framing, Framed, Framing};
use crate::pool::Pool;
use crate::proxy::{Answer, Ctx, Proxy, RequestView, LOAD, PREFIX};

/// The largest request body the loop keeps for a replay; a larger one goes to pingora,
/// which keeps the first 64 KiB.
const MAX_BODY: usize = 64 * 1024;
/// The most headers a request or response may have here (a request with more goes to
/// pingora; a response with more is refused as an upstream failure).
const MAX_HEADERS: usize = 64;
/// How much is read from a socket at once.
const READ_CHUNK: usize = 16 * 1024;

/// What became of a client connection.
pub enum Served {
    /// It is finished: closed, or to be closed.
    Closed,
    /// It goes to pingora, which first reads these bytes (already read from it).
    HandOver(BytesMut),
}

/// The forwarding loop, shared by every client connection of the proxy listener.
pub struct Forwarder {
    gateway: Arc<Gateway>,
    conns: Arc<Connections>,
    proxy: Proxy,
    pool: Pool<TcpStream>,
}

impl Forwarder {
    /// A loop over `gateway`'s state, telling `conns` when each request ends.
    pub fn new(gateway: Arc<Gateway>, conns: Arc<Connections>) -> Arc<Self> {
        Arc::new(Forwarder {
            proxy: Proxy::new(Arc::clone(&gateway), Arc::clone(&conns)),
            pool: Pool::new(conns.limits().max_idle),
            gateway,
            conns,
        })
    }

    fn enabled(&self) -> bool {
        self.gateway.settings().config.server.forwarding == Forwarding::Hagate
    }

    /// Closes the pooled connections idle longer than `upstream.idle_timeout`, and the
    /// least recent beyond `upstream.max_idle` (which a reload may have lowered).
    pub fn sweep(&self) {
        let idle = self.gateway.settings().config.upstream.idle_timeout;
        self.pool.set_max(self.conns.limits().max_idle);
        self.pool.sweep(idle);
    }

    /// Serves the requests of one client connection, from `client`, until it closes or
    /// one of them is not the loop's to serve.
    pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: &mut S,
        client: Option<SocketAddr>,
        shutdown: &ShutdownWatch,
    ) -> Served {
        let mut buf = BytesMut::new();
        if !self.enabled() {
            return Served::HandOver(buf);
        }
        let mut head = Head::default();
        let mut scratch = Scratch {
            client,
            ..Scratch::default()
        };
        loop {
            loop {
                if !buf.is_empty() {
                    match parse_request(&buf, &mut head) {
                        Parsed::Complete => break,
                        Parsed::NotOurs => return Served::HandOver(buf),
                        Parsed::Partial => {}
                    }
                }
                if !read_more(io, &mut buf).await {
                    return Served::Closed;
                }
            }
            let table = self.gateway.table();
            let settings = self.gateway.settings();
            let ours = settings.config.server.forwarding == Forwarding::Hagate;
            if *shutdown.borrow() || table.any_tls() || !ours {
                return Served::HandOver(buf);
            }
            // The head on its own; the body follows in `buf` as it arrives.
            let request = buf.split_to(head.len);
            let view = View {
                bytes: &request,
                head: &head,
            };
            let keep = self
                .forward(io, &view, &mut buf, table, &settings, &mut scratch)
                .await;
            if !keep {
                return Served::Closed;
            }
            let _ = buf.split_to(head.body);
        }
    }

    /// Plans and forwards one request, whose body is in `body` or still to come from
    /// `io`; whether the client connection stays open (then `body` holds all of it).
    async fn forward<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: &mut S,
        req: &View<'_>,
        body: &mut BytesMut,
        table: Arc<crate::aliases::AliasTable>,
        settings: &crate::gateway::Settings,
        x: &mut Scratch,
    ) -> bool {
        let client = x.client;
        let mut ctx = Ctx::default();
        ctx.own_loop = true;
        if let Some(answer) = self.proxy.plan(req, table, &mut ctx).await {
            return self.answer(io, req, answer, &mut ctx, client).await;
        }
        let up = &settings.config.upstream;
        // Attempts, as pingora's hooks make them: `ctx` decides whether there is another.
        let head_request = req.head.method_is_head(req.bytes);
        x.interim = false;
        let (mut conn, addr, head) = loop {
            let Some(inst) = ctx.begin_attempt() else {
                let answer = Answer::upstream_failed("InternalError");
                return self.answer(io, req, answer, &mut ctx, client).await;
            };
            let addr = inst.address;
            let (mut conn, reused) = match self.pool.take(addr, up.idle_timeout) {
                Some(conn) => (conn, true),
                None => match self.connect(addr, up.connect_timeout).await {
                    Ok(conn) => (conn, false),
                    Err((what, error)) => {
                        let local = crate::health::is_local_resource_error(&error);
                        if ctx.connect_failed(local) {
                            continue;
                        }
                        let answer = if local {
                            Answer::local_trouble()
                        } else {
                            Answer::upstream_failed(what)
                        };
                        tracing::warn!(upstream = %addr, %error, "upstream connect failed");
                        return self.answer(io, req, answer, &mut ctx, client).await;
                    }
                },
            };
            // The head and the body so far; then the rest of the body as it arrives, all of
            // it kept in `body` so that a retry can send it again.
            x.request.clear();
            req.write_upstream(&ctx, &mut x.request);
            let length = req.head.body;
            let mut sent = body.len().min(length);
            x.request.extend_from_slice(&body[..sent]);
            x.response.clear();
            let mut result = send(&mut conn, &x.request, up).await;
            while result.is_ok() && sent < length {
                if !read_more(io, body).await {
                    // The client left before its body was all sent: its failure, not the
                    // upstream's (no passive-health mark), logged as pingora's path logs it.
                    ctx.finish(req, 502, &self.conns, client);
                    return false;
                }
                let now = body.len().min(length);
                result = send(&mut conn, &body[sent..now], up).await;
                sent = now;
            }
            let result = match result {
                Ok(()) => {
                    let client_close = req.head.close;
                    read_head(&mut conn, io, x, up, head_request, client_close).await
                }
                Err(what) => Err(what),
            };
            match result {
                Ok(head) => break (conn, addr, head),
                Err(what) => {
                    // A pooled connection that was closed before it answered anything.
                    let stale = reused && x.response.is_empty() && !x.interim;
                    // Once an interim answer went to the client, the request is not
                    // replayed elsewhere (as pingora's path: a response was written).
                    if ctx.exchange_failed(true, !x.interim, stale) {
                        continue;
                    }
                    tracing::warn!(upstream = %addr, error = what, "upstream exchange failed");
                    let answer = Answer::upstream_failed(what);
                    return self.answer(io, req, answer, &mut ctx, client).await;
                }
            }
        };
        ctx.answered(head.status, head.load.map(|(a, b)| &x.response[a..b]));
        let close = head.close;
        let (outcome, reusable) = relay(&mut conn, io, &head, x, up.read_timeout).await;
        match outcome {
            Relayed::Done => {}
            Relayed::UpstreamFailed => {
                ctx.exchange_failed(true, false, false);
            }
            Relayed::ClientGone => {}
        }
        if reusable && head.reusable {
            self.pool.put(addr, conn);
        }
        ctx.finish(req, head.status, &self.conns, client);
        outcome == Relayed::Done && !close
    }

    /// A new connection to `addr`. Out of descriptors, it closes the older half of the
    /// idle pooled connections and tries once more: idle connections give way to a live
    /// request, and the client sees no error.
    async fn connect(
        &self,
        addr: SocketAddr,
        limit: Duration,
    ) -> Result<TcpStream, (&'static str, std::io::Error)> {
        match connect(addr, limit).await {
            Err((what, error)) if crate::health::is_local_resource_error(&error) => {
                let shed = self.pool.shed();
                if shed == 0 {
                    return Err((what, error));
                }
                tracing::warn!(
                    upstream = %addr, %error, closed = shed,
                    "out of descriptors: closed idle upstream connections to connect"
                );
                let again = connect(addr, limit).await;
                // Met and got past: still a sign that descriptors are short. If the second
                // try is out of descriptors too, the caller counts it (once per request).
                if !matches!(&again, Err((_, e)) if crate::health::is_local_resource_error(e)) {
                    crate::metrics::metrics()
                        .local_resource_errors
                        .with_label_values(&["upstream"])
                        .inc();
                }
                again
            }
            result => result,
        }
    }

    /// Writes an answer of hagate's own and ends the request; the connection closes.
    async fn answer<S: AsyncWrite + Unpin>(
        &self,
        io: &mut S,
        req: &View<'_>,
        answer: Answer,
        ctx: &mut Ctx,
        client: Option<SocketAddr>,
    ) -> bool {
        if let Err(error) = write_out(io, &answer.to_wire()).await {
            tracing::debug!(%error, "could not send the error answer");
        }
        ctx.finish(req, answer.status(), &self.conns, client);
        false
    }
}

/// Writes `bytes` to the client and flushes them: pingora's streams buffer writes.
async fn write_out<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

/// Reads more of `io` into `buf`; false at the end of the stream or an error.
async fn read_more<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> bool {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_CHUNK);
    }
    matches!(io.read_buf(buf).await, Ok(n) if n > 0)
}

/// Per-connection state: the client's address, and buffers kept across its requests.
#[derive(Default)]
struct Scratch {
    /// Who the client is (for `Connections::idle`).
    client: Option<SocketAddr>,
    /// The request as sent upstream.
    request: Vec<u8>,
    /// What the upstream sent: its head, and then the body as it arrives.
    response: BytesMut,
    /// What goes to the client next.
    out: Vec<u8>,
    /// An interim (1xx) answer to this request went to the client.
    interim: bool,
}

/// A byte range of the request.
#[derive(Debug, Clone, Copy, Default)]
struct Span(u32, u32);

impl Span {
    fn of(base: &[u8], part: &[u8]) -> Span {
        let start = part.as_ptr() as usize - base.as_ptr() as usize;
        Span(start as u32, (start + part.len()) as u32)
    }

    fn in_<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        &bytes[self.0 as usize..self.1 as usize]
    }
}

/// A request head, parsed in place: where its parts are in the request's bytes.
#[derive(Debug, Default)]
struct Head {
    method: Span,
    target: Span,
    /// Each header's name and value.
    fields: Vec<(Span, Span)>,
    /// The head's length, blank line included.
    len: usize,
    /// The body's length.
    body: usize,
    /// The client asked to close after this request (`Connection: close`).
    close: bool,
}

impl Head {
    fn method_is_head(&self, bytes: &[u8]) -> bool {
        self.method.in_(bytes) == b"HEAD"
    }
}

/// What `parse_request` made of the bytes so far.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A whole head, now in `Head`.
    Complete,
    /// Not all of the head yet.
    Partial,
    /// A request for pingora (see the module's doc).
    NotOurs,
}

fn parse_request(buf: &[u8], head: &mut Head) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::NotOurs,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::NotOurs;
    };
    if method == "CONNECT" || !target.starts_with('/') {
        return Parsed::NotOurs;
    }
    head.method = Span::of(buf, method.as_bytes());
    head.target = Span::of(buf, target.as_bytes());
    head.fields.clear();
    head.len = len;
    head.body = 0;
    head.close = false;
    let mut length = None;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if is("transfer-encoding") || is("expect") || is("upgrade") {
            return Parsed::NotOurs;
        }
        if is("content-length") {
            match (length, digits(h.value)) {
                (None, Some(n)) if n <= MAX_BODY as u64 => length = Some(n as usize),
                _ => return Parsed::NotOurs,
            }
        }
        if is("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    head.close = true;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                    // an upgrade, or headers named hop-by-hop (RFC 9110, 7.6.1): pingora
                    // drops those, or refuses a request that names a protected one
                    return Parsed::NotOurs;
                }
            }
        }
        head.fields
            .push((Span::of(buf, name), Span::of(buf, h.value)));
    }
    head.body = length.unwrap_or(0);
    Parsed::Complete
}

/// Whether a header belongs to one connection only, and is not forwarded.
fn hop_by_hop(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"connection")
        || name.eq_ignore_ascii_case(b"keep-alive")
        || name.eq_ignore_ascii_case(b"proxy-connection")
}

/// Whether a request header is not forwarded: hop-by-hop (the standard names pingora's
/// proxy drops from a request too: `TE`, `Trailer`, the proxy's own credentials and
/// `HTTP2-Settings` besides `hop_by_hop`'s), or a client's `x-hagate-*`.
fn hop_or_ours(name: &[u8]) -> bool {
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    let hop = match name.len() {
        2 => is(b"te"),
        7 => is(b"trailer"),
        14 => is(b"http2-settings"),
        18 => is(b"proxy-authenticate"),
        19 => is(b"proxy-authorization"),
        _ => hop_by_hop(name),
    };
    hop || name
        .get(..PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(PREFIX.as_bytes()))
}

/// A request parsed by the loop, as planning and logging see it.
struct View<'a> {
    bytes: &'a [u8],
    head: &'a Head,
}

impl View<'_> {
    fn target(&self) -> &str {
        // httparse let only visible ASCII through.
        std::str::from_utf8(self.head.target.in_(self.bytes)).unwrap_or("")
    }

    /// The request's head as it goes to the instance `ctx` is trying.
    fn write_upstream(&self, ctx: &Ctx, out: &mut Vec<u8>) {
        let b = self.bytes;
        out.extend_from_slice(self.head.method.in_(b));
        out.push(b' ');
        out.extend_from_slice(self.head.target.in_(b));
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &self.head.fields {
            let name = name.in_(b);
            if hop_or_ours(name) {
                continue;
            }
            header(out, name, value.in_(b));
        }
        ctx.our_headers(|name, value| header(out, name.as_bytes(), value));
        out.extend_from_slice(b"\r\n");
    }
}

fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

impl RequestView for View<'_> {
    fn method(&self) -> &str {
        std::str::from_utf8(self.head.method.in_(self.bytes)).unwrap_or("")
    }
    fn path(&self) -> &str {
        let t = self.target();
        t.split_once('?').map_or(t, |(p, _)| p)
    }
    fn query(&self) -> Option<&str> {
        self.target().split_once('?').map(|(_, q)| q)
    }
    fn values<'a>(&'a self, name: &'a http::HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.head
            .fields
            .iter()
            .filter(move |(n, _)| {
                n.in_(self.bytes)
                    .eq_ignore_ascii_case(name.as_str().as_bytes())
            })
            .map(|(_, v)| v.in_(self.bytes))
    }
}

/// Connects to `addr` within `limit`; on failure, pingora's name for it and the error.
async fn connect(
    addr: SocketAddr,
    limit: Duration,
) -> Result<TcpStream, (&'static str, std::io::Error)> {
    match timeout(limit, TcpStream::connect(addr)).await {
        Err(_) => Err((
            "ConnectTimedout",
            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        )),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err(("ConnectRefused", e))
        }
        Ok(Err(e)) => Err(("ConnectError", e)),
        Ok(Ok(conn)) => {
            let _ = conn.set_nodelay(true);
            Ok(conn)
        }
    }
}

/// Sends `bytes` upstream; on failure, pingora's name for what failed.
async fn send(
    conn: &mut TcpStream,
    bytes: &[u8],
    up: &crate::config::UpstreamConfig,
) -> Result<(), &'static str> {
    match timeout(up.write_timeout, conn.write_all(bytes)).await {
        Err(_) => Err("WriteTimedout"),
        Ok(Err(_)) => Err("WriteError"),
        Ok(Ok(())) => Ok(()),
    }
}

/// Reads until `x.response` holds a whole response head, and writes the head that goes to
/// the client into `x.out`. On failure, pingora's name for what failed.
///
/// Interim answers (1xx but 101: `100 Continue`, `103 Early Hints`) go on to the client as
/// they come, as a proxy must (RFC 9110, section 15.2) and as pingora's path does; the
/// final answer follows. A client that is gone by then is found when the final answer is
/// sent, so its trouble is never taken for the upstream's.
async fn read_head<S: AsyncWrite + Unpin>(
    conn: &mut TcpStream,
    io: &mut S,
    x: &mut Scratch,
    up: &crate::config::UpstreamConfig,
    head_request: bool,
    client_close: bool,
) -> Result<ResponseHead, &'static str> {
    let response = &mut x.response;
    loop {
        if !response.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(response) {
                Ok(httparse::Status::Partial) => {}
                Err(_) => return Err("InvalidHTTPHeader"),
                Ok(httparse::Status::Complete(n)) => {
                    if let Some(code) = resp.code.filter(|c| (100..200).contains(c) && *c != 101) {
                        x.out.clear();
                        interim_head(&resp, code, &mut x.out);
                        let _ = response.split_to(n);
                        x.interim = true;
                        let _ = write_out(io, &x.out).await;
                        continue;
                    }
                    x.out.clear();
                    return response_head(
                        &resp,
                        response,
                        n,
                        head_request,
                        client_close,
                        &mut x.out,
                    );
                }
            }
        }
        if response.capacity() - response.len() < 1024 {
            response.reserve(READ_CHUNK);
        }
        match timeout(up.read_timeout, conn.read_buf(response)).await {
            Err(_) => return Err("ReadTimedout"),
            Ok(Err(_)) => return Err("ReadError"),
            Ok(Ok(0)) => return Err("ConnectionClosed"),
            Ok(Ok(_)) => {}
        }
    }
}

/// A response head, parsed in place.
#[derive(Debug)]
struct ResponseHead {
    status: u16,
    len: usize,
    framing: Framing,
    /// The upstream connection may carry another request after this response.
    reusable: bool,
    /// The client connection closes after this response.
    close: bool,
    /// Where the `x-hagate-load` value is.
    load: Option<(usize, usize)>,
}

/// What the parsed head `resp` (the first `len` of `bytes`) says of the response, for a
/// request by HEAD or not and a client that asked to close or not; and, into `out`, the
/// head that goes to the client: the upstream's, with `x-hagate-load` and hop-by-hop
/// headers taken out (and `Content-Length` when a transfer coding frames the body).
fn response_head(
    resp: &httparse::Response<'_, '_>,
    bytes: &[u8],
    len: usize,
    head_request: bool,
    client_close: bool,
    out: &mut Vec<u8>,
) -> Result<ResponseHead, &'static str> {
    let Framed {
        status,
        framing,
        reusable,
    } = response_framing(resp, head_request)?;
    let close = client_close || framing == Framing::Close;
    let coded = matches!(framing, Framing::Chunked | Framing::Close);
    let load = response_headers(resp, status, coded, out).map(|value| {
        let s = Span::of(bytes, value);
        (s.0 as usize, s.1 as usize)
    });
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(ResponseHead {
        status,
        len,
        framing,
        reusable,
        close,
        load,
    })
}

/// Writes into `out` the status line of `resp` and the headers that go to the client: not
/// `x-hagate-load`, hop-by-hop headers (those a `Connection` header names too), nor
/// `Content-Length` when `coded` (a transfer coding or the connection's end frames the
/// body). Returns `x-hagate-load`'s value.
fn response_headers<'b>(
    resp: &httparse::Response<'_, 'b>,
    status: u16,
    coded: bool,
    out: &mut Vec<u8>,
) -> Option<&'b [u8]> {
    use std::io::Write as _;
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", resp.reason.unwrap_or(""));
    let mut load = None;
    let connections = || {
        resp.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .map(|h| h.value)
    };
    let nominates = connections().any(|v| http1::nominated(v).next().is_some());
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(LOAD.as_bytes()) {
            load = Some(h.value);
            continue;
        }
        if hop_by_hop(name)
            || (coded && name.eq_ignore_ascii_case(b"content-length"))
            || (nominates && http1::is_nominated(name, connections()))
        {
            continue;
        }
        header(out, name, h.value);
    }
    load
}

/// Writes into `out` the interim answer `resp` (status `code`) as it goes to the client.
fn interim_head(resp: &httparse::Response<'_, '_>, code: u16, out: &mut Vec<u8>) {
    response_headers(resp, code, false, out);
    out.extend_from_slice(b"\r\n");
}

/// How relaying a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relayed {
    Done,
    UpstreamFailed,
    ClientGone,
}

/// Sends the head in `x.out` and the body after it, from `x.response` and then from the
/// upstream as it arrives. Returns how it ended, and whether the upstream connection
/// ended exactly at the response's end (so it may be pooled).
async fn relay<S: AsyncWrite + Unpin>(
    conn: &mut TcpStream,
    io: &mut S,
    head: &ResponseHead,
    x: &mut Scratch,
    read_timeout: Duration,
) -> (Relayed, bool) {
    let mut body = x.response.split_off(head.len);
    let mut left = match head.framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut chunks = Chunks::default();
    loop {
        // What of `body` belongs to this response, and whether it ends there.
        let (take, end) = match head.framing {
            Framing::Empty => (0, true),
            Framing::Length(_) => {
                let take = (body.len() as u64).min(left) as usize;
                left -= take as u64;
                (take, left == 0)
            }
            Framing::Chunked => match chunks.advance(&body) {
                Ok(Some(n)) => (n, true),
                Ok(None) => (body.len(), false),
                Err(()) => return (Relayed::UpstreamFailed, false),
            },
            Framing::Close => (body.len(), false),
        };
        x.out.extend_from_slice(&body[..take]);
        let extra = body.len() > take;
        if !x.out.is_empty() {
            if write_out(io, &x.out).await.is_err() {
                return (Relayed::ClientGone, false);
            }
            x.out.clear();
        }
        if end {
            return (Relayed::Done, !extra);
        }
        body.clear();
        if body.capacity() < READ_CHUNK {
            body.reserve(READ_CHUNK);
        }
        match timeout(read_timeout, conn.read_buf(&mut body)).await {
            Ok(Ok(0)) if head.framing == Framing::Close => return (Relayed::Done, false),
            Ok(Ok(n)) if n > 0 => {}
            _ => return (Relayed::UpstreamFailed, false),
        }
    }
}

/// Where a chunked body ends, found as its bytes pass.
#[derive(Debug, Default)]
struct Chunks {
    state: ChunkState,
    /// The size of the chunk being read (its hex digits so far, then what is left of it).
    size: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// In the hex digits of a chunk size.
    #[default]
    Size,
    /// After the size: an extension, until the line ends.
    Extension,
    /// Expecting the `\n` of the size line.
    SizeLf,
    /// In a chunk's data.
    Data,
    /// Expecting the `\r` after a chunk's data.
    DataCr,
    /// Expecting the `\n` after a chunk's data.
    DataLf,
    /// At the start of a trailer line (or of the final blank line).
    TrailerStart,
    /// In a trailer line.
    Trailer,
    /// Expecting the `\n` that ends the body.
    EndLf,
}

impl Chunks {
    /// Reads `bytes`, the next of the body: `Some(n)` when the body ends after `n` of
    /// them, `None` when it goes on, `Err` when it is not chunked coding.
    fn advance(&mut self, bytes: &[u8]) -> Result<Option<usize>, ()> {
        use ChunkState::*;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.state {
                Size => match (b as char).to_digit(16) {
                    Some(d) if self.size < (1 << 56) => self.size = self.size * 16 + d as u64,
                    Some(_) => return Err(()),
                    None if b == b'\r' => self.state = SizeLf,
                    None if b == b';' || b == b' ' || b == b'\t' => self.state = Extension,
                    None => return Err(()),
                },
                Extension => {
                    if b == b'\r' {
                        self.state = SizeLf;
                    }
                }
                SizeLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = if self.size == 0 { TrailerStart } else { Data };
                }
                Data => {
                    let n = ((bytes.len() - i) as u64).min(self.size);
                    self.size -= n;
                    i += n as usize;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                DataCr => {
                    if b != b'\r' {
                        return Err(());
                    }
                    self.state = DataLf;
                }
                DataLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = Size;
                }
                TrailerStart => self.state = if b == b'\r' { EndLf } else { Trailer },
                Trailer => {
                    if b == b'\n' {
                        self.state = TrailerStart;
                    }
                }
                EndLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    return Ok(Some(i + 1));
                }
            }
            i += 1;
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parsed(text: &str) -> (Parsed, Head) {
        let mut head = Head::default();
        (parse_request(text.as_bytes(), &mut head), head)
    }

    #[test]
    fn the_common_request_is_ours_and_the_rest_is_pingoras() {
        let (p, head) = parsed("POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
        assert_eq!(p, Parsed::Complete);
        assert_eq!(head.body, 3);
        assert!(!head.close);
        assert_eq!(parsed("GET / HTTP/1.1\r\nHost: x\r\n").0, Parsed::Partial);
        assert!(
            parsed("GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n")
                .1
                .close
        );
        for other in [
            "GET / HTTP/1.0\r\n\r\n",
            "CONNECT x:1 HTTP/1.1\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            assert_eq!(parsed(other).0, Parsed::NotOurs, "{other:?}");
        }
    }

    #[test]
    fn the_upstream_request_drops_hop_by_hop_and_client_hagate_headers() {
        let text = "GET /p?q HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Hagate-Role: main\r\nkeep-alive: 5\r\nTE: trailers\r\nTrailer: x\r\nProxy-Authorization: Basic eA==\r\nProxy-Authenticate: x\r\nHTTP2-Settings: x\r\nA: b\r\nTEE: c\r\n\r\n";
        let (_, head) = parsed(text);
        let view = View {
            bytes: text.as_bytes(),
            head: &head,
        };
        assert_eq!((view.path(), view.query()), ("/p", Some("q")));
        let mut out = Vec::new();
        view.write_upstream(&Ctx::default(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p?q HTTP/1.1\r\nHost: x\r\nA: b\r\nTEE: c\r\n\r\n"
        );
    }

    /// `response_head` of `bytes`, as `read_head` calls it, and the head for the client.
    fn respond(
        bytes: &[u8],
        head_request: bool,
        client_close: bool,
    ) -> Result<(ResponseHead, String), &'static str> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(len)) = resp.parse(bytes) else {
            return Err("not a whole head");
        };
        let mut out = Vec::new();
        let head = response_head(&resp, bytes, len, head_request, client_close, &mut out)?;
        Ok((head, String::from_utf8_lossy(&out).into_owned()))
    }

    #[test]
    fn response_framing() {
        let frame = |text: &str, head: bool| {
            respond(text.as_bytes(), head, false).map(|(h, _)| (h.framing, h.reusable))
        };
        assert_eq!(
            frame("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false),
            Ok((Framing::Length(5), true))
        );
        assert_eq!(
            frame("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true),
            Ok((Framing::Empty, true))
        );
        assert_eq!(
            frame("HTTP/1.1 204 No Content\r\n\r\n", false),
            Ok((Framing::Empty, true))
        );
        assert_eq!(
            frame(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            ),
            Ok((Framing::Chunked, true))
        );
        assert_eq!(
            frame("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false),
            Ok((Framing::Close, false))
        );
        assert_eq!(
            frame("HTTP/1.1 200 OK\r\n\r\n", false),
            Ok((Framing::Close, false))
        );
        assert_eq!(
            frame(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
                false
            ),
            Ok((Framing::Length(1), false))
        );
        assert_eq!(
            frame("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false),
            Ok((Framing::Length(1), false))
        );
        assert!(frame(
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false
        )
        .is_err());
        assert!(frame("HTTP/1.1 101 Switching Protocols\r\n\r\n", false).is_err());

        let text = "HTTP/1.1 200 OK\r\nX-Hagate-Load: 0.5\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n";
        let (head, out) = respond(text.as_bytes(), false, true).unwrap();
        assert_eq!(&text[head.load.unwrap().0..head.load.unwrap().1], "0.5");
        assert!(head.close);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\n"
        );
        // a body ended by close closes the client connection too, and a chunked one
        // drops a Content-Length the upstream sent with it
        let (head, out) = respond(b"HTTP/1.1 200 OK\r\nx: y\r\n\r\n", false, false).unwrap();
        assert!(head.close);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nx: y\r\nconnection: close\r\n\r\n");
        let both = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (head, out) = respond(both, false, false).unwrap();
        assert!(!head.close);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        // the headers its Connection header names stay behind, but not those that frame it
        let named = b"HTTP/1.1 200 OK\r\nX-Secret: 1\r\nConnection: x-secret, Content-Length\r\nContent-Length: 2\r\nX-Public: 1\r\n\r\n";
        let (head, out) = respond(named, false, false).unwrap();
        assert_eq!(head.framing, Framing::Length(2));
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Public: 1\r\n\r\n"
        );
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_and_trailers() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        assert_eq!(Chunks::default().advance(body), Ok(Some(body.len() - 4)));
        assert_eq!(Chunks::default().advance(b"0\r\n\r\n"), Ok(Some(5)));
        assert_eq!(Chunks::default().advance(b"5\r\nhel"), Ok(None));
        assert_eq!(Chunks::default().advance(b"5\r\nhelloX"), Err(()));
        assert_eq!(Chunks::default().advance(b"z\r\n"), Err(()));
    }

    proptest! {
        /// No bytes from a client or an upstream make the parsers panic.
        #[test]
        fn no_input_makes_the_parsers_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut head = Head::default();
            let _ = parse_request(&bytes, &mut head);
            let _ = respond(&bytes, false, false);
            let _ = Chunks::default().advance(&bytes);
        }

        /// Requests built from arbitrary header text parse in place, and the upstream
        /// request holds every header but the ones hagate drops.
        #[test]
        fn a_parsed_head_keeps_its_headers(
            names in proptest::collection::vec("[A-Za-z][A-Za-z0-9-]{0,12}", 0..10),
            values in proptest::collection::vec("[ -~]{0,20}", 10),
        ) {
            let mut text = String::from("GET /x HTTP/1.1\r\n");
            for (n, v) in names.iter().zip(&values) {
                text += &format!("{n}: {}\r\n", v.trim());
            }
            text += "\r\n";
            let mut head = Head::default();
            let parsed = parse_request(text.as_bytes(), &mut head);
            let special = ["transfer-encoding", "expect", "upgrade", "content-length", "connection"];
            if names.iter().any(|n| special.contains(&n.to_ascii_lowercase().as_str())) {
                return Ok(());
            }
            prop_assert_eq!(parsed, Parsed::Complete);
            let view = View { bytes: text.as_bytes(), head: &head };
            let mut out = Vec::new();
            view.write_upstream(&Ctx::default(), &mut out);
            let out = String::from_utf8(out).unwrap();
            for (n, v) in names.iter().zip(&values) {
                let kept = !hop_or_ours(n.as_bytes());
                let line = format!("{n}: {}\r\n", v.trim());
                prop_assert_eq!(out.contains(&line), kept, "{} in {}", line, out);
            }
        }

        /// However the body is split into reads, its end is found at the same place.
        #[test]
        fn a_chunked_body_ends_at_the_same_place_however_it_is_split(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..6),
            cuts in proptest::collection::vec(0usize..200, 0..8),
        ) {
            let mut body = Vec::new();
            for c in &chunks {
                body.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                body.extend_from_slice(c);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n\r\n");
            let end = body.len();
            body.extend_from_slice(b"after");
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % body.len()).collect();
            cuts.push(0);
            cuts.push(body.len());
            cuts.sort();
            let mut chunked = Chunks::default();
            let mut found = None;
            for w in cuts.windows(2) {
                if let Some(n) = chunked.advance(&body[w[0]..w[1]]).unwrap() {
                    found = Some(w[0] + n);
                    break;
                }
            }
            prop_assert_eq!(found, Some(end));
        }
    }
}
