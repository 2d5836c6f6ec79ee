//! The admin listener: `/metrics`, `/healthz`, the alias table at `/v1/aliases`, and the
//! HAID generator at `POST /v1/placements` (placement plus the Linkis encoder).
//!
//! Writes need `Authorization: Bearer <admin.token>` when a token is configured:
//! no header gives 401, a wrong token 403. Every answer is JSON except `/metrics`.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;
use serde_json::json;

mod membership;

use crate::aliases::AliasTable;
use crate::gateway::{Gateway, PutError};
use crate::haid;
use crate::health::{now_ms, LiveView};
use crate::http_server::{json, read_json, text, Reply};
use crate::metrics::{metrics, Exposition, InstanceGauges};
use crate::placement::{Candidates, PlacementError, PlacementRequest};
use crate::store::Listed;

/// The body of `PUT /v1/aliases`: `{"instances": {"cs_1": {"address": "127.0.0.1:9101"}}}`,
/// the same shape as the config's `[instances]`.
pub type PutAliases = crate::model::TableValue;

/// Answers one admin request.
pub async fn handle(gateway: Arc<Gateway>, req: Request<Incoming>) -> Reply {
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/metrics") => {
            let members = gateway.store().list().await.unwrap_or_default();
            let table = gateway.table();
            let m = metrics();
            m.observe_table(table.version(), table.len());
            match gateway.etcd() {
                Some(etcd) => {
                    m.store_up.set(i64::from(etcd.in_sync()));
                    m.store_last_sync_age
                        .set(etcd.last_heard_age().as_secs_f64().min(1e9));
                }
                None => {
                    m.store_up.set(1);
                    m.store_last_sync_age.set(0.0);
                }
            }
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                m.render(|x| per_instance(x, &table, &members)),
            )
        }
        (Method::GET, "/healthz") => json(StatusCode::OK, &json!({"status": "ok"})),
        (Method::GET, "/readyz") => match gateway.ready() {
            Ok(()) => json(StatusCode::OK, &json!({"status": "ready"})),
            Err(detail) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"error": "store_not_in_sync", "detail": detail}),
            ),
        },
        (Method::GET, "/v1/aliases") => aliases(&gateway),
        (Method::PUT, "/v1/aliases") => {
            let settings = gateway.settings();
            let token = settings.config.admin.token.as_deref();
            if let Some(denied) = authorize(token, "admin.token", &req) {
                return denied;
            }
            put_aliases(&gateway, req).await
        }
        (method, path) if path == "/v1/membership" || path.starts_with("/v1/membership/") => {
            membership::handle(&gateway, method, req).await
        }
        (Method::POST, "/v1/placements") => placements(&gateway, req).await,
        (_, "/metrics" | "/healthz" | "/readyz" | "/v1/aliases" | "/v1/placements") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "method_not_allowed"}),
        ),
        (_, path) => json(
            StatusCode::NOT_FOUND,
            &json!({"error": "not_found", "path": path}),
        ),
    }
}

/// The gauges read at scrape time: each instance's liveness and in-flight count from
/// `table`, and each holder's heartbeat age from `members`.
fn per_instance(x: &mut Exposition<'_>, table: &AliasTable, members: &[Listed]) {
    let now = now_ms();
    let instances = table.instances().iter().map(|i| InstanceGauges {
        alias: i.alias.as_str(),
        address: i.address,
        live: i.state.is_live(now),
        inflight: i.state.inflight(),
    });
    let holders = members
        .iter()
        .filter_map(|l| Some((l.entry.alias.as_str(), l.age?.as_secs_f64())));
    x.instance_gauges(instances, holders);
}

fn aliases(gateway: &Gateway) -> Reply {
    let table = gateway.table();
    let now = now_ms();
    let instances: serde_json::Map<String, serde_json::Value> = table
        .instances()
        .iter()
        .map(|i| {
            (
                i.alias.to_string(),
                json!({
                    "address": i.address.to_string(),
                    "labels": i.labels,
                    "weight": i.weight,
                    "live": i.state.is_live(now),
                    "active_up": i.state.active_up(),
                    "ejected": i.state.ejected(now),
                    "inflight": i.state.inflight(),
                    "latency_ewma_us": i.state.latency_ewma_us(),
                    "reported_load": i.state.reported_load(),
                    "epoch": i.epoch,
                }),
            )
        })
        .collect();
    let origin = gateway.table_origin();
    json(
        StatusCode::OK,
        &json!({
            "version": table.version(),
            "source": origin.label(),
            "revision": origin.revision(),
            "instances": instances,
        }),
    )
}

async fn put_aliases(gateway: &Gateway, req: Request<Incoming>) -> Reply {
    let started = std::time::Instant::now();
    let limit = gateway.settings().config.admin.max_body.as_u64();
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let put: PutAliases =
        match read_json(req, limit, Some("admin.max_body"), "invalid_alias_table").await {
            Ok(p) => p,
            Err(reply) => return reply,
        };
    let read_ms = started.elapsed().as_millis() as u64;
    match gateway.put_aliases(&put.instances).await {
        Ok(out) => {
            // read_ms: read and parse the body; the rest: validate, build, write, swap
            let took_ms = started.elapsed().as_millis() as u64;
            tracing::info!(
                took_ms,
                read_ms,
                aliases = out.table.len(),
                "alias table put"
            );
            json(
                StatusCode::OK,
                &json!({
                    "version": out.table.version(),
                    "size": out.table.len(),
                    "revision": out.revision,
                    "applied": out.applied,
                }),
            )
        }
        Err(PutError::Table(e)) => json(
            StatusCode::BAD_REQUEST,
            &json!({"error": "invalid_alias_table", "field": e.field(), "detail": e.to_string()}),
        ),
        // Refused by etcd for its size: no retry helps
        Err(PutError::Store(e @ crate::store::StoreError::TooLarge(_))) => json(
            StatusCode::PAYLOAD_TOO_LARGE,
            &json!({"error": "table_too_large_for_store", "detail": e.to_string()}),
        ),
        // Sent but not answered in time: the write may still land (the PUT is idempotent).
        Err(PutError::Store(e @ crate::store::StoreError::Unconfirmed(_))) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "store_write_unconfirmed", "detail": e.to_string()}),
        ),
        Err(PutError::Store(e)) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "store_unavailable", "detail": e.to_string()}),
        ),
    }
}

/// The body of `POST /v1/placements`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementAsk {
    /// The numeric context id to mint a HAID for: `"1024"`.
    pub context_id: String,
    /// The tenant, as the tenant header would carry it.
    #[serde(default)]
    pub tenant: Option<String>,
    /// The path plugins match on (default `/v1/placements`).
    #[serde(default)]
    pub path: Option<String>,
    /// Aliases that must not be chosen.
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// Places a context with the gateway's placement (plugins and fail policies included)
/// and answers `{"main", "backup", "haid"}`.
async fn placements(gateway: &Gateway, req: Request<Incoming>) -> Reply {
    let ask: PlacementAsk = match read_json(req, 64 << 10, None, "invalid_request").await {
        Ok(a) => a,
        Err(reply) => return reply,
    };
    let table = gateway.table();
    let mut exclude = Vec::with_capacity(ask.exclude.len());
    for alias in &ask.exclude {
        match table.resolve(alias) {
            Some(i) => exclude.push(i),
            None => {
                return json(
                    StatusCode::NOT_FOUND,
                    &json!({"error": "unknown_alias", "alias": alias,
                            "detail": format!("no instance has alias {alias:?}")}),
                )
            }
        }
    }
    let request = PlacementRequest {
        tenant: ask.tenant.as_deref(),
        path: ask.path.as_deref().unwrap_or("/v1/placements"),
        context_id: Some(&ask.context_id),
        exclude: &exclude,
    };
    let candidates = Candidates::of(&table, &LiveView::now());
    let unavailable = |error: &str, detail: String| {
        let secs = gateway.settings().config.routing.retry_after.as_secs();
        let mut reply = json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": error, "detail": detail, "retry_after": secs}),
        );
        reply
            .headers_mut()
            .insert(hyper::header::RETRY_AFTER, secs.into());
        reply
    };
    let choice = match gateway.placement().place(&request, &candidates).await {
        Ok(c) => c,
        Err(e @ PlacementError::NoLiveInstance) => {
            return unavailable("no_live_instance", e.to_string())
        }
        Err(e @ PlacementError::Rejected { .. }) => {
            return unavailable("placement_rejected", e.to_string())
        }
    };
    let main = candidates.list[choice.main].alias;
    let Some(backup) = choice.backup.map(|b| candidates.list[b].alias) else {
        return unavailable(
            "no_backup",
            "a HAID needs a backup, and only one instance could be chosen".into(),
        );
    };
    match haid::encode(main, &[backup], &ask.context_id) {
        Ok(haid) => json(
            StatusCode::OK,
            &json!({"main": main, "backup": backup, "haid": haid}),
        ),
        Err(e) => json(
            StatusCode::BAD_REQUEST,
            &json!({"error": "invalid_request", "detail": format!("context_id: {e}")}),
        ),
    }
}

/// `None` when the request may write (no token is configured, or it sent the right one);
/// otherwise the 401/403 answer, naming the config field of the token.
pub fn authorize(expected: Option<&str>, field: &str, req: &Request<Incoming>) -> Option<Reply> {
    let expected = expected?;
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => Some(json(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "unauthorized", "detail": format!("send Authorization: Bearer <{field}>")}),
        )),
        Some(token) if !same(token.as_bytes(), expected.as_bytes()) => Some(json(
            StatusCode::FORBIDDEN,
            &json!({"error": "forbidden", "detail": format!("wrong token (see {field})")}),
        )),
        Some(_) => None,
    }
}

/// Compares in constant time, length included: both sides are hashed first, and the
/// digests (always 32 bytes) are compared without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    da.iter()
        .zip(db.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn tokens_compare_by_digest() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cret", b"s3creT"));
        assert!(!same(b"s3cret", b"s3cret-and-more"));
        assert!(!same(b"", b"x"));
    }
}
