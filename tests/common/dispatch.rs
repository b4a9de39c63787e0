//! Dispatch-side helpers: a backend's dispatch connection, and rows seeded
//! straight into the test database.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::{DISPATCH_SECRET, Setup, TestDb, WsClient, read_json, test_plugin, try_ws};

/// A setup routing `EVENT_ECHO` to the config echo test plugin, which
/// delivers `CONFIG_ECHO` carrying the event's id to every session.
pub fn echo_setup() -> Setup {
    let mut setup = Setup::sqlite();
    // A generous limit: these tests load a shared machine hard.
    setup.route(
        "EVENT_ECHO",
        &test_plugin("config_echo_plugin"),
        "timeout_ms = 5000",
    );
    setup
}

/// An `EVENT_ECHO` dispatch frame with event id (and `s`) `id`.
pub fn echo_event(id: u64) -> String {
    json!({"t": "EVENT_ECHO", "d": {"channel_id": "1"}, "op": 0, "s": id, "event_id": id.to_string()})
        .to_string()
}

/// A backend's dispatch connection.
pub struct DispatchClient {
    pub ws: WsClient,
}

impl DispatchClient {
    /// Connects with the harness's dispatch secret.
    pub async fn connect(addr: SocketAddr) -> DispatchClient {
        let bearer = format!("Bearer {DISPATCH_SECRET}");
        let ws = try_ws(addr, "/dispatch", &[("Authorization", bearer.as_str())])
            .await
            .unwrap();
        DispatchClient { ws }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    pub async fn send(&mut self, frame: &Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// Sends an event frame in the seed's shape.
    pub async fn event(&mut self, t: &str, d: Value, event_id: Value, s: Value) {
        self.send(&json!({"t": t, "d": d, "op": 0, "s": s, "event_id": event_id}))
            .await;
    }

    /// The next text frame exactly as sent (control frames skipped).
    pub async fn recv_text(&mut self) -> String {
        use futures_util::StreamExt;
        loop {
            let message = tokio::time::timeout(std::time::Duration::from_secs(10), self.ws.next())
                .await
                .expect("no dispatch frame in time")
                .expect("dispatch connection ended")
                .expect("dispatch connection failed");
            if let Message::Text(text) = message {
                return text.to_string();
            }
        }
    }

    /// The next text frame as JSON (control frames skipped).
    pub async fn recv(&mut self) -> Value {
        read_json(&mut self.ws).await
    }

    /// Sends one event and returns its ack.
    pub async fn roundtrip(&mut self, t: &str, d: Value, event_id: Value) -> Value {
        self.event(t, d, event_id, json!("1")).await;
        let ack = self.recv().await;
        assert_eq!(ack["t"], "EVENT_ROUNDTRIP", "{ack}");
        ack
    }

    /// Collects `n` acks keyed by their event id's text.
    pub async fn acks(&mut self, n: usize) -> HashMap<String, Value> {
        let mut acks = HashMap::new();
        while acks.len() < n {
            let ack = self.recv().await;
            assert_eq!(ack["t"], "EVENT_ROUNDTRIP", "{ack}");
            let key = match &ack["event_id"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            acks.insert(key, ack);
        }
        acks
    }

    /// Sends `EVENT_ECHO` for each id and waits for every ack (each must
    /// succeed): the frames are then with every recipient session.
    pub async fn echo(&mut self, ids: std::ops::RangeInclusive<u64>) {
        let n = ids.clone().count();
        for id in ids {
            self.send_text(&echo_event(id)).await;
        }
        for (id, ack) in self.acks(n).await {
            assert_eq!(ack["success"], true, "event {id}: {ack}");
        }
    }

    /// PING, and the PONG's `d`.
    pub async fn ping(&mut self, ts: i64) -> Value {
        self.send(&json!({"op": 1, "t": "PING", "d": {"ts": ts}}))
            .await;
        loop {
            let frame = self.recv().await;
            if frame["t"] == "PONG" {
                return frame["d"].clone();
            }
        }
    }
}

/// Rows written straight into the test database (the gateway must have
/// run its migrations first).
pub struct Seed {
    pool: SeedPool,
}

enum SeedPool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

macro_rules! on_seed {
    ($seed:expr, $p:ident => $body:expr) => {
        match &$seed.pool {
            SeedPool::Sqlite($p) => $body,
            SeedPool::Postgres($p) => $body,
        }
    };
}

impl Seed {
    pub async fn open(setup: &Setup) -> Seed {
        let pool = match &setup.db {
            TestDb::Sqlite(path) => SeedPool::Sqlite(
                sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
                    .await
                    .unwrap(),
            ),
            TestDb::Postgres { .. } => {
                SeedPool::Postgres(sqlx::PgPool::connect(&setup.db.url()).await.unwrap())
            }
        };
        Seed { pool }
    }

    pub async fn user(&self, id: i64, name: &str) {
        on_seed!(self, p => sqlx::query("INSERT INTO users (id, name, created_at) VALUES ($1, $2, '2026-01-01T00:00:00.000Z')")
            .bind(id).bind(name).execute(p).await.map(|_| ())).unwrap();
    }

    pub async fn channel(&self, id: i64, name: &str, members: &[i64]) {
        on_seed!(self, p => sqlx::query("INSERT INTO channels (id, name, created_at) VALUES ($1, $2, '2026-01-01T00:00:00.000Z')")
            .bind(id).bind(name).execute(p).await.map(|_| ())).unwrap();
        for member in members {
            on_seed!(self, p => sqlx::query("INSERT INTO channel_members (channel_id, user_id) VALUES ($1, $2)")
                .bind(id).bind(*member).execute(p).await.map(|_| ())).unwrap();
        }
    }

    /// Runs one statement with no parameters (membership edits and the like).
    pub async fn execute(&self, sql: &'static str) {
        on_seed!(self, p => sqlx::query(sql).execute(p).await.map(|_| ())).unwrap();
    }

    pub async fn message(
        &self,
        id: i64,
        channel: i64,
        author: i64,
        content: &str,
        nonce: Option<&str>,
    ) {
        on_seed!(self, p => sqlx::query("INSERT INTO messages (id, channel_id, author_id, content, nonce, created_at) VALUES ($1, $2, $3, $4, $5, '2026-11-28T00:00:00.000Z')")
            .bind(id).bind(channel).bind(author).bind(content).bind(nonce).execute(p).await.map(|_| ())).unwrap();
    }

    /// `SELECT COUNT(*) …` with `param` bound as `$1`.
    pub async fn count(&self, sql: &'static str, param: &str) -> i64 {
        on_seed!(self, p => sqlx::query_scalar::<_, i64>(sql).bind(param).fetch_one(p).await)
            .unwrap()
    }

    /// Rows in `event_errors` for an event id.
    pub async fn error_rows(&self, event_id: &str) -> i64 {
        on_seed!(self, p => sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM event_errors WHERE event_id = $1")
            .bind(event_id).fetch_one(p).await).unwrap()
    }

    /// The seed's example situation: users 10 (author) and 11, 12 in
    /// channel 1, user 13 outside it, and message 3 in channel 1.
    pub async fn example(&self) {
        self.user(10, "alice").await;
        self.user(11, "bob").await;
        self.user(12, "carol").await;
        self.user(13, "mallory").await;
        self.channel(1, "general", &[10, 11, 12]).await;
        self.message(
            3,
            1,
            10,
            "Hello! This is a message from the Otako client!",
            Some("87654GFGDS7544567FD"),
        )
        .await;
    }
}
