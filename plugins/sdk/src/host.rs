//! The rest of the host interface: presence, route config and logging.

use std::str::FromStr;

use crate::HandlerError;
use crate::sys as host;

pub use crate::bindings::otako::gateway::types::Level;

/// Which of `user_ids` have at least one open session (on any node), in no
/// particular order.
pub fn online(user_ids: &[String]) -> Vec<String> {
    host::online(user_ids)
}

/// The value of `key` in this plugin's `[routes.config]` table, if set.
///
/// Config values are strings in `gateway.toml`; see [`config_parse`] for
/// numbers and flags. A reload of `gateway.toml` changes what this returns
/// for later events.
pub fn config(key: &str) -> Option<String> {
    host::config(key)
}

/// The value of `key` parsed as `T`, or `None` if unset.
///
/// A value that doesn't parse is the operator's mistake, reported as
/// [`HandlerError::BAD_CONFIG`] naming the key, rather than silently ignored.
pub fn config_parse<T>(key: &str) -> Result<Option<T>, HandlerError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    config(key)
        .map(|raw| {
            raw.parse().map_err(|err| {
                HandlerError::bad_config(format!("config `{key}` = {raw:?} is invalid: {err}"))
            })
        })
        .transpose()
}

/// Logging into the host's tracing, tagged with the plugin's name.
///
/// Plugins have no stdout a person sees: use these instead of `println!`.
pub mod log {
    use super::{Level, host};

    /// Logs `message` at `level`.
    pub fn write(level: Level, message: &str) {
        host::log(level, message);
    }

    /// Logs at trace level.
    pub fn trace(message: &str) {
        write(Level::Trace, message);
    }

    /// Logs at debug level.
    pub fn debug(message: &str) {
        write(Level::Debug, message);
    }

    /// Logs at info level.
    pub fn info(message: &str) {
        write(Level::Info, message);
    }

    /// Logs at warn level.
    pub fn warn(message: &str) {
        write(Level::Warn, message);
    }

    /// Logs at error level.
    pub fn error(message: &str) {
        write(Level::Error, message);
    }
}
