//! `POST /$dump-sql`: a SQL query's result, streamed. The body (JSON or YAML) holds `query`
//! and optionally `params` (bound as `$1..$n`). Query parameters: `_format=ndjson` (or
//! `json`) for NDJSON, TSV otherwise; `_header=true` for a TSV header row; `gzip=true`.

use axum::extract::{RawQuery, State};
use axum::response::Response;
use axum::Extension;
use serde_json::Value;

use super::body::{form_urlencoded_pairs, streamed, Document};
use super::error::ApiError;
use super::AppState;
use crate::auth::Subject;
use crate::bulk::dump_sql::{dump_sql as start, SqlDumpRequest, SqlFormat};
use crate::bulk::params::parse_bool;
use crate::bulk::report::{reporting, Outcome, Report};
use crate::bulk::stream::holding;

pub async fn dump_sql(
    State(state): State<AppState>,
    Extension(subject): Extension<Subject>,
    RawQuery(query_string): RawQuery,
    Document(body): Document,
) -> Result<Response, ApiError> {
    let mut format = SqlFormat::Tsv;
    let mut header = false;
    let mut gzip = false;
    for (name, value) in form_urlencoded_pairs(query_string.as_deref().unwrap_or_default()) {
        let invalid = |what: &str| {
            ApiError::bad_request(format!("invalid {name} '{value}': {what}"))
                .with_expression(name.clone())
        };
        match name.as_str() {
            "_format" => {
                format = match value.as_str() {
                    "json" | "ndjson" => SqlFormat::Ndjson,
                    "tsv" => SqlFormat::Tsv,
                    _ => return Err(invalid("expected ndjson, json or tsv")),
                }
            }
            "_header" => {
                header = parse_bool(&value).ok_or_else(|| invalid("expected true or false"))?
            }
            "gzip" => gzip = parse_bool(&value).ok_or_else(|| invalid("expected true or false"))?,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter '{name}' (supported: _format, _header, gzip)"
                ))
                .with_expression(name))
            }
        }
    }
    let request = parse_body(body, format, header)?;
    let permit = state.bulk.start(&subject.name())?;
    // Root may read fhirbox's own tables too; clients read FHIR resources only.
    let pools = state.readers.now("$dump-sql").await?;
    let reader = match subject {
        Subject::Root => &pools.sql_admin,
        Subject::Client(_) => &pools.sql_reader,
    };
    let report = Report::start("$dump-sql", "query", subject.name(), "out");
    let body = start(reader, request, &state.settings.sql_limits, &report).await;
    let body = match body {
        Ok(body) => body,
        Err(error) => {
            report.finish(Outcome::Failed, Some(&error.to_string()));
            return Err(error.into());
        }
    };
    let body = holding(reporting(body, report), permit);
    let content_type = match format {
        SqlFormat::Tsv => "text/tab-separated-values",
        SqlFormat::Ndjson => "application/ndjson",
        SqlFormat::Csv { .. } => "text/csv",
        SqlFormat::Fields => "application/ndjson",
    };
    Ok(streamed(body, content_type, gzip))
}

fn parse_body(body: Value, format: SqlFormat, header: bool) -> Result<SqlDumpRequest, ApiError> {
    let Value::Object(body) = body else {
        return Err(ApiError::bad_request(
            "the body must be an object with a 'query'",
        ));
    };
    let mut query = None;
    let mut params = Vec::new();
    for (name, value) in body {
        match (name.as_str(), value) {
            ("query", Value::String(text)) => query = Some(text),
            ("query", _) => {
                return Err(
                    ApiError::bad_request("'query' must be a string").with_expression("query")
                )
            }
            ("params", Value::Array(values)) => {
                params = values
                    .into_iter()
                    .map(|value| match value {
                        Value::Null => None,
                        Value::String(text) => Some(text),
                        other => Some(other.to_string()),
                    })
                    .collect()
            }
            ("params", _) => {
                return Err(
                    ApiError::bad_request("'params' must be a list").with_expression("params")
                )
            }
            (other, _) => {
                return Err(ApiError::bad_request(format!(
                    "unknown field '{other}' (supported: query, params)"
                ))
                .with_expression(other.to_string()))
            }
        }
    }
    let query = query.ok_or_else(|| {
        ApiError::bad_request("the body needs 'query': the SQL to run").with_expression("query")
    })?;
    Ok(SqlDumpRequest {
        view: false,
        query,
        params,
        format,
        header,
        json_fields: Vec::new(),
    })
}
