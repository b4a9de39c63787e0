//! Read-only database lookups through the host.
//!
//! The host binds every parameter (SQL is never spliced), rejects anything
//! but a single `SELECT`/`WITH`, and enforces a time and a row limit. Write
//! placeholders as `$1`, `$2`, …: the same SQL then runs on SQLite and
//! PostgreSQL.

use crate::{DbError, HandlerError, Value};

/// Converts a Rust value into a bound query parameter.
///
/// Implemented for the integer types that fit an `i64`, `f64`, strings,
/// byte slices, [`crate::Id`], [`Value`] itself, and `Option<T>` (where
/// `None` binds `NULL`).
pub trait ToValue {
    /// The parameter this value binds as.
    fn to_value(&self) -> Value;
}

impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}

impl ToValue for i64 {
    fn to_value(&self) -> Value {
        Value::Integer(*self)
    }
}

impl ToValue for i32 {
    fn to_value(&self) -> Value {
        Value::Integer(i64::from(*self))
    }
}

impl ToValue for u32 {
    fn to_value(&self) -> Value {
        Value::Integer(i64::from(*self))
    }
}

impl ToValue for f64 {
    fn to_value(&self) -> Value {
        Value::Real(*self)
    }
}

impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}

impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}

impl ToValue for [u8] {
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}

impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}

impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToValue::to_value)
    }
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}

/// Runs one read-only query with bound parameters.
///
/// ```no_run
/// # use otako_plugin_sdk::{query, HandlerError, Id};
/// # fn f(id: Id) -> Result<(), HandlerError> {
/// let rows = query("SELECT name FROM users WHERE id = $1", &[&id])?;
/// let name = match rows.first() {
///     Some(row) => row.get_str("name")?,
///     None => return Err(HandlerError::not_found(format!("no user {id}"))),
/// };
/// # let _ = name; Ok(()) }
/// ```
///
/// The error is the host's [`DbError`] so a handler can tell a timeout from
/// a rejected statement; `?` turns it into a [`HandlerError::DB_ERROR`].
pub fn query(sql: &str, params: &[&dyn ToValue]) -> Result<Rows, DbError> {
    let params: Vec<Value> = params.iter().map(|p| p.to_value()).collect();
    crate::sys::query(sql, &params)
}

/// A query's result: column names and rows, read by column name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rows {
    columns: Vec<String>,
    rows: Vec<Vec<Value>>,
}

impl From<crate::bindings::otako::gateway::types::Rows> for Rows {
    fn from(raw: crate::bindings::otako::gateway::types::Rows) -> Self {
        Self::new(raw.columns, raw.rows)
    }
}

impl Rows {
    /// Builds a result by hand, e.g. to unit-test a handler's row mapping
    /// without a host.
    pub fn new(columns: Vec<String>, rows: Vec<Vec<Value>>) -> Self {
        Self { columns, rows }
    }

    /// An empty result with these columns, to add rows to with
    /// [`Rows::row`]: what a [`crate::testing::TestHost`]'s query script
    /// answers.
    ///
    /// ```
    /// # use otako_plugin_sdk::Rows;
    /// let rows = Rows::with_columns(["id", "name", "nonce"])
    ///     .row(&[&7_i64, &"alice", &None::<&str>]);
    /// assert_eq!(rows.first().map(|r| r.get_str("name").ok()), Some(Some("alice")));
    /// ```
    pub fn with_columns<I>(columns: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        Self::new(columns.into_iter().map(Into::into).collect(), Vec::new())
    }

    /// This result with one more row, its values in column order, converted
    /// like query parameters.
    pub fn row(mut self, values: &[&dyn ToValue]) -> Self {
        self.rows
            .push(values.iter().map(|v| v.to_value()).collect());
        self
    }

    /// The column names, in order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// How many rows there are.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the query matched nothing.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The row at `index`, if there is one.
    pub fn get(&self, index: usize) -> Option<Row<'_>> {
        self.rows.get(index).map(|values| Row {
            columns: &self.columns,
            values,
        })
    }

    /// The first row: the usual way to read a lookup by primary key.
    pub fn first(&self) -> Option<Row<'_>> {
        self.get(0)
    }

    /// Every row, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Row<'_>> {
        self.rows.iter().map(|values| Row {
            columns: &self.columns,
            values,
        })
    }
}

/// One row, borrowed from its [`Rows`].
///
/// Each typed getter looks the column up by name and fails with
/// [`HandlerError::DB_ERROR`] if the column is missing or holds another
/// type: that is a mismatch between the handler's SQL and the schema, not
/// something to paper over. The `get_opt_*` forms read `NULL` as `None`;
/// the plain forms treat `NULL` as an error.
#[derive(Clone, Copy, Debug)]
pub struct Row<'a> {
    columns: &'a [String],
    values: &'a [Value],
}

impl<'a> Row<'a> {
    /// The raw value of `column`.
    pub fn value(&self, column: &str) -> Result<&'a Value, HandlerError> {
        let index = self
            .columns
            .iter()
            .position(|c| c == column)
            .ok_or_else(|| HandlerError::db(format!("no column `{column}` in the result")))?;
        self.values
            .get(index)
            .ok_or_else(|| HandlerError::db(format!("the row has no value for column `{column}`")))
    }

    /// An integer column (ids, counts).
    pub fn get_i64(&self, column: &str) -> Result<i64, HandlerError> {
        required(column, self.get_opt_i64(column)?)
    }

    /// A nullable integer column.
    pub fn get_opt_i64(&self, column: &str) -> Result<Option<i64>, HandlerError> {
        self.typed(column, "an integer", |v| match v {
            Value::Integer(i) => Some(*i),
            _ => None,
        })
    }

    /// An id column, ready to serialize as a decimal string.
    pub fn get_id(&self, column: &str) -> Result<crate::Id, HandlerError> {
        self.get_i64(column).map(crate::Id)
    }

    /// A real column. Integers are accepted too, because SQLite hands back
    /// whole-number results of real expressions as integers.
    pub fn get_f64(&self, column: &str) -> Result<f64, HandlerError> {
        required(column, self.get_opt_f64(column)?)
    }

    /// A nullable real column.
    pub fn get_opt_f64(&self, column: &str) -> Result<Option<f64>, HandlerError> {
        self.typed(column, "a number", |v| match v {
            Value::Real(f) => Some(*f),
            // Lossy above 2^53, which is the nature of asking for an f64.
            Value::Integer(i) => Some(*i as f64),
            _ => None,
        })
    }

    /// A text column.
    pub fn get_str(&self, column: &str) -> Result<&'a str, HandlerError> {
        required(column, self.get_opt_str(column)?)
    }

    /// A nullable text column.
    pub fn get_opt_str(&self, column: &str) -> Result<Option<&'a str>, HandlerError> {
        self.typed(column, "text", |v| match v {
            Value::Text(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// A blob column.
    pub fn get_blob(&self, column: &str) -> Result<&'a [u8], HandlerError> {
        required(column, self.get_opt_blob(column)?)
    }

    /// A nullable blob column.
    pub fn get_opt_blob(&self, column: &str) -> Result<Option<&'a [u8]>, HandlerError> {
        self.typed(column, "a blob", |v| match v {
            Value::Blob(b) => Some(b.as_slice()),
            _ => None,
        })
    }

    /// Reads `column` with `extract`, mapping `NULL` to `None` and anything
    /// `extract` rejects to an error naming what was expected and found.
    fn typed<T>(
        &self,
        column: &str,
        expected: &str,
        extract: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, HandlerError> {
        let value = self.value(column)?;
        if matches!(value, Value::Null) {
            return Ok(None);
        }
        extract(value).map(Some).ok_or_else(|| {
            HandlerError::db(format!(
                "column `{column}` holds {}, expected {expected}",
                kind(value)
            ))
        })
    }
}

fn required<T>(column: &str, value: Option<T>) -> Result<T, HandlerError> {
    value.ok_or_else(|| HandlerError::db(format!("column `{column}` is NULL")))
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "NULL",
        Value::Integer(_) => "an integer",
        Value::Real(_) => "a real",
        Value::Text(_) => "text",
        Value::Blob(_) => "a blob",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Id;

    fn rows() -> Rows {
        Rows::new(
            vec!["id".into(), "name".into(), "nonce".into(), "score".into()],
            vec![
                vec![
                    Value::Integer(7),
                    Value::Text("alice".into()),
                    Value::Null,
                    Value::Integer(3),
                ],
                vec![Value::Integer(8)],
            ],
        )
    }

    #[test]
    fn reads_columns_by_name() {
        let rows = rows();
        let row = rows.first().expect("a row");
        assert_eq!(row.get_i64("id").expect("id"), 7);
        assert_eq!(row.get_id("id").expect("id"), Id(7));
        assert_eq!(row.get_str("name").expect("name"), "alice");
        assert_eq!(row.get_opt_str("nonce").expect("nonce"), None);
        assert_eq!(row.get_f64("score").expect("score"), 3.0);
    }

    #[test]
    fn mismatches_are_db_errors() {
        let rows = rows();
        let row = rows.first().expect("a row");
        let err = row.get_str("id").expect_err("id is an integer");
        assert_eq!(err.code, "DB_ERROR");
        assert_eq!(err.message, "column `id` holds an integer, expected text");
        assert_eq!(
            row.get_str("nonce").expect_err("null").message,
            "column `nonce` is NULL"
        );
        assert_eq!(
            row.get_i64("missing").expect_err("missing").message,
            "no column `missing` in the result"
        );
        // A short row (a host bug) is an error, not a panic.
        let short = rows.get(1).expect("second row");
        assert_eq!(short.get_i64("id").expect("id"), 8);
        assert!(short.get_str("name").is_err());
    }

    #[test]
    fn params_convert() {
        let name = String::from("bob");
        let none: Option<&str> = None;
        let params: [&dyn ToValue; 6] = [&5_i64, &"a", &name, &Some(1.5), &none, &Id(9)];
        let values: Vec<Value> = params.iter().map(|p| p.to_value()).collect();
        assert_eq!(
            values,
            vec![
                Value::Integer(5),
                Value::Text("a".into()),
                Value::Text("bob".into()),
                Value::Real(1.5),
                Value::Null,
                Value::Integer(9),
            ]
        );
    }
}
