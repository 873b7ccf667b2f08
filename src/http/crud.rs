//! `POST /[type]`, `GET|PUT|DELETE /[type]/[id]`, `GET /[type]/[id]/_history[/[vid]]`, and
//! the conditional `POST` (`If-None-Exist`), `PUT /[type]?` and `DELETE /[type]?`, in both
//! APIs. Parse, call [`crate::crud`], answer. A conditional write's search is authorized as
//! that search on its own would be, besides the write itself.

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::body::set_header;
use super::body::Document;
use super::bundle::Who;
use super::context::{etag, status_line, version_path, ApiContext};
use super::error::ApiError;
use super::search::conditional_filter;
use super::AppState;
use crate::crud::{self, conditional, Deleted};
use crate::format::Api;
use crate::resource::{format_instant, StoredResource};

/// Most versions one `_history` answer lists.
const HISTORY_LIMIT: i64 = 1000;

/// `POST /[type]`; with `If-None-Exist: [search]`, only if the search finds nothing (200
/// with the one it finds; 412 if it finds several).
pub async fn create(
    State(state): State<AppState>,
    Path(type_name): Path<String>,
    headers: HeaderMap,
    ctx: ApiContext,
    who: Who,
    Document(doc): Document,
) -> Result<Response, ApiError> {
    let rt = crud::resource_type(&type_name)?;
    let checked = crud::check(ctx.inbound(doc)?, Some(rt), None)?;
    // The native API keeps an id given in the body (as the seeds do); FHIR ignores it.
    let keep_id = ctx.api == Api::Native;
    let (version, created) = match headers.get("if-none-exist") {
        None => (crud::create(&state.store, checked, keep_id).await?, true),
        Some(query) => {
            let query = query.to_str().map_err(|_| {
                ApiError::bad_request("If-None-Exist is not text").with_expression("If-None-Exist")
            })?;
            let query = query.split_once('?').map_or(query, |(_, q)| q);
            let filter = conditional_filter(&state, &ctx, &who, rt, query).await?;
            conditional::create_unless(&state.store, checked, keep_id, &filter).await?
        }
    };
    Ok(written(&ctx, version, created))
}

/// 201 with `Location` for a created resource, else 200.
fn written(ctx: &ApiContext, version: StoredResource, created: bool) -> Response {
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut response = ctx.resource_reply(status, &version);
    if created {
        set_header(
            &mut response,
            header::LOCATION,
            &ctx.url(&version_path(&version)),
        );
    }
    response
}

/// `PUT /[type]?[search]`: updates the one resource the search finds, or creates one.
pub async fn update_where(
    State(state): State<AppState>,
    Path(type_name): Path<String>,
    RawQuery(query): RawQuery,
    ctx: ApiContext,
    who: Who,
    Document(doc): Document,
) -> Result<Response, ApiError> {
    let rt = crud::resource_type(&type_name)?;
    let filter = conditional_filter(&state, &ctx, &who, rt, query.as_deref().unwrap_or("")).await?;
    let doc = ctx.inbound(doc)?;
    let id = doc.get("id").and_then(Value::as_str).map(str::to_string);
    let checked = crud::check(doc, Some(rt), id.as_deref())?;
    let (version, created) = conditional::update_where(&state.store, checked, &filter).await?;
    Ok(written(&ctx, version, created))
}

/// `DELETE /[type]?[search]`: deletes the one resource the search finds (204 when none).
pub async fn delete_where(
    State(state): State<AppState>,
    Path(type_name): Path<String>,
    RawQuery(query): RawQuery,
    ctx: ApiContext,
    who: Who,
) -> Result<Response, ApiError> {
    let rt = crud::resource_type(&type_name)?;
    let filter = conditional_filter(&state, &ctx, &who, rt, query.as_deref().unwrap_or("")).await?;
    match conditional::delete_where(&state.store, rt, &filter).await? {
        Some(Deleted::Now(version)) => Ok(ctx.resource_reply(StatusCode::OK, &version)),
        Some(Deleted::Already) | None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

pub async fn read(
    State(state): State<AppState>,
    Path((type_name, id)): Path<(String, String)>,
    ctx: ApiContext,
) -> Result<Response, ApiError> {
    let rt = crud::resource_type(&type_name)?;
    let found = crud::read(&state.store, rt, &id).await?;
    Ok(ctx.resource_reply(StatusCode::OK, &found))
}

pub async fn update(
    State(state): State<AppState>,
    Path((type_name, id)): Path<(String, String)>,
    ctx: ApiContext,
    Document(doc): Document,
) -> Result<Response, ApiError> {
    let rt = crud::resource_type(&type_name)?;
    let checked = crud::check(ctx.inbound(doc)?, Some(rt), Some(&id))?;
    let (version, created) = crud::update(&state.store, checked, &id).await?;
    Ok(written(&ctx, version, created))
}

/// 200 with the resource as it was; 204 if it was already deleted; 404 if it never existed.
pub async fn delete(
    State(state): State<AppState>,
    Path((type_name, id)): Path<(String, String)>,
    ctx: ApiContext,
) -> Result<Response, ApiError> {
    let rt = crud::resource_type(&type_name)?;
    match crud::delete(&state.store, rt, &id).await? {
        Deleted::Now(version) => Ok(ctx.resource_reply(StatusCode::OK, &version)),
        Deleted::Already => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// A `history` Bundle, newest version first.
pub async fn history(
    State(state): State<AppState>,
    Path((type_name, id)): Path<(String, String)>,
    ctx: ApiContext,
) -> Result<Response, ApiError> {
    let rt = crud::resource_type(&type_name)?;
    let versions = crud::history(&state.store, rt, &id, HISTORY_LIMIT).await?;
    let entries: Vec<Value> = versions.iter().map(|v| history_entry(&ctx, v)).collect();
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "history",
        "total": entries.len(),
        "entry": entries,
    });
    Ok(ctx.reply(StatusCode::OK, &bundle))
}

fn history_entry(ctx: &ApiContext, version: &StoredResource) -> Value {
    let path = format!("{}/{}", version.resource_type, version.id);
    let (method, status) = match version.status.as_str() {
        "deleted" => ("DELETE", StatusCode::OK),
        "updated" => ("PUT", StatusCode::OK),
        _ => ("POST", StatusCode::CREATED),
    };
    let mut entry = json!({
        "fullUrl": ctx.url(&path),
        "request": {"method": method, "url": path},
        "response": {
            "status": status_line(status),
            "etag": etag(version),
            "lastModified": format_instant(&version.ts),
        },
    });
    if !version.is_deleted() {
        entry["resource"] = ctx.outbound(version);
    }
    entry
}

pub async fn vread(
    State(state): State<AppState>,
    Path((type_name, id, version_id)): Path<(String, String, String)>,
    ctx: ApiContext,
) -> Result<Response, ApiError> {
    let rt = crud::resource_type(&type_name)?;
    let version = crud::vread(&state.store, rt, &id, &version_id).await?;
    Ok(ctx.resource_reply(StatusCode::OK, &version))
}
