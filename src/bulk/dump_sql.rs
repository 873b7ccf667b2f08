//! `$dump-sql`: the result of a client's SQL query, streamed as TSV or NDJSON.
//!
//! Safety comes from where the query runs (see [`crate::store::dump_sql`]): as a role that can
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

use super::report::Report;
use super::stream::{tuple_batches, ByteStream};
pub use crate::store::dump_sql::Output as SqlFormat;
use crate::store::dump_sql::{self, QueryError, Rows};
use crate::store::{Store, StoreError};

/// Rows of output gathered per chunk on the portal path.
const ROWS_PER_CHUNK: usize = 1024;

/// COPY rows (one message each) passed on together when they are ready at once.
const READY_ROWS: usize = 4096;

/// Bytes of NDJSON per chunk on the COPY path.
const BATCH_BYTES: usize = 256 * 1024;

pub struct SqlDumpRequest {
    pub query: String,
    /// `$1..$n`, as text (PostgreSQL parses each for the type it infers); `None` is NULL.
    pub params: Vec<Option<String>>,
    pub format: SqlFormat,
    /// A first row with the column names (TSV only).
    pub header: bool,
    /// With [`SqlFormat::Fields`]: rows become JSON objects of these columns, each either a
    /// text written as a JSON string (`true`) or the text of a JSON value (`false`).
    pub json_fields: Vec<(String, bool)>,
    /// The query is a compiled view (planned without Memoize, see
    /// [`crate::store::session`]).
    pub view: bool,
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
    #[error("the query is empty")]
    Empty,
    /// The result broke a limit before its first chunk.
    #[error("{0}")]
    Limit(String),
    #[error(transparent)]
    Query(#[from] QueryError),
}

/// Starts the dump. Everything that can fail before the first row fails here.
pub async fn dump_sql(
    reader: &Store,
    request: SqlDumpRequest,
    limits: &SqlLimits,
    report: &Report,
) -> Result<ByteStream, SqlDumpError> {
    let query = request
        .query
        .trim()
        .trim_end_matches([';', ' ', '\n', '\r', '\t'])
        .to_string();
    if query.is_empty() {
        return Err(SqlDumpError::Empty);
    }
    let running = dump_sql::run(
        reader,
        &query,
        request.params,
        request.format,
        limits.timeout,
        request.view,
    )
    .await?;
    let counted = report.clone();
    let body: ByteStream = match running.rows {
        Rows::CopyText(copy) => {
            // COPY sends one message per row: pass on what is ready together.
            Box::pin(copy.ready_chunks(READY_ROWS).map(move |chunks| {
                counted.rows(chunks.len() as u64);
                let mut out = Vec::new();
                for chunk in chunks {
                    out.extend_from_slice(&chunk.map_err(io::Error::other)?);
                }
                Ok(out.into())
            }))
        }
        Rows::CopyJson(copy) => Box::pin(tuple_batches(copy, 1, BATCH_BYTES).map(move |batch| {
            let batch = batch?;
            counted.rows(batch.len() as u64);
            let mut out = Vec::with_capacity(BATCH_BYTES + BATCH_BYTES / 4);
            for tuple in batch {
                out.extend_from_slice(tuple.text(0).unwrap_or(b"null"));
                out.push(b'\n');
            }
            Ok(out.into())
        })),
        Rows::CopyFields(copy) => json_rows(copy, request.json_fields.clone(), move |rows| {
            counted.rows(rows)
        }),
        Rows::Portal(rows) => Box::pin(lines_from_rows(rows, request.format, counted)),
    };
    // Fused: an empty result is polled again after its end (the chain below).
    let mut body: ByteStream = Box::pin(limit(body, limits.max_rows, limits.max_bytes).fuse());
    // The first chunk decides between an error answer and a 200.
    let first = match body.next().await {
        Some(Ok(chunk)) => Some(chunk),
        Some(Err(error)) => return Err(first_chunk_error(error, running.offset)),
        None => None,
    };
    let header =
        (request.format == SqlFormat::Tsv && request.header).then(|| tsv_header(&running.columns));
    let head = futures_util::stream::iter(header.into_iter().chain(first).map(Ok));
    Ok(Box::pin(head.chain(body)))
}

/// A binary COPY of text fields as JSON objects, one per line; `counted` hears of each
/// batch's rows.
pub(crate) fn json_rows(
    copy: crate::store::copy_out::CopyOut,
    fields: Vec<(String, bool)>,
    counted: impl Fn(u64) + Send + 'static,
) -> ByteStream {
    Box::pin(
        tuple_batches(copy, fields.len(), BATCH_BYTES).map(move |batch| {
            let batch = batch?;
            counted(batch.len() as u64);
            Ok(json_lines(&batch, &fields).into())
        }),
    )
}

/// Tuples of text fields as JSON objects, one per line.
fn json_lines(batch: &[crate::store::copy::Tuple], fields: &[(String, bool)]) -> Vec<u8> {
    let keys: Vec<Vec<u8>> = fields
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            let mut key = vec![if i == 0 { b'{' } else { b',' }];
            serde_json::to_writer(&mut key, name).expect("writing to a Vec");
            key.push(b':');
            key
        })
        .collect();
    let mut out = Vec::with_capacity(BATCH_BYTES + BATCH_BYTES / 2);
    for tuple in batch {
        for (i, (key, (_, string))) in keys.iter().zip(fields).enumerate() {
            out.extend_from_slice(key);
            match tuple.text(i) {
                None => out.extend_from_slice(b"null"),
                Some(text) if *string => {
                    let text = String::from_utf8_lossy(text);
                    serde_json::to_writer(&mut out, text.as_ref()).expect("writing to a Vec");
                }
                Some(json) => out.extend_from_slice(json),
            }
        }
        if fields.is_empty() {
            out.push(b'{');
        }
        out.extend_from_slice(b"}\n");
    }
    out
}

/// An error met at the first chunk: the server's own, if it is one.
fn first_chunk_error(error: io::Error, offset: usize) -> SqlDumpError {
    match error
        .into_inner()
        .map(|inner| inner.downcast::<StoreError>())
    {
        Some(Ok(store)) => QueryError::from_store(*store, offset).into(),
        Some(Err(other)) => SqlDumpError::Limit(other.to_string()),
        None => SqlDumpError::Limit("the query failed".into()),
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

/// Lines from a portal's rows: TSV from arrays of column text, NDJSON from JSON text.
fn lines_from_rows(
    rows: crate::store::copy_out::OwnedStream<tokio_postgres::RowStream>,
    format: SqlFormat,
    report: Report,
) -> impl Stream<Item = Result<Bytes, io::Error>> + Send {
    rows.chunks(ROWS_PER_CHUNK).map(move |rows| {
        report.rows(rows.len() as u64);
        let mut out = Vec::new();
        for row in rows {
            let row = row.map_err(io::Error::other)?;
            match format {
                SqlFormat::Ndjson => {
                    let text: Option<&str> = row.try_get(0).map_err(io::Error::other)?;
                    out.extend_from_slice(text.unwrap_or("null").as_bytes());
                }
                SqlFormat::Tsv | SqlFormat::Csv { .. } | SqlFormat::Fields => {
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
