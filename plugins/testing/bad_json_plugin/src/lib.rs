//! Test plugin: returns one `BAD_JSON` delivery to everyone whose payload is
//! not JSON, which the host must refuse rather than send to clients.

use otako_plugin_sdk::{Audience, Delivery, Event, HandlerError};

fn handle(_event: Event) -> Result<Vec<Delivery>, HandlerError> {
    Ok(vec![Delivery {
        event: "BAD_JSON".to_owned(),
        payload: r#"{"unterminated": "#.to_owned(),
        audience: Audience::Everyone,
    }])
}

otako_plugin_sdk::export_handler!(handle);
