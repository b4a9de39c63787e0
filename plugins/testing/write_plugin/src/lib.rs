//! Test plugin: tries to write through `query`, which the host must refuse.
//!
//! It runs `d.sql` if the event has one (so a test can try several write
//! vectors with one plugin), else an `INSERT INTO users`. Rejected: fails
//! with code `WRITE_REJECTED` and the host's db-error text. Accepted: one
//! `WRITE_ACCEPTED` delivery to everyone, `{"rows": n}`, so a test can tell.

use otako_plugin_sdk::prelude::*;
use serde::Deserialize;
use serde_json::json;

const INSERT: &str = "INSERT INTO users (id, name, created_at) VALUES ($1, $2, $3)";

#[derive(Deserialize)]
struct WriteRequest {
    sql: Option<String>,
}

fn handle(event: Event) -> Result<Vec<Delivery>, HandlerError> {
    let request: WriteRequest = event.data_as()?;
    let result = match request.sql {
        Some(sql) => query(&sql, &[]),
        None => query(
            INSERT,
            &[&777_000_777_i64, &"write_plugin", &"1970-01-01T00:00:00Z"],
        ),
    };
    match result {
        Ok(rows) => Ok(vec![deliver_to_everyone(
            "WRITE_ACCEPTED",
            &json!({ "rows": rows.len() }),
        )?]),
        Err(err) => Err(HandlerError::new("WRITE_REJECTED", err.describe())),
    }
}

otako_plugin_sdk::export_handler!(handle);
