//! The dispatch side (DESIGN §3): the backend's WebSocket, its frames,
//! the pipelined event path, idempotency and acks.
//!
//! - [`frame`]: typed inbound frames and the ack/PONG/INVALID_FRAME texts.
//! - [`conn`]: one dispatch connection: auth, PING deadline, backpressure.
//! - [`pipeline`]: one event from idempotency check to outcome.
//! - [`order`]: same-channel events fan out in dispatch order.
//! - [`idempotency`]: event outcomes, grouped writes, in-flight sharing.
//! - [`members`]: channel member lists, cached until their version changes.

pub mod conn;
pub mod frame;
pub mod idempotency;
pub mod members;
pub mod order;
pub mod pipeline;

pub use conn::{Dispatch, serve};
pub use pipeline::Pipeline;
