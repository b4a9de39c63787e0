//! A small HTTP/1 server loop over hyper, shared by the admin listener and
//! the reference API: one task per connection, TLS and the first request
//! head guarded like the WebSocket listeners ([`Guard`]), graceful
//! shutdown, and accept errors that back off instead of spinning.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::listen::{Guard, MAX_HEAD, Prefixed};
use crate::shutdown::Shutdown;

/// The response type every handler returns.
pub type HttpResponse = Response<Full<Bytes>>;

/// Serves `handler` on `listener` until shutdown, then lets open requests
/// finish. `guard` takes each connection through TLS and its first
/// request head; later heads on a kept-alive connection get hyper's own
/// limits, set to the same timeout and size.
pub async fn serve<H, Fut>(listener: TcpListener, shutdown: Shutdown, guard: Guard, handler: H)
where
    H: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HttpResponse> + Send + 'static,
{
    let handler = Arc::new(handler);
    while let Some((tcp, _)) = shutdown.accept(&listener, guard.listener).await {
        let handler = handler.clone();
        let stop = shutdown.clone();
        let guard = guard.clone();
        shutdown.spawn(async move {
            let opened = tokio::select! {
                opened = guard.accept(tcp, guard.deadline()) => opened,
                _ = stop.cancelled() => return,
            };
            let Some((stream, head)) = opened else {
                return;
            };
            let service = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let conn = http1::Builder::new()
                .keep_alive(true)
                .timer(TokioTimer::new())
                .header_read_timeout(guard.timeout)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(Prefixed::new(head, stream)), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(error = %err, "http connection ended with an error");
                    }
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> HttpResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A JSON response.
pub fn json(status: StatusCode, body: &impl serde::Serialize) -> HttpResponse {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// A shared secret callers present as `Authorization: Bearer <secret>`
/// (the dispatch secret, on the dispatch and admin listeners). Held as its
/// SHA-256: comparing digests keeps the comparison constant-time whatever
/// length the caller sends.
#[derive(Clone)]
pub struct BearerSecret([u8; 32]);

impl BearerSecret {
    pub fn new(secret: &str) -> BearerSecret {
        BearerSecret(Sha256::digest(secret.as_bytes()).into())
    }

    /// Whether an `Authorization` header value carries the secret.
    pub fn admits(&self, header: Option<&str>) -> bool {
        let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        digest.ct_eq(&self.0).into()
    }
}

impl std::fmt::Debug for BearerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerSecret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_secret_needs_the_exact_secret() {
        let secret = BearerSecret::new("s3cret");
        assert!(secret.admits(Some("Bearer s3cret")));
        assert!(!secret.admits(Some("Bearer s3cre")));
        assert!(!secret.admits(Some("s3cret")));
        assert!(!secret.admits(None));
    }
}
