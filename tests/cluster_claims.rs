//! Cluster mode (DESIGN §9): idempotency, the error log and fencing across
//! real `serve` nodes on one PostgreSQL schema and the real NATS. An event
//! id that succeeded on one node is a duplicate on another; one still in
//! flight on another node is acked once that attempt ends (and run there
//! if that attempt failed); a failure reaches the logging server from
//! exactly one node; a node cut off from
//! NATS closes its sessions (1001) before its lease can run out, refuses
//! connects, and admits again once NATS is back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::client::Client;
use common::cluster::{LEASE_MS, TestCluster, try_session};
use common::dispatch::{DispatchClient, Seed};
use common::proxy::Proxy;
use common::{counting_sink_on, eventually, read_close_within, test_plugin};
use serde_json::{Value, json};

/// Reads `client`'s frames until one named `last` with `d[field] == value`
/// and returns every frame before it.
async fn frames_until(client: &mut Client, last: &str, field: &str, value: &Value) -> Vec<Value> {
    let mut before = Vec::new();
    loop {
        let frame = client.next().await;
        if frame["t"] == last && frame["d"][field] == *value {
            return before;
        }
        before.push(frame);
    }
}

/// How many of `frames` are `t` with `d[field] == value`.
fn count(frames: &[Value], t: &str, field: &str, value: &Value) -> usize {
    frames
        .iter()
        .filter(|f| f["t"] == t && f["d"][field] == *value)
        .count()
}

#[tokio::test]
async fn an_event_id_that_succeeded_on_one_node_is_a_duplicate_on_another() {
    let mut cluster = TestCluster::new(5, "reject").await;
    cluster.setup.route(
        "EVENT_ECHO",
        &test_plugin("config_echo_plugin"),
        "timeout_ms = 5000",
    );
    let a = cluster.start(1);
    let b = cluster.start(2);
    let mut on_a = Client::connect(a.client, 21).await;
    let mut on_b = Client::connect(b.client, 22).await;
    let mut backend_a = DispatchClient::connect(a.dispatch).await;
    let mut backend_b = DispatchClient::connect(b.dispatch).await;

    let d = json!({"channel_id": "1"});
    let first = backend_a
        .roundtrip("EVENT_ECHO", d.clone(), json!("e1"))
        .await;
    assert_eq!(first["success"], true, "{first}");
    assert!(first.get("duplicate").is_none(), "{first}");
    // The backend's retry lands on the other node.
    let retry = backend_b
        .roundtrip("EVENT_ECHO", d.clone(), json!("e1"))
        .await;
    assert_eq!(retry["success"], true, "{retry}");
    assert_eq!(retry["duplicate"], true, "{retry}");

    // A marker through each node: everything before it has arrived.
    for (backend, marker) in [(&mut backend_a, "mark-a"), (&mut backend_b, "mark-b")] {
        let ack = backend
            .roundtrip("EVENT_ECHO", d.clone(), json!(marker))
            .await;
        assert_eq!(ack["success"], true, "{ack}");
    }
    let id = json!("e1");
    let seen_a = frames_until(&mut on_a, "CONFIG_ECHO", "event_id", &json!("mark-a")).await;
    assert_eq!(
        count(&seen_a, "CONFIG_ECHO", "event_id", &id),
        1,
        "{seen_a:?}"
    );
    // Node B's own client sees it at most once: once where frames travel
    // between nodes, never from B's duplicate.
    let seen_b = frames_until(&mut on_b, "CONFIG_ECHO", "event_id", &json!("mark-b")).await;
    assert!(
        count(&seen_b, "CONFIG_ECHO", "event_id", &id) <= 1,
        "{seen_b:?}"
    );
    a.stop();
    b.stop();
}

/// A query that takes 1.5 s, for attempts that stay in flight.
const SLOW: &str = "SELECT 1 AS one FROM pg_sleep(1.5)";

/// A cluster with `EVENT_SLOW` routed to the query-running test plugin,
/// its queries cut off after `query_timeout_ms`.
async fn slow_cluster(query_timeout_ms: u64) -> TestCluster {
    let mut cluster = TestCluster::new(5, "reject").await;
    cluster
        .setup
        .set("plugins", "query_timeout_ms", &query_timeout_ms.to_string())
        .route(
            "EVENT_SLOW",
            &test_plugin("write_plugin"),
            "timeout_ms = 10000",
        );
    cluster
}

/// Waits until event `id` is claimed and not finished (in flight).
async fn claim_held(seed: &Seed, id: &str) {
    eventually(
        Duration::from_secs(10),
        "node A holds the claim",
        async || {
            seed.count(
                "SELECT COUNT(*) FROM event_outcomes WHERE event_id = $1 AND done = 0",
                id,
            )
            .await
                == 1
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_id_in_flight_on_one_node_is_acked_by_another_once_it_ends() {
    let mut cluster = slow_cluster(5000).await;
    let a = cluster.start(1);
    let b = cluster.start(2);
    let seed = Seed::open(&cluster.setup).await;
    let mut on_a = Client::connect(a.client, 31).await;
    let mut backend_a = DispatchClient::connect(a.dispatch).await;
    let mut backend_b = DispatchClient::connect(b.dispatch).await;

    let slow = json!({"sql": SLOW});
    let sent_a = Instant::now();
    backend_a
        .event("EVENT_SLOW", slow.clone(), json!("s1"), json!("1"))
        .await;
    claim_held(&seed, "s1").await;
    let sent_b = Instant::now();
    backend_b
        .event("EVENT_SLOW", slow, json!("s1"), json!("1"))
        .await;
    let (ack_a, ack_b) = tokio::join!(
        async {
            let ack = backend_a.recv().await;
            (ack, Instant::now())
        },
        async {
            let ack = backend_b.recv().await;
            (ack, Instant::now())
        }
    );
    let ((ack_a, at_a), (ack_b, at_b)) = (ack_a, ack_b);
    assert_eq!(ack_a["t"], "EVENT_ROUNDTRIP", "{ack_a}");
    assert_eq!(ack_a["success"], true, "{ack_a}");
    assert!(ack_a.get("duplicate").is_none(), "{ack_a}");
    assert_eq!(ack_b["t"], "EVENT_ROUNDTRIP", "{ack_b}");
    assert_eq!(ack_b["success"], true, "{ack_b}");
    assert_eq!(ack_b["duplicate"], true, "{ack_b}");
    // Causal, not the order the test happened to read the two acks in:
    // A's attempt can't end before its 1.5 s query has run.
    assert!(
        at_b.duration_since(sent_a) >= Duration::from_millis(1500),
        "B acked {:?} after A's event was sent, before A's attempt could end",
        at_b.duration_since(sent_a)
    );
    eprintln!(
        "in-flight retry on node B acked {:?} after it was sent, {:?} after A's ack",
        at_b.duration_since(sent_b),
        at_b.duration_since(at_a)
    );

    // The slow event reached A's client once: `rows: 1`; the marker has 0.
    let marker = json!({"sql": "SELECT 1 AS one WHERE false"});
    let ack = backend_a
        .roundtrip("EVENT_SLOW", marker, json!("mark"))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    let seen = frames_until(&mut on_a, "WRITE_ACCEPTED", "rows", &json!(0)).await;
    assert_eq!(
        count(&seen, "WRITE_ACCEPTED", "rows", &json!(1)),
        1,
        "{seen:?}"
    );
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_id_whose_attempt_fails_on_one_node_is_run_by_the_node_that_waited() {
    // Node A's plugin queries time out at 1 s, node B's don't: the same
    // slow event fails on A and succeeds on B.
    let mut cluster = slow_cluster(1000).await;
    let a = cluster.start(1);
    cluster.setup.set("plugins", "query_timeout_ms", "5000");
    let b = cluster.start(2);
    let seed = Seed::open(&cluster.setup).await;
    let mut on_b = Client::connect(b.client, 32).await;
    let mut backend_a = DispatchClient::connect(a.dispatch).await;
    let mut backend_b = DispatchClient::connect(b.dispatch).await;

    let slow = json!({"sql": SLOW});
    backend_a
        .event("EVENT_SLOW", slow.clone(), json!("x1"), json!("1"))
        .await;
    claim_held(&seed, "x1").await;
    backend_b
        .event("EVENT_SLOW", slow, json!("x1"), json!("1"))
        .await;
    let (ack_a, ack_b) = tokio::join!(
        async {
            let ack = backend_a.recv().await;
            (ack, Instant::now())
        },
        async {
            let ack = backend_b.recv().await;
            (ack, Instant::now())
        }
    );
    let ((ack_a, at_a), (ack_b, at_b)) = (ack_a, ack_b);
    assert_eq!(ack_a["success"], false, "{ack_a}");
    assert_eq!(ack_a["error"]["code"], "WRITE_REJECTED", "{ack_a}");
    // B waited for A's outcome, then ran the event itself: delivered once.
    assert_eq!(ack_b["success"], true, "{ack_b}");
    assert!(ack_b.get("duplicate").is_none(), "{ack_b}");
    assert!(at_b >= at_a, "B acked before A's outcome");
    let frame = on_b.next().await;
    assert_eq!(frame["t"], "WRITE_ACCEPTED", "{frame}");
    assert_eq!(frame["d"]["rows"], 1, "{frame}");
    // A's failure is on record once, as every failure is.
    assert_eq!(seed.error_rows("x1").await, 1);
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_sent_to_two_nodes_reaches_the_sink_once() {
    // Several claim batches (64 rows) of records.
    const N: usize = 300;
    // The sink is up from the start and slow (10 ms a POST). Each node
    // first fails half of the ids, so each writes records, and its
    // deliverer, woken by them, claims from the one backlog the two share;
    // then each fails the other half too (the records are already there).
    // Neither depends on timing: a sink that came up later would leave
    // the contention to the nodes' retry timers (which back off to 30 s),
    // and ids sent to both at once could all be recorded by one node.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let (sink, posts) = counting_sink_on(listener);
    let mut cluster = TestCluster::new(5, "reject").await;
    cluster.setup.http_sink(&format!("http://{sink}/events"));
    let a = cluster.start(1);
    let b = cluster.start(2);
    let mut backend_a = DispatchClient::connect(a.dispatch).await;
    let mut backend_b = DispatchClient::connect(b.dispatch).await;

    // No route: every attempt fails, on both nodes, with the same ids.
    let ids: Vec<String> = (0..N).map(|i| format!("f{i}")).collect();
    let (first, second) = ids.split_at(N / 2);
    async fn fail_all(backend: &mut DispatchClient, ids: &[String]) {
        for id in ids {
            let d = json!({"channel_id": "1"});
            backend
                .event("EVENT_NOWHERE", d, json!(id), json!("1"))
                .await;
        }
        for (id, ack) in backend.acks(ids.len()).await {
            assert_eq!(ack["success"], false, "{id}: {ack}");
            assert_eq!(ack["error"]["code"], "NO_ROUTE", "{id}: {ack}");
        }
    }
    tokio::join!(
        fail_all(&mut backend_a, first),
        fail_all(&mut backend_b, second)
    );
    tokio::join!(
        fail_all(&mut backend_a, second),
        fail_all(&mut backend_b, first)
    );

    let seed = Seed::open(&cluster.setup).await;
    eventually(Duration::from_secs(60), "every record POSTed", async || {
        let posts = posts.lock().unwrap();
        ids.iter().all(|id| posts.contains_key(id))
    })
    .await;
    eventually(Duration::from_secs(10), "every row marked", async || {
        seed.count(
            "SELECT COUNT(*) FROM event_errors WHERE delivered_at IS NULL AND event_id LIKE $1",
            "f%",
        )
        .await
            == 0
    })
    .await;
    let posts = posts.lock().unwrap().clone();
    let twice: Vec<_> = posts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "POSTed more than once: {twice:?}");
    assert_eq!(posts.len(), N);
    let by = |gw: &common::Gateway| format!("{}:%", gw.pid());
    let sql = "SELECT COUNT(*) FROM event_errors WHERE claimed_by LIKE $1";
    let (from_a, from_b) = (
        seed.count(sql, &by(&a)).await,
        seed.count(sql, &by(&b)).await,
    );
    eprintln!("records delivered by node A: {from_a}, by node B: {from_b}");
    assert_eq!(from_a + from_b, N as i64);
    // Both nodes delivered: the claims really were contended.
    assert!(from_a > 0 && from_b > 0, "A {from_a}, B {from_b}");
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_nats_closes_its_sessions_and_admits_again_when_it_is_back() {
    let nats = Proxy::start("127.0.0.1:4222".parse().unwrap());
    // One session per user: the cut-off node must not keep one while
    // another node admits the same user.
    let mut cluster = TestCluster::new(1, "reject").await;
    let other = cluster.start(2);
    cluster
        .setup
        .set("cluster", "nats_url", &format!("\"nats://{}\"", nats.addr));
    let node = cluster.start(1);
    let mut sessions = Vec::new();
    for user in [41, 42] {
        sessions.push(try_session(&node, user).await.unwrap());
    }
    assert!(matches!(try_session(&other, 41).await, Err(4010)));

    let cut = Instant::now();
    nats.cut();
    for ws in &mut sessions {
        let code = read_close_within(ws, Duration::from_millis(LEASE_MS * 4)).await;
        assert_eq!(code, Some(1001));
    }
    let fenced = cut.elapsed();
    eprintln!("sessions closed {fenced:?} after NATS was cut (lease_ms {LEASE_MS})");
    // Before any other node could count this one dead.
    assert!(
        fenced < Duration::from_millis(LEASE_MS),
        "fenced {fenced:?} after the cut"
    );
    assert!(matches!(try_session(&node, 43).await, Err(1001)));
    // The other node admits the user once the cut-off node's lease is out.
    let mut moved = None;
    eventually(
        Duration::from_millis(LEASE_MS * 10),
        "the other node admits user 41",
        async || {
            moved = try_session(&other, 41).await.ok();
            moved.is_some()
        },
    )
    .await;

    nats.restore();
    let restored = Instant::now();
    let mut admitted = None;
    eventually(
        Duration::from_secs(30),
        "the node admits again",
        async || {
            admitted = try_session(&node, 43).await.ok();
            admitted.is_some()
        },
    )
    .await;
    eprintln!(
        "admitting again {:?} after NATS was back",
        restored.elapsed()
    );
    // Its old sessions don't count; the one on the other node does.
    assert!(matches!(try_session(&node, 41).await, Err(4010)));
    assert!(try_session(&node, 42).await.is_ok());
    drop((moved, admitted));
    node.stop();
    other.stop();
}
