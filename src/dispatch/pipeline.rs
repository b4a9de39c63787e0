//! One event's path, in order: idempotency → plugin → recipients →
//! sessions → outcome (and, on failure, the error log).

use std::collections::HashSet;
use std::sync::Arc;

use tracing::Instrument;

use crate::db::Db;
use crate::errlog::ErrorLog;
use crate::failure::{ErrorCode, Failure, Trace};
use crate::ids::UserId;
use crate::plugin::{Audience, Event, Plugins};
use crate::session::{EventFrame as ClientFrame, Sessions};
use crate::telemetry::Metrics;
use crate::with_pool;

use super::frame::{Echo, EventFrame, Outcome};
use super::idempotency::{Begin, Outcomes};
use super::members::Members;
use super::order::Turn;

/// Who a resolved delivery goes to.
enum Recipients {
    Users(Vec<UserId>),
    /// A channel's members, shared with the membership cache.
    Members(Arc<[UserId]>),
    Everyone,
}

/// Everything an event needs; shared by every dispatch connection.
pub struct Pipeline {
    pub plugins: Plugins,
    pub sessions: Sessions,
    /// The read-write pool, for the host's own lookups (user existence);
    /// plugins query through their own read-only pool.
    pub db: Db,
    pub members: Members,
    pub outcomes: Outcomes,
    pub errlog: ErrorLog,
    pub metrics: Arc<Metrics>,
}

impl Pipeline {
    /// Runs one event to its outcome. `turn` orders its fan-out after the
    /// previous event on the same channel from the same connection.
    pub async fn run(&self, ev: &EventFrame, turn: Turn) -> Outcome {
        let key = ev.event_id.key();
        let span = tracing::info_span!("event", event_id = %key, t = %ev.t);
        async {
            let outcome = match self.outcomes.begin(&key).await {
                Ok(Begin::Duplicate) => {
                    self.metrics.duplicates.inc();
                    Outcome::Success { duplicate: true }
                }
                Ok(Begin::Wait(first)) => self.wait_for_first(first).await,
                Ok(Begin::Run(ticket)) => {
                    let outcome = match self.execute(ev, &key, turn).await {
                        Ok(reached) => {
                            tracing::debug!(reached, "event delivered");
                            Outcome::Success { duplicate: false }
                        }
                        Err(failure) => {
                            self.log_failure(ev.t.as_str(), &ev.event_id, ev.s.as_ref(), Some(ev.d.get()), &failure)
                                .await;
                            Outcome::Failed(failure)
                        }
                    };
                    if let Err(err) = ticket.finish(&outcome).await {
                        // Delivered, but a retry may deliver again: say so loudly.
                        tracing::error!(error = %err, "cannot record the event's success; a retry would broadcast it again");
                    }
                    outcome
                }
                Err(err) => {
                    let failure = Failure::new(ErrorCode::DbError, "cannot check the event id for duplicates")
                        .with_trace(Trace {
                            chain: vec!["idempotency lookup failed".into(), err.to_string()],
                            ..Trace::default()
                        });
                    self.log_failure(ev.t.as_str(), &ev.event_id, ev.s.as_ref(), Some(ev.d.get()), &failure)
                        .await;
                    Outcome::Failed(failure)
                }
            };
            self.count(&ev.t, &outcome);
            outcome
        }
        .instrument(span)
        .await
    }

    /// Fails an event whose frame was malformed but whose id could be read:
    /// logged once per id like any other failure.
    pub async fn reject(
        &self,
        event_id: &Echo,
        s: Option<&Echo>,
        t: Option<&str>,
        reason: &str,
    ) -> Outcome {
        let failure = Failure::new(ErrorCode::BadEvent, reason);
        self.log_failure(t.unwrap_or(""), event_id, s, None, &failure)
            .await;
        self.metrics
            .event_outcome("invalid", ErrorCode::BadEvent.as_str());
        Outcome::Failed(failure)
    }

    async fn wait_for_first(
        &self,
        mut first: tokio::sync::watch::Receiver<Option<Outcome>>,
    ) -> Outcome {
        match first.wait_for(Option::is_some).await {
            Ok(outcome) => match outcome.as_ref() {
                Some(Outcome::Success { .. }) => {
                    self.metrics.duplicates.inc();
                    Outcome::Success { duplicate: true }
                }
                Some(failed) => failed.clone(),
                None => abandoned(),
            },
            Err(_) => abandoned(),
        }
    }

    /// The event proper: plugin, recipients, fan-out. Returns how many
    /// sessions were reached.
    async fn execute(&self, ev: &EventFrame, key: &str, mut turn: Turn) -> Result<usize, Failure> {
        let deliveries = self
            .plugins
            .handle(&Event {
                name: &ev.t,
                id: key,
                data: ev.d.get(),
            })
            .await?;
        let mut resolved = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let to = self.recipients(delivery.audience).await?;
            resolved.push((
                Arc::new(ClientFrame::new(&delivery.event, &delivery.payload)),
                to,
            ));
        }
        // Everything that can fail has; now take our place in the
        // channel's order and hand the frames over.
        turn.wait().await;
        let mut reached = 0;
        for (frame, to) in &resolved {
            reached += match to {
                Recipients::Users(users) => self.sessions.deliver(users, frame),
                Recipients::Members(users) => self.sessions.deliver(users, frame),
                Recipients::Everyone => self.sessions.deliver_all(frame),
            };
        }
        Ok(reached)
    }

    async fn recipients(&self, audience: Audience) -> Result<Recipients, Failure> {
        match audience {
            Audience::Everyone => Ok(Recipients::Everyone),
            Audience::Channel(channel) => self
                .members
                .of(channel)
                .await
                .map(Recipients::Members)
                .map_err(|e| db_failure("cannot read the channel's members", e)),
            Audience::Users(users) => {
                self.check_users_exist(&users).await?;
                Ok(Recipients::Users(users))
            }
        }
    }

    /// A delivery naming a user that doesn't exist is a plugin bug worth
    /// failing loudly. Users with an open session exist, so only the
    /// offline ones cost a lookup.
    async fn check_users_exist(&self, users: &[UserId]) -> Result<(), Failure> {
        let online: HashSet<UserId> = self.sessions.online(users).into_iter().collect();
        let offline: Vec<i64> = users
            .iter()
            .filter(|u| !online.contains(u))
            .map(|u| u.as_i64())
            .collect();
        if offline.is_empty() {
            return Ok(());
        }
        let mut found = HashSet::with_capacity(offline.len());
        for chunk in offline.chunks(256) {
            let rows: Vec<(i64,)> = with_pool!(self.db, p => {
                let mut q = sqlx::QueryBuilder::new("SELECT id FROM users WHERE id IN (");
                let mut list = q.separated(", ");
                for id in chunk {
                    list.push_bind(*id);
                }
                q.push(")");
                q.build_query_as().fetch_all(p).await
            })
            .map_err(|e| db_failure("cannot check the delivery's users", e))?;
            found.extend(rows.into_iter().map(|(id,)| id));
        }
        match offline.iter().find(|id| !found.contains(id)) {
            None => Ok(()),
            Some(missing) => Err(Failure::new(
                ErrorCode::UnknownUser,
                format!("a delivery names user {missing}, who does not exist"),
            )),
        }
    }

    /// Records the failure for the logging server (once per event id).
    async fn log_failure(
        &self,
        t: &str,
        event_id: &Echo,
        s: Option<&Echo>,
        d: Option<&str>,
        failure: &Failure,
    ) {
        tracing::warn!(code = %failure.code, error = %failure.message, "event failed");
        let d: serde_json::Value = d
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or(serde_json::Value::Null);
        let record = serde_json::json!({
            "event_id": event_id,
            "t": t,
            "s": s,
            "d": d,
            "error": { "code": failure.code.as_str(), "message": failure.message },
            "trace": failure.trace,
            "gateway": { "version": env!("CARGO_PKG_VERSION"), "pid": std::process::id() },
            "at": crate::db::rfc3339(crate::db::now_ms()),
        });
        match self.errlog.record(&event_id.key(), &record).await {
            Ok(true) => {}
            Ok(false) => tracing::debug!("failure already logged for this event id"),
            Err(err) => {
                tracing::error!(error = %err, record = %record, "cannot record the failed event for the logging server")
            }
        }
    }

    fn count(&self, t: &str, outcome: &Outcome) {
        let (event, result) = match outcome {
            Outcome::Success { duplicate: false } => (t, "success"),
            Outcome::Success { duplicate: true } => (t, "duplicate"),
            // Unrouted types come from the backend, not gateway.toml: keep
            // them out of label values.
            Outcome::Failed(f) if f.code == ErrorCode::NoRoute => ("unrouted", "NO_ROUTE"),
            Outcome::Failed(f) => (t, f.code.as_str()),
        };
        self.metrics.event_outcome(event, result);
    }
}

fn db_failure(what: &str, err: sqlx::Error) -> Failure {
    Failure::new(ErrorCode::DbError, what).with_trace(Trace {
        chain: vec![what.to_owned(), err.to_string()],
        ..Trace::default()
    })
}

fn abandoned() -> Outcome {
    Outcome::Failed(Failure::new(
        ErrorCode::Internal,
        "the first attempt with this event id ended without an outcome; retry",
    ))
}
