//! The promises of the event path, each broken on purpose: a graceful stop
//! under a pipelined stream, a crash between fan-out and ack, a full disk,
//! a peer that stops reading acks, event ids with NUL bytes, and malformed
//! events whose id can be read.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::client::Client;
use common::dispatch::{DispatchClient, Seed, echo_event, echo_setup};
use common::{Setup, Tmpfs, eventually, test_plugin};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_acks_every_event_it_read_before_sessions_close() {
    let mut setup = echo_setup();
    setup.set("dispatch", "max_inflight", "256");
    setup.set("sessions", "outbound_queue", "1000000");
    let gateway = setup.start();
    let mut client = Client::connect(gateway.client, 5).await;
    let backend = DispatchClient::connect(gateway.dispatch).await;
    let (mut out, mut acks_in) = backend.ws.split();

    // The backend pipelines as fast as the gateway reads.
    let sender = tokio::spawn(async move {
        for id in 1..=200_000u64 {
            if out.send(Message::text(echo_event(id))).await.is_err() {
                return id;
            }
        }
        0
    });

    // Acks, until the gateway's close frame. When the stop begins the
    // backend looks away for a moment, as a busy one would: acks pile up
    // unread, and a close that reset the socket would discard them.
    let look_away = Arc::new(AtomicBool::new(false));
    let looking_away = look_away.clone();
    let acks = tokio::spawn(async move {
        let mut acked = HashMap::new();
        loop {
            if looking_away.swap(false, Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            match tokio::time::timeout(Duration::from_secs(30), acks_in.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    let ack: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(ack["t"], "EVENT_ROUNDTRIP", "{ack}");
                    acked.insert(ack["event_id"].as_str().unwrap().to_owned(), ack);
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return (acked, frame.map(|f| u16::from(f.code)));
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("dispatch connection ended without a close frame: {other:?}"),
            }
        }
    });

    // Let a stream build up, then stop the gateway mid-stream.
    let mut delivered = HashSet::new();
    while delivered.len() < 2_000 {
        let frame = client.next().await;
        delivered.insert(frame["d"]["event_id"].as_str().unwrap().to_owned());
    }
    look_away.store(true, Ordering::Relaxed);
    gateway.terminate();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), client.ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                delivered.insert(frame["d"]["event_id"].as_str().unwrap().to_owned());
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1001));
                break;
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("client session ended without 1001: {other:?}"),
        }
    }
    let (acked, code) = acks.await.unwrap();
    let mut gateway = gateway;
    assert!(gateway.wait_exit(Duration::from_secs(30)).success());
    sender.abort();

    assert_eq!(
        code,
        Some(1001),
        "the dispatch connection must close with 1001"
    );
    // The order is the gateway's own: sessions close once the dispatch
    // connections have drained. When the two closes arrive here depends
    // on how much of each backlog the test has read, so the log says it.
    let log = gateway.log();
    let drained = log.find("dispatch drained; closing client sessions");
    let stopped = log.find("gateway stopped");
    assert!(
        drained.is_some() && drained < stopped,
        "sessions must close only after the dispatch connection drained:\n{log}"
    );
    let unacked: Vec<&String> = delivered
        .iter()
        .filter(|id| !acked.contains_key(*id))
        .collect();
    assert!(
        unacked.is_empty(),
        "{} events reached a session but were never acked, e.g. {:?}",
        unacked.len(),
        &unacked[..unacked.len().min(5)]
    );
    let failed: Vec<&Value> = acked.values().filter(|a| a["success"] != true).collect();
    assert!(failed.is_empty(), "failed acks: {failed:?}");
    // Every acked event reached the session too: nothing acked was lost.
    let undelivered = acked.keys().filter(|id| !delivered.contains(*id)).count();
    assert_eq!(undelivered, 0);
}

#[tokio::test]
async fn a_crash_between_fanout_and_ack_makes_the_retry_a_duplicate() {
    let setup = echo_setup();
    let mut gateway =
        setup.start_verb_env("serve", &[("OTAKO_FAILPOINT", "dispatch-after-fanout")]);
    let mut first = Client::connect(gateway.client, 5).await;
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    backend.send_text(&echo_event(42)).await;
    // The process aborts right after the fan-out, before the ack (the
    // frame may or may not have left its session's queue).
    assert!(!gateway.wait_exit(Duration::from_secs(30)).success());
    while let Some(Ok(message)) = first.ws.next().await {
        assert!(
            !matches!(message, Message::Close(_)),
            "a crash sends no close"
        );
    }
    assert!(
        !matches!(backend.ws.next().await, Some(Ok(Message::Text(_)))),
        "no ack after a crash"
    );

    let gateway = setup.start();
    let mut second = Client::connect(gateway.client, 5).await;
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    backend.send_text(&echo_event(42)).await;
    let ack = backend.recv().await;
    assert_eq!(ack["success"], true, "{ack}");
    assert_eq!(ack["duplicate"], true, "{ack}");
    second.expect_silence(Duration::from_millis(300)).await;
    assert!(
        gateway
            .log()
            .contains("event id claimed by an attempt that never finished"),
        "{}",
        gateway.log()
    );
    // Said once: the next retry is answered from memory, quietly.
    backend.send_text(&echo_event(42)).await;
    assert_eq!(backend.recv().await["duplicate"], true);
    assert_eq!(
        gateway
            .log()
            .matches("event id claimed by an attempt that never finished")
            .count(),
        1
    );
    assert!(gateway.stop().success());
}

#[tokio::test]
async fn a_full_disk_delivers_nothing_says_db_error_and_recovers_by_itself() {
    let mut setup = echo_setup();
    let disk = Tmpfs::mount(&setup.dir.path().join("data"), "4m");
    // The error log's file sink goes elsewhere: this test is about claims.
    setup.set("logging", "path", "\"sink/event-errors.jsonl\"");
    let gateway = setup.start();
    let mut client = Client::connect(gateway.client, 5).await;
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    backend.send_text(&echo_event(1)).await;
    assert_eq!(backend.recv().await["success"], true);
    assert_eq!(client.next().await["d"]["event_id"], "1");

    disk.fill();
    let mut failed = Vec::new();
    for id in 2..=200u64 {
        backend.send_text(&echo_event(id)).await;
    }
    let acks = backend.acks(199).await;
    for (id, ack) in &acks {
        if ack["success"] == false {
            assert_eq!(ack["error"]["code"], "DB_ERROR", "{ack}");
            failed.push(id.clone());
        }
    }
    assert!(!failed.is_empty(), "no write failed on a full disk");
    // Nothing whose claim failed reached a session.
    let mut seen = HashSet::new();
    while let Ok(frame) = tokio::time::timeout(Duration::from_millis(300), client.next()).await {
        seen.insert(frame["d"]["event_id"].as_str().unwrap().to_owned());
    }
    for id in &failed {
        assert!(
            !seen.contains(id),
            "event {id} was delivered although its claim failed"
        );
    }
    let (status, body) = gateway.admin_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cannot record event claims"), "{body}");

    disk.free();
    eventually(Duration::from_secs(10), "/readyz to recover", async || {
        gateway.admin_get("/readyz").await.0 == 200
    })
    .await;
    // The backend's retries now go through, each delivered exactly once.
    for id in &failed {
        backend.send_text(&echo_event(id.parse().unwrap())).await;
    }
    let retried = backend.acks(failed.len()).await;
    assert!(
        retried
            .values()
            .all(|a| a["success"] == true && a.get("duplicate").is_none())
    );
    let mut again = HashSet::new();
    while again.len() < failed.len() {
        let frame = client.next().await;
        assert!(again.insert(frame["d"]["event_id"].as_str().unwrap().to_owned()));
    }
    client.expect_silence(Duration::from_millis(200)).await;
    assert!(gateway.stop().success());
    drop(disk);
}

#[tokio::test]
async fn a_peer_that_stops_reading_acks_is_closed_and_the_gateway_keeps_serving() {
    let mut setup = Setup::sqlite();
    setup.route("EVENT_NOOP", &test_plugin("noop_plugin"), "");
    setup.set("dispatch", "ping_timeout_ms", "1500");
    let gateway = setup.start();
    Seed::open(&setup).await.user(1, "someone").await;
    // A backend with a tiny receive buffer that never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(gateway.dispatch).await.unwrap();
    let request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/dispatch", gateway.dispatch),
    )
    .unwrap();
    let mut request = request;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", common::DISPATCH_SECRET)
            .parse()
            .unwrap(),
    );
    let (ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    let (mut out, _unread) = ws.split();
    let long = "x".repeat(120);
    let writer = tokio::spawn(async move {
        for id in 0..100_000u64 {
            let frame = json!({"t": "EVENT_NOOP", "d": {"user_id": "1"}, "op": 0, "s": long, "event_id": format!("{long}{id}")});
            // PINGs keep coming: only the unread acks can end this connection.
            let ping = json!({"op": 1, "t": "PING", "d": {"ts": id}});
            for message in [frame, ping]
                .into_iter()
                .take(if id % 50 == 0 { 2 } else { 1 })
            {
                if out.send(Message::text(message.to_string())).await.is_err() {
                    return;
                }
            }
        }
    });
    eventually(
        Duration::from_secs(30),
        "the stall to be noticed",
        async || {
            gateway
                .log()
                .contains("the dispatch peer stopped reading acks")
        },
    )
    .await;
    eventually(
        Duration::from_secs(15),
        "the connection to end",
        async || gateway.metric("otako_dispatch_connections", "").await == 0.0,
    )
    .await;
    writer.abort();
    // Still serving: a new backend connection gets its ack.
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    let ack = backend
        .roundtrip("EVENT_NOOP", json!({"user_id": "1"}), json!("after"))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    assert!(gateway.stop().success());
}

async fn nul_ids_on(mut setup: Setup) {
    setup.route("EVENT_ECHO", &test_plugin("config_echo_plugin"), "");
    let gateway = setup.start();
    let seed = Seed::open(&setup).await;
    let mut client = Client::connect(gateway.client, 5).await;
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    // Two ids that differ only around a NUL byte stay two ids.
    for id in ["a\u{0}b", "a\\0b"] {
        let ack = backend.roundtrip("EVENT_ECHO", json!({}), json!(id)).await;
        assert_eq!(ack["success"], true, "{ack}");
        assert_eq!(ack["event_id"], id);
        assert_eq!(client.next().await["d"]["event_id"], json!(id));
        let again = backend.roundtrip("EVENT_ECHO", json!({}), json!(id)).await;
        assert_eq!(again["duplicate"], true, "{again}");
    }
    client.expect_silence(Duration::from_millis(200)).await;
    // A failure with a NUL in its id is logged, once.
    let ack = backend
        .roundtrip("EVENT_NOPE", json!({}), json!("x\u{0}y"))
        .await;
    assert_eq!(ack["error"]["code"], "NO_ROUTE", "{ack}");
    assert_eq!(seed.error_rows("x\\0y").await, 1);
    eventually(
        Duration::from_secs(10),
        "the record in the sink",
        async || {
            setup
                .error_log()
                .iter()
                .any(|r| r["event_id"] == json!("x\u{0}y"))
        },
    )
    .await;
    assert!(gateway.stop().success());
}

#[tokio::test]
async fn event_ids_with_nul_bytes_work_on_postgres() {
    nul_ids_on(Setup::postgres().await).await;
}

#[tokio::test]
async fn event_ids_with_nul_bytes_work_on_sqlite() {
    nul_ids_on(Setup::sqlite()).await;
}

#[tokio::test]
async fn a_malformed_event_with_a_readable_id_gets_a_failed_roundtrip_once_logged() {
    let setup = echo_setup();
    let gateway = setup.start();
    let seed = Seed::open(&setup).await;
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    for (t, id) in [("5", "n"), ("[1]", "a"), (r#"{"x":1}"#, "o"), ("true", "b")] {
        backend
            .send_text(&format!(
                r#"{{"op":0,"t":{t},"d":{{}},"event_id":"{id}","s":9}}"#
            ))
            .await;
        let ack = backend.recv().await;
        assert_eq!(ack["t"], "EVENT_ROUNDTRIP", "{ack}");
        assert_eq!(ack["event_id"], id);
        assert_eq!(ack["s"], 9);
        assert_eq!(ack["success"], false);
        assert_eq!(ack["error"]["code"], "BAD_EVENT", "{ack}");
        assert!(
            ack["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("t must be a string")
        );
        assert_eq!(seed.error_rows(id).await, 1);
    }
    // Counted like every other event: one outcome metric, no second path.
    assert_eq!(
        gateway
            .metric("otako_events_total", "outcome=\"BAD_EVENT\"")
            .await,
        4.0
    );
    assert!(gateway.stop().success());
}
