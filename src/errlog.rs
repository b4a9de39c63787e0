//! Failed events for the logging server, once per event id, ever.
//!
//! A failure is first written to the `event_errors` table, whose primary key
//! is the event id: a retried event that fails again inserts nothing. A
//! background task then delivers undelivered rows to the sink (a JSON-lines
//! file, or an HTTP endpoint with an `Idempotency-Key` header) and marks
//! them delivered, retrying with backoff while the sink is down. Because the
//! row is committed before the failed ack is sent, nothing recorded is lost
//! to a sink outage or a gateway restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use crate::config::SinkConfig;
use crate::db::{Db, DbError, now_ms};
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;
use crate::with_pool;

/// Rows delivered per round trip to the sink's table. A record can be as
/// large as a dispatch frame, so this also bounds the deliverer's memory.
const BATCH: i64 = 64;
/// Longest wait between attempts while the sink is failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long one HTTP delivery may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a record could not reach the sink (it stays queued and is retried).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot write {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("POST {url} failed: {reason}")]
    Http { url: String, reason: String },
}

/// The recording side: cheap to clone, used by every dispatch connection.
#[derive(Clone, Debug)]
pub struct ErrorLog {
    db: Db,
    /// Wakes the deliverer as soon as a record is written.
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl ErrorLog {
    pub fn new(db: Db, metrics: Arc<Metrics>) -> Self {
        ErrorLog {
            db,
            wake: Arc::new(Notify::new()),
            metrics,
        }
    }

    /// Durably records a failed event unless this event id was recorded
    /// before. Returns whether this call recorded it.
    pub async fn record(
        &self,
        event_id: &str,
        record: &serde_json::Value,
    ) -> Result<bool, DbError> {
        let text = record.to_string();
        let now = now_ms();
        let inserted = with_pool!(self.db, p => sqlx::query(
            "INSERT INTO event_errors (event_id, record, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event_id)
        .bind(&text)
        .bind(now)
        .execute(p)
        .await
        .map(|r| r.rows_affected() > 0))?;
        if inserted {
            self.metrics.errlog_backlog.inc();
            self.wake.notify_one();
        }
        Ok(inserted)
    }

    /// Delivers undelivered records to `sink` until shutdown.
    pub async fn deliver(self, sink: SinkConfig, shutdown: Shutdown) {
        let sink = Sink::new(sink);
        let mut backoff = Duration::from_millis(100);
        if let Ok(n) = self.backlog().await {
            self.metrics.errlog_backlog.set(n);
        }
        loop {
            match self.deliver_batch(&sink).await {
                Ok(0) => {
                    backoff = Duration::from_millis(100);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = self.wake.notified() => {}
                        // A safety net: a record written by another node.
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                }
                Ok(_) => backoff = Duration::from_millis(100),
                Err(err) => {
                    self.metrics.errlog_sink_failures.inc();
                    tracing::warn!(error = %err, retry_in = ?backoff, "error log: sink delivery failed; will retry");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn backlog(&self) -> Result<i64, DbError> {
        let (n,): (i64,) = with_pool!(self.db, p => sqlx::query_as(
            "SELECT COUNT(*) FROM event_errors WHERE delivered_at IS NULL"
        )
        .fetch_one(p)
        .await)?;
        Ok(n)
    }

    /// Sends one batch; returns how many records were delivered.
    async fn deliver_batch(&self, sink: &Sink) -> Result<usize, DeliverError> {
        let rows: Vec<(String, String)> = with_pool!(self.db, p => sqlx::query_as(
            "SELECT event_id, record FROM event_errors WHERE delivered_at IS NULL \
             ORDER BY created_at, event_id LIMIT $1",
        )
        .bind(BATCH)
        .fetch_all(p)
        .await)
        .map_err(DbError::from)?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut delivered = 0;
        let result = sink.send(&rows, &mut delivered).await;
        for (event_id, _) in rows.iter().take(delivered) {
            with_pool!(self.db, p => sqlx::query(
                "UPDATE event_errors SET delivered_at = $1, attempts = attempts + 1 WHERE event_id = $2",
            )
            .bind(now_ms())
            .bind(event_id)
            .execute(p)
            .await
            .map(|_| ()))
            .map_err(DbError::from)?;
            self.metrics.errlog_delivered.inc();
            self.metrics.errlog_backlog.dec();
        }
        if let Err(err) = result {
            if let Some((event_id, _)) = rows.get(delivered) {
                with_pool!(self.db, p => sqlx::query(
                    "UPDATE event_errors SET attempts = attempts + 1 WHERE event_id = $1",
                )
                .bind(event_id)
                .execute(p)
                .await
                .map(|_| ()))
                .map_err(DbError::from)?;
            }
            return Err(err.into());
        }
        Ok(delivered)
    }
}

#[derive(Debug, thiserror::Error)]
enum DeliverError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// Where records go.
enum Sink {
    File(PathBuf),
    Http {
        url: String,
        client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    },
}

impl Sink {
    fn new(config: SinkConfig) -> Sink {
        match config {
            SinkConfig::File(path) => Sink::File(path),
            SinkConfig::Http(url) => Sink::Http {
                url,
                client: Client::builder(TokioExecutor::new()).build_http(),
            },
        }
    }

    /// Sends records in order, counting in `delivered` how many got through
    /// before any error.
    async fn send(
        &self,
        rows: &[(String, String)],
        delivered: &mut usize,
    ) -> Result<(), SinkError> {
        match self {
            Sink::File(path) => {
                let file_err = |source| SinkError::File {
                    path: path.display().to_string(),
                    source,
                };
                if let Some(dir) = path.parent() {
                    tokio::fs::create_dir_all(dir).await.map_err(file_err)?;
                }
                let mut file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(file_err)?;
                let mut buf = String::new();
                for (_, record) in rows {
                    buf.push_str(record);
                    buf.push('\n');
                }
                file.write_all(buf.as_bytes()).await.map_err(file_err)?;
                // Durable before the rows are marked delivered.
                file.sync_data().await.map_err(file_err)?;
                *delivered = rows.len();
                Ok(())
            }
            Sink::Http { url, client } => {
                for (event_id, record) in rows {
                    post(client, url, event_id, record).await?;
                    *delivered += 1;
                }
                Ok(())
            }
        }
    }
}

async fn post(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    event_id: &str,
    record: &str,
) -> Result<(), SinkError> {
    let fail = |reason: String| SinkError::Http {
        url: url.to_owned(),
        reason,
    };
    let request = hyper::Request::post(url)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header("Idempotency-Key", event_id)
        .body(Full::new(Bytes::from(record.to_owned())))
        .map_err(|e| fail(e.to_string()))?;
    let response = tokio::time::timeout(HTTP_TIMEOUT, client.request(request))
        .await
        .map_err(|_| fail(format!("no answer within {HTTP_TIMEOUT:?}")))?
        .map_err(|e| fail(e.to_string()))?;
    let status = response.status();
    // Drain the body so the connection can be reused.
    let _ = response.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(fail(format!("status {status}")))
    }
}
