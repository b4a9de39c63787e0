//! A receive-only client session, as a browser or app would hold it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::dispatch::{FRAME_TIMEOUT, ws_connect};

/// A connected client that has read its HELLO.
pub struct Client {
    pub ws: WebSocketStream<TcpStream>,
    pub hello: Value,
}

impl Client {
    /// Connects as `user` with a harness token and reads HELLO.
    pub async fn connect(addr: SocketAddr, user: u64) -> Client {
        let ws = ws_connect(addr, "/gateway", Some(&super::token(user)))
            .await
            .unwrap();
        let mut client = Client {
            ws,
            hello: Value::Null,
        };
        client.hello = client.next().await;
        assert_eq!(client.hello["t"], "HELLO", "{}", client.hello);
        client
    }

    /// The next text frame as JSON.
    pub async fn next(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(FRAME_TIMEOUT, self.ws.next())
                .await
                .expect("no client frame in time")
                .expect("client connection ended")
                .expect("client connection failed");
            match message {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                Message::Close(frame) => panic!("client session closed: {frame:?}"),
                _ => continue,
            }
        }
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
