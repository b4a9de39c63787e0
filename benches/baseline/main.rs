//! The bare-stack baseline the load tool compares the gateway against: the
//! broadcast server a careful engineer would write on the same stack
//! (tokio, tokio-tungstenite), minus plugins, database and idempotency.
//!
//! Subscribers connect to `/sub`; a publisher on `/pub` sends JSON payloads
//! and gets `{"ack":N}` back once frame N is queued for every subscriber.
//! Each frame is serialized once and its bytes shared by every subscriber
//! (no per-session `s`: the cheapest a broadcast can be). Each subscriber
//! has a bounded queue as deep as the gateway's default `outbound_queue`
//! (overflow drops the subscriber, like the gateway's 4009), and its task
//! drains everything queued into tungstenite's write buffer and flushes
//! once, so a busy socket gets many frames per `sendto`.
//!
//! Usage: `bench-baseline --listen 127.0.0.1:0` (prints `listening ADDR`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// The gateway's default `sessions.outbound_queue`.
const QUEUE_DEPTH: usize = 1024;
/// Frames taken from the queue per wake-up; all are written with one flush.
const BATCH: usize = 256;
/// The gateway's listen backlog, so connect storms compare fairly.
const BACKLOG: u32 = 4096;

type Subscribers = Arc<Mutex<HashMap<u64, mpsc::Sender<Utf8Bytes>>>>;

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        // Frames accumulate up to this before a write; `flush` ends a batch.
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(16 << 20)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// The gateway's allocator, so the comparison measures the code, not malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listen: SocketAddr = std::env::args()
        .skip_while(|a| a != "--listen")
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    let listener: TcpListener = socket.listen(BACKLOG)?;
    println!("listening {}", listener.local_addr()?);
    let subscribers: Subscribers = Arc::default();
    let next_id = Arc::new(AtomicU64::new(1));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, subscribers.clone(), next_id.clone()));
    }
}

#[allow(clippy::result_large_err)] // tungstenite's handshake callback type
async fn connection(stream: TcpStream, subscribers: Subscribers, next_id: Arc<AtomicU64>) {
    let mut path = String::new();
    let callback = |req: &Request, response: Response| {
        path = req.uri().path().to_owned();
        Ok(response)
    };
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config())).await
    else {
        return;
    };
    if path == "/pub" {
        let mut frames: u64 = 0;
        while let Some(Ok(Message::Text(payload))) = ws.next().await {
            frames += 1;
            let frame =
                Utf8Bytes::from(format!(r#"{{"op":0,"t":"MESSAGE_CREATE","d":{payload}}}"#));
            // try_send never waits, so the fan-out runs under the lock
            // instead of cloning every sender per frame.
            subscribers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|_, target| match target.try_send(frame.clone()) {
                    Ok(()) => true,
                    // A full queue is a slow consumer: drop it, as the
                    // gateway closes it with 4009.
                    Err(TrySendError::Full(_) | TrySendError::Closed(_)) => false,
                });
            if ws
                .send(Message::text(format!(r#"{{"ack":{frames}}}"#)))
                .await
                .is_err()
            {
                return;
            }
        }
        return;
    }
    let id = next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(QUEUE_DEPTH);
    subscribers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, tx);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 { break; }
                let mut failed = false;
                for frame in batch.drain(..) {
                    if ws.feed(Message::Text(frame)).await.is_err() {
                        failed = true;
                        break;
                    }
                }
                if failed || ws.flush().await.is_err() { break; }
            }
            incoming = ws.next() => match incoming {
                Some(Ok(_)) => {}
                _ => break,
            },
        }
    }
    subscribers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
}
