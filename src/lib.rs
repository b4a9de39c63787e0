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
//! - [`dispatch`]: the dispatch socket: frames in, pipelined events,
//!   idempotency, acks out.
//! - [`plugin`]: routes, the wasmtime host, the WIT host interface, hot
//!   reload. Event in, deliveries out; never sees a socket.
//! - [`session`]: client sockets, the per-user registry, fan-out with
//!   bounded queues. Never sees wasmtime.
//! - [`errlog`]: failed events, recorded once per event id in a durable
//!   outbox and delivered to the logging sink.
//!
//! Around them: [`config`] (`gateway.toml`), [`db`] (SQLite/PostgreSQL pools
//! and migrations), [`token`] and [`ids`] (client tokens, snowflakes),
//! [`admin`] (health and metrics), [`telemetry`] (tracing and metrics),
//! [`gateway`] (wires the listeners together and drains on shutdown),
//! [`logsink`] (the reference logging server), [`http`] (the small hyper
//! server loop the HTTP listeners share).

pub mod admin;
pub mod config;
pub mod db;
pub mod errlog;
pub mod failure;
pub mod gateway;
pub mod http;
pub mod ids;
pub mod logsink;
pub mod plugin;
pub mod shutdown;
pub mod telemetry;
pub mod token;
