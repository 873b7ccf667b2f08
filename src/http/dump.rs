//! `GET /[type]/$dump` and `GET /fhir/[type]/$dump`: every current resource of a type as
//! NDJSON (`application/ndjson`, chunked). Parameters: `_since` (created after; ISO date or
//! date-time), `fhir` (default false, true under `/fhir`), `gzip`. Every parameter is checked
//! before the first byte is sent.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Extension;

use super::body::form_urlencoded_pairs;
use super::error::ApiError;
use super::AppState;
use crate::bulk::dump::{dump as start_dump, DumpOptions};
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
    let mut options = DumpOptions {
        since: None,
        fhir: None,
        gzip: false,
    };
    let mut fhir = api == Api::Fhir;
    for (name, value) in form_urlencoded_pairs(query.as_deref().unwrap_or_default()) {
        let invalid = |what: &str| {
            ApiError::bad_request(format!("invalid {name} '{value}': {what}"))
                .with_expression(name.clone())
        };
        match name.as_str() {
            "_since" => {
                options.since = Some(
                    parse_instant(&value)
                        .ok_or_else(|| invalid("expected an ISO date or date-time"))?,
                )
            }
            "fhir" => fhir = parse_bool(&value).ok_or_else(|| invalid("expected true or false"))?,
            "gzip" => {
                options.gzip =
                    parse_bool(&value).ok_or_else(|| invalid("expected true or false"))?
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter '{name}' (supported: _since, fhir, gzip)"
                ))
                .with_expression(name))
            }
        }
    }
    if fhir {
        options.fhir = Some(state.formats.converter().await?);
    }
    let gzip = options.gzip;
    let body = start_dump(&state.store, rt, options).await?;
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/ndjson"),
    );
    if gzip {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    Ok(response)
}
