//! Per-event cost of the plugin host: a trivial plugin and the
//! MESSAGE_CREATE handler (two-table lookup on SQLite), each on a reused
//! instance, on a fresh instance per event, and as a native Rust function
//! doing the same work. Plugin minus native is the host's overhead. The
//! same handler in JavaScript and Python shows what a guest language costs.
//! Also the fan-out's serialization: one shared frame with each session's
//! `s` spliced in, against serializing the whole frame per recipient.
//!
//! Run: `cargo bench --bench plugin` (plugins built by
//! `scripts/build-plugins.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use otako_gateway::config::Config;
use otako_gateway::db::{Access, Db, Pool};
use otako_gateway::ids::{ChannelId, UserId};
use otako_gateway::plugin::{Audience, Delivery, Event, Plugins, Presence};
use otako_gateway::telemetry::Metrics;
use serde::Deserialize;

struct Nobody;

impl Presence for Nobody {
    fn online(&self, _: &[UserId]) -> Vec<UserId> {
        Vec::new()
    }
}

const NOOP_D: &str = r#"{"user_id":"42","content":"hello there","nonce":"abc"}"#;
const CREATE_D: &str = r#"{"id":"3","channel_id":"1"}"#;
const LOAD_MESSAGE: &str = "\
    SELECT m.id AS id, m.channel_id AS channel_id, m.author_id AS author_id, \
           u.name AS author_name, m.content AS content, m.nonce AS nonce, \
           m.created_at AS created_at, m.edited_at AS edited_at \
    FROM messages m JOIN users u ON u.id = m.author_id \
    WHERE m.id = $1 AND m.channel_id = $2";

/// What noop_plugin does, natively.
fn native_noop(data: &str) -> Vec<Delivery> {
    #[derive(Deserialize)]
    struct Target {
        user_id: UserId,
    }
    let target: Target = serde_json::from_str(data).unwrap();
    vec![Delivery {
        event: "NOOP".to_owned(),
        payload: data.to_owned(),
        audience: Audience::Users(vec![target.user_id]),
    }]
}

/// What message_create does, natively: same query on the same inline
/// SQLite read path the `query` import uses, same object.
async fn native_message_create(db: &Db, data: &str) -> Vec<Delivery> {
    #[derive(Deserialize)]
    struct MessageRef {
        id: UserId,
        channel_id: ChannelId,
    }
    let r: MessageRef = serde_json::from_str(data).unwrap();
    let ids = [r.id.as_i64(), r.channel_id.as_i64()];
    let deadline = Instant::now() + Duration::from_secs(1);
    let payload = db
        .sqlite_reader()
        .unwrap()
        .read(deadline, move |conn| {
            conn.prepare_cached(LOAD_MESSAGE)?.query_row(ids, |row| {
                Ok(serde_json::json!({
                    "id": row.get::<_, i64>("id")?.to_string(),
                    "channel_id": row.get::<_, i64>("channel_id")?.to_string(),
                    "author": {
                        "id": row.get::<_, i64>("author_id")?.to_string(),
                        "name": row.get::<_, String>("author_name")?,
                    },
                    "content": row.get::<_, String>("content")?,
                    "nonce": row.get::<_, Option<String>>("nonce")?,
                    "timestamp": row.get::<_, String>("created_at")?,
                }))
            })
        })
        .await
        .unwrap();
    vec![Delivery {
        event: "MESSAGE_CREATE".to_owned(),
        payload: payload.to_string(),
        audience: Audience::Channel(r.channel_id),
    }]
}

async fn setup(dir: &Path) -> (Plugins, Db) {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        "[database]\nurl = \"sqlite://{db}\"\n[plugins]\ncache_dir = \"{cache}\"\n\
         [[routes]]\nevent = \"NOOP\"\nplugin = \"{noop}\"\n\
         [[routes]]\nevent = \"EVENT_MESSAGE_CREATE\"\nplugin = \"{create}\"\n\
         [[routes]]\nevent = \"WRITE\"\nplugin = \"{write}\"\n\
         [[routes]]\nevent = \"EVENT_MESSAGE_CREATE_JS\"\nplugin = \"{create_js}\"\n\
         timeout_ms = 1000\nmemory_mb = 64\n\
         [[routes]]\nevent = \"EVENT_MESSAGE_CREATE_PY\"\nplugin = \"{create_py}\"\n\
         timeout_ms = 1000\nmemory_mb = 96\n",
        db = dir.join("otako.db").display(),
        cache = repo.join("target/plugin-bench-cache").display(),
        noop = repo.join("plugins/testing/wasm/noop_plugin.wasm").display(),
        create = repo.join("plugins/message_create.wasm").display(),
        write = repo
            .join("plugins/testing/wasm/write_plugin.wasm")
            .display(),
        create_js = repo.join("plugins/message_create_js.wasm").display(),
        create_py = repo.join("plugins/message_create_py.wasm").display(),
    );
    let config = Config::parse(&text, &dir.join("gateway.toml")).unwrap();
    let rw = Db::open(&config.database.url, 1, Access::ReadWrite)
        .await
        .unwrap();
    rw.migrate().await.unwrap();
    let Pool::Sqlite(pool) = rw.pool() else {
        unreachable!()
    };
    for sql in [
        "INSERT INTO users (id, name, created_at) VALUES (2, 'alice', '2026-01-01T00:00:00.000Z')",
        "INSERT INTO channels (id, name, created_at) VALUES (1, 'general', '2026-01-01T00:00:00.000Z')",
        "INSERT INTO messages (id, channel_id, author_id, content, nonce, created_at) \
         VALUES (3, 1, 2, 'hello world', 'n-1', '2026-02-03T04:05:06.007Z')",
    ] {
        sqlx::query(sql).execute(pool).await.unwrap();
    }
    rw.close().await;
    let ro = Db::open(&config.database.url, 4, Access::ReadOnly)
        .await
        .unwrap();
    let plugins = Plugins::load(&config, ro.clone(), Arc::new(Nobody), Metrics::new())
        .await
        .unwrap();
    (plugins, ro)
}

fn bench(c: &mut Criterion) {
    // The gateway's own runtime flavour: database round trips cost what
    // they cost in production (cross-thread wake-ups included).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (plugins, db) = rt.block_on(setup(dir.path()));
    let noop = Event {
        name: "NOOP",
        id: "1",
        data: NOOP_D,
        arrived: Instant::now(),
    };
    let create = Event {
        name: "EVENT_MESSAGE_CREATE",
        id: "1",
        data: CREATE_D,
        arrived: Instant::now(),
    };

    let mut group = c.benchmark_group("noop");
    group.bench_function("plugin_reused_instance", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(plugins.handle(&noop).await.unwrap()) })
    });
    group.bench_function("plugin_fresh_instance", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(plugins.handle_on_fresh_instance(&noop).await.unwrap()) })
    });
    group.bench_function("native", |b| {
        b.iter(|| black_box(native_noop(black_box(NOOP_D))))
    });
    group.finish();

    let mut group = c.benchmark_group("message_create_sqlite");
    group.bench_function("plugin_reused_instance", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(plugins.handle(&create).await.unwrap()) })
    });
    group.bench_function("plugin_fresh_instance", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(plugins.handle_on_fresh_instance(&create).await.unwrap()) })
    });
    group.bench_function("native", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(native_message_create(&db, CREATE_D).await) })
    });
    // A trivial plugin doing the same query (SQL from `d`, rows only
    // counted): what one database round trip costs inside a call.
    let wd = serde_json::json!({ "sql": LOAD_MESSAGE.replace("$1", "3").replace("$2", "1") })
        .to_string();
    let write = Event {
        name: "WRITE",
        id: "1",
        data: &wd,
        arrived: Instant::now(),
    };
    group.bench_function("write_plugin_query", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(plugins.handle(&write).await.unwrap()) })
    });
    // The host's query path alone, no plugin: the database share.
    group.bench_function("host_query_only", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(otako_gateway::plugin::bench_query(&db, LOAD_MESSAGE, &[3, 1]).await)
        })
    });
    group.finish();

    // The same handler in each guest language (the Rust one is above).
    let mut group = c.benchmark_group("message_create_by_language");
    for (lang, name) in [
        ("js", "EVENT_MESSAGE_CREATE_JS"),
        ("python", "EVENT_MESSAGE_CREATE_PY"),
    ] {
        let event = Event {
            name,
            id: "1",
            data: CREATE_D,
            arrived: Instant::now(),
        };
        group.bench_function(format!("{lang}_reused_instance"), |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(plugins.handle(&event).await.unwrap()) })
        });
        group.bench_function(format!("{lang}_fresh_instance"), |b| {
            b.to_async(&rt).iter(|| async {
                black_box(plugins.handle_on_fresh_instance(&event).await.unwrap())
            })
        });
    }
    group.finish();
}

/// A MESSAGE_CREATE payload as the plugin returns it.
const MESSAGE: &str = r#"{"id":"3","channel_id":"1","author":{"id":"10","name":"alice"},"content":"Hello! This is a message from the Otako client!","nonce":"87654GFGDS7544567FD","timestamp":"2026-11-28T00:00:00.000Z"}"#;

/// Frames for 1,000 recipients: what one event's fan-out serializes.
fn serialization(c: &mut Criterion) {
    use otako_gateway::session::ClientFrame;
    const RECIPIENTS: u64 = 1000;
    let mut group = c.benchmark_group("fanout_1000_frames");
    // As sessions write: each recipient's WebSocket frame, with its own
    // `s`, appended to that session's (reused) write buffer.
    group.bench_function("shared_frame_splice_s", |b| {
        let mut out = Vec::new();
        b.iter(|| {
            let frame = ClientFrame::new("MESSAGE_CREATE", black_box(MESSAGE));
            let mut bytes = 0;
            for seq in 1..=RECIPIENTS {
                out.clear();
                frame.encode_ws(seq, &mut out);
                bytes += out.len();
            }
            black_box(bytes)
        })
    });
    group.bench_function("serde_per_recipient", |b| {
        let d: serde_json::Value = serde_json::from_str(MESSAGE).unwrap();
        b.iter(|| {
            let mut bytes = 0;
            for seq in 1..=RECIPIENTS {
                let frame = serde_json::json!({"op": 0, "t": "MESSAGE_CREATE", "s": seq, "d": &d});
                bytes += serde_json::to_string(&frame).unwrap().len();
            }
            black_box(bytes)
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = bench, serialization
}
criterion_main!(benches);
