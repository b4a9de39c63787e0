//! `otako-gateway log-sink`: the reference logging server. It appends each
//! JSON document POSTed to it as one line of a file, and honours
//! `Idempotency-Key` so a gateway's retry after a lost response doesn't
//! write a record twice, across restarts too: the keys are kept in a side
//! file, `FILE.keys`, one `OFFSET "KEY"` line (the key as a JSON string) per
//! record, each written (and fsynced) before its record. A key counts only
//! if the record file reaches past its offset, so a crash between the two
//! writes forgets the key rather than the record.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::{Method, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::errlog::{append_durably, blocking, open_locked, repair_tail};
use crate::http;
use crate::listen::Guard;
use crate::shutdown::Shutdown;

/// Largest record accepted.
const MAX_BODY: usize = 1024 * 1024;

/// The file and the keys already written to it. One async mutex: appends
/// must not interleave, and the key check and append must be one step.
struct State {
    path: PathBuf,
    seen: Mutex<HashSet<String>>,
}

fn keys_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".keys");
    PathBuf::from(name)
}

/// Keys already in the file, so a restarted sink still deduplicates. Key
/// lines past the record file's end (a crash between the two writes) are
/// cut off: they are the last ones, offsets only grow.
fn load_keys(path: &Path) -> std::io::Result<HashSet<String>> {
    let records = open_locked(path)?;
    let len = repair_tail(&records)?;
    let keys = open_locked(&keys_path(path))?;
    let keys_len = repair_tail(&keys)?;
    let mut seen = HashSet::new();
    let mut valid = 0u64;
    for line in BufReader::new(&keys).split(b'\n') {
        let line = line?;
        let text = String::from_utf8_lossy(&line);
        let Some((offset, key)) = text.split_once(' ') else {
            break;
        };
        match (offset.parse::<u64>(), serde_json::from_str::<String>(key)) {
            (Ok(offset), Ok(key)) if offset < len => {
                seen.insert(key);
                valid += line.len() as u64 + 1;
            }
            _ => break,
        }
    }
    if valid < keys_len {
        tracing::warn!(
            path = %keys_path(path).display(),
            "log sink: dropping keys whose records were never written"
        );
        keys.set_len(valid)?;
        keys.sync_data()?;
    }
    Ok(seen)
}

/// Appends one record (and first its key, if any), durably; on failure
/// neither stays.
fn append(path: &Path, key: Option<&str>, line: &[u8]) -> std::io::Result<()> {
    let records = open_locked(path)?;
    let len = repair_tail(&records)?;
    let Some(key) = key else {
        return append_durably(&records, len, line);
    };
    let keys: File = open_locked(&keys_path(path))?;
    let keys_len = repair_tail(&keys)?;
    append_durably(
        &keys,
        keys_len,
        format!("{len} {}\n", serde_json::Value::from(key)).as_bytes(),
    )?;
    let result = append_durably(&records, len, line);
    if result.is_err() {
        let _ = keys.set_len(keys_len).and_then(|()| keys.sync_data());
    }
    result
}

fn key_of(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Serves until shutdown.
pub async fn serve(listener: TcpListener, out: PathBuf, shutdown: Shutdown) {
    let owned = out.clone();
    let seen = blocking(move || load_keys(&owned)).await.unwrap_or_else(|err| {
        tracing::error!(path = %out.display(), error = %err, "log sink cannot read its keys; deduplicating only new records");
        HashSet::new()
    });
    let state = Arc::new(State {
        seen: Mutex::new(seen),
        path: out,
    });
    // A reference tool: plain HTTP, the gateway's default head limits.
    let guard = Guard {
        listener: "log-sink",
        timeout: Duration::from_secs(10),
        tls: None,
        metrics: None,
    };
    http::serve(listener, shutdown, guard, move |req| {
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
            let mut line = value.to_string();
            line.push('\n');
            let (path, k) = (state.path.clone(), key.clone());
            match blocking(move || append(&path, k.as_deref(), line.as_bytes())).await {
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
