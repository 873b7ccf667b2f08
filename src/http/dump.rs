//! `GET /[type]/$dump` and `GET /fhir/[type]/$dump`: every current resource of a type as
//! NDJSON (`application/ndjson`, chunked). Parameters: `_since` (created after; ISO date or
//! date-time), `fhir` (default false, true under `/fhir`), `gzip`. Every parameter is checked
//! before the first byte is sent.

use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use axum::Extension;

use super::body::{form_urlencoded_pairs, streamed};
use super::error::ApiError;
use super::AppState;
use crate::auth::Subject;
use crate::bulk::dump::{dump as start_dump, DumpOptions};
use crate::bulk::params::{parse_bool, parse_instant};
use crate::bulk::report::{reporting, Report};
use crate::bulk::stream::holding;
use crate::crud;
use crate::format::Api;

pub async fn dump(
    State(state): State<AppState>,
    Path(type_name): Path<String>,
    Extension(api): Extension<Api>,
    Extension(subject): Extension<Subject>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let rt = crud::resource_type(&type_name)?;
    let params = DumpParams::parse(query.as_deref(), true)?;
    let permit = state.bulk.start(&subject.name())?;
    let options = DumpOptions {
        since: params.since,
        fhir: match params.fhir.unwrap_or(api == Api::Fhir) {
            true => Some(state.formats.converter().await?),
            false => None,
        },
    };
    let report = Report::start("$dump", rt.name(), subject.name(), "out");
    let reader = state.readers.now("$dump").await?;
    let body = start_dump(&reader.bulk, rt, options, &report).await?;
    let body = holding(reporting(body, report), permit);
    Ok(streamed(body, "application/ndjson", params.gzip))
}

/// The parameters of the dumps (`$dump-csv` takes them but `fhir`).
pub(super) struct DumpParams {
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    pub fhir: Option<bool>,
    pub gzip: bool,
}

impl DumpParams {
    pub fn parse(query: Option<&str>, fhir_allowed: bool) -> Result<DumpParams, ApiError> {
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
