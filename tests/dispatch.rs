//! The dispatch protocol over real sockets against the real binary: the
//! seed's frame, echo forms, idempotency, bad frames, failures logged once
//! per event id (across restarts and sink outages), PING timeout, per-channel
//! order and backpressure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::client::Client;
use common::dispatch::{DispatchClient, Seed};
use common::{
    Setup, eventually, free_port, send_megabyte_head, test_plugin, wait_closed_by_server,
    wait_metric,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const SEED_FRAME: &str = r#"{"t":"EVENT_MESSAGE_CREATE","d":{"id":"3","channel_id":"1"},"op":0,"s":"14","event_id":"1"}"#;

fn expected_message() -> Value {
    json!({
        "id": "3",
        "channel_id": "1",
        "author": {"id": "10", "name": "alice"},
        "content": "Hello! This is a message from the Otako client!",
        "nonce": "87654GFGDS7544567FD",
        "timestamp": "2026-11-28T00:00:00.000Z",
    })
}

async fn seed_example(setup: &mut Setup) -> (common::Gateway, Seed) {
    setup.message_routes();
    let gateway = setup.start();
    let seed = Seed::open(setup).await;
    seed.example().await;
    (gateway, seed)
}

#[tokio::test]
async fn the_seed_frame_is_delivered_and_acked_exactly() {
    let mut setup = Setup::sqlite();
    let (gateway, _seed) = seed_example(&mut setup).await;
    let mut alice = Client::connect(gateway.client, 10).await;
    let mut bob = Client::connect(gateway.client, 11).await;
    let mut bob_phone = Client::connect(gateway.client, 11).await;
    let mut mallory = Client::connect(gateway.client, 13).await;

    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    backend.send_text(SEED_FRAME).await;
    let ack = backend.recv_text().await;
    assert_eq!(
        ack,
        r#"{"t":"EVENT_ROUNDTRIP","event_id":"1","success":true,"op":0,"s":"14"}"#
    );
    for client in [&mut alice, &mut bob, &mut bob_phone] {
        let frame = client.next().await;
        assert_eq!(frame["op"], 0);
        assert_eq!(frame["t"], "MESSAGE_CREATE");
        assert_eq!(frame["s"], 1);
        assert_eq!(frame["d"], expected_message());
    }
    mallory.expect_silence(Duration::from_millis(300)).await;
    assert!(gateway.stop().success());
}

#[tokio::test]
async fn postgres_runs_the_same_event_path() {
    let mut setup = Setup::postgres().await;
    let (gateway, _seed) = seed_example(&mut setup).await;
    let mut carol = Client::connect(gateway.client, 12).await;
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    backend.send_text(SEED_FRAME).await;
    assert_eq!(backend.recv().await["success"], true);
    assert_eq!(carol.next().await["d"], expected_message());
}

/// The member list is cached between events; every join, leave and
/// truncate made by any writer must still reach the very next event.
async fn assert_membership_changes_reach_the_next_event(mut setup: Setup, truncate: &'static str) {
    let (gateway, seed) = seed_example(&mut setup).await;
    let mut bob = Client::connect(gateway.client, 11).await;
    let mut mallory = Client::connect(gateway.client, 13).await;
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    let message = json!({"id": "3", "channel_id": "1"});

    let ack = backend
        .roundtrip("EVENT_MESSAGE_CREATE", message.clone(), json!("m1"))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    assert_eq!(bob.next().await["d"]["id"], "3");
    mallory.expect_silence(Duration::from_millis(200)).await;

    seed.execute("INSERT INTO channel_members (channel_id, user_id) VALUES (1, 13)")
        .await;
    seed.execute("DELETE FROM channel_members WHERE channel_id = 1 AND user_id = 11")
        .await;
    let ack = backend
        .roundtrip("EVENT_MESSAGE_CREATE", message.clone(), json!("m2"))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    assert_eq!(mallory.next().await["d"]["id"], "3");
    bob.expect_silence(Duration::from_millis(200)).await;

    seed.execute("UPDATE channel_members SET user_id = 11 WHERE channel_id = 1 AND user_id = 13")
        .await;
    let ack = backend
        .roundtrip("EVENT_MESSAGE_CREATE", message.clone(), json!("m3"))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    assert_eq!(bob.next().await["d"]["id"], "3");
    mallory.expect_silence(Duration::from_millis(200)).await;

    seed.execute(truncate).await;
    let ack = backend
        .roundtrip("EVENT_MESSAGE_CREATE", message, json!("m4"))
        .await;
    assert_eq!(ack["success"], true, "{ack}");
    bob.expect_silence(Duration::from_millis(200)).await;
    mallory.expect_silence(Duration::from_millis(100)).await;
    assert!(gateway.stop().success());
}

#[tokio::test]
async fn membership_changes_reach_the_next_event_on_sqlite() {
    assert_membership_changes_reach_the_next_event(Setup::sqlite(), "DELETE FROM channel_members")
        .await;
}

#[tokio::test]
async fn membership_changes_reach_the_next_event_on_postgres() {
    assert_membership_changes_reach_the_next_event(
        Setup::postgres().await,
        "TRUNCATE channel_members",
    )
    .await;
}

#[tokio::test]
async fn integer_ids_are_echoed_as_integers() {
    let mut setup = Setup::sqlite();
    let (gateway, _seed) = seed_example(&mut setup).await;
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    backend
        .event(
            "EVENT_MESSAGE_CREATE",
            json!({"id": 3, "channel_id": 1}),
            json!(77),
            json!(15),
        )
        .await;
    let ack = backend.recv_text().await;
    assert_eq!(
        ack,
        r#"{"t":"EVENT_ROUNDTRIP","event_id":77,"success":true,"op":0,"s":15}"#
    );
}

#[tokio::test]
async fn a_succeeded_event_id_is_a_duplicate_without_a_second_broadcast() {
    let mut setup = Setup::sqlite();
    let (gateway, seed) = seed_example(&mut setup).await;
    seed.message(4, 1, 11, "second", None).await;
    let mut bob = Client::connect(gateway.client, 11).await;
    let mut backend = DispatchClient::connect(gateway.dispatch).await;

    let d = json!({"id": "3", "channel_id": "1"});
    let first = backend
        .roundtrip("EVENT_MESSAGE_CREATE", d.clone(), json!("e-1"))
        .await;
    assert_eq!(first["success"], true);
    assert!(first.get("duplicate").is_none(), "{first}");
    let again = backend
        .roundtrip("EVENT_MESSAGE_CREATE", d.clone(), json!("e-1"))
        .await;
    assert_eq!(again["success"], true);
    assert_eq!(again["duplicate"], true);

    // The next broadcast is the next event, not a repeat of the first.
    backend
        .roundtrip(
            "EVENT_MESSAGE_CREATE",
            json!({"id": "4", "channel_id": "1"}),
            json!("e-2"),
        )
        .await;
    let one = bob.next().await;
    let two = bob.next().await;
    assert_eq!(
        (one["s"].clone(), one["d"]["id"].clone()),
        (json!(1), json!("3"))
    );
    assert_eq!(
        (two["s"].clone(), two["d"]["id"].clone()),
        (json!(2), json!("4"))
    );

    // Still a duplicate after a restart: outcomes are durable.
    assert!(gateway.stop().success());
    let gateway = setup.start();
    let mut bob = Client::connect(gateway.client, 11).await;
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    let after = backend
        .roundtrip("EVENT_MESSAGE_CREATE", d, json!("e-1"))
        .await;
    assert_eq!(after["duplicate"], true, "{after}");
    bob.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn an_in_flight_duplicate_is_acked_once_the_first_finishes() {
    let mut setup = Setup::sqlite();
    let (gateway, _seed) = seed_example(&mut setup).await;
    let mut carol = Client::connect(gateway.client, 12).await;
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    // Both frames in one write, so the second is read while the first runs.
    let frame = Message::text(SEED_FRAME);
    backend.ws.feed(frame.clone()).await.unwrap();
    backend.ws.feed(frame).await.unwrap();
    backend.ws.flush().await.unwrap();
    let a = backend.recv().await;
    let b = backend.recv().await;
    assert_eq!(
        (a["success"].clone(), b["success"].clone()),
        (json!(true), json!(true))
    );
    let duplicates = [&a, &b]
        .iter()
        .filter(|ack| ack.get("duplicate") == Some(&json!(true)))
        .count();
    assert_eq!(duplicates, 1, "{a} {b}");
    assert_eq!(carol.next().await["d"]["id"], "3");
    carol.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn garbage_and_oversized_frames_get_errors_and_the_connection_stays_open() {
    let mut setup = Setup::sqlite();
    setup.set("dispatch", "max_frame_bytes", "1024");
    let (gateway, seed) = seed_example(&mut setup).await;
    let mut backend = DispatchClient::connect(gateway.dispatch).await;

    backend.send_text("this is not json").await;
    let reply = backend.recv().await;
    assert_eq!(
        (reply["op"].clone(), reply["t"].clone()),
        (json!(9), json!("INVALID_FRAME"))
    );
    assert!(
        reply["d"]["error"].as_str().unwrap().contains("not JSON"),
        "{reply}"
    );

    backend
        .send_text(r#"{"op":0,"t":"EVENT_MESSAGE_CREATE","d":{}}"#)
        .await;
    let reply = backend.recv().await;
    assert_eq!(reply["t"], "INVALID_FRAME");
    assert!(
        reply["d"]["error"].as_str().unwrap().contains("event_id"),
        "{reply}"
    );

    backend
        .ws
        .send(Message::binary(vec![1, 2, 3]))
        .await
        .unwrap();
    assert_eq!(backend.recv().await["t"], "INVALID_FRAME");

    // An event whose id can be read gets a failed ack, logged once.
    backend
        .send_text(r#"{"op":0,"t":"EVENT_MESSAGE_CREATE","d":"nope","event_id":"bad-1","s":9}"#)
        .await;
    let ack = backend.recv().await;
    assert_eq!(ack["success"], false);
    assert_eq!(ack["event_id"], "bad-1");
    assert_eq!(ack["s"], 9);
    assert_eq!(ack["error"]["code"], "BAD_EVENT");
    assert_eq!(seed.error_rows("bad-1").await, 1);

    let big = format!(
        r#"{{"op":0,"t":"EVENT_MESSAGE_CREATE","d":{{"pad":"{}"}},"event_id":"big"}}"#,
        "x".repeat(2000)
    );
    backend.send_text(&big).await;
    let reply = backend.recv().await;
    assert_eq!(reply["t"], "INVALID_FRAME");
    assert!(
        reply["d"]["error"]
            .as_str()
            .unwrap()
            .contains("max_frame_bytes"),
        "{reply}"
    );

    // Still open and serving.
    assert_eq!(backend.ping(42).await["ts"], 42);
    let ack = backend
        .roundtrip(
            "EVENT_MESSAGE_CREATE",
            json!({"id": "3", "channel_id": "1"}),
            json!("ok-1"),
        )
        .await;
    assert_eq!(ack["success"], true);
    // Four frames were refused; the malformed event was an event, counted
    // with every other event's outcome.
    assert_eq!(gateway.metric("otako_invalid_frames_total", "").await, 4.0);
    assert_eq!(
        gateway
            .metric("otako_events_total", "outcome=\"BAD_EVENT\"")
            .await,
        1.0
    );
}

#[tokio::test]
async fn dispatch_needs_the_bearer_secret() {
    let setup = Setup::sqlite();
    let gateway = setup.start();
    let wrong: [&[(&str, &str)]; 3] = [
        &[],
        &[("Authorization", "Bearer wrong")],
        &[("Authorization", common::DISPATCH_SECRET)],
    ];
    for headers in wrong {
        let status = common::ws_refusal(gateway.dispatch, "/dispatch", headers).await;
        assert_eq!(status, 401, "{headers:?}");
    }
    let bearer = format!("Bearer {}", common::DISPATCH_SECRET);
    let headers = [("Authorization", bearer.as_str())];
    assert_eq!(
        common::ws_refusal(gateway.dispatch, "/elsewhere", &headers).await,
        404
    );
}

/// Sends `event_id` three times (restarting the gateway between the second
/// and third attempt) and checks: three failed acks with `code`, one record
/// in the log sink's file.
async fn assert_logged_once(mut setup: Setup, t: &str, code: &str) {
    let gateway = setup.start();
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    for _ in 0..2 {
        let ack = backend
            .roundtrip(t, json!({"user_id": "10"}), json!("fail-1"))
            .await;
        assert_eq!(ack["success"], false, "{ack}");
        assert_eq!(ack["error"]["code"], code, "{ack}");
        assert!(!ack["error"]["message"].as_str().unwrap().is_empty());
    }
    assert!(gateway.stop().success());
    let gateway = setup.start();
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    let ack = backend
        .roundtrip(t, json!({"user_id": "10"}), json!("fail-1"))
        .await;
    assert_eq!(ack["error"]["code"], code, "{ack}");

    // Everything recorded has been delivered once the backlog is empty, so
    // a wrongly repeated record would be in the file by then.
    eventually(
        Duration::from_secs(10),
        "the record delivered",
        async || {
            !setup.error_log().is_empty() && gateway.metric("otako_errlog_backlog", "").await == 0.0
        },
    )
    .await;
    let records = setup.error_log();
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record["event_id"], "fail-1");
    assert_eq!(record["t"], t);
    assert_eq!(record["error"]["code"], code);
    assert_eq!(record["d"], json!({"user_id": "10"}));
    assert!(
        record["trace"]["chain"]
            .as_array()
            .is_some_and(|c| !c.is_empty()),
        "{record}"
    );
    drop(gateway);
    let _ = &mut setup;
}

#[tokio::test]
async fn an_unrouted_event_is_logged_once_across_retries_and_restarts() {
    assert_logged_once(Setup::sqlite(), "EVENT_NOBODY_HANDLES", "NO_ROUTE").await;
}

#[tokio::test]
async fn a_handler_failure_is_logged_once_across_retries_and_restarts() {
    let mut setup = Setup::sqlite();
    setup.route("EVENT_TEAPOT", &test_plugin("error_plugin"), "");
    assert_logged_once(setup, "EVENT_TEAPOT", "TEAPOT").await;
}

#[tokio::test]
async fn records_wait_for_a_logging_server_that_is_down_then_arrive_once() {
    let port = free_port();
    let mut setup = Setup::sqlite();
    setup.set("logging", "sink", "\"http\"");
    setup.set(
        "logging",
        "url",
        &format!("\"http://127.0.0.1:{port}/events\""),
    );
    let gateway = setup.start();
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    for id in ["down-1", "down-2", "down-1"] {
        let ack = backend
            .roundtrip("EVENT_UNROUTED", json!({}), json!(id))
            .await;
        assert_eq!(ack["error"]["code"], "NO_ROUTE");
    }
    eventually(
        Duration::from_secs(10),
        "the sink outage counted",
        async || {
            gateway.metric("otako_errlog_backlog", "").await == 2.0
                && gateway.metric("otako_errlog_sink_failures_total", "").await >= 1.0
        },
    )
    .await;

    let out = setup.dir.path().join("sink.jsonl");
    let mut sink = common::start_log_sink(port, &out);
    // Delivered once the backlog is empty: a repeat would be in the file.
    eventually(
        Duration::from_secs(45),
        "both records delivered",
        async || {
            common::read_json_lines(&out).len() >= 2
                && gateway.metric("otako_errlog_backlog", "").await == 0.0
        },
    )
    .await;
    let records = common::read_json_lines(&out);
    let _ = sink.kill();
    let _ = sink.wait();
    let mut ids: Vec<&str> = records
        .iter()
        .map(|r| r["event_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["down-1", "down-2"], "{records:?}");
}

#[tokio::test]
async fn no_ping_within_the_timeout_closes_with_4008() {
    let mut setup = Setup::sqlite();
    // 2 s, so a stalled (loaded, debug-build) test pinging every 500 ms
    // still has 1.5 s of slack before its healthy connection's deadline.
    setup.set("dispatch", "ping_timeout_ms", "2000");
    let gateway = setup.start();

    // A backend that keeps pinging stays connected past the timeout; the
    // silent one's close is read as it arrives, timed from before its
    // connect (the gateway's timer starts before the client sees the 101).
    let mut healthy = DispatchClient::connect(gateway.dispatch).await;
    let connected = Instant::now();
    let silent = DispatchClient::connect(gateway.dispatch).await;
    let mut silent_ws = silent.ws;
    let closed = tokio::spawn(async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), silent_ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => return (frame, Instant::now()),
                Ok(Some(Ok(_))) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    });
    // Pings for 3.5 s: well past the silent one's 2 s timeout.
    for i in 0..7 {
        let pong = healthy.ping(i).await;
        assert_eq!(pong["ts"], i);
        assert!(
            pong["inflight"].is_u64() && pong["sessions"].is_u64(),
            "{pong}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (close, at) = closed.await.unwrap();
    let close = close.unwrap();
    assert_eq!(u16::from(close.code), 4008);
    assert_eq!(close.reason, "no PING within ping_timeout_ms");
    // Not before the timeout ran out.
    assert!(
        at - connected >= Duration::from_millis(2000),
        "{:?}",
        at - connected
    );
    assert_eq!(healthy.ping(99).await["ts"], 99);
}

#[tokio::test]
async fn same_channel_events_reach_clients_in_dispatch_order() {
    const N: i64 = 1000;
    let mut setup = Setup::sqlite();
    setup.message_routes();
    let gateway = setup.start();
    let seed = Seed::open(&setup).await;
    seed.user(10, "alice").await;
    seed.user(11, "bob").await;
    seed.channel(1, "one", &[10, 11]).await;
    seed.channel(2, "two", &[10]).await;
    for i in 1..=N {
        seed.message(100 + i, 1 + (i % 2), 10, &format!("m{i}"), None)
            .await;
    }
    let mut alice = Client::connect(gateway.client, 10).await;
    let mut bob = Client::connect(gateway.client, 11).await;
    let mut backend = DispatchClient::connect(gateway.dispatch).await;
    for i in 1..=N {
        let d = json!({"id": (100 + i).to_string(), "channel_id": (1 + (i % 2)).to_string()});
        let frame = json!({"t": "EVENT_MESSAGE_CREATE", "d": d, "op": 0, "s": i, "event_id": format!("o-{i}")});
        backend
            .ws
            .feed(Message::text(frame.to_string()))
            .await
            .unwrap();
    }
    backend.ws.flush().await.unwrap();
    let acks = backend.acks(N as usize).await;
    let failed: Vec<&Value> = acks.values().filter(|a| a["success"] != true).collect();
    assert!(failed.is_empty(), "{failed:?}");

    let mut last = [0i64; 3];
    for expected_s in 1..=N {
        let frame = alice.next().await;
        assert_eq!(frame["s"], expected_s, "per-session s counts up by one");
        let id: i64 = frame["d"]["id"].as_str().unwrap().parse().unwrap();
        let channel: usize = frame["d"]["channel_id"].as_str().unwrap().parse().unwrap();
        assert!(
            id > last[channel],
            "channel {channel}: {id} after {}",
            last[channel]
        );
        last[channel] = id;
    }
    let mut previous = 0;
    for _ in 0..N / 2 {
        let id: i64 = bob.next().await["d"]["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(id > previous);
        previous = id;
    }
}

#[tokio::test]
async fn max_inflight_applies_backpressure_instead_of_buffering() {
    const EVENTS: usize = 300;
    const INFLIGHT: u64 = 4;
    let mut setup = Setup::sqlite();
    setup.set("dispatch", "max_inflight", &INFLIGHT.to_string());
    setup.route("EVENT_SLOW", &test_plugin("loop_plugin"), "timeout_ms = 10");
    let gateway = setup.start();
    let backend = DispatchClient::connect(gateway.dispatch).await;
    let rss_before = gateway.rss_bytes();

    // Each event carries 48 KiB: buffering them all would cost > 14 MiB.
    let pad = "x".repeat(48 * 1024);
    let (mut write, mut read) = backend.ws.split();
    let writer = tokio::spawn(async move {
        for i in 0..EVENTS {
            // The padding sits outside `d`, so the failure records stay small.
            let frame = json!({"t": "EVENT_SLOW", "d": {}, "pad": pad, "op": 0, "event_id": format!("slow-{i}")});
            write.send(Message::text(frame.to_string())).await.unwrap();
        }
        for ts in 0..3 {
            let ping = json!({"op": 1, "t": "PING", "d": {"ts": ts}});
            write.send(Message::text(ping.to_string())).await.unwrap();
        }
        write
    });
    let mut acks = 0;
    let mut max_inflight_seen = 0;
    let mut rss_peak = 0;
    while acks < EVENTS {
        let message = tokio::time::timeout(Duration::from_secs(60), read.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Message::Text(text) = message else {
            continue;
        };
        let frame: Value = serde_json::from_str(&text).unwrap();
        if frame["t"] == "EVENT_ROUNDTRIP" {
            assert_eq!(frame["error"]["code"], "PLUGIN_TIMEOUT", "{frame}");
            acks += 1;
            if acks % 50 == 0 {
                rss_peak = rss_peak.max(gateway.rss_bytes());
                let inflight = gateway.metric("otako_events_inflight", "").await as u64;
                max_inflight_seen = max_inflight_seen.max(inflight);
            }
        }
    }
    let _write = writer.await.unwrap();
    assert!(
        max_inflight_seen <= INFLIGHT,
        "{max_inflight_seen} in flight"
    );
    let growth = rss_peak.saturating_sub(rss_before);
    eprintln!("RSS grew by {growth} bytes under backpressure");
    assert!(growth < 10 * 1024 * 1024, "RSS grew by {growth} bytes");
}

/// The dispatch and admin listeners guard their handshakes like the client
/// listener: `handshake_timeout_ms` and the request-head caps (431).
#[tokio::test]
async fn dispatch_and_admin_handshakes_time_out_and_oversized_heads_get_431() {
    let mut setup = Setup::sqlite();
    setup.set("server", "handshake_timeout_ms", "1500");
    let gw = setup.start();
    for (listener, addr, path) in [
        ("dispatch", gw.dispatch, "/dispatch"),
        ("admin", gw.admin, "/healthz"),
    ] {
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let text = send_megabyte_head(addr, path).await;
        assert!(
            text.starts_with("HTTP/1.1 431 "),
            "{listener}: {:?}",
            &text[..text.len().min(200)]
        );
        wait_closed_by_server(&mut silent, Duration::from_secs(20)).await;
        let labels = |reason| format!("listener=\"{listener}\",reason=\"{reason}\"");
        wait_metric(
            &gw,
            "otako_handshakes_refused_total",
            &labels("too_large"),
            1.0,
        )
        .await;
        wait_metric(
            &gw,
            "otako_handshakes_refused_total",
            &labels("timeout"),
            1.0,
        )
        .await;
    }
    // Both still serve.
    DispatchClient::connect(gw.dispatch).await;
    assert_eq!(gw.admin_get("/healthz").await.0, 200);
}
