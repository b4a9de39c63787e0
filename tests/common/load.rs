//! A swap under real load: thousands of events pipelined on one dispatch
//! connection while a route's plugin or config is replaced, for the hot
//! reload tests and `dev`'s save-to-live tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::client::Client;
use super::dispatch::DispatchClient;

/// Events acked before the swap is made.
const BEFORE: u64 = 500;
/// Events sent after the new version was in.
const AFTER: u64 = 500;
/// Events sent but not yet acked: thousands in flight, yet few enough
/// that the writer stops soon after it is told to.
const WINDOW: usize = 2_000;
/// How often the writer PINGs, as a backend must (the gateway closes a
/// dispatch connection that stays silent for `ping_timeout_ms`, 15 s).
const PING_EVERY: Duration = Duration::from_secs(5);

/// The events and the swap: `t`/`d` is every event (each gets an event id
/// of its own); `swap` is made once [`BEFORE`] events are acked; `landed`
/// tells whether the new version is in (polled every 50 acks; every event
/// sent after it says so must run on the new version), and must say so
/// within `within` of the swap. `version` names a frame's version (0 old,
/// 1 new; `None`: a frame neither version produces).
pub struct Swap<S, L> {
    pub t: &'static str,
    pub d: Value,
    pub swap: S,
    pub landed: L,
    pub within: Duration,
    pub version: fn(&Value) -> Option<usize>,
}

/// Pipelines events until the swap has been made and [`AFTER`] more
/// events were sent after it landed, then checks that every event was
/// acked successfully and delivered to `client` exactly once, each frame
/// from exactly one version, the new one serving at least the tail.
/// Returns the time from the swap to the new version being seen in.
pub async fn load_through_swap<S, L>(
    client: Client,
    backend: DispatchClient,
    swap: Swap<S, L>,
) -> Duration
where
    S: FnOnce(),
    L: AsyncFnMut() -> bool,
{
    let Swap {
        t,
        d,
        swap,
        mut landed,
        within,
        version,
    } = swap;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let window = Arc::new(tokio::sync::Semaphore::new(WINDOW));
    let (mut write, mut read) = backend.ws.split();
    let writer = {
        let (stop, sent, window) = (stop.clone(), sent.clone(), window.clone());
        tokio::spawn(async move {
            let mut n = 0;
            let mut pinged = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if pinged.elapsed() > PING_EVERY {
                    let ping = json!({"op": 1, "t": "PING", "d": {"ts": n}});
                    write.feed(Message::text(ping.to_string())).await.unwrap();
                    pinged = Instant::now();
                }
                if window.available_permits() == 0 {
                    write.flush().await.unwrap();
                }
                window.acquire().await.unwrap().forget();
                n += 1;
                let frame = json!({"t": t, "d": d, "op": 0, "s": n, "event_id": format!("l-{n}")});
                write.feed(Message::text(frame.to_string())).await.unwrap();
                if n % 32 == 0 {
                    write.flush().await.unwrap();
                }
                sent.store(n, Ordering::Relaxed);
            }
            write.flush().await.unwrap();
            n
        })
    };
    // Frames by version; the reader stops once it has one per event sent.
    let expected = Arc::new(AtomicU64::new(u64::MAX));
    let frames = {
        let expected = expected.clone();
        let mut client = client;
        tokio::spawn(async move {
            let mut seen = [0u64; 2];
            while seen[0] + seen[1] < expected.load(Ordering::Relaxed) {
                // Short waits, so the loop sees `expected` once it is known.
                let Ok(frame) =
                    tokio::time::timeout(Duration::from_millis(100), client.next()).await
                else {
                    continue;
                };
                let v = version(&frame).unwrap_or_else(|| panic!("a frame of no version: {frame}"));
                seen[v] += 1;
            }
            client.expect_silence(Duration::from_millis(200)).await;
            seen
        })
    };

    let mut acks = 0u64;
    let mut swap = Some(swap);
    let mut swapped_at = None;
    // Events sent when the new version was in, and when it was seen in.
    let mut landed_at = None;
    while !(writer.is_finished() && acks == sent.load(Ordering::Relaxed)) {
        let message = tokio::time::timeout(Duration::from_secs(20), read.next())
            .await
            .expect("no ack in 20 s")
            .unwrap()
            .unwrap();
        let text = match message {
            Message::Text(text) => text,
            Message::Close(frame) => panic!("the dispatch connection was closed: {frame:?}"),
            _ => continue,
        };
        let ack: Value = serde_json::from_str(&text).unwrap();
        if ack["t"] == "PONG" {
            continue;
        }
        assert_eq!(ack["t"], "EVENT_ROUNDTRIP", "{ack}");
        assert_eq!(
            ack["success"], true,
            "an event failed during the swap: {ack}"
        );
        acks += 1;
        window.add_permits(1);
        if acks == BEFORE {
            swap.take().unwrap()();
            swapped_at = Some(Instant::now());
        }
        if let Some(at) = swapped_at
            && landed_at.is_none()
            && acks.is_multiple_of(50)
        {
            if landed().await {
                landed_at = Some((sent.load(Ordering::Relaxed), at.elapsed()));
            } else {
                assert!(
                    at.elapsed() < within,
                    "the new version was not in {within:?} after the swap ({acks} events acked)"
                );
            }
        }
        if landed_at.is_some_and(|(at, _)| sent.load(Ordering::Relaxed) >= at + AFTER) {
            stop.store(true, Ordering::Relaxed);
        }
    }
    let total = writer.await.unwrap();
    let (_, took) = landed_at.unwrap();
    expected.store(total, Ordering::Relaxed);
    let seen = tokio::time::timeout(Duration::from_secs(30), frames)
        .await
        .expect("frames missing")
        .unwrap();
    assert_eq!(seen[0] + seen[1], total, "one frame per event");
    assert!(seen[0] >= BEFORE, "{seen:?}");
    assert!(seen[1] >= AFTER, "{seen:?}");
    eprintln!("{total} events: {seen:?}; swap -> new version in: {took:.1?}");
    took
}
