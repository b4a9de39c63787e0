//! Test plugin: the cheapest plugin that still does a real plugin's job, for
//! benchmarks. It reads only `d.user_id` and returns one `NOOP` delivery to
//! that user whose payload is `d` itself, passed through unparsed.

use otako_plugin_sdk::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Target {
    user_id: Id,
}

fn handle(event: Event) -> Result<Vec<Delivery>, HandlerError> {
    let target: Target = event.data_as()?;
    Ok(vec![Delivery {
        event: "NOOP".to_owned(),
        payload: event.data,
        audience: Audience::Users(vec![target.user_id.to_string()]),
    }])
}

otako_plugin_sdk::export_handler!(handle);
