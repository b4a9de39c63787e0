//! The plugin host, in process: real plugins (the shipped handlers and the
//! misbehaving test plugins) against a real SQLite file or PostgreSQL
//! schema, loaded from a config parsed from TOML text.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Setup, plugin, plugin_cache, test_plugin};
use otako_gateway::config::Config;
use otako_gateway::db::{Access, Db};
use otako_gateway::failure::{ErrorCode, Failure};
use otako_gateway::ids::{ChannelId, UserId};
use otako_gateway::plugin::{Audience, Delivery, Event, Plugins, Presence};
use otako_gateway::telemetry::Metrics;
use otako_gateway::with_pool;
use serde_json::{Value, json};

/// Users 5 and 6 are online.
struct Online(HashSet<UserId>);

impl Presence for Online {
    fn online(&self, users: &[UserId]) -> Vec<UserId> {
        users
            .iter()
            .copied()
            .filter(|u| self.0.contains(u))
            .collect()
    }
}

fn online() -> Arc<dyn Presence> {
    Arc::new(Online(
        [5, 6]
            .into_iter()
            .map(|u| UserId::new(u).unwrap())
            .collect(),
    ))
}

/// A loaded plugin host plus a writable pool for test data.
struct Host {
    plugins: Plugins,
    rw: Db,
    config: Config,
    setup: Setup,
}

impl Host {
    async fn handle(&self, name: &str, id: &str, data: &str) -> Result<Vec<Delivery>, Failure> {
        self.plugins
            .handle(&Event {
                name,
                id,
                data,
                arrived: Instant::now(),
            })
            .await
    }

    async fn ok(&self, name: &str, data: &str) -> Vec<Delivery> {
        match self.handle(name, "ev-ok", data).await {
            Ok(d) => d,
            Err(f) => panic!("{name} failed: {f} {:?}", f.trace),
        }
    }

    async fn fail(&self, name: &str, data: &str) -> Failure {
        match self.handle(name, "ev-fail", data).await {
            Ok(d) => panic!("{name} succeeded: {d:?}"),
            Err(f) => f,
        }
    }

    /// The noop route answers: the host serves normally after a failure.
    async fn still_serves(&self) {
        let out = self.ok("NOOP", r#"{"user_id":"42","x":[1,2]}"#).await;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].event, "NOOP");
        assert_eq!(out[0].payload, r#"{"user_id":"42","x":[1,2]}"#);
        assert_eq!(
            out[0].audience,
            Audience::Users(vec![UserId::new(42).unwrap()])
        );
    }

    async fn exec(&self, sql: &'static str, binds: &[&str]) {
        with_pool!(self.rw, p => {
            let mut q = sqlx::query(sql);
            for b in binds {
                q = q.bind(*b);
            }
            q.execute(p).await.unwrap();
        });
    }

    async fn count_users(&self, id: i64) -> i64 {
        with_pool!(self.rw, p => sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM users WHERE id = $1")
            .bind(id)
            .fetch_one(p)
            .await
            .unwrap())
    }
}

/// Loads plugins from `setup`'s config (routes plus `noop` on `NOOP`),
/// with migrations applied and users/channel/messages seeded.
async fn host(mut setup: Setup) -> Host {
    setup.route("NOOP", &test_plugin("noop_plugin"), "");
    if !setup.config_text().contains("cache_dir") {
        setup.set("plugins", "cache_dir", &format!("\"{}\"", plugin_cache()));
    }
    let config = Config::parse(&setup.config_text(), &setup.config_path()).unwrap();
    let rw = Db::open(&config.database.url, 2, Access::ReadWrite)
        .await
        .unwrap();
    rw.migrate().await.unwrap();
    let ro = Db::open(&config.database.url, 2, Access::ReadOnly)
        .await
        .unwrap();
    let plugins = Plugins::load(&config, ro, online(), Metrics::new())
        .await
        .unwrap_or_else(|e| panic!("load: {e}"));
    let host = Host {
        plugins,
        rw,
        config,
        setup,
    };
    seed(&host).await;
    host
}

async fn seed(host: &Host) {
    host.exec(
        "INSERT INTO users (id, name, created_at) VALUES (2, 'alice', '2026-01-01T00:00:00.000Z'), (3, 'bob', '2026-01-01T00:00:00.000Z')",
        &[],
    )
    .await;
    host.exec(
        "INSERT INTO channels (id, name, created_at) VALUES (1, 'general', '2026-01-01T00:00:00.000Z'), (9, 'other', '2026-01-01T00:00:00.000Z')",
        &[],
    )
    .await;
    host.exec(
        "INSERT INTO channel_members (channel_id, user_id) VALUES (1, 2), (1, 3)",
        &[],
    )
    .await;
    host.exec(
        "INSERT INTO messages (id, channel_id, author_id, content, nonce, created_at, edited_at) VALUES \
         (3, 1, 2, 'hello \"world\" ✓', 'n-1', '2026-02-03T04:05:06.007Z', NULL), \
         (4, 1, 3, 'edited', NULL, '2026-02-03T04:05:07.000Z', '2026-02-03T05:00:00.000Z')",
        &[],
    )
    .await;
}

fn payload(delivery: &Delivery) -> Value {
    serde_json::from_str(&delivery.payload).unwrap()
}

fn channel(id: u64) -> Audience {
    Audience::Channel(ChannelId::new(id).unwrap())
}

// ---- the real handlers ------------------------------------------------

async fn message_handlers(setup: Setup) {
    let mut setup = setup;
    setup.message_routes();
    let host = host(setup).await;

    let out = host
        .ok("EVENT_MESSAGE_CREATE", r#"{"id":"3","channel_id":"1"}"#)
        .await;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].event, "MESSAGE_CREATE");
    assert_eq!(out[0].audience, channel(1));
    let m = payload(&out[0]);
    assert_eq!(m["id"], "3");
    assert_eq!(m["channel_id"], "1");
    assert_eq!(m["author"]["id"], "2");
    assert_eq!(m["author"]["name"], "alice");
    assert_eq!(m["content"], "hello \"world\" ✓");
    assert_eq!(m["nonce"], "n-1");
    assert_eq!(m["timestamp"], "2026-02-03T04:05:06.007Z");
    assert_eq!(m.as_object().unwrap().len(), 6, "{m}");

    // Integer ids in `d` work too; a null nonce is null.
    let out = host
        .ok("EVENT_MESSAGE_UPDATE", r#"{"id":4,"channel_id":1}"#)
        .await;
    assert_eq!(out[0].event, "MESSAGE_UPDATE");
    assert_eq!(out[0].audience, channel(1));
    let m = payload(&out[0]);
    assert_eq!(m["id"], "4");
    assert_eq!(m["author"], json!({"id": "3", "name": "bob"}));
    assert_eq!(m["content"], "edited");
    assert_eq!(m["nonce"], Value::Null);
    assert_eq!(m["timestamp"], "2026-02-03T04:05:07.000Z");
    assert_eq!(m["edited_timestamp"], "2026-02-03T05:00:00.000Z");

    let out = host
        .ok("EVENT_MESSAGE_DELETE", r#"{"id":"77","channel_id":"1"}"#)
        .await;
    assert_eq!(out[0].event, "MESSAGE_DELETE");
    assert_eq!(out[0].audience, channel(1));
    assert_eq!(payload(&out[0]), json!({"id": "77", "channel_id": "1"}));

    // Message 3 is not in channel 9: NOT_FOUND, not a leak.
    let f = host
        .fail("EVENT_MESSAGE_CREATE", r#"{"id":"3","channel_id":"9"}"#)
        .await;
    assert_eq!(f.code, ErrorCode::Handler("NOT_FOUND".into()), "{f}");
    assert_eq!(f.trace.plugin.as_deref(), Some("message_create.wasm"));
    assert_eq!(f.trace.plugin_hash.as_ref().map(String::len), Some(16));
    let f = host
        .fail("EVENT_MESSAGE_UPDATE", r#"{"id":"999","channel_id":"1"}"#)
        .await;
    assert_eq!(f.code, ErrorCode::Handler("NOT_FOUND".into()), "{f}");

    for bad in [
        r#"{"id":"x","channel_id":"1"}"#,
        r#"{"channel_id":"1"}"#,
        "[]",
        "nope",
    ] {
        let f = host.fail("EVENT_MESSAGE_CREATE", bad).await;
        assert_eq!(f.code, ErrorCode::BadEvent, "{bad}: {f}");
    }
}

#[tokio::test]
async fn message_handlers_on_sqlite() {
    message_handlers(Setup::sqlite()).await;
}

#[tokio::test]
async fn message_handlers_on_postgres() {
    message_handlers(Setup::postgres().await).await;
}

#[tokio::test]
async fn max_content_len_from_config_reaches_the_handler() {
    let mut setup = Setup::sqlite();
    setup.route(
        "EVENT_MESSAGE_CREATE",
        &plugin("message_create"),
        "[routes.config]\nmax_content_len = \"5\"",
    );
    let host = host(setup).await;
    let f = host
        .fail("EVENT_MESSAGE_CREATE", r#"{"id":"3","channel_id":"1"}"#)
        .await;
    assert_eq!(f.code, ErrorCode::BadEvent, "{f}");
    assert!(f.message.contains("max_content_len"), "{f}");
    // "edited" is 6 characters too; a 4-character message passes.
    host.exec(
        "INSERT INTO messages (id, channel_id, author_id, content, created_at) VALUES (5, 1, 2, 'four', 't')",
        &[],
    )
    .await;
    host.ok("EVENT_MESSAGE_CREATE", r#"{"id":"5","channel_id":"1"}"#)
        .await;
}

#[tokio::test]
async fn config_values_reach_the_plugin() {
    let mut setup = Setup::sqlite();
    setup.route(
        "ECHO",
        &test_plugin("config_echo_plugin"),
        "[routes.config]\ngreeting = \"hej\"",
    );
    let host = host(setup).await;
    let out = host.handle("ECHO", "ev-77", "{}").await.unwrap();
    assert_eq!(out[0].event, "CONFIG_ECHO");
    assert_eq!(out[0].audience, Audience::Everyone);
    assert_eq!(
        payload(&out[0]),
        json!({"greeting": "hej", "max_content_len": null, "event_id": "ev-77", "event_name": "ECHO"})
    );
}

#[tokio::test]
async fn online_and_log_reach_the_host() {
    let mut setup = Setup::sqlite();
    setup.route("LOG", &test_plugin("log_plugin"), "");
    let host = host(setup).await;
    let out = host.ok("LOG", r#"{"user_ids":["4","5","6",7]}"#).await;
    assert_eq!(out[0].event, "ONLINE");
    assert_eq!(payload(&out[0]), json!({"online": ["5", "6"]}));
}

#[tokio::test]
async fn handler_errors_pass_their_code_through() {
    let mut setup = Setup::sqlite();
    setup.route("TEA", &test_plugin("error_plugin"), "");
    let host = host(setup).await;
    let f = host.fail("TEA", "{}").await;
    assert_eq!(f.code, ErrorCode::Handler("TEAPOT".into()));
    assert_eq!(f.message, "I refuse");
    host.still_serves().await;
}

#[tokio::test]
async fn an_unrouted_event_is_no_route() {
    let host = host(Setup::sqlite()).await;
    let f = host.fail("EVENT_NOBODY_HANDLES", "{}").await;
    assert_eq!(f.code, ErrorCode::NoRoute);
    assert!(f.message.contains("EVENT_NOBODY_HANDLES"), "{f}");
}

// ---- misbehaving plugins ----------------------------------------------

async fn misbehaving(name: &str, extra: &str) -> Host {
    let mut setup = Setup::sqlite();
    setup.route("BAD", &test_plugin(name), extra);
    host(setup).await
}

#[tokio::test]
async fn a_trap_is_plugin_trap_and_the_host_carries_on() {
    let host = misbehaving("trap_plugin", "").await;
    for _ in 0..2 {
        let f = host.fail("BAD", "{}").await;
        assert_eq!(f.code, ErrorCode::PluginTrap, "{f}");
        assert!(f.message.contains("unreachable"), "{f}");
        assert_eq!(f.trace.plugin.as_deref(), Some("trap_plugin.wasm"));
        assert!(f.trace.plugin_hash.is_some());
        assert!(f.trace.backtrace.is_some(), "{:?}", f.trace);
        host.still_serves().await;
    }
}

#[tokio::test]
async fn a_panic_is_plugin_trap_with_its_message() {
    let host = misbehaving("panic_plugin", "").await;
    let f = host.handle("BAD", "ev-31", "{}").await.unwrap_err();
    assert_eq!(f.code, ErrorCode::PluginTrap, "{f}");
    let chain = f.trace.chain.join("\n");
    assert!(
        chain.contains("panic_plugin: deliberate panic handling event ev-31"),
        "{chain}"
    );
    assert!(f.trace.backtrace.is_some());
    // The panic text goes to the trace, not to the ack's message.
    assert!(!f.message.contains("deliberate"), "{f}");
    host.still_serves().await;
    // The next panic reports its own event, not leftovers.
    let f = host.handle("BAD", "ev-32", "{}").await.unwrap_err();
    let chain = f.trace.chain.join("\n");
    assert!(
        chain.contains("event ev-32") && !chain.contains("ev-31"),
        "{chain}"
    );
}

#[tokio::test]
async fn an_endless_loop_is_plugin_timeout() {
    let host = misbehaving("loop_plugin", "timeout_ms = 30").await;
    for _ in 0..2 {
        let started = Instant::now();
        let f = host.fail("BAD", "{}").await;
        let took = started.elapsed();
        assert_eq!(f.code, ErrorCode::PluginTimeout, "{f}");
        assert!(f.message.contains("30 ms"), "{f}");
        assert!(took >= Duration::from_millis(25), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        host.still_serves().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_looping_plugin_does_not_hold_the_only_worker() {
    // One worker thread: the loop yields each epoch tick, so another event
    // runs to completion while it spins. A loop holding the worker would
    // hold it for its whole time limit (3 s), far past the bound below.
    let host = Arc::new(misbehaving("loop_plugin", "timeout_ms = 3000").await);
    let looping = tokio::spawn({
        let host = host.clone();
        async move { host.handle("BAD", "ev-loop", "{}").await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let started = Instant::now();
    host.still_serves().await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let f = looping.await.unwrap().unwrap_err();
    assert_eq!(f.code, ErrorCode::PluginTimeout);
}

#[tokio::test]
async fn allocating_past_memory_mb_is_plugin_memory() {
    let host = misbehaving("alloc_plugin", "memory_mb = 8").await;
    for _ in 0..2 {
        let f = host.fail("BAD", "{}").await;
        assert_eq!(f.code, ErrorCode::PluginMemory, "{f}");
        assert!(f.message.contains("8 MiB"), "{f}");
        host.still_serves().await;
    }
}

#[tokio::test]
async fn a_payload_that_is_not_json_is_plugin_output() {
    let host = misbehaving("bad_json_plugin", "").await;
    let f = host.fail("BAD", "{}").await;
    assert_eq!(f.code, ErrorCode::PluginOutput, "{f}");
    assert!(f.message.contains("BAD_JSON"), "{f}");
    assert!(f.message.contains("not JSON"), "{f}");
    host.still_serves().await;
}

#[tokio::test]
async fn a_user_that_is_not_an_id_is_plugin_output() {
    let host = misbehaving("ghost_user_plugin", "").await;
    let f = host.fail("BAD", "{}").await;
    assert_eq!(f.code, ErrorCode::PluginOutput, "{f}");
    assert_eq!(
        f.message,
        "delivery names user 'not-a-number' which is not an id"
    );
    assert_eq!(f.trace.plugin.as_deref(), Some("ghost_user_plugin.wasm"));
    host.still_serves().await;
}

#[tokio::test]
async fn a_garbage_wasm_fails_load_naming_the_file() {
    let mut setup = Setup::sqlite();
    let garbage = setup.dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm but not really").unwrap();
    setup.route("EVENT_GARBAGE", &garbage, "");
    setup.set("plugins", "cache_dir", &format!("\"{}\"", plugin_cache()));
    let config = Config::parse(&setup.config_text(), &setup.config_path()).unwrap();
    let db = Db::open(&config.database.url, 1, Access::ReadOnly)
        .await
        .unwrap();
    let err = Plugins::load(&config, db.clone(), online(), Metrics::new())
        .await
        .err()
        .expect("garbage must not load")
        .to_string();
    assert!(err.contains("EVENT_GARBAGE"), "{err}");
    assert!(err.contains(&garbage.display().to_string()), "{err}");
    assert!(err.contains("not a usable plugin component"), "{err}");

    let missing = setup.dir.path().join("missing.wasm");
    let mut setup2 = Setup::sqlite();
    setup2.route("EVENT_MISSING", &missing, "");
    let config = Config::parse(&setup2.config_text(), &setup2.config_path()).unwrap();
    let err = Plugins::load(&config, db, online(), Metrics::new())
        .await
        .err()
        .expect("a missing file must not load")
        .to_string();
    assert!(
        err.contains("missing.wasm") && err.contains("cannot read"),
        "{err}"
    );
}

// ---- the database interface ---------------------------------------------

const WRITE_THROUGH_CTE: &str =
    "WITH x AS (SELECT 1) INSERT INTO users (id, name, created_at) VALUES (777000777, 'w', 't')";

async fn writes_are_rejected(setup: Setup, db_says: &str) {
    let mut setup = setup;
    setup.route("WRITE", &test_plugin("write_plugin"), "");
    let host = host(setup).await;

    // A plain INSERT: refused by the host's statement check.
    let f = host.fail("WRITE", "{}").await;
    assert_eq!(f.code, ErrorCode::Handler("WRITE_REJECTED".into()), "{f}");
    assert!(f.message.contains("not read-only"), "{f}");

    // A write the check lets through: refused by the database itself.
    let d = json!({ "sql": WRITE_THROUGH_CTE }).to_string();
    let f = host.fail("WRITE", &d).await;
    assert_eq!(f.code, ErrorCode::Handler("WRITE_REJECTED".into()), "{f}");
    assert!(f.message.contains("not read-only"), "{f}");
    assert!(f.message.contains(db_says), "{f}");

    // Stacked statements and session changes get nowhere either.
    for sql in [
        "SELECT 1; DELETE FROM users",
        "PRAGMA query_only = OFF",
        "SET default_transaction_read_only = off",
    ] {
        let d = json!({ "sql": sql }).to_string();
        let f = host.fail("WRITE", &d).await;
        assert_eq!(
            f.code,
            ErrorCode::Handler("WRITE_REJECTED".into()),
            "{sql}: {f}"
        );
    }
    if host.rw.backend() == "postgres" {
        let d =
            json!({ "sql": "SELECT set_config('default_transaction_read_only', 'off', false)" })
                .to_string();
        host.ok("WRITE", &d).await;
        let d = json!({ "sql": WRITE_THROUGH_CTE }).to_string();
        let f = host.fail("WRITE", &d).await;
        assert!(f.message.contains(db_says), "after set_config: {f}");
    }

    assert_eq!(host.count_users(777_000_777).await, 0);
    assert_eq!(host.count_users(2).await, 1);

    // Reading works through the same plugin.
    let d = json!({ "sql": "SELECT id, name FROM users ORDER BY id" }).to_string();
    let out = host.ok("WRITE", &d).await;
    assert_eq!(out[0].event, "WRITE_ACCEPTED");
    assert_eq!(payload(&out[0]), json!({"rows": 2}));
}

#[tokio::test]
async fn writes_are_rejected_on_sqlite() {
    writes_are_rejected(Setup::sqlite(), "readonly").await;
}

#[tokio::test]
async fn writes_are_rejected_on_postgres() {
    writes_are_rejected(Setup::postgres().await, "read-only transaction").await;
}

async fn query_limits(setup: Setup) {
    let mut setup = setup;
    setup.set("plugins", "query_max_rows", "10");
    setup.set("plugins", "query_timeout_ms", "200");
    setup.route("WRITE", &test_plugin("write_plugin"), "");
    let host = host(setup).await;
    let rows = |n: u32| {
        json!({ "sql": format!("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n}) SELECT x FROM c") })
            .to_string()
    };
    let out = host.ok("WRITE", &rows(10)).await;
    assert_eq!(payload(&out[0]), json!({"rows": 10}));
    let f = host.fail("WRITE", &rows(11)).await;
    assert!(f.message.contains("more than 10 rows"), "{f}");
    let d = json!({ "sql": "SELECT nosuchcolumn FROM users" }).to_string();
    let f = host.fail("WRITE", &d).await;
    assert!(f.message.starts_with("query failed:"), "{f}");
    host.still_serves().await;
}

#[tokio::test]
async fn query_limits_on_sqlite() {
    query_limits(Setup::sqlite()).await;
}

#[tokio::test]
async fn query_limits_on_postgres() {
    let setup = Setup::postgres().await;
    query_limits(setup).await;
}

#[tokio::test]
async fn a_slow_query_times_out_on_postgres() {
    let mut setup = Setup::postgres().await;
    setup.set("plugins", "query_timeout_ms", "500");
    setup.route("WRITE", &test_plugin("write_plugin"), "timeout_ms = 200");
    let host = host(setup).await;
    let started = Instant::now();
    let d = json!({ "sql": "SELECT pg_sleep(5)::text" }).to_string();
    let f = host.fail("WRITE", &d).await;
    assert_eq!(f.message, "query timed out", "{f}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Database time does not count against the plugin's own 200 ms.
    let d = json!({ "sql": "SELECT pg_sleep(0.3)::text" }).to_string();
    host.ok("WRITE", &d).await;
}

/// SQLite has no server to cancel a statement: the host's progress
/// handler stops it, and the runaway query holds no worker meanwhile.
#[tokio::test]
async fn a_slow_query_times_out_on_sqlite() {
    let mut setup = Setup::sqlite();
    setup.set("plugins", "query_timeout_ms", "300");
    setup.route("WRITE", &test_plugin("write_plugin"), "timeout_ms = 200");
    let host = host(setup).await;
    let endless = json!({ "sql": "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT COUNT(*) FROM n" })
        .to_string();
    let (a, b, c) = tokio::join!(
        host.fail("WRITE", &endless),
        host.fail("WRITE", &endless),
        host.fail("WRITE", &endless),
    );
    for f in [a, b, c] {
        assert_eq!(f.message, "query timed out", "{f}");
    }
    host.still_serves().await;
}

// ---- loading, caching, reloading ----------------------------------------

#[tokio::test]
async fn compiled_code_is_cached_on_disk() {
    let mut setup = Setup::sqlite();
    let cache: PathBuf = setup.dir.path().join("cache");
    setup.set("plugins", "cache_dir", &format!("\"{}\"", cache.display()));
    setup.route("ECHO", &test_plugin("config_echo_plugin"), "");
    let config = Config::parse(&setup.config_text(), &setup.config_path()).unwrap();

    let first = Plugins::check(&config).await;
    assert!(first.iter().all(|s| s.is_ok()), "{first:?}");
    assert!(!first[0].cached);
    let hash = first[0].hash.clone().unwrap();
    let names = |dir: &std::path::Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    // One whole-component entry, beside the per-function compile cache.
    let entries: Vec<String> = names(&cache)
        .into_iter()
        .filter(|n| !n.starts_with("functions-"))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(entries[0].starts_with(&hash) && entries[0].ends_with(".cwasm"));
    let functions = names(&cache)
        .into_iter()
        .find(|n| n.starts_with("functions-"))
        .expect("the per-function compile cache directory");
    assert!(
        !names(&cache.join(&functions)).is_empty(),
        "the first compile fills the per-function cache"
    );

    let second = Plugins::check(&config).await;
    assert!(second[0].cached, "{second:?}");
    let line = second[0].to_string();
    assert!(
        line.contains("loaded from cache") && line.ends_with(": ok"),
        "{line}"
    );

    // A damaged entry is ignored and rewritten, never trusted.
    let entry = cache.join(&entries[0]);
    std::fs::write(&entry, b"not a cwasm").unwrap();
    let third = Plugins::check(&config).await;
    assert!(third[0].is_ok() && !third[0].cached, "{third:?}");
    let fourth = Plugins::check(&config).await;
    assert!(fourth[0].cached, "{fourth:?}");
}

#[tokio::test]
async fn reload_swaps_routes_and_a_bad_reload_changes_nothing() {
    let mut setup = Setup::sqlite();
    setup.route("TEA", &test_plugin("error_plugin"), "");
    let host = host(setup).await;
    assert_eq!(
        host.fail("TEA", "{}").await.code,
        ErrorCode::Handler("TEAPOT".into())
    );

    // Garbage in the new config: refused, the old routes keep serving.
    let garbage = host.setup.dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"garbage").unwrap();
    let text = format!(
        "{}\n[[routes]]\nevent = \"G\"\nplugin = \"{}\"\n",
        host.setup.config_text(),
        garbage.display()
    );
    let bad = Config::parse(&text, &host.setup.config_path()).unwrap();
    let err = host.plugins.reload(&bad).await.unwrap_err().to_string();
    assert!(err.contains("garbage.wasm"), "{err}");
    assert_eq!(
        host.fail("TEA", "{}").await.code,
        ErrorCode::Handler("TEAPOT".into())
    );

    // A good config: TEA now echoes config, NOOP still works.
    let mut next = host.config.clone();
    next.routes
        .iter_mut()
        .find(|r| r.event == "TEA")
        .unwrap()
        .plugin = test_plugin("config_echo_plugin");
    host.plugins.reload(&next).await.unwrap();
    let out = host.ok("TEA", "{}").await;
    assert_eq!(out[0].event, "CONFIG_ECHO");
    host.still_serves().await;
}

#[tokio::test]
async fn concurrent_events_share_a_route() {
    let mut setup = Setup::sqlite();
    setup.message_routes();
    let host = Arc::new(host(setup).await);
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let host = host.clone();
            tokio::spawn(async move {
                let id = format!("ev-{i}");
                host.handle(
                    "EVENT_MESSAGE_CREATE",
                    &id,
                    r#"{"id":"3","channel_id":"1"}"#,
                )
                .await
            })
        })
        .collect();
    for task in tasks {
        let out = task.await.unwrap().unwrap();
        assert_eq!(out[0].event, "MESSAGE_CREATE");
    }
}

// ---- the check verb -----------------------------------------------------

#[test]
fn check_prints_each_plugin_and_fails_on_a_bad_one() {
    let mut setup = Setup::sqlite();
    setup.set("plugins", "cache_dir", &format!("\"{}\"", plugin_cache()));
    setup.message_routes();
    setup.write_config();
    let out = setup.run(&["check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for event in [
        "EVENT_MESSAGE_CREATE",
        "EVENT_MESSAGE_UPDATE",
        "EVENT_MESSAGE_DELETE",
    ] {
        let line = stdout.lines().find(|l| l.starts_with(event)).unwrap();
        assert!(line.contains("sha256:") && line.ends_with(": ok"), "{line}");
    }

    let garbage = setup.dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm\x0d\0\x01\0").unwrap();
    setup.route("EVENT_GARBAGE", &garbage, "");
    setup.write_config();
    let out = setup.run(&["check"]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("EVENT_GARBAGE"))
        .unwrap();
    assert!(
        line.contains("garbage.wasm") && line.contains(": error: "),
        "{line}"
    );
    assert!(
        stdout.lines().filter(|l| l.ends_with(": ok")).count() == 3,
        "{stdout}"
    );
    assert!(
        stderr.contains("1 of 4 plugin(s) failed to load"),
        "{stderr}"
    );
}

/// What a plugin prints is logged as one quoted `plugin_output` field: a
/// newline in it can't start a line of the gateway's own log.
#[tokio::test]
async fn plugin_output_is_one_quoted_field_and_cannot_forge_log_lines() {
    let mut setup = Setup::sqlite();
    setup.route("LOG", &test_plugin("log_plugin"), "");
    let gw = setup.start();
    let mut backend = common::dispatch::DispatchClient::connect(gw.dispatch).await;
    let ack = backend
        .roundtrip("LOG", json!({"user_ids": []}), json!("out-1"))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    let quoted =
        r#""log_plugin: stdout for event out-1\nERROR otako_gateway: forged by log_plugin""#;
    common::eventually(
        Duration::from_secs(10),
        "the plugin's output in the log",
        async || gw.log().contains(quoted),
    )
    .await;
    let log = gw.log();
    let line = log.lines().find(|l| l.contains(quoted)).unwrap();
    assert!(line.contains("plugin_output"), "{line}");
    assert!(line.contains("log_plugin.wasm"), "{line}");
    assert!(
        !log.lines()
            .any(|l| l.trim_start().starts_with("ERROR otako_gateway: forged")),
        "{log}"
    );
}
