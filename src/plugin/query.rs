//! The database behind the `query` host import: one read-only statement
//! with bound parameters, a time limit and a row limit, on SQLite or
//! PostgreSQL, with columns mapped to the WIT `value` variant.
//!
//! Read-only is enforced by the database (the plugin pool is opened with
//! [`Access::ReadOnly`](crate::db::Access), and on PostgreSQL every query
//! also runs in a `BEGIN READ ONLY` transaction that is rolled back, so
//! not even `set_config` can leave the connection writable; a group of
//! one plugin's lookups shares one, [`LookupGroups`]). On PostgreSQL the
//! three statements are pipelined ([`PgReader`]). The statement check
//! here is a cheap first line that gives plugin authors a clear message;
//! it is not the security boundary.

use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use sqlx::{AssertSqlSafe, Column, Decode, Row, TypeInfo, ValueRef};

use super::bindings::{DbError, Rows, Value};
use super::groups::LookupGroups;
use crate::db::{Db, PgReader, Pool, ReadError};

/// Longest SQL text a plugin may send: real lookups are a few hundred bytes.
const MAX_SQL_BYTES: usize = 16 * 1024;
/// Most parameters one query may bind.
const MAX_PARAMS: usize = 256;

/// PostgreSQL's `read_only_sql_transaction`.
const PG_READ_ONLY: &str = "25006";
/// PostgreSQL's `query_canceled`: our `statement_timeout` fired.
const PG_CANCELED: &str = "57014";

/// How much longer than `statement_timeout` the host waits on PostgreSQL.
const PG_TIMEOUT_GRACE: Duration = Duration::from_millis(250);

/// The per-call limits from `[plugins]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueryLimits {
    pub timeout: Duration,
    pub max_rows: u32,
}

/// Runs one plugin query whose text already passed [`check_statement`],
/// on the database as of `since` or later.
pub(crate) async fn run(
    db: &Db,
    group: Option<(&LookupGroups, &str)>,
    sql: String,
    params: Vec<Value>,
    limits: QueryLimits,
    since: Instant,
) -> Result<Rows, DbError> {
    if params.len() > MAX_PARAMS {
        return Err(DbError::Query(format!(
            "{} parameters; at most {MAX_PARAMS} may be bound",
            params.len()
        )));
    }
    match db.pool() {
        Pool::Sqlite(_) => sqlite(db, sql, params, limits, since).await,
        // The server's statement_timeout fires first and the transaction
        // ends cleanly; ours is the backstop for a stalled link.
        Pool::Postgres(pool) => {
            let read = async {
                match (db.pg_reader(), group) {
                    (Some(reader), Some((groups, plugin))) => {
                        groups.read(reader, plugin, &sql, params, limits).await
                    }
                    (Some(reader), None) => pipelined(reader, &sql, &params, limits).await,
                    (None, _) => postgres(pool, &sql, params, limits).await,
                }
            };
            tokio::time::timeout(limits.timeout + PG_TIMEOUT_GRACE, read)
                .await
                .unwrap_or(Err(DbError::Timeout))
        }
    }
}

/// SQLite's progress handler stops the statement at the deadline, so no
/// timer is needed here.
async fn sqlite(
    db: &Db,
    sql: String,
    params: Vec<Value>,
    limits: QueryLimits,
    since: Instant,
) -> Result<Rows, DbError> {
    let Some(reader) = db.sqlite_reader() else {
        return Err(DbError::Query(
            "plugin queries need the read-only database handle".to_owned(),
        ));
    };
    let deadline = Instant::now() + limits.timeout;
    let read = reader.read_since(since, deadline, move |conn| {
        sqlite_rows(conn, &sql, &params, limits.max_rows)
    });
    match read.await {
        Ok(rows) => rows,
        Err(ReadError::Sqlite(err)) => Err(sqlite_error(err)),
        Err(err) => Err(DbError::Query(err.to_string())),
    }
}

/// Outer error: the database's (a timeout may be retried off-thread);
/// inner: the plugin's own mistakes, final.
fn sqlite_rows(
    conn: &rusqlite::Connection,
    sql: &str,
    params: &[Value],
    max_rows: u32,
) -> rusqlite::Result<Result<Rows, DbError>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let order = match parameter_order(&stmt, params.len()) {
        Ok(order) => order,
        Err(err) => return Ok(Err(err)),
    };
    for (slot, &index) in order.iter().enumerate() {
        stmt.raw_bind_parameter(slot + 1, SqliteParam(&params[index]))?;
    }
    let columns: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
    let mut rows = stmt.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        if out.len() >= max_rows as usize {
            return Ok(Err(DbError::TooManyRows(max_rows)));
        }
        let mut values = Vec::with_capacity(columns.len());
        for (i, column) in columns.iter().enumerate() {
            match sqlite_value(column, row.get_ref(i)?) {
                Ok(value) => values.push(value),
                Err(err) => return Ok(Err(err)),
            }
        }
        out.push(values);
    }
    Ok(Ok(Rows { columns, rows: out }))
}

/// Which bound value fills each of the statement's parameter slots.
///
/// SQLite treats `$1` as a *name*, so slots are numbered by appearance;
/// the number in the name says which value goes there, as on PostgreSQL.
fn parameter_order(stmt: &rusqlite::Statement<'_>, bound: usize) -> Result<Vec<usize>, DbError> {
    let mut order = Vec::with_capacity(stmt.parameter_count());
    let mut highest = 0;
    for slot in 1..=stmt.parameter_count() {
        let number = match stmt.parameter_name(slot) {
            None => slot,
            Some(name) => name
                .strip_prefix(['$', '?'])
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| {
                    DbError::Query(format!(
                        "parameter {name} is not supported: use $1, $2, ..."
                    ))
                })?,
        };
        if number == 0 || number > bound {
            return Err(DbError::Query(format!(
                "the statement uses ${number} but {bound} parameters were bound"
            )));
        }
        highest = highest.max(number);
        order.push(number - 1);
    }
    if bound > highest {
        return Err(DbError::Query(format!(
            "{bound} parameters were bound but the statement uses {highest}"
        )));
    }
    Ok(order)
}

struct SqliteParam<'a>(&'a Value);

impl rusqlite::ToSql for SqliteParam<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self.0 {
            Value::Null => ValueRef::Null,
            Value::Integer(v) => ValueRef::Integer(*v),
            Value::Real(v) => ValueRef::Real(*v),
            Value::Text(v) => ValueRef::Text(v.as_bytes()),
            Value::Blob(v) => ValueRef::Blob(v),
        }))
    }
}

/// SQLite is dynamically typed: the value's own storage class decides.
fn sqlite_value(column: &str, raw: rusqlite::types::ValueRef<'_>) -> Result<Value, DbError> {
    use rusqlite::types::ValueRef;
    Ok(match raw {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(v) => Value::Integer(v),
        ValueRef::Real(v) => Value::Real(v),
        ValueRef::Text(v) => Value::Text(
            std::str::from_utf8(v)
                .map_err(|e| decode_err(column, e))?
                .to_owned(),
        ),
        ValueRef::Blob(v) => Value::Blob(v.to_vec()),
    })
}

/// Writes refused by `query_only` become `read-only`; the deadline's
/// interrupt becomes `timeout`.
fn sqlite_error(err: rusqlite::Error) -> DbError {
    match err.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ReadOnly) => DbError::ReadOnly(err.to_string()),
        Some(rusqlite::ErrorCode::OperationInterrupted) => DbError::Timeout,
        _ => DbError::Query(err.to_string()),
    }
}

async fn postgres(
    pool: &sqlx::PgPool,
    sql: &str,
    params: Vec<Value>,
    limits: QueryLimits,
) -> Result<Rows, DbError> {
    // The BEGIN is queued and sent with the query (no extra round trip).
    // SET LOCAL statement_timeout stops the query on the server too when
    // our own timeout gives up on it.
    let begin = format!(
        "BEGIN READ ONLY; SET LOCAL statement_timeout = {}",
        limits.timeout.as_millis()
    );
    let mut tx = pool
        .begin_with(AssertSqlSafe(begin))
        .await
        .map_err(db_error)?;
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for param in params {
        query = match param {
            Value::Null => query.bind(None::<i64>),
            Value::Integer(v) => query.bind(v),
            Value::Real(v) => query.bind(v),
            Value::Text(v) => query.bind(v),
            Value::Blob(v) => query.bind(v),
        };
    }
    let rows = pg_rows(query.fetch(&mut *tx), limits.max_rows).await;
    // End the transaction now, whatever happened: left to the drop, its
    // ROLLBACK would wait for the connection's next use, and meanwhile the
    // connection would sit "idle in transaction" holding locks and a
    // snapshot. The rollback also undoes any setting the statement changed.
    let ended = tx.rollback().await;
    let rows = rows?;
    ended.map_err(db_error)?;
    Ok(rows)
}

/// The same lookup as [`postgres`], through the pipelined reader, which
/// binds each value with the type sqlx would give it.
pub(super) async fn pipelined(
    reader: &PgReader,
    sql: &str,
    params: &[Value],
    limits: QueryLimits,
) -> Result<Rows, DbError> {
    let types = pg_types(params);
    let bound: Vec<PgParam<'_>> = params.iter().map(PgParam).collect();
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = bound
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let mut out = Rows {
        columns: Vec::new(),
        rows: Vec::new(),
    };
    let mut failed = None;
    let read = reader.read(sql, &types, &refs, limits.timeout, |row| {
        if out.rows.is_empty() {
            out.columns = row.columns().iter().map(|c| c.name().to_owned()).collect();
        }
        if out.rows.len() >= limits.max_rows as usize {
            failed = Some(DbError::TooManyRows(limits.max_rows));
            return false;
        }
        match (0..row.len()).map(|i| pg_row_value(&row, i)).collect() {
            Ok(values) => out.rows.push(values),
            Err(err) => failed = Some(err),
        }
        failed.is_none()
    });
    let read = read.await;
    if let Some(err) = failed {
        return Err(err);
    }
    read.map_err(pg_error)?;
    Ok(out)
}

/// The type each value binds as: what sqlx would give it.
pub(super) fn pg_types(params: &[Value]) -> Vec<tokio_postgres::types::Type> {
    use tokio_postgres::types::Type;
    params
        .iter()
        .map(|p| match p {
            Value::Null | Value::Integer(_) => Type::INT8,
            Value::Real(_) => Type::FLOAT8,
            Value::Text(_) => Type::TEXT,
            Value::Blob(_) => Type::BYTEA,
        })
        .collect()
}

/// A plugin's value as a tokio-postgres parameter of the declared type.
#[derive(Debug)]
struct PgParam<'a>(&'a Value);

impl tokio_postgres::types::ToSql for PgParam<'_> {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            Value::Null => Ok(tokio_postgres::types::IsNull::Yes),
            Value::Integer(v) => v.to_sql(ty, out),
            Value::Real(v) => v.to_sql(ty, out),
            Value::Text(v) => v.as_str().to_sql(ty, out),
            Value::Blob(v) => v.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

pub(super) fn pg_row_value(row: &tokio_postgres::Row, i: usize) -> Result<Value, DbError> {
    use tokio_postgres::types::Type;
    let column = &row.columns()[i];
    let err = |e| decode_err(column.name(), e);
    let value = match *column.type_() {
        Type::BOOL => row
            .try_get::<_, Option<bool>>(i)
            .map_err(err)?
            .map(|b| Value::Integer(i64::from(b))),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)
            .map_err(err)?
            .map(|v| Value::Integer(i64::from(v))),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)
            .map_err(err)?
            .map(|v| Value::Integer(i64::from(v))),
        Type::INT8 => row
            .try_get::<_, Option<i64>>(i)
            .map_err(err)?
            .map(Value::Integer),
        Type::FLOAT4 => row
            .try_get::<_, Option<f32>>(i)
            .map_err(err)?
            .map(|v| Value::Real(f64::from(v))),
        Type::FLOAT8 => row
            .try_get::<_, Option<f64>>(i)
            .map_err(err)?
            .map(Value::Real),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => row
            .try_get::<_, Option<String>>(i)
            .map_err(err)?
            .map(Value::Text),
        Type::BYTEA => row
            .try_get::<_, Option<Vec<u8>>>(i)
            .map_err(err)?
            .map(Value::Blob),
        ref other => {
            let name = column.name();
            let kind = other.name().to_uppercase();
            return Err(DbError::Query(format!(
                "column '{name}' has type {kind}, which plugins can't read; cast it in SQL (e.g. {name}::text)"
            )));
        }
    };
    Ok(value.unwrap_or(Value::Null))
}

/// [`db_error`] for the pipelined reader.
fn pg_error(err: tokio_postgres::Error) -> DbError {
    use tokio_postgres::error::SqlState;
    match err.as_db_error() {
        Some(db) if *db.code() == SqlState::QUERY_CANCELED => DbError::Timeout,
        Some(db) if *db.code() == SqlState::READ_ONLY_SQL_TRANSACTION => {
            DbError::ReadOnly(db.message().to_owned())
        }
        Some(db) => DbError::Query(db.message().to_owned()),
        None => DbError::Query(err.to_string()),
    }
}

/// Reads rows until the stream ends or the limit is passed, converting as
/// it goes so a too-large result is never held whole.
async fn pg_rows<S>(mut stream: S, max_rows: u32) -> Result<Rows, DbError>
where
    S: futures_util::Stream<Item = Result<sqlx::postgres::PgRow, sqlx::Error>> + Unpin,
{
    let mut out = Rows {
        columns: Vec::new(),
        rows: Vec::new(),
    };
    while let Some(row) = stream.try_next().await.map_err(db_error)? {
        if out.rows.is_empty() {
            out.columns = row.columns().iter().map(|c| c.name().to_owned()).collect();
        }
        if out.rows.len() >= max_rows as usize {
            return Err(DbError::TooManyRows(max_rows));
        }
        let values = (0..row.len())
            .map(|i| pg_value(&row, i))
            .collect::<Result<Vec<_>, _>>()?;
        out.rows.push(values);
    }
    Ok(out)
}

fn decode_err(column: &str, err: impl std::fmt::Display) -> DbError {
    DbError::Query(format!("column '{column}': {err}"))
}

fn pg_value(row: &sqlx::postgres::PgRow, i: usize) -> Result<Value, DbError> {
    use sqlx::Postgres;
    let column = row.columns().get(i).map(|c| c.name()).unwrap_or("?");
    let raw = row.try_get_raw(i).map_err(db_error)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let kind = raw.type_info().name().to_owned();
    let err = |e| decode_err(column, e);
    let value = match kind.as_str() {
        "BOOL" => Value::Integer(i64::from(
            <bool as Decode<Postgres>>::decode(raw).map_err(err)?,
        )),
        "INT2" => Value::Integer(i64::from(
            <i16 as Decode<Postgres>>::decode(raw).map_err(err)?,
        )),
        "INT4" => Value::Integer(i64::from(
            <i32 as Decode<Postgres>>::decode(raw).map_err(err)?,
        )),
        "INT8" => Value::Integer(<i64 as Decode<Postgres>>::decode(raw).map_err(err)?),
        "FLOAT4" => Value::Real(f64::from(
            <f32 as Decode<Postgres>>::decode(raw).map_err(err)?,
        )),
        "FLOAT8" => Value::Real(<f64 as Decode<Postgres>>::decode(raw).map_err(err)?),
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CHAR" => {
            Value::Text(<String as Decode<Postgres>>::decode(raw).map_err(err)?)
        }
        "BYTEA" => Value::Blob(<Vec<u8> as Decode<Postgres>>::decode(raw).map_err(err)?),
        other => {
            return Err(DbError::Query(format!(
                "column '{column}' has type {other}, which plugins can't read; cast it in SQL (e.g. {column}::text)"
            )));
        }
    };
    Ok(value)
}

/// Maps a PostgreSQL error to what the plugin sees; writes refused by the
/// database become `read-only`.
fn db_error(err: sqlx::Error) -> DbError {
    if let sqlx::Error::Database(db) = &err {
        let code = db.code();
        if code.as_deref() == Some(PG_CANCELED) {
            return DbError::Timeout;
        }
        let message = db.message().to_owned();
        return if code.as_deref() == Some(PG_READ_ONLY) {
            DbError::ReadOnly(message)
        } else {
            DbError::Query(message)
        };
    }
    DbError::Query(err.to_string())
}

/// The statements one plugin instance already passed through
/// [`check_statement`]. A handler sends the same few SQL texts on every
/// event: comparing them costs a length check and a `memcmp`, re-scanning
/// one costs ~0.2 µs per query.
#[derive(Default)]
pub(crate) struct CheckedStatements {
    texts: Vec<Box<str>>,
    bytes: usize,
}

impl CheckedStatements {
    /// Bytes of SQL remembered per instance; beyond it statements are
    /// simply checked every time.
    const MAX_BYTES: usize = MAX_SQL_BYTES;

    pub(crate) fn check(&mut self, sql: &str) -> Result<(), String> {
        if self.texts.iter().any(|known| **known == *sql) {
            return Ok(());
        }
        check_statement(sql)?;
        if self.bytes + sql.len() <= Self::MAX_BYTES {
            self.bytes += sql.len();
            self.texts.push(sql.into());
        }
        Ok(())
    }
}

/// Accepts one `SELECT`/`WITH`/`VALUES` statement with `$n` placeholders.
pub(crate) fn check_statement(sql: &str) -> Result<(), String> {
    match scan(sql)?.first_word {
        Some(w)
            if ["select", "with", "values"]
                .iter()
                .any(|k| w.eq_ignore_ascii_case(k)) =>
        {
            Ok(())
        }
        Some(w) => Err(format!(
            "'{w}' statements are not allowed: plugins may only read (SELECT, WITH or VALUES)"
        )),
        None => Err("empty statement".to_owned()),
    }
}

/// What [`scan`] found in one statement.
pub(crate) struct Scanned<'a> {
    first_word: Option<&'a str>,
    /// Each `$n`: its byte range and `n`.
    pub placeholders: Vec<(std::ops::Range<usize>, usize)>,
    /// Where the statement ends: its terminating `;`, or the text's end.
    pub end: usize,
}

/// A small lexer that skips strings, quoted identifiers and comments, so
/// a `;` or `$1` inside them doesn't count. Anything it is unsure of is
/// refused: nested block comments, `$name` parameters and dollar quoting.
pub(crate) fn scan(sql: &str) -> Result<Scanned<'_>, String> {
    if sql.len() > MAX_SQL_BYTES {
        return Err(format!(
            "statement is {} bytes; at most {MAX_SQL_BYTES} are allowed",
            sql.len()
        ));
    }
    let b = sql.as_bytes();
    let mut i = 0;
    let mut out = Scanned {
        first_word: None,
        placeholders: Vec::new(),
        end: b.len(),
    };
    let mut ended = false; // saw the terminating `;`
    while i < b.len() {
        let c = b[i];
        match c {
            _ if c.is_ascii_whitespace() => i += 1,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = sql[i..].find('\n').map_or(b.len(), |n| i + n + 1);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let body = &sql[i + 2..];
                let end = body
                    .find("*/")
                    .ok_or_else(|| "unterminated /* comment".to_owned())?;
                if body[..end].contains("/*") {
                    return Err("nested /* comments are not allowed".to_owned());
                }
                i += 2 + end + 2;
            }
            _ if ended => return Err("only one statement is allowed per query".to_owned()),
            b';' => {
                ended = true;
                out.end = i;
                i += 1;
            }
            b'\'' => {
                // E'...' strings (PostgreSQL) use backslash escapes.
                let escapes =
                    i > 0 && matches!(b[i - 1], b'e' | b'E') && (i < 2 || !is_word(b[i - 2]));
                i = skip_quoted(b, i, b'\'', escapes)?;
            }
            b'"' | b'`' => i = skip_quoted(b, i, c, false)?,
            b'[' => {
                i = sql[i..]
                    .find(']')
                    .map(|n| i + n + 1)
                    .ok_or_else(|| "unterminated [identifier]".to_owned())?;
            }
            b'$' => {
                let digits = b[i + 1..].iter().take_while(|d| d.is_ascii_digit()).count();
                let number = sql[i + 1..i + 1 + digits].parse::<usize>().map_err(|_| {
                    "only $1, $2, ... placeholders are supported (no $name or dollar quoting)"
                        .to_owned()
                })?;
                out.placeholders.push((i..i + 1 + digits, number));
                i += 1 + digits;
            }
            _ if is_word(c) => {
                let len = b[i..].iter().take_while(|&&d| is_word(d)).count();
                if out.first_word.is_none() {
                    out.first_word = Some(&sql[i..i + len]);
                }
                i += len;
            }
            _ => i += 1,
        }
    }
    Ok(out)
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

/// Returns the index after the closing `quote` (a doubled quote is an
/// escaped one).
fn skip_quoted(b: &[u8], start: usize, quote: u8, backslash: bool) -> Result<usize, String> {
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' if backslash => i += 2,
            c if c == quote => {
                if b.get(i + 1) == Some(&quote) {
                    i += 2;
                } else {
                    return Ok(i + 1);
                }
            }
            _ => i += 1,
        }
    }
    Err("unterminated quoted text".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query as a plugin's event would run it, arriving now.
    async fn run(
        db: &Db,
        sql: String,
        params: Vec<Value>,
        limits: QueryLimits,
    ) -> Result<Rows, DbError> {
        super::run(db, None, sql, params, limits, Instant::now()).await
    }
    use crate::config::DatabaseUrl;
    use crate::db::Access;

    const LIMITS: QueryLimits = QueryLimits {
        timeout: Duration::from_secs(5),
        max_rows: 100,
    };

    /// Every supported PostgreSQL type maps to the WIT value the WIT
    /// promises; others are a query error naming the type.
    #[tokio::test]
    async fn postgres_types_map_to_values() {
        let url = DatabaseUrl::Postgres("postgres://postgres@127.0.0.1:5432/test".into());
        let db = Db::open(&url, 1, Access::ReadOnly).await.unwrap();
        let sql = "SELECT true AS b, 2::int2 AS i2, 4::int4 AS i4, $1::int8 AS i8, \
                   1.5::float4 AS f4, $2::float8 AS f8, $3::text AS t, 'v'::varchar AS v, \
                   $4::bytea AS y, NULL::text AS n";
        let params = vec![
            Value::Integer(i64::MAX),
            Value::Real(-0.25),
            Value::Text("✓".into()),
            Value::Blob(vec![0, 255]),
        ];
        let rows = run(&db, sql.to_owned(), params, LIMITS).await.unwrap();
        assert_eq!(
            rows.columns,
            ["b", "i2", "i4", "i8", "f4", "f8", "t", "v", "y", "n"]
        );
        assert_eq!(
            rows.rows,
            vec![vec![
                Value::Integer(1),
                Value::Integer(2),
                Value::Integer(4),
                Value::Integer(i64::MAX),
                Value::Real(1.5),
                Value::Real(-0.25),
                Value::Text("✓".into()),
                Value::Text("v".into()),
                Value::Blob(vec![0, 255]),
                Value::Null,
            ]]
        );
        let err = run(&db, "SELECT 1.5::numeric AS n".into(), vec![], LIMITS)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DbError::Query(m) if m.contains("NUMERIC") && m.contains("'n'")),
            "{err:?}"
        );
        db.close().await;
    }

    /// A read-only handle on the test database with `connections` per
    /// pool, under an `application_name` of its own (so its connections
    /// can be found in `pg_stat_activity`), and an admin pool to look.
    async fn named_postgres_reads(prefix: &str, connections: u32) -> (String, Db, sqlx::PgPool) {
        let app = format!("{prefix}_{}", std::process::id());
        let url = DatabaseUrl::Postgres(format!(
            "postgres://postgres@127.0.0.1:5432/test?application_name={app}"
        ));
        let db = Db::open(&url, connections, Access::ReadOnly).await.unwrap();
        let admin = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test")
            .await
            .unwrap();
        (app, db, admin)
    }

    /// Lookups fill a connection to its depth before the next is opened:
    /// one at a time they all share the first; sixteen at once open a
    /// few, not one each.
    #[tokio::test]
    async fn pipelined_postgres_lookups_fill_a_connection_before_the_next() {
        let (app, db, admin) = named_postgres_reads("filling", 8).await;
        let readers = || async {
            // sqlx's pool shares the name; the reader's last statement is
            // always a lookup's ROLLBACK.
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND query = 'ROLLBACK'",
            )
            .bind(&app)
            .fetch_one(&admin)
            .await
            .unwrap()
        };
        for i in 0..30i64 {
            let rows = run(
                &db,
                "SELECT $1::int8 AS v".into(),
                vec![Value::Integer(i)],
                LIMITS,
            )
            .await
            .unwrap();
            assert_eq!(rows.rows, vec![vec![Value::Integer(i)]]);
        }
        assert_eq!(
            readers().await,
            1,
            "lookups one at a time share one connection"
        );
        let lookups = (0..16i64).map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                let sql = "SELECT $1::int8 AS v FROM pg_sleep(0.2)".to_owned();
                run(&db, sql, vec![Value::Integer(i)], LIMITS).await
            })
        });
        for (i, lookup) in futures_util::future::join_all(lookups)
            .await
            .into_iter()
            .enumerate()
        {
            let rows = lookup.unwrap().unwrap();
            assert_eq!(rows.rows, vec![vec![Value::Integer(i as i64)]]);
        }
        let opened = readers().await;
        assert!(
            (3..=5).contains(&opened),
            "16 lookups at once, 4 to a connection, opened {opened} of 8 connections"
        );
        db.close().await;
        admin.close().await;
    }

    /// Lookups pipelined on one PostgreSQL connection each keep their own
    /// transaction: a neighbour's `set_config` reaches none of them, and
    /// an abandoned lookup (too many rows, its timeout, a killed
    /// connection) leaves the reader serving.
    #[tokio::test]
    async fn pipelined_postgres_lookups_stay_isolated() {
        let (app, db, admin) = named_postgres_reads("pipelined", 1).await;
        assert!(
            db.pg_reader().is_some(),
            "this URL takes the pipelined path"
        );
        let lookups = (0..300i64).map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                let (sql, params) = match i % 3 {
                    0 => ("SELECT $1::int8 * 2 AS v", vec![Value::Integer(i)]),
                    // Would show in every later lookup's `leaked` column,
                    // and hide every table, if it outlived its transaction.
                    // (Not a tiny statement_timeout: that also applies to
                    // the lookup's own ROLLBACK, which a loaded machine
                    // then cancels; see BENCHMARKS.md's limits.)
                    1 => (
                        "SELECT set_config('otako.leaked', 'yes', false), set_config('search_path', 'nowhere', false), $1::int8 * 2 AS v",
                        vec![Value::Integer(i)],
                    ),
                    _ => (
                        "SELECT coalesce(current_setting('otako.leaked', true), '') AS leaked, count(*) AS n, x.v FROM pg_class, (SELECT $1::int8 * 2 AS v, pg_sleep(0.005) AS s) x GROUP BY x.v",
                        vec![Value::Integer(i)],
                    ),
                };
                (i, run(&db, sql.to_owned(), params, LIMITS).await)
            })
        });
        for lookup in futures_util::future::join_all(lookups).await {
            let (i, rows) = lookup.unwrap();
            let rows = rows.unwrap_or_else(|e| panic!("lookup {i}: {e:?}"));
            assert_eq!(rows.rows[0].last(), Some(&Value::Integer(i * 2)), "{i}");
            if i % 3 == 2 {
                assert_eq!(
                    rows.rows[0][0],
                    Value::Text(String::new()),
                    "{i}: a setting leaked"
                );
            }
        }
        let connections: i64 = sqlx::query_scalar(
            // sqlx's pool shares the name; the reader's last statement is
            // always a lookup's ROLLBACK.
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND query = 'ROLLBACK'",
        )
        .bind(&app)
        .fetch_one(&admin)
        .await
        .unwrap();
        assert_eq!(connections, 1, "300 lookups shared one connection");

        let limits = QueryLimits {
            timeout: Duration::from_millis(100),
            max_rows: 5,
        };
        let err = run(&db, "SELECT generate_series(1, 50)".into(), vec![], limits)
            .await
            .unwrap_err();
        assert!(matches!(err, DbError::TooManyRows(5)), "{err:?}");
        let err = run(&db, "SELECT pg_sleep(5)".into(), vec![], limits)
            .await
            .unwrap_err();
        assert!(matches!(err, DbError::Timeout), "{err:?}");
        let sql = "SELECT current_setting('statement_timeout') AS t";
        let rows = run(&db, sql.into(), vec![], LIMITS).await.unwrap();
        assert_eq!(rows.rows, vec![vec![Value::Text("5s".into())]]);

        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(&app)
        .execute(&admin)
        .await
        .unwrap();
        let mut served = None;
        for _ in 0..50 {
            match run(&db, "SELECT 7::int8 AS v".into(), vec![], LIMITS).await {
                Ok(rows) => {
                    served = Some(rows);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        assert_eq!(
            served.map(|r| r.rows),
            Some(vec![vec![Value::Integer(7)]]),
            "a fresh connection replaces the killed one"
        );
        db.close().await;
        admin.close().await;
    }

    /// A table that changes shape under a pipelined connection's prepared
    /// `SELECT *` (a migration) costs that lookup a second prepare, not
    /// an error on every later lookup.
    #[tokio::test]
    async fn a_changed_table_is_prepared_again() {
        let table = format!("plan_changed_{}", std::process::id());
        let admin = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test")
            .await
            .unwrap();
        let exec = |sql: String| {
            let admin = admin.clone();
            async move {
                sqlx::query(AssertSqlSafe(sql))
                    .execute(&admin)
                    .await
                    .unwrap()
            }
        };
        exec(format!("DROP TABLE IF EXISTS {table}")).await;
        exec(format!("CREATE TABLE {table} (id int8)")).await;
        exec(format!("INSERT INTO {table} VALUES (1)")).await;
        let url = DatabaseUrl::Postgres("postgres://postgres@127.0.0.1:5432/test".into());
        let db = Db::open(&url, 1, Access::ReadOnly).await.unwrap();
        let sql = format!("SELECT * FROM {table}");
        let rows = run(&db, sql.clone(), vec![], LIMITS).await.unwrap();
        assert_eq!(rows.columns, ["id"]);
        exec(format!(
            "ALTER TABLE {table} ADD COLUMN name text DEFAULT 'n'"
        ))
        .await;
        let rows = run(&db, sql, vec![], LIMITS).await;
        exec(format!("DROP TABLE {table}")).await;
        let rows = rows.unwrap();
        assert_eq!(rows.columns, ["id", "name"]);
        assert_eq!(
            rows.rows,
            vec![vec![Value::Integer(1), Value::Text("n".into())]]
        );
        db.close().await;
        admin.close().await;
    }

    /// PostgreSQL on the same host over its Unix socket (no TCP loopback,
    /// no TLS): the pipelined connections take the server's "no" to TLS
    /// on a socket as libpq does, and read.
    #[tokio::test]
    async fn postgres_lookups_over_a_unix_socket() {
        let admin = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test")
            .await
            .unwrap();
        let dirs: String = sqlx::query_scalar("SHOW unix_socket_directories")
            .fetch_one(&admin)
            .await
            .unwrap();
        admin.close().await;
        let dir = dirs.split(',').next().unwrap().trim();
        let url = DatabaseUrl::Postgres(format!(
            "postgres://postgres@{}/test",
            dir.replace('/', "%2F")
        ));
        let db = Db::open(&url, 2, Access::ReadOnly).await.unwrap();
        assert!(db.pg_reader().is_some(), "{url:?} is read by sqlx");
        let sql = "SELECT inet_client_addr() IS NULL AS on_socket, $1::int8 AS v";
        let rows = run(&db, sql.into(), vec![Value::Integer(7)], LIMITS)
            .await
            .unwrap();
        assert_eq!(rows.rows, vec![vec![Value::Integer(1), Value::Integer(7)]]);
        db.close().await;
    }

    /// A read-only handle on a fresh SQLite file (kept while the dir lives).
    async fn sqlite_db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let url = DatabaseUrl::Sqlite(dir.path().join("t.db"));
        let db = Db::open(&url, 1, Access::ReadOnly).await.unwrap();
        (dir, db)
    }

    /// The `query` error message for `sql`, which must fail that way.
    async fn query_error(db: &Db, sql: &str, params: Vec<Value>) -> String {
        match run(db, sql.into(), params, LIMITS).await {
            Err(DbError::Query(message)) => message,
            other => panic!("{sql}: expected a query error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn sqlite_values_keep_their_storage_class() {
        let (_dir, db) = sqlite_db().await;
        let rows = run(
            &db,
            "SELECT 1 AS i, 2.5 AS r, 'x' AS t, x'00ff' AS y, NULL AS n, $1 AS p".into(),
            vec![Value::Text("bound".into())],
            LIMITS,
        )
        .await
        .unwrap();
        assert_eq!(
            rows.rows,
            vec![vec![
                Value::Integer(1),
                Value::Real(2.5),
                Value::Text("x".into()),
                Value::Blob(vec![0, 255]),
                Value::Null,
                Value::Text("bound".into()),
            ]]
        );
        let empty = run(&db, "SELECT 1 WHERE 0".into(), vec![], LIMITS)
            .await
            .unwrap();
        assert!(empty.rows.is_empty());
        assert_eq!(empty.columns, ["1"], "columns are named even without rows");
        db.close().await;
    }

    /// `$n` means the n-th bound value wherever it appears, as on
    /// PostgreSQL, though SQLite itself numbers slots by appearance.
    #[tokio::test]
    async fn sqlite_parameters_bind_by_number() {
        let (_dir, db) = sqlite_db().await;
        let two = || vec![Value::Integer(10), Value::Text("b".into())];
        let rows = run(
            &db,
            "SELECT $2 AS a, $1 AS b, $2 || $2 AS c".into(),
            two(),
            LIMITS,
        )
        .await
        .unwrap();
        assert_eq!(
            rows.rows,
            vec![vec![
                Value::Text("b".into()),
                Value::Integer(10),
                Value::Text("bb".into())
            ]]
        );
        let cases = [
            ("SELECT $3", "uses $3 but 2 parameters were bound"),
            (
                "SELECT $1",
                "2 parameters were bound but the statement uses 1",
            ),
            ("SELECT $0, $1, $2", "uses $0"),
            ("SELECT :name, $1, $2", "parameter :name is not supported"),
        ];
        for (sql, want) in cases {
            let message = query_error(&db, sql, two()).await;
            assert!(message.contains(want), "{sql}: {message}");
        }
        for (sql, want) in [
            ("SELECT length(randomblob(100000000))", "too big"),
            ("SELECT x FROM nowhere", "no such table"),
        ] {
            let message = query_error(&db, sql, vec![]).await;
            assert!(message.contains(want), "{sql}: {message}");
        }
        db.close().await;
    }

    /// The deadline stops a runaway statement on SQLite, and the
    /// connection serves the next query.
    #[tokio::test]
    async fn sqlite_queries_stop_at_their_timeout() {
        let (_dir, db) = sqlite_db().await;
        let limits = QueryLimits {
            timeout: Duration::from_millis(200),
            max_rows: 10,
        };
        let endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) \
                       SELECT COUNT(*) FROM n";
        let started = std::time::Instant::now();
        let err = run(&db, endless.into(), vec![], limits).await.unwrap_err();
        assert!(matches!(err, DbError::Timeout), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
        let err = run(
            &db,
            "SELECT * FROM (VALUES (1),(2),(3)) LIMIT $1".into(),
            vec![Value::Integer(20)],
            LIMITS,
        )
        .await;
        assert_eq!(err.unwrap().rows.len(), 3);
        let err = run(&db, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 11) SELECT i FROM n".into(), vec![], limits)
            .await
            .unwrap_err();
        assert!(matches!(err, DbError::TooManyRows(10)), "{err:?}");
        db.close().await;
    }

    #[test]
    fn accepts_single_reads() {
        for sql in [
            "SELECT 1",
            "  select id FROM users WHERE id = $1;  ",
            "-- lookup\nWITH x AS (SELECT 1) SELECT * FROM x; -- done",
            "/* c */ VALUES (1)",
            "SELECT ';' AS semi, \"a;b\" FROM t WHERE n = 'it''s;'",
            "SELECT E'\\';' FROM t",
            "(SELECT 1)",
        ] {
            assert_eq!(check_statement(sql), Ok(()), "{sql}");
        }
    }

    #[test]
    fn refuses_writes_and_stacked_statements() {
        for sql in [
            "INSERT INTO users VALUES (1)",
            "PRAGMA query_only = OFF",
            "SELECT 1; DELETE FROM users",
            "SELECT 1;;",
            "SELECT 'a'; SET default_transaction_read_only = off",
            "SELECT $$a$$",
            "SELECT $name",
            "/* /* */ ; DELETE FROM users */ SELECT 1",
            "SELECT 'unterminated",
            "",
            "  -- nothing",
        ] {
            assert!(check_statement(sql).is_err(), "{sql}");
        }
        assert!(check_statement(&format!("SELECT '{}'", "x".repeat(20_000))).is_err());
    }

    #[test]
    fn remembered_statements_stay_checked() {
        let mut checked = CheckedStatements::default();
        for _ in 0..2 {
            assert_eq!(checked.check("SELECT 1"), Ok(()));
            assert!(checked.check("DELETE FROM users").is_err());
        }
        assert_eq!(checked.texts.len(), 1, "only accepted statements are kept");
        // Past the byte budget statements are still checked, not kept.
        let long = format!("SELECT '{}'", "x".repeat(MAX_SQL_BYTES - 20));
        assert_eq!(checked.check(&long), Ok(()));
        assert_eq!(checked.check(&format!("{long} ")), Ok(()));
        assert_eq!(checked.texts.len(), 2);
        assert!(checked.bytes <= MAX_SQL_BYTES);
    }
}
