//! One dispatch connection: bearer auth at the handshake, a PING deadline,
//! pipelined events bounded by `max_inflight`, and one writer that batches
//! acks into as few socket writes as the load allows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::Instrument;

use crate::config::{DispatchConfig, Secret};
use crate::shutdown::Shutdown;

use super::frame::{self, FrameError, Inbound};
use super::order::Order;
use super::pipeline::Pipeline;

/// Close code for a missing PING (DESIGN §2's heartbeat timeout).
const CLOSE_PING_TIMEOUT: u16 = 4008;

/// The dispatch listener's shared state.
pub struct Dispatch {
    pipeline: Arc<Pipeline>,
    /// SHA-256 of the secret: comparing digests keeps the comparison
    /// constant-time whatever length the caller sends.
    secret: [u8; 32],
    config: DispatchConfig,
}

impl Dispatch {
    pub fn new(pipeline: Pipeline, secret: &Secret, config: DispatchConfig) -> Arc<Dispatch> {
        Arc::new(Dispatch {
            pipeline: Arc::new(pipeline),
            secret: Sha256::digest(secret.expose().as_bytes()).into(),
            config,
        })
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    fn authorized(&self, header: Option<&str>) -> bool {
        let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        digest.ct_eq(&self.secret).into()
    }
}

/// Accepts dispatch connections until shutdown; each runs in its own task
/// and finishes its in-flight events before closing with 1001.
pub async fn serve(dispatch: Arc<Dispatch>, listener: TcpListener, shutdown: Shutdown) {
    while let Some((stream, peer)) = shutdown.accept(&listener, "dispatch").await {
        let _ = stream.set_nodelay(true);
        let span = tracing::info_span!("dispatch", %peer);
        shutdown.spawn(connection(dispatch.clone(), stream, shutdown.clone()).instrument(span));
    }
}

fn reject(status: StatusCode, body: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(body.to_owned()));
    *response.status_mut() = status;
    response
}

// The handshake callback's error type is tungstenite's, not ours to shrink.
#[allow(clippy::result_large_err)]
async fn connection(dispatch: Arc<Dispatch>, stream: TcpStream, shutdown: Shutdown) {
    let metrics = dispatch.pipeline.metrics.clone();
    let max_frame = dispatch.config.max_frame_bytes.get();
    // Frames up to this size are read and answered with INVALID_FRAME;
    // only beyond it does the connection close (1009).
    let hard_cap = max_frame.saturating_mul(4).max(1 << 20);
    let mut ws_config = WebSocketConfig::default();
    ws_config.max_message_size = Some(hard_cap);
    ws_config.max_frame_size = Some(hard_cap);
    let callback = |req: &Request, response: Response| {
        if req.uri().path() != "/dispatch" {
            return Err(reject(
                StatusCode::NOT_FOUND,
                "not found: the dispatch endpoint is GET /dispatch\n",
            ));
        }
        let header = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if dispatch.authorized(header) {
            Ok(response)
        } else {
            metrics.auth_failures.inc();
            Err(reject(
                StatusCode::UNAUTHORIZED,
                "unauthorized: send Authorization: Bearer <dispatch secret>\n",
            ))
        }
    };
    let ws = match tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config)),
    )
    .await
    {
        Ok(Ok(ws)) => ws,
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "dispatch handshake refused");
            return;
        }
        Err(_) => {
            tracing::debug!("dispatch handshake timed out");
            return;
        }
    };
    tracing::info!("dispatch connection open");
    metrics.dispatch_connections.inc();
    let (mut sink, mut stream) = ws.split();

    let max_inflight = dispatch.config.max_inflight.get();
    let (tx, mut rx) = mpsc::channel::<Message>(max_inflight + 64);
    // The writer: everything queued is fed, then flushed once.
    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut closing = matches!(first, Message::Close(_));
            if sink.feed(first).await.is_err() {
                return;
            }
            while !closing && let Ok(next) = rx.try_recv() {
                closing = matches!(next, Message::Close(_));
                if sink.feed(next).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() || closing {
                return;
            }
        }
    });

    let permits = Arc::new(Semaphore::new(max_inflight));
    let mut order = Order::default();
    let ping_timeout = Duration::from_millis(dispatch.config.ping_timeout_ms.get());
    let deadline = tokio::time::sleep(ping_timeout);
    tokio::pin!(deadline);

    let close: Option<(u16, &str)> = loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break Some((1001, "gateway shutting down")),
            _ = &mut deadline => break Some((CLOSE_PING_TIMEOUT, "no PING within ping_timeout_ms")),
            message = stream.next() => message,
        };
        let text = match message {
            None => break None,
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(_))) => {
                metrics.invalid_frames.inc();
                let _ = tx
                    .send(Message::text(frame::invalid_frame(
                        "binary frames are not accepted: send JSON text",
                    )))
                    .await;
                continue;
            }
            Some(Ok(Message::Close(_))) => break None,
            Some(Ok(_)) => continue,
            Some(Err(WsError::Capacity(err))) => {
                tracing::warn!(error = %err, "dispatch frame over the hard size cap; closing");
                break Some((1009, "frame too large"));
            }
            Some(Err(err)) => {
                tracing::debug!(error = %err, "dispatch connection error");
                break None;
            }
        };
        if text.len() > max_frame {
            metrics.invalid_frames.inc();
            let reason = format!(
                "frame of {} bytes exceeds dispatch.max_frame_bytes ({max_frame})",
                text.len()
            );
            let _ = tx.send(Message::text(frame::invalid_frame(&reason))).await;
            continue;
        }
        match frame::parse(&text) {
            Ok(Inbound::Ping { ts }) => {
                deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + ping_timeout);
                let inflight = max_inflight - permits.available_permits();
                let pong = frame::pong(&ts, inflight, dispatch.pipeline.sessions.session_count());
                let _ = tx.send(Message::text(pong)).await;
            }
            Ok(Inbound::Event(ev)) => {
                // Backpressure: at max_inflight, stop reading until one
                // finishes. Time spent here is ours, not the backend's, so
                // it extends the PING deadline.
                let waited = Instant::now();
                let permit = tokio::select! {
                    permit = permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break None,
                    },
                    _ = shutdown.cancelled() => break Some((1001, "gateway shutting down")),
                };
                let paused = waited.elapsed();
                if paused > Duration::from_millis(1) {
                    let next = deadline.deadline() + paused;
                    deadline.as_mut().reset(next);
                }
                let turn = order.turn(ev.d.get());
                let pipeline = dispatch.pipeline.clone();
                let tx = tx.clone();
                let started = Instant::now();
                pipeline.metrics.events_inflight.inc();
                tokio::spawn(async move {
                    let outcome = pipeline.run(&ev, turn).await;
                    let ack = frame::roundtrip(&ev.event_id, ev.s.as_ref(), &outcome);
                    let _ = tx.send(Message::text(ack)).await;
                    pipeline
                        .metrics
                        .ack_latency
                        .observe(started.elapsed().as_secs_f64());
                    pipeline.metrics.events_inflight.dec();
                    drop(permit);
                });
            }
            Err(FrameError::Invalid(reason)) => {
                metrics.invalid_frames.inc();
                let _ = tx.send(Message::text(frame::invalid_frame(&reason))).await;
            }
            Err(FrameError::BadEvent {
                event_id,
                s,
                t,
                reason,
            }) => {
                metrics.invalid_frames.inc();
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break None;
                };
                let pipeline = dispatch.pipeline.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let outcome = pipeline
                        .reject(&event_id, s.as_ref(), t.as_deref(), &reason)
                        .await;
                    let ack = frame::roundtrip(&event_id, s.as_ref(), &outcome);
                    let _ = tx.send(Message::text(ack)).await;
                    drop(permit);
                });
            }
        }
    };

    // Let in-flight events finish and send their acks before closing.
    let all = u32::try_from(max_inflight).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
    if let Some((code, reason)) = close {
        tracing::info!(code, reason, "closing dispatch connection");
        let _ = tx
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            })))
            .await;
    }
    drop(tx);
    let _ = writer.await;
    metrics.dispatch_connections.dec();
    tracing::info!("dispatch connection closed");
}
