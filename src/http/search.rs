//! `GET /[type]`: a `searchset` Bundle of the type's current resources, ordered by id, in
//! pages of `_count` (default [`DEFAULT_COUNT`], at most [`MAX_COUNT`]) with a `next` link.
//!
//! Paging is by key (`_cursor` = the last id of the previous page), so a page never repeats or
//! skips a resource because others were written meanwhile, and a deep page costs what the first
//! does. Search parameters: `_id` (comma-separated ids), `_lastUpdated` (with the FHIR
//! prefixes `eq`, `gt`, `ge`, `lt`, `le`, `sa`, `eb`; repeat it for a range), and the type's
//! token parameters (`Group?identifier=system|value`, `Observation?category=laboratory`;
//! comma-separated values, at most [`MAX_TOKEN_VALUES`]; see [`crate::store::token`]). Any other
//! parameter is answered with 400 (rather than silently ignored, which would return unfiltered
//! data), unless the client sends `Prefer: handling=lenient`, in which case unknown
//! parameters are ignored as FHIR allows.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::body::{form_urlencoded_pairs, prefers};
use super::context::ApiContext;
use super::error::ApiError;
use super::AppState;
use crate::bulk::params::last_updated;
use crate::crud;
use crate::store::resources::PageFilter;
use crate::store::token::{token_param, token_params_of, Token};

const DEFAULT_COUNT: i64 = 100;
const MAX_COUNT: i64 = 1000;

/// Parameters that control the answer rather than filter it.
const CONTROL_PARAMETERS: &[&str] = &["_count", "_cursor", "_format", "_pretty"];

/// Parameters that filter, besides the type's token parameters.
const SEARCH_PARAMETERS: &[&str] = &["_id", "_lastUpdated"];

/// Values one token parameter may list.
const MAX_TOKEN_VALUES: usize = 100;

pub async fn search(
    State(state): State<AppState>,
    Path(type_name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ctx: ApiContext,
) -> Result<Response, ApiError> {
    let rt = crud::resource_type(&type_name)?;
    let params = form_urlencoded_pairs(query.as_deref().unwrap_or_default());
    if !prefers(&headers, "handling=lenient") {
        if let Some((name, _)) = params.iter().find(|(name, _)| {
            !CONTROL_PARAMETERS.contains(&name.as_str())
                && !SEARCH_PARAMETERS.contains(&name.as_str())
                && token_param(rt.name(), name).is_none()
        }) {
            let tokens: Vec<&str> = token_params_of(rt.name()).collect();
            return Err(ApiError::bad_request(format!(
                "search parameter '{name}' is not supported yet (supported: _id, _lastUpdated, \
                 _count, _cursor{}{}); send 'Prefer: handling=lenient' to ignore unsupported \
                 parameters",
                if tokens.is_empty() { "" } else { ", " },
                tokens.join(", ")
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
    let (filter, filter_params) = page_filter(rt.name(), &params)?;
    let after = param("_cursor");
    let (page, more) = crud::page(&state.store, rt, &filter, after, count).await?;
    let url = |after: Option<&str>| page_url(&ctx, &type_name, &filter_params, count, after);
    let mut links = vec![json!({"relation": "self", "url": url(after)})];
    if let (true, Some(last)) = (more, page.last()) {
        links.push(json!({"relation": "next", "url": url(Some(&last.id))}));
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

/// The `_id`, `_lastUpdated` and token conditions, and the parameters that say them (for
/// links).
fn page_filter(
    type_name: &str,
    params: &[(String, String)],
) -> Result<(PageFilter, Vec<(String, String)>), ApiError> {
    let mut filter = PageFilter::default();
    let mut said = Vec::new();
    for (name, value) in params {
        match name.as_str() {
            "_id" => {
                let ids: Vec<String> = value.split(',').map(str::to_string).collect();
                // Repeated `_id`s must all hold: keep the ids in both lists.
                filter.ids = Some(match filter.ids.take() {
                    Some(before) => before.into_iter().filter(|id| ids.contains(id)).collect(),
                    None => ids,
                });
            }
            "_lastUpdated" => {
                let (from, to) = last_updated(value).map_err(|message| {
                    ApiError::bad_request(message).with_expression("_lastUpdated")
                })?;
                if let Some(from) = from {
                    filter.updated_from = Some(filter.updated_from.map_or(from, |f| f.max(from)));
                }
                if let Some(to) = to {
                    filter.updated_before = Some(filter.updated_before.map_or(to, |t| t.min(to)));
                }
            }
            _ => {
                let Some(paths) = token_param(type_name, name) else {
                    continue;
                };
                let values: Vec<Token> = value.split(',').map(Token::parse).collect();
                if values.len() > MAX_TOKEN_VALUES {
                    return Err(ApiError::bad_request(format!(
                        "{name} lists {} values; at most {MAX_TOKEN_VALUES} are allowed",
                        values.len()
                    ))
                    .with_expression(name.clone()));
                }
                filter.tokens.push((paths, values));
            }
        }
        said.push((name.clone(), value.clone()));
    }
    Ok((filter, said))
}

fn page_url(
    ctx: &ApiContext,
    type_name: &str,
    filter_params: &[(String, String)],
    count: i64,
    after: Option<&str>,
) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (name, value) in filter_params {
        query.append_pair(name, value);
    }
    query.append_pair("_count", &count.to_string());
    if let Some(after) = after {
        query.append_pair("_cursor", after);
    }
    ctx.url(&format!("{type_name}?{}", query.finish()))
}
