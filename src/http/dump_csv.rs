//! `GET /[type]/$dump-csv`: a type's current resources (native format) as CSV (`text/csv`),
//! with `_since` and `gzip` as for `$dump`.

use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use axum::Extension;

use super::body::streamed;
use super::dump::DumpParams;
use super::error::ApiError;
use super::AppState;
use crate::auth::Subject;
use crate::bulk::dump_csv::dump_csv as start;
use crate::bulk::report::{reporting, Report};
use crate::bulk::stream::holding;
use crate::crud;

pub async fn dump_csv(
    State(state): State<AppState>,
    Path(type_name): Path<String>,
    Extension(subject): Extension<Subject>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let rt = crud::resource_type(&type_name)?;
    let params = DumpParams::parse(query.as_deref(), false)?;
    let permit = state.bulk.start(&subject.name())?;
    let report = Report::start("$dump-csv", rt.name(), subject.name(), "out");
    let reader = state.readers.now("$dump-csv").await?;
    let body = start(&reader.bulk, rt, params.since, &report).await?;
    let body = holding(reporting(body, report), permit);
    Ok(streamed(body, "text/csv", params.gzip))
}
