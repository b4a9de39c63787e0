//! A receive-only client session, as a browser or app would hold it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::{WsClient, connect_client, read_json};

/// A connected client that has read its HELLO.
pub struct Client {
    pub ws: WsClient,
    pub hello: Value,
}

impl Client {
    /// Connects as `user` with a harness token and reads HELLO.
    pub async fn connect(addr: SocketAddr, user: u64) -> Client {
        let mut ws = connect_client(addr, &super::token(user)).await;
        let hello = read_json(&mut ws).await;
        assert_eq!(hello["t"], "HELLO", "{hello}");
        Client { ws, hello }
    }

    /// The next text frame as JSON.
    pub async fn next(&mut self) -> Value {
        read_json(&mut self.ws).await
    }

    /// Asserts no text frame arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        loop {
            match tokio::time::timeout(wait, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Text(text)))) => panic!("unexpected frame: {text}"),
                Ok(Some(Ok(Message::Close(frame)))) => panic!("closed: {frame:?}"),
                Ok(Some(Ok(_))) => continue,
                Ok(other) => panic!("connection ended: {other:?}"),
            }
        }
    }
}
