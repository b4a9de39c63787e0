//! The failed-event log holds "once per event id, ever" against the real
//! binary: several deliverers on one database, crashes between the sink
//! write and the mark, kill -9 while failures stream in, a full disk under
//! the file sink, PostgreSQL connections terminated under the writer, NUL
//! characters in a record, and a restarted `log-sink`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::dispatch::DispatchClient;
use common::{
    Gateway, PG_ADMIN_URL, Setup, TestDb, Tmpfs, counting_sink, eventually, free_port,
    http_request, read_json_lines, start_log_sink,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// A claim lease short enough that a crashed deliverer's rows are taken
/// over within the test.
const LEASE: (&str, &str) = ("OTAKO_ERRLOG_LEASE_MS", "1000");
const SINK: &str = "data/event-errors.jsonl";

fn sink_path(setup: &Setup) -> PathBuf {
    setup.dir.path().join(SINK)
}

/// How often each event id occurs in a sink file's records.
fn id_counts(path: &Path) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for record in read_json_lines(path) {
        let id = match &record["event_id"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        *counts.entry(id).or_default() += 1;
    }
    counts
}

/// Waits until the gateway has counted a failed sink delivery.
async fn wait_sink_failure(gateway: &Gateway) {
    eventually(Duration::from_secs(10), "a failed sink write", async || {
        gateway.metric("otako_errlog_sink_failures_total", "").await >= 1.0
    })
    .await;
}

/// Asserts every id in `ids` is in the sink file exactly once, and that no
/// id is there twice; waits for them first, longer than the deliverer's
/// longest back-off (30 s) after a sink that failed for a while.
async fn assert_each_once(path: &Path, ids: &HashSet<String>) {
    eventually(
        Duration::from_secs(45),
        "every failed id in the sink",
        async || {
            let counts = id_counts(path);
            ids.iter().all(|id| counts.contains_key(id))
        },
    )
    .await;
    let counts = id_counts(path);
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "ids in the sink more than once: {twice:?}"
    );
    let missing: Vec<_> = ids.iter().filter(|id| !counts.contains_key(*id)).collect();
    assert!(missing.is_empty(), "missing: {missing:?}");
}

/// Sends failing (unrouted) events `prefix-0..n`, 32 in flight, checks
/// each is acked `success:false` and returns their ids.
async fn fail_events(addr: std::net::SocketAddr, prefix: &str, n: usize) -> HashSet<String> {
    let mut backend = DispatchClient::connect(addr).await;
    let mut acks = HashMap::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(32) {
        for i in chunk {
            backend
                .event(
                    "EVENT_NOPE",
                    json!({"n": i}),
                    json!(format!("{prefix}-{i}")),
                    json!("1"),
                )
                .await;
        }
        acks.extend(backend.acks(chunk.len()).await);
    }
    for (id, ack) in &acks {
        assert_eq!(ack["success"], false, "{id}: {ack}");
    }
    acks.into_keys().collect()
}

/// Streams failing events until `until` or until the connection dies (the
/// gateway was killed); returns the ids acked `success:false` and the ids
/// acked with `DB_ERROR` (which a backend retries).
async fn stream_failures(
    addr: std::net::SocketAddr,
    prefix: String,
    until: Instant,
) -> (HashSet<String>, HashSet<String>) {
    let mut backend = DispatchClient::connect(addr).await;
    let (mut failed, mut db_errors) = (HashSet::new(), HashSet::new());
    let mut n = 0;
    'stream: while Instant::now() < until {
        for _ in 0..16 {
            let frame = json!({"t": "EVENT_NOPE", "d": {}, "op": 0, "s": "1", "event_id": format!("{prefix}-{n}")});
            n += 1;
            if backend
                .ws
                .send(Message::text(frame.to_string()))
                .await
                .is_err()
            {
                break 'stream;
            }
        }
        for _ in 0..16 {
            let next = tokio::time::timeout(Duration::from_secs(10), backend.ws.next()).await;
            let Ok(Some(Ok(Message::Text(text)))) = next else {
                break 'stream;
            };
            let ack: Value = serde_json::from_str(&text).unwrap();
            if ack["success"] == false {
                let id = ack["event_id"].as_str().unwrap().to_owned();
                if ack["error"]["code"] == "DB_ERROR" {
                    db_errors.insert(id.clone());
                }
                failed.insert(id);
            }
        }
    }
    (failed, db_errors)
}

/// Rows of `event_errors` matching a condition, on the test database.
async fn count_rows(setup: &Setup, condition: &str) -> i64 {
    let sql = format!("SELECT COUNT(*) FROM event_errors WHERE {condition}");
    match &setup.db {
        TestDb::Sqlite(path) => {
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
                .await
                .unwrap();
            let n = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            n
        }
        TestDb::Postgres { .. } => {
            let pool = sqlx::PgPool::connect(&setup.db.url()).await.unwrap();
            let n = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            n
        }
    }
}

/// Starts `serve` and `api` at the same moment on one database and sink,
/// on blocking threads: the test's runtime (and a sink served on it) keeps
/// running meanwhile, so the first deliverer's POSTs are answered while
/// the other process starts. The default lease (60 s): a held POST must
/// not let the other process take its rows over and send them again.
async fn start_both(setup: &Setup) -> (Gateway, Gateway) {
    let config = setup.write_config();
    let start = |verb: &'static str| {
        let (config, dir) = (config.clone(), setup.dir.path().to_owned());
        tokio::task::spawn_blocking(move || Gateway::spawn(&config, &dir, verb, &[]))
    };
    let (serve, api) = tokio::join!(start("serve"), start("api"));
    (serve.unwrap(), api.unwrap())
}

/// Failures accumulate while the file sink is blocked (its folder is a
/// file); then `serve` and `api` start together and both deliver, while
/// more failures stream in.
async fn two_processes_share_the_file_sink(mut setup: Setup) {
    setup.set("logging", "path", "\"sink/event-errors.jsonl\"");
    let blocker = setup.dir.path().join("sink");
    std::fs::write(&blocker, "not a folder").unwrap();
    let gateway = setup.start();
    let mut ids: HashSet<String> = fail_events(gateway.dispatch, "early", 400).await;
    wait_sink_failure(&gateway).await;
    assert!(gateway.stop().success());
    std::fs::remove_file(&blocker).unwrap();

    let (serve, api) = start_both(&setup).await;
    ids.extend(fail_events(serve.dispatch, "late", 200).await);
    assert_each_once(&blocker.join("event-errors.jsonl"), &ids).await;
    eventually(Duration::from_secs(10), "an empty backlog", async || {
        serve.metric("otako_errlog_backlog", "").await == 0.0
    })
    .await;
    assert_eq!(count_rows(&setup, "delivered_at IS NULL").await, 0);
    drop((serve, api));
}

#[tokio::test]
async fn serve_and_api_on_sqlite_write_each_failure_to_the_file_once() {
    two_processes_share_the_file_sink(Setup::sqlite()).await;
}

#[tokio::test]
async fn serve_and_api_on_postgres_write_each_failure_to_the_file_once() {
    two_processes_share_the_file_sink(Setup::postgres().await).await;
}

#[tokio::test]
async fn serve_and_api_on_postgres_post_each_failure_once() {
    let mut setup = Setup::postgres().await;
    let port = free_port();
    setup.http_sink(&format!("http://127.0.0.1:{port}/events"));
    // Nothing listens yet: failures accumulate.
    let gateway = setup.start();
    let ids: HashSet<String> = fail_events(gateway.dispatch, "http", 300).await;
    assert!(gateway.stop().success());

    let (addr, posts) = counting_sink().await;
    setup.http_sink(&format!("http://{addr}/events"));
    let (serve, api) = start_both(&setup).await;
    eventually(Duration::from_secs(30), "every record POSTed", async || {
        let posts = posts.lock().unwrap();
        ids.iter().all(|id| posts.contains_key(id))
    })
    .await;
    eventually(Duration::from_secs(10), "every row marked", async || {
        count_rows(&setup, "delivered_at IS NULL").await == 0
    })
    .await;
    let posts = posts.lock().unwrap().clone();
    let twice: Vec<_> = posts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "POSTed more than once: {twice:?}");
    assert_eq!(posts.len(), ids.len());
    // Both processes delivered: the claims really were contended.
    let serve_rows = count_rows(&setup, &format!("claimed_by LIKE '{}:%'", serve.pid())).await;
    let api_rows = count_rows(&setup, &format!("claimed_by LIKE '{}:%'", api.pid())).await;
    assert!(
        serve_rows > 0 && api_rows > 0,
        "serve {serve_rows}, api {api_rows}"
    );
    assert_eq!(serve_rows + api_rows, 300);
}

#[tokio::test]
async fn a_crash_between_the_sink_write_and_the_mark_does_not_resend() {
    let setup = Setup::sqlite();
    let mut gateway = setup.start_verb_env(
        "serve",
        &[("OTAKO_FAILPOINT", "errlog-after-sink-write"), LEASE],
    );
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    // The deliverer may reach the failpoint before the ack is written, so
    // the ack is not awaited: the record is what this test follows.
    backend
        .event("EVENT_NOPE", json!({}), json!("crash-1"), json!("1"))
        .await;
    let status = gateway.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "the failpoint did not abort: {status:?}");
    assert!(gateway.log().contains("failpoint errlog-after-sink-write"));
    assert_eq!(id_counts(&sink_path(&setup)).get("crash-1"), Some(&1));
    assert_eq!(count_rows(&setup, "delivered_at IS NULL").await, 1);
    // And a crash in the middle of a later write leaves a torn line.
    let mut text = std::fs::read_to_string(sink_path(&setup)).unwrap();
    text.push_str(r#"{"event_id":"tor"#);
    std::fs::write(sink_path(&setup), text).unwrap();

    let gateway = setup.start_verb_env("serve", &[LEASE]);
    eventually(
        Duration::from_secs(10),
        "the row marked delivered",
        async || count_rows(&setup, "delivered_at IS NULL").await == 0,
    )
    .await;
    assert_eq!(id_counts(&sink_path(&setup)).get("crash-1"), Some(&1));
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    backend
        .roundtrip("EVENT_NOPE", json!({}), json!("crash-2"))
        .await;
    let ids = HashSet::from(["crash-1".to_owned(), "crash-2".to_owned()]);
    assert_each_once(&sink_path(&setup), &ids).await;
    let text = std::fs::read_to_string(sink_path(&setup)).unwrap();
    assert!(text.ends_with('\n') && !text.contains("tor{"), "{text}");
    assert_eq!(read_json_lines(&sink_path(&setup)).len(), 2);
    drop(gateway);
}

#[tokio::test]
async fn kill_9_while_failures_stream_loses_and_repeats_nothing() {
    let setup = Setup::sqlite();
    let mut failed = HashSet::new();
    for round in 0..3 {
        let gateway = setup.start_verb_env("serve", &[LEASE]);
        // The stream ends with the kill; its deadline only bounds a
        // gateway that never records anything.
        let stream = tokio::spawn(stream_failures(
            gateway.dispatch,
            format!("kill{round}"),
            Instant::now() + Duration::from_secs(40),
        ));
        // Kill once records are flowing to the file.
        let before = id_counts(&sink_path(&setup)).len();
        eventually(
            Duration::from_secs(30),
            "records reaching the sink",
            async || id_counts(&sink_path(&setup)).len() > before + 100,
        )
        .await;
        gateway.kill();
        let (acked, _) = stream.await.unwrap();
        assert!(!acked.is_empty());
        failed.extend(acked);
    }
    let gateway = setup.start_verb_env("serve", &[LEASE]);
    assert_each_once(&sink_path(&setup), &failed).await;
    eventually(Duration::from_secs(10), "an empty backlog", async || {
        gateway.metric("otako_errlog_backlog", "").await == 0.0
    })
    .await;
}

#[tokio::test]
async fn a_full_disk_under_the_file_sink_delays_records_and_loses_none() {
    let mut setup = Setup::sqlite();
    setup.set("logging", "path", "\"sinkfs/event-errors.jsonl\"");
    let mount = Tmpfs::mount(&setup.dir.path().join("sinkfs"), "64k");
    let sink = mount.path.join("event-errors.jsonl");
    let gateway = setup.start();
    let mut ids: HashSet<String> = fail_events(gateway.dispatch, "roomy", 5).await;
    assert_each_once(&sink, &ids).await;

    mount.fill();
    let full: HashSet<String> = fail_events(gateway.dispatch, "full", 40).await;
    // Small batches may still fit in the file's last page; then writes fail.
    wait_sink_failure(&gateway).await;
    let undelivered = count_rows(&setup, "delivered_at IS NULL").await;
    assert!(undelivered > 0);
    eventually(Duration::from_secs(10), "the backlog shown", async || {
        gateway.metric("otako_errlog_backlog", "").await == undelivered as f64
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "the oldest record's age",
        async || {
            gateway
                .metric("otako_errlog_oldest_undelivered_seconds", "")
                .await
                >= 1.0
        },
    )
    .await;
    assert!(
        gateway
            .log()
            .contains("error log: delivery failed; will retry")
    );
    // Nothing marked delivered that is not whole in the file, no torn line.
    assert_eq!(
        count_rows(&setup, "delivered_at IS NULL").await,
        undelivered
    );
    let text = std::fs::read_to_string(&sink).unwrap();
    assert!(text.ends_with('\n'), "a torn line was left behind");
    let counts = id_counts(&sink);
    assert_eq!(counts.len() as i64, 45 - undelivered, "{counts:?}");
    assert!(counts.values().all(|n| *n == 1));

    mount.free();
    ids.extend(full);
    assert_each_once(&sink, &ids).await;
    assert_eq!(read_json_lines(&sink).len(), 45);
    assert!(std::fs::read_to_string(&sink).unwrap().ends_with('\n'));
    eventually(Duration::from_secs(10), "an empty backlog", async || {
        gateway.metric("otako_errlog_backlog", "").await == 0.0
    })
    .await;
    gateway.kill();
    drop(mount);
}

#[tokio::test]
async fn terminated_postgres_connections_lose_no_failed_event() {
    let mut setup = Setup::postgres().await;
    let TestDb::Postgres { schema } = &setup.db else {
        unreachable!()
    };
    let app = format!("otako_{schema}");
    let url = format!("{}&application_name={app}", setup.db.url());
    setup.set("database", "url", &format!("\"{url}\""));
    let gateway = setup.start();

    // Terminations go on for the first 2 s; the stream outlasts them so
    // a slow machine still fails well over 100 events around them.
    let stream = tokio::spawn(stream_failures(
        gateway.dispatch,
        "term".to_owned(),
        Instant::now() + Duration::from_secs(6),
    ));
    let admin = sqlx::PgPool::connect(PG_ADMIN_URL).await.unwrap();
    let mut terminated = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let killed: Vec<(bool,)> = sqlx::query_as(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(&app)
        .fetch_all(&admin)
        .await
        .unwrap();
        terminated += killed.len();
    }
    admin.close().await;
    let (failed, db_errors) = stream.await.unwrap();
    assert!(terminated > 0, "no gateway connection was terminated");
    assert!(failed.len() > 100, "only {} events failed", failed.len());

    // The backend retries what was acked DB_ERROR (not recorded).
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    for id in &db_errors {
        let ack = backend.roundtrip("EVENT_NOPE", json!({}), json!(id)).await;
        assert_eq!(ack["success"], false);
    }
    assert_each_once(&sink_path(&setup), &failed).await;
    assert!(
        gateway
            .log()
            .contains("error log: cannot write a failed event; retrying"),
        "no record write hit a terminated connection"
    );
}

#[tokio::test]
async fn a_record_with_nul_characters_is_stored_and_delivered_on_postgres() {
    let setup = Setup::postgres().await;
    let gateway = setup.start();
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    let d = json!({"text": "a\u{0}b", "\u{0}key": "\u{0}"});
    let ack = backend
        .roundtrip("EVENT_NOPE", d.clone(), json!("nul-1"))
        .await;
    assert_eq!(ack["error"]["code"], "NO_ROUTE", "{ack}");
    assert_each_once(&sink_path(&setup), &HashSet::from(["nul-1".to_owned()])).await;
    let records = read_json_lines(&sink_path(&setup));
    assert_eq!(records[0]["d"], d);
    assert!(
        std::fs::read_to_string(sink_path(&setup))
            .unwrap()
            .contains(r"a\u0000b")
    );
}

async fn post(port: u16, key: &str, body: &Value) -> u16 {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let text = body.to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    // The sink may still be starting.
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "log-sink did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    http_request(
        addr,
        "POST",
        "/events",
        &[("Idempotency-Key", key)],
        Some(&text),
    )
    .await
    .0
}

#[tokio::test]
async fn log_sink_deduplicates_by_idempotency_key_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sink.jsonl");
    let port = free_port();
    let mut sink = start_log_sink(port, &out);
    let dropped = json!({"event_id": "7", "source": "api"});
    assert_eq!(post(port, "dropped:7", &dropped).await, 201);
    assert_eq!(post(port, "8", &json!({"event_id": "8"})).await, 201);
    assert_eq!(post(port, "8", &json!({"event_id": "8"})).await, 200);
    sink.kill().unwrap();
    sink.wait().unwrap();
    // A crash mid-write leaves a torn line behind.
    let mut text = std::fs::read_to_string(&out).unwrap();
    text.push_str("{\"event_id\":\"9\",\"tor");
    std::fs::write(&out, text).unwrap();

    let mut sink = start_log_sink(port, &out);
    assert_eq!(post(port, "dropped:7", &dropped).await, 200);
    assert_eq!(post(port, "8", &json!({"event_id": "8"})).await, 200);
    // The gateway's own record of event 7 is another key than the API's.
    assert_eq!(post(port, "7", &json!({"event_id": "7"})).await, 201);
    assert_eq!(post(port, "9", &json!({"event_id": "9"})).await, 201);
    sink.kill().unwrap();
    sink.wait().unwrap();
    let records = read_json_lines(&out);
    assert!(std::fs::read_to_string(&out).unwrap().ends_with('\n'));
    assert_eq!(
        records,
        [
            dropped,
            json!({"event_id": "8"}),
            json!({"event_id": "7"}),
            json!({"event_id": "9"})
        ]
    );
}

/// The operator page's JSON: the failures just provoked with their codes
/// and traces, the plugins serving with version hashes and load times,
/// the metrics, and no secret anywhere; the page itself is served.
#[tokio::test]
async fn the_operator_page_shows_failures_plugins_and_metrics_without_secrets() {
    let mut setup = Setup::sqlite();
    setup.message_routes();
    let gateway = setup.start();
    let (status, page) = gateway.admin_get("/").await;
    assert_eq!(status, 200);
    assert!(page.contains("/operator.js"), "{page}");
    assert_eq!(gateway.admin_get("/operator.js").await.0, 200);

    let ids = fail_events(gateway.dispatch, "ops", 3).await;
    let (status, text) = gateway.admin_get("/admin/failures").await;
    assert_eq!(status, 200, "{text}");
    let failures: Vec<Value> = serde_json::from_str(&text).unwrap();
    let listed: HashSet<String> = failures
        .iter()
        .map(|f| f["record"]["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, ids);
    assert!(
        failures
            .iter()
            .all(|f| f["record"]["error"]["code"] == "NO_ROUTE")
    );
    assert!(failures.iter().all(|f| f["record"]["trace"].is_object()));

    let (status, text) = gateway.admin_get("/admin/status").await;
    assert_eq!(status, 200, "{text}");
    let status: Value = serde_json::from_str(&text).unwrap();
    let plugins = status["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 3);
    let create = plugins
        .iter()
        .find(|p| p["event"] == "EVENT_MESSAGE_CREATE")
        .unwrap();
    assert_eq!(create["plugin"], "message_create.wasm");
    assert_eq!(create["hash"].as_str().unwrap().len(), 64);
    assert!(create["loaded_at"].is_string());
    assert_eq!(status["reloads"][0]["kind"], "load");
    assert_eq!(status["reloads"][0]["ok"], true);
    let failed: f64 = status["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == "otako_events_total" && m["labels"]["outcome"] != "success")
        .map(|m| m["value"].as_f64().unwrap())
        .sum();
    assert_eq!(failed, 3.0);
    for secret in [common::TOKEN_SECRET, common::DISPATCH_SECRET] {
        assert!(!text.contains(secret));
    }
    assert!(gateway.stop().success());
}
