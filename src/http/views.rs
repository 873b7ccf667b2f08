//! `$viewdefinition-run` (and `$run`, the reference product's name) on `ViewDefinition`:
//!
//! - type level, `POST /fhir/ViewDefinition/$viewdefinition-run` with a `Parameters` body
//!   holding `viewResource` (the view itself) or `viewReference` (`ViewDefinition/<id>`);
//! - instance level, `GET|POST /fhir/ViewDefinition/<id>/$viewdefinition-run`.
//!
//! Parameters (query string or `Parameters` body): `_format` (`csv`, `ndjson`, `json`;
//! default `json`), `header` (CSV header row, default true), `patient` and `group` (only
//! those patients' compartment), `_since` (changed after), `_limit` (at most that many rows).
//! The same routes answer without `/fhir`.

use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use axum::Extension;
use serde_json::Value;

use super::body::{form_urlencoded_pairs, streamed, MaybeDocument};
use super::error::ApiError;
use super::AppState;
use crate::auth::Subject;
use crate::bulk::params::parse_bool;
use crate::bulk::report::{reporting, Outcome, Report};
use crate::bulk::stream::holding;
use crate::resource_type::ResourceType;
use crate::views::run::{run as start, RunRequest, ViewFormat};
use crate::views::sql::Rows;

/// The view to run: given in the request, or stored.
enum Source {
    Inline(Value),
    Stored(String),
}

pub async fn run_type(
    state: State<AppState>,
    subject: Extension<Subject>,
    Path(type_name): Path<String>,
    query: RawQuery,
    body: MaybeDocument,
) -> Result<Response, ApiError> {
    run(state, subject, type_name, None, query, body).await
}

pub async fn run_instance(
    state: State<AppState>,
    subject: Extension<Subject>,
    Path((type_name, id)): Path<(String, String)>,
    query: RawQuery,
    body: MaybeDocument,
) -> Result<Response, ApiError> {
    run(state, subject, type_name, Some(id), query, body).await
}

async fn run(
    State(state): State<AppState>,
    Extension(subject): Extension<Subject>,
    type_name: String,
    id: Option<String>,
    RawQuery(query): RawQuery,
    MaybeDocument(body): MaybeDocument,
) -> Result<Response, ApiError> {
    if type_name != "ViewDefinition" {
        return Err(ApiError::not_found(format!(
            "$viewdefinition-run is an operation of ViewDefinition, not of {type_name}"
        )));
    }
    let mut params = Params::default();
    for (name, value) in form_urlencoded_pairs(query.as_deref().unwrap_or_default()) {
        params.set(&name, Value::String(value))?;
    }
    if let Some(body) = body {
        params.read_body(body)?;
    }
    let source = match (id, params.view.take(), params.reference.take()) {
        (Some(id), None, None) => Source::Stored(id),
        (None, Some(view), None) => Source::Inline(view),
        (None, None, Some(reference)) => Source::Stored(reference),
        (None, None, None) => {
            return Err(ApiError::bad_request(
                "which view? give viewResource or viewReference, or run a stored one at ViewDefinition/<id>/$viewdefinition-run",
            ))
        }
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one view: an instance URL, viewResource or viewReference",
            ))
        }
    };
    let view = match source {
        Source::Inline(view) => view,
        Source::Stored(id) => {
            let rt = ResourceType::parse("ViewDefinition").expect("a fhirbox type");
            let stored = crate::crud::read(&state.store, rt, &id).await?;
            stored.to_native()
        }
    };
    // `patient` or `group` restrict (a Group without members: to nobody).
    let restricted = !params.patients.is_empty() || params.group.is_some();
    let mut patients = params.patients;
    if let Some(group) = &params.group {
        patients.extend(group_members(&state, group).await?);
    }
    let request = RunRequest {
        view,
        format: params.format.unwrap_or(ViewFormat::Json),
        header: params.header.unwrap_or(true),
        rows: Rows {
            patients: restricted.then_some(patients),
            since: params.since,
            limit: params.limit,
        },
        row_groups: state.settings.parquet,
        limits: state.settings.views,
        bounds: state.settings.view_output,
    };
    let format = request.format;
    let permit = state.bulk.start(&subject.name())?;
    let pools = state.readers.now("$viewdefinition-run").await?;
    let reader = match subject {
        Subject::Root => &pools.sql_admin,
        Subject::Client(_) => &pools.sql_reader,
    };
    let converter = state.formats.converter().await?;
    let report = Report::start("$viewdefinition-run", "view", subject.name(), "out");
    let body = match start(
        reader,
        &converter,
        request,
        &state.settings.sql_limits,
        &report,
    )
    .await
    {
        Ok(body) => body,
        Err(error) => {
            report.finish(Outcome::Failed, Some(&error.to_string()));
            return Err(error.into());
        }
    };
    let body = holding(reporting(body, report), permit);
    Ok(streamed(body, format.content_type(), false))
}

/// The active Patient members of a Group (404 when there is no such Group).
pub(super) async fn group_members(state: &AppState, id: &str) -> Result<Vec<String>, ApiError> {
    crate::store::export::group_members(&state.store, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Group/{id} is not known")))
}

#[derive(Default)]
struct Params {
    view: Option<Value>,
    reference: Option<String>,
    format: Option<ViewFormat>,
    header: Option<bool>,
    patients: Vec<String>,
    group: Option<String>,
    since: Option<String>,
    limit: Option<u64>,
}

/// A Reference's id for a type: `Type/id` (FHIR) or `{resourceType, id}` (native), or a bare id.
fn reference_id(value: &Value, type_name: &str) -> Option<String> {
    match value {
        Value::String(text) => Some(
            text.strip_prefix(&format!("{type_name}/"))
                .unwrap_or(text)
                .to_string(),
        ),
        Value::Object(map) => match (map.get("reference"), map.get("id")) {
            (Some(reference), _) => reference_id(reference, type_name),
            (None, Some(Value::String(id))) => Some(id.clone()),
            _ => None,
        },
        _ => None,
    }
}

impl Params {
    fn set(&mut self, name: &str, value: Value) -> Result<(), ApiError> {
        let invalid = |what: &str| {
            ApiError::bad_request(format!("invalid {name}: {what}"))
                .with_expression(name.to_string())
        };
        let text = || value.as_str().map(str::to_string);
        match name {
            "_format" => {
                self.format = Some(
                    text()
                        .as_deref()
                        .and_then(ViewFormat::parse)
                        .ok_or_else(|| invalid("expected csv, ndjson, json, parquet or sql"))?,
                )
            }
            "header" => {
                self.header = Some(match &value {
                    Value::Bool(b) => *b,
                    Value::String(s) => parse_bool(s).ok_or_else(|| invalid("expected true or false"))?,
                    _ => return Err(invalid("expected true or false")),
                })
            }
            "viewResource" => self.view = Some(value),
            "viewReference" => {
                self.reference = Some(
                    reference_id(&value, "ViewDefinition")
                        .ok_or_else(|| invalid("expected ViewDefinition/<id>"))?,
                )
            }
            "patient" => {
                for part in text().unwrap_or_default().split(',').filter(|p| !p.is_empty()) {
                    self.patients.push(reference_id(&Value::String(part.into()), "Patient").unwrap_or_default());
                }
                if let Value::Object(_) = value {
                    self.patients.push(reference_id(&value, "Patient").ok_or_else(|| invalid("expected Patient/<id>"))?);
                }
            }
            "group" => {
                self.group = Some(reference_id(&value, "Group").ok_or_else(|| invalid("expected Group/<id>"))?)
            }
            "_since" => {
                let since = text().ok_or_else(|| invalid("expected an instant"))?;
                chrono::DateTime::parse_from_rfc3339(&since)
                    .map_err(|_| invalid("expected an instant like 2024-01-01T00:00:00Z"))?;
                self.since = Some(since)
            }
            "_limit" => {
                let limit = match &value {
                    Value::Number(n) => n.as_u64(),
                    Value::String(s) => s.parse().ok(),
                    _ => None,
                };
                self.limit = Some(limit.ok_or_else(|| invalid("expected a whole number"))?)
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter '{other}' (supported: viewResource, viewReference, _format, header, patient, group, _since, _limit)"
                ))
                .with_expression(other.to_string()))
            }
        }
        Ok(())
    }

    /// A `Parameters` resource: each `parameter` by its `value[x]` or `resource`.
    fn read_body(&mut self, body: Value) -> Result<(), ApiError> {
        if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
            return Err(ApiError::bad_request(
                "the body must be a Parameters resource (viewResource, _format, ...)",
            ));
        }
        let parameters = body
            .get("parameter")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for (index, parameter) in parameters.into_iter().enumerate() {
            let Value::Object(mut parameter) = parameter else {
                return Err(ApiError::bad_request(format!(
                    "parameter[{index}] must be an object"
                )));
            };
            let name = parameter
                .remove("name")
                .and_then(|n| n.as_str().map(str::to_string))
                .ok_or_else(|| ApiError::bad_request(format!("parameter[{index}] needs a name")))?;
            let value = parameter
                .iter()
                .find(|(key, _)| key.starts_with("value") || key.as_str() == "resource")
                .map(|(_, value)| value.clone())
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "parameter[{index}] ({name}) needs a value[x] or a resource"
                    ))
                    .with_expression(format!("parameter[{index}]"))
                })?;
            self.set(&name, value)?;
        }
        Ok(())
    }
}

/// `POST /fhir/ViewDefinition/<id>/$materialize?type=view|materialized-view|table` (or
/// `type` in a `Parameters` body; default `view`): creates or replaces `sof.<name>`.
pub async fn materialize(
    State(state): State<AppState>,
    ctx: super::context::ApiContext,
    Path((type_name, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    MaybeDocument(body): MaybeDocument,
) -> Result<Response, ApiError> {
    use crate::store::materialized::Kind;
    if type_name != "ViewDefinition" {
        return Err(ApiError::not_found(format!(
            "$materialize is an operation of ViewDefinition, not of {type_name}"
        )));
    }
    let mut kind = None;
    let mut set = |name: &str, value: Option<&str>| -> Result<(), ApiError> {
        match name {
            "type" => {
                kind = Some(value.and_then(Kind::parse).ok_or_else(|| {
                    ApiError::bad_request("invalid type: expected view, materialized-view or table")
                        .with_expression("type")
                })?);
                Ok(())
            }
            // The spec: at instance level a `view` parameter SHALL be ignored.
            "view" => Ok(()),
            other => Err(ApiError::bad_request(format!(
                "unknown parameter '{other}' (supported: type)"
            ))
            .with_expression(other.to_string())),
        }
    };
    for (name, value) in form_urlencoded_pairs(query.as_deref().unwrap_or_default()) {
        set(&name, Some(&value))?;
    }
    if let Some(body) = body {
        for parameter in body["parameter"].as_array().into_iter().flatten() {
            let name = parameter["name"].as_str().unwrap_or_default();
            let value = parameter
                .get("valueCode")
                .or_else(|| parameter.get("valueString"))
                .and_then(Value::as_str);
            set(name, value)?;
        }
    }
    let rt = ResourceType::parse("ViewDefinition").expect("a fhirbox type");
    let stored = crate::crud::read(&state.store, rt, &id).await?;
    let converter = state.formats.converter().await?;
    let done = crate::views::materialize::materialize(
        &state.store,
        converter.rules(),
        &id,
        &stored.to_native(),
        kind.unwrap_or(Kind::View),
        &crate::views::materialize::Limits {
            session: state.settings.view_session,
            compile: state.settings.views,
            output: state.settings.view_output,
        },
    )
    .await?;
    let columns: Vec<Value> = done
        .columns
        .iter()
        .map(|c| serde_json::json!({"name": "column", "valueString": c}))
        .collect();
    let mut parameter = vec![
        serde_json::json!({"name": "relation", "valueString": done.relation}),
        serde_json::json!({"name": "type", "valueCode": done.kind.as_str()}),
    ];
    parameter.extend(columns);
    let body = serde_json::json!({"resourceType": "Parameters", "parameter": parameter});
    Ok(ctx.reply(axum::http::StatusCode::OK, &body))
}
