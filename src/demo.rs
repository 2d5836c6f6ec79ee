//! A small demo context server, and the `hagate demo` launcher.
//!
//! The demo server echoes what hagate forwarded (role, context id, placed aliases) as JSON,
//! mints a HAID when hagate placed a new context, and serves `/health`. `PUT /demo/health`
//! (`up`/`down`) and `PUT /demo/status` (a status code for echo answers) let a demo or a
//! test make it fail on purpose. It is what the
//! README's first command runs, and what the integration tests run as real upstreams.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;

use crate::haid;
use crate::http_server::{json, read_body, serve, Reply, ServeLimits};

/// One demo context server.
#[derive(Debug)]
pub struct DemoServer {
    name: String,
    healthy: AtomicBool,
    /// Status of echo answers (200 unless set with `PUT /demo/status`).
    status: AtomicU16,
    requests: AtomicU64,
    health_checks: AtomicU64,
    next_id: AtomicU64,
    /// The load reported in `x-hagate-load` on echo answers (`PUT /demo/load`); none
    /// while empty.
    load: std::sync::Mutex<Option<String>>,
}

impl DemoServer {
    /// A healthy server called `name`.
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(DemoServer {
            name: name.to_string(),
            healthy: AtomicBool::new(true),
            status: AtomicU16::new(200),
            requests: AtomicU64::new(0),
            health_checks: AtomicU64::new(0),
            next_id: AtomicU64::new(1000),
            load: std::sync::Mutex::new(None),
        })
    }

    /// Serves on `listener` forever.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        serve(
            listener,
            ServeLimits::default(),
            |_| {},
            move |req| {
                let me = Arc::clone(&self);
                async move { me.handle(req).await }
            },
        )
        .await
    }

    async fn handle(&self, req: Request<Incoming>) -> Reply {
        let path = req.uri().path().to_string();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/health") => {
                self.health_checks.fetch_add(1, Relaxed);
                if self.healthy.load(Relaxed) {
                    json(StatusCode::OK, &json!({"status": "ok"}))
                } else {
                    json(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "down"}))
                }
            }
            (&Method::PUT, "/demo/health") => {
                let body = read_body(req, 64).await.unwrap_or_default();
                let up = body.as_ref() != b"down";
                self.healthy.store(up, Relaxed);
                json(StatusCode::OK, &json!({"healthy": up}))
            }
            (&Method::PUT, "/demo/status") => {
                let body = read_body(req, 16).await.unwrap_or_default();
                match std::str::from_utf8(&body)
                    .ok()
                    .and_then(|s| s.trim().parse::<StatusCode>().ok())
                {
                    Some(code) => {
                        self.status.store(code.as_u16(), Relaxed);
                        json(StatusCode::OK, &json!({"status": code.as_u16()}))
                    }
                    None => json(
                        StatusCode::BAD_REQUEST,
                        &json!({"error": "send a status code"}),
                    ),
                }
            }
            (&Method::PUT, "/demo/load") => {
                let body = read_body(req, 32).await.unwrap_or_default();
                let text = String::from_utf8_lossy(&body).trim().to_string();
                let mut load = self.load.lock().unwrap_or_else(|p| p.into_inner());
                *load = (!text.is_empty()).then_some(text);
                json(StatusCode::OK, &json!({"load": *load}))
            }
            (&Method::GET, "/demo/stats") => json(
                StatusCode::OK,
                &json!({
                    "server": self.name,
                    "requests": self.requests.load(Relaxed),
                    "health_checks": self.health_checks.load(Relaxed),
                }),
            ),
            _ => self.echo(req).await,
        }
    }

    async fn echo(&self, req: Request<Incoming>) -> Reply {
        self.requests.fetch_add(1, Relaxed);
        let header = |name: &str| {
            req.headers()
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let main = header("x-hagate-main-alias");
        let backup = header("x-hagate-backup-alias");
        // A context server mints the HAID of a new context from the aliases hagate placed.
        let minted = match (&main, &backup) {
            (Some(m), Some(b)) => {
                let id = self.next_id.fetch_add(1, Relaxed).to_string();
                haid::encode(m, &[b.as_str()], &id).ok()
            }
            _ => None,
        };
        let mut reply = json!({
            "server": self.name,
            "method": req.method().as_str(),
            "path": req.uri().path(),
            "role": header("x-hagate-role"),
            "context_id": header("x-hagate-context-id"),
            "epoch": header("x-hagate-epoch"),
            "content_length_headers": req.headers().get_all("content-length").iter().count(),
            "main_alias": main,
            "backup_alias": backup,
            "haid": minted,
        });
        let body_len = read_body(req, 1 << 20).await.map(|b| b.len()).unwrap_or(0);
        reply["body_bytes"] = json!(body_len);
        let status = StatusCode::from_u16(self.status.load(Relaxed)).unwrap_or(StatusCode::OK);
        let mut answer = json(status, &reply);
        let load = self.load.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(v) = load.and_then(|l| hyper::header::HeaderValue::from_str(&l).ok()) {
            answer.headers_mut().insert("x-hagate-load", v);
        }
        answer
    }
}
