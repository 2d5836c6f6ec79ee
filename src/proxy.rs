//! The thin Pingora adapter: the only module that knows pingora's request phases.
//!
//! - `request_filter` reads the context id, decodes it, calls `route::decide` (or the
//!   placement policy when there is no HAID) once, and keeps the answer in `Ctx`; bad input
//!   is answered here with a JSON error.
//! - `upstream_peer` only reads `Ctx`: the primary target first, the fallback on a retry.
//! - `fail_to_connect` / `error_while_proxy` mark failures passive and retry on the fallback.
//! - `upstream_request_filter` strips client `x-hagate-*` headers and adds ours.
//! - `logging` records metrics.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::{HttpPeer, ProxyHttp, Result, Session};
use pingora::proxy::FailToProxy;
use pingora::{Error, ErrorSource, ErrorType, RetryType};

use crate::aliases::AliasTable;
use crate::conn::Connections;
use crate::context_id::{self, ContextIdError};
use crate::gateway::{Gateway, Settings};
use crate::haid::{self, HaidError};
use crate::health::{now_ms, InflightGuard, LiveView};
use crate::metrics::{metrics, request_metrics};
use crate::placement::{Candidates, PlacementError, PlacementRequest};
use crate::route::{decide, Decision, Role, Target};

const ROLE: &str = "x-hagate-role";
const CONTEXT_ID: &str = "x-hagate-context-id";
const MAIN_ALIAS: &str = "x-hagate-main-alias";
const BACKUP_ALIAS: &str = "x-hagate-backup-alias";
const EPOCH: &str = "x-hagate-epoch";
pub(crate) const PREFIX: &str = "x-hagate-";
/// Response header an instance may send to report its own load to placement.
pub(crate) const LOAD: &str = "x-hagate-load";

/// The proxy service.
pub struct Proxy {
    gateway: Arc<Gateway>,
    conns: Arc<Connections>,
}

impl Proxy {
    /// A proxy over `gateway`'s state, telling `conns` when each request ends.
    pub fn new(gateway: Arc<Gateway>, conns: Arc<Connections>) -> Self {
        Proxy { gateway, conns }
    }
}

/// Per-request state: the decision made in `request_filter`, and what happened since.
pub struct Ctx {
    started: Instant,
    settings: Option<Arc<Settings>>,
    table: Option<Arc<AliasTable>>,
    primary: Option<Target>,
    fallback: Option<Target>,
    /// What `upstream_peer` tries next; set by the failure hooks.
    next: Next,
    /// Whether a stale pooled connection was already retried.
    reconnected: bool,
    /// A local resource error (EMFILE, ...) stopped the request, not the upstream.
    local_trouble: bool,
    current: Option<Target>,
    inflight: Option<InflightGuard>,
    /// The numeric id of the HAID, forwarded as `x-hagate-context-id`.
    context_id: Option<HeaderValue>,
    /// Whether this request was placed (no HAID): send the aliases upstream.
    placed: bool,
    /// Upstream attempts made (connections tried).
    attempts: u8,
    /// Whether an attempt went to the other instance after the first choice failed.
    failed_over: bool,
    /// Served by hagate's own forwarding loop (`forward`), not pingora's proxy.
    pub(crate) own_loop: bool,
}

/// The next upstream attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// The decision's first choice.
    Primary,
    /// The same instance on a fresh connection (a pooled connection was stale).
    Same,
    /// The other instance of the HAID (or the placed backup).
    Fallback,
    /// Nothing left: the fallback was used.
    Done,
}

impl Default for Ctx {
    fn default() -> Self {
        Ctx {
            started: Instant::now(),
            settings: None,
            table: None,
            primary: None,
            fallback: None,
            next: Next::Primary,
            reconnected: false,
            local_trouble: false,
            current: None,
            inflight: None,
            context_id: None,
            placed: false,
            attempts: 0,
            failed_over: false,
            own_loop: false,
        }
    }
}

/// The request's upstream attempts, as both HTTP engines make them (pingora's hooks below,
/// and `forward`): which instance next, what a failure means, what a response tells.
impl Ctx {
    /// Starts the next attempt: the instance to try, or `None` when none is left.
    pub(crate) fn begin_attempt(&mut self) -> Option<&crate::aliases::Instance> {
        let target = match self.next {
            Next::Primary => self.primary,
            Next::Same => self.current,
            Next::Fallback => self.fallback,
            Next::Done => None,
        }?;
        let table = self.table.as_ref()?;
        if self.next == Next::Fallback {
            self.next = Next::Done;
            self.failed_over = true;
        }
        self.attempts = self.attempts.saturating_add(1);
        let inst = table.get(target.instance);
        self.inflight = Some(inst.state.start_request());
        self.current = Some(target);
        Some(inst)
    }

    /// The connection to the instance could not be made; `local` says it was this
    /// process's own resources (EMFILE, ...). Whether to try again (`begin_attempt`).
    pub(crate) fn connect_failed(&mut self, local: bool) -> bool {
        // Out of descriptors or buffers here says nothing about the upstream: do not eject
        // it, and do not fail over (the other instance would fail the same way).
        if local {
            metrics()
                .local_resource_errors
                .with_label_values(&["upstream"])
                .inc();
            self.local_trouble = true;
            return false;
        }
        self.record_failure();
        let fail_over = self.can_fail_over();
        if fail_over {
            metrics()
                .failovers
                .with_label_values(&["connect_failure"])
                .inc();
            self.next = Next::Fallback;
        }
        fail_over
    }

    /// The exchange with the instance failed after it connected. `upstream`: the failure
    /// was the upstream's (not the client's); `replayable`: nothing was answered yet and
    /// the request body is still at hand; `stale`: it was a pooled connection that the
    /// upstream had closed before answering anything. Whether to try again.
    pub(crate) fn exchange_failed(
        &mut self,
        upstream: bool,
        replayable: bool,
        stale: bool,
    ) -> bool {
        if !upstream || !replayable {
            if upstream {
                self.record_failure();
            }
            return false;
        }
        // A pooled connection the upstream had already closed says nothing about its
        // health: try the same instance once more on a fresh connection.
        if stale && !self.reconnected {
            self.reconnected = true;
            self.next = Next::Same;
            return true;
        }
        self.record_failure();
        let replay = self
            .settings
            .as_ref()
            .is_some_and(|s| s.config.routing.retry_in_flight)
            && self.can_fail_over();
        if replay {
            metrics().failovers.with_label_values(&["in_flight"]).inc();
            self.next = Next::Fallback;
        }
        replay
    }

    /// The instance answered with `status`, and with `load` in `x-hagate-load` if sent.
    pub(crate) fn answered(&self, status: u16, load: Option<&[u8]>) {
        let (Some(table), Some(cur)) = (self.table(), self.current) else {
            return;
        };
        let state = &table.get(cur.instance).state;
        state.record_latency(self.started.elapsed());
        if let Some(load) =
            load.and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<f32>().ok())
        {
            state.set_reported_load(load);
        }
        if (500..600).contains(&status) {
            self.record_failure();
        } else {
            state.record_success();
        }
    }

    /// The headers hagate adds to the request for the instance being tried: each name
    /// and value, given to `put`.
    pub(crate) fn our_headers(&self, mut put: impl FnMut(&'static str, &[u8])) {
        if let Some(cur) = self.current {
            put(ROLE, cur.role.as_str().as_bytes());
            // A membership-held alias: the holder's fencing token, so the context server
            // can refuse a route decided on a stale holding.
            if let Some(epoch) = self.table.as_ref().and_then(|t| t.get(cur.instance).epoch) {
                put(EPOCH, epoch.to_string().as_bytes());
            }
        }
        if let Some(id) = &self.context_id {
            put(CONTEXT_ID, id.as_bytes());
        }
        if self.placed {
            if let (Some(table), Some(p)) = (self.table.as_ref(), self.primary) {
                put(MAIN_ALIAS, table.get(p.instance).alias.as_str().as_bytes());
                if let Some(b) = self.fallback {
                    put(
                        BACKUP_ALIAS,
                        table.get(b.instance).alias.as_str().as_bytes(),
                    );
                }
            }
        }
    }

    /// The request is over with `status` (0: nothing was answered): metrics, the access
    /// log, and its connection is idle again.
    pub(crate) fn finish(
        &mut self,
        req: &impl RequestView,
        status: u16,
        conns: &Connections,
        client: Option<std::net::SocketAddr>,
    ) {
        let role = self.current.map_or("none", |t| t.role.as_str());
        let elapsed = self.started.elapsed();
        request_metrics().observe(role, status, elapsed);
        request_metrics().engine(self.own_loop);
        let instance = self
            .current
            .zip(self.table.as_ref())
            .map(|(t, table)| table.get(t.instance));
        if let Some(inst) = instance {
            inst.metrics().observe(status, elapsed);
        }
        if self.settings.as_ref().is_some_and(|s| s.config.log.access) {
            tracing::info!(
                target: "hagate::access",
                method = req.method(),
                path = req.path(),
                status,
                role,
                alias = instance.map(|i| i.alias.as_str()),
                upstream = instance.map(|i| tracing::field::display(i.address)),
                attempts = self.attempts,
                failed_over = self.failed_over,
                duration_us = elapsed.as_micros() as u64,
                context_id = self.context_id.as_ref().and_then(|v| v.to_str().ok()),
            );
        }
        self.inflight = None;
        // The request is over: its connection is idle (and may be evicted) until the next.
        if let Some(peer) = client {
            conns.idle(&peer);
        }
    }

    fn table(&self) -> Option<&AliasTable> {
        self.table.as_deref()
    }

    /// Whether a retry on the fallback is still possible.
    fn can_fail_over(&self) -> bool {
        self.next != Next::Done && self.fallback.is_some()
    }

    /// Records a failure of the instance just tried (passive health).
    fn record_failure(&self) {
        let (Some(table), Some(cur), Some(settings)) = (self.table(), self.current, &self.settings)
        else {
            return;
        };
        let inst = table.get(cur.instance);
        let health = &settings.config.health;
        if inst
            .state
            .record_failure(&health.passive, health.active.enabled, now_ms())
            .is_some()
        {
            metrics()
                .ejections
                .with_label_values(&[inst.alias.as_str()])
                .inc();
            tracing::warn!(alias = %inst.alias, address = %inst.address, "instance ejected after consecutive failures");
        }
    }
}

/// A JSON error answer that ends the request in `request_filter`.
pub(crate) struct Answer {
    status: u16,
    body: serde_json::Value,
    /// `Retry-After` seconds, sent with 503s.
    retry_after: Option<u64>,
}

impl Answer {
    fn invalid_haid(reason: &'static str, detail: String) -> Self {
        metrics().haid_errors.with_label_values(&[reason]).inc();
        Answer {
            status: 400,
            body: serde_json::json!({"error": "invalid_haid", "reason": reason, "detail": detail}),
            retry_after: None,
        }
    }

    fn ambiguous(detail: String) -> Self {
        metrics()
            .haid_errors
            .with_label_values(&["ambiguous"])
            .inc();
        Answer {
            status: 400,
            body: serde_json::json!({"error": "ambiguous_context_id", "detail": detail}),
            retry_after: None,
        }
    }

    fn unknown_alias(alias: &str) -> Self {
        metrics().unknown_alias.inc();
        Answer {
            status: 404,
            body: serde_json::json!({
                "error": "unknown_alias",
                "alias": alias,
                "detail": format!("no instance has alias {alias:?}"),
            }),
            retry_after: None,
        }
    }

    /// The 503 for a HAID whose instances are all down, or a placement with none live.
    fn no_live_instance(settings: &Settings, detail: String, unknown: Option<&str>) -> Self {
        metrics().no_live.inc();
        Self::unavailable(
            settings,
            serde_json::json!({
                "error": "no_live_instance",
                "detail": detail,
                "unknown_alias": unknown,
            }),
        )
    }

    /// A 503 with `Retry-After` (`routing.retry_after`), also given in the body.
    fn unavailable(settings: &Settings, mut body: serde_json::Value) -> Self {
        let secs = settings.config.routing.retry_after.as_secs();
        body["retry_after"] = secs.into();
        Answer {
            status: 503,
            body,
            retry_after: Some(secs),
        }
    }

    /// The 503 for a placement plugin that failed with fail policy `reject`.
    fn placement_rejected(settings: &Settings, detail: String) -> Self {
        Self::unavailable(
            settings,
            serde_json::json!({"error": "placement_rejected", "detail": detail}),
        )
    }

    /// The 503 for a request stopped by this process's own resources (EMFILE, ...).
    pub(crate) fn local_trouble() -> Self {
        Answer {
            status: 503,
            body: serde_json::json!({"error": "local_resources_exhausted",
                "detail": "the gateway is out of file descriptors or buffers; the upstream was not tried"}),
            retry_after: None,
        }
    }

    /// The 502 for a request that no instance answered; `what` names the last failure.
    pub(crate) fn upstream_failed(what: &str) -> Self {
        Answer {
            status: 502,
            body: serde_json::json!({"error": "upstream_failed",
                "detail": format!("no instance of the request's HAID answered ({what})")}),
            retry_after: None,
        }
    }

    /// The status.
    pub(crate) fn status(&self) -> u16 {
        self.status
    }

    /// The whole answer as HTTP/1.1 bytes, closing the connection: what `send` writes
    /// through pingora.
    pub(crate) fn to_wire(&self) -> Vec<u8> {
        use std::fmt::Write as _;
        let body = format!("{}\n", self.body);
        let reason = http::StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            self.status,
            body.len()
        );
        if let Some(secs) = self.retry_after {
            let _ = write!(head, "retry-after: {secs}\r\n");
        }
        head.push_str("connection: close\r\n\r\n");
        let mut wire = head.into_bytes();
        wire.extend_from_slice(body.as_bytes());
        wire
    }

    /// Writes the answer and ends the request.
    async fn send(self, session: &mut Session) -> Result<bool> {
        let body = Bytes::from(format!("{}\n", self.body));
        let mut header = ResponseHeader::build(self.status, Some(4))?;
        header.insert_header("content-type", "application/json")?;
        header.insert_header("content-length", body.len().to_string())?;
        if let Some(secs) = self.retry_after {
            header.insert_header("retry-after", secs.to_string())?;
        }
        session.set_keepalive(None);
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session.write_response_body(Some(body), true).await?;
        Ok(true)
    }
}

/// What planning reads of a request, whichever HTTP engine parsed it: pingora's
/// `RequestHeader`, or the head that hagate's own forwarding loop parsed (`forward`).
pub(crate) trait RequestView {
    /// The method, as sent.
    fn method(&self) -> &str;
    /// The path of the request target.
    fn path(&self) -> &str;
    /// The query of the request target, if any.
    fn query(&self) -> Option<&str>;
    /// The values of the header `name`, in order.
    fn values<'a>(&'a self, name: &'a http::HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a;
    /// The first value of `name`, if it is visible ASCII (as `HeaderValue::to_str`).
    fn text<'a>(&'a self, name: &'a http::HeaderName) -> Option<&'a str> {
        let v = self.values(name).next()?;
        if v.iter().all(|&b| b == b'\t' || (b' '..0x7f).contains(&b)) {
            std::str::from_utf8(v).ok()
        } else {
            None
        }
    }
}

impl RequestView for RequestHeader {
    fn method(&self) -> &str {
        self.method.as_str()
    }
    fn path(&self) -> &str {
        self.uri.path()
    }
    fn query(&self) -> Option<&str> {
        self.uri.query()
    }
    fn values<'a>(&'a self, name: &'a http::HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers.get_all(name).iter().map(|v| v.as_bytes())
    }
}

impl Proxy {
    /// Decides where a request goes over `table`, or returns the error answer.
    pub(crate) async fn plan(
        &self,
        req: &impl RequestView,
        table: Arc<AliasTable>,
        ctx: &mut Ctx,
    ) -> Option<Answer> {
        let settings = self.gateway.settings();
        let path = req.path();
        let cfg = &settings.config;
        let routed = cfg
            .routing
            .haid_paths
            .iter()
            .any(|p| path.starts_with(p.as_str()));
        let raw = if routed {
            context_id::find(
                req.query(),
                &cfg.context_id.query_param,
                req.values(&settings.context_header),
            )
        } else {
            Ok(None)
        };
        let outcome = match raw {
            Err(ContextIdError::NotUtf8) => Some(Answer::invalid_haid(
                "not_utf8",
                ContextIdError::NotUtf8.to_string(),
            )),
            Err(e @ ContextIdError::Ambiguous { .. }) => Some(Answer::ambiguous(e.to_string())),
            Err(e) => Some(Answer::invalid_haid("bad_wrapper", e.to_string())),
            Ok(None) => self.place(req, &settings, &table, ctx).await,
            Ok(Some(value)) => match context_id::unwrap(&value) {
                Err(e) => Some(Answer::invalid_haid("bad_wrapper", e.to_string())),
                Ok(text) => match haid::decode(&text) {
                    Err(e) => Some(Self::haid_error(e, &text)),
                    Ok(h) => {
                        let view = LiveView::now();
                        let decision = decide(&h, &table, &view);
                        // Built once; Nd digits are valid header bytes.
                        ctx.context_id = HeaderValue::from_bytes(h.id.as_bytes()).ok();
                        match decision {
                            Decision::NoLiveInstance { .. } if cfg.routing.replacement => {
                                self.replace(&table, &view, h.id, decision, &settings, ctx)
                            }
                            // Name a broken alias as Linkis prints it, with its `?`.
                            Decision::UnknownAlias { .. } if h.broken.main => {
                                Some(Answer::unknown_alias(&h.main_java()))
                            }
                            _ => Self::apply(decision, &settings, ctx),
                        }
                    }
                },
            },
        };
        ctx.table = Some(table);
        ctx.settings = Some(settings);
        outcome
    }

    fn haid_error(e: HaidError, text: &str) -> Answer {
        let shown: String = text.chars().take(256).collect();
        Answer::invalid_haid(e.reason(), format!("{e}: {shown:?}"))
    }

    fn apply(decision: Decision<'_>, settings: &Settings, ctx: &mut Ctx) -> Option<Answer> {
        match decision {
            Decision::Forward { primary, fallback } => {
                if primary.role == Role::Backup {
                    metrics().failovers.with_label_values(&["main_down"]).inc();
                }
                ctx.primary = Some(primary);
                ctx.fallback = fallback;
                None
            }
            Decision::UnknownAlias { alias } => Some(Answer::unknown_alias(alias)),
            Decision::NoLiveInstance { unknown } => {
                if unknown.is_some() {
                    metrics().unknown_alias.inc();
                }
                Some(Answer::no_live_instance(
                    settings,
                    "neither the main nor the backup instance is live".into(),
                    unknown,
                ))
            }
        }
    }

    /// Both instances of the HAID are dead and no standby holds either alias: send the
    /// request to the instance the re-placement ring maps its context id to.
    fn replace(
        &self,
        table: &AliasTable,
        view: &LiveView,
        context_id: &str,
        decision: Decision<'_>,
        settings: &Settings,
        ctx: &mut Ctx,
    ) -> Option<Answer> {
        match self.gateway.ring().pick(table, view, context_id) {
            Some(instance) => {
                metrics().replacements.inc();
                ctx.primary = Some(Target {
                    instance,
                    role: Role::Replacement,
                });
                ctx.fallback = None;
                None
            }
            None => Self::apply(decision, settings, ctx),
        }
    }

    /// Chooses a main and backup for a request without a HAID.
    async fn place(
        &self,
        req: &impl RequestView,
        settings: &Settings,
        table: &AliasTable,
        ctx: &mut Ctx,
    ) -> Option<Answer> {
        let candidates = Candidates::of(table, &LiveView::now());
        let request = PlacementRequest {
            tenant: req.text(&settings.tenant_header),
            path: req.path(),
            context_id: None,
            exclude: &[],
        };
        match self.gateway.placement().place(&request, &candidates).await {
            Ok(choice) => {
                metrics().placements.with_label_values(&["ok"]).inc();
                ctx.placed = true;
                ctx.primary = Some(Target {
                    instance: choice.main,
                    role: Role::Main,
                });
                ctx.fallback = choice.backup.map(|b| Target {
                    instance: b,
                    role: Role::Backup,
                });
                None
            }
            Err(PlacementError::NoLiveInstance) => {
                metrics()
                    .placements
                    .with_label_values(&["no_live_instance"])
                    .inc();
                let detail = PlacementError::NoLiveInstance.to_string();
                Some(Answer::no_live_instance(settings, detail, None))
            }
            Err(e @ PlacementError::Rejected { .. }) => {
                metrics().placements.with_label_values(&["rejected"]).inc();
                Some(Answer::placement_rejected(settings, e.to_string()))
            }
        }
    }
}

/// The headers that the `Connection` values of `headers` nominate as hop-by-hop, to be
/// removed before the message goes on (RFC 9110, section 7.6.1); none, and nothing
/// allocated, in the common case.
fn nominated(headers: &http::HeaderMap) -> Vec<http::HeaderName> {
    let connections = || {
        headers
            .get_all(http::header::CONNECTION)
            .into_iter()
            .map(HeaderValue::as_bytes)
    };
    if !connections().any(|v| crate::http1::nominated(v).next().is_some()) {
        return Vec::new();
    }
    headers
        .keys()
        .filter(|k| crate::http1::is_nominated(k.as_str().as_bytes(), connections()))
        .cloned()
        .collect()
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    /// No downstream modules: pingora's default adds a disabled compression module, which
    /// still builds a context for every request. hagate compresses nothing.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> Ctx {
        Ctx::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let table = self.gateway.table();
        match self.plan(session.req_header(), table, ctx).await {
            None => Ok(false),
            Some(answer) => answer.send(session).await,
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(up) = ctx.settings.clone() else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "request was not planned",
            ));
        };
        let up = &up.config.upstream;
        let inst = ctx
            .begin_attempt()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no upstream left to try"))?;
        let mut peer = HttpPeer::new(inst.address, inst.tls, inst.sni.clone());
        peer.options.connection_timeout = Some(up.connect_timeout);
        peer.options.read_timeout = Some(up.read_timeout);
        peer.options.write_timeout = Some(up.write_timeout);
        peer.options.idle_timeout = Some(up.idle_timeout);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // A client's own `x-hagate-*` headers are dropped (rare: checked before collecting).
        let ours = |k: &http::HeaderName| k.as_str().starts_with(PREFIX);
        if upstream.headers.keys().any(ours) {
            let names: Vec<_> = upstream
                .headers
                .keys()
                .filter(|k| ours(k))
                .cloned()
                .collect();
            for name in names {
                upstream.remove_header(&name);
            }
        }
        // Identical duplicates of Content-Length go up as one (pingora refuses differing ones).
        let cl = http::header::CONTENT_LENGTH;
        if upstream.headers.get_all(&cl).iter().nth(1).is_some() {
            if let Some(v) = upstream.headers.get(&cl).cloned() {
                upstream.insert_header(cl, v)?;
            }
        }
        let mut result = Ok(());
        ctx.our_headers(|name, value| {
            if result.is_ok() {
                result = HeaderValue::from_bytes(value)
                    .map_err(|e| Error::because(ErrorType::InternalError, "our header", e))
                    .and_then(|v| upstream.insert_header(name, v));
            }
        });
        result
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let load = response.remove_header(LOAD);
        // hop-by-hop: the upstream's connection is not the client's (pingora writes its
        // own `Connection` on a final answer; a 101's names the upgrade, and stays)
        response.remove_header("keep-alive");
        response.remove_header("proxy-connection");
        // and those its `Connection` names (pingora drops a request's, not an answer's)
        for name in nominated(&response.headers) {
            response.remove_header(&name);
        }
        if response.status.is_informational() && response.status != 101 {
            // an interim answer: the final one is what counts
            response.remove_header("connection");
            return Ok(());
        }
        ctx.answered(
            response.status.as_u16(),
            load.as_ref().map(|v| v.as_bytes()),
        );
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let local = crate::health::is_local_resource_error(e.root_cause());
        let retry = ctx.connect_failed(local);
        e.set_retry(retry);
        e
    }

    /// Every error pingora would answer with its own page gets a JSON body instead.
    /// A client's own trouble (it went away, reset, or sent garbage) is not logged as an
    /// ERROR; it is in the metrics and, when on, the access log.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, e: &Error) -> bool {
        let downstream = e.esource() == &ErrorSource::Downstream;
        if downstream {
            tracing::debug!(error = %e, "client-side failure");
        }
        downstream
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let (status, body) = match (e.etype(), e.esource()) {
            _ if ctx.local_trouble => {
                let a = Answer::local_trouble();
                (a.status, a.body)
            }
            (ErrorType::HTTPStatus(code), _) => (
                *code,
                serde_json::json!({"error": "http_error", "detail": e.to_string()}),
            ),
            (_, ErrorSource::Upstream) => {
                let a = Answer::upstream_failed(e.etype().as_str());
                (a.status, a.body)
            }
            (
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
                ErrorSource::Downstream,
            ) => {
                // The client is gone: nobody to answer.
                return FailToProxy {
                    error_code: 0,
                    can_reuse_downstream: false,
                };
            }
            (_, ErrorSource::Downstream) => (
                400,
                serde_json::json!({"error": "bad_request", "detail": e.to_string()}),
            ),
            _ => (
                500,
                serde_json::json!({"error": "internal_error", "detail": e.etype().as_str()}),
            ),
        };
        let answer = Answer {
            status,
            body,
            retry_after: None,
        };
        if let Err(error) = answer.send(session).await {
            tracing::debug!(%error, "could not send the error answer");
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        reused_connection: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let replayable = session.as_ref().response_written().is_none()
            && !session.as_ref().retry_buffer_truncated();
        let stale = reused_connection
            && matches!(e.retry, RetryType::ReusedOnly | RetryType::Decided(true));
        let retry = ctx.exchange_failed(*e.esource() == ErrorSource::Upstream, replayable, stale);
        e.set_retry(retry);
        e
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(if e.is_some() { 502 } else { 0 });
        let client = session.client_addr().and_then(|a| a.as_inet()).copied();
        ctx.finish(session.req_header(), status, &self.conns, client);
    }
}
