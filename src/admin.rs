//! The admin listener: `/healthz` (the process is up), `/readyz` (the
//! database answers and the plugins are loaded), `/metrics`
//! (Prometheus text), and `POST /admin/revoke` (token revocation for a
//! backend, behind the dispatch secret).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use tokio::net::TcpListener;

use crate::cluster::{Cluster, NodeStatus};
use crate::db::Db;
use crate::http::{self, BearerSecret, HttpResponse};
use crate::ids::UserId;
use crate::listen::Guard;
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;

/// Set once startup has loaded everything `/readyz` promises; cleared when
/// shutdown begins so load balancers stop sending new work.
#[derive(Debug, Default)]
pub struct Readiness {
    plugins_loaded: AtomicBool,
    draining: AtomicBool,
    /// Whether event claims can be written: while they can't, every event
    /// fails with DB_ERROR, so the node is not ready.
    claims_healthy: std::sync::OnceLock<Arc<AtomicBool>>,
}

impl Readiness {
    pub fn set_plugins_loaded(&self) {
        self.plugins_loaded.store(true, Ordering::Release);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn watch_claims(&self, healthy: Arc<AtomicBool>) {
        let _ = self.claims_healthy.set(healthy);
    }

    /// The last claim write failed. Only a write can tell whether the
    /// fault cleared, so `/readyz` then tries one itself.
    fn claims_failing(&self) -> Option<&AtomicBool> {
        self.claims_healthy
            .get()
            .map(|h| h.as_ref())
            .filter(|h| !h.load(Ordering::Acquire))
    }

    fn why_not_ready(&self) -> Option<&'static str> {
        if self.draining.load(Ordering::Acquire) {
            Some("draining")
        } else if !self.plugins_loaded.load(Ordering::Acquire) {
            Some("plugins not loaded")
        } else {
            None
        }
    }
}

/// The revoke endpoint's path.
const REVOKE: &str = "/admin/revoke";
/// Largest `POST /admin/revoke` body: `{"user_id":"…"}` is tiny.
const MAX_REVOKE_BODY: usize = 4096;

/// Serves the admin endpoints until shutdown. `dispatch_secret` guards
/// the one that changes state; `guard` holds handshakes to the client
/// listener's timeout and head caps.
pub async fn serve(
    listener: TcpListener,
    shutdown: Shutdown,
    guard: Guard,
    db: Db,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    dispatch_secret: BearerSecret,
    cluster: Option<Cluster>,
) {
    http::serve(listener, shutdown, guard, move |req| {
        let cluster = cluster.clone();
        let db = db.clone();
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        let secret = dispatch_secret.clone();
        async move {
            if req.uri().path() == REVOKE {
                return revoke(req, &db, &secret).await;
            }
            if req.method() != Method::GET {
                return http::text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
            }
            if req.uri().path() == "/cluster" {
                return cluster_status(cluster.as_ref());
            }
            route(req.uri().path(), &db, &metrics, &readiness).await
        }
    })
    .await
}

/// `GET /cluster`: this node and the live nodes with their sessions and
/// lease age (404 without `[cluster]`).
fn cluster_status(cluster: Option<&Cluster>) -> HttpResponse {
    let Some(cluster) = cluster else {
        return http::text(StatusCode::NOT_FOUND, "not in cluster mode\n");
    };
    #[derive(serde::Serialize)]
    struct Status {
        node_id: crate::ids::NodeId,
        nodes: Vec<NodeStatus>,
    }
    http::json(
        StatusCode::OK,
        &Status {
            node_id: cluster.node(),
            nodes: cluster.status(),
        },
    )
}

/// `POST /admin/revoke` with `{"user_id":"ID"}` (a string or a number):
/// revokes every token of that user issued so far, as `token revoke` does.
async fn revoke(req: Request<Incoming>, db: &Db, secret: &BearerSecret) -> HttpResponse {
    if req.method() != Method::POST {
        return http::text(StatusCode::METHOD_NOT_ALLOWED, "only POST\n");
    }
    let header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !secret.admits(header) {
        return http::text(
            StatusCode::UNAUTHORIZED,
            "unauthorized: send Authorization: Bearer <dispatch secret>\n",
        );
    }
    let body = match Limited::new(req.into_body(), MAX_REVOKE_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            return http::text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body over {MAX_REVOKE_BODY} bytes\n"),
            );
        }
        Err(err) => {
            return http::text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {err}\n"),
            );
        }
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        user_id: UserId,
    }
    let user = match serde_json::from_slice::<Body>(&body) {
        Ok(body) => body.user_id,
        Err(err) => {
            return http::text(
                StatusCode::BAD_REQUEST,
                format!(
                    "bad body: {err}; send {{\"user_id\":\"ID\"}} with a positive decimal id\n"
                ),
            );
        }
    };
    match crate::revoke::revoke(db, user).await {
        Ok(revoked) => {
            tracing::info!(user_id = %user, revoked_at = revoked.revoked_at, "tokens revoked (admin)");
            http::json(StatusCode::OK, &revoked)
        }
        Err(err) => {
            tracing::warn!(error = %err, "admin revoke failed");
            http::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n"))
        }
    }
}

async fn route(path: &str, db: &Db, metrics: &Metrics, readiness: &Readiness) -> HttpResponse {
    match path {
        "/healthz" => http::text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if let Some(why) = readiness.why_not_ready() {
                return http::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                );
            }
            if let Some(healthy) = readiness.claims_failing() {
                match crate::dispatch::claims::probe(db).await {
                    Ok(()) => healthy.store(true, Ordering::Release),
                    Err(err) => {
                        return http::text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: the database cannot record event claims: {err}\n"),
                        );
                    }
                }
            }
            match db.ping().await {
                Ok(()) => http::text(StatusCode::OK, "ready\n"),
                Err(err) => {
                    tracing::warn!(error = %err, "readiness check: database unreachable");
                    http::text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: database unreachable\n",
                    )
                }
            }
        }
        "/metrics" => {
            let mut response = http::text(StatusCode::OK, metrics.encode());
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        _ => http::text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
