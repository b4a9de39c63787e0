//! Why an event failed: the code the backend sees in a failed
//! `EVENT_ROUNDTRIP`, a message, and the trace details that go to the
//! logging server (never to clients).

use std::fmt;

use serde::Serialize;

/// The `error.code` of a failed ack. Codes are part of the dispatch
/// contract; a plugin's own codes pass through as [`ErrorCode::Handler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorCode {
    /// No route in `gateway.toml` for the event type.
    NoRoute,
    /// The event's `d` is missing, malformed, or names ids that don't parse.
    BadEvent,
    /// The plugin trapped or panicked.
    PluginTrap,
    /// The plugin ran past its route's `timeout_ms`.
    PluginTimeout,
    /// The plugin needed more memory than its route's `memory_mb`.
    PluginMemory,
    /// The plugin could not be called (not loaded, wrong exports).
    PluginError,
    /// The plugin returned something unusable (payload not JSON, bad ids).
    PluginOutput,
    /// A delivery named a user that does not exist.
    UnknownUser,
    /// A database lookup failed.
    DbError,
    /// Cluster mode: the deliveries could not be published to the NATS
    /// JetStream bus (NATS unreachable, or no publish ack in time).
    BusUnavailable,
    /// The gateway itself failed; a bug or an exhausted resource.
    Internal,
    /// A code the plugin returned itself (`NOT_FOUND`, …).
    Handler(String),
}

impl ErrorCode {
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::NoRoute => "NO_ROUTE",
            ErrorCode::BadEvent => "BAD_EVENT",
            ErrorCode::PluginTrap => "PLUGIN_TRAP",
            ErrorCode::PluginTimeout => "PLUGIN_TIMEOUT",
            ErrorCode::PluginMemory => "PLUGIN_MEMORY",
            ErrorCode::PluginError => "PLUGIN_ERROR",
            ErrorCode::PluginOutput => "PLUGIN_OUTPUT",
            ErrorCode::UnknownUser => "UNKNOWN_USER",
            ErrorCode::DbError => "DB_ERROR",
            ErrorCode::BusUnavailable => "BUS_UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::Handler(code) => code,
        }
    }

    /// A plugin's own code, kept only if it looks like one
    /// (`UPPER_SNAKE`, at most 64 bytes); anything else becomes
    /// `PLUGIN_ERROR` so a plugin can't put arbitrary text in acks.
    pub fn from_handler(code: &str) -> ErrorCode {
        let valid = !code.is_empty()
            && code.len() <= 64
            && code
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if valid {
            ErrorCode::Handler(code.to_owned())
        } else {
            ErrorCode::PluginError
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Where a failure happened, for whoever reads the logging server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Trace {
    /// The plugin file's name, when a plugin was involved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    /// The plugin's content hash (hex SHA-256 prefix): which version ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin_hash: Option<String>,
    /// The error chain, outermost first.
    pub chain: Vec<String>,
    /// The wasm backtrace, when the plugin trapped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backtrace: Option<String>,
}

/// A failed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: ErrorCode,
    /// One line for the ack: says what went wrong without internals.
    pub message: String,
    pub trace: Trace,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let message = message.into();
        Failure {
            code,
            trace: Trace {
                chain: vec![message.clone()],
                ..Trace::default()
            },
            message,
        }
    }

    /// Replaces the trace details.
    pub fn with_trace(mut self, trace: Trace) -> Self {
        self.trace = trace;
        self
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Failure {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_codes_are_sanitised() {
        assert_eq!(ErrorCode::from_handler("NOT_FOUND").as_str(), "NOT_FOUND");
        assert_eq!(ErrorCode::from_handler("not found"), ErrorCode::PluginError);
        assert_eq!(ErrorCode::from_handler(""), ErrorCode::PluginError);
        assert_eq!(
            ErrorCode::from_handler(&"A".repeat(65)),
            ErrorCode::PluginError
        );
    }
}
