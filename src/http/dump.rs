//! `GET /[type]/$dump` and `GET /fhir/[type]/$dump`: every current resource of a type as
//! NDJSON (`application/ndjson`, chunked). Parameters: `_since` (created after; ISO date or
//! date-time), `fhir` (default false, true under `/fhir`), `gzip`. Every parameter is checked
//! before the first byte is sent.
//!
//! `GET /[type]/$dump-csv`: the same resources (native format) as CSV (`text/csv`), with
//! `_since` and `gzip`.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Extension;

use super::body::form_urlencoded_pairs;
use super::error::ApiError;
use super::AppState;
use crate::bulk::dump::{dump as start_dump, ByteStream, DumpOptions};
use crate::bulk::dump_csv::dump_csv as start_dump_csv;
use crate::bulk::params::{parse_bool, parse_instant};
use crate::crud;
use crate::format::Api;

pub async fn dump(
    State(state): State<AppState>,
    Path(type_name): Path<String>,
    Extension(api): Extension<Api>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let rt = crud::resource_type(&type_name)?;
    let params = DumpParams::parse(query.as_deref(), true)?;
    let options = DumpOptions {
        since: params.since,
        fhir: match params.fhir.unwrap_or(api == Api::Fhir) {
            true => Some(state.formats.converter().await?),
            false => None,
        },
        gzip: params.gzip,
    };
    let body = start_dump(&state.store, rt, options).await?;
    Ok(streamed(body, "application/ndjson", params.gzip))
}

pub async fn dump_csv(
    State(state): State<AppState>,
    Path(type_name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let rt = crud::resource_type(&type_name)?;
    let params = DumpParams::parse(query.as_deref(), false)?;
    let body = start_dump_csv(&state.store, rt, params.since).await?;
    let body = if params.gzip {
        crate::bulk::gzip::gzip(body)
    } else {
        body
    };
    Ok(streamed(body, "text/csv", params.gzip))
}

/// A 200 whose body is streamed (chunked).
pub(super) fn streamed(body: ByteStream, content_type: &'static str, gzip: bool) -> Response {
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if gzip {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response
}

/// The parameters of the dumps.
struct DumpParams {
    since: Option<chrono::DateTime<chrono::Utc>>,
    fhir: Option<bool>,
    gzip: bool,
}

impl DumpParams {
    fn parse(query: Option<&str>, fhir_allowed: bool) -> Result<DumpParams, ApiError> {
        let mut params = DumpParams {
            since: None,
            fhir: None,
            gzip: false,
        };
        for (name, value) in form_urlencoded_pairs(query.unwrap_or_default()) {
            let invalid = |what: &str| {
                ApiError::bad_request(format!("invalid {name} '{value}': {what}"))
                    .with_expression(name.clone())
            };
            match name.as_str() {
                "_since" => {
                    params.since = Some(
                        parse_instant(&value)
                            .ok_or_else(|| invalid("expected an ISO date or date-time"))?,
                    )
                }
                "fhir" if fhir_allowed => {
                    params.fhir =
                        Some(parse_bool(&value).ok_or_else(|| invalid("expected true or false"))?)
                }
                "gzip" => {
                    params.gzip =
                        parse_bool(&value).ok_or_else(|| invalid("expected true or false"))?
                }
                _ => {
                    let supported = if fhir_allowed {
                        "_since, fhir, gzip"
                    } else {
                        "_since, gzip"
                    };
                    return Err(ApiError::bad_request(format!(
                        "unknown parameter '{name}' (supported: {supported})"
                    ))
                    .with_expression(name));
                }
            }
        }
        Ok(params)
    }
}
