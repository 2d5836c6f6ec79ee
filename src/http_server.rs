//! A minimal HTTP/1.1 server loop on hyper, shared by the admin API and the demo context
//! server. The proxy itself is pingora; this is only for small control-plane endpoints.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A response with a complete body.
pub type Reply = Response<Full<Bytes>>;

/// Limits of a small HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// The most connections open at once; above it, no more are accepted until one closes.
    pub max_connections: usize,
    /// How long a connection may take to send a complete request head, counted from when
    /// it connected or got its last answer (so it also closes idle keep-alive connections).
    pub header_timeout: std::time::Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_connections: 64,
            header_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// Serves `handler` on every connection accepted from `listener`, forever, within `limits`.
/// `open` is told the number of open connections whenever it changes.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    limits: ServeLimits,
    open: impl Fn(usize) + Send + Sync + 'static,
    handler: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let open = Arc::new(open);
    let in_use =
        move |slots: &tokio::sync::Semaphore| limits.max_connections - slots.available_permits();
    loop {
        // Take a slot before accepting: above the cap, connections wait in the backlog.
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                // EMFILE and friends fail at once; do not spin on them.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        open(in_use(&slots));
        let handler = handler.clone();
        let (slots, open) = (Arc::clone(&slots), Arc::clone(&open));
        tokio::spawn(async move {
            serve_connection(stream, limits, handler).await;
            drop(permit);
            open(in_use(&slots));
        });
    }
}

/// Serves `handler` on one connection until it closes, closing it if a request head takes
/// longer than `limits.header_timeout` (counted from the connection or the last answer).
pub async fn serve_connection<S, F, Fut>(stream: S, limits: ServeLimits, handler: F)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let service = service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler(req).await) }
    });
    let _ = http1::Builder::new()
        .keep_alive(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// A JSON reply.
pub fn json(status: StatusCode, body: &serde_json::Value) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!("{body}\n"))))
        .expect("static parts are valid")
}

/// A plain-text reply with a content type.
pub fn text(status: StatusCode, content_type: &str, body: String) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static parts are valid")
}

/// Why a body was not read.
#[derive(Debug)]
pub enum BodyError {
    /// It is (or declares itself) longer than the limit.
    TooLarge,
    /// The connection failed while it was read.
    Read(String),
}

/// Reads a request body of at most `limit` bytes; one that declares a longer
/// `Content-Length` is refused before any of it is read.
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, BodyError> {
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Err(e) => Err(BodyError::Read(format!("cannot read the body: {e}"))),
    }
}

/// A body this big is parsed on a blocking thread, not on the runtime's.
const BIG_BODY: usize = 256 << 10;

/// Reads a JSON body of at most `limit` bytes into `T`. A body over the limit gets a 413
/// `{"error": "body_too_large", ...}` naming the limit and, if one does, the setting that
/// raises it (`setting`); one that cannot be read or does not parse gets a 400
/// `{"error": <error>, "detail": ...}`.
pub async fn read_json<T: serde::de::DeserializeOwned + Send + 'static>(
    req: Request<Incoming>,
    limit: usize,
    setting: Option<&str>,
    error: &str,
) -> Result<T, Reply> {
    let too_large = || {
        let mut answer = serde_json::json!({
            "error": "body_too_large",
            "detail": format!("the body is larger than the limit of {limit} bytes"),
        });
        if let Some(setting) = setting {
            answer["field"] = setting.into();
            answer["detail"] = format!("the body is larger than {setting} ({limit} bytes)").into();
        }
        json(StatusCode::PAYLOAD_TOO_LARGE, &answer)
    };
    let body = match read_body(req, limit).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => return Err(too_large()),
        Err(BodyError::Read(detail)) => {
            return Err(json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": error, "detail": detail}),
            ))
        }
    };
    let big = body.len() > BIG_BODY;
    let parse = move || crate::model::from_json::<T>(&body);
    // a big body (a 100k-alias table is 7 MiB, 40 ms to parse) off this runtime's thread,
    // at a lower priority than the proxy's, as a reload reads its files
    let parsed = if big {
        crate::background::run("hagate-parse", parse)
            .await
            .unwrap_or_else(|e| {
                Err(serde::de::Error::custom(format!(
                    "the parse did not finish: {e}"
                )))
            })
    } else {
        parse()
    };
    parsed.map_err(|e| {
        json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": error, "detail": e.to_string()}),
        )
    })
}
