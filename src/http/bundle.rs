//! `PUT /` (a list of resources, native API only) and `POST /` / `POST /fhir` (Bundles).

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use super::access::{entry_object, Asked, Granted};
use super::body::Document;
use super::context::{etag, status_line, version_path, ApiContext};
use super::error::ApiError;
use super::search::conditional_filter;
use super::AppState;
use crate::auth::access::{Ask, Denied};
use crate::auth::Subject;
use crate::bundle::{self, Inbound};
use crate::crud;
use crate::format::{Api, FormatError};
use crate::resource::format_instant;
use crate::resource_type::ResourceType;

/// `PUT /`: upserts every resource of the list, all or nothing; answers with the stored list.
/// Each element is authorized as the `PUT /[type]/[id]` it stands for; one refused element
/// refuses the list.
pub async fn put_list(
    State(state): State<AppState>,
    ctx: ApiContext,
    who: Who,
    Document(list): Document,
) -> Result<Response, ApiError> {
    if let Value::Array(items) = &list {
        for (index, item) in items.iter().enumerate() {
            let text = |key: &str| item.get(key).and_then(Value::as_str);
            let (Some(rt), Some(id)) = (
                text("resourceType").and_then(ResourceType::parse),
                text("id"),
            ) else {
                continue; // refused by upsert_all, naming the element
            };
            if let Some(why) = who.refusal(&state, &ctx, "PUT", rt, Some(id), item).await? {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!("entry {index}: {why}"),
                ));
            }
        }
    }
    let stored = bundle::upsert_all(&state.store, list).await?;
    let docs: Vec<Value> = stored.iter().map(|v| ctx.outbound(v)).collect();
    Ok(ctx.reply(StatusCode::OK, &Value::Array(docs)))
}

/// `POST /`: a transaction or batch Bundle; answers with its response Bundle. Each entry is
/// authorized as the request it stands for, sent on its own.
pub async fn post_bundle(
    State(state): State<AppState>,
    ctx: ApiContext,
    who: Who,
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
    let parsed = bundle::parse(bundle)?;
    let mut facts = Vec::with_capacity(parsed.entries.len());
    for entry in &parsed.entries {
        let Some(request) = bundle::entry_request(entry) else {
            facts.push(bundle::Facts::default());
            continue;
        };
        let body = entry.resource.as_ref().unwrap_or(&Value::Null);
        let refused = who
            .refusal(
                &state,
                &ctx,
                request.method,
                request.rt,
                request.id.as_deref(),
                body,
            )
            .await?;
        // A conditional entry also searches: authorized and compiled as that search.
        let search = match (&refused, &request.search) {
            (None, Some(query)) => {
                match conditional_filter(&state, &ctx, &who, request.rt, query).await {
                    Ok(filter) => Some(Ok(filter)),
                    Err(error) if error.status == StatusCode::FORBIDDEN => {
                        facts.push(bundle::Facts {
                            refused: Some(error.message),
                            search: None,
                        });
                        continue;
                    }
                    Err(error) => Some(Err(crud::CrudError::invalid(error.message))),
                }
            }
            _ => None,
        };
        facts.push(bundle::Facts { refused, search });
    }
    let (kind, results) = bundle::process(&state.store, parsed, inbound, facts).await?;
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

/// Who sends a Bundle: the subject, its token's scopes, and (for a Client) the Bundle
/// request's own facts, from which each entry's request object is made.
pub struct Who {
    subject: Subject,
    scopes: Option<Granted>,
    asked: Option<Asked>,
}

impl<S: Send + Sync> FromRequestParts<S> for Who {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Who, ApiError> {
        let subject = parts.extensions.get::<Subject>().cloned().ok_or_else(|| {
            ApiError::internal("no subject", "a Bundle reached its handler unauthenticated")
        })?;
        Ok(Who {
            subject,
            scopes: parts.extensions.get::<Granted>().cloned(),
            asked: parts.extensions.get::<Asked>().cloned(),
        })
    }
}

impl Who {
    /// Why the entry `method [type]/[id]` (with `body` as sent) may not run, if it may not:
    /// [`crate::auth::Authenticator::authorize`], exactly as for the request on its own.
    pub(super) async fn refusal(
        &self,
        state: &AppState,
        ctx: &ApiContext,
        method: &str,
        rt: ResourceType,
        id: Option<&str>,
        body: &Value,
    ) -> Result<Option<String>, ApiError> {
        if matches!(self.subject, Subject::Root) {
            return Ok(None);
        }
        let Some(Asked(bundle)) = &self.asked else {
            return Ok(Some("entries cannot be authorized".into()));
        };
        let relative = match id {
            Some(id) => format!("{rt}/{id}"),
            None => rt.to_string(),
        };
        let prefix = if ctx.api == Api::Fhir { "/fhir/" } else { "/" };
        let path = format!("{prefix}{relative}");
        let mut params = serde_json::Map::new();
        params.insert("resource/type".into(), rt.name().into());
        if let Some(id) = id {
            params.insert("resource/id".into(), id.into());
        }
        let object = entry_object(bundle, method, &path, params, body.clone());
        let ask = Ask {
            method,
            route: if id.is_some() {
                "/{type}/{id}"
            } else {
                "/{type}"
            },
            object: &object,
            job: None,
        };
        let scopes = self.scopes.as_ref().map(|Granted(scopes)| scopes);
        match state
            .auth
            .authorize(&state.store, &self.subject, scopes, &ask)
            .await
        {
            Ok(()) => Ok(None),
            Err(Denied::Store(error)) => Err(error.into()),
            Err(denied) => Ok(Some(denied.to_string())),
        }
    }
}
