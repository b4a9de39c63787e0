//! What every listener does with a new connection before its protocol
//! runs (the client and dispatch WebSockets, the admin and API HTTP
//! servers): TLS when configured, then the request head, read whole under
//! one deadline (`server.handshake_timeout_ms`) and capped; a head over
//! the caps is answered 431 and the connection closed. The protocol
//! (tungstenite, hyper) then reads the head again from [`Prefixed`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

use crate::telemetry::Metrics;

/// Most request-head bytes read: tungstenite's own cap.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most request headers: tungstenite's limit.
pub const MAX_HEADERS: usize = 124;
/// The answer to a head over [`MAX_HEAD`] or [`MAX_HEADERS`].
const TOO_LARGE: &str = "HTTP/1.1 431 Request Header Fields Too Large\r\n\
    Connection: close\r\nContent-Length: 0\r\n\r\n";
/// How long a last write (a refusal, a close frame) may take before the
/// socket is simply dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// After our last write and FIN, how long we keep reading for the peer to
/// hang up, so unread input doesn't turn the close into a reset.
const LINGER: Duration = Duration::from_secs(1);

/// One accepted connection: plain, or TLS (boxed: rustls' state is
/// large, and most connections are plain).
pub type Stream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// How one listener guards its connections before the protocol starts.
#[derive(Clone)]
pub struct Guard {
    /// The `listener` label of `handshakes_refused`.
    pub listener: &'static str,
    pub timeout: Duration,
    pub tls: Option<TlsAcceptor>,
    /// `None` where the process keeps no metrics (the reference API).
    pub metrics: Option<Arc<Metrics>>,
}

impl Guard {
    /// TLS, then the request head, both before `deadline`; hand both to
    /// [`Prefixed::new`]. `None`: the connection was refused here (timed
    /// out, a failed TLS handshake, or a head over the caps, which got
    /// 431), counted and closed.
    pub async fn accept(&self, tcp: TcpStream, deadline: Instant) -> Option<(Stream, Vec<u8>)> {
        // Responses are written whole; Nagle would only add latency.
        let _ = tcp.set_nodelay(true);
        let opened = timeout_at(deadline, async {
            let mut stream = match &self.tls {
                Some(tls) => match tls.accept(tcp).await {
                    Ok(tls) => Either::Right(Box::new(tls)),
                    Err(err) => {
                        tracing::debug!(listener = self.listener, error = %err, "TLS handshake failed");
                        return None;
                    }
                },
                None => Either::Left(tcp),
            };
            let head = read_head(&mut stream).await;
            Some((stream, head))
        })
        .await;
        let (mut stream, head) = match opened {
            Ok(Some(opened)) => opened,
            Ok(None) => {
                self.refused("tls");
                return None;
            }
            Err(_) => {
                self.refused("timeout");
                tracing::debug!(listener = self.listener, "handshake timed out");
                return None;
            }
        };
        if oversized(&head) {
            self.refused("too_large");
            tracing::debug!(
                listener = self.listener,
                "refused an oversized request head"
            );
            let _ = timeout(CLOSE_TIMEOUT, stream.write_all(TOO_LARGE.as_bytes())).await;
            hang_up(&mut stream).await;
            return None;
        }
        Some((stream, head))
    }

    /// When a handshake starting now must be done.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// Counts one handshake refused on this listener.
    pub fn refused(&self, reason: &'static str) {
        if let Some(metrics) = &self.metrics {
            metrics.handshake_refused(self.listener, reason);
        }
    }
}

/// Reads the request head: up to `\r\n\r\n`, [`MAX_HEAD`] bytes, EOF or a
/// read error (the protocol judges an incomplete head).
async fn read_head(stream: &mut Stream) -> Vec<u8> {
    let mut head = Vec::new();
    while head.len() < MAX_HEAD {
        if head.capacity() - head.len() < 1024 {
            head.reserve(4096);
        }
        let from = head.len().saturating_sub(3);
        match stream.read_buf(&mut head).await {
            Ok(0) | Err(_) => break,
            Ok(_) if head[from..].windows(4).any(|w| w == b"\r\n\r\n") => break,
            Ok(_) => {}
        }
    }
    head
}

/// Over the byte cap (read up to it without the head ending) or the
/// header-count cap. Every header ends with a `\n`, so only a head with
/// more of them than the cap allows headers is parsed here: the protocol
/// parses the head anyway, and a connect storm pays for every parse.
fn oversized(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    head.len() >= MAX_HEAD
        || (head.iter().filter(|&&b| b == b'\n').count() > MAX_HEADERS
            && matches!(
                httparse::Request::new(&mut headers).parse(head),
                Err(httparse::Error::TooManyHeaders)
            ))
}

/// FIN, then reading (and discarding) until the peer hangs up, for at
/// most [`LINGER`], so unread input can't turn our close into a reset.
pub async fn hang_up<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let _ = timeout(LINGER, async {
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 256];
        while let Ok(n) = stream.read(&mut sink).await
            && n > 0
        {}
    })
    .await;
}

/// Sees every byte read through a [`Prefixed`], head included, before the
/// protocol does; an error fails that read and withholds its bytes.
pub trait ReadCheck {
    fn check(&mut self, bytes: &[u8]) -> std::io::Result<()>;
}

/// No check.
impl ReadCheck for () {
    fn check(&mut self, _: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
}

/// A connection with its request head, read ahead, put back in front of
/// it for the protocol to read again; reads pass `check`.
pub struct Prefixed<S, C = ()> {
    head: Vec<u8>,
    read: usize,
    io: S,
    check: C,
}

impl<S> Prefixed<S> {
    pub fn new(head: Vec<u8>, io: S) -> Prefixed<S> {
        Prefixed {
            head,
            read: 0,
            io,
            check: (),
        }
    }
}

impl<S, C> Prefixed<S, C> {
    pub fn checked<D: ReadCheck>(self, check: D) -> Prefixed<S, D> {
        let Prefixed { head, read, io, .. } = self;
        Prefixed {
            head,
            read,
            io,
            check,
        }
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }
}

impl<S: AsyncRead + Unpin, C: ReadCheck + Unpin> AsyncRead for Prefixed<S, C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        if this.read < this.head.len() {
            let n = (this.head.len() - this.read).min(buf.remaining());
            buf.put_slice(&this.head[this.read..this.read + n]);
            this.read += n;
            if this.read == this.head.len() {
                // Given back: an idle connection keeps no head buffer.
                this.head = Vec::new();
                this.read = 0;
            }
        } else {
            match Pin::new(&mut this.io).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
        if let Err(err) = this.check.check(&buf.filled()[before..]) {
            buf.set_filled(before);
            return Poll::Ready(Err(err));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin, C: Unpin> AsyncWrite for Prefixed<S, C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_over_either_cap_are_oversized() {
        assert!(!oversized(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        // Incomplete but small: the protocol judges it.
        assert!(!oversized(b"GET / HTTP/1.1\r\nHost: x\r\n"));
        assert!(oversized(&vec![b'a'; MAX_HEAD]));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        assert!(oversized(&many));
        // Exactly the cap: not oversized, though it has as many lines.
        let mut at_cap = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            at_cap.extend(format!("X-{i}: y\r\n").as_bytes());
        }
        at_cap.extend(b"\r\n");
        assert!(!oversized(&at_cap));
    }
}
