//! The handler's own failures, as the backend sees them in the failed ack.

use crate::{DbError, HandlerError};

impl HandlerError {
    /// The event's `d` is not JSON or lacks what the handler needs.
    pub const BAD_EVENT: &'static str = "BAD_EVENT";
    /// What the event refers to is not in the database.
    pub const NOT_FOUND: &'static str = "NOT_FOUND";
    /// A database lookup failed, or returned something the handler can't read.
    pub const DB_ERROR: &'static str = "DB_ERROR";
    /// A value in the route's `[routes.config]` table is malformed.
    pub const BAD_CONFIG: &'static str = "BAD_CONFIG";
    /// A payload could not be serialized to JSON.
    pub const BAD_PAYLOAD: &'static str = "BAD_PAYLOAD";

    /// An error with any upper-case `code`; prefer the named constructors for
    /// the common cases so backends see consistent codes.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }

    /// [`Self::BAD_EVENT`]: the event itself is wrong; retrying won't help.
    pub fn bad_event(message: impl Into<String>) -> Self {
        Self::new(Self::BAD_EVENT, message)
    }

    /// [`Self::NOT_FOUND`]: the event names a row that doesn't exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Self::NOT_FOUND, message)
    }

    /// [`Self::DB_ERROR`]: a lookup failed or its result was unreadable.
    pub fn db(message: impl Into<String>) -> Self {
        Self::new(Self::DB_ERROR, message)
    }

    /// [`Self::BAD_CONFIG`]: the route's config is wrong; the operator must fix it.
    pub fn bad_config(message: impl Into<String>) -> Self {
        Self::new(Self::BAD_CONFIG, message)
    }

    /// [`Self::BAD_PAYLOAD`]: a delivery's payload could not become JSON.
    pub fn bad_payload(message: impl Into<String>) -> Self {
        Self::new(Self::BAD_PAYLOAD, message)
    }
}

impl DbError {
    /// A one-line description of what the database (or the host's guard in
    /// front of it) said. The generated `Display` is just `Debug`, which is
    /// not what an operator wants to read in an ack.
    pub fn describe(&self) -> String {
        match self {
            DbError::ReadOnly(msg) => format!("rejected as not read-only: {msg}"),
            DbError::Timeout => "query timed out".to_owned(),
            DbError::TooManyRows(limit) => format!("query returned more than {limit} rows"),
            DbError::Query(msg) => format!("query failed: {msg}"),
        }
    }
}

/// Lets a handler use `?` on [`crate::query`]: any database failure becomes a
/// [`HandlerError::DB_ERROR`] carrying [`DbError::describe`].
impl From<DbError> for HandlerError {
    fn from(err: DbError) -> Self {
        Self::db(err.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_errors_become_db_error_code() {
        let err = HandlerError::from(DbError::TooManyRows(100));
        assert_eq!(err.code, "DB_ERROR");
        assert_eq!(err.message, "query returned more than 100 rows");
        let err = HandlerError::from(DbError::ReadOnly("INSERT".into()));
        assert_eq!(err.message, "rejected as not read-only: INSERT");
    }

    #[test]
    fn constructors_set_codes() {
        assert_eq!(HandlerError::bad_event("x").code, "BAD_EVENT");
        assert_eq!(HandlerError::not_found("x").code, "NOT_FOUND");
        assert_eq!(HandlerError::db("x").code, "DB_ERROR");
        assert_eq!(HandlerError::bad_config("x").code, "BAD_CONFIG");
        assert_eq!(HandlerError::new("TEAPOT", "I refuse").message, "I refuse");
    }
}
