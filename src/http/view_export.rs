//! `$viewdefinition-export` (SQL on FHIR v2): `POST /fhir/ViewDefinition/$viewdefinition-export`
//! or `POST /fhir/$viewdefinition-export` with `Prefer: respond-async` and a `Parameters` body:
//! one or more `view` (parts `name`, `viewReference` or `viewResource`), `_format` (`ndjson`
//! by default, `csv`, `parquet`), `patient`, `group`, `_since`. The job runs on `$export`'s
//! machinery: 202 with `Content-Location` to `$export-status/<id>`, whose manifest lists one
//! file per view (`type` is the view's name), downloadable by the same rules as `$export`'s.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use chrono::Utc;
use serde_json::{json, Value};

use super::body::{prefers, set_header, Document};
use super::context::ApiContext;
use super::error::ApiError;
use super::AppState;
use crate::auth::Subject;
use crate::bulk::export::request::{ExportSpec, Level};
use crate::bulk::export::views::ViewExport;
use crate::resource_type::ResourceType;
use crate::views::definition::{is_column_name, View};
use crate::views::sql::{self as view_sql, Columns, Rows};

pub async fn export(
    State(state): State<AppState>,
    Extension(subject): Extension<Subject>,
    ctx: ApiContext,
    headers: HeaderMap,
    Document(body): Document,
) -> Result<Response, ApiError> {
    if !prefers(&headers, "respond-async") {
        return Err(ApiError::bad_request(
            "$viewdefinition-export is asynchronous: send 'Prefer: respond-async'",
        ));
    }
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(ApiError::bad_request(
            "the body must be a Parameters resource with one or more 'view' parameters",
        ));
    }
    let converter = state.formats.converter().await?;
    let mut views: Vec<ViewExport> = Vec::new();
    let mut format = None;
    let mut patients: Vec<String> = Vec::new();
    // `patient` or `group` restrict (a Group without members: to nobody).
    let mut restricted = false;
    let mut since = None;
    let bad = |at: String, message: String| {
        ApiError::bad_request(format!("{at}: {message}")).with_expression(at)
    };
    for (index, parameter) in body["parameter"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = format!("parameter[{index}]");
        let text = ["valueString", "valueCode", "valueInstant", "valueDateTime"]
            .iter()
            .find_map(|k| parameter.get(*k).and_then(Value::as_str));
        match parameter["name"].as_str().unwrap_or_default() {
            "view" => {
                let view = resolve_view(&state, parameter, &at).await?;
                let parsed = View::parse(&view).map_err(|e| bad(at.clone(), e.to_string()))?;
                let name = parameter["part"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["name"] == "name")
                    .and_then(|p| p["valueString"].as_str())
                    .map(str::to_string)
                    .or(parsed.name.clone())
                    .unwrap_or_else(|| format!("view_{}", views.len() + 1));
                if !is_column_name(&name) || views.iter().any(|v| v.name == name) {
                    return Err(bad(at, format!("output name '{name}' must be unique and hold only letters, digits and _")));
                }
                let attributes = converter.rules().for_type(&parsed.resource);
                let limits = &state.settings.views;
                view_sql::compile(&parsed, attributes, &Rows::default(), Columns::Json, limits)
                    .map_err(|e| bad(at, e.to_string()))?;
                views.push(ViewExport { name, view });
            }
            "_format" => {
                format = Some(match text {
                    Some("ndjson" | "application/x-ndjson" | "application/ndjson") => "ndjson",
                    Some("csv" | "text/csv") => "csv",
                    Some("parquet" | "application/vnd.apache.parquet") => "parquet",
                    _ => return Err(bad(at, "_format: expected ndjson, csv or parquet".into())),
                })
            }
            "patient" => {
                let reference = parameter["valueReference"]["reference"].as_str().or(text);
                let id = reference.map(|r| r.strip_prefix("Patient/").unwrap_or(r).to_string());
                patients.push(id.ok_or_else(|| bad(at, "patient: expected Patient/<id>".into()))?);
                restricted = true;
            }
            "group" => {
                let reference = parameter["valueReference"]["reference"].as_str().or(text);
                let id = reference
                    .map(|r| r.strip_prefix("Group/").unwrap_or(r).to_string())
                    .ok_or_else(|| bad(at.clone(), "group: expected Group/<id>".into()))?;
                patients.extend(super::views::group_members(&state, &id).await?);
                restricted = true;
            }
            "_since" => {
                let instant = text
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .ok_or_else(|| bad(at, "_since: expected an instant like 2024-01-01T00:00:00Z".into()))?;
                since = Some(instant.with_timezone(&Utc));
            }
            "clientTrackingId" => {}
            other => {
                return Err(bad(
                    at,
                    format!("'{other}' is not supported (supported: view, _format, patient, group, _since, clientTrackingId)"),
                ))
            }
        }
    }
    if views.is_empty() {
        return Err(ApiError::bad_request("give at least one 'view' parameter"));
    }
    let spec = ExportSpec {
        level: Level::System,
        types: Vec::new(),
        since,
        transaction_time: Utc::now(),
        request: ctx.url("$viewdefinition-export"),
        patients: restricted.then_some(patients),
        filters: Default::default(),
        warnings: Vec::new(),
        until: None,
        elements: Default::default(),
        by_patient: false,
        include_history: false,
        partial_manifests: false,
        views,
        view_format: Some(format.unwrap_or("ndjson").to_string()),
        position: None,
    };
    let id = state
        .background
        .exports
        .start(spec, &subject.name())
        .await?;
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "exportId", "valueString": id},
        {"name": "status", "valueCode": "accepted"},
    ]});
    let mut response = ctx.reply(StatusCode::ACCEPTED, &body);
    set_header(
        &mut response,
        header::CONTENT_LOCATION,
        &ctx.url(&format!("$export-status/{id}")),
    );
    Ok(response)
}

/// A `view` parameter's ViewDefinition: its `viewResource` part, or the stored one its
/// `viewReference` names.
async fn resolve_view(state: &AppState, parameter: &Value, at: &str) -> Result<Value, ApiError> {
    let parts = parameter["part"].as_array().cloned().unwrap_or_default();
    let part = |name: &str| parts.iter().find(|p| p["name"] == name).cloned();
    if let Some(resource) = part("viewResource").map(|p| p["resource"].clone()) {
        return Ok(resource);
    }
    let reference = part("viewReference")
        .and_then(|p| {
            p["valueReference"]["reference"]
                .as_str()
                .map(str::to_string)
        })
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{at}: a view needs a viewResource or a viewReference part"
            ))
            .with_expression(at.to_string())
        })?;
    let id = reference
        .strip_prefix("ViewDefinition/")
        .unwrap_or(&reference);
    let rt = ResourceType::parse("ViewDefinition").expect("a fhirbox type");
    Ok(crate::crud::read(&state.store, rt, id).await?.to_native())
}
