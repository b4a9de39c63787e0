//! The dispatch side (DESIGN §3): the backend's WebSocket, its frames,
//! the pipelined event path, claims and acks.
//!
//! One event reads top to bottom through:
//! - [`conn`]: frame in (parsed once by [`frame`]), backpressure, the
//!   channel's turn ([`order`]), ack out.
//! - [`pipeline`]: claim → plugin → recipients ([`members`]) → fan-out →
//!   outcome; failures to the error log.
//! - [`claims`]: an event id is claimed durably before any frame leaves,
//!   so it is broadcast at most once.

pub mod claims;
pub mod conn;
pub mod frame;
pub mod members;
pub mod order;
pub mod pipeline;

pub use conn::{Listener, serve};
pub use pipeline::Pipeline;
