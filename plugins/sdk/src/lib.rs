//! # Otako Gateway plugin SDK
//!
//! A plugin is a WebAssembly component that handles one kind of dispatch
//! event: it reads the event, asks the host for what it needs (read-only
//! database lookups, who is online, its route's config) and returns the
//! deliveries the host should fan out. This crate wraps the raw WIT bindings
//! (`wit/gateway.wit`, world `plugin`) in a small typed API so a handler is a
//! single function:
//!
//! ```no_run
//! use otako_plugin_sdk::prelude::*;
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Ping {
//!     user_id: Id,
//! }
//!
//! fn handle(event: Event) -> Result<Vec<Delivery>, HandlerError> {
//!     let ping: Ping = event.data_as()?;
//!     Ok(vec![deliver_to_users("PONG", [ping.user_id], &serde_json::json!({}))?])
//! }
//!
//! otako_plugin_sdk::export_handler!(handle);
//! # fn main() {}
//! ```
//!
//! Build it with `cargo build --target wasm32-wasip2 --release`; the `.wasm`
//! that cargo writes is already a component the gateway can load.
//!
//! # Layout
//! - [`event`]: the incoming [`Event`], typed `d` access and the [`Id`] type.
//! - [`db`]: [`query`] with bound parameters, [`Rows`]/[`Row`] by column name.
//! - [`delivery`]: [`deliver_to_users`], [`deliver_to_channel`],
//!   [`deliver_to_everyone`].
//! - [`HandlerError`]: constructors and the codes the backend sees; a
//!   [`DbError`] converts into one with `?`.
//! - [`host`]: [`online`], [`config`], [`config_parse`] and the [`log`] module.
//! - `testing` (native builds only): a scripted host to unit-test a handler
//!   with `cargo test`, no gateway needed.

pub mod db;
pub mod delivery;
mod error;
pub mod event;
pub mod host;
mod sys;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

/// The raw generated bindings. Authors don't need them: everything is
/// re-exported or wrapped at the crate root. Public only because
/// [`export_handler!`] expands to code that refers to them from the plugin
/// crate.
#[doc(hidden)]
#[allow(missing_docs, unsafe_code)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "../../wit",
        // The export macro is invoked from each plugin crate, so it must be
        // exported from this one; the odd name keeps it out of authors' way.
        pub_export_macro: true,
        export_macro_name: "__export_plugin_bindings",
        additional_derives: [PartialEq],
    });
}

pub use bindings::otako::gateway::types::{
    Audience, DbError, Delivery, Event, HandlerError, Value,
};
pub use db::{Row, Rows, ToValue, query};
pub use delivery::{deliver_to_channel, deliver_to_everyone, deliver_to_users};
pub use event::Id;
pub use host::{Level, config, config_parse, log, online};

/// Everything a handler usually needs, for `use otako_plugin_sdk::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Audience, Delivery, Event, HandlerError, Id, Row, Rows, config, config_parse,
        deliver_to_channel, deliver_to_everyone, deliver_to_users, log, online, query,
    };
}

/// Exports a handler function as the component's `handle` export.
///
/// The function must have the signature
/// `fn(Event) -> Result<Vec<Delivery>, HandlerError>`. Call the macro once,
/// at the top level of the plugin crate (a `cdylib`):
///
/// ```no_run
/// use otako_plugin_sdk::prelude::*;
///
/// fn handle(_event: Event) -> Result<Vec<Delivery>, HandlerError> {
///     Ok(Vec::new())
/// }
///
/// otako_plugin_sdk::export_handler!(handle);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! export_handler {
    ($handler:path) => {
        const _: () = {
            struct OtakoPluginExport;

            impl $crate::bindings::Guest for OtakoPluginExport {
                fn handle(
                    event: $crate::Event,
                ) -> ::core::result::Result<::std::vec::Vec<$crate::Delivery>, $crate::HandlerError>
                {
                    $handler(event)
                }
            }

            $crate::bindings::__export_plugin_bindings!(
                OtakoPluginExport with_types_in $crate::bindings
            );
        };
    };
}

/// Compiles the README's example as a doctest, so the guide for authors
/// can't drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeExample;
