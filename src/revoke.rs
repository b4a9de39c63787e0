//! Token revocation (DESIGN §2): `token revoke --user ID` and
//! `POST /admin/revoke` write one row per user into `token_revocations`;
//! every node reads it at the handshake (a revoked token gets 401) and a
//! watcher polls it to close the user's open sessions with 4004.
//!
//! Tokens carry their issued-at in whole seconds, so a revoke can't tell
//! a token minted earlier in its own second from one minted later: both
//! are refused. A token that should work after a revoke must be issued in
//! a later second.

use std::collections::HashMap;
use std::time::Duration;

use crate::db::{Db, DbError, now_ms};
use crate::ids::UserId;
use crate::session::Sessions;
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;
use crate::{keyed_sql, token, with_conn, with_pool};

/// How often the watcher looks for new revocations: well inside the
/// second DESIGN §2 allows for closing the sessions.
const POLL: Duration = Duration::from_millis(250);
/// How far back each poll looks behind the newest change it has seen:
/// `changed_ms` comes from the writer's clock, and a revoke that commits
/// after a later-stamped one must still be found.
const OVERLAP_MS: i64 = 5_000;

/// Why a revocation could not be recorded or read.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("cannot record the revocation of user {user}: {source}")]
    Write { user: UserId, source: sqlx::Error },
    #[error("cannot read token revocations: {0}")]
    Read(#[from] DbError),
}

/// Whether a token issued at `issued_at` falls under a revocation made in
/// second `revoked_at` (both unix seconds): tokens of the revoke's own
/// second are refused too (see the module doc).
pub fn is_revoked(issued_at: u64, revoked_at: Option<u64>) -> bool {
    revoked_at.is_some_and(|at| issued_at <= at)
}

/// A recorded revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Revoked {
    pub user_id: UserId,
    /// Unix seconds: tokens issued at or before it are refused.
    pub revoked_at: u64,
    /// Whether `users` has the user. Revoked either way: tokens can be
    /// minted for ids the table doesn't hold.
    pub known_user: bool,
}

/// Revokes every token of `user` issued up to now (this second included).
/// A second revoke moves the cut-off forward, never back.
pub async fn revoke(db: &Db, user: UserId) -> Result<Revoked, RevokeError> {
    let now = token::now_s();
    let at = i64::try_from(now).unwrap_or(i64::MAX);
    let changed = now_ms();
    let result = with_conn!(db, c => {
        sqlx::query(
            "INSERT INTO token_revocations (user_id, revoked_at, changed_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id) DO UPDATE SET \
             revoked_at = CASE WHEN excluded.revoked_at > token_revocations.revoked_at \
                 THEN excluded.revoked_at ELSE token_revocations.revoked_at END, \
             changed_ms = excluded.changed_ms",
        )
        .bind(user.as_i64())
        .bind(at)
        .bind(changed)
        .execute(&mut *c)
        .await?;
        let known: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE id = $1")
            .bind(user.as_i64())
            .fetch_one(&mut *c)
            .await?;
        let revoked_at: i64 =
            sqlx::query_scalar("SELECT revoked_at FROM token_revocations WHERE user_id = $1")
                .bind(user.as_i64())
                .fetch_one(&mut *c)
                .await?;
        Ok((known > 0, revoked_at))
    });
    let (known_user, revoked_at) = result.map_err(|source| RevokeError::Write { user, source })?;
    Ok(Revoked {
        user_id: user,
        revoked_at: u64::try_from(revoked_at).unwrap_or(now),
        known_user,
    })
}

/// The user's revocation cut-off, if any: one keyed read (inline on
/// SQLite's read-only handle), made only for tokens whose signature held.
pub async fn revoked_at(reads: &Db, user: UserId) -> Result<Option<u64>, RevokeError> {
    let rows: Vec<(i64,)> = reads
        .read_keyed(
            keyed_sql!(
                "SELECT revoked_at FROM token_revocations WHERE user_id IN",
                "bigint"
            ),
            &[user.as_i64()],
            |row| Ok((row.get(0)?,)),
        )
        .await?;
    Ok(rows.first().map(|(at,)| u64::try_from(*at).unwrap_or(0)))
}

/// Polls `token_revocations` every [`POLL`] for rows changed since the
/// last poll and closes the affected sessions with 4004, until shutdown.
/// Applying a revocation twice is harmless (the sessions it closes are
/// already closing), so the overlap window only costs a re-read.
pub async fn watch(
    reads: Db,
    sessions: Sessions,
    metrics: std::sync::Arc<Metrics>,
    stop: Shutdown,
) {
    let mut since = now_ms() - OVERLAP_MS;
    // (user → changed_ms) already applied within the overlap window, so
    // each revocation is counted once.
    let mut applied: HashMap<UserId, i64> = HashMap::new();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let rows: Result<Vec<(i64, i64, i64)>, sqlx::Error> = with_pool!(reads, p => {
            sqlx::query_as(
                "SELECT user_id, revoked_at, changed_ms FROM token_revocations \
                 WHERE changed_ms > $1",
            )
            .bind(since - OVERLAP_MS)
            .fetch_all(p)
            .await
        });
        let rows = match rows {
            Ok(rows) => {
                if failing {
                    tracing::info!("token revocations readable again");
                    failing = false;
                }
                rows
            }
            Err(err) => {
                if !failing {
                    tracing::warn!(error = %err, "cannot poll token revocations; retrying");
                    failing = true;
                }
                continue;
            }
        };
        for (user, revoked_at, changed_ms) in rows {
            since = since.max(changed_ms);
            let Some(user) = UserId::from_i64(user) else {
                continue;
            };
            if applied.get(&user) == Some(&changed_ms) {
                continue;
            }
            applied.insert(user, changed_ms);
            let closed = sessions.revoke(user, u64::try_from(revoked_at).unwrap_or(0));
            metrics.revocations_applied.inc();
            tracing::info!(user_id = %user, sessions = closed, "token revocation applied");
        }
        applied.retain(|_, changed| *changed > since - OVERLAP_MS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_revokes_own_second_is_revoked() {
        assert!(!is_revoked(100, None));
        assert!(is_revoked(99, Some(100)));
        assert!(is_revoked(100, Some(100)));
        assert!(!is_revoked(101, Some(100)));
    }
}
