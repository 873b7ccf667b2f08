//! `$viewdefinition-run`: a view's rows, streamed. The compiled query goes through
//! `$dump-sql`'s machinery ([`crate::bulk::dump_sql`]): the reader role on a connection of its
//! own, a read-only transaction, the statement timeout, the row and byte limits, cancelled
//! when the client leaves. CSV is PostgreSQL's own `COPY ... (FORMAT csv)`; NDJSON is
//! built from a binary COPY of the columns; JSON is the same rows inside `[...]`; Parquet
//! is written from them a row group at a time ([`super::parquet`]).

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;

use super::definition::View;
use super::parquet::{parquet, Physical};
use super::ViewError;
use crate::bulk::dump_sql::{dump_sql, SqlDumpError, SqlDumpRequest, SqlFormat, SqlLimits};
use crate::bulk::report::Report;
use crate::bulk::stream::ByteStream;
use crate::format::Converter;
use crate::store::Store;
use crate::views::sql::{self as view_sql, Columns, Rows};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewFormat {
    Csv,
    Ndjson,
    Json,
    Parquet,
    /// Not the rows: the SQL the view compiles to (what a run would execute), as text.
    Sql,
}

impl ViewFormat {
    /// `_format`'s values: `csv`, `ndjson`, `json`, `parquet`, `sql` (and their media types).
    pub fn parse(text: &str) -> Option<ViewFormat> {
        match text {
            "csv" | "text/csv" => Some(ViewFormat::Csv),
            "ndjson"
            | "application/ndjson"
            | "application/x-ndjson"
            | "application/fhir+ndjson" => Some(ViewFormat::Ndjson),
            "json" | "application/json" | "application/fhir+json" => Some(ViewFormat::Json),
            "parquet" | "application/vnd.apache.parquet" => Some(ViewFormat::Parquet),
            "sql" | "application/sql" => Some(ViewFormat::Sql),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            ViewFormat::Csv => "text/csv",
            ViewFormat::Ndjson => "application/x-ndjson",
            ViewFormat::Json => "application/json",
            ViewFormat::Parquet => "application/vnd.apache.parquet",
            ViewFormat::Sql => "application/sql; charset=utf-8",
        }
    }
}

pub struct RunRequest {
    /// The ViewDefinition (FHIR JSON).
    pub view: Value,
    pub format: ViewFormat,
    /// A CSV header row (the default).
    pub header: bool,
    pub rows: Rows,
    /// Parquet row groups.
    pub row_groups: super::parquet::RowGroups,
    /// How big the view may compile.
    pub limits: view_sql::ViewLimits,
    /// How much it may output.
    pub bounds: crate::bulk::bounds::OutputBounds,
}

/// Compiles the view for the Attributes in force and starts streaming its rows. Everything
/// that can fail before the first row fails here.
pub async fn run(
    reader: &Store,
    converter: &Converter,
    request: RunRequest,
    limits: &SqlLimits,
    report: &Report,
) -> Result<ByteStream, ViewError> {
    let view = View::parse(&request.view)?;
    let attributes = converter.rules().for_type(&view.resource);
    let columns = match request.format {
        ViewFormat::Csv => Columns::Text,
        _ => Columns::Json,
    };
    let compiled = view_sql::compile(&view, attributes, &request.rows, columns, &request.limits)?;
    if request.format == ViewFormat::Sql {
        let text = Bytes::from(format!("{}\n", compiled.sql));
        return Ok(Box::pin(futures_util::stream::once(async { Ok(text) })));
    }
    let physical = Physical::columns(&view, &compiled);
    let json_fields = compiled.json_fields();
    let format = match request.format {
        ViewFormat::Csv => SqlFormat::Csv {
            header: request.header,
        },
        _ => SqlFormat::Fields,
    };
    let sql = SqlDumpRequest {
        query: compiled.sql,
        params: Vec::new(),
        format,
        header: false,
        json_fields,
        view: true,
    };
    let body = dump_sql(reader, sql, limits, report)
        .await
        .map_err(|error| match error {
            SqlDumpError::Query(query) => ViewError::Query(query),
            other => ViewError::Limit(other.to_string()),
        })?;
    // Past its bound in the first chunk: an answer that says so, not a broken transfer.
    let mut body = crate::bulk::bounds::bounded(body, request.bounds);
    let body: ByteStream = match body.next().await {
        Some(Err(error)) => return Err(ViewError::Limit(error.to_string())),
        Some(Ok(first)) => Box::pin(futures_util::stream::once(async { Ok(first) }).chain(body)),
        None => Box::pin(futures_util::stream::empty()),
    };
    Ok(match request.format {
        ViewFormat::Json => json_array(body),
        ViewFormat::Parquet => parquet(body, physical, request.row_groups)
            .map_err(|e| ViewError::Limit(e.to_string()))?,
        _ => body,
    })
}

/// NDJSON lines as one JSON array. (A row's JSON never holds a raw newline.)
fn json_array(body: ByteStream) -> ByteStream {
    let mut first = true;
    let rows = body.map(move |chunk| {
        let chunk = chunk?;
        let mut out = Vec::with_capacity(chunk.len() + 2);
        for line in chunk.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            if !first {
                out.extend_from_slice(b",\n");
            }
            first = false;
            out.extend_from_slice(line);
        }
        Ok(Bytes::from(out))
    });
    let open = futures_util::stream::once(async { Ok(Bytes::from_static(b"[")) });
    let close = futures_util::stream::once(async { Ok(Bytes::from_static(b"]\n")) });
    Box::pin(open.chain(rows).chain(close))
}
