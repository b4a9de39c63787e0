//! A Rust client for the dispatch protocol (DESIGN §3), for backends
//! written in Rust: connect with the dispatch secret, send events
//! pipelined, await each one's `EVENT_ROUNDTRIP`, PING on a schedule.
//!
//! ```no_run
//! # async fn demo() -> Result<(), otako_gateway::dispatch_client::ClientError> {
//! use otako_gateway::dispatch_client::{DispatchClient, OutgoingEvent};
//! let client = DispatchClient::connect(
//!     "ws://127.0.0.1:7071/dispatch",
//!     "change-me-too",
//!     std::time::Duration::from_secs(5),
//! )
//! .await?;
//! let ack = client
//!     .send(&OutgoingEvent {
//!         t: "EVENT_MESSAGE_CREATE".into(),
//!         d: serde_json::json!({"id": "3", "channel_id": "1"}),
//!         event_id: "1".into(),
//!         s: 14,
//!     })
//!     .await?;
//! assert!(ack.success);
//! # Ok(()) }
//! ```
//!
//! Retrying is the caller's policy: [`RetryPolicy`] gives the backoff the
//! reference backend uses. A `wss://` url is verified against the webpki
//! roots, or against the roots of a [`TlsConnector`] from
//! [`crate::tls::connector`] given to [`DispatchClient::connect_with`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::either::Either;

/// Why an event did not get an ack.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad dispatch url {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("the dispatch connection closed before the ack")]
    Disconnected,
    #[error("no ack within {0:?}")]
    Timeout(Duration),
}

/// One event to dispatch.
#[derive(Debug, Clone)]
pub struct OutgoingEvent {
    pub t: String,
    pub d: serde_json::Value,
    /// Unique per event; retries reuse it so the gateway can deduplicate.
    pub event_id: String,
    pub s: u64,
}

/// The gateway's answer to one event.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Ack {
    pub success: bool,
    #[serde(default)]
    pub duplicate: bool,
    #[serde(default)]
    pub error: Option<AckError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AckError {
    pub code: String,
    pub message: String,
}

#[derive(Deserialize)]
struct Inbound {
    t: Option<String>,
    event_id: Option<serde_json::Value>,
    #[serde(flatten)]
    ack: serde_json::Value,
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Ack>>>>;

/// An open dispatch connection. Cheap to share behind an `Arc`; sends from
/// many tasks are pipelined on the one socket.
pub struct DispatchClient {
    frames: mpsc::Sender<Message>,
    waiters: Waiters,
    closed: Arc<AtomicBool>,
}

impl DispatchClient {
    /// Connects and starts the reader, writer and PING tasks.
    pub async fn connect(
        url: &str,
        secret: &str,
        ping_every: Duration,
    ) -> Result<DispatchClient, ClientError> {
        Self::connect_with(url, secret, ping_every, None).await
    }

    /// [`connect`](Self::connect), trusting `tls`'s roots for a `wss://`
    /// url (`None`: the webpki roots).
    pub async fn connect_with(
        url: &str,
        secret: &str,
        ping_every: Duration,
        tls: Option<&TlsConnector>,
    ) -> Result<DispatchClient, ClientError> {
        let bad_url = |reason: String| ClientError::Url {
            url: url.to_owned(),
            reason,
        };
        let mut request = url
            .into_client_request()
            .map_err(|e| bad_url(e.to_string()))?;
        let bearer = format!("Bearer {secret}")
            .parse()
            .map_err(|_| bad_url("the dispatch secret is not a valid header value".into()))?;
        request.headers_mut().insert("authorization", bearer);
        let secure = request.uri().scheme_str() == Some("wss");
        let host = request.uri().host().unwrap_or("").to_owned();
        let port = request
            .uri()
            .port_u16()
            .unwrap_or(if secure { 443 } else { 80 });
        let fail = |reason: String| ClientError::Connect {
            url: url.to_owned(),
            reason,
        };
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let stream = if secure {
            let default;
            let tls = match tls {
                Some(tls) => tls,
                None => {
                    default = crate::tls::connector(None).map_err(|e| fail(e.to_string()))?;
                    &default
                }
            };
            // `[::1]` in a url is the name `::1`.
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|e| bad_url(e.to_string()))?;
            let tls = tls
                .connect(name, stream)
                .await
                .map_err(|e| fail(format!("TLS: {e}")))?;
            Either::Right(tls)
        } else {
            Either::Left(stream)
        };
        let (ws, _) = tokio_tungstenite::client_async(request, stream)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let (mut sink, mut stream) = ws.split();

        let (frames, mut outgoing) = mpsc::channel::<Message>(1024);
        let waiters: Waiters = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));

        tokio::spawn(async move {
            while let Some(first) = outgoing.recv().await {
                if sink.feed(first).await.is_err() {
                    return;
                }
                while let Ok(next) = outgoing.try_recv() {
                    if sink.feed(next).await.is_err() {
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
            let _ = sink.close().await;
        });

        {
            let waiters = waiters.clone();
            let closed = closed.clone();
            tokio::spawn(async move {
                while let Some(Ok(message)) = stream.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let Ok(frame) = serde_json::from_str::<Inbound>(&text) else {
                        continue;
                    };
                    if frame.t.as_deref() != Some("EVENT_ROUNDTRIP") {
                        continue;
                    }
                    let key = match frame.event_id {
                        Some(serde_json::Value::String(s)) => s,
                        Some(other) => other.to_string(),
                        None => continue,
                    };
                    let Ok(ack) = serde_json::from_value::<Ack>(frame.ack) else {
                        continue;
                    };
                    let waiter = waiters
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&key);
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(ack);
                    }
                }
                closed.store(true, Ordering::Release);
                // Dropping the senders fails every waiting `send`.
                waiters
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clear();
            });
        }

        {
            let frames = frames.clone();
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(ping_every);
                loop {
                    tick.tick().await;
                    if closed.load(Ordering::Acquire) {
                        return;
                    }
                    let ts = crate::db::now_ms();
                    let ping = serde_json::json!({"op": 1, "t": "PING", "d": {"ts": ts}});
                    if frames.send(Message::text(ping.to_string())).await.is_err() {
                        return;
                    }
                }
            });
        }

        Ok(DispatchClient {
            frames,
            waiters,
            closed,
        })
    }

    /// Whether the connection has ended (reconnect if so).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.frames.is_closed()
    }

    /// Queues one event on the socket and returns its ack to await.
    /// Events queued one after another are sent in that order, which is
    /// what keeps same-channel events ordered at the gateway.
    pub async fn enqueue(&self, event: &OutgoingEvent) -> Result<PendingAck, ClientError> {
        if self.is_closed() {
            return Err(ClientError::Disconnected);
        }
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(event.event_id.clone(), tx);
        let frame = serde_json::json!({
            "t": event.t,
            "d": event.d,
            "op": 0,
            "s": event.s.to_string(),
            "event_id": event.event_id,
        });
        if self
            .frames
            .send(Message::text(frame.to_string()))
            .await
            .is_err()
        {
            self.forget(&event.event_id);
            return Err(ClientError::Disconnected);
        }
        Ok(PendingAck {
            waiters: self.waiters.clone(),
            event_id: event.event_id.clone(),
            rx,
        })
    }

    /// Sends one event and waits for its ack.
    pub async fn send(&self, event: &OutgoingEvent) -> Result<Ack, ClientError> {
        self.enqueue(event).await?.wait().await
    }

    /// [`DispatchClient::send`] with a per-attempt time limit.
    pub async fn send_timeout(
        &self,
        event: &OutgoingEvent,
        limit: Duration,
    ) -> Result<Ack, ClientError> {
        self.enqueue(event).await?.wait_timeout(limit).await
    }

    fn forget(&self, event_id: &str) {
        self.waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(event_id);
    }
}

/// An event on the wire, waiting for its `EVENT_ROUNDTRIP`.
pub struct PendingAck {
    waiters: Waiters,
    event_id: String,
    rx: oneshot::Receiver<Ack>,
}

impl PendingAck {
    pub async fn wait(self) -> Result<Ack, ClientError> {
        self.rx.await.map_err(|_| ClientError::Disconnected)
    }

    /// Waits at most `limit`; on timeout the ack, if it comes, is ignored.
    pub async fn wait_timeout(self, limit: Duration) -> Result<Ack, ClientError> {
        match tokio::time::timeout(limit, self.rx).await {
            Ok(result) => result.map_err(|_| ClientError::Disconnected),
            Err(_) => {
                self.waiters
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&self.event_id);
                Err(ClientError::Timeout(limit))
            }
        }
    }
}

/// Exponential backoff between attempts, capped.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (the seed's X).
    pub attempts: u32,
    pub attempt_timeout: Duration,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// The wait before attempt `n + 1` after `n` failed attempts.
    pub fn backoff(&self, failed: u32) -> Duration {
        let factor = 1u32
            .checked_shl(failed.saturating_sub(1).min(16))
            .unwrap_or(u32::MAX);
        self.base_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = RetryPolicy {
            attempts: 5,
            attempt_timeout: Duration::from_secs(1),
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        let waits: Vec<u128> = (1..=6).map(|n| policy.backoff(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
    }
}
