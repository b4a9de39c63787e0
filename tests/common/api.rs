//! Calls to the reference HTTP backend (`otako-gateway api`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use serde_json::Value;

use super::http_request;

/// A JSON call to the API; returns (status, parsed body or Null).
pub async fn call(
    api: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut headers = vec![("Accept", "application/json")];
    if let Some(auth) = auth {
        headers.push(("Authorization", auth));
    }
    let (status, text) = http_request(api, method, path, &headers, body).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}
