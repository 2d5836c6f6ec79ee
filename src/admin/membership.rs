//! `/v1/membership`: the heartbeat API of the membership protocol.
//!
//! - `POST /v1/membership/heartbeat` (`UpdateHeartBeat`), with
//!   `Authorization: Bearer <membership.token>`: 200 when accepted, 409 when stale or
//!   rejected (the body says which, and shows the current entry).
//! - `GET /v1/membership/primary/{alias}` (`GetPrimary`): the holder while fresh, and the
//!   compare-and-set token.
//! - `GET /v1/membership`: every entry with its age.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde_json::json;

use super::authorize;
use crate::gateway::Gateway;
use crate::http_server::{json, read_json, Reply};
use crate::metrics::metrics;
use crate::model::Alias;
use crate::store::{Entry, Heartbeat, HeartbeatOutcome, StoreError};

/// An entry as JSON; its `timestamp_ms` is on the store's clock (ages come from `list`).
fn entry_json(e: &Entry) -> serde_json::Value {
    json!({
        "uuid": e.uuid,
        "alias": e.alias,
        "address": e.address,
        "timestamp_ms": e.timestamp_ms,
        "revision": e.revision,
        "epoch": e.epoch,
    })
}

/// The store could not answer: 503, so an agent treats it as no answer.
fn unavailable(e: StoreError) -> Reply {
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({"error": "membership_store_unavailable", "detail": e.to_string()}),
    )
}

fn bad(error: &str, detail: String) -> Reply {
    json(
        StatusCode::BAD_REQUEST,
        &json!({"error": error, "detail": detail}),
    )
}

/// Answers a request under `/v1/membership`.
pub async fn handle(gateway: &Arc<Gateway>, method: Method, req: Request<Incoming>) -> Reply {
    let settings = gateway.settings();
    let m = &settings.config.membership;
    if !m.enabled {
        return json(
            StatusCode::NOT_FOUND,
            &json!({"error": "membership_disabled", "detail": "set [membership] enabled = true"}),
        );
    }
    let path = req.uri().path().to_string();
    let store = gateway.store();
    match (method, path.as_str()) {
        (Method::POST, "/v1/membership/heartbeat") => {
            if let Some(denied) = authorize(m.token.as_deref(), "membership.token", &req) {
                return denied;
            }
            heartbeat(gateway, req).await
        }
        (Method::GET, "/v1/membership") => {
            let listed = match store.list().await {
                Ok(l) => l,
                Err(e) => return unavailable(e),
            };
            let entries: Vec<_> = listed
                .iter()
                .map(|l| {
                    let mut v = entry_json(&l.entry);
                    v["age_ms"] = l.age.map(|a| a.as_millis() as u64).into();
                    v["fresh"] = l.fresh.into();
                    v
                })
                .collect();
            json(
                StatusCode::OK,
                &json!({
                    "interval_ms": m.interval.as_millis() as u64,
                    "timeout_ms": m.timeout.as_millis() as u64,
                    "entries": entries,
                }),
            )
        }
        (Method::GET, p) if p.starts_with("/v1/membership/primary/") => {
            let alias = &p["/v1/membership/primary/".len()..];
            if let Err(e) = Alias::check(alias) {
                return bad("invalid_alias", e.to_string());
            }
            let primary = match store.get_primary(alias).await {
                Ok(p) => p,
                Err(e) => return unavailable(e),
            };
            json(
                StatusCode::OK,
                &json!({
                    "alias": alias,
                    "holder": primary.holder.as_ref().map(entry_json),
                    "token": primary.token,
                }),
            )
        }
        (_, "/v1/membership" | "/v1/membership/heartbeat") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "method_not_allowed"}),
        ),
        (_, p) => json(
            StatusCode::NOT_FOUND,
            &json!({"error": "not_found", "path": p}),
        ),
    }
}

async fn heartbeat(gateway: &Arc<Gateway>, req: Request<Incoming>) -> Reply {
    let hb: Heartbeat = match read_json(req, 16 << 10, None, "invalid_heartbeat").await {
        Ok(h) => h,
        Err(reply) => return reply,
    };
    if hb.uuid.is_empty() || hb.uuid.len() > 128 {
        return bad("invalid_heartbeat", "uuid: must be 1-128 bytes".into());
    }
    let Ok(address) = hb.address.parse::<std::net::SocketAddr>() else {
        return bad(
            "invalid_heartbeat",
            format!("address: invalid socket address {:?}", hb.address),
        );
    };
    if let Err(e) = crate::model::routable(&address) {
        return bad("invalid_heartbeat", format!("address: {}: {e}", hb.address));
    }
    let settings = gateway.settings();
    if !settings.claimable.is_match(hb.alias.as_str()) {
        return json(
            StatusCode::FORBIDDEN,
            &json!({"error": "alias_not_claimable",
                    "detail": format!("alias {:?} matches no pattern of membership.claimable", hb.alias.as_str())}),
        );
    }
    if !settings.config.membership.allows(&address) {
        return json(
            StatusCode::FORBIDDEN,
            &json!({"error": "address_not_allowed",
                    "detail": format!("{address} is in none of membership.allowed_networks")}),
        );
    }
    // The write and what follows it (the counters, the log line, the new table) run on a
    // task of their own, to the end: an agent that stops waiting (its timeout is one
    // interval) and goes to the next gateway cancels this request, and a claim the store
    // applied must still be counted and published.
    let gw = Arc::clone(gateway);
    let outcome = match tokio::spawn(async move { record(&gw, &hb).await }).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return unavailable(e),
        Err(e) => return unavailable(StoreError::Unavailable(format!("heartbeat task: {e}"))),
    };
    match outcome {
        HeartbeatOutcome::Accepted { entry, took_over } => json(
            StatusCode::OK,
            &json!({"result": "accepted", "entry": entry_json(&entry), "took_over": took_over}),
        ),
        HeartbeatOutcome::Stale { current } => json(
            StatusCode::CONFLICT,
            &json!({"result": "stale", "current": current.as_ref().map(entry_json)}),
        ),
        HeartbeatOutcome::Rejected { current } => json(
            StatusCode::CONFLICT,
            &json!({"result": "rejected", "current": entry_json(&current)}),
        ),
    }
}

/// Writes `hb` to the store and accounts for the outcome: the heartbeat and takeover
/// counters, the takeover's log line, and the table merged again after an accepted one.
async fn record(gateway: &Gateway, hb: &Heartbeat) -> Result<HeartbeatOutcome, StoreError> {
    let outcome = gateway.store().update_heartbeat(hb).await?;
    metrics()
        .heartbeats
        .with_label_values(&[outcome.label()])
        .inc();
    if let HeartbeatOutcome::Accepted { entry, took_over } = &outcome {
        if let Some(old) = took_over {
            metrics()
                .takeovers
                .with_label_values(&[entry.alias.as_str()])
                .inc();
            tracing::info!(alias = %entry.alias, from = %old, to = %entry.uuid, address = %entry.address, "alias taken over");
        }
        gateway.sync_membership().await;
    }
    Ok(outcome)
}
