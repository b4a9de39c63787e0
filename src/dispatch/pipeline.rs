//! One event's path, start to outcome: claim → plugin → recipients →
//! (claim durable, channel's turn) → fan-out → outcome. Every event with a
//! readable `event_id`, well-formed or not, goes through [`Pipeline::run`]
//! and leaves with exactly one [`Outcome`], from which the ack is written.

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tracing::Instrument;

use crate::db::Db;
use crate::errlog::ErrorLog;
use crate::failure::{ErrorCode, Failure, Trace};
use crate::ids::{ChannelId, UserId};
use crate::keyed_sql;
use crate::plugin::{Audience, Event, Plugins};
use crate::session::{ClientFrame, Sessions};
use crate::telemetry::Metrics;

use super::claims::{Attempt, Begin, Claim, Claimed, Claims};
use super::frame::{Body, DispatchEvent, Outcome};
use super::members::{MemberSet, Members};
use super::order::Turn;

/// Who a resolved delivery goes to.
pub enum Recipients {
    Users(Vec<UserId>),
    /// A channel's members as of membership `version`, shared with the
    /// membership cache.
    Members {
        channel: ChannelId,
        version: i64,
        members: Arc<MemberSet>,
    },
    Everyone,
}

impl Recipients {
    /// Hands `frame` to this node's sessions of these recipients; never
    /// waits on a socket. Returns how many sessions were reached.
    pub fn deliver(&self, sessions: &Sessions, frame: &Arc<ClientFrame>) -> usize {
        match self {
            Recipients::Users(users) => sessions.deliver(users, frame),
            Recipients::Members { members, .. } => {
                sessions.deliver_members(members.users(), |u| members.contains(u), frame)
            }
            Recipients::Everyone => sessions.deliver_all(frame),
        }
    }
}

/// One event's deliveries, resolved: each frame serialized once.
pub type Deliveries = [(Arc<ClientFrame>, Recipients)];

/// What [`Fanout::fan_out`] leaves to wait for: the confirmation that
/// the deliveries are handed on (sessions reached, or deliveries
/// published), or why they are not.
pub type Confirm = BoxFuture<'static, Result<usize, Failure>>;

/// Hands an event's deliveries to their recipients: the local sessions
/// on one node; in cluster mode the bus to every node (`cluster::Bus`).
pub trait Fanout: Send + Sync {
    /// Starts handing `deliveries` of event `key` on, in order. Runs
    /// inside the channel's turn, so it only starts the work: the next
    /// event on the channel may start as soon as this resolves, and the
    /// returned [`Confirm`] is awaited outside the turn, so events
    /// pipeline instead of paying one round trip each.
    fn fan_out<'a>(
        &'a self,
        key: &'a str,
        deliveries: &'a Deliveries,
    ) -> BoxFuture<'a, Result<Confirm, Failure>>;
}

impl Fanout for Sessions {
    fn fan_out<'a>(
        &'a self,
        _key: &'a str,
        deliveries: &'a Deliveries,
    ) -> BoxFuture<'a, Result<Confirm, Failure>> {
        let reached = deliveries
            .iter()
            .map(|(frame, to)| to.deliver(self, frame))
            .sum();
        let done: Confirm = Box::pin(std::future::ready(Ok(reached)));
        Box::pin(std::future::ready(Ok(done)))
    }
}

/// Everything an event needs; shared by every dispatch connection.
pub struct Pipeline {
    pub plugins: Plugins,
    pub sessions: Sessions,
    pub fanout: Arc<dyn Fanout>,
    /// The read-only handle, for the host's own lookups (user existence).
    pub reads: Db,
    pub members: Arc<Members>,
    pub claims: Claims,
    pub errlog: ErrorLog,
    pub metrics: Arc<Metrics>,
}

impl Pipeline {
    /// Runs one event to its outcome. `turn` orders its fan-out after the
    /// previous event on the same channel from the same connection.
    pub async fn run(&self, ev: &DispatchEvent, turn: Turn) -> Outcome {
        let span = tracing::info_span!("event", event_id = %ev.key, t = %ev.t);
        async {
            let outcome = match self.claims.begin(&ev.key) {
                Begin::Duplicate => Outcome::Success { duplicate: true },
                Begin::Wait(first) => wait_for_first(first).await,
                Begin::Run(claim) => self.attempt(ev, claim, turn).await,
            };
            self.count(ev, &outcome);
            outcome
        }
        .instrument(span)
        .await
    }

    /// The first attempt at an id in this process.
    async fn attempt(&self, ev: &DispatchEvent, claim: Claim, turn: Turn) -> Outcome {
        let result = match &ev.body {
            Ok(body) => self.deliver(ev, body, &claim, turn).await,
            Err(why) => Err((Failure::new(ErrorCode::BadEvent, why.clone()), false)),
        };
        match result {
            Ok(Claimed::New) => {
                claim.delivered(true);
                Outcome::Success { duplicate: false }
            }
            Ok(claimed) => {
                if claimed == Claimed::Abandoned {
                    tracing::warn!(
                        "event id claimed by an attempt that never finished (its process stopped); \
                         acked as a duplicate, not broadcast again"
                    );
                }
                claim.delivered(false);
                Outcome::Success { duplicate: true }
            }
            // Boxed: these rare paths' database futures are most of
            // the event's state machine (~10 KB inline), which every
            // event's task would otherwise carry and copy.
            Err((failure, held)) => {
                let failure = Box::pin(self.log_failure(ev, failure)).await;
                let outcome = Outcome::Failed(failure);
                if let Err(err) = Box::pin(claim.failed(&outcome, held)).await {
                    tracing::error!(error = %err, "cannot release the failed event's claim; it is retried in this process only");
                }
                outcome
            }
        }
    }

    /// Plugin and recipients run while the claim commits; frames go out
    /// only once the claim is durable and the channel's previous event has
    /// started its fan-out; the event succeeds once the fan-out is
    /// confirmed. The error carries whether the claim is held.
    async fn deliver(
        &self,
        ev: &DispatchEvent,
        body: &Body,
        claim: &Claim,
        mut turn: Turn,
    ) -> Result<Claimed, (Failure, bool)> {
        let (claimed, resolved) = tokio::join!(claim.commit(), self.resolve(ev, body));
        let claimed =
            claimed.map_err(|err| (db_failure("cannot claim the event id", &err), false))?;
        if claimed != Claimed::New {
            return Ok(claimed);
        }
        let resolved = resolved.map_err(|failure| (failure, true))?;
        turn.wait().await;
        let started = self.fanout.fan_out(&ev.key, &resolved).await;
        // Order is fixed once the fan-out has started: the channel's next
        // event may go while this one's confirmation is awaited.
        drop(turn);
        let reached = started
            .map_err(|failure| (failure, true))?
            .await
            .map_err(|failure| (failure, true))?;
        tracing::debug!(reached, "event delivered");
        crate::failpoint::hit("dispatch-after-fanout");
        Ok(Claimed::New)
    }

    /// The plugin's deliveries with their recipients resolved.
    async fn resolve(
        &self,
        ev: &DispatchEvent,
        body: &Body,
    ) -> Result<Vec<(Arc<ClientFrame>, Recipients)>, Failure> {
        let deliveries = self
            .plugins
            .handle(&Event {
                name: &ev.t,
                id: &ev.event_id.text(),
                data: body.d.get(),
                arrived: ev.arrived,
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
        Ok(resolved)
    }

    async fn recipients(&self, audience: Audience) -> Result<Recipients, Failure> {
        match audience {
            Audience::Everyone => Ok(Recipients::Everyone),
            Audience::Channel(channel) => self
                .members
                .of(channel)
                .await
                .map(|(version, members)| Recipients::Members {
                    channel,
                    version,
                    members,
                })
                .map_err(|e| db_failure("cannot read the channel's members", &e)),
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
        let found: HashSet<i64> = self
            .reads
            .read_keyed(
                keyed_sql!("SELECT id FROM users WHERE id IN", "bigint"),
                &offline,
                |row| Ok((row.get(0)?,)),
            )
            .await
            .map_err(|e| db_failure("cannot check the delivery's users", &e))?
            .into_iter()
            .map(|(id,): (i64,)| id)
            .collect();
        match offline.iter().find(|id| !found.contains(id)) {
            None => Ok(()),
            Some(missing) => Err(Failure::new(
                ErrorCode::UnknownUser,
                format!("a delivery names user {missing}, who does not exist"),
            )),
        }
    }

    /// Records the failure for the logging server (once per event id)
    /// before its ack goes out. If the record can't be written, the ack
    /// says so (`DB_ERROR`) and the event stays retryable.
    async fn log_failure(&self, ev: &DispatchEvent, failure: Failure) -> Failure {
        tracing::warn!(code = %failure.code, error = %failure.message, "event failed");
        let d: serde_json::Value = ev
            .body
            .as_ref()
            .ok()
            .and_then(|b| serde_json::from_str(b.d.get()).ok())
            .unwrap_or(serde_json::Value::Null);
        let record = serde_json::json!({
            "event_id": ev.event_id,
            "t": ev.t,
            "s": ev.s,
            "d": d,
            "error": { "code": failure.code.as_str(), "message": failure.message },
            "trace": failure.trace,
            "gateway": { "version": env!("CARGO_PKG_VERSION"), "pid": std::process::id() },
            "at": crate::db::rfc3339(crate::db::now_ms()),
        });
        match self.errlog.record(&ev.key, &record).await {
            Ok(true) => failure,
            Ok(false) => {
                tracing::debug!("failure already logged for this event id");
                failure
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot record the failed event for the logging server");
                let mut chain = vec![
                    "cannot record the failure for the logging server".to_owned(),
                    err.to_string(),
                ];
                chain.extend(failure.trace.chain.iter().cloned());
                Failure::new(
                    ErrorCode::DbError,
                    format!(
                        "{} (and the failure could not be recorded: retry)",
                        failure.message
                    ),
                )
                .with_trace(Trace {
                    chain,
                    ..failure.trace
                })
            }
        }
    }

    fn count(&self, ev: &DispatchEvent, outcome: &Outcome) {
        let t = if ev.body.is_ok() {
            ev.t.as_str()
        } else {
            "invalid"
        };
        let (event, result) = match outcome {
            Outcome::Success { duplicate: false } => (t, "success"),
            Outcome::Success { duplicate: true } => {
                self.metrics.duplicates.inc();
                (t, "duplicate")
            }
            // Unrouted types come from the backend, not gateway.toml: keep
            // them out of label values.
            Outcome::Failed(f) if f.code == ErrorCode::NoRoute => ("unrouted", "NO_ROUTE"),
            Outcome::Failed(f) => (t, f.code.as_str()),
        };
        self.metrics.event_outcome(event, result);
    }
}

async fn wait_for_first(first: Arc<Attempt>) -> Outcome {
    match first.outcome().await {
        Some(Outcome::Success { .. }) => Outcome::Success { duplicate: true },
        Some(failed) => failed,
        None => Outcome::Failed(Failure::new(
            ErrorCode::Internal,
            "the first attempt with this event id ended without an outcome; retry",
        )),
    }
}

fn db_failure(what: &str, err: &dyn std::fmt::Display) -> Failure {
    Failure::new(ErrorCode::DbError, what).with_trace(Trace {
        chain: vec![what.to_owned(), err.to_string()],
        ..Trace::default()
    })
}
