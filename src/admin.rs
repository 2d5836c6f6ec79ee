//! The admin listener: `/metrics`, `/healthz`, and the alias table at `/v1/aliases`.
//!
//! Writes need `Authorization: Bearer <admin.token>` when a token is configured:
//! no header gives 401, a wrong token 403. Every answer is JSON except `/metrics`.

use std::collections::BTreeMap;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::aliases::InstanceSpec;
use crate::gateway::Gateway;
use crate::health::now_ms;
use crate::http_server::{json, read_body, text, Reply};
use crate::metrics::metrics;

/// The body of `PUT /v1/aliases`: the same shape as the config's `[instances]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutAliases {
    /// `{"instances": {"cs_1": {"address": "127.0.0.1:9101"}}}`
    pub instances: BTreeMap<String, InstanceSpec>,
}

/// Answers one admin request.
pub async fn handle(gateway: Arc<Gateway>, req: Request<Incoming>) -> Reply {
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics().render(&gateway.table()),
        ),
        (Method::GET, "/healthz") => json(StatusCode::OK, &json!({"status": "ok"})),
        (Method::GET, "/v1/aliases") => aliases(&gateway),
        (Method::PUT, "/v1/aliases") => {
            if let Some(denied) = authorize(&gateway, &req) {
                return denied;
            }
            put_aliases(&gateway, req).await
        }
        (_, "/metrics" | "/healthz" | "/v1/aliases") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "method_not_allowed"}),
        ),
        (_, path) => json(
            StatusCode::NOT_FOUND,
            &json!({"error": "not_found", "path": path}),
        ),
    }
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
                }),
            )
        })
        .collect();
    json(
        StatusCode::OK,
        &json!({"version": table.version(), "instances": instances}),
    )
}

async fn put_aliases(gateway: &Gateway, req: Request<Incoming>) -> Reply {
    let bad = |detail: String| {
        json(
            StatusCode::BAD_REQUEST,
            &json!({"error": "invalid_alias_table", "detail": detail}),
        )
    };
    let body = match read_body(req, 1 << 20).await {
        Ok(b) => b,
        Err(e) => return bad(e),
    };
    let put: PutAliases = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return bad(e.to_string()),
    };
    match gateway.put_aliases(&put.instances) {
        Ok(table) => json(
            StatusCode::OK,
            &json!({"version": table.version(), "size": table.len()}),
        ),
        Err(e) => json(
            StatusCode::BAD_REQUEST,
            &json!({"error": "invalid_alias_table", "field": e.field(), "detail": e.to_string()}),
        ),
    }
}

/// `None` when the request may write; otherwise the 401/403 answer.
fn authorize(gateway: &Gateway, req: &Request<Incoming>) -> Option<Reply> {
    let settings = gateway.settings();
    let expected = settings.config.admin.token.as_deref()?;
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => Some(json(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "unauthorized", "detail": "send Authorization: Bearer <admin.token>"}),
        )),
        Some(token) if !same(token.as_bytes(), expected.as_bytes()) => Some(json(
            StatusCode::FORBIDDEN,
            &json!({"error": "forbidden", "detail": "wrong admin token"}),
        )),
        Some(_) => None,
    }
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
