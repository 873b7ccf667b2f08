//! `POST /[type]`, `GET|PUT|DELETE /[type]/[id]`, `GET /[type]/[id]/_history[/[vid]]`, in
//! both APIs. Parse, call [`crate::crud`], answer.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::body::set_header;
use super::body::Document;
use super::context::{etag, status_line, version_path, ApiContext};
use super::error::ApiError;
use super::AppState;
use crate::crud::{self, Deleted};
use crate::format::Api;
use crate::resource::{format_instant, StoredResource};

/// Most versions one `_history` answer lists.
const HISTORY_LIMIT: i64 = 1000;

pub async fn create(
    State(state): State<AppState>,
    Path(type_name): Path<String>,
    ctx: ApiContext,
    Document(doc): Document,
) -> Result<Response, ApiError> {
    let rt = crud::resource_type(&type_name)?;
    let checked = crud::check(ctx.inbound(doc)?, Some(rt), None)?;
    // The native API keeps an id given in the body (as the seeds do); FHIR ignores it.
    let created = crud::create(&state.store, checked, ctx.api == Api::Native).await?;
    let mut response = ctx.resource_reply(StatusCode::CREATED, &created);
    set_header(
        &mut response,
        header::LOCATION,
        &ctx.url(&version_path(&created)),
    );
    Ok(response)
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
    Ok(response)
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
