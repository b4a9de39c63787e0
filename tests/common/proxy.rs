//! A TCP proxy a test can cut and restore: one process reaches a service
//! (NATS) through it, so the test can take the service away from that
//! process alone and give it back.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::task::AbortHandle;

#[derive(Default)]
struct State {
    /// `false` while cut: new connections are closed at once.
    open: bool,
    /// The connections being relayed, aborted (so closed) by a cut.
    relays: Vec<AbortHandle>,
}

/// Relays `127.0.0.1:<port>` to a target on its own thread and runtime,
/// so it keeps relaying while a test blocks (e.g. starting a gateway).
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            open: true,
            relays: Vec::new(),
        }));
        let shared = state.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((mut inbound, _)) = listener.accept().await {
                // Checked and recorded under the lock a cut takes, so no
                // relay escapes a cut.
                let mut state = shared.lock().unwrap();
                if !state.open {
                    continue;
                }
                let relay = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                state.relays.retain(|r| !r.is_finished());
                state.relays.push(relay.abort_handle());
            }
        });
        Proxy {
            addr,
            state,
            runtime: Some(runtime),
        }
    }

    /// Closes every relayed connection and refuses new ones (accepted and
    /// closed at once, as a dead route would end them).
    pub fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.open = false;
        for relay in state.relays.drain(..) {
            relay.abort();
        }
    }

    /// Relays new connections again.
    pub fn restore(&self) {
        self.state.lock().unwrap().open = true;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
