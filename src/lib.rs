//! # Otako Gateway
//!
//! A realtime event gateway: clients hold receive-only WebSockets, an HTTP
//! backend sends events over a dedicated dispatch WebSocket, and a
//! WebAssembly plugin per event type decides what each event becomes and
//! who receives it. DESIGN.md is the contract; this crate is its host.
//!
//! # Layout
//!
//! One event's path reads top to bottom through these modules:
//!
//! - [`dispatch`]: the dispatch socket: frames in (parsed once), pipelined
//!   events, each run by one pipeline to one outcome (claim → plugin →
//!   fan-out), acks out.
//! - [`plugin`]: routes, the wasmtime host, the WIT host interface. Event
//!   in, deliveries out; never sees a socket. [`reload`] watches
//!   `gateway.toml` and the plugin files and swaps new versions in.
//! - [`session`]: client sockets, the per-user registry, fan-out with
//!   bounded queues. Never sees wasmtime.
//! - [`errlog`]: failed events, recorded once per event id in a durable
//!   outbox and delivered to the logging sink.
//!
//! Around them: [`config`] (`gateway.toml`), [`db`] (SQLite/PostgreSQL pools
//! and migrations), [`token`] and [`ids`] (client tokens, snowflakes),
//! [`admin`] (health and metrics), [`telemetry`] (tracing and metrics),
//! [`gateway`] (wires the listeners together and drains on shutdown),
//! [`api`] and [`dispatch_client`] (the reference HTTP backend and the
//! Rust client for the dispatch protocol), [`logsink`] (the reference
//! logging server), [`http`] (the small hyper server loop the HTTP
//! listeners share), [`listen`] (what every listener does before its
//! protocol: TLS, the request head under the handshake timeout and caps),
//! [`tls`] (rustls identities and trust roots), [`sys`] (OS limits), [`failpoint`] (crash points for
//! tests), [`fuzz`] (the fuzz targets' bodies).

pub(crate) mod admin;
pub(crate) mod affinity;
pub mod api;
pub mod cluster;
pub mod config;
pub mod db;
pub mod dev;
pub(crate) mod dispatch;
pub mod dispatch_client;
pub(crate) mod errlog;
pub(crate) mod failpoint;
pub mod failure;
pub mod fuzz;
pub mod gateway;
pub mod http;
pub mod ids;
pub mod listen;
pub mod logsink;
pub mod plugin;
pub(crate) mod reload;
pub mod revoke;
pub mod session;
pub mod shutdown;
pub mod sys;
pub mod telemetry;
pub mod tls;
pub mod token;
