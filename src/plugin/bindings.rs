//! The one `bindgen!` for `wit/gateway.wit` (world `plugin`), kept in its own
//! small module because the crate holding it is slow to rebuild.
//!
//! Only `query` is async: it awaits the database. `online`, `log` and
//! `config` answer from memory, and a synchronous host call is cheaper than
//! an async one. Nothing is `trappable`: every host failure a plugin can
//! cause is reported to it as a WIT value (`db-error`), never as a trap.

wasmtime::component::bindgen!({
    world: "plugin",
    path: "wit",
    imports: {
        "otako:gateway/host.query": async,
    },
    exports: { default: async },
    additional_derives: [PartialEq],
});

pub use otako::gateway::types::{Audience, DbError, Level, Rows, Value};
