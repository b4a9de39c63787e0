// TEMPORARY stand-in with the agreed API, replaced by the sessions branch.
#![allow(dead_code, unused_variables, clippy::todo)]
use crate::config::SessionsConfig;
use crate::ids::UserId;
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;
use crate::token::TokenKey;
use std::sync::Arc;
use tokio::net::TcpListener;
pub struct EventFrame;
impl EventFrame {
    pub fn new(event: &str, payload: &str) -> EventFrame {
        todo!()
    }
}
#[derive(Clone)]
pub struct Sessions;
impl Sessions {
    pub fn new(config: SessionsConfig, tokens: TokenKey, metrics: Arc<Metrics>) -> Sessions {
        todo!()
    }
    pub async fn serve(&self, listener: TcpListener, shutdown: Shutdown) {
        todo!()
    }
    pub fn deliver(&self, users: &[UserId], frame: &Arc<EventFrame>) -> usize {
        todo!()
    }
    pub fn deliver_all(&self, frame: &Arc<EventFrame>) -> usize {
        todo!()
    }
    pub fn online(&self, users: &[UserId]) -> Vec<UserId> {
        todo!()
    }
    pub fn session_count(&self) -> usize {
        todo!()
    }
}
