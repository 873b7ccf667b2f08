//! `$dump-sql`: the result of a client's SQL query, streamed as TSV or NDJSON.
//!
//! Safety comes from where the query runs (see [`crate::store::sql_dump`]): as a role that can
//! only read resource tables, in a read-only transaction with a statement timeout, one
//! statement only. Errors the server reports while describing the query, or before the first
//! row, are answered as errors (400, 403 for a table the role may not read, 408 for the
//! timeout) before any byte is sent; an error after that, or a result over the configured row
//! or byte limit, ends the stream with an error so the client sees a failed transfer.
//!
//! Output: TSV is PostgreSQL's text COPY (tab-separated, backslash escapes, NULL as an empty
//! field), with an optional header row of the column names; NDJSON is one `row_to_json`
//! object per row, so numbers, booleans and nested jsonb keep their JSON types.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio_postgres::error::ErrorPosition;

use super::dump::ByteStream;
use crate::store::copy::TupleReader;
use crate::store::copy_out::{copy_out_on, OwnedStream};
use crate::store::sql_dump::{self, TextParam};
use crate::store::{Store, StoreError};

/// Rows of output gathered per chunk on the portal path.
const ROWS_PER_CHUNK: usize = 1024;

/// COPY rows (one message each) passed on together when they are ready at once.
const READY_ROWS: usize = 4096;

/// A reader connection that is closed, never given back to the pool, when dropped.
struct Discarded(Option<crate::store::Connection>);

impl Discarded {
    /// The connection, to hand to a stream that discards it in turn.
    fn take(&mut self) -> crate::store::Connection {
        self.0.take().expect("taken once, for the stream")
    }
}

impl std::ops::Deref for Discarded {
    type Target = crate::store::Connection;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("used before it is taken")
    }
}

impl Drop for Discarded {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(deadpool_postgres::Object::take(conn));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlFormat {
    Tsv,
    Ndjson,
}

pub struct SqlDumpRequest {
    pub query: String,
    /// `$1..$n`, as text (PostgreSQL parses each for the type it infers); `None` is NULL.
    pub params: Vec<Option<String>>,
    pub format: SqlFormat,
    /// A first row with the column names (TSV only).
    pub header: bool,
}

/// Limits from the configuration.
#[derive(Debug, Clone)]
pub struct SqlLimits {
    pub timeout: Duration,
    pub max_rows: Option<u64>,
    pub max_bytes: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum SqlDumpError {
    #[error("$dump-sql is not available: {0}")]
    Unavailable(String),
    #[error("{message}")]
    Query {
        /// PostgreSQL's SQLSTATE.
        code: String,
        message: String,
        /// 1-based character position in the client's query.
        position: Option<usize>,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(StoreError),
}

impl SqlDumpError {
    /// An error of the server about the query, its position mapped back into the client's
    /// text (`offset`: where that text starts in the statement that failed).
    fn from_store(error: StoreError, offset: usize) -> SqlDumpError {
        let db = match &error {
            StoreError::Db(db) => db.as_db_error(),
            _ => None,
        };
        let Some(db) = db else {
            return SqlDumpError::Store(error);
        };
        let position = match db.position() {
            Some(ErrorPosition::Original(at)) => {
                (*at as usize).checked_sub(offset).filter(|p| *p > 0)
            }
            _ => None,
        };
        SqlDumpError::Query {
            code: db.code().code().to_string(),
            message: db.message().to_string(),
            position,
        }
    }
}

/// Starts the dump. Everything that can fail before the first row fails here.
pub async fn dump_sql(
    reader: &Store,
    request: SqlDumpRequest,
    limits: &SqlLimits,
) -> Result<ByteStream, SqlDumpError> {
    let query = request
        .query
        .trim()
        .trim_end_matches([';', ' ', '\n', '\r', '\t'])
        .to_string();
    if query.is_empty() {
        return Err(SqlDumpError::Invalid("the query is empty".into()));
    }
    let conn = reader.connection().await.map_err(|e| {
        SqlDumpError::Unavailable(format!(
            "cannot connect as the SQL reader role ({e}); give fhirbox a role that may create roles, or set --sql-reader-url"
        ))
    })?;
    // The connection will hold this request's transaction: it is never given back to the pool,
    // neither on an error below nor after streaming.
    let mut conn = Discarded(Some(conn));
    sql_dump::begin(&conn, limits.timeout)
        .await
        .map_err(|e| SqlDumpError::from_store(e, 0))?;
    let statement = sql_dump::describe(&conn, &query)
        .await
        .map_err(|e| SqlDumpError::from_store(e, 0))?;
    if statement.params().len() != request.params.len() {
        return Err(SqlDumpError::Invalid(format!(
            "the query has {} parameter(s) ($1..$n) but {} were given",
            statement.params().len(),
            request.params.len()
        )));
    }
    let columns: Vec<String> = statement
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let (wrapped, body): (String, ByteStream) = match (request.format, request.params.is_empty()) {
        (SqlFormat::Tsv, true) => {
            let sql = sql_dump::copy_tsv_sql(&query);
            let copy = copy_out_on(conn.take(), &sql)
                .await
                .map_err(|e| SqlDumpError::from_store(e, sql_dump::query_offset(&sql, &query)))?;
            // COPY sends one message per row: pass on what is ready together.
            let body = copy.discard_after().ready_chunks(READY_ROWS).map(
                |chunks| -> Result<Bytes, io::Error> {
                    let mut out = Vec::new();
                    for chunk in chunks {
                        out.extend_from_slice(&chunk.map_err(io::Error::other)?);
                    }
                    Ok(out.into())
                },
            );
            (sql, Box::pin(body))
        }
        (SqlFormat::Ndjson, true) => {
            let sql = sql_dump::copy_ndjson_sql(&query);
            let copy = copy_out_on(conn.take(), &sql)
                .await
                .map_err(|e| SqlDumpError::from_store(e, sql_dump::query_offset(&sql, &query)))?;
            (sql, Box::pin(json_lines_from_copy(copy.discard_after())))
        }
        (format, false) => {
            let sql = match format {
                SqlFormat::Tsv => sql_dump::tsv_rows_sql(&query, columns.len()),
                SqlFormat::Ndjson => sql_dump::ndjson_rows_sql(&query),
            };
            let params: Vec<TextParam> = request.params.into_iter().map(TextParam).collect();
            let rows = conn
                .query_raw(sql.as_str(), params.iter())
                .await
                .map_err(|e| {
                    SqlDumpError::from_store(e.into(), sql_dump::query_offset(&sql, &query))
                })?;
            let rows = OwnedStream::new(conn.take(), rows).discard_after();
            (sql, Box::pin(lines_from_rows(rows, format)))
        }
    };
    let offset = sql_dump::query_offset(&wrapped, &query);
    let mut body: ByteStream = Box::pin(limit(body, limits.max_rows, limits.max_bytes));
    // The first chunk decides between an error answer and a 200.
    let first = match body.next().await {
        Some(Ok(chunk)) => Some(chunk),
        Some(Err(error)) => return Err(first_chunk_error(error, offset)),
        None => None,
    };
    let header = (request.format == SqlFormat::Tsv && request.header).then(|| tsv_header(&columns));
    let head = futures_util::stream::iter(header.into_iter().chain(first).map(Ok));
    Ok(Box::pin(head.chain(body)))
}

/// An error met at the first chunk: the server's own, if it is one.
fn first_chunk_error(error: io::Error, offset: usize) -> SqlDumpError {
    match error
        .into_inner()
        .map(|inner| inner.downcast::<StoreError>())
    {
        Some(Ok(store)) => SqlDumpError::from_store(*store, offset),
        Some(Err(other)) => SqlDumpError::Invalid(other.to_string()),
        None => SqlDumpError::Invalid("the query failed".into()),
    }
}

/// The header row: the column names, escaped as TSV fields.
fn tsv_header(columns: &[String]) -> Bytes {
    let mut out = Vec::new();
    for (index, name) in columns.iter().enumerate() {
        if index > 0 {
            out.push(b'\t');
        }
        write_tsv_field(&mut out, name.as_bytes());
    }
    out.push(b'\n');
    out.into()
}

/// One field the way PostgreSQL's text COPY writes it.
fn write_tsv_field(out: &mut Vec<u8>, text: &[u8]) {
    for &b in text {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

/// NDJSON lines from a binary COPY of one text column.
fn json_lines_from_copy<S>(
    copy: OwnedStream<S>,
) -> impl Stream<Item = Result<Bytes, io::Error>> + Send
where
    S: Stream<Item = Result<Bytes, tokio_postgres::Error>> + Send + 'static,
{
    let state = (copy, TupleReader::new(1), false);
    futures_util::stream::unfold(state, |(mut copy, mut reader, mut ended)| async move {
        let mut out = Vec::with_capacity(256 * 1024);
        loop {
            loop {
                match reader.next_tuple() {
                    Ok(Some(tuple)) => {
                        out.extend_from_slice(tuple.text(0).unwrap_or(b"null"));
                        out.push(b'\n');
                    }
                    Ok(None) => break,
                    Err(error) => {
                        return Some((Err(io::Error::other(error)), (copy, reader, true)))
                    }
                }
            }
            if out.len() >= 256 * 1024 || (ended && !out.is_empty()) {
                return Some((Ok(out.into()), (copy, reader, ended)));
            }
            if ended {
                return None;
            }
            match copy.next().await {
                Some(Ok(chunk)) => reader.push(&chunk),
                Some(Err(error)) => {
                    return Some((Err(io::Error::other(error)), (copy, reader, true)))
                }
                None => ended = true,
            }
        }
    })
}

/// Lines from a portal's rows: TSV from arrays of column text, NDJSON from JSON text.
fn lines_from_rows(
    rows: OwnedStream<tokio_postgres::RowStream>,
    format: SqlFormat,
) -> impl Stream<Item = Result<Bytes, io::Error>> + Send {
    rows.chunks(ROWS_PER_CHUNK).map(move |rows| {
        let mut out = Vec::new();
        for row in rows {
            let row = row.map_err(io::Error::other)?;
            match format {
                SqlFormat::Ndjson => {
                    let text: Option<&str> = row.try_get(0).map_err(io::Error::other)?;
                    out.extend_from_slice(text.unwrap_or("null").as_bytes());
                }
                SqlFormat::Tsv => {
                    let fields: Vec<Option<String>> = row.try_get(0).map_err(io::Error::other)?;
                    for (index, field) in fields.iter().enumerate() {
                        if index > 0 {
                            out.push(b'\t');
                        }
                        write_tsv_field(&mut out, field.as_deref().unwrap_or_default().as_bytes());
                    }
                }
            }
            out.push(b'\n');
        }
        Ok(out.into())
    })
}

/// Ends the stream with an error once it passes `max_rows` lines or `max_bytes` bytes.
fn limit(
    body: ByteStream,
    max_rows: Option<u64>,
    max_bytes: Option<u64>,
) -> impl Stream<Item = Result<Bytes, io::Error>> + Send {
    let mut rows = 0u64;
    let mut bytes = 0u64;
    let mut over = false;
    body.map(move |chunk| {
        if over {
            return Err(io::Error::other("limit exceeded"));
        }
        let chunk = chunk?;
        rows += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        bytes += chunk.len() as u64;
        if let Some(max) = max_rows.filter(|max| rows > *max) {
            over = true;
            return Err(io::Error::other(format!(
                "the result has more than the allowed {max} rows"
            )));
        }
        if let Some(max) = max_bytes.filter(|max| bytes > *max) {
            over = true;
            return Err(io::Error::other(format!(
                "the result is larger than the allowed {max} bytes"
            )));
        }
        Ok(chunk)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsv_fields_escape_like_copy() {
        let mut out = Vec::new();
        write_tsv_field(&mut out, b"a\tb\nc\\d\re");
        assert_eq!(out, b"a\\tb\\nc\\\\d\\re");
        assert_eq!(
            tsv_header(&["id".into(), "?column?".into()]),
            Bytes::from_static(b"id\t?column?\n")
        );
    }
}
