//! The admin listener: `/healthz` (the process is up), `/readyz` (the
//! database answers and the plugins are loaded) and `/metrics`
//! (Prometheus text).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hyper::{Method, StatusCode};
use tokio::net::TcpListener;

use crate::db::Db;
use crate::http::{self, HttpResponse};
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

/// Serves the admin endpoints until shutdown.
pub async fn serve(
    listener: TcpListener,
    shutdown: Shutdown,
    db: Db,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
) {
    http::serve(listener, shutdown, move |req| {
        let db = db.clone();
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        async move {
            if req.method() != Method::GET {
                return http::text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
            }
            route(req.uri().path(), &db, &metrics, &readiness).await
        }
    })
    .await
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
