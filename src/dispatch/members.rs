//! Channel membership for fan-out, cached. A channel's member list is read
//! once and reused until the database says it changed: triggers on
//! `channel_members` bump a per-channel version (migration 0002), so an
//! event costs one single-row read instead of reading every member, and a
//! join or leave by any writer is seen by the very next event.
//!
//! Version reads are grouped like the idempotency writes: one task serves
//! every pending read in one query. A read always starts after the request
//! was queued, so no event is answered from a version older than itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, oneshot};

use crate::db::{Db, DbError};
use crate::ids::{ChannelId, UserId};
use crate::with_pool;

/// Channels kept; past this the cache starts over (cheap, and bounded
/// memory matters more than the hit rate of a huge working set).
const MAX_CACHED: usize = 4096;
/// Most version requests one query serves.
const GROUP_MAX: usize = 512;
/// Channel ids per `IN (…)` list, well under SQLite's parameter limit.
const CHUNK: usize = 256;

type VersionReply = oneshot::Sender<Result<i64, String>>;

struct Cached {
    version: i64,
    users: Arc<[UserId]>,
}

/// Channel id → its members as of a membership version.
pub struct Members {
    db: Db,
    cache: Mutex<HashMap<ChannelId, Cached>>,
    versions: mpsc::Sender<(ChannelId, VersionReply)>,
}

impl Members {
    /// Starts the version reader; it ends once `Members` is dropped.
    /// Versions, read for every event, go through `reads`, the read-only
    /// handle (inline on SQLite); member lists, read only when a version
    /// moved, through `db`.
    pub fn start(db: Db, reads: Db) -> Members {
        let (versions, rx) = mpsc::channel(4096);
        tokio::spawn(version_reader(reads, rx));
        Members {
            db,
            cache: Mutex::default(),
            versions,
        }
    }

    /// The channel's members (distinct: the table's primary key).
    pub async fn of(&self, channel: ChannelId) -> Result<Arc<[UserId]>, sqlx::Error> {
        // The version is read before the list: a change in between leaves
        // the list newer than its label, which only costs a reread later.
        let version = self.version(channel).await?;
        if let Some(hit) = self.lock().get(&channel)
            && hit.version == version
        {
            return Ok(hit.users.clone());
        }
        let rows: Vec<(i64,)> = with_pool!(self.db, p => sqlx::query_as(
            "SELECT user_id FROM channel_members WHERE channel_id = $1",
        )
        .bind(channel.as_i64())
        .fetch_all(p)
        .await)?;
        let users: Arc<[UserId]> = rows
            .into_iter()
            .filter_map(|(id,)| UserId::from_i64(id))
            .collect();
        let mut cache = self.lock();
        if cache.len() >= MAX_CACHED && !cache.contains_key(&channel) {
            cache.clear();
        }
        cache.insert(
            channel,
            Cached {
                version,
                users: users.clone(),
            },
        );
        Ok(users)
    }

    /// 0 for a channel whose membership never changed (it has none).
    async fn version(&self, channel: ChannelId) -> Result<i64, sqlx::Error> {
        let closed = || sqlx::Error::PoolClosed;
        let (tx, rx) = oneshot::channel();
        self.versions
            .send((channel, tx))
            .await
            .map_err(|_| closed())?;
        rx.await
            .map_err(|_| closed())?
            .map_err(sqlx::Error::Protocol)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelId, Cached>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Answers every queued version request with one query per round.
async fn version_reader(db: Db, mut rx: mpsc::Receiver<(ChannelId, VersionReply)>) {
    let mut batch = Vec::with_capacity(GROUP_MAX);
    while rx.recv_many(&mut batch, GROUP_MAX).await > 0 {
        let mut channels: Vec<i64> = batch.iter().map(|(c, _)| c.as_i64()).collect();
        channels.sort_unstable();
        channels.dedup();
        match read_versions(&db, &channels).await {
            Ok(found) => {
                for (channel, tx) in batch.drain(..) {
                    let _ = tx.send(Ok(found.get(&channel.as_i64()).copied().unwrap_or(0)));
                }
            }
            Err(err) => {
                let err = err.to_string();
                for (_, tx) in batch.drain(..) {
                    let _ = tx.send(Err(err.clone()));
                }
            }
        }
    }
}

async fn read_versions(db: &Db, channels: &[i64]) -> Result<HashMap<i64, i64>, DbError> {
    if let Some(reader) = db.sqlite_reader() {
        let found = reader
            .read_keyed(
                "SELECT channel_id, version FROM channel_member_versions \
                 WHERE channel_id IN (SELECT value FROM json_each(?1))",
                channels,
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .await?;
        return Ok(found.into_iter().collect());
    }
    let mut found = HashMap::with_capacity(channels.len());
    for chunk in channels.chunks(CHUNK) {
        let rows: Vec<(i64, i64)> = with_pool!(db, p => {
            let mut q = sqlx::QueryBuilder::new(
                "SELECT channel_id, version FROM channel_member_versions WHERE channel_id IN (",
            );
            let mut list = q.separated(", ");
            for id in chunk {
                list.push_bind(*id);
            }
            q.push(")");
            q.build_query_as().fetch_all(p).await
        })?;
        found.extend(rows);
    }
    Ok(found)
}
