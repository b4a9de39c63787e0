//! Plugin lookups that arrive together run together on PostgreSQL.
//!
//! A handler sends the same statement on every event (load the message by
//! id), so under load many copies of one statement wait at once, each
//! paying its own `BEGIN READ ONLY`, execution and `ROLLBACK`, and its own
//! wake-ups on both sides of the socket. Copies from one plugin with the
//! same parameter types that arrive within a couple of scheduler turns run
//! as one statement over `unnest` of their parameters, still bound, never
//! spliced:
//!
//! ```sql
//! SELECT otako_group.i, otako_row.*
//! FROM unnest($1, $2) WITH ORDINALITY AS otako_group(p1, p2, i)
//! CROSS JOIN LATERAL (SELECT * FROM (<the statement, $n as otako_group.pn>
//!     ) AS otako_lookup LIMIT <max_rows + 1>) AS otako_row
//! ```
//!
//! in one read-only transaction; each lookup gets its own rows (in the
//! statement's order: the `LIMIT` keeps the subquery apart, run once per
//! parameter row) and its own row limit. Only one plugin's lookups share
//! a group, so nothing one plugin's statement does in the transaction can
//! touch another's results. A statement that can't be grouped (PostgreSQL
//! refuses the rewritten text, or its group ran out of time) is
//! remembered and runs alone from then on;
//! a group that fails for any other reason runs each lookup alone, so
//! every lookup still gets exactly its own answer or error. A part of the
//! statement that doesn't depend on the parameters (`random()`, `now()`)
//! may run once for the whole group: each lookup still gets an answer it
//! could have had alone.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use tokio::sync::oneshot;
use tokio_postgres::types::{IsNull, ToSql, Type};

use super::bindings::{DbError, Rows, Value};
use super::query::{self, QueryLimits};
use crate::db::PgReader;

/// Most lookups in one group.
const GROUP_MAX: usize = 64;
/// Scheduler turns a group's first lookup waits for others to join.
const LINGER_YIELDS: usize = 2;
/// Statements remembered as ungroupable before the set starts over.
const UNGROUPABLE_MAX: usize = 1024;

/// The groups forming now, shared by every route.
#[derive(Default)]
pub(crate) struct LookupGroups {
    forming: Mutex<HashMap<Key, Vec<Member>>>,
    ungroupable: Mutex<HashSet<Box<str>>>,
}

/// Lookups share a group only with the same plugin (its content hash),
/// statement, parameter types and limits.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    plugin: String,
    sql: Box<str>,
    types: Vec<Type>,
    max_rows: u32,
    timeout_ms: u128,
}

/// What a lookup is to the group forming for its key.
enum Role {
    /// It started the group and runs it after the linger.
    Leader,
    /// It waits for the leader's answer.
    Member(oneshot::Receiver<Result<Rows, DbError>>),
    /// The group is full.
    Alone,
}

struct Member {
    params: Vec<Value>,
    reply: oneshot::Sender<Result<Rows, DbError>>,
}

impl LookupGroups {
    /// Runs one lookup, with the others of its group if any join.
    /// `plugin` names the calling plugin's code (its version hash).
    pub(crate) async fn read(
        &self,
        reader: &PgReader,
        plugin: &str,
        sql: &str,
        params: Vec<Value>,
        limits: QueryLimits,
    ) -> Result<Rows, DbError> {
        if params.is_empty() || self.is_ungroupable(sql) {
            return query::pipelined(reader, sql, &params, limits).await;
        }
        let key = Key {
            plugin: plugin.to_owned(),
            sql: sql.into(),
            types: query::pg_types(&params),
            max_rows: limits.max_rows,
            timeout_ms: limits.timeout.as_millis(),
        };
        let role = {
            let mut forming = self.forming.lock().unwrap_or_else(PoisonError::into_inner);
            match forming.get_mut(&key) {
                Some(members) if members.len() < GROUP_MAX => {
                    let (reply, answer) = oneshot::channel();
                    members.push(Member {
                        params: params.clone(),
                        reply,
                    });
                    Role::Member(answer)
                }
                Some(_) => Role::Alone,
                None => {
                    forming.insert(key.clone(), Vec::new());
                    Role::Leader
                }
            }
        };
        match role {
            Role::Leader => return self.lead(reader, key, params, limits).await,
            // A leader that gave up (its call was cancelled) or a group
            // that failed as a whole drops the reply: run alone.
            Role::Member(answer) => {
                if let Ok(result) = answer.await {
                    return result;
                }
            }
            Role::Alone => {}
        }
        query::pipelined(reader, sql, &params, limits).await
    }

    async fn lead(
        &self,
        reader: &PgReader,
        key: Key,
        params: Vec<Value>,
        limits: QueryLimits,
    ) -> Result<Rows, DbError> {
        let mut leading = Leading {
            groups: self,
            key: Some(key),
        };
        for _ in 0..LINGER_YIELDS {
            tokio::task::yield_now().await;
        }
        let (key, members) = leading.close();
        if members.is_empty() {
            return query::pipelined(reader, &key.sql, &params, limits).await;
        }
        let mut all: Vec<&[Value]> = Vec::with_capacity(members.len() + 1);
        all.push(&params);
        all.extend(members.iter().map(|m| m.params.as_slice()));
        match run_group(reader, &key, &all, limits).await {
            Ok(mut results) => {
                // One result per lookup, the leader's first.
                let own = results.remove(0);
                for (member, result) in members.into_iter().zip(results) {
                    // A member whose call was cancelled no longer listens.
                    let _ = member.reply.send(result);
                }
                own
            }
            Err(failed) => {
                if failed.ungroupable {
                    tracing::debug!(error = %failed.error, "plugin statement can't be grouped; it runs alone");
                    self.remember_ungroupable(&key.sql);
                }
                // Dropping the members' replies sends each to run alone.
                drop(members);
                query::pipelined(reader, &key.sql, &params, limits).await
            }
        }
    }

    fn is_ungroupable(&self, sql: &str) -> bool {
        self.ungroupable
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(sql)
    }

    fn remember_ungroupable(&self, sql: &str) {
        let mut set = self
            .ungroupable
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if set.len() >= UNGROUPABLE_MAX {
            set.clear();
        }
        set.insert(sql.into());
    }
}

/// The leader's claim on a forming group: however the leader's call ends,
/// the group stops forming, and members it never answered run alone.
struct Leading<'a> {
    groups: &'a LookupGroups,
    key: Option<Key>,
}

impl Leading<'_> {
    fn close(&mut self) -> (Key, Vec<Member>) {
        let key = self
            .key
            .take()
            .unwrap_or_else(|| unreachable!("closed once"));
        let members = self.take(&key);
        (key, members)
    }

    fn take(&self, key: &Key) -> Vec<Member> {
        self.groups
            .forming
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key)
            .unwrap_or_default()
    }
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            drop(self.take(&key));
        }
    }
}

/// Why a group didn't answer its lookups.
struct GroupFailed {
    error: String,
    /// PostgreSQL refused the rewritten statement itself.
    ungroupable: bool,
}

/// One statement for the whole group: each lookup's rows, or its own row
/// limit error.
async fn run_group(
    reader: &PgReader,
    key: &Key,
    lookups: &[&[Value]],
    limits: QueryLimits,
) -> Result<Vec<Result<Rows, DbError>>, GroupFailed> {
    let sql =
        grouped_sql(&key.sql, key.types.len(), limits.max_rows).map_err(|error| GroupFailed {
            error,
            ungroupable: true,
        })?;
    let columns: Vec<Column<'_>> = key
        .types
        .iter()
        .enumerate()
        .map(|(k, ty)| Column::gather(ty, lookups.iter().map(|params| &params[k])))
        .collect();
    let types: Vec<Type> = columns.iter().map(Column::array_type).collect();
    let refs: Vec<&(dyn ToSql + Sync)> = columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
    let mut results: Vec<Result<Rows, DbError>> = lookups
        .iter()
        .map(|_| {
            Ok(Rows {
                columns: Vec::new(),
                rows: Vec::new(),
            })
        })
        .collect();
    let mut undecodable = None;
    let read = reader.read(&sql, &types, &refs, limits.timeout, |row| {
        let index = row
            .try_get::<_, i64>(0)
            .ok()
            .and_then(|i| usize::try_from(i).ok()?.checked_sub(1));
        // An index PostgreSQL can't send, or a lookup past its limit.
        let Some(slot) = index.and_then(|i| results.get_mut(i)) else {
            return true;
        };
        if matches!(slot, Ok(rows) if rows.rows.len() >= limits.max_rows as usize) {
            *slot = Err(DbError::TooManyRows(limits.max_rows));
        }
        let Ok(rows) = slot else {
            return true;
        };
        if rows.rows.is_empty() {
            rows.columns = row.columns()[1..]
                .iter()
                .map(|c| c.name().to_owned())
                .collect();
        }
        match (1..row.len())
            .map(|i| query::pg_row_value(&row, i))
            .collect()
        {
            Ok(values) => {
                rows.rows.push(values);
                true
            }
            Err(err) => {
                undecodable = Some(err);
                false
            }
        }
    });
    match read.await {
        Ok(()) => match undecodable {
            // Each lookup alone gives the error only if it has rows.
            Some(err) => Err(GroupFailed {
                error: format!("{err:?}"),
                ungroupable: false,
            }),
            None => Ok(results),
        },
        Err(err) => {
            let ungroupable = err.as_db_error().is_some_and(|db| {
                let code = db.code().code();
                // Syntax or access rule (42xxx), feature not supported
                // (0A); or out of time (57014): a statement slow enough
                // for its group to pass the limit gains nothing grouped,
                // and alone each copy has the whole limit again.
                code.starts_with("42") || code.starts_with("0A") || code == "57014"
            });
            Err(GroupFailed {
                error: err.to_string(),
                ungroupable,
            })
        }
    }
}

/// The group's statement for `sql` with `params` placeholders, or why the
/// text can't be wrapped.
fn grouped_sql(sql: &str, params: usize, max_rows: u32) -> Result<String, String> {
    // The lexer reads `[...]` and backquotes as SQLite's quoted names and
    // `'...'` as standard strings; on PostgreSQL a bracket is a subscript
    // (`ARRAY[$1]`) and with `standard_conforming_strings` off a backslash
    // escapes a quote, so a placeholder there could be left unrewritten or
    // rewritten inside a string. Such text runs alone.
    if let Some(c) = sql.chars().find(|c| matches!(c, '[' | '`' | '\\')) {
        return Err(format!("'{c}' in the statement"));
    }
    let scanned = query::scan(sql)?;
    let mut inner = String::with_capacity(sql.len() + 16 * scanned.placeholders.len());
    let mut at = 0;
    for (range, number) in &scanned.placeholders {
        if *number == 0 || *number > params {
            return Err(format!("${number} with {params} parameters"));
        }
        inner.push_str(&sql[at..range.start]);
        inner.push_str(&format!("otako_group.p{number}"));
        at = range.end;
    }
    inner.push_str(&sql[at..scanned.end]);
    let arrays: Vec<String> = (1..=params).map(|k| format!("${k}")).collect();
    let names: Vec<String> = (1..=params).map(|k| format!("p{k}")).collect();
    // The newline ends a trailing `--` comment before the parenthesis.
    Ok(format!(
        "SELECT otako_group.i, otako_row.* FROM unnest({}) WITH ORDINALITY AS otako_group({}, i) \
         CROSS JOIN LATERAL (SELECT * FROM ({inner}\n) AS otako_lookup LIMIT {}) AS otako_row",
        arrays.join(", "),
        names.join(", "),
        u64::from(max_rows) + 1
    ))
}

/// One parameter position across a group, as the array PostgreSQL
/// unnests. Every lookup in a group has the same types, so the first
/// value of each position decides; `Null` binds as a null element.
enum Column<'a> {
    Integer(Vec<Option<i64>>),
    Real(Vec<Option<f64>>),
    Text(Vec<Option<&'a str>>),
    Blob(Vec<Option<&'a [u8]>>),
}

impl<'a> Column<'a> {
    fn gather(ty: &Type, values: impl Iterator<Item = &'a Value>) -> Column<'a> {
        match *ty {
            Type::FLOAT8 => Column::Real(
                values
                    .map(|v| match v {
                        Value::Real(x) => Some(*x),
                        _ => None,
                    })
                    .collect(),
            ),
            Type::TEXT => Column::Text(
                values
                    .map(|v| match v {
                        Value::Text(x) => Some(x.as_str()),
                        _ => None,
                    })
                    .collect(),
            ),
            Type::BYTEA => Column::Blob(
                values
                    .map(|v| match v {
                        Value::Blob(x) => Some(x.as_slice()),
                        _ => None,
                    })
                    .collect(),
            ),
            _ => Column::Integer(
                values
                    .map(|v| match v {
                        Value::Integer(x) => Some(*x),
                        _ => None,
                    })
                    .collect(),
            ),
        }
    }

    fn array_type(&self) -> Type {
        match self {
            Column::Integer(_) => Type::INT8_ARRAY,
            Column::Real(_) => Type::FLOAT8_ARRAY,
            Column::Text(_) => Type::TEXT_ARRAY,
            Column::Blob(_) => Type::BYTEA_ARRAY,
        }
    }
}

impl std::fmt::Debug for Column<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Column")
    }
}

impl ToSql for Column<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Column::Integer(v) => v.to_sql(ty, out),
            Column::Real(v) => v.to_sql(ty, out),
            Column::Text(v) => v.to_sql(ty, out),
            Column::Blob(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    use futures_util::future::join_all;

    use super::*;
    use crate::config::DatabaseUrl;
    use crate::db::{Access, Db};

    const LIMITS: QueryLimits = QueryLimits {
        timeout: Duration::from_secs(5),
        max_rows: 3,
    };

    async fn database() -> Db {
        let url = DatabaseUrl::Postgres("postgres://postgres@127.0.0.1:5432/test".into());
        Db::open(&url, 2, Access::ReadOnly).await.unwrap()
    }

    /// Runs `lookups` at once, as the same instant's plugin calls would,
    /// grouped for `plugin`, or each alone when `plugin` is `None`.
    async fn at_once(
        db: &Db,
        groups: &LookupGroups,
        plugin: Option<&str>,
        sql: &str,
        lookups: Vec<Vec<Value>>,
    ) -> Vec<Result<Rows, DbError>> {
        join_all(lookups.into_iter().map(|params| {
            let group = plugin.map(|p| (groups, p));
            query::run(db, group, sql.to_owned(), params, LIMITS, Instant::now())
        }))
        .await
    }

    /// The statement's own timestamp, as text: lookups that ran as one
    /// statement share it.
    fn stamps(results: &[Result<Rows, DbError>]) -> HashSet<String> {
        results
            .iter()
            .flat_map(|r| r.as_ref().ok())
            .flat_map(|rows| &rows.rows)
            .map(|row| match row.last() {
                Some(Value::Text(t)) => t.clone(),
                other => panic!("no stamp: {other:?}"),
            })
            .collect()
    }

    /// Lookups arriving together run as one statement, and each gets
    /// its own rows in the statement's order, its own column names and
    /// its own row limit.
    #[tokio::test]
    async fn lookups_arriving_together_share_one_statement_and_keep_their_own_answers() {
        let db = database().await;
        let groups = LookupGroups::default();
        let sql = "SELECT $1::int8 AS id, g AS n, statement_timestamp()::text AS stamp \
                   FROM generate_series(1, $2::int8) g ORDER BY g DESC -- newest first";
        let lookups = (0..12)
            .map(|i| vec![Value::Integer(i), Value::Integer(i % 5)])
            .collect::<Vec<_>>();
        let results = at_once(&db, &groups, Some("p"), sql, lookups.clone()).await;
        for (i, result) in (0..12).zip(&results) {
            let count = i % 5;
            if count > 3 {
                assert!(
                    matches!(result, Err(DbError::TooManyRows(3))),
                    "{i}: {result:?}"
                );
                continue;
            }
            let rows = result.as_ref().unwrap();
            let got: Vec<(Value, Value)> = rows
                .rows
                .iter()
                .map(|r| (r[0].clone(), r[1].clone()))
                .collect();
            let want: Vec<(Value, Value)> = (1..=count)
                .rev()
                .map(|n| (Value::Integer(i), Value::Integer(n)))
                .collect();
            assert_eq!(got, want, "lookup {i}");
            if count > 0 {
                assert_eq!(rows.columns, ["id", "n", "stamp"]);
            }
        }
        assert_eq!(stamps(&results).len(), 1, "one statement for the group");
        // The same lookups alone: one statement each.
        let alone = at_once(&db, &groups, None, sql, lookups).await;
        assert!(stamps(&alone).len() > 1);
        db.close().await;
    }

    /// Two plugins sending the same statement at once never share a
    /// transaction.
    #[tokio::test]
    async fn plugins_never_share_a_group() {
        let db = database().await;
        let groups = LookupGroups::default();
        let sql = "SELECT $1::int8 AS id, statement_timestamp()::text AS stamp";
        let params = |i| vec![vec![Value::Integer(i)]; 4];
        let (a, b) = tokio::join!(
            at_once(&db, &groups, Some("a.wasm"), sql, params(1)),
            at_once(&db, &groups, Some("b.wasm"), sql, params(2)),
        );
        let (a, b) = (stamps(&a), stamps(&b));
        assert_eq!((a.len(), b.len()), (1, 1), "each plugin's lookups grouped");
        assert!(a.is_disjoint(&b), "{a:?} {b:?}");
        db.close().await;
    }

    /// Statements that can't run grouped (PostgreSQL refuses the rewritten
    /// text: here its alias is taken; or the text has a subscript) answer
    /// alone, and are not tried grouped again; a group that fails at run
    /// time (one lookup divides by zero) answers each alone, so only that
    /// lookup sees the error.
    #[tokio::test]
    async fn lookups_that_cannot_run_grouped_run_alone() {
        let db = database().await;
        let groups = LookupGroups::default();
        for sql in [
            "SELECT $1::int8 AS n FROM (SELECT 1) AS otako_group",
            "SELECT (ARRAY[1, 2, 3])[$1::int4]::int8 AS n",
        ] {
            let lookups = (1..=3).map(|i| vec![Value::Integer(i)]).collect();
            let results = at_once(&db, &groups, Some("p"), sql, lookups).await;
            for (i, result) in (1..=3).zip(results) {
                assert_eq!(result.unwrap().rows, [[Value::Integer(i)]], "{sql}");
            }
            assert!(groups.is_ungroupable(sql), "{sql}");
        }

        let sql = "SELECT 12 / $1::int8 AS q";
        let lookups = [4, 0, 3].map(|d| vec![Value::Integer(d)]).to_vec();
        let results = at_once(&db, &groups, Some("p"), sql, lookups).await;
        assert_eq!(results[0].as_ref().unwrap().rows, [[Value::Integer(3)]]);
        assert!(
            matches!(&results[1], Err(DbError::Query(m)) if m.contains("division by zero")),
            "{:?}",
            results[1]
        );
        assert_eq!(results[2].as_ref().unwrap().rows, [[Value::Integer(4)]]);
        assert!(
            !groups.is_ungroupable(sql),
            "a run-time error is the data's"
        );
        db.close().await;
    }

    /// A statement whose group passes the time limit (each copy is fast
    /// enough alone; together they are not) runs alone from then on.
    #[tokio::test]
    async fn a_statement_whose_group_runs_out_of_time_runs_alone() {
        let db = database().await;
        let groups = LookupGroups::default();
        let limits = QueryLimits {
            timeout: Duration::from_millis(400),
            max_rows: 3,
        };
        // The sleep depends on the parameter: each copy sleeps.
        let sql = "SELECT $1::int8 AS n FROM pg_sleep(0.15 + 0 * $1)";
        let lookups = (0..8).map(|i| {
            let params = vec![Value::Integer(i)];
            query::run(
                &db,
                Some((&groups, "p")),
                sql.to_owned(),
                params,
                limits,
                Instant::now(),
            )
        });
        // Some of these may time out alone after the group's 400 ms.
        join_all(lookups).await;
        assert!(groups.is_ungroupable(sql));
        let alone = query::run(
            &db,
            Some((&groups, "p")),
            sql.to_owned(),
            vec![Value::Integer(9)],
            limits,
            Instant::now(),
        )
        .await;
        assert_eq!(alone.unwrap().rows, [[Value::Integer(9)]]);
        db.close().await;
    }

    /// Placeholders inside strings, quoted names and comments stay text;
    /// a trailing comment or `;` can't swallow the wrapper.
    #[test]
    fn only_real_placeholders_are_rewritten() {
        let sql = "SELECT $1 AS \"$1\", '$2' AS s, $2::text -- $1\n /* $2 */ ;";
        let grouped = grouped_sql(sql, 2, 9).unwrap();
        assert!(grouped.contains(
            "(SELECT otako_group.p1 AS \"$1\", '$2' AS s, otako_group.p2::text -- $1\n /* $2 */ \n)"
        ), "{grouped}");
        assert!(grouped.ends_with("LIMIT 10) AS otako_row"), "{grouped}");
        for sql in ["SELECT $3", "SELECT (ARRAY[1, 2])[$1]", "SELECT E'\\'$1'"] {
            assert!(grouped_sql(sql, 2, 9).is_err(), "{sql}");
        }
    }
}
