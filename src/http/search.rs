//! `GET /[type]`: a `searchset` Bundle of the type's current resources matching the search,
//! ordered by id, in pages of `_count` (default [`DEFAULT_COUNT`]; more than [`MAX_COUNT`] is
//! capped to it) with a `next` link.
//!
//! Paging is by key (`_cursor` = the last id of the previous page), so a page never repeats or
//! skips a resource because others were written meanwhile, and a deep page costs what the first
//! does. `_id` and `_lastUpdated` filter the table's own columns; every other R4 search
//! parameter of the type is compiled by [`crate::search`] to one SQL condition. A parameter
//! the type does not have is answered with 400 (rather than silently ignored, which would
//! return unfiltered data), unless the client sends `Prefer: handling=lenient`, in which case
//! it is ignored as FHIR allows; a feature fhirbox does not search yet (`_sort`,
//! `_include`) is a 400 saying so either way. Chains and `_has` are authorized type by type
//! ([`authorize_chains`]).

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::body::{form_urlencoded_pairs, prefers};
use super::bundle::Who;
use super::context::ApiContext;
use super::error::ApiError;
use super::AppState;
use crate::bulk::export::elements::Elements;
use crate::bulk::params::last_updated;
use crate::crud;
use crate::search::{self, Criterion};
use crate::store::resources::PageFilter;

const DEFAULT_COUNT: i64 = 100;
const MAX_COUNT: i64 = 1000;

/// Parameters that control the answer rather than filter it.
const CONTROL_PARAMETERS: &[&str] = &[
    "_count",
    "_cursor",
    "_format",
    "_pretty",
    "_total",
    "_summary",
    "_elements",
];

/// Parameters on the table's own columns.
const COLUMN_PARAMETERS: &[&str] = &["_id", "_lastUpdated"];

/// Result parameters and features FHIR defines that fhirbox does not apply yet: refused,
/// never ignored.
const NOT_YET: &[&str] = &[
    "_sort",
    "_include",
    "_revinclude",
    "_contained",
    "_containedType",
    "_list",
    "_text",
    "_content",
    "_query",
    "_filter",
];

/// Values (ORed) one parameter may list, and parameters one search may have.
const MAX_VALUES: usize = 100;
const MAX_CRITERIA: usize = 50;

pub async fn search(
    State(state): State<AppState>,
    Path(type_name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ctx: ApiContext,
    who: Who,
) -> Result<Response, ApiError> {
    let rt = crud::resource_type(&type_name)?;
    let params = form_urlencoded_pairs(query.as_deref().unwrap_or_default());
    authorize_chains(&state, &ctx, &who, rt, &params).await?;
    let lenient = prefers(&headers, "handling=lenient");
    let param = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let count = match param("_count") {
        None => DEFAULT_COUNT,
        // Above the maximum is the maximum (clients ask for thousands by default).
        Some(text) => match text.parse::<i64>() {
            Ok(n) if n >= 0 => n.min(MAX_COUNT),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "_count must be a whole number (at most {MAX_COUNT} are sent), not '{text}'"
                ))
                .with_expression("_count"))
            }
        },
    };
    let (total, summary_count) = totals(param("_total"), param("_summary"))?;
    let converter = state.formats.converter().await?;
    let (filter, mut filter_params) = page_filter(
        rt,
        converter.rules().for_type(rt.name()),
        &params,
        lenient,
        &ctx.url(""),
    )?;
    for name in ["_total", "_elements"] {
        if let Some(value) = param(name) {
            filter_params.push((name.into(), value.into()));
        }
    }
    let elements = elements(param("_elements"))?;
    let total = match total || summary_count {
        true => Some(crud::count(&state.store, rt, &filter).await?),
        false => None,
    };
    if summary_count {
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "total": total,
            "link": [{"relation": "self", "url": ctx.url(&format!("{type_name}?{}", query.as_deref().unwrap_or_default()))}],
        });
        return Ok(ctx.reply(StatusCode::OK, &bundle));
    }
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
            let mut resource = ctx.outbound(found);
            elements.subset(rt.name(), &mut resource);
            json!({
                "fullUrl": ctx.url(&format!("{}/{}", found.resource_type, found.id)),
                "resource": resource,
                "search": {"mode": "match"},
            })
        })
        .collect();
    let mut bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": entries,
    });
    if let Some(total) = total {
        bundle["total"] = json!(total);
    }
    Ok(ctx.reply(StatusCode::OK, &bundle))
}

/// A chain (or `_has`) reads the types it goes through: the subject must be allowed to
/// search each of them, asked exactly as a `GET` of that type on its own would be (else a client allowed to
/// search Observations could read Patients' names through `subject:Patient.name`).
async fn authorize_chains(
    state: &AppState,
    ctx: &ApiContext,
    who: &Who,
    rt: crate::resource_type::ResourceType,
    params: &[(String, String)],
) -> Result<(), ApiError> {
    let mut types: Vec<&str> = params
        .iter()
        .flat_map(|(key, _)| search::chained_types(rt.name(), key))
        .collect();
    types.sort_unstable();
    types.dedup();
    for name in types {
        let Some(target) = crate::resource_type::ResourceType::parse(name) else {
            continue;
        };
        if let Some(reason) = who
            .refusal(state, ctx, "GET", target, None, &Value::Null)
            .await?
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "the search chains through {name}, which may not be searched here: {reason}"
                ),
            ));
        }
    }
    Ok(())
}

/// `_elements=name,Type.name`: the root elements each entry keeps (with `id`, `meta` and the
/// type's mandatory ones; the resource tagged `SUBSETTED`), as `$export`'s `_elements`.
fn elements(listed: Option<&str>) -> Result<Elements, ApiError> {
    let mut elements = Elements::default();
    for item in listed.into_iter().flat_map(|l| l.split(',')) {
        elements
            .add(item.trim())
            .map_err(|message| ApiError::bad_request(message).with_expression("_elements"))?;
    }
    Ok(elements)
}

/// `_total` (`none`, the default; `estimate` and `accurate` both count exactly) and
/// `_summary` (`count`: the total alone; `false`: as without it): whether to count, and
/// whether to answer with the count only.
fn totals(total: Option<&str>, summary: Option<&str>) -> Result<(bool, bool), ApiError> {
    let count = match total {
        None | Some("none") => false,
        Some("estimate" | "accurate") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "_total is none, estimate or accurate, not '{other}'"
            ))
            .with_expression("_total"))
        }
    };
    let only = match summary {
        None | Some("false") => false,
        Some("count") => true,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "not-supported",
                format!("_summary={other} is not supported yet (count and false are)"),
            )
            .with_expression("_summary"))
        }
    };
    Ok((count, only))
}

/// The `_id` and `_lastUpdated` conditions and the compiled criteria, and the parameters
/// that say them (for links).
fn page_filter(
    rt: crate::resource_type::ResourceType,
    attributes: Option<&crate::format::attributes::TypeAttributes>,
    params: &[(String, String)],
    lenient: bool,
    base_url: &str,
) -> Result<(PageFilter, Vec<(String, String)>), ApiError> {
    let mut filter = PageFilter::default();
    let mut said = Vec::new();
    let mut criteria = Vec::new();
    for (key, value) in params {
        let name = key.split(['.', ':']).next().unwrap_or(key);
        match name {
            _ if CONTROL_PARAMETERS.contains(&key.as_str()) => continue,
            "_id" if key == name => {
                let ids: Vec<String> = value.split(',').map(str::to_string).collect();
                // Repeated `_id`s must all hold: keep the ids in both lists.
                filter.ids = Some(match filter.ids.take() {
                    Some(before) => before.into_iter().filter(|id| ids.contains(id)).collect(),
                    None => ids,
                });
            }
            "_lastUpdated" if key == name => {
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
            _ if NOT_YET.contains(&name) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "not-supported",
                    format!("{key}: this parameter is not supported yet"),
                )
                .with_expression(key.clone()));
            }
            _ => match search::parameter(rt.name(), name) {
                Some(definition) if !COLUMN_PARAMETERS.contains(&name) => {
                    let criterion = Criterion::parse(key, value);
                    if criterion.values.len() > MAX_VALUES {
                        return Err(ApiError::bad_request(format!(
                            "{key} lists {} values; at most {MAX_VALUES} are allowed",
                            criterion.values.len()
                        ))
                        .with_expression(key.clone()));
                    }
                    criteria.push((criterion, definition));
                }
                _ if lenient => continue,
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "{} has no search parameter '{name}' in FHIR R4; send 'Prefer: \
                         handling=lenient' to ignore unknown parameters",
                        rt.name()
                    ))
                    .with_expression(key.clone()))
                }
            },
        }
        said.push((key.clone(), value.clone()));
    }
    if criteria.len() > MAX_CRITERIA {
        return Err(ApiError::bad_request(format!(
            "the search has {} parameters; at most {MAX_CRITERIA} are allowed",
            criteria.len()
        )));
    }
    if !criteria.is_empty() {
        filter.condition = Some(search::sql::compile(
            rt,
            attributes,
            &criteria,
            "r.resource",
            base_url,
        )?);
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
