//! The bare-stack baseline the load tool compares the gateway against: a
//! minimal tokio-tungstenite broadcast server with the same shape of work
//! minus plugins, database and idempotency. Subscribers connect to
//! `/sub`; a publisher on `/pub` sends JSON payloads, each serialized once
//! into a client frame shared by every subscriber, and gets `{"ack":N}`
//! back once the frame is queued for all of them. Small socket buffers and
//! batched flushes, as a careful hand-written server would have.
//!
//! Usage: `bench-baseline --listen 127.0.0.1:0` (prints `listening ADDR`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

type Subscribers = Arc<Mutex<HashMap<u64, mpsc::Sender<Utf8Bytes>>>>;

fn ws_config() -> WebSocketConfig {
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 256;
    config.write_buffer_size = 0;
    config.max_write_buffer_size = 1 << 20;
    config.max_message_size = Some(1 << 20);
    config.max_frame_size = Some(1 << 20);
    config
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listen: SocketAddr = std::env::args()
        .skip_while(|a| a != "--listen")
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    let subscribers: Subscribers = Arc::default();
    let next_id = Arc::new(AtomicU64::new(1));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, subscribers.clone(), next_id.clone()));
    }
}

#[allow(clippy::result_large_err)]
async fn connection(stream: TcpStream, subscribers: Subscribers, next_id: Arc<AtomicU64>) {
    let mut path = String::new();
    let callback = |req: &Request, response: Response| {
        path = req.uri().path().to_owned();
        Ok(response)
    };
    let Ok(ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config())).await
    else {
        return;
    };
    let (mut sink, mut source) = ws.split();
    if path == "/pub" {
        let mut frames: u64 = 0;
        while let Some(Ok(Message::Text(payload))) = source.next().await {
            frames += 1;
            // Serialize once (UTF-8 checked once too); every subscriber
            // shares the bytes. try_send never waits, so the fan-out runs
            // under the lock instead of cloning every sender per frame.
            let frame =
                Utf8Bytes::from(format!(r#"{{"op":0,"t":"MESSAGE_CREATE","d":{payload}}}"#));
            for target in subscribers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
            {
                let _ = target.try_send(frame.clone());
            }
            if sink
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
    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(1024);
    subscribers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, tx);
    loop {
        tokio::select! {
            frame = rx.recv() => {
                let Some(frame) = frame else { break };
                if sink.feed(Message::Text(frame)).await.is_err() { break; }
                while let Ok(more) = rx.try_recv() {
                    if sink.feed(Message::Text(more)).await.is_err() { break; }
                }
                if sink.flush().await.is_err() { break; }
            }
            incoming = source.next() => match incoming {
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
