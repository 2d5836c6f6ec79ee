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
const PREFIX: &str = "x-hagate-";
/// Response header an instance may send to report its own load to placement.
const LOAD: &str = "x-hagate-load";

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

impl Ctx {
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
struct Answer {
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

impl Proxy {
    /// Decides where a request goes, or returns the error answer.
    async fn plan(&self, session: &Session, ctx: &mut Ctx) -> Option<Answer> {
        let settings = self.gateway.settings();
        let table = self.gateway.table();
        let req = session.req_header();
        let path = req.uri.path();
        let cfg = &settings.config;
        let routed = cfg
            .routing
            .haid_paths
            .iter()
            .any(|p| path.starts_with(p.as_str()));
        let raw = if routed {
            context_id::find(
                req.uri.query(),
                &cfg.context_id.query_param,
                req.headers
                    .get_all(&settings.context_header)
                    .iter()
                    .map(|v| v.as_bytes()),
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
            Ok(None) => self.place(session, &settings, &table, ctx).await,
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
        session: &Session,
        settings: &Settings,
        table: &AliasTable,
        ctx: &mut Ctx,
    ) -> Option<Answer> {
        let req = session.req_header();
        let candidates = Candidates::of(table, &LiveView::now());
        let request = PlacementRequest {
            tenant: req
                .headers
                .get(&settings.tenant_header)
                .and_then(|v| v.to_str().ok()),
            path: req.uri.path(),
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

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    /// No downstream modules: pingora's default adds a disabled compression module, which
    /// still builds a context for every request. hagate compresses nothing.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> Ctx {
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
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        match self.plan(session, ctx).await {
            None => Ok(false),
            Some(answer) => answer.send(session).await,
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let target = match ctx.next {
            Next::Primary => ctx.primary,
            Next::Same => ctx.current,
            Next::Fallback => ctx.fallback,
            Next::Done => None,
        }
        .ok_or_else(|| Error::explain(ErrorType::InternalError, "no upstream left to try"))?;
        if ctx.next == Next::Fallback {
            ctx.next = Next::Done;
            ctx.failed_over = true;
        }
        ctx.attempts = ctx.attempts.saturating_add(1);
        let (Some(table), Some(settings)) = (ctx.table.as_ref(), ctx.settings.as_ref()) else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "request was not planned",
            ));
        };
        let inst = table.get(target.instance);
        ctx.inflight = Some(inst.state.start_request());
        ctx.current = Some(target);
        let up = &settings.config.upstream;
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
        if let Some(cur) = ctx.current {
            upstream.insert_header(ROLE, cur.role.as_str())?;
            // A membership-held alias: the holder's fencing token, so the context server
            // can refuse a route decided on a stale holding.
            if let Some(epoch) = ctx.table.as_ref().and_then(|t| t.get(cur.instance).epoch) {
                upstream.insert_header(EPOCH, HeaderValue::from(epoch))?;
            }
        }
        if let Some(id) = &ctx.context_id {
            upstream.insert_header(CONTEXT_ID, id.clone())?;
        }
        if ctx.placed {
            if let (Some(table), Some(p)) = (ctx.table.as_ref(), ctx.primary) {
                upstream.insert_header(MAIN_ALIAS, table.get(p.instance).alias.as_str())?;
                if let Some(b) = ctx.fallback {
                    upstream.insert_header(BACKUP_ALIAS, table.get(b.instance).alias.as_str())?;
                }
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let (Some(table), Some(cur)) = (ctx.table(), ctx.current) {
            let state = &table.get(cur.instance).state;
            state.record_latency(ctx.started.elapsed());
            if let Some(load) = response
                .remove_header(LOAD)
                .and_then(|v| v.to_str().ok()?.trim().parse::<f32>().ok())
            {
                state.set_reported_load(load);
            }
        }
        if response.status.is_server_error() {
            ctx.record_failure();
        } else if let (Some(table), Some(cur)) = (ctx.table(), ctx.current) {
            table.get(cur.instance).state.record_success();
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Out of descriptors or buffers here says nothing about the upstream: do not eject
        // it, and do not fail over (the other instance would fail the same way).
        if crate::health::is_local_resource_error(e.root_cause()) {
            metrics()
                .local_resource_errors
                .with_label_values(&["upstream"])
                .inc();
            ctx.local_trouble = true;
            e.set_retry(false);
            return e;
        }
        ctx.record_failure();
        let fail_over = ctx.can_fail_over();
        if fail_over {
            metrics()
                .failovers
                .with_label_values(&["connect_failure"])
                .inc();
            ctx.next = Next::Fallback;
        }
        e.set_retry(fail_over);
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
            _ if ctx.local_trouble => (
                503,
                serde_json::json!({"error": "local_resources_exhausted",
                    "detail": "the gateway is out of file descriptors or buffers; the upstream was not tried"}),
            ),
            (ErrorType::HTTPStatus(code), _) => (
                *code,
                serde_json::json!({"error": "http_error", "detail": e.to_string()}),
            ),
            (_, ErrorSource::Upstream) => (
                502,
                serde_json::json!({"error": "upstream_failed",
                    "detail": format!("no instance of the request's HAID answered ({})", e.etype().as_str())}),
            ),
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
        if *e.esource() != ErrorSource::Upstream || !replayable {
            if *e.esource() == ErrorSource::Upstream {
                ctx.record_failure();
            }
            e.set_retry(false);
            return e;
        }
        // A pooled connection the upstream had already closed says nothing about its
        // health: try the same instance once more on a fresh connection.
        if reused_connection
            && !ctx.reconnected
            && matches!(e.retry, RetryType::ReusedOnly | RetryType::Decided(true))
        {
            ctx.reconnected = true;
            ctx.next = Next::Same;
            e.set_retry(true);
            return e;
        }
        ctx.record_failure();
        let replay = ctx
            .settings
            .as_ref()
            .is_some_and(|s| s.config.routing.retry_in_flight)
            && ctx.can_fail_over();
        if replay {
            metrics().failovers.with_label_values(&["in_flight"]).inc();
            ctx.next = Next::Fallback;
        }
        e.set_retry(replay);
        e
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let role = ctx.current.map_or("none", |t| t.role.as_str());
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(if e.is_some() { 502 } else { 0 });
        let elapsed = ctx.started.elapsed();
        request_metrics().observe(role, status, elapsed);
        let instance = ctx
            .current
            .zip(ctx.table.as_ref())
            .map(|(t, table)| table.get(t.instance));
        if let Some(inst) = instance {
            inst.metrics().observe(status, elapsed);
        }
        if ctx.settings.as_ref().is_some_and(|s| s.config.log.access) {
            let req = session.req_header();
            tracing::info!(
                target: "hagate::access",
                method = %req.method,
                path = req.uri.path(),
                status,
                role,
                alias = instance.map(|i| i.alias.as_str()),
                upstream = instance.map(|i| tracing::field::display(i.address)),
                attempts = ctx.attempts,
                failed_over = ctx.failed_over,
                duration_us = elapsed.as_micros() as u64,
                context_id = ctx.context_id.as_ref().and_then(|v| v.to_str().ok()),
            );
        }
        ctx.inflight = None;
        // The request is over: its connection is idle (and may be evicted) until the next.
        if let Some(peer) = session.client_addr().and_then(|a| a.as_inet()) {
            self.conns.idle(peer);
        }
    }
}
