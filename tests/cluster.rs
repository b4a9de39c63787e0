//! Cluster mode (DESIGN §9) with real processes: three `serve` nodes on
//! one PostgreSQL schema and one NATS JetStream (127.0.0.1:4222), each
//! test under its own `cluster.subject_prefix` (its KV buckets are
//! deleted afterwards). Session limits are exact across nodes, eviction
//! and revocation reach the node holding the session, a killed node's
//! slots free up, a node id can't be live twice, and plugins' `online`
//! answers for sessions on every node. Events fan out
//! through the JetStream stream to every node exactly once and in
//! dispatch order; a node cut off from NATS fails events with
//! `BUS_UNAVAILABLE`, keeps its sessions, and catches up (or closes its
//! sessions with 4000 when the frames it missed are gone).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::client::Client;
use common::cluster::{LEASE_MS, NATS_URL, TestCluster, try_session};
use common::dispatch::{DispatchClient, Seed};
use common::proxy::Proxy;
use common::{
    DISPATCH_SECRET, Gateway, Setup, WsMessage, connect_client, eventually, http_request,
    read_close, read_json, token,
};
use futures_util::StreamExt;
use serde_json::{Value, json};

#[tokio::test]
async fn cluster_mode_on_sqlite_is_refused_naming_both_keys() {
    let mut setup = Setup::sqlite();
    setup.set("cluster", "nats_url", &format!("\"{NATS_URL}\""));
    setup.write_config();
    let out = setup.run_expecting_exit(&["serve"], Duration::from_secs(30));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cluster.nats_url") && stderr.contains("database.url is sqlite://"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_node_id_already_live_refuses_to_start_naming_the_other_node() {
    let mut cluster = TestCluster::new(5, "reject").await;
    let first = cluster.start(7);
    cluster.setup.set("cluster", "node_id", "7");
    cluster.setup.write_config();
    let out = cluster
        .setup
        .run_expecting_exit(&["serve"], Duration::from_secs(30));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cluster.node_id 7 is already live")
            && stderr.contains(&first.client.to_string())
            && stderr.contains(&format!("pid {}", first.pid())),
        "{stderr}"
    );
    // A clean stop releases the lease: the id can be taken again at once.
    first.stop();
    let again = cluster.start(7);
    let status = TestCluster::status(&again).await;
    assert_eq!(status["node_id"], 7);
    again.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simultaneous_connects_of_one_user_over_three_nodes_are_exact() {
    const MAX: usize = 4;
    let mut cluster = TestCluster::new(MAX as u32, "reject").await;
    let nodes = vec![cluster.start(1), cluster.start(2), cluster.start(3)];

    // Dozens of connects of one user at the same instant, spread evenly.
    let attempts: Vec<_> = (0..45)
        .map(|i| {
            let (addr, t) = (nodes[i % 3].client, token(42));
            tokio::spawn(async move {
                let mut ws = connect_client(addr, &t).await;
                let first = ws.next().await.unwrap().unwrap();
                (i % 3, ws, first)
            })
        })
        .collect();
    let mut open = Vec::new();
    let mut rejected = 0;
    for attempt in attempts {
        let (node, ws, first) = attempt.await.unwrap();
        match first {
            WsMessage::Text(text) => {
                assert!(text.contains("HELLO"), "{text}");
                open.push((node, ws));
            }
            WsMessage::Close(Some(frame)) => {
                assert_eq!(u16::from(frame.code), 4010);
                rejected += 1;
            }
            other => panic!("unexpected first frame {other:?}"),
        }
    }
    assert_eq!(open.len(), MAX, "sessions admitted across the cluster");
    assert_eq!(rejected, 45 - MAX);
    assert!(matches!(try_session(&nodes[0], 42).await, Err(4010)));

    // Every node lists the three, with the sessions their leases report.
    for gw in &nodes {
        eventually(
            Duration::from_secs(10),
            "GET /cluster shows 3 nodes, 4 sessions",
            async || {
                let status = TestCluster::status(gw).await;
                let listed = status["nodes"].as_array().unwrap();
                let sessions: u64 = listed.iter().map(|n| n["sessions"].as_u64().unwrap()).sum();
                listed.len() == 3 && sessions == MAX as u64
            },
        )
        .await;
    }

    // kill -9 a node holding sessions: its slots free within lease_ms,
    // and the other nodes admit that many again, not one more.
    let victim = open[0].0;
    let freed = open.iter().filter(|(n, _)| *n == victim).count();
    open.retain(|(n, _)| *n != victim);
    let mut nodes: Vec<Option<Gateway>> = nodes.into_iter().map(Some).collect();
    nodes[victim].take().unwrap().kill();
    let alive: Vec<&Gateway> = nodes.iter().flatten().collect();
    let mut admitted = Vec::new();
    eventually(
        Duration::from_millis(LEASE_MS * 10),
        "the killed node's slots free up",
        async || {
            if let Ok(ws) = try_session(alive[0], 42).await {
                admitted.push(ws);
            }
            admitted.len() == freed
        },
    )
    .await;
    assert!(matches!(try_session(alive[1], 42).await, Err(4010)));
    eventually(
        Duration::from_secs(10),
        "GET /cluster drops the dead node",
        async || {
            let status = TestCluster::status(alive[0]).await;
            status["nodes"].as_array().unwrap().len() == 2
        },
    )
    .await;
    drop(open);
}

#[tokio::test]
async fn evict_oldest_closes_the_oldest_session_on_whichever_node_holds_it() {
    let mut cluster = TestCluster::new(1, "evict_oldest").await;
    let a = cluster.start(1);
    let b = cluster.start(2);

    let mut on_a = connect_client(a.client, &token(9)).await;
    assert_eq!(read_json(&mut on_a).await["t"], "HELLO");
    let mut on_b = connect_client(b.client, &token(9)).await;
    assert_eq!(read_json(&mut on_b).await["t"], "HELLO");
    assert_eq!(read_close(&mut on_a).await, Some(4011));

    // And back the other way; on the same node too.
    let mut again_a = connect_client(a.client, &token(9)).await;
    assert_eq!(read_json(&mut again_a).await["t"], "HELLO");
    assert_eq!(read_close(&mut on_b).await, Some(4011));
    let mut second_a = connect_client(a.client, &token(9)).await;
    assert_eq!(read_json(&mut second_a).await["t"], "HELLO");
    assert_eq!(read_close(&mut again_a).await, Some(4011));
    a.stop();
    b.stop();
}

#[tokio::test]
async fn a_revocation_on_one_node_closes_sessions_on_another_with_4004() {
    let mut cluster = TestCluster::new(5, "reject").await;
    let a = cluster.start(1);
    let b = cluster.start(2);
    // Issued a second ago: covered by a revocation made now.
    let issued = otako_gateway::token::now_s() - 1;
    let mut on_b = connect_client(b.client, &common::token_at(11, issued)).await;
    assert_eq!(read_json(&mut on_b).await["t"], "HELLO");
    let bearer = format!("Bearer {DISPATCH_SECRET}");
    let (status, body) = http_request(
        a.admin,
        "POST",
        "/admin/revoke",
        &[("Authorization", &bearer)],
        Some(r#"{"user_id":"11"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(read_close(&mut on_b).await, Some(4004));
    a.stop();
    b.stop();
}

/// A `NOOP` event for `user` on channel 1 carrying `n`.
fn noop(user: u64, n: u64) -> Value {
    json!({"user_id": user.to_string(), "channel_id": "1", "n": n})
}

/// The client's next frame, checked: event `t` with sequence `s`.
async fn expect_frame(client: &mut Client, t: &str, s: u64) -> Value {
    let frame = client.next().await;
    assert_eq!(frame["t"], t, "{frame}");
    assert_eq!(frame["s"], s, "{frame}");
    frame
}

/// Sends NOOP events 1..=`count` for user 11 (ids `<tag><n>`), each acked
/// `success:true` and received by `seen_by` before the next.
async fn send_seen(dispatch: &mut DispatchClient, seen_by: &mut Client, count: u64, tag: &str) {
    for n in 1..=count {
        let ack = dispatch
            .roundtrip("EVENT_NOOP", noop(11, n), json!(format!("{tag}{n}")))
            .await;
        assert_eq!(ack["success"], true, "{ack}");
        assert_eq!(expect_frame(seen_by, "NOOP", n).await["d"]["n"], n);
    }
}

/// Waits until `gw` says it lost its NATS connection.
async fn wait_disconnected(gw: &Gateway) {
    eventually(
        Duration::from_secs(10),
        "the node notices it is cut off from NATS",
        async || gw.log().contains("disconnected from NATS"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_reaches_every_node_exactly_once_for_a_channel_and_for_users() {
    let mut cluster = TestCluster::for_events(LEASE_MS).await;
    let a = cluster.start(1);
    let b = cluster.start(2);
    let c = cluster.start(3);
    let seed = Seed::open(&cluster.setup).await;
    // Users 10, 11, 12 in channel 1; 13 outside it.
    seed.example().await;
    let mut eleven_a = Client::connect(a.client, 11).await;
    let mut twelve_a = Client::connect(a.client, 12).await;
    let mut twelve_b = Client::connect(b.client, 12).await;
    let mut ten_c = Client::connect(c.client, 10).await;
    let mut outsider_c = Client::connect(c.client, 13).await;
    let mut dispatch = DispatchClient::connect(a.dispatch).await;

    // A channel audience: every member's session on every node.
    let created = json!({"id": "3", "channel_id": "1"});
    let ack = dispatch
        .roundtrip("EVENT_MESSAGE_CREATE", created.clone(), json!("e1"))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    for client in [&mut eleven_a, &mut twelve_a, &mut twelve_b, &mut ten_c] {
        let frame = expect_frame(client, "MESSAGE_CREATE", 1).await;
        assert_eq!(frame["d"]["id"], "3");
    }
    // The backend's retry on another node is a duplicate, not a second broadcast.
    let mut dispatch_b = DispatchClient::connect(b.dispatch).await;
    let ack = dispatch_b
        .roundtrip("EVENT_MESSAGE_CREATE", created.clone(), json!("e1"))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    assert_eq!(ack["duplicate"], true, "{ack}");

    // A users audience: user 12's sessions on A and B.
    let ack = dispatch
        .roundtrip("EVENT_NOOP", noop(12, 1), json!("e2"))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    for client in [&mut twelve_a, &mut twelve_b] {
        assert_eq!(expect_frame(client, "NOOP", 2).await["d"]["n"], 1);
    }

    // Nothing came twice: each session's next frame is the next event.
    let ack = dispatch
        .roundtrip("EVENT_MESSAGE_CREATE", created, json!("e3"))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    expect_frame(&mut eleven_a, "MESSAGE_CREATE", 2).await;
    expect_frame(&mut twelve_a, "MESSAGE_CREATE", 3).await;
    expect_frame(&mut twelve_b, "MESSAGE_CREATE", 3).await;
    expect_frame(&mut ten_c, "MESSAGE_CREATE", 2).await;
    // And nothing reached the non-member: its first frame is its own.
    let ack = dispatch
        .roundtrip("EVENT_NOOP", noop(13, 7), json!("e4"))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    assert_eq!(expect_frame(&mut outsider_c, "NOOP", 1).await["d"]["n"], 7);

    // The bus's metrics: A published the four events (B's duplicate
    // published nothing); C read all four from the stream, nothing left.
    let publish = "otako_cluster_bus_publish_latency_seconds_count";
    assert_eq!(a.metric(publish, "").await, 4.0);
    assert_eq!(b.metric(publish, "").await, 0.0);
    let delay = "otako_cluster_bus_delivery_delay_seconds_count";
    assert_eq!(c.metric(delay, "").await, 4.0);
    let (_, body) = c.admin_get("/metrics").await;
    assert!(
        body.lines()
            .any(|l| l == "otako_cluster_bus_consumer_lag 0"),
        "{body}"
    );
    // A healthy run never starts a consumer again.
    for gw in [&a, &b, &c] {
        let restarts = "otako_cluster_bus_consumer_restarts_total";
        assert_eq!(gw.metric(restarts, "").await, 0.0);
    }
    for gw in [a, b, c] {
        gw.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_events_on_one_channel_arrive_in_dispatch_order_on_every_node() {
    const EVENTS: u64 = 200;
    let mut cluster = TestCluster::for_events(LEASE_MS).await;
    let nodes = [cluster.start(1), cluster.start(2), cluster.start(3)];
    let seed = Seed::open(&cluster.setup).await;
    seed.user(11, "bob").await;
    let mut clients = Vec::new();
    for gw in &nodes {
        clients.push(Client::connect(gw.client, 11).await);
    }
    let mut dispatch = DispatchClient::connect(nodes[0].dispatch).await;
    let started = std::time::Instant::now();
    for n in 0..EVENTS {
        dispatch
            .event("EVENT_NOOP", noop(11, n), json!(format!("o{n}")), json!(n))
            .await;
    }
    for (id, ack) in dispatch.acks(EVENTS as usize).await {
        assert_eq!(ack["success"], true, "{id}: {ack}");
    }
    let acked = started.elapsed();
    for (node, client) in clients.iter_mut().enumerate() {
        for n in 0..EVENTS {
            let frame = expect_frame(client, "NOOP", n + 1).await;
            assert_eq!(frame["d"]["n"], n, "node {node}: {frame}");
        }
    }
    eprintln!(
        "{EVENTS} events acked in {acked:?}, on every node's client in {:?} (debug build, 3 nodes)",
        started.elapsed()
    );
    for gw in nodes {
        gw.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_nats_fails_events_with_bus_unavailable_keeps_its_sessions_and_recovers()
 {
    let mut cluster = TestCluster::for_events(60_000).await;
    let proxy = Proxy::start("127.0.0.1:4222".parse().unwrap());
    let a = cluster.start_via(1, &proxy);
    let b = cluster.start(2);
    let seed = Seed::open(&cluster.setup).await;
    seed.user(11, "bob").await;
    let mut on_a = Client::connect(a.client, 11).await;
    let mut on_b = Client::connect(b.client, 11).await;
    let mut dispatch = DispatchClient::connect(a.dispatch).await;

    proxy.cut();
    wait_disconnected(&a).await;
    for attempt in 0..3 {
        let ack = dispatch
            .roundtrip("EVENT_NOOP", noop(11, 1), json!("u1"))
            .await;
        assert_eq!(ack["success"], false, "attempt {attempt}: {ack}");
        assert_eq!(ack["error"]["code"], "BUS_UNAVAILABLE", "{ack}");
    }
    // The outage is logged once, the failed event once.
    let outage = "events fail with BUS_UNAVAILABLE until it is back";
    assert_eq!(a.log().matches(outage).count(), 1, "{}", a.log());
    assert_eq!(seed.error_rows("u1").await, 1);
    assert_eq!(
        a.metric("otako_cluster_bus_publish_failures_total", "")
            .await,
        3.0
    );

    // NATS is back: the backend's retry goes through, no restart needed.
    proxy.restore();
    eventually(
        Duration::from_secs(20),
        "the event goes through once NATS is back",
        async || {
            let ack = dispatch
                .roundtrip("EVENT_NOOP", noop(11, 1), json!("u1"))
                .await;
            assert_ne!(ack["duplicate"], true, "{ack}");
            ack["success"] == true
        },
    )
    .await;
    // The sessions stayed open: the same connections get the event once.
    let ack = dispatch
        .roundtrip("EVENT_NOOP", noop(11, 2), json!("u2"))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(expect_frame(client, "NOOP", 1).await["d"]["n"], 1);
        assert_eq!(expect_frame(client, "NOOP", 2).await["d"]["n"], 2);
    }
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_nats_catches_up_from_the_stream() {
    let mut cluster = TestCluster::for_events(60_000).await;
    let proxy = Proxy::start("127.0.0.1:4222".parse().unwrap());
    let a = cluster.start(1);
    let b = cluster.start_via(2, &proxy);
    let seed = Seed::open(&cluster.setup).await;
    seed.user(11, "bob").await;
    let mut on_a = Client::connect(a.client, 11).await;
    let mut on_b = Client::connect(b.client, 11).await;
    let mut dispatch = DispatchClient::connect(a.dispatch).await;

    proxy.cut();
    wait_disconnected(&b).await;
    send_seen(&mut dispatch, &mut on_a, 5, "c").await;
    proxy.restore();
    // Node B gets what it missed, in order, then live events.
    for n in 1..=5 {
        assert_eq!(expect_frame(&mut on_b, "NOOP", n).await["d"]["n"], n);
    }
    let ack = dispatch
        .roundtrip("EVENT_NOOP", noop(11, 6), json!("c6"))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    assert_eq!(expect_frame(&mut on_b, "NOOP", 6).await["d"]["n"], 6);
    assert_eq!(expect_frame(&mut on_a, "NOOP", 6).await["d"]["n"], 6);
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_missed_frames_are_gone_closes_its_sessions_with_4000() {
    let mut cluster = TestCluster::for_events(60_000).await;
    // A stream that keeps only 3 frames, made before any node does.
    let js = async_nats::jetstream::new(async_nats::connect(NATS_URL).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: cluster.stream(),
        subjects: vec![format!("{}.fanout", cluster.prefix)],
        max_messages: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    let proxy = Proxy::start("127.0.0.1:4222".parse().unwrap());
    let a = cluster.start(1);
    let b = cluster.start_via(2, &proxy);
    let seed = Seed::open(&cluster.setup).await;
    seed.user(11, "bob").await;
    let mut on_a = Client::connect(a.client, 11).await;
    let on_b = Client::connect(b.client, 11).await;
    let session = on_b.session_id();
    let mut on_b = on_b.ws;
    let mut dispatch = DispatchClient::connect(a.dispatch).await;

    proxy.cut();
    wait_disconnected(&b).await;
    // Node A keeps up, so the stream's limit never costs it a frame.
    send_seen(&mut dispatch, &mut on_a, 6, "g").await;
    proxy.restore();
    // No frame of the rest is passed off as the whole: the session closes.
    let first = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match on_b.next().await.unwrap().unwrap() {
                WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("no close in time");
    match first {
        WsMessage::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 4000),
        other => panic!("expected a 4000 close, got {other:?}"),
    }
    // The session is gone: a resume gets a new one, so the client refetches.
    let resumed = Client::resume(b.client, 11, &session, "0").await;
    assert!(!resumed.resumed(), "{}", resumed.hello);
    assert_eq!(resumed.reason(), Some("unknown_session"));
    assert!(b.metric("otako_cluster_bus_gaps_total", "").await >= 1.0);
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_fanout_stream_is_made_again_and_events_flow_again() {
    let mut cluster = TestCluster::for_events(LEASE_MS).await;
    let a = cluster.start(1);
    let b = cluster.start(2);
    let seed = Seed::open(&cluster.setup).await;
    seed.user(11, "bob").await;
    let mut on_b = Client::connect(b.client, 11).await;
    let mut dispatch = DispatchClient::connect(a.dispatch).await;
    let ack = dispatch
        .roundtrip("EVENT_NOOP", noop(11, 1), json!("l1"))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    expect_frame(&mut on_b, "NOOP", 1).await;

    // As if NATS had lost its JetStream store.
    let js = async_nats::jetstream::new(async_nats::connect(NATS_URL).await.unwrap());
    js.delete_stream(cluster.stream()).await.unwrap();
    // Node B can't tell what it missed: its sessions close, to be refetched.
    assert_eq!(read_close(&mut on_b.ws).await, Some(4000));
    // The nodes make the stream again by themselves; events flow again.
    let mut again = Client::connect(b.client, 11).await;
    eventually(
        Duration::from_secs(20),
        "events go through again",
        async || {
            let ack = dispatch
                .roundtrip("EVENT_NOOP", noop(11, 2), json!("l2"))
                .await;
            ack["success"] == true
        },
    )
    .await;
    assert_eq!(expect_frame(&mut again, "NOOP", 1).await["d"]["n"], 2);
    // B noticed the stream was gone and started its consumer again.
    assert!(
        b.metric("otako_cluster_bus_consumer_restarts_total", "")
            .await
            >= 1.0
    );
    a.stop();
    b.stop();
}

/// Asks `online` through the log plugin on one node, for users 21, 22 and
/// 23; the answer reaches every session, here `watcher`'s.
async fn online_seen(dispatch: &mut DispatchClient, watcher: &mut Client, id: &str) -> Vec<String> {
    let ack = dispatch
        .roundtrip(
            "EVENT_ONLINE",
            json!({"user_ids": ["21", "22", "23"]}),
            json!(id),
        )
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    let frame = watcher.next().await;
    assert_eq!(frame["t"], "ONLINE", "{frame}");
    let mut online: Vec<String> = serde_json::from_value(frame["d"]["online"].clone()).unwrap();
    online.sort();
    online
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_in_plugins_answers_for_sessions_on_every_node() {
    let mut cluster = TestCluster::for_events(LEASE_MS).await;
    cluster
        .setup
        .route("EVENT_ONLINE", &common::test_plugin("log_plugin"), "");
    let a = cluster.start(1);
    let b = cluster.start(2);
    let mut dispatch = DispatchClient::connect(a.dispatch).await;
    // 22 on the node that runs the plugin, 21 only on the other; 23 nowhere.
    let mut twenty_two = Client::connect(a.client, 22).await;
    let twenty_one = Client::connect(b.client, 21).await;
    // Node A answers from its watched copy of the slots, a moment behind B.
    let mut n = 0;
    let mut expect_online = async |want: &[&str], what: &str| {
        eventually(Duration::from_secs(10), what, async || {
            n += 1;
            online_seen(&mut dispatch, &mut twenty_two, &format!("o{n}")).await == want
        })
        .await;
    };
    expect_online(&["21", "22"], "node A sees user 21 online on node B").await;
    drop(twenty_one);
    expect_online(&["22"], "node A sees user 21 go offline on node B").await;
    a.stop();
    b.stop();
}
