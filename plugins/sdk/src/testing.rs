//! Unit-testing a handler natively, without a gateway.
//!
//! Compiled for anything but wasm32 (so `cargo test` on the plugins
//! workspace), the SDK's host calls — [`query`](crate::query),
//! [`online`](crate::online), [`config`](crate::config) and [`log`](crate::log)
//! — go to the [`TestHost`] installed on the current thread instead of the
//! component's imports. The test scripts what `query` answers, sets the
//! route's config and who is online, calls the handler function directly,
//! and then checks the deliveries or the error, and what the handler asked
//! the host ([`InstalledHost::queries`], [`InstalledHost::logs`]).
//!
//! ```
//! use otako_plugin_sdk::prelude::*;
//! use otako_plugin_sdk::testing::TestHost;
//! use otako_plugin_sdk::{Level, Value};
//!
//! fn handle(event: Event) -> Result<Vec<Delivery>, HandlerError> {
//!     let rows = query("SELECT name FROM users WHERE id = $1", &[&7_i64])?;
//!     let name = rows.first().map(|row| row.get_str("name")).transpose()?;
//!     log::info(&format!("{} for {name:?}", event.name));
//!     Ok(vec![deliver_to_everyone("HI", &name)?])
//! }
//!
//! let host = TestHost::new()
//!     .on_query(|_sql, _params| Ok(Rows::with_columns(["name"]).row(&[&"alice"])))
//!     .install();
//! let deliveries = handle(Event::new("EVENT_HI", "1", "{}")).expect("delivered");
//! assert_eq!(deliveries[0].payload, r#""alice""#);
//! assert_eq!(host.queries()[0].params, [Value::Integer(7)]);
//! assert_eq!(host.logs(), [(Level::Info, r#"EVENT_HI for Some("alice")"#.to_owned())]);
//! ```
//!
//! The host is per thread, so tests running in parallel don't see each
//! other's. A host call with no host installed panics, naming what to do.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::rc::Rc;

use crate::{DbError, Level, Rows, Value};

/// What [`TestHost::on_query`] scripts: the SQL and bound parameters in,
/// the rows or the database error out.
type QueryFn = Box<dyn FnMut(&str, &[Value]) -> Result<Rows, DbError>>;

/// One `query` the handler ran, as the host received it.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// The statement.
    pub sql: String,
    /// The bound parameters, in order.
    pub params: Vec<Value>,
}

/// The scripted host's state, shared by the installed guard and the
/// thread-local the SDK's host calls read.
#[derive(Default)]
struct State {
    on_query: Option<QueryFn>,
    config: HashMap<String, String>,
    online: BTreeSet<String>,
    queries: Vec<Query>,
    logs: Vec<(Level, String)>,
}

/// A scripted host for one test: build it, then [`install`](Self::install)
/// it on the test's thread.
#[derive(Default)]
#[must_use = "a TestHost does nothing until it is installed"]
pub struct TestHost {
    state: State,
}

impl fmt::Debug for TestHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestHost")
            .field("on_query", &self.state.on_query.is_some())
            .field("config", &self.state.config)
            .field("online", &self.state.online)
            .finish()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<RefCell<State>>>> = const { RefCell::new(None) };
}

impl TestHost {
    /// A host with no query script, no config and nobody online.
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers every `query` with `answer(sql, params)`. Without it, a query
    /// panics: a handler that queries unexpectedly fails its test.
    pub fn on_query<F>(mut self, answer: F) -> Self
    where
        F: FnMut(&str, &[Value]) -> Result<Rows, DbError> + 'static,
    {
        self.state.on_query = Some(Box::new(answer));
        self
    }

    /// Sets `key` in the route's `[routes.config]` table; unset keys read as
    /// `None`, as in the gateway.
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.state.config.insert(key.into(), value.into());
        self
    }

    /// Marks these users as online (ids as anything that prints as one:
    /// [`crate::Id`], `i64`, `&str`).
    pub fn online<I>(mut self, user_ids: I) -> Self
    where
        I: IntoIterator,
        I::Item: ToString,
    {
        self.state
            .online
            .extend(user_ids.into_iter().map(|id| id.to_string()));
        self
    }

    /// Makes this the host of the current thread until the returned guard
    /// drops.
    ///
    /// # Panics
    /// If another host is installed on this thread: two at once would make
    /// it unclear which one a test's assertions are about.
    pub fn install(self) -> InstalledHost {
        let state = Rc::new(RefCell::new(self.state));
        CURRENT.with_borrow_mut(|current| {
            assert!(
                current.is_none(),
                "a TestHost is already installed on this thread; drop its guard first"
            );
            *current = Some(Rc::clone(&state));
        });
        InstalledHost { state }
    }
}

/// The installed [`TestHost`]: what the handler asked of it so far. Dropping
/// it uninstalls the host.
#[must_use = "dropping the guard uninstalls the host at once"]
pub struct InstalledHost {
    state: Rc<RefCell<State>>,
}

impl InstalledHost {
    /// Every query run so far, in order.
    pub fn queries(&self) -> Vec<Query> {
        self.state.borrow().queries.clone()
    }

    /// Every line logged so far, in order.
    pub fn logs(&self) -> Vec<(Level, String)> {
        self.state.borrow().logs.clone()
    }
}

impl fmt::Debug for InstalledHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.borrow();
        f.debug_struct("InstalledHost")
            .field("queries", &state.queries)
            .field("logs", &state.logs)
            .finish()
    }
}

impl Drop for InstalledHost {
    fn drop(&mut self) {
        CURRENT.with_borrow_mut(|current| *current = None);
    }
}

/// The current thread's host state.
fn current(call: &str) -> Rc<RefCell<State>> {
    CURRENT.with_borrow(Clone::clone).unwrap_or_else(|| {
        panic!(
            "`{call}` called outside a plugin with no TestHost installed: \
             start the test with `let host = otako_plugin_sdk::testing::TestHost::new()…install();`"
        )
    })
}

/// The SDK's host calls when not compiled for wasm32 (see `crate::sys`).
pub(crate) mod host {
    use super::{Query, current};
    use crate::{DbError, Level, Rows, Value};

    pub(crate) fn query(sql: &str, params: &[Value]) -> Result<Rows, DbError> {
        let state = current("query");
        let script = {
            let mut state = state.borrow_mut();
            state.queries.push(Query {
                sql: sql.to_owned(),
                params: params.to_vec(),
            });
            state.on_query.take()
        };
        let Some(mut answer) = script else {
            panic!("the handler ran a query but the TestHost has no `on_query`: {sql}");
        };
        // Called with the state unborrowed, so the script may use the host too.
        let result = answer(sql, params);
        state.borrow_mut().on_query = Some(answer);
        result
    }

    pub(crate) fn online(user_ids: &[String]) -> Vec<String> {
        let state = current("online");
        let state = state.borrow();
        user_ids
            .iter()
            .filter(|id| state.online.contains(*id))
            .cloned()
            .collect()
    }

    pub(crate) fn config(key: &str) -> Option<String> {
        current("config").borrow().config.get(key).cloned()
    }

    pub(crate) fn log(level: Level, message: &str) {
        current("log")
            .borrow_mut()
            .logs
            .push((level, message.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HandlerError, Id, config, config_parse, log, online, query};

    #[test]
    fn host_calls_reach_the_installed_host() {
        let host = TestHost::new()
            .on_query(|sql, _params| Ok(Rows::with_columns(["sql"]).row(&[&sql])))
            .config("greeting", "hi")
            .config("limit", "5")
            .online([Id(1), Id(3)])
            .install();
        let rows = query("SELECT $1", &[&Id(9)]).expect("scripted rows");
        let row = rows.first().expect("one row");
        assert_eq!(row.get_str("sql").expect("sql"), "SELECT $1");
        assert_eq!(config("greeting").as_deref(), Some("hi"));
        assert_eq!(config("missing"), None);
        assert_eq!(config_parse::<u32>("limit").expect("a number"), Some(5));
        let ids = ["1", "2", "3"].map(String::from);
        assert_eq!(online(&ids), ["1", "3"]);
        log::warn("careful");
        assert_eq!(
            host.queries(),
            [Query {
                sql: "SELECT $1".into(),
                params: vec![Value::Integer(9)]
            }]
        );
        assert_eq!(host.logs(), [(Level::Warn, "careful".to_owned())]);
    }

    #[test]
    fn scripted_db_errors_become_db_error() {
        let _host = TestHost::new()
            .on_query(|_, _| Err(DbError::Timeout))
            .install();
        let err = HandlerError::from(query("SELECT 1", &[]).expect_err("scripted error"));
        assert_eq!(
            (err.code.as_str(), err.message.as_str()),
            ("DB_ERROR", "query timed out")
        );
    }

    #[test]
    fn dropping_the_guard_uninstalls() {
        drop(TestHost::new().config("k", "1").install());
        let _host = TestHost::new().install();
        assert_eq!(config("k"), None);
    }

    #[test]
    #[should_panic(expected = "no TestHost installed")]
    fn host_calls_without_a_host_panic() {
        config("k");
    }

    #[test]
    #[should_panic(expected = "has no `on_query`")]
    fn unscripted_queries_panic() {
        let _host = TestHost::new().install();
        let _ = query("SELECT 1", &[]);
    }

    #[test]
    #[should_panic(expected = "already installed")]
    fn one_host_per_thread() {
        let _first = TestHost::new().install();
        let _second = TestHost::new().install();
    }
}
