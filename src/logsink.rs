//! `otako-gateway log-sink`: the reference logging server. It appends each
//! JSON document POSTed to it as one line of a file, and honours
//! `Idempotency-Key` so a gateway's retry after a lost response doesn't
//! write a record twice.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::{BodyExt, Limited};
use hyper::{Method, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::http;
use crate::shutdown::Shutdown;

/// Largest record accepted.
const MAX_BODY: usize = 1024 * 1024;

/// The file and the keys already written to it. One async mutex: appends
/// must not interleave, and the key check and append must be one step.
struct State {
    path: PathBuf,
    seen: Mutex<HashSet<String>>,
}

/// Keys already in the file, so a restarted sink still deduplicates.
fn keys_in(path: &Path) -> HashSet<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|v| v.get("event_id").map(key_of))
        .collect()
}

fn key_of(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Serves until shutdown.
pub async fn serve(listener: TcpListener, out: PathBuf, shutdown: Shutdown) {
    let state = Arc::new(State {
        seen: Mutex::new(keys_in(&out)),
        path: out,
    });
    http::serve(listener, shutdown, move |req| {
        let state = state.clone();
        async move {
            if req.method() != Method::POST {
                return http::text(StatusCode::METHOD_NOT_ALLOWED, "POST JSON here\n");
            }
            let key = req
                .headers()
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(body) => body.to_bytes(),
                Err(_) => return http::text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n"),
            };
            let value: serde_json::Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(err) => {
                    return http::text(StatusCode::BAD_REQUEST, format!("not JSON: {err}\n"));
                }
            };
            let key = key.or_else(|| value.get("event_id").map(key_of));
            let mut seen = state.seen.lock().await;
            if let Some(key) = &key
                && seen.contains(key)
            {
                return http::text(StatusCode::OK, "duplicate\n");
            }
            match append(&state.path, &value).await {
                Ok(()) => {
                    if let Some(key) = key {
                        seen.insert(key);
                    }
                    http::text(StatusCode::CREATED, "stored\n")
                }
                Err(err) => {
                    tracing::error!(path = %state.path.display(), error = %err, "log sink cannot write");
                    http::text(StatusCode::INTERNAL_SERVER_ERROR, "cannot store\n")
                }
            }
        }
    })
    .await
}

async fn append(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(dir).await?;
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await?;
    let mut line = value.to_string();
    line.push('\n');
    file.write_all(line.as_bytes()).await?;
    file.sync_data().await
}
