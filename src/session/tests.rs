//! In-process tests of delivery over real sockets: `Sessions::serve` on
//! 127.0.0.1:0 and tokio-tungstenite clients. (Black-box tests of the
//! binary are in tests/sessions.rs.)

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::{ClientFrame, Edge, Sessions};
use crate::config::{OnLimit, SessionsConfig};
use crate::ids::UserId;
use crate::shutdown::Shutdown;
use crate::telemetry::{CodeLabel, Metrics};
use crate::token::TokenKey;

const SECRET: &[u8] = b"unit-secret";

struct Harness {
    sessions: Sessions,
    addr: SocketAddr,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
}

async fn start(outbound_queue: usize) -> Harness {
    let config = SessionsConfig {
        max_per_user: NonZeroU32::new(5).unwrap(),
        on_limit: OnLimit::Reject,
        heartbeat_interval_ms: NonZeroU64::new(30_000).unwrap(),
        outbound_queue: NonZeroUsize::new(outbound_queue).unwrap(),
        resume_window_ms: NonZeroU64::new(120_000).unwrap(),
        resume_buffer: NonZeroUsize::new(1024).unwrap(),
    };
    let metrics = Metrics::new();
    let edge = Edge {
        allowed_origins: None,
        handshake_timeout: Duration::from_secs(10),
        max_connections: 100_000,
        tls: None,
    };
    let sessions = Sessions::new(
        config,
        edge,
        TokenKey::new(SECRET, None),
        None,
        None,
        metrics.clone(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = Shutdown::new();
    shutdown.spawn({
        let (sessions, shutdown) = (sessions.clone(), shutdown.clone());
        async move { sessions.serve(listener, shutdown).await }
    });
    Harness {
        sessions,
        addr,
        shutdown,
        metrics,
    }
}

fn user(n: u64) -> UserId {
    UserId::new(n).unwrap()
}

type Client = WebSocketStream<TcpStream>;

/// A client for `user`, past its HELLO.
async fn client(addr: SocketAddr, user: UserId) -> Client {
    let token = TokenKey::new(SECRET, None).issue(user, 1);
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(
        format!("ws://{addr}/gateway?token={token}").as_str(),
        stream,
    )
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await["t"], "HELLO");
    ws
}

/// The next text frame as JSON (control frames skipped); `None` on close.
async fn next_frame(ws: &mut Client) -> Option<Result<serde_json::Value, u16>> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no frame within 10 s")?;
        match msg.ok()? {
            Message::Text(text) => return Some(Ok(serde_json::from_str(&text).unwrap())),
            Message::Close(frame) => return Some(Err(frame.map_or(0, |f| u16::from(f.code)))),
            _ => continue,
        }
    }
}

async fn next_json(ws: &mut Client) -> serde_json::Value {
    match next_frame(ws).await {
        Some(Ok(v)) => v,
        other => panic!("expected a frame, got {other:?}"),
    }
}

/// Whether `check` holds within `bound` (polled).
async fn within(bound: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    while !check() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_reaches_every_session_with_s_counting_per_session() {
    let h = start(64).await;
    let mut a1 = client(h.addr, user(1)).await;
    let mut a2 = client(h.addr, user(1)).await;
    let mut b = client(h.addr, user(2)).await;
    assert_eq!(h.sessions.session_count(), 3);
    assert_eq!(
        h.sessions.online(&[user(3), user(2), user(1), user(2)]),
        vec![user(2), user(1)]
    );

    let only_a = Arc::new(ClientFrame::new("MESSAGE_CREATE", r#"{"id":"1"}"#));
    let everyone = Arc::new(ClientFrame::new("MESSAGE_DELETE", r#"{"id":"2"}"#));
    assert_eq!(h.sessions.deliver(&[user(1), user(9)], &only_a), 2);
    assert_eq!(h.sessions.deliver_all(&everyone), 3);
    assert_eq!(h.sessions.deliver(&[], &only_a), 0);

    for ws in [&mut a1, &mut a2] {
        assert_eq!(
            next_json(ws).await,
            serde_json::json!({"op":0,"t":"MESSAGE_CREATE","s":1,"d":{"id":"1"}})
        );
        assert_eq!(
            next_json(ws).await,
            serde_json::json!({"op":0,"t":"MESSAGE_DELETE","s":2,"d":{"id":"2"}})
        );
    }
    assert_eq!(
        next_json(&mut b).await,
        serde_json::json!({"op":0,"t":"MESSAGE_DELETE","s":1,"d":{"id":"2"}})
    );
    wait_until("frames_delivered = 5", || {
        h.metrics.frames_delivered.get() == 5
    })
    .await;

    // A closed session stops being deliverable and its user goes offline.
    b.close(None).await.unwrap();
    // The server echoes the close.
    assert_eq!(next_frame(&mut b).await, Some(Err(0)));
    wait_until("b unregistered", || h.sessions.session_count() == 2).await;
    assert_eq!(h.sessions.online(&[user(2)]), vec![]);
    assert_eq!(h.sessions.deliver(&[user(2)], &everyone), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_4009_without_slowing_others() {
    let h = start(8).await;
    let slow = client(h.addr, user(1)).await;
    let mut fast = client(h.addr, user(2)).await;

    // `fast` reads everything, checking `s` has no gap.
    let reader = tokio::spawn(async move {
        let mut last = 0u64;
        while let Some(Ok(frame)) = next_frame(&mut fast).await {
            let s = frame["s"].as_u64().unwrap();
            assert_eq!(s, last + 1, "gap in s");
            last = s;
            if frame["t"] == "END" {
                break;
            }
        }
        (last, fast)
    });

    // 16 KiB frames until the kernel buffers toward `slow` fill and its
    // queue overflows; deliver() itself never waits.
    let payload = format!(r#"{{"pad":"{}"}}"#, "x".repeat(16 * 1024));
    let frame = Arc::new(ClientFrame::new("MESSAGE_CREATE", &payload));
    let mut sent_to_fast = 0u64;
    let mut reached_slow_until_overflow = 0;
    let delivered_before = h.metrics.frames_delivered.get();
    let mut writers_keep_up = true;
    for _ in 0..20_000 {
        let started = Instant::now();
        let reached = h.sessions.deliver(&[user(1), user(2)], &frame);
        // deliver() is synchronous: blocking on a socket would take seconds.
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "deliver blocked"
        );
        sent_to_fast += 1;
        if h.metrics.queue_overflows.get() == 1 {
            break;
        }
        assert_eq!(reached, 2);
        reached_slow_until_overflow += 1;
        // Until the kernel buffers toward `slow` fill, both writers write
        // each frame out before the next comes. The first must go out (up
        // to 5 s); later waits are short and stop once one runs out (the
        // buffers are full). One frame written leaves `slow`'s queue room
        // for 8 more, so it is reached more than 8 times.
        if writers_keep_up {
            let target = delivered_before + 2 * sent_to_fast;
            let bound = if sent_to_fast == 1 {
                Duration::from_secs(5)
            } else {
                Duration::from_millis(200)
            };
            writers_keep_up = within(bound, || h.metrics.frames_delivered.get() >= target).await;
            assert!(
                writers_keep_up || sent_to_fast > 1,
                "the first frame was not written out to both sessions"
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        h.metrics.queue_overflows.get(),
        1,
        "slow consumer never overflowed"
    );
    assert!(
        reached_slow_until_overflow > 8,
        "the kernel buffers absorbed some first"
    );
    // After the overflow `slow` keeps the frame for a resume.
    assert_eq!(h.sessions.deliver(&[user(1), user(2)], &frame), 2);
    sent_to_fast += 1;
    let end = Arc::new(ClientFrame::new("END", "{}"));
    assert_eq!(h.sessions.deliver(&[user(2)], &end), 1);
    sent_to_fast += 1;
    let (last, _fast) = reader.await.unwrap();
    assert_eq!(last, sent_to_fast, "fast got every frame in order");

    // `slow` finally reads: the frames that made it out, then close 4009.
    let mut slow = slow;
    let mut frames = 0;
    let code = loop {
        match next_frame(&mut slow).await {
            Some(Ok(_)) => frames += 1,
            Some(Err(code)) => break code,
            None => panic!("connection ended without a close frame"),
        }
    };
    assert_eq!(code, 4009);
    assert!(frames > 0 && frames <= reached_slow_until_overflow);
    wait_until("slow closed", || {
        h.metrics
            .sessions_closed
            .get_or_create(&CodeLabel { code: 4009 })
            .get()
            == 1
    })
    .await;
    // `fast` (still held) is the one session attached; `slow` is detached.
    assert_eq!(h.sessions.session_count(), 1);
    assert_eq!(h.metrics.sessions_detached.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_every_session_with_1001_and_drains() {
    let h = start(8).await;
    let mut clients = Vec::new();
    for n in 1..=3 {
        clients.push(client(h.addr, user(n)).await);
    }
    let drain = tokio::spawn({
        let shutdown = h.shutdown.clone();
        async move { shutdown.drain().await }
    });
    for ws in &mut clients {
        assert_eq!(next_frame(ws).await, Some(Err(1001)));
    }
    drop(clients);
    tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("drain finished")
        .unwrap();
    assert_eq!(h.sessions.session_count(), 0);
    assert_eq!(h.metrics.sessions_open.get(), 0);
}
