//! Channel membership for fan-out, cached. A channel's member list is read
//! once and reused until the database says it changed: triggers on
//! `channel_members` bump a per-channel version (migration 0002), so an
//! event costs one single-row read instead of reading every member, and a
//! join or leave by any writer is seen by the very next event.
//!
//! A version read always starts after the request was queued, so no
//! event is answered from a version older than itself. On SQLite it runs
//! in the claim thread's next transaction ([`FreshReads`]), which the
//! event's claim waits for anyway: with a read transaction of its own an
//! event cost 29-30 us of CPU, 23 us without (`bench chat --offline`).
//! Elsewhere reads are grouped ([`Batcher`]): one query serves every
//! pending read.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use crate::db::{Batcher, Db};
use crate::dispatch::claims::FreshReads;
use crate::ids::{ChannelId, IdHash, UserId};
use crate::{keyed_sql, with_pool};

/// Channels kept; past this the cache starts over (cheap, and bounded
/// memory matters more than the hit rate of a huge working set).
const MAX_CACHED: usize = 4096;

/// Channels up to this size are searched by a scan; bigger ones get a set.
const SCAN_MAX: usize = 64;

/// A channel's members (distinct: the table's primary key), listed and,
/// for big channels, hashed, so fan-out can walk the open sessions and
/// ask "member?" when they are fewer than the members.
#[derive(Debug)]
pub struct MemberSet {
    users: Box<[UserId]>,
    set: Option<HashSet<UserId, IdHash>>,
}

impl MemberSet {
    pub fn new(users: Box<[UserId]>) -> MemberSet {
        let set = (users.len() > SCAN_MAX).then(|| users.iter().copied().collect());
        MemberSet { users, set }
    }

    pub fn users(&self) -> &[UserId] {
        &self.users
    }

    pub fn contains(&self, user: &UserId) -> bool {
        match &self.set {
            Some(set) => set.contains(user),
            None => self.users.contains(user),
        }
    }
}

struct Cached {
    version: i64,
    members: Arc<MemberSet>,
}

/// Channel id → its members as of a membership version.
pub struct Members {
    db: Db,
    cache: Mutex<HashMap<ChannelId, Cached>>,
    versions: Versions,
}

/// Where membership versions are read.
enum Versions {
    Fresh(FreshReads),
    Grouped(Batcher<ChannelId, i64>),
}

impl Members {
    /// Versions, read for every event, go through `fresh` where there is
    /// one, else through `reads`, the read-only handle, by a grouped
    /// reader that ends once `Members` is dropped; member lists, read only
    /// when a version moved, through `db`.
    pub fn start(db: Db, reads: Db, fresh: Option<FreshReads>) -> Members {
        let versions = match fresh {
            Some(fresh) => Versions::Fresh(fresh),
            None => Versions::Grouped(Batcher::start(move |channels| {
                let reads = reads.clone();
                async move { read_versions(&reads, channels).await }
            })),
        };
        Members {
            db,
            cache: Mutex::default(),
            versions,
        }
    }

    /// The channel's members, with the membership version they are
    /// labelled with (cluster mode sends the version along, so other
    /// nodes can answer from their own cache).
    pub async fn of(&self, channel: ChannelId) -> Result<(i64, Arc<MemberSet>), sqlx::Error> {
        // The version is read before the list: a change in between leaves
        // the list newer than its label, which only costs a reread later.
        let version = self.version(channel).await?;
        if let Some(hit) = self.cached(channel, version) {
            return Ok((version, hit));
        }
        Ok((version, self.read(channel, version).await?))
    }

    /// The channel's members as of `version` or later: another node
    /// resolved them at `version`, so a cache at least that new answers
    /// without a database round trip (versions only grow).
    pub async fn at_least(
        &self,
        channel: ChannelId,
        version: i64,
    ) -> Result<Arc<MemberSet>, sqlx::Error> {
        if let Some(hit) = self.cached(channel, version) {
            return Ok(hit);
        }
        Ok(self.of(channel).await?.1)
    }

    /// The cached list if its version is `version` or newer.
    fn cached(&self, channel: ChannelId, version: i64) -> Option<Arc<MemberSet>> {
        self.lock()
            .get(&channel)
            .filter(|hit| hit.version >= version)
            .map(|hit| hit.members.clone())
    }

    /// Reads the list and caches it under `version`.
    async fn read(&self, channel: ChannelId, version: i64) -> Result<Arc<MemberSet>, sqlx::Error> {
        let rows: Vec<(i64,)> = with_pool!(self.db, p => sqlx::query_as(
            "SELECT user_id FROM channel_members WHERE channel_id = $1",
        )
        .bind(channel.as_i64())
        .fetch_all(p)
        .await)?;
        let members = Arc::new(MemberSet::new(
            rows.into_iter()
                .filter_map(|(id,)| UserId::from_i64(id))
                .collect(),
        ));
        let mut cache = self.lock();
        if cache.len() >= MAX_CACHED && !cache.contains_key(&channel) {
            cache.clear();
        }
        // A concurrent read may have cached a newer version meanwhile.
        if cache.get(&channel).is_none_or(|old| old.version <= version) {
            cache.insert(
                channel,
                Cached {
                    version,
                    members: members.clone(),
                },
            );
        }
        Ok(members)
    }

    /// 0 for a channel whose membership never changed (it has none).
    async fn version(&self, channel: ChannelId) -> Result<i64, sqlx::Error> {
        match &self.versions {
            Versions::Fresh(fresh) => {
                fresh
                    .run(move |conn| {
                        use rusqlite::OptionalExtension;
                        let version = conn
                            .prepare_cached(
                                "SELECT version FROM channel_member_versions WHERE channel_id = ?1",
                            )?
                            .query_row([channel.as_i64()], |row| row.get(0))
                            .optional()?;
                        Ok(version.unwrap_or(0))
                    })
                    .await
            }
            Versions::Grouped(batcher) => batcher.submit(channel).await,
        }
        .map_err(sqlx::Error::Protocol)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelId, Cached>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Every queued channel's version in one keyed read.
async fn read_versions(reads: &Db, channels: Vec<ChannelId>) -> Result<Vec<i64>, String> {
    let mut keys: Vec<i64> = channels.iter().map(|c| c.as_i64()).collect();
    keys.sort_unstable();
    keys.dedup();
    let found: HashMap<i64, i64> = reads
        .read_keyed(
            keyed_sql!(
                "SELECT channel_id, version FROM channel_member_versions WHERE channel_id IN",
                "bigint"
            ),
            &keys,
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    Ok(channels
        .iter()
        .map(|c| found.get(&c.as_i64()).copied().unwrap_or(0))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(ids: impl Iterator<Item = u64>) -> Box<[UserId]> {
        ids.filter_map(UserId::new).collect()
    }

    #[test]
    fn small_and_big_member_sets_answer_alike() {
        for size in [3, SCAN_MAX, SCAN_MAX + 1, 10_000] {
            let set = MemberSet::new(users((1..=size as u64).map(|n| n * 3)));
            assert_eq!(set.users().len(), size);
            assert_eq!(set.set.is_some(), size > SCAN_MAX, "size {size}");
            for n in 1..=size as u64 {
                let member = UserId::new(n * 3).unwrap();
                assert!(set.contains(&member), "size {size}: {n}");
                let other = UserId::new(n * 3 + 1).unwrap();
                assert!(!set.contains(&other), "size {size}: {n}");
            }
        }
    }
}
