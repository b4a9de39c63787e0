//! The per-store sandbox pieces that are not the WIT interface: captured
//! stdout/stderr and the memory/table limiter.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// How much of a plugin's stdout or stderr one call keeps. A panic message
/// with its location is a few hundred bytes; the rest is dropped, never an
/// error, so a chatty plugin can't make itself fail or the host buffer much.
pub(crate) const CAPTURE_BYTES: usize = 16 * 1024;

/// The largest write permit handed to the guest at once (WASI streams
/// allocate up to this much for `write-zeroes`).
const WRITE_PERMIT: usize = 4096;

/// A guest output stream captured into a bounded in-memory buffer that the
/// host drains after each call. Unlike wasmtime's `MemoryOutputPipe` it
/// never traps when full (it drops and counts) and can be emptied, which a
/// reused instance needs.
#[derive(Clone, Default)]
pub(crate) struct Capture {
    // Shared between the WASI stream the guest writes through and the host
    // that drains it; held only for a memcpy.
    buf: Arc<Mutex<CaptureBuf>>,
}

#[derive(Default)]
struct CaptureBuf {
    bytes: Vec<u8>,
    dropped: usize,
}

/// What a plugin printed during one call.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Captured {
    pub text: String,
    /// Bytes beyond [`CAPTURE_BYTES`] that were discarded.
    pub dropped: usize,
}

impl Capture {
    fn lock(&self) -> MutexGuard<'_, CaptureBuf> {
        // The lock is never held across a panic point that matters; a
        // poisoned buffer is still a valid byte buffer.
        self.buf.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append(&self, data: &[u8]) {
        let mut buf = self.lock();
        let room = CAPTURE_BYTES.saturating_sub(buf.bytes.len());
        let take = room.min(data.len());
        buf.bytes.extend_from_slice(&data[..take]);
        buf.dropped += data.len() - take;
    }

    /// Empties the buffer, returning what was written since the last take.
    pub(crate) fn take(&self) -> Captured {
        let mut buf = self.lock();
        let bytes = std::mem::take(&mut buf.bytes);
        let dropped = std::mem::take(&mut buf.dropped);
        Captured {
            text: String::from_utf8_lossy(&bytes).into_owned(),
            dropped,
        }
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

impl AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Table elements one plugin may have (function-pointer tables); generous
/// for any real plugin, small next to its memory limit.
const TABLE_ELEMENTS: usize = 100_000;

/// The route's `memory_mb` as a wasmtime limiter. Like `StoreLimits`, but it
/// remembers that a limit was hit, so the host can tell "ran out of memory"
/// (the guest's allocator then aborts with a plain `unreachable` trap) from
/// any other trap, and it tracks the current size so a reused instance
/// that has grown large can be recycled.
pub(crate) struct Limits {
    memory_max: usize,
    /// Current linear memory size in bytes (the last growth allowed).
    pub memory: usize,
    /// Set when a growth was refused; cleared at the start of every call.
    pub exceeded: bool,
}

impl Limits {
    pub(crate) fn new(memory_max: usize) -> Self {
        Limits {
            memory_max,
            memory: 0,
            exceeded: false,
        }
    }
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_max {
            self.exceeded = true;
            return Ok(false);
        }
        self.memory = desired;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > TABLE_ELEMENTS {
            self.exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_is_bounded_and_drains() {
        let capture = Capture::default();
        capture.append(b"hello ");
        capture.append(&vec![b'x'; CAPTURE_BYTES]);
        let first = capture.take();
        assert_eq!(first.text.len(), CAPTURE_BYTES);
        assert!(first.text.starts_with("hello x"));
        assert_eq!(first.dropped, 6);
        assert_eq!(capture.take(), Captured::default());
    }

    #[test]
    fn limiter_remembers_refusals() {
        let mut limits = Limits::new(1 << 20);
        assert!(limits.memory_growing(0, 1 << 16, None).unwrap());
        assert_eq!(limits.memory, 1 << 16);
        assert!(!limits.memory_growing(1 << 16, 2 << 20, None).unwrap());
        assert!(limits.exceeded);
        assert_eq!(limits.memory, 1 << 16);
    }
}
