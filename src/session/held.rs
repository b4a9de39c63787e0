//! The stream under a client's WebSocket, which can hold its writes back.
//! An admitted handshake's `101 Switching Protocols` is held and goes out
//! with HELLO in one write: one syscall, one segment and one client
//! wake-up fewer per connect, which is what a reconnect storm is made of.
//! A refused handshake is never held: its response is the last thing the
//! connection says.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::listen::Stream;

pub(super) struct Held<'a> {
    io: &'a mut Stream,
    /// Set by the handshake's callback when it admits, cleared by the
    /// session once the handshake is done; flushes are deferred meanwhile.
    hold: &'a AtomicBool,
    /// Bytes written but not yet passed on; boxed so a session that has
    /// sent its HELLO carries one pointer, not an empty `Vec` (every idle
    /// session would pay the other 16 bytes).
    #[allow(clippy::box_collection)]
    pending: Option<Box<Vec<u8>>>,
}

impl<'a> Held<'a> {
    pub(super) fn new(io: &'a mut Stream, hold: &'a AtomicBool) -> Self {
        Held {
            io,
            hold,
            pending: None,
        }
    }

    fn holding(&self) -> bool {
        self.hold.load(Ordering::Relaxed)
    }

    /// Passes the held bytes on, then frees their buffer.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(pending) = &mut self.pending {
            while !pending.is_empty() {
                let n = ready!(Pin::new(&mut *self.io).poll_write(cx, pending))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                pending.drain(..n);
            }
            self.pending = None;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Held<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Held<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Once anything is held, later bytes queue behind it (order).
        if this.holding() || this.pending.is_some() {
            this.pending
                .get_or_insert_with(Default::default)
                .extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut *this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.holding() {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_release(cx))?;
        Pin::new(&mut *this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_release(cx))?;
        Pin::new(&mut *this.io).poll_shutdown(cx)
    }
}
