//! `POST /$import` and `POST /fhir/$import` (the reference product's body: `id`, `inputFormat`,
//! `contentEncoding`, `mode`, `update`, `inputs: [{resourceType, url}]`): 202 Accepted with
//! `Content-Location: /BulkImportStatus/<id>` and the status. `GET /BulkImportStatus/<id>` reads
//! the status; `DELETE` cancels the job.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::{Map, Value};

use super::body::set_header;
use super::body::{reply, Document, Negotiated};
use super::context::ApiContext;
use super::error::ApiError;
use super::AppState;
use crate::auth::Subject;
use crate::bulk::import::{Deleted, ImportRequest};
use crate::bulk::prepare::own_type_refusal;
use crate::crud;
use crate::format::Api;
use crate::resource_type::ResourceType;

pub async fn start(
    State(state): State<AppState>,
    Extension(api): Extension<Api>,
    Extension(subject): Extension<Subject>,
    ctx: ApiContext,
    negotiated: Negotiated,
    Document(body): Document,
) -> Result<Response, ApiError> {
    let request = parse(body, api == Api::Fhir, matches!(subject, Subject::Root))?;
    let (id, status) = state
        .background
        .imports
        .start(request, &subject.name())
        .await?;
    let mut response = reply(
        negotiated,
        Api::Native,
        StatusCode::ACCEPTED,
        &status_with_id(status, &id),
    );
    // Absolute, like $export's; the status is a native resource, at the native base.
    set_header(
        &mut response,
        header::CONTENT_LOCATION,
        &ctx.native_url(&format!("BulkImportStatus/{id}")),
    );
    Ok(response)
}

/// The stored status is the resource; answer it in its native form.
pub async fn status(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ctx: ApiContext,
) -> Result<Response, ApiError> {
    let rt = status_type();
    let found = crud::read(&state.store, rt, &id).await?;
    Ok(ctx.resource_reply(StatusCode::OK, &found))
}

/// `DELETE`: cancels a running job (200 with its status), removes one that ended (204).
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    negotiated: Negotiated,
) -> Result<Response, ApiError> {
    match state.background.imports.delete(&id).await? {
        Deleted::Cancelled(status) => Ok(reply(
            negotiated,
            Api::Native,
            StatusCode::OK,
            &status_with_id(status, &id),
        )),
        Deleted::Removed => Ok(StatusCode::NO_CONTENT.into_response()),
        Deleted::Missing => Err(no_import(&id)),
    }
}

/// What an import's routes answer for a job that does not exist.
pub(super) fn no_import(id: &str) -> ApiError {
    ApiError::not_found(format!("BulkImportStatus/{id} not found"))
}

fn status_type() -> ResourceType {
    ResourceType::parse("BulkImportStatus").expect("a fhirbox type")
}

fn status_with_id(status: Value, id: &str) -> Value {
    let mut document = Map::new();
    document.insert("resourceType".into(), "BulkImportStatus".into());
    document.insert("id".into(), id.into());
    if let Value::Object(rest) = status {
        document.extend(rest);
    }
    Value::Object(document)
}

/// Checks the body: what the reference product takes, and nothing else.
fn parse(body: Value, fhir: bool, root: bool) -> Result<ImportRequest, ApiError> {
    let Value::Object(body) = body else {
        return Err(ApiError::bad_request(
            "the $import body must be an object with inputs",
        ));
    };
    let invalid =
        |field: &str, message: String| ApiError::bad_request(message).with_expression(field);
    let mut request = ImportRequest {
        id: None,
        fhir,
        keep_history: false,
        inputs: Vec::new(),
        echo: Map::new(),
    };
    for (name, value) in body {
        match name.as_str() {
            "id" => match value {
                Value::String(id) => request.id = Some(id),
                _ => return Err(invalid("id", "id must be a string".into())),
            },
            "inputFormat" => match value.as_str() {
                Some("application/fhir+ndjson" | "application/ndjson" | "ndjson") => {
                    request.echo.insert(name, value);
                }
                _ => return Err(invalid("inputFormat", format!("unsupported inputFormat {value}: use application/fhir+ndjson"))),
            },
            "contentEncoding" => match value.as_str() {
                // gzip is detected from the content either way; the field is kept for the status.
                Some("gzip" | "plain") => {
                    request.echo.insert(name, value);
                }
                _ => return Err(invalid("contentEncoding", format!("contentEncoding must be gzip or plain, not {value}"))),
            },
            "mode" => match value.as_str() {
                Some("bulk") => {
                    request.echo.insert(name, value);
                }
                // Versions keep their numbers and times, deletions included: it rewrites
                // history, so it is root's (docs/bulk-data.md).
                Some("migration") if root => {
                    request.echo.insert(name, value);
                }
                Some("migration") => {
                    return Err(ApiError::new(
                        axum::http::StatusCode::FORBIDDEN,
                        "forbidden",
                        "mode migration keeps the versions and times of another store, deletions included: only root may import so",
                    )
                    .with_expression("mode"))
                }
                _ => return Err(invalid("mode", format!("mode must be bulk (each input loaded on its own) or migration (versions kept as they are), not {value}"))),
            },
            "update" => match value {
                Value::Bool(update) => request.keep_history = update,
                _ => return Err(invalid("update", "update must be true or false".into())),
            },
            "inputs" => {
                let Value::Array(inputs) = value else {
                    return Err(invalid("inputs", "inputs must be a list of {resourceType, url}".into()));
                };
                for (index, input) in inputs.into_iter().enumerate() {
                    let field = |key: &str| input.get(key).and_then(Value::as_str).map(str::to_string);
                    // A bucket prefix without a type: every object under it named after a
                    // type, the way bulk exports are laid out.
                    if let (None, Some(url)) = (field("resourceType"), field("url")) {
                        if url.starts_with("s3://") && url.ends_with('/') {
                            request.inputs.push((None, url));
                            continue;
                        }
                    }
                    let (Some(rt), Some(url)) = (field("resourceType"), field("url")) else {
                        return Err(invalid(&format!("inputs[{index}]"), format!("inputs[{index}] needs resourceType and url (or a url s3://BUCKET/PREFIX/ alone)")));
                    };
                    let resource_type = ResourceType::parse(&rt)
                        .ok_or_else(|| invalid(&format!("inputs[{index}].resourceType"), format!("unknown resourceType '{rt}'")))?;
                    if let Some(refusal) = own_type_refusal(resource_type, root) {
                        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", refusal)
                            .with_expression(format!("inputs[{index}].resourceType")));
                    }
                    request.inputs.push((Some(resource_type), url));
                }
            }
            other => {
                return Err(invalid(
                    other,
                    format!("unknown field '{other}' (supported: id, inputFormat, contentEncoding, mode, update, inputs)"),
                ))
            }
        }
    }
    if request.inputs.is_empty() {
        return Err(invalid(
            "inputs",
            "an import needs at least one input".into(),
        ));
    }
    Ok(request)
}
