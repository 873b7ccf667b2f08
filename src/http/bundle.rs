//! `PUT /` (a list of resources, native API only) and `POST /` / `POST /fhir` (Bundles).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use super::body::Document;
use super::context::{etag, status_line, version_path, ApiContext};
use super::error::ApiError;
use super::AppState;
use crate::bundle::{self, Inbound};
use crate::format::{Api, FormatError};
use crate::resource::format_instant;

/// `PUT /`: upserts every resource of the list, all or nothing; answers with the stored list.
pub async fn put_list(
    State(state): State<AppState>,
    ctx: ApiContext,
    Document(list): Document,
) -> Result<Response, ApiError> {
    let stored = bundle::upsert_all(&state.store, list).await?;
    let docs: Vec<Value> = stored.iter().map(|v| ctx.outbound(v)).collect();
    Ok(ctx.reply(StatusCode::OK, &Value::Array(docs)))
}

/// `POST /`: a transaction or batch Bundle; answers with its response Bundle.
pub async fn post_bundle(
    State(state): State<AppState>,
    ctx: ApiContext,
    Document(bundle): Document,
) -> Result<Response, ApiError> {
    let to_native = |doc: Value| -> Result<Value, FormatError> {
        match ctx.converter() {
            Some(converter) => converter.to_native(doc),
            None => Ok(doc),
        }
    };
    let inbound = Inbound {
        to_native: &to_native,
        keep_post_ids: ctx.api == Api::Native,
    };
    let (kind, results) = bundle::process(&state.store, bundle, inbound).await?;
    let entries: Vec<Value> = results
        .into_iter()
        .enumerate()
        .map(|(index, result)| match result {
            Ok(done) => {
                let mut response = json!({"status": status_line(done.status)});
                let mut entry = json!({});
                if let Some(version) = &done.resource {
                    response["location"] = ctx.url(&version_path(version)).into();
                    response["etag"] = etag(version).into();
                    response["lastModified"] = format_instant(&version.ts).into();
                    entry["resource"] = ctx.outbound(version);
                }
                entry["response"] = response;
                entry
            }
            Err(error) => {
                let error = ApiError::from(error);
                if error.status.is_server_error() {
                    // The answer is a 200: this is the one place that sees the failure.
                    tracing::error!(entry = index, cause = error.cause(), "a batch entry failed");
                }
                json!({"response": {"status": status_line(error.status), "outcome": error.outcome()}})
            }
        })
        .collect();
    let response = json!({
        "resourceType": "Bundle",
        "type": kind.response_type(),
        "entry": entries,
    });
    Ok(ctx.reply(StatusCode::OK, &response))
}
