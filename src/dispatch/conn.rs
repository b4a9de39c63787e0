//! One dispatch connection: bearer auth at the handshake, a PING deadline,
//! pipelined events bounded by `max_inflight`, one ack writer, and a close
//! that loses nothing.
//!
//! Every frame is parsed once ([`frame::parse`]); every event with a
//! readable id is spawned the same way and its ack is written from the one
//! outcome [`Pipeline::run`] returns. On shutdown, a missing PING or a peer
//! that stops reading, the connection stops reading, lets the events it
//! has read finish (acks written where the peer still reads), sends its
//! close code, and reads until the peer's close so that no unread byte
//! turns the close into a reset that would discard acks still in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{DispatchConfig, Secret};
use crate::http::BearerSecret;
use crate::listen::{Guard, Prefixed, Stream};
use crate::shutdown::Shutdown;

use super::frame::{self, DispatchEvent, Inbound};
use super::order::Order;
use super::pipeline::Pipeline;

/// How long, after sending our close, we read for the peer's.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

type Ws = WebSocketStream<Prefixed<Stream>>;

/// Why a connection ends, as its close frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// The peer closed or went away: nothing to send.
    ByPeer,
    Shutdown,
    PingTimeout,
    AckStall,
    FrameTooLarge,
}

impl Close {
    fn frame(self) -> Option<(u16, &'static str)> {
        match self {
            Close::ByPeer => None,
            Close::Shutdown => Some((1001, "gateway shutting down")),
            Close::PingTimeout => Some((4008, "no PING within ping_timeout_ms")),
            Close::AckStall => Some((4008, "acks unread for ping_timeout_ms")),
            Close::FrameTooLarge => Some((1009, "frame too large")),
        }
    }
}

/// The dispatch listener's shared state.
pub struct Listener {
    pipeline: Arc<Pipeline>,
    secret: BearerSecret,
    config: DispatchConfig,
    /// TLS (`server.dispatch_tls`) and the request head under
    /// `server.handshake_timeout_ms`, as on the client listener.
    guard: Guard,
}

impl Listener {
    pub fn new(
        pipeline: Pipeline,
        secret: &Secret,
        config: DispatchConfig,
        guard: Guard,
    ) -> Arc<Listener> {
        Arc::new(Listener {
            pipeline: Arc::new(pipeline),
            secret: BearerSecret::new(secret.expose()),
            config,
            guard,
        })
    }

    fn authorized(&self, header: Option<&str>) -> bool {
        self.secret.admits(header)
    }
}

/// Accepts dispatch connections until shutdown; each runs in its own task
/// and finishes its in-flight events before closing with 1001.
pub async fn serve(dispatch: Arc<Listener>, listener: TcpListener, shutdown: Shutdown) {
    while let Some((stream, peer)) = shutdown.accept(&listener, "dispatch").await {
        let span = tracing::info_span!("dispatch", %peer);
        shutdown.spawn(connection(dispatch.clone(), stream, shutdown.clone()).instrument(span));
    }
}

async fn connection(dispatch: Arc<Listener>, stream: TcpStream, shutdown: Shutdown) {
    let Some(ws) = handshake(&dispatch, stream).await else {
        return;
    };
    let metrics = dispatch.pipeline.metrics.clone();
    tracing::info!("dispatch connection open");
    metrics.dispatch_connections.inc();
    let (sink, mut stream) = ws.split();
    let stall = Duration::from_millis(dispatch.config.ping_timeout_ms.get());
    let max_inflight = dispatch.config.max_inflight.get();
    let acks = Acks::start(sink, max_inflight + 64, stall);
    let permits = Arc::new(Semaphore::new(max_inflight));

    let close = read(&dispatch, &mut stream, &acks, &permits, &shutdown).await;

    // Let every event already read finish and queue its ack.
    let all = u32::try_from(max_inflight).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
    if let Some((code, reason)) = close.frame() {
        tracing::info!(code, reason, "closing dispatch connection");
        acks.send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        })))
        .await;
    }
    let Acks { tx, writer, .. } = acks;
    drop(tx);
    let _ = writer.await;
    if !matches!(close, Close::ByPeer | Close::AckStall) {
        // Read (and drop) until the peer's close: closing a socket with
        // unread input resets it, and a reset makes the peer's kernel
        // discard acks it has not yet handed to the backend. (A peer that
        // stopped reading will not answer; it gets no grace.)
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            while let Some(Ok(message)) = stream.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    metrics.dispatch_connections.dec();
    tracing::info!("dispatch connection closed");
}

// The handshake callback's error type is tungstenite's, not ours to shrink.
#[allow(clippy::result_large_err)]
async fn handshake(dispatch: &Listener, tcp: TcpStream) -> Option<Ws> {
    let metrics = &dispatch.pipeline.metrics;
    let deadline = dispatch.guard.deadline();
    let (stream, head) = dispatch.guard.accept(tcp, deadline).await?;
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
    let io = Prefixed::new(head, stream);
    match tokio::time::timeout_at(
        deadline,
        tokio_tungstenite::accept_hdr_async_with_config(io, callback, Some(ws_config)),
    )
    .await
    {
        Ok(Ok(ws)) => Some(ws),
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "dispatch handshake refused");
            None
        }
        Err(_) => {
            dispatch.guard.refused("timeout");
            tracing::debug!("dispatch handshake timed out");
            None
        }
    }
}

fn reject(status: StatusCode, body: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(body.to_owned()));
    *response.status_mut() = status;
    response
}

/// Reads frames until the connection should close, and says why.
async fn read(
    dispatch: &Listener,
    stream: &mut SplitStream<Ws>,
    acks: &Acks,
    permits: &Arc<Semaphore>,
    shutdown: &Shutdown,
) -> Close {
    let pipeline = &dispatch.pipeline;
    let metrics = &pipeline.metrics;
    let max_frame = dispatch.config.max_frame_bytes.get();
    let max_inflight = dispatch.config.max_inflight.get();
    let mut order = Order::default();
    let ping_timeout = Duration::from_millis(dispatch.config.ping_timeout_ms.get());
    let deadline = tokio::time::sleep(ping_timeout);
    tokio::pin!(deadline);
    loop {
        let message = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Close::Shutdown,
            _ = acks.stalled.cancelled() => return Close::AckStall,
            _ = &mut deadline => return Close::PingTimeout,
            message = stream.next() => message,
        };
        let text = match message {
            None | Some(Ok(Message::Close(_))) => return Close::ByPeer,
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(_))) => {
                metrics.invalid_frames.inc();
                acks.invalid("binary frames are not accepted: send JSON text")
                    .await;
                continue;
            }
            Some(Ok(_)) => continue,
            Some(Err(WsError::Capacity(err))) => {
                tracing::warn!(error = %err, "dispatch frame over the hard size cap; closing");
                return Close::FrameTooLarge;
            }
            Some(Err(err)) => {
                tracing::debug!(error = %err, "dispatch connection error");
                return Close::ByPeer;
            }
        };
        if text.len() > max_frame {
            metrics.invalid_frames.inc();
            let reason = format!(
                "frame of {} bytes exceeds dispatch.max_frame_bytes ({max_frame})",
                text.len()
            );
            acks.invalid(&reason).await;
            continue;
        }
        match frame::parse(&text) {
            Ok(Inbound::Ping { ts }) => {
                deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + ping_timeout);
                let inflight = max_inflight - permits.available_permits();
                let pong = frame::pong(&ts, inflight, pipeline.sessions.session_count());
                acks.send(Message::text(pong)).await;
            }
            Ok(Inbound::Event(ev)) => {
                // Backpressure: at max_inflight, stop reading until one
                // finishes. The event is read, so it runs even if shutdown
                // begins meanwhile. Time spent here is ours, not the
                // backend's, so it extends the PING deadline.
                let waited = Instant::now();
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return Close::ByPeer;
                };
                let paused = waited.elapsed();
                if paused > Duration::from_millis(1) {
                    let next = deadline.deadline() + paused;
                    deadline.as_mut().reset(next);
                }
                let channel = ev.body.as_ref().ok().and_then(|b| b.channel.as_deref());
                let turn = order.turn(channel);
                // Boxed, so the task tokio allocates and updates stays
                // small (the future is kilobytes; profiles showed its
                // copies on spawn and completion).
                tokio::spawn(Box::pin(run(
                    pipeline.clone(),
                    ev,
                    turn,
                    acks.tx.clone(),
                    permit,
                )));
            }
            Err(reason) => {
                metrics.invalid_frames.inc();
                acks.invalid(&reason).await;
            }
        }
    }
}

/// One event, from its frame to its ack.
async fn run(
    pipeline: Arc<Pipeline>,
    ev: DispatchEvent,
    turn: super::order::Turn,
    acks: mpsc::Sender<Message>,
    permit: OwnedSemaphorePermit,
) {
    let started = Instant::now();
    pipeline.metrics.events_inflight.inc();
    let outcome = pipeline.run(&ev, turn).await;
    let ack = frame::roundtrip(&ev.event_id, ev.s.as_ref(), &outcome);
    // An error means the writer is gone (peer closed or stalled); the
    // outcome is recorded either way, and the backend's retry is answered
    // from it.
    let _ = acks.send(Message::text(ack)).await;
    pipeline
        .metrics
        .ack_latency
        .observe(started.elapsed().as_secs_f64());
    pipeline.metrics.events_inflight.dec();
    drop(permit);
}

/// The connection's single writer: everything queued is fed, then flushed
/// once, so acks batch into as few socket writes as the load allows.
struct Acks {
    tx: mpsc::Sender<Message>,
    writer: tokio::task::JoinHandle<()>,
    /// Cancelled when a batch of writes could not be completed within the
    /// stall timeout: the peer stopped reading (or reads too slowly to be
    /// told its outcomes).
    stalled: CancellationToken,
}

impl Acks {
    fn start<S>(
        mut sink: SplitSink<WebSocketStream<S>, Message>,
        depth: usize,
        stall: Duration,
    ) -> Acks
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Message>(depth);
        let stalled = CancellationToken::new();
        let on_stall = stalled.clone();
        let writer = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                match tokio::time::timeout(stall, write_batch(&mut sink, first, &mut rx)).await {
                    Ok(Ok(false)) => {}
                    Ok(Ok(true)) => return,
                    Ok(Err(err)) => {
                        tracing::debug!(error = %err, "dispatch write failed");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(stall = ?stall, "the dispatch peer stopped reading acks; closing the connection (4008)");
                        on_stall.cancel();
                        return;
                    }
                }
            }
        });
        Acks {
            tx,
            writer,
            stalled,
        }
    }

    async fn send(&self, message: Message) {
        let _ = self.tx.send(message).await;
    }

    async fn invalid(&self, reason: &str) {
        self.send(Message::text(frame::invalid_frame(reason))).await;
    }
}

/// Feeds `first` and whatever else is queued (up to a close), then
/// flushes; returns whether the batch ended with a close.
async fn write_batch<S>(
    sink: &mut SplitSink<WebSocketStream<S>, Message>,
    first: Message,
    rx: &mut mpsc::Receiver<Message>,
) -> Result<bool, WsError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut closing = matches!(first, Message::Close(_));
    sink.feed(first).await?;
    let mut yielded = false;
    loop {
        while !closing && let Ok(next) = rx.try_recv() {
            closing = matches!(next, Message::Close(_));
            sink.feed(next).await?;
        }
        if closing || yielded {
            break;
        }
        // Events finishing on the other tasks already scheduled add
        // their acks to this write instead of each paying a send.
        tokio::task::yield_now().await;
        yielded = true;
    }
    sink.flush().await?;
    Ok(closing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// A server-side socket over an in-memory pipe of `capacity` bytes, and
    /// the peer's end of the pipe.
    async fn pipe(capacity: usize) -> (Acks, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(capacity);
        let ws = WebSocketStream::from_raw_socket(ours, Role::Server, None).await;
        let (sink, _stream) = ws.split();
        (Acks::start(sink, 64, Duration::from_secs(15)), theirs)
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_is_noticed_after_the_stall_timeout() {
        let (acks, _unread) = pipe(1024).await;
        let started = tokio::time::Instant::now();
        let fill = async {
            for _ in 0..64 {
                acks.send(Message::text("x".repeat(100))).await;
            }
        };
        tokio::select! {
            _ = fill => {}
            _ = acks.stalled.cancelled() => {}
        }
        acks.stalled.cancelled().await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(15), "{waited:?}");
        assert!(waited < Duration::from_secs(16), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_reading_peer_is_not_a_stall() {
        let (acks, mut peer) = pipe(1024).await;
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 256];
            // Reads a little every second: far slower than the writer, but
            // every batch gets through within the stall timeout.
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if peer.read(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
            }
        });
        for _ in 0..20 {
            acks.send(Message::text("x".repeat(100))).await;
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!acks.stalled.is_cancelled());
        reader.abort();
    }
}
