// TEMPORARY stand-in with the agreed API, replaced by the plugin branch.
#![allow(dead_code, unused_variables, clippy::todo)]
use crate::config::Config;
use crate::db::Db;
use crate::failure::Failure;
use crate::ids::{ChannelId, UserId};
use crate::telemetry::Metrics;
use std::sync::Arc;
pub struct Event<'a> {
    pub name: &'a str,
    pub id: &'a str,
    pub data: &'a str,
}
pub enum Audience {
    Users(Vec<UserId>),
    Channel(ChannelId),
    Everyone,
}
pub struct Delivery {
    pub event: String,
    pub payload: String,
    pub audience: Audience,
}
pub trait Presence: Send + Sync + 'static {
    fn online(&self, users: &[UserId]) -> Vec<UserId>;
}
#[derive(Debug, thiserror::Error)]
#[error("x")]
pub struct PluginError;
#[derive(Clone)]
pub struct Plugins;
impl Plugins {
    pub async fn load(
        config: &Config,
        db: Db,
        presence: Arc<dyn Presence>,
        metrics: Arc<Metrics>,
    ) -> Result<Plugins, PluginError> {
        todo!()
    }
    pub async fn handle(&self, event: &Event<'_>) -> Result<Vec<Delivery>, Failure> {
        todo!()
    }
    pub async fn reload(&self, config: &Config) -> Result<(), PluginError> {
        todo!()
    }
}
