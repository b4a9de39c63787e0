//! The admin listener: `/healthz` (the process is up), `/readyz` (the
//! database answers and the plugins are loaded), `/metrics`
//! (Prometheus text), `POST /admin/revoke` (token revocation for a
//! backend, behind the dispatch secret), and the read-only operator page:
//! `GET /` (embedded HTML) polling `GET /admin/status` and
//! `GET /admin/failures`, which carry no token, secret or session id.

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
use crate::plugin::Plugins;
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;

/// Set once startup has loaded everything `/readyz` promises; cleared when
/// shutdown begins so load balancers stop sending new work.
#[derive(Default)]
pub struct Readiness {
    /// The loaded plugins (also what the operator page lists).
    plugins: std::sync::OnceLock<Plugins>,
    draining: AtomicBool,
    /// Whether event claims can be written: while they can't, every event
    /// fails with DB_ERROR, so the node is not ready.
    claims_healthy: std::sync::OnceLock<Arc<AtomicBool>>,
}

impl Readiness {
    pub fn set_plugins_loaded(&self, plugins: Plugins) {
        let _ = self.plugins.set(plugins);
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
        } else if self.plugins.get().is_none() {
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
/// Most failures `GET /admin/failures` returns.
const MAX_FAILURES: i64 = 50;
/// The operator page and its script, embedded.
const OPERATOR_PAGE: &str = include_str!("../web/operator/index.html");
const OPERATOR_SCRIPT: &str = include_str!("../web/operator/operator.js");

/// What the admin endpoints read (and, for revocation, write).
pub struct State {
    pub db: Db,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    /// Guards the one endpoint that changes state.
    pub dispatch_secret: BearerSecret,
    /// `GET /cluster`'s source; `None` on a single node.
    pub cluster: Option<Cluster>,
}

/// Serves the admin endpoints until shutdown; `guard` holds handshakes
/// to the client listener's timeout and head caps.
pub async fn serve(listener: TcpListener, shutdown: Shutdown, guard: Guard, state: State) {
    let State {
        db,
        metrics,
        readiness,
        dispatch_secret,
        cluster,
    } = state;
    let started = std::time::Instant::now();
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
            match req.uri().path() {
                "/" => page(OPERATOR_PAGE, "text/html; charset=utf-8"),
                "/operator.js" => page(OPERATOR_SCRIPT, "text/javascript; charset=utf-8"),
                "/admin/status" => status(&metrics, &readiness, started),
                "/admin/failures" => failures(&db).await,
                "/cluster" => cluster_status(cluster.as_ref()),
                path => route(path, &db, &metrics, &readiness).await,
            }
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

/// An embedded file, not cached (a rebuilt binary serves the new page).
fn page(body: &'static str, content_type: &'static str) -> HttpResponse {
    let mut response = http::text(StatusCode::OK, body);
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    response
}

/// `GET /admin/status`: every metric sample as JSON (the page derives
/// rates by polling), the plugins serving with their version hashes and
/// load times, and the load/reload history.
fn status(metrics: &Metrics, readiness: &Readiness, started: std::time::Instant) -> HttpResponse {
    let plugins = readiness.plugins.get();
    http::json(
        StatusCode::OK,
        &serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": started.elapsed().as_secs(),
            "ready": readiness.why_not_ready().is_none(),
            "metrics": samples(&metrics.encode()),
            "plugins": plugins.map(Plugins::loaded).unwrap_or_default(),
            "reloads": plugins.map(Plugins::history).unwrap_or_default(),
        }),
    )
}

/// `GET /admin/failures`: the latest failed events (newest first) as
/// recorded for the logging server: event, error code and message, trace,
/// and whether the sink has it yet.
async fn failures(db: &Db) -> HttpResponse {
    let rows: Result<Vec<(String, i64, Option<i64>)>, sqlx::Error> = crate::with_pool!(db, p => sqlx::query_as(
        "SELECT record, created_at, delivered_at FROM event_errors ORDER BY created_at DESC LIMIT $1"
    )
    .bind(MAX_FAILURES)
    .fetch_all(p)
    .await);
    match rows {
        Ok(rows) => {
            let failures: Vec<serde_json::Value> = rows
                .into_iter()
                .map(|(record, created_at, delivered_at)| {
                    serde_json::json!({
                        "record": serde_json::from_str::<serde_json::Value>(&record).unwrap_or_default(),
                        "recorded_at": crate::db::rfc3339(created_at),
                        "delivered_at": delivered_at.map(crate::db::rfc3339),
                    })
                })
                .collect();
            http::json(StatusCode::OK, &failures)
        }
        Err(err) => {
            tracing::warn!(error = %err, "operator page: cannot read the error log");
            http::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot read the error log\n",
            )
        }
    }
}

/// The samples of a Prometheus/OpenMetrics text exposition as
/// `{"name","labels","value"}` (histogram buckets left out).
fn samples(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
                None => (series, serde_json::Map::new()),
            };
            (!name.ends_with("_bucket"))
                .then(|| serde_json::json!({"name": name, "labels": labels, "value": value}))
        })
        .collect()
}

/// `a="x",b="y\"z"` into a map, unescaping `\\`, `\"` and `\n`.
fn parse_labels(text: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut labels = serde_json::Map::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value.into());
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some(labels)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_labels_and_skip_buckets() {
        let text = "# HELP x y\nsessions_open 3\nevents_total{event=\"E\",outcome=\"success\"} 2\n\
                    odd{v=\"a\\\"b,c\"} 1\nack_latency_seconds_bucket{le=\"0.1\"} 5\n# EOF\n";
        let got = samples(text);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0]["name"], "sessions_open");
        assert_eq!(got[0]["value"], 3.0);
        assert_eq!(got[1]["labels"]["outcome"], "success");
        assert_eq!(got[2]["labels"]["v"], "a\"b,c");
    }
}
