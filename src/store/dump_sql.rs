//! `$dump-sql`'s query: a client's SQL, run as the reader role
//! ([`super::roles::SQL_READER_ROLE`]) on a connection of its own, in a read-only transaction
//! with a statement timeout.
//!
//! The query is described first (parsed, not run): that refuses more than one statement
//! (`select 1; drop table patient`), finds syntax errors and unknown tables or columns with
//! their position, and gives the columns and the parameter types. Without parameters it is
//! streamed by COPY (which takes no parameters); with them, from a portal of a wrapper query.
//! Either way the client's text is only ever placed inside one statement of ours, after the
//! describe step showed it is one query.

use std::time::Duration;

use bytes::BytesMut;
use tokio_postgres::error::ErrorPosition;
use tokio_postgres::types::{to_sql_checked, Format, IsNull, ToSql, Type};

use super::copy_out::{copy_out_on, CopyOut, OwnedStream};
use super::{Store, StoreError};

/// The result's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Tab-separated text, as PostgreSQL's text COPY writes it.
    Tsv,
    /// One JSON object per row (`row_to_json`).
    Ndjson,
    /// PostgreSQL's CSV COPY (NULL as an empty field), with a header row when asked.
    Csv { header: bool },
    /// The query's own columns, as binary COPY (text columns: their UTF-8 text).
    Fields,
}

/// The rows of a running query, in one of three forms.
pub enum Rows {
    /// TSV (no parameters): PostgreSQL's text COPY, a row per chunk.
    CopyText(CopyOut),
    /// NDJSON (no parameters): a binary COPY of one text column, the row's JSON.
    CopyJson(CopyOut),
    /// Fields (no parameters): a binary COPY of the query's columns.
    CopyFields(CopyOut),
    /// With parameters (COPY takes none), a portal's rows: for TSV one `text[]` of the
    /// columns' text, for NDJSON one text column, the row's JSON.
    Portal(OwnedStream<tokio_postgres::RowStream>),
}

/// A query that runs: its columns, its rows, and where the client's text starts in the
/// statement that runs (to map an error position back into the client's text).
pub struct Running {
    pub columns: Vec<String>,
    pub rows: Rows,
    pub offset: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// fhirbox cannot connect as the reader role.
    #[error("cannot connect as the SQL reader role ({0})")]
    Connect(StoreError),
    #[error("the query has {expected} parameter(s) ($1..$n) but {given} were given")]
    Params { expected: usize, given: usize },
    /// PostgreSQL refused or stopped the query.
    #[error("{message}")]
    Refused {
        /// PostgreSQL's SQLSTATE.
        code: String,
        message: String,
        /// 1-based character position in the client's query.
        position: Option<usize>,
    },
    #[error(transparent)]
    Store(StoreError),
}

impl QueryError {
    /// An error of the server about the query, its position mapped back into the client's
    /// text (`offset`: where that text starts in the statement that failed).
    pub fn from_store(error: StoreError, offset: usize) -> QueryError {
        let db = match &error {
            StoreError::Db(db) => db.as_db_error(),
            _ => None,
        };
        let Some(db) = db else {
            return QueryError::Store(error);
        };
        let position = match db.position() {
            Some(ErrorPosition::Original(at)) => {
                (*at as usize).checked_sub(offset).filter(|p| *p > 0)
            }
            _ => None,
        };
        QueryError::Refused {
            code: db.code().code().to_string(),
            message: db.message().to_string(),
            position,
        }
    }
}

/// Starts a client's query (trimmed, not empty) on a fresh connection of the reader pool.
/// The connection holds the query's read-only transaction: it is closed when the rows end
/// and cancelled when they are dropped early, never given back to the pool, so no session
/// state of one query reaches another.
pub async fn run(
    reader: &Store,
    query: &str,
    params: Vec<Option<String>>,
    output: Output,
    timeout: Duration,
    view: bool,
) -> Result<Running, QueryError> {
    let conn = reader.dedicated().await.map_err(QueryError::Connect)?;
    // The timeout is a number fhirbox prints; SET takes no bind parameters.
    conn.batch_execute(&format!(
        "BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ; SET LOCAL statement_timeout = {}; {}",
        timeout.as_millis(),
        if view {
            super::session::VIEW_PLANNING
        } else {
            ""
        }
    ))
    .await
    .map_err(|e| QueryError::from_store(e.into(), 0))?;
    // Parsed and described, not run: one statement only, its columns and parameter types.
    let statement = conn
        .prepare(query)
        .await
        .map_err(|e| QueryError::from_store(e.into(), 0))?;
    if statement.params().len() != params.len() {
        return Err(QueryError::Params {
            expected: statement.params().len(),
            given: params.len(),
        });
    }
    let columns: Vec<String> = statement
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let (sql, rows) = match (output, params.is_empty()) {
        (Output::Tsv, true) => {
            let sql = copy_tsv_sql(query);
            let copy = copy_out_on(conn, &sql)
                .await
                .map_err(|e| QueryError::from_store(e, query_offset(&sql, query)))?;
            (sql, Rows::CopyText(copy.close_after()))
        }
        (Output::Csv { header }, true) => {
            let sql = copy_csv_sql(query, header);
            let copy = copy_out_on(conn, &sql)
                .await
                .map_err(|e| QueryError::from_store(e, query_offset(&sql, query)))?;
            (sql, Rows::CopyText(copy.close_after()))
        }
        (Output::Fields, true) => {
            let sql = format!("COPY (\n{query}\n) TO STDOUT (FORMAT binary)");
            let copy = copy_out_on(conn, &sql)
                .await
                .map_err(|e| QueryError::from_store(e, query_offset(&sql, query)))?;
            (sql, Rows::CopyFields(copy.close_after()))
        }
        (Output::Ndjson, true) => {
            let sql = copy_ndjson_sql(query);
            let copy = copy_out_on(conn, &sql)
                .await
                .map_err(|e| QueryError::from_store(e, query_offset(&sql, query)))?;
            (sql, Rows::CopyJson(copy.close_after()))
        }
        (output, false) => {
            let sql = match output {
                Output::Tsv | Output::Csv { .. } | Output::Fields => {
                    tsv_rows_sql(query, columns.len())
                }
                Output::Ndjson => ndjson_rows_sql(query),
            };
            let params: Vec<TextParam> = params.into_iter().map(TextParam).collect();
            let rows = conn
                .query_raw(sql.as_str(), params.iter())
                .await
                .map_err(|e| QueryError::from_store(e.into(), query_offset(&sql, query)))?;
            (
                sql,
                Rows::Portal(OwnedStream::new(conn, rows).close_after()),
            )
        }
    };
    Ok(Running {
        columns,
        rows,
        offset: query_offset(&sql, query),
    })
}

/// Where the client's query starts inside one of the wrapping statements below (to map an
/// error position, which PostgreSQL gives in characters, back into the client's text).
fn query_offset(wrapped: &str, query: &str) -> usize {
    wrapped
        .find(query)
        .map_or(0, |bytes| wrapped[..bytes].chars().count())
}

/// TSV: PostgreSQL's text COPY, with NULL as an empty field.
fn copy_tsv_sql(query: &str) -> String {
    format!("COPY (\n{query}\n) TO STDOUT (FORMAT text, NULL '')")
}

/// CSV: PostgreSQL's CSV COPY.
fn copy_csv_sql(query: &str, header: bool) -> String {
    format!("COPY (\n{query}\n) TO STDOUT (FORMAT csv, HEADER {header})")
}

/// NDJSON: one `row_to_json` per row, as binary COPY (so the JSON is not escaped again).
fn copy_ndjson_sql(query: &str) -> String {
    format!("COPY (SELECT row_to_json(fhirbox_q)::text FROM (\n{query}\n) fhirbox_q) TO STDOUT (FORMAT binary)")
}

/// Rows as arrays of their columns' text (with parameters: no COPY).
fn tsv_rows_sql(query: &str, columns: usize) -> String {
    let names: Vec<String> = (1..=columns).map(|i| format!("c{i}")).collect();
    let texts: Vec<String> = names.iter().map(|c| format!("{c}::text")).collect();
    format!(
        "SELECT ARRAY[{}]::text[] FROM (\n{query}\n) AS fhirbox_q({})",
        texts.join(", "),
        names.join(", ")
    )
}

/// Rows as `row_to_json` text (with parameters: no COPY).
fn ndjson_rows_sql(query: &str) -> String {
    format!("SELECT row_to_json(fhirbox_q)::text FROM (\n{query}\n) fhirbox_q")
}

/// A parameter sent in text format: PostgreSQL parses it with the input function of whatever
/// type it inferred for `$n`, so `'42'` binds to a bigint and `'2021-06-10'` to a date.
#[derive(Debug)]
pub struct TextParam(pub Option<String>);

impl ToSql for TextParam {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            Some(text) => {
                out.extend_from_slice(text.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrappers_keep_the_query_on_its_own_lines() {
        assert_eq!(
            copy_ndjson_sql("select 1 -- a comment"),
            "COPY (SELECT row_to_json(fhirbox_q)::text FROM (\nselect 1 -- a comment\n) fhirbox_q) TO STDOUT (FORMAT binary)"
        );
        assert_eq!(
            tsv_rows_sql("select a, b from t", 2),
            "SELECT ARRAY[c1::text, c2::text]::text[] FROM (\nselect a, b from t\n) AS fhirbox_q(c1, c2)"
        );
        assert!(copy_tsv_sql("select 1").starts_with("COPY (\nselect 1\n)"));
    }
}
