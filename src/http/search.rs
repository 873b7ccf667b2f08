//! `GET /[type]`: a `searchset` Bundle of the type's current resources, ordered by id, in
//! pages of `_count` (default [`DEFAULT_COUNT`], at most [`MAX_COUNT`]) with a `next` link.
//!
//! Paging is by key (`_cursor` = the last id of the previous page), so a page never repeats or
//! skips a resource because others were written meanwhile, and a deep page costs what the first
//! does. No search parameters are supported yet: any other parameter is answered with 400
//! (rather than silently ignored, which would return unfiltered data), unless the client sends
//! `Prefer: handling=lenient`, in which case unknown parameters are ignored as FHIR allows.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::body::form_urlencoded_pairs;
use super::context::ApiContext;
use super::error::ApiError;
use super::AppState;
use crate::crud;

const DEFAULT_COUNT: i64 = 100;
const MAX_COUNT: i64 = 1000;

/// Parameters that control the answer rather than filter it.
const CONTROL_PARAMETERS: &[&str] = &["_count", "_cursor", "_format", "_pretty"];

pub async fn search(
    State(state): State<AppState>,
    Path(type_name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ctx: ApiContext,
) -> Result<Response, ApiError> {
    let rt = crud::resource_type(&type_name)?;
    let params = form_urlencoded_pairs(query.as_deref().unwrap_or_default());
    let lenient = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("handling=lenient"));
    if !lenient {
        if let Some((name, _)) = params
            .iter()
            .find(|(name, _)| !CONTROL_PARAMETERS.contains(&name.as_str()))
        {
            return Err(ApiError::bad_request(format!(
                "search parameter '{name}' is not supported yet (supported: _count, _cursor); \
                 send 'Prefer: handling=lenient' to ignore unsupported parameters"
            ))
            .with_expression(name.clone()));
        }
    }
    let param = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let count = match param("_count") {
        None => DEFAULT_COUNT,
        Some(text) => match text.parse::<i64>() {
            Ok(n) if (0..=MAX_COUNT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "_count must be a whole number from 0 to {MAX_COUNT}, not '{text}'"
                ))
                .with_expression("_count"))
            }
        },
    };
    let after = param("_cursor");
    let (page, more) = crud::page(&state.store, rt, after, count).await?;
    let self_url = page_url(&ctx, &type_name, count, after);
    let mut links = vec![json!({"relation": "self", "url": self_url})];
    if let (true, Some(last)) = (more, page.last()) {
        links.push(
            json!({"relation": "next", "url": page_url(&ctx, &type_name, count, Some(&last.id))}),
        );
    }
    let entries: Vec<Value> = page
        .iter()
        .map(|found| {
            json!({
                "fullUrl": ctx.url(&format!("{}/{}", found.resource_type, found.id)),
                "resource": ctx.outbound(found),
                "search": {"mode": "match"},
            })
        })
        .collect();
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": entries,
    });
    Ok(ctx.reply(StatusCode::OK, &bundle))
}

fn page_url(ctx: &ApiContext, type_name: &str, count: i64, after: Option<&str>) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("_count", &count.to_string());
    if let Some(after) = after {
        query.append_pair("_cursor", after);
    }
    ctx.url(&format!("{type_name}?{}", query.finish()))
}
