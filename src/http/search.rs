//! `GET /[type]` (and `POST /[type]/_search`, `GET /Patient/[id]/[type]`, both turned into
//! it before routing, see `normalize`): a `searchset` Bundle of the type's current resources
//! matching the search.
//!
//! [`crate::search`] reads the query into a plan and runs it (filter, `_sort`, keyset pages,
//! `_include`); this handler authorizes the other types the search reads (each as a search
//! of that type on its own would be), and writes the Bundle: the matches, shaped by
//! `_elements`/`_summary`, what was included, and an OperationOutcome entry saying what was
//! ignored or left out. Unknown parameters are ignored and said so (FHIR's default,
//! `Prefer: handling=lenient`) or refused with `Prefer: handling=strict`.

use std::collections::HashSet;

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
use crate::crud;
use crate::resource::StoredResource;
use crate::resource_type::ResourceType;
use crate::search::{self, Plan};

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
    let param = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let shape = Shape::of(rt, param("_elements"), param("_summary"))?;
    let converter = state.formats.converter().await?;
    let limits = &state.settings.search;
    let plan = Plan::parse(
        rt,
        converter.rules().for_type(rt.name()),
        &params,
        prefers(&headers, "handling=strict"),
        &ctx.url(""),
        limits,
        &state.settings.search_indexes,
    )?;
    authorize_chains(&state, &ctx, &who, rt, &params).await?;
    let readable = readable(&state, &ctx, &who, &plan).await?;
    let page = search::run::run(&state.store, &plan, &readable, limits).await?;
    let link = |cursor: Option<&str>| page_url(&ctx, &type_name, &plan, cursor);
    let mut links = vec![json!({"relation": "self", "url": link(None)})];
    if let Some(next) = &page.next {
        links.push(json!({"relation": "next", "url": link(Some(next))}));
    }
    let entry = |found: &StoredResource, mode: &str| {
        let mut resource = ctx.outbound(found);
        shape.apply(found.resource_type.name(), &mut resource);
        json!({
            "fullUrl": ctx.url(&format!("{}/{}", found.resource_type, found.id)),
            "resource": resource,
            "search": {"mode": mode},
        })
    };
    let mut entries: Vec<Value> = page.matches.iter().map(|r| entry(r, "match")).collect();
    entries.extend(page.included.iter().map(|r| entry(r, "include")));
    if let Some(outcome) = outcome(&plan.ignored, &page.notes) {
        entries.push(json!({"resource": outcome, "search": {"mode": "outcome"}}));
    }
    let mut bundle = json!({"resourceType": "Bundle", "type": "searchset", "link": links});
    if let Some(total) = page.total {
        bundle["total"] = json!(total);
    }
    if !plan.count_only {
        bundle["entry"] = Value::Array(entries);
    }
    Ok(ctx.reply(StatusCode::OK, &bundle))
}

/// A chain (or `_has`) reads the types it goes through: the subject must be allowed to
/// search each of them, asked exactly as a `GET` of that type on its own would be (else a
/// client allowed to search Observations could read Patients' names through
/// `subject:Patient.name`).
pub(super) async fn authorize_chains(
    state: &AppState,
    ctx: &ApiContext,
    who: &Who,
    rt: ResourceType,
    params: &[(String, String)],
) -> Result<(), ApiError> {
    let mut types: Vec<&str> = params
        .iter()
        .flat_map(|(key, _)| search::chained_types(rt.name(), key))
        .collect();
    types.sort_unstable();
    types.dedup();
    for name in types {
        let Some(target) = ResourceType::parse(name) else {
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
                    "the search reads {name} too (through a chain, _has, _list, :in or \
                     :below), which may not be searched here: {reason}"
                ),
            ));
        }
    }
    Ok(())
}

/// A conditional write's search: the subject must be allowed to search the type (and what
/// the search reads too), asked as that `GET` on its own would be; then its filter.
pub(super) async fn conditional_filter(
    state: &AppState,
    ctx: &ApiContext,
    who: &Who,
    rt: ResourceType,
    query: &str,
) -> Result<crate::store::search::PageFilter, ApiError> {
    if let Some(reason) = who
        .refusal(state, ctx, "GET", rt, None, &Value::Null)
        .await?
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("a conditional write searches {rt}, which may not be searched here: {reason}"),
        ));
    }
    let params = form_urlencoded_pairs(query);
    authorize_chains(state, ctx, who, rt, &params).await?;
    let converter = state.formats.converter().await?;
    Ok(Plan::filter_only(
        rt,
        converter.rules().for_type(rt.name()),
        &params,
        &ctx.url(""),
        &state.settings.search,
        &state.settings.search_indexes,
    )?)
}

/// The types the plan's includes may read that the subject may search (asked as a `GET` of
/// the type on its own); the others are left out of the page, which says so.
async fn readable(
    state: &AppState,
    ctx: &ApiContext,
    who: &Who,
    plan: &Plan,
) -> Result<HashSet<ResourceType>, ApiError> {
    let mut types: Vec<ResourceType> = plan.includes.iter().flat_map(|i| i.reads()).collect();
    types.sort_by_key(|t| t.name());
    types.dedup();
    let mut readable = HashSet::new();
    for rt in types {
        if who
            .refusal(state, ctx, "GET", rt, None, &Value::Null)
            .await?
            .is_none()
        {
            readable.insert(rt);
        }
    }
    Ok(readable)
}

/// How each entry's resource is shaped: `_elements`, or `_summary` (`true`: the summary
/// elements; `text`: the narrative and the mandatory elements; `data`: all but the
/// narrative; `false` and `count`: as stored).
pub(super) enum Shape {
    Whole,
    Elements(Elements),
    Summary(&'static str),
}

impl Shape {
    pub(super) fn of(
        rt: ResourceType,
        elements: Option<&str>,
        summary: Option<&str>,
    ) -> Result<Shape, ApiError> {
        match (elements, summary) {
            (Some(_), Some(s)) if s != "false" && s != "count" => Err(ApiError::bad_request(
                "_elements and _summary cannot be used together",
            )
            .with_expression("_summary")),
            (Some(listed), _) => {
                let mut elements = Elements::default();
                for item in listed.split(',') {
                    elements.add(item.trim()).map_err(|message| {
                        ApiError::bad_request(message).with_expression("_elements")
                    })?;
                }
                Ok(Shape::Elements(elements))
            }
            (None, None | Some("false" | "count")) => Ok(Shape::Whole),
            (None, Some(s @ ("true" | "text" | "data"))) if rt.is_fhir() => {
                Ok(Shape::Summary(match s {
                    "true" => "true",
                    "text" => "text",
                    _ => "data",
                }))
            }
            (None, Some(other)) => Err(ApiError::bad_request(format!(
                "_summary is true, text, data, count or false, not '{other}'"
            ))
            .with_expression("_summary")),
        }
    }

    pub(super) fn apply(&self, type_name: &str, resource: &mut Value) {
        match self {
            Shape::Whole => {}
            Shape::Elements(elements) => elements.subset(type_name, resource),
            Shape::Summary(mode) => {
                crate::bulk::export::elements::summary(type_name, mode, resource)
            }
        }
    }
}

/// The OperationOutcome entry of a page: the parameters ignored and what includes left out.
pub(super) fn outcome(ignored: &[String], notes: &[String]) -> Option<Value> {
    let mut issues: Vec<Value> = ignored
        .iter()
        .map(|key| {
            json!({
                "severity": "warning",
                "code": "not-supported",
                "diagnostics": format!("{key}: not a search parameter of this type; ignored \
                    (send 'Prefer: handling=strict' to have it refused)"),
                "expression": [key],
            })
        })
        .collect();
    issues.extend(notes.iter().map(
        |note| json!({"severity": "information", "code": "informational", "diagnostics": note}),
    ));
    (!issues.is_empty()).then(|| json!({"resourceType": "OperationOutcome", "issue": issues}))
}

/// The URL of this search (`cursor`: of the page after it).
fn page_url(ctx: &ApiContext, type_name: &str, plan: &Plan, cursor: Option<&str>) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (name, value) in plan.said.iter().filter(|(n, _)| n != "_count") {
        query.append_pair(name, value);
    }
    query.append_pair("_count", &plan.count.to_string());
    if let Some(cursor) = cursor {
        query.append_pair("_cursor", cursor);
    }
    ctx.url(&format!("{type_name}?{}", query.finish()))
}
