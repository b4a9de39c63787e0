//! Where the SDK's host calls go: the component's imports in a plugin, the
//! current thread's [`crate::testing::TestHost`] in a native unit test (the
//! generated bindings only trap there).

#[cfg(target_arch = "wasm32")]
pub(crate) use crate::bindings::otako::gateway::host::{config, log, online};
#[cfg(not(target_arch = "wasm32"))]
pub(crate) use crate::testing::host::{config, log, online, query};

/// The host's `query`, its rows wrapped for reading by column name.
#[cfg(target_arch = "wasm32")]
pub(crate) fn query(sql: &str, params: &[crate::Value]) -> Result<crate::Rows, crate::DbError> {
    crate::bindings::otako::gateway::host::query(sql, params).map(crate::Rows::from)
}
