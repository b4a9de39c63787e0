//! The backend's outbox relay: sends pending outbox rows over one dispatch
//! connection, pipelined, with increasing `s` and each row's own
//! `event_id`. A row that fails (`success:false`, a timeout, or no
//! connection) is retried with backoff; after `api.dispatch_attempts`
//! attempts it is logged (tracing and the logging sink) and dropped.
//! Rows live in the database, so a restarted backend resumes them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_rustls::TlsConnector;

use crate::config::Secret;
use crate::db::{Db, now_ms};
use crate::dispatch_client::{Ack, ClientError, DispatchClient, OutgoingEvent, RetryPolicy};
use crate::errlog::ErrorLog;
use crate::shutdown::Shutdown;
use crate::with_pool;

/// Rows taken per poll.
const BATCH: i64 = 256;
/// Sends in flight at once.
const MAX_INFLIGHT: usize = 512;
/// How often the connection is PINGed.
const PING_EVERY: Duration = Duration::from_secs(5);

/// The outbox relay: sends committed `dispatch_outbox` rows to the gateway.
pub struct Relay {
    pub db: Db,
    pub url: String,
    /// The trust roots for a wss:// `url` (`api.dispatch_ca`).
    pub tls: Option<TlsConnector>,
    pub secret: Secret,
    pub policy: RetryPolicy,
    pub errlog: ErrorLog,
    pub ready: Arc<Notify>,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    event_id: String,
    event_type: String,
    data: String,
    attempts: i64,
}

impl Relay {
    /// Runs until shutdown, then lets in-flight sends finish.
    pub async fn run(self, shutdown: Shutdown) {
        let this = Arc::new(self);
        let inflight: Arc<Mutex<HashSet<i64>>> = Arc::default();
        // Rows settled since the last poll began: that poll may have read
        // them as still pending, and must not send them again.
        let settled: Arc<Mutex<HashSet<i64>>> = Arc::default();
        let sequence = Arc::new(AtomicU64::new(1));
        let mut client: Option<Arc<DispatchClient>> = None;
        let mut reconnect_wait = Duration::ZERO;
        let tasks = tokio_util::task::TaskTracker::new();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            settled
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            let due = match this.due_rows().await {
                Ok(rows) => rows,
                Err(err) => {
                    tracing::error!(error = %err, "outbox relay cannot read the outbox");
                    Vec::new()
                }
            };
            let fresh: Vec<Row> = {
                let running = inflight.lock().unwrap_or_else(PoisonError::into_inner);
                let settled = settled.lock().unwrap_or_else(PoisonError::into_inner);
                due.into_iter()
                    .filter(|r| !running.contains(&r.id) && !settled.contains(&r.id))
                    .collect()
            };
            if !fresh.is_empty() && client.as_ref().is_none_or(|c| c.is_closed()) {
                client = this.connect(&mut reconnect_wait).await;
            }
            for row in fresh {
                if inflight
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .len()
                    >= MAX_INFLIGHT
                {
                    break;
                }
                inflight
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(row.id);
                let s = sequence.fetch_add(1, Ordering::Relaxed);
                let event = OutgoingEvent {
                    t: row.event_type.clone(),
                    d: serde_json::from_str(&row.data).unwrap_or(serde_json::Value::Null),
                    event_id: row.event_id.clone(),
                    s,
                };
                // Queued here, in row order; only the waiting is concurrent.
                let sent = match &client {
                    Some(client) => client.enqueue(&event).await,
                    None => Err(ClientError::Disconnected),
                };
                let this = this.clone();
                let inflight = inflight.clone();
                let settled = settled.clone();
                tasks.spawn(async move {
                    let id = row.id;
                    let result = match sent {
                        Ok(pending) => pending.wait_timeout(this.policy.attempt_timeout).await,
                        Err(err) => Err(err),
                    };
                    this.settle(row, event, result).await;
                    settled
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(id);
                    inflight
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&id);
                    // The row may be due again (or the next batch waiting).
                    this.ready.notify_one();
                });
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = this.ready.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        tasks.close();
        tasks.wait().await;
    }

    /// Connects, backing off between failures; `None` while the gateway is
    /// unreachable (the due rows then fail this attempt).
    async fn connect(&self, wait: &mut Duration) -> Option<Arc<DispatchClient>> {
        if !wait.is_zero() {
            tokio::time::sleep(*wait).await;
        }
        let attempt = tokio::time::timeout(
            self.policy.attempt_timeout,
            DispatchClient::connect_with(
                &self.url,
                self.secret.expose(),
                PING_EVERY,
                self.tls.as_ref(),
            ),
        )
        .await;
        match attempt {
            Ok(Ok(client)) => {
                tracing::info!(url = %self.url, "dispatch connection open");
                *wait = Duration::ZERO;
                Some(Arc::new(client))
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "cannot open the dispatch connection");
                *wait = (*wait * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
                None
            }
            Err(_) => {
                tracing::warn!(url = %self.url, "dispatch connection timed out");
                *wait = (*wait * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
                None
            }
        }
    }

    async fn due_rows(&self) -> Result<Vec<Row>, sqlx::Error> {
        with_pool!(self.db, p => sqlx::query_as::<_, Row>(
            "SELECT id, event_id, event_type, data, attempts FROM dispatch_outbox \
             WHERE state = 'pending' AND next_attempt_at <= $1 ORDER BY id LIMIT $2",
        )
        .bind(now_ms())
        .bind(BATCH)
        .fetch_all(p)
        .await)
    }

    /// Books one attempt's result: done, retry later, or log and drop.
    async fn settle(&self, row: Row, event: OutgoingEvent, result: Result<Ack, ClientError>) {
        let error = match result {
            Ok(ack) if ack.success => {
                self.finish(row.id, "done", None).await;
                return;
            }
            Ok(ack) => ack
                .error
                .map(|e| format!("{}: {}", e.code, e.message))
                .unwrap_or_else(|| "success:false".to_owned()),
            Err(err) => err.to_string(),
        };
        let attempts = u32::try_from(row.attempts)
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        if attempts >= self.policy.attempts {
            tracing::error!(event_id = %row.event_id, t = %row.event_type, attempts, error = %error,
                "dispatch failed on every attempt; logging and dropping the event");
            let record = serde_json::json!({
                "event_id": row.event_id,
                "t": row.event_type,
                "d": event.d,
                "error": {"code": "DISPATCH_DROPPED", "message": format!("dropped after {attempts} attempts: {error}")},
                "source": "api",
                "at": crate::db::rfc3339(now_ms()),
            });
            // A key of its own: the gateway may have logged this event id too.
            if let Err(err) = self
                .errlog
                .record(&format!("dropped:{}", row.event_id), &record)
                .await
            {
                tracing::error!(error = %err, "cannot record the dropped event");
            }
            self.finish(row.id, "dropped", Some(&error)).await;
        } else {
            let wait = self.policy.backoff(attempts);
            tracing::warn!(event_id = %row.event_id, attempts, retry_in = ?wait, error = %error, "dispatch attempt failed");
            let next = now_ms().saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
            let result = with_pool!(self.db, p => sqlx::query(
                "UPDATE dispatch_outbox SET attempts = $1, last_error = $2, next_attempt_at = $3, updated_at = $4 WHERE id = $5",
            )
            .bind(i64::from(attempts))
            .bind(&error)
            .bind(next)
            .bind(now_ms())
            .bind(row.id)
            .execute(p)
            .await
            .map(|_| ()));
            if let Err(err) = result {
                tracing::error!(error = %err, "cannot record a dispatch attempt");
            }
        }
    }

    async fn finish(&self, id: i64, state: &str, error: Option<&str>) {
        let result = with_pool!(self.db, p => sqlx::query(
            "UPDATE dispatch_outbox SET state = $1, attempts = attempts + 1, last_error = COALESCE($2, last_error), updated_at = $3 WHERE id = $4",
        )
        .bind(state)
        .bind(error)
        .bind(now_ms())
        .bind(id)
        .execute(p)
        .await
        .map(|_| ()));
        if let Err(err) = result {
            tracing::error!(error = %err, "cannot mark an outbox row {state}");
        }
    }
}
