//! `GET /$jobs`: the jobs the asker may follow (root: every job), newest first, for the
//! console and for scripts. Open to every signed-in subject (see [`crate::auth::access`]):
//! each job is listed only when [`crate::auth::Authenticator::authorize`] lets the asker
//! follow it at its status route, the very decision that route makes. Answers carry an
//! `ETag`; `If-None-Match` with it gives 304 while nothing changed (the console polls).

use std::hash::{Hash, Hasher};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::{json, Value};

use super::access::Granted;
use super::body::set_header;
use super::context::ApiContext;
use super::error::ApiError;
use super::AppState;
use crate::auth::access::Ask;
use crate::auth::Subject;
use crate::bulk::job_list;
use crate::store::jobs::JobKind;

pub async fn list(
    State(state): State<AppState>,
    Extension(subject): Extension<Subject>,
    granted: Option<Extension<Granted>>,
    ctx: ApiContext,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let owner = match &subject {
        Subject::Root => None,
        Subject::Client(_) => Some(subject.name()),
    };
    let scopes = granted.as_ref().map(|Extension(Granted(scopes))| scopes);
    let mut jobs = Vec::new();
    for job in job_list::newest(&state.store, owner.as_deref(), state.settings.job_list_max).await?
    {
        let (route, path) = match job.kind {
            JobKind::Import => (super::IMPORT_STATUS, super::IMPORT_STATUS.to_string()),
            JobKind::Export => (
                super::EXPORT_STATUS,
                format!("/fhir{}", super::EXPORT_STATUS),
            ),
        };
        let ask = Ask {
            method: "GET",
            route,
            object: &Value::Null,
            job: Some(&job.facts),
        };
        if state
            .auth
            .authorize(&state.store, &subject, scopes, &ask)
            .await
            .is_err()
        {
            continue;
        }
        let mut summary = job.summary;
        summary["statusUrl"] = Value::String(ctx.native_url(&path.replace("{id}", &job.id)));
        jobs.push(summary);
    }
    let body = json!({ "jobs": jobs });
    let tag = etag(&body);
    let unchanged = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.split(',').any(|one| one.trim() == tag));
    let mut response = if unchanged {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (StatusCode::OK, axum::Json(body)).into_response()
    };
    set_header(&mut response, header::ETAG, &tag);
    set_header(&mut response, header::CACHE_CONTROL, "no-cache");
    Ok(response)
}

/// A weak validator of the list's content.
fn etag(body: &Value) -> String {
    let mut hasher = std::hash::DefaultHasher::new();
    body.to_string().hash(&mut hasher);
    format!("W/\"{:016x}\"", hasher.finish())
}
