//! The backend's SQL. Every message write and its outbox row commit in one
//! transaction: a stored message is always dispatched, and nothing is
//! dispatched that wasn't stored.

use serde_json::{Value, json};

use crate::db::{Db, now_ms, rfc3339};
use crate::ids::{ChannelId, IdGen, MessageId, UserId};
use crate::with_pool;

/// A message joined with its author, as clients see it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MessageRow {
    pub id: i64,
    pub channel_id: i64,
    pub author_id: i64,
    pub author_name: String,
    pub content: String,
    pub nonce: Option<String>,
    pub created_at: String,
    pub edited_at: Option<String>,
}

impl MessageRow {
    /// The message object of DESIGN §7 (plus `edited_timestamp`, which
    /// MESSAGE_UPDATE carries too).
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id.to_string(),
            "channel_id": self.channel_id.to_string(),
            "author": {"id": self.author_id.to_string(), "name": self.author_name},
            "content": self.content,
            "nonce": self.nonce,
            "timestamp": self.created_at,
            "edited_timestamp": self.edited_at,
        })
    }
}

/// Writes the outbox row for an event inside the caller's transaction
/// (a macro so one statement serves both database drivers).
macro_rules! queue_event {
    ($tx:expr, $id:expr, $event_type:expr, $data:expr, $now:expr) => {
        sqlx::query(
            "INSERT INTO dispatch_outbox (id, event_id, event_type, data, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $5)",
        )
        .bind($id.as_i64())
        .bind($id.to_string())
        .bind($event_type)
        .bind($data)
        .bind($now)
        .execute($tx)
        .await?
    };
}

const SELECT_MESSAGE: &str = "SELECT m.id, m.channel_id, m.author_id, u.name AS author_name, m.content, m.nonce, \
     m.created_at, m.edited_at FROM messages m JOIN users u ON u.id = m.author_id";

/// What a message write did.
pub enum Written {
    /// A new message, with its dispatch queued.
    Created(MessageRow),
    /// The same author already posted this nonce in this channel.
    Existing(MessageRow),
}

pub async fn create_user(db: &Db, id: UserId, name: &str) -> Result<(), sqlx::Error> {
    let now = rfc3339(now_ms());
    with_pool!(db, p => sqlx::query("INSERT INTO users (id, name, created_at) VALUES ($1, $2, $3)")
        .bind(id.as_i64())
        .bind(name)
        .bind(&now)
        .execute(p)
        .await
        .map(|_| ()))
}

/// The ids in `ids` that are not users.
pub async fn missing_users(db: &Db, ids: &[UserId]) -> Result<Vec<UserId>, sqlx::Error> {
    let mut missing = Vec::new();
    for id in ids {
        let found: Option<(i64,)> = with_pool!(db, p => sqlx::query_as("SELECT id FROM users WHERE id = $1")
            .bind(id.as_i64())
            .fetch_optional(p)
            .await)?;
        if found.is_none() {
            missing.push(*id);
        }
    }
    Ok(missing)
}

pub async fn create_channel(
    db: &Db,
    id: ChannelId,
    name: &str,
    members: &[UserId],
) -> Result<(), sqlx::Error> {
    let now = rfc3339(now_ms());
    with_pool!(db, p => {
        let mut tx = p.begin().await?;
        sqlx::query("INSERT INTO channels (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(id.as_i64())
            .bind(name)
            .bind(&now)
            .execute(&mut *tx)
            .await?;
        for member in members {
            sqlx::query("INSERT INTO channel_members (channel_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(id.as_i64())
                .bind(member.as_i64())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    })
}

/// A user's name, if the user exists.
pub async fn user_name(db: &Db, id: UserId) -> Result<Option<String>, sqlx::Error> {
    let row: Option<(String,)> = with_pool!(db, p => sqlx::query_as("SELECT name FROM users WHERE id = $1")
        .bind(id.as_i64())
        .fetch_optional(p)
        .await)?;
    Ok(row.map(|(name,)| name))
}

/// The channels `user` is a member of, oldest first, with their members.
pub async fn channels_of(db: &Db, user: UserId) -> Result<Vec<Value>, sqlx::Error> {
    let channels: Vec<(i64, String)> = with_pool!(db, p => sqlx::query_as(
        "SELECT c.id, c.name FROM channels c JOIN channel_members m ON m.channel_id = c.id \
         WHERE m.user_id = $1 ORDER BY c.id"
    )
    .bind(user.as_i64())
    .fetch_all(p)
    .await)?;
    let members: Vec<(i64, i64, String)> = with_pool!(db, p => sqlx::query_as(
        "SELECT m.channel_id, u.id, u.name FROM channel_members m JOIN users u ON u.id = m.user_id \
         WHERE m.channel_id IN (SELECT channel_id FROM channel_members WHERE user_id = $1) ORDER BY u.id"
    )
    .bind(user.as_i64())
    .fetch_all(p)
    .await)?;
    Ok(channels
        .into_iter()
        .map(|(id, name)| {
            let members: Vec<Value> = members
                .iter()
                .filter(|(channel, _, _)| *channel == id)
                .map(|(_, user, name)| json!({"id": user.to_string(), "name": name}))
                .collect();
            json!({"id": id.to_string(), "name": name, "members": members})
        })
        .collect())
}

/// The channel's latest `limit` messages, oldest first.
pub async fn recent_messages(
    db: &Db,
    channel: ChannelId,
    limit: i64,
) -> Result<Vec<MessageRow>, sqlx::Error> {
    let sql = format!("{SELECT_MESSAGE} WHERE m.channel_id = $1 ORDER BY m.id DESC LIMIT $2");
    let mut rows = with_pool!(db, p => sqlx::query_as::<_, MessageRow>(sqlx::AssertSqlSafe(sql.clone()))
        .bind(channel.as_i64())
        .bind(limit)
        .fetch_all(p)
        .await)?;
    rows.reverse();
    Ok(rows)
}

pub async fn channel_exists(db: &Db, id: ChannelId) -> Result<bool, sqlx::Error> {
    let row: Option<(i64,)> = with_pool!(db, p => sqlx::query_as("SELECT id FROM channels WHERE id = $1")
        .bind(id.as_i64())
        .fetch_optional(p)
        .await)?;
    Ok(row.is_some())
}

pub async fn is_member(db: &Db, channel: ChannelId, user: UserId) -> Result<bool, sqlx::Error> {
    let row: Option<(i64,)> = with_pool!(db, p => sqlx::query_as(
        "SELECT user_id FROM channel_members WHERE channel_id = $1 AND user_id = $2"
    )
    .bind(channel.as_i64())
    .bind(user.as_i64())
    .fetch_optional(p)
    .await)?;
    Ok(row.is_some())
}

pub async fn add_member(db: &Db, channel: ChannelId, user: UserId) -> Result<(), sqlx::Error> {
    with_pool!(db, p => sqlx::query(
        "INSERT INTO channel_members (channel_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
    )
    .bind(channel.as_i64())
    .bind(user.as_i64())
    .execute(p)
    .await
    .map(|_| ()))
}

pub async fn get_message(
    db: &Db,
    channel: ChannelId,
    id: MessageId,
) -> Result<Option<MessageRow>, sqlx::Error> {
    let sql = format!("{SELECT_MESSAGE} WHERE m.id = $1 AND m.channel_id = $2");
    with_pool!(db, p => sqlx::query_as::<_, MessageRow>(sqlx::AssertSqlSafe(sql.clone()))
        .bind(id.as_i64())
        .bind(channel.as_i64())
        .fetch_optional(p)
        .await)
}

async fn by_nonce(
    db: &Db,
    channel: ChannelId,
    author: UserId,
    nonce: &str,
) -> Result<Option<MessageRow>, sqlx::Error> {
    let sql =
        format!("{SELECT_MESSAGE} WHERE m.channel_id = $1 AND m.author_id = $2 AND m.nonce = $3");
    with_pool!(db, p => sqlx::query_as::<_, MessageRow>(sqlx::AssertSqlSafe(sql.clone()))
        .bind(channel.as_i64())
        .bind(author.as_i64())
        .bind(nonce)
        .fetch_optional(p)
        .await)
}

/// The outbox row's `d`: the ids the gateway's plugin looks up.
fn event_data(channel: ChannelId, message: MessageId) -> String {
    json!({"id": message.to_string(), "channel_id": channel.to_string()}).to_string()
}

/// Stores a message and queues `EVENT_MESSAGE_CREATE`, unless the nonce
/// was used before by this author in this channel.
pub async fn create_message(
    db: &Db,
    ids: &IdGen,
    channel: ChannelId,
    author: UserId,
    content: &str,
    nonce: Option<&str>,
) -> Result<Written, sqlx::Error> {
    if let Some(nonce) = nonce
        && let Some(existing) = by_nonce(db, channel, author, nonce).await?
    {
        return Ok(Written::Existing(existing));
    }
    let Some(message) = MessageId::new(ids.next().get()) else {
        return Err(sqlx::Error::Protocol("id generator overflow".into()));
    };
    let outbox_id = ids.next();
    let now = now_ms();
    let data = event_data(channel, message);
    let inserted: Result<(), sqlx::Error> = with_pool!(db, p => {
        let mut tx = p.begin().await?;
        sqlx::query("INSERT INTO messages (id, channel_id, author_id, content, nonce, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(message.as_i64())
            .bind(channel.as_i64())
            .bind(author.as_i64())
            .bind(content)
            .bind(nonce)
            .bind(rfc3339(now))
            .execute(&mut *tx)
            .await?;
        queue_event!(&mut *tx, outbox_id, "EVENT_MESSAGE_CREATE", &data, now);
        tx.commit().await
    });
    match inserted {
        Ok(()) => {}
        // Two posts with one nonce raced: the unique index let one win.
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            if let Some(nonce) = nonce
                && let Some(existing) = by_nonce(db, channel, author, nonce).await?
            {
                return Ok(Written::Existing(existing));
            }
            return Err(sqlx::Error::Database(e));
        }
        Err(e) => return Err(e),
    }
    let row = get_message(db, channel, message)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    Ok(Written::Created(row))
}

/// Edits a message's content and queues `EVENT_MESSAGE_UPDATE`.
pub async fn update_message(
    db: &Db,
    ids: &IdGen,
    channel: ChannelId,
    message: MessageId,
    content: &str,
) -> Result<Option<MessageRow>, sqlx::Error> {
    let outbox_id = ids.next();
    let now = now_ms();
    let data = event_data(channel, message);
    let updated: u64 = with_pool!(db, p => {
        let mut tx = p.begin().await?;
        let n = sqlx::query("UPDATE messages SET content = $1, edited_at = $2 WHERE id = $3 AND channel_id = $4")
            .bind(content)
            .bind(rfc3339(now))
            .bind(message.as_i64())
            .bind(channel.as_i64())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n > 0 {
            queue_event!(&mut *tx, outbox_id, "EVENT_MESSAGE_UPDATE", &data, now);
        }
        tx.commit().await.map(|_| n)
    })?;
    if updated == 0 {
        return Ok(None);
    }
    get_message(db, channel, message).await
}

/// Deletes a message and queues `EVENT_MESSAGE_DELETE`; false if absent.
pub async fn delete_message(
    db: &Db,
    ids: &IdGen,
    channel: ChannelId,
    message: MessageId,
) -> Result<bool, sqlx::Error> {
    let outbox_id = ids.next();
    let now = now_ms();
    let data = event_data(channel, message);
    let deleted: u64 = with_pool!(db, p => {
        let mut tx = p.begin().await?;
        let n = sqlx::query("DELETE FROM messages WHERE id = $1 AND channel_id = $2")
            .bind(message.as_i64())
            .bind(channel.as_i64())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n > 0 {
            queue_event!(&mut *tx, outbox_id, "EVENT_MESSAGE_DELETE", &data, now);
        }
        tx.commit().await.map(|_| n)
    })?;
    Ok(deleted > 0)
}
