//! Graceful shutdown: one token every task watches, and a tracker the
//! process waits on so in-flight work finishes before exit.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What every long-lived task gets: a signal to stop, and a tracker to spawn
/// onto so shutdown can wait for it.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    pub token: CancellationToken,
    pub tracker: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns a task that shutdown waits for.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// Resolves once shutdown has begun.
    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The next connection on `listener`, or `None` once shutdown begins.
    /// Accept errors (usually EMFILE) are logged and backed off from
    /// rather than spun on; `what` names the listener in the log.
    pub async fn accept(
        &self,
        listener: &TcpListener,
        what: &str,
    ) -> Option<(TcpStream, SocketAddr)> {
        loop {
            tokio::select! {
                _ = self.cancelled() => return None,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => return Some(pair),
                    Err(err) => {
                        tracing::warn!(listener = what, error = %err, "accept failed; backing off");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }

    /// Begins shutdown and waits for every tracked task to finish.
    pub async fn drain(&self) {
        self.token.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Resolves on SIGINT or SIGTERM.
///
/// The handlers are installed when this is called, not when the future is
/// first polled: a supervisor may send SIGTERM as soon as the process
/// announces it is listening, and a signal that arrived before the handler
/// would kill the process instead of draining it. Call it inside the
/// runtime, before announcing.
pub fn signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            match (interrupt, terminate) {
                (Ok(mut interrupt), Ok(mut terminate)) => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
