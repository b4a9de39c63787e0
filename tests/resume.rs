//! Resume (DESIGN §2, docs/PROTOCOL.md): a session whose socket dropped
//! without a clean close is kept for `resume_window_ms` and a reconnect
//! naming it gets exactly the frames it missed, then live ones.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::client::Client;
use common::dispatch::{DispatchClient, echo_event, echo_setup};
use common::{
    Gateway, Setup, assert_no_secrets, eventually, read_close, token, wait_metric, ws_refusal,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

const DETACHED: &str = "otako_sessions_detached";

/// An echo frame's `s` and the event id it carries.
fn seq_and_event(frame: &Value) -> (u64, u64) {
    assert_eq!(frame["t"], "CONFIG_ECHO", "{frame}");
    let event = frame["d"]["event_id"].as_str().unwrap().parse().unwrap();
    (frame["s"].as_u64().unwrap(), event)
}

/// Reads echo frames until the one for event `last`; returns (s, event) of each.
async fn read_until(client: &mut Client, last: u64) -> Vec<(u64, u64)> {
    let mut got = Vec::new();
    loop {
        let frame = seq_and_event(&client.next().await);
        got.push(frame);
        if frame.1 == last {
            return got;
        }
    }
}

/// A client of user 5 that has read the frames of events 1..=n.
async fn reader_of(gw: &Gateway, backend: &mut DispatchClient, n: u64) -> Client {
    let mut client = Client::connect(gw.client, 5).await;
    backend.echo(1..=n).await;
    assert_eq!(read_until(&mut client, n).await.last(), Some(&(n, n)));
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_mid_stream_then_resume_gets_every_frame_once_in_order() {
    let mut setup = echo_setup();
    // The sender dispatches every 2 ms while detached: a stalled (loaded)
    // detached phase of a few seconds would outgrow the default 1024 and
    // the resume would be refused as too far behind.
    setup.set("sessions", "resume_buffer", "100000");
    let gw = setup.start();
    let mut client = Client::connect(gw.client, 5).await;
    let first_id = client.session_id();
    let backend = DispatchClient::connect(gw.dispatch).await;
    let (mut out, mut acks) = backend.ws.split();

    // The backend keeps dispatching, paced, until told to stop: before
    // the drop, while detached, during the replay and after.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sender = tokio::spawn({
        let (stop, sent) = (stop.clone(), sent.clone());
        async move {
            let mut id = 0;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                out.send(Message::text(echo_event(id))).await.unwrap();
                sent.store(id, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            id
        }
    });
    let acked = Arc::new(AtomicU64::new(0));
    let ack_reader = tokio::spawn({
        let acked = acked.clone();
        async move {
            while let Some(Ok(message)) = acks.next().await {
                if let Message::Text(text) = message {
                    let ack: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(ack["success"], true, "{ack}");
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });

    let mut seen = Vec::new();
    while seen.len() < 200 {
        seen.push(seq_and_event(&client.next().await));
    }
    let last_s = seen.last().unwrap().0;
    client.drop_connection();
    wait_metric(&gw, DETACHED, "", 1.0).await;
    // Events keep arriving while detached.
    let at_detach = sent.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(10),
        "events while detached",
        async || acked.load(Ordering::Relaxed) > at_detach + 20,
    )
    .await;

    let mut resumed = Client::resume(gw.client, 5, &first_id, &last_s.to_string()).await;
    assert!(resumed.resumed(), "{}", resumed.hello);
    assert_eq!(resumed.session_id(), first_id);
    let replayed = resumed.hello["d"]["replayed"].as_u64().unwrap();
    assert!(replayed >= 20, "replayed {replayed}");
    assert!(resumed.reason().is_none());
    // Read the replay and well past it, then stop the backend.
    let mut after = Vec::new();
    while after.len() < replayed as usize + 100 {
        after.push(seq_and_event(&resumed.next().await));
    }
    stop.store(true, Ordering::Relaxed);
    let last_event = sender.await.unwrap();
    if after.last().unwrap().1 < last_event {
        after.extend(read_until(&mut resumed, last_event).await);
    }
    seen.extend(after);

    // Every event exactly once, in order, with `s` counting 1, 2, 3, …
    // across the seam.
    let expected: Vec<(u64, u64)> = (1..=last_event).map(|n| (n, n)).collect();
    assert_eq!(seen, expected);
    assert_eq!(
        gw.metric("otako_resumes_total", "result=\"resumed\"").await,
        1.0
    );
    assert_eq!(
        gw.metric("otako_frames_replayed_total", "").await,
        replayed as f64
    );
    wait_metric(&gw, DETACHED, "", 0.0).await;
    assert!(gw.metric("otako_resume_buffer_bytes", "").await > 0.0);
    // The session id, a credential, is in no log line (debug level).
    assert_no_secrets(&gw.log(), &[first_id]);
    ack_reader.abort();
}

#[tokio::test]
async fn written_frames_are_replayed_and_dropped_ones_mean_too_far_behind() {
    let mut setup = echo_setup();
    setup.set("sessions", "resume_buffer", "4");
    let gw = setup.start();
    let mut backend = DispatchClient::connect(gw.dispatch).await;
    let client = reader_of(&gw, &mut backend, 2).await;
    let id = client.session_id();
    client.drop_connection();
    wait_metric(&gw, DETACHED, "", 1.0).await;
    backend.echo(3..=4).await;

    // Frames already written are kept too (the client may not have read
    // them): a resume from 0 replays 1..=4.
    let mut again = Client::resume(gw.client, 5, &id, "0").await;
    assert!(again.resumed(), "{}", again.hello);
    assert_eq!(again.hello["d"]["replayed"], 4);
    let replay = read_until(&mut again, 4).await;
    assert_eq!(replay, vec![(1, 1), (2, 2), (3, 3), (4, 4)]);
    again.drop_connection();
    wait_metric(&gw, DETACHED, "", 1.0).await;

    // Ten more while away: only the newest 4 (11..=14) are kept, so frames
    // 5..=10 are gone: a new session, and the old one is untouched.
    backend.echo(5..=14).await;
    let behind = Client::resume(gw.client, 5, &id, "4").await;
    assert!(!behind.resumed());
    assert_eq!(behind.reason(), Some("too_far_behind"));
    assert_ne!(behind.session_id(), id);
    assert!(behind.hello["d"].get("replayed").is_none());
    assert_eq!(gw.metric(DETACHED, "").await, 1.0);
    assert_eq!(
        gw.metric(
            "otako_resumes_total",
            "result=\"new_session\",reason=\"too_far_behind\""
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_detached_session_expires_after_the_window() {
    let mut setup = echo_setup();
    // Long enough that `wait_metric` samples the detached session inside
    // the window on a loaded machine.
    setup.set("sessions", "resume_window_ms", "3000");
    let gw = setup.start();
    let client = Client::connect(gw.client, 5).await;
    let id = client.session_id();
    client.drop_connection();
    wait_metric(&gw, DETACHED, "", 1.0).await;
    wait_metric(&gw, DETACHED, "", 0.0).await;
    let late = Client::resume(gw.client, 5, &id, "0").await;
    assert!(!late.resumed());
    assert_eq!(late.reason(), Some("unknown_session"));
    assert_eq!(gw.metric("otako_resume_buffer_bytes", "").await, 0.0);
}

#[tokio::test]
async fn another_users_id_is_unknown_and_leaves_the_session_alone() {
    let setup = echo_setup();
    let gw = setup.start();
    let mut backend = DispatchClient::connect(gw.dispatch).await;
    let client = reader_of(&gw, &mut backend, 1).await;
    let id = client.session_id();
    client.drop_connection();
    wait_metric(&gw, DETACHED, "", 1.0).await;

    let other = Client::resume(gw.client, 6, &id, "1").await;
    assert!(!other.resumed());
    assert_eq!(other.reason(), Some("unknown_session"));
    assert_ne!(other.session_id(), id);
    // The owner still resumes it.
    backend.echo(2..=2).await;
    let mut owner = Client::resume(gw.client, 5, &id, "1").await;
    assert!(owner.resumed(), "{}", owner.hello);
    assert_eq!(read_until(&mut owner, 2).await, vec![(2, 2)]);
}

#[tokio::test]
async fn a_clean_close_ends_the_session_for_good() {
    let setup = echo_setup();
    let gw = setup.start();
    let mut client = Client::connect(gw.client, 5).await;
    let id = client.session_id();
    client.ws.close(None).await.unwrap();
    assert_eq!(read_close(&mut client.ws).await, None);
    wait_metric(&gw, "otako_sessions_closed_total", "code=\"1000\"", 1.0).await;
    assert_eq!(gw.metric(DETACHED, "").await, 0.0);
    let again = Client::resume(gw.client, 5, &id, "0").await;
    assert!(!again.resumed());
    assert_eq!(again.reason(), Some("unknown_session"));
}

#[tokio::test]
async fn a_resume_takes_over_a_zombie_socket_with_4011() {
    let setup = echo_setup();
    let gw = setup.start();
    let mut backend = DispatchClient::connect(gw.dispatch).await;
    let mut zombie = reader_of(&gw, &mut backend, 3).await;
    let id = zombie.session_id();

    // The client thinks the connection is dead (it read up to 2); the
    // gateway still holds it.
    let mut fresh = Client::resume(gw.client, 5, &id, "2").await;
    assert!(fresh.resumed(), "{}", fresh.hello);
    assert_eq!(fresh.hello["d"]["replayed"], 1);
    assert_eq!(read_close(&mut zombie.ws).await, Some(4011));
    backend.echo(4..=4).await;
    assert_eq!(read_until(&mut fresh, 4).await, vec![(3, 3), (4, 4)]);
    wait_metric(&gw, "otako_sessions_open", "", 1.0).await;
    assert_eq!(gw.metric(DETACHED, "").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_closed_with_4009_resumes() {
    let mut setup = Setup::sqlite();
    // 16 KiB frames fill the socket buffers quickly.
    let greeting = "x".repeat(16 * 1024);
    setup.route(
        "EVENT_ECHO",
        &common::test_plugin("config_echo_plugin"),
        &format!("timeout_ms = 5000\n[routes.config]\ngreeting = \"{greeting}\""),
    );
    setup.set("sessions", "outbound_queue", "8");
    let gw = setup.start();
    let mut slow = Client::connect(gw.client, 5).await;
    let id = slow.session_id();
    let mut backend = DispatchClient::connect(gw.dispatch).await;

    // `slow` doesn't read until its queue overflows.
    let mut sent = 0;
    while gw.metric("otako_queue_overflows_total", "").await == 0.0 {
        backend.echo(sent + 1..=sent + 20).await;
        sent += 20;
        assert!(sent < 20_000, "never overflowed");
    }
    wait_metric(&gw, DETACHED, "", 1.0).await;
    // What reached the socket, then 4009.
    let mut last_s = 0;
    loop {
        match slow.ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let (s, event) = seq_and_event(&serde_json::from_str(&text).unwrap());
                assert_eq!((s, event), (last_s + 1, last_s + 1));
                last_s = s;
            }
            Some(Ok(Message::Close(frame))) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(4009));
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("ended without a close frame: {other:?}"),
        }
    }
    let mut resumed = Client::resume(gw.client, 5, &id, &last_s.to_string()).await;
    assert!(resumed.resumed(), "{}", resumed.hello);
    backend.echo(sent + 1..=sent + 1).await;
    let rest = read_until(&mut resumed, sent + 1).await;
    let expected: Vec<(u64, u64)> = (last_s + 1..=sent + 1).map(|n| (n, n)).collect();
    assert_eq!(rest, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_sessions_drop_and_resume_at_once() {
    const N: u64 = 300;
    let setup = echo_setup();
    let gw = setup.start();
    let mut backend = DispatchClient::connect(gw.dispatch).await;
    let mut clients = Vec::new();
    for user in 1..=N {
        clients.push(Client::connect(gw.client, user).await);
    }
    backend.echo(1..=1).await;
    let mut ids = Vec::new();
    for mut client in clients {
        assert_eq!(seq_and_event(&client.next().await), (1, 1));
        ids.push(client.session_id());
        client.drop_connection();
    }
    wait_metric(&gw, DETACHED, "", N as f64).await;
    backend.echo(2..=2).await;

    let resumes = ids.iter().enumerate().map(|(i, id)| {
        let (addr, id) = (gw.client, id.clone());
        tokio::spawn(async move { Client::resume(addr, i as u64 + 1, &id, "1").await })
    });
    let mut resumed = Vec::new();
    for r in resumes {
        let client = r.await.unwrap();
        assert!(client.resumed(), "{}", client.hello);
        assert_eq!(client.hello["d"]["replayed"], 1);
        resumed.push(client);
    }
    wait_metric(&gw, DETACHED, "", 0.0).await;
    backend.echo(3..=3).await;
    for client in &mut resumed {
        assert_eq!(read_until(client, 3).await, vec![(2, 2), (3, 3)]);
    }
    assert_eq!(
        gw.metric("otako_resumes_total", "result=\"resumed\"").await,
        N as f64
    );
}

#[tokio::test]
async fn bad_resume_requests_get_new_sessions_and_disturb_nothing() {
    let mut setup = echo_setup();
    setup.set("sessions", "max_per_user", "50");
    let gw = setup.start();
    let mut backend = DispatchClient::connect(gw.dispatch).await;
    // The real session stays connected throughout.
    let mut real = reader_of(&gw, &mut backend, 2).await;
    let id = real.session_id();

    // Without a token: 401, as any connect.
    assert_eq!(
        ws_refusal(gw.client, &format!("/gateway?resume={id}&seq=1"), &[]).await,
        401
    );
    let long_seq = "9".repeat(4000);
    let bad = [
        (id.clone(), "abc".to_owned()),
        (id.clone(), "-1".to_owned()),
        (id.clone(), "1.5".to_owned()),
        (id.clone(), "".to_owned()),
        (id.clone(), long_seq),
        // Larger than anything sent.
        (id.clone(), "3".to_owned()),
        (id.clone(), u64::MAX.to_string()),
        (id[1..].to_owned(), "1".to_owned()),
        (format!("{id}0"), "1".to_owned()),
        (id.to_uppercase(), "1".to_owned()),
        ("z".repeat(32), "1".to_owned()),
        (format!("{id}&resume={id}"), "1".to_owned()),
    ];
    let mut new_ids = HashSet::new();
    for (resume, seq) in &bad {
        let mut client = Client::resume(gw.client, 5, resume, seq).await;
        assert!(!client.resumed(), "resume={resume} seq={seq}");
        assert_eq!(client.reason(), Some("unknown_session"), "seq={seq}");
        assert!(new_ids.insert(client.session_id()));
        // Ended cleanly, so the next attempt has a slot.
        client.ws.close(None).await.unwrap();
        assert_eq!(read_close(&mut client.ws).await, None);
    }
    assert!(!new_ids.contains(&id));
    // The real session was never taken over: it gets the next frame.
    backend.echo(3..=3).await;
    assert_eq!(read_until(&mut real, 3).await, vec![(3, 3)]);

    // Many resumes of one detached session at once: one wins, the others
    // get new sessions with `unknown_session`.
    real.drop_connection();
    wait_metric(&gw, DETACHED, "", 1.0).await;
    let attempts: Vec<_> = (0..20)
        .map(|_| {
            let (addr, id) = (gw.client, id.clone());
            tokio::spawn(async move { Client::resume(addr, 5, &id, "3").await })
        })
        .collect();
    // Every connection is held until all have their HELLO: a winner that
    // dropped would make the session resumable again.
    let mut clients = Vec::new();
    for attempt in attempts {
        clients.push(attempt.await.unwrap());
    }
    let mut winners = 0;
    for client in &clients {
        if client.resumed() {
            winners += 1;
            assert_eq!(client.session_id(), id);
        } else {
            assert_eq!(client.reason(), Some("unknown_session"));
            assert_ne!(client.session_id(), id);
        }
    }
    assert_eq!(winners, 1);
    assert_eq!(
        gw.metric(
            "otako_resumes_total",
            "result=\"new_session\",reason=\"unknown_session\""
        )
        .await,
        (bad.len() + 19) as f64
    );
    // A token for the resume is still required to be valid.
    let forged = format!("{}x", &token(5)[..token(5).len() - 1]);
    assert_eq!(
        ws_refusal(
            gw.client,
            &format!("/gateway?token={forged}&resume={id}&seq=1"),
            &[]
        )
        .await,
        401
    );
}
