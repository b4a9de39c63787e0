//! Test hooks for crash tests: with `OTAKO_FAILPOINT=<name>` in its
//! environment, the process aborts (as a kill -9 would end it) the first
//! time it reaches the point of that name, so a test can crash it exactly
//! where a crash would do the most harm and check that nothing is lost or
//! repeated. Unset, a point costs one load of a cached value.
//!
//! Points: `dispatch-after-fanout` (an event's frames are with the
//! sessions, its outcome not yet acked).

use std::sync::OnceLock;

/// Aborts the process if `OTAKO_FAILPOINT` names `point`.
pub fn hit(point: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("OTAKO_FAILPOINT").ok());
    if armed.as_deref() == Some(point) {
        eprintln!("otako-gateway: failpoint {point} reached; aborting");
        std::process::abort();
    }
}
