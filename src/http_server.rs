//! A minimal HTTP/1.1 server loop on hyper, shared by the admin API and the demo context
//! server. The proxy itself is pingora; this is only for small control-plane endpoints.

use std::convert::Infallible;
use std::future::Future;

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

/// Serves `handler` on every connection accepted from `listener`, forever.
pub async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
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

/// Reads a request body of at most `limit` bytes.
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, String> {
    Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| format!("cannot read the body: {e}"))
}

/// Reads a JSON body of at most `limit` bytes into `T`; a body that is too big or does
/// not parse gets a 400 `{"error": <error>, "detail": ...}`.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
    error: &str,
) -> Result<T, Reply> {
    let bad = |detail: String| {
        json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": error, "detail": detail}),
        )
    };
    let body = read_body(req, limit).await.map_err(bad)?;
    serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))
}
