//! Cluster mode (DESIGN §9) with real processes: three `serve` nodes on
//! one PostgreSQL schema and one NATS JetStream (127.0.0.1:4222), each
//! test under its own `cluster.subject_prefix` (its KV buckets are
//! deleted afterwards). Session limits are exact across nodes, eviction
//! and revocation reach the node holding the session, a killed node's
//! slots free up, and a node id can't be live twice.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::cluster::{LEASE_MS, NATS_URL, TestCluster, try_session};
use common::{
    DISPATCH_SECRET, Gateway, Setup, WsMessage, connect_client, eventually, http_request,
    read_close, read_json, token,
};
use futures_util::StreamExt;

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
