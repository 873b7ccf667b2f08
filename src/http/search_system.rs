//! `GET /?_type=A,B&...`: a search of several types at once (R4's system-level search with
//! `_type`). One type is turned into that type's search before routing (`search_forms`);
//! this handler answers two or more.
//!
//! - Each type is authorized as its own search would be (`GET /[type]`, and what its chains
//!   read): a client that may search Observations only gets a 403 naming Patient for
//!   `_type=Observation,Patient`, never the Patients.
//! - Every parameter must mean something for every type (R4: parameters common to all of
//!   them), so unknown parameters are refused, whatever `Prefer` says: ignored for one type,
//!   a filter would answer that type's every resource.
//! - Matches come type by type in `_type`'s order, each type by id; a page's `_cursor` is
//!   `Type` (that type from its start) or `Type.cursor` (that type's own keyset cursor), so
//!   pages stay right while others write, as a one-type search's do. `_sort`, `_include` and
//!   `_revinclude` are one-type features here (a 400 says so).
//! - A search without `_type` would read every table: a 400 asks for it.

use std::collections::HashSet;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use super::body::form_urlencoded_pairs;
use super::bundle::Who;
use super::context::ApiContext;
use super::error::ApiError;
use super::search::{authorize_chains, outcome, Shape};
use super::AppState;
use crate::resource_type::ResourceType;
use crate::search::{self, Plan};

/// Parameters this handler reads itself rather than handing them to each type's plan.
const OWN: &[&str] = &["_type", "_cursor", "_count"];

pub async fn search(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    ctx: ApiContext,
    who: Who,
) -> Result<Response, ApiError> {
    let params = form_urlencoded_pairs(query.as_deref().unwrap_or_default());
    let param = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let types = types_of(param("_type"))?;
    for refused in ["_sort", "_include", "_revinclude"] {
        if params
            .iter()
            .any(|(n, _)| n.split(':').next() == Some(refused))
        {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "not-supported",
                format!("{refused} is supported on the search of one type, not with several _type"),
            )
            .with_expression(refused));
        }
    }
    let limits = &state.settings.search;
    let count = match param("_count") {
        None => limits.default_count,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| {
                ApiError::bad_request(format!("_count is a number of entries, not '{text}'"))
                    .with_expression("_count")
            })?
            .min(limits.max_count),
    };
    let (start, mut cursor) = cursor_of(&types, param("_cursor"))?;
    let filters: Vec<(String, String)> = params
        .iter()
        .filter(|(n, _)| !OWN.contains(&n.as_str()))
        .cloned()
        .collect();
    let converter = state.formats.converter().await?;
    let plan_for = |rt: ResourceType, count: i64, cursor: Option<&str>| {
        let mut with = filters.clone();
        with.push(("_count".into(), count.to_string()));
        if let Some(cursor) = cursor {
            with.push(("_cursor".into(), cursor.to_string()));
        }
        Plan::parse(
            rt,
            converter.rules().for_type(rt.name()),
            &with,
            true,
            &ctx.url(""),
            limits,
            &state.settings.search_indexes,
        )
    };
    // Everything is checked before anything runs: each type's plan, then its authorization.
    for rt in &types {
        plan_for(*rt, count, None)?;
        if let Some(reason) = who
            .refusal(&state, &ctx, "GET", *rt, None, &Value::Null)
            .await?
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("{rt} may not be searched here: {reason}"),
            ));
        }
        authorize_chains(&state, &ctx, &who, *rt, &filters).await?;
    }

    let mut matches = Vec::new();
    let mut total: Option<i64> = None;
    let mut next = None;
    let mut notes = Vec::new();
    for (i, rt) in types.iter().enumerate() {
        let collecting = i >= start && next.is_none();
        let room = if collecting {
            count - matches.len() as i64
        } else {
            0
        };
        let own = if i == start { cursor.take() } else { None };
        let plan = plan_for(*rt, room, own.as_deref())?;
        if collecting && room == 0 && !plan.count_only {
            next = Some(rt.name().to_string());
        }
        if room == 0 && !plan.total {
            continue;
        }
        let page = search::run::run(&state.store, &plan, &HashSet::new(), limits).await?;
        if let Some(n) = page.total {
            *total.get_or_insert(0) += n;
        }
        if let Some(after) = &page.next {
            next = Some(format!("{rt}.{after}"));
        }
        notes.extend(page.notes);
        let shape = Shape::of(*rt, param("_elements"), param("_summary"))?;
        matches.extend(page.matches.into_iter().map(|found| {
            let mut resource = ctx.outbound(&found);
            shape.apply(found.resource_type.name(), &mut resource);
            json!({
                "fullUrl": ctx.url(&format!("{}/{}", found.resource_type, found.id)),
                "resource": resource,
                "search": {"mode": "match"},
            })
        }));
    }

    let link = |cursor: Option<&str>| {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (name, value) in params
            .iter()
            .filter(|(n, _)| n != "_cursor" && n != "_count")
        {
            query.append_pair(name, value);
        }
        query.append_pair("_count", &count.to_string());
        if let Some(cursor) = cursor {
            query.append_pair("_cursor", cursor);
        }
        format!("{}?{}", ctx.url("").trim_end_matches('/'), query.finish())
    };
    let mut links = vec![json!({"relation": "self", "url": link(None)})];
    if let Some(next) = &next {
        links.push(json!({"relation": "next", "url": link(Some(next))}));
    }
    if let Some(outcome) = outcome(&[], &notes) {
        matches.push(json!({"resource": outcome, "search": {"mode": "outcome"}}));
    }
    let mut bundle = json!({"resourceType": "Bundle", "type": "searchset", "link": links});
    if let Some(total) = total {
        bundle["total"] = json!(total);
    }
    if param("_summary") != Some("count") {
        bundle["entry"] = Value::Array(matches);
    }
    Ok(ctx.reply(StatusCode::OK, &bundle))
}

/// The types `_type` lists, each once, in its order.
fn types_of(listed: Option<&str>) -> Result<Vec<ResourceType>, ApiError> {
    let Some(listed) = listed.filter(|l| !l.is_empty()) else {
        return Err(ApiError::bad_request(
            "a search of the whole server names its types with _type (e.g. _type=Patient,Observation)",
        )
        .with_expression("_type"));
    };
    let mut types = Vec::new();
    for name in listed.split(',').map(str::trim) {
        let rt = ResourceType::parse(name)
            .filter(|rt| rt.is_fhir())
            .ok_or_else(|| {
                ApiError::bad_request(format!("_type: '{name}' is not a FHIR resource type"))
                    .with_expression("_type")
            })?;
        if !types.contains(&rt) {
            types.push(rt);
        }
    }
    Ok(types)
}

/// Where a page starts: the index of its type in `types`, and that type's own cursor.
fn cursor_of(
    types: &[ResourceType],
    cursor: Option<&str>,
) -> Result<(usize, Option<String>), ApiError> {
    let Some(cursor) = cursor else {
        return Ok((0, None));
    };
    let (name, inner) = match cursor.split_once('.') {
        Some((name, inner)) => (name, Some(inner.to_string())),
        None => (cursor, None),
    };
    let index = types
        .iter()
        .position(|rt| rt.name() == name)
        .ok_or_else(|| {
            ApiError::bad_request("_cursor does not belong to this search: follow the next link")
                .with_expression("_cursor")
        })?;
    Ok((index, inner))
}
