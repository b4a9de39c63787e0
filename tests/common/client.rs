//! A receive-only client session, as a browser or app would hold it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::{WsClient, connect_client, read_json, try_ws};

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

    /// Resumes `session_id` as `user` from `seq` (sent as given, so tests
    /// can send bad ones) with `?token=…&resume=…&seq=…`, and reads HELLO:
    /// check `resumed`, `replayed` and `reason` in [`hello`](Self::hello).
    pub async fn resume(addr: SocketAddr, user: u64, session_id: &str, seq: &str) -> Client {
        let token = super::token(user);
        let path = format!("/gateway?token={token}&resume={session_id}&seq={seq}");
        let mut ws = try_ws(addr, &path, &[]).await.unwrap();
        let hello = read_json(&mut ws).await;
        assert_eq!(hello["t"], "HELLO", "{hello}");
        Client { ws, hello }
    }

    /// HELLO's `session_id`: what a resume names.
    pub fn session_id(&self) -> String {
        self.hello["d"]["session_id"].as_str().unwrap().to_owned()
    }

    /// HELLO's `resumed`.
    pub fn resumed(&self) -> bool {
        self.hello["d"]["resumed"].as_bool().unwrap()
    }

    /// HELLO's `reason` (a resume that got a new session).
    pub fn reason(&self) -> Option<&str> {
        self.hello["d"]["reason"].as_str()
    }

    /// Drops the connection without a close frame, as a network failure
    /// would (the gateway keeps the session for a resume).
    pub fn drop_connection(self) {
        drop(self.ws);
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
