//! A TCP proxy that a test can cut and restore, to put a network failure
//! between a gateway and a server it depends on (NATS, PostgreSQL).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards connections on [`addr`](Self::addr) to an upstream address
/// while open; cut, it drops every forwarded connection and closes new
/// ones at once, as an unreachable server would look to a client.
pub struct Proxy {
    pub addr: SocketAddr,
    open: watch::Sender<bool>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, watching) = watch::channel(true);
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if !*watching.borrow() {
                    drop(client);
                    continue;
                }
                tokio::spawn(forward(client, upstream, watching.clone()));
            }
        });
        Proxy { addr, open }
    }

    /// Drops every forwarded connection and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

async fn forward(mut client: TcpStream, upstream: SocketAddr, mut open: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = open.wait_for(|open| !*open) => {}
    }
}
