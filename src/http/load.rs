//! `POST /$load`, `/fhir/$load` (any types, each line names its own), `/[type]/$load`,
//! `/fhir/[type]/$load` (one type: the fastest path). The body (JSON or YAML):
//!
//! ```yaml
//! source: https://example.org/Patient.ndjson.gz   # http(s), or file:// under --source-dir
//! update: false        # true: keep replaced versions in history (slower)
//! strip-nulls: false   # true: remove null members
//! merge: {active: true}  # shallow-merged into every resource
//! mode: bulk           # migration: keep each line's versionId and lastUpdated (root only)
//! ```
//!
//! Answers `{"total": N}` for a one-type load, `{"Patient": N, ...}` for a mixed one.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use serde_json::{json, Map, Value};

use super::body::{reply, Document, Negotiated};
use super::error::ApiError;
use super::AppState;
use crate::auth::Subject;
use crate::bulk::load::{account, load_tracked, LoadRequest, Progress};
use crate::bulk::migrate::migrate_tracked;
use crate::bulk::prepare::{own_type_refusal, LineRules};
use crate::bulk::report::Report;
use crate::crud;
use crate::format::Api;
use crate::resource_type::ResourceType;

pub async fn load_mixed(
    State(state): State<AppState>,
    Extension(api): Extension<Api>,
    Extension(subject): Extension<Subject>,
    negotiated: Negotiated,
    Document(body): Document,
) -> Result<Response, ApiError> {
    let counts = run(&state, api, &subject, None, body).await?;
    let body: Map<String, Value> = counts
        .into_iter()
        .map(|(rt, n)| (rt.to_string(), json!(n)))
        .collect();
    Ok(reply(negotiated, api, StatusCode::OK, &Value::Object(body)))
}

pub async fn load_type(
    State(state): State<AppState>,
    Path(type_name): Path<String>,
    Extension(api): Extension<Api>,
    Extension(subject): Extension<Subject>,
    negotiated: Negotiated,
    Document(body): Document,
) -> Result<Response, ApiError> {
    let rt = crud::resource_type(&type_name)?;
    if let Some(refusal) = own_type_refusal(rt, matches!(subject, Subject::Root)) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", refusal));
    }
    let counts = run(&state, api, &subject, Some(rt), body).await?;
    let total: u64 = counts.values().sum();
    Ok(reply(
        negotiated,
        api,
        StatusCode::OK,
        &json!({"total": total}),
    ))
}

async fn run(
    state: &AppState,
    api: Api,
    subject: &Subject,
    only_type: Option<ResourceType>,
    body: Value,
) -> Result<crate::bulk::load::LoadCounts, ApiError> {
    let options = LoadOptions::parse(body)?;
    if options.migration && !matches!(subject, Subject::Root) {
        // Versions keep their numbers and times, deletions included: it rewrites history,
        // as the migration-mode `$import` does, so it is root's too.
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "mode migration keeps the versions and times of another store, deletions included: only root may load so",
        )
        .with_expression("mode"));
    }
    // Held until the load ends: it holds a bulk connection that long.
    let _permit = state.bulk.start(&subject.name())?;
    let fhir = match api {
        Api::Fhir => Some(state.formats.converter().await?),
        Api::Native => None,
    };
    let request = LoadRequest {
        source: options.source,
        reader: match subject {
            Subject::Root => crate::bulk::source::Reader::Root,
            Subject::Client(_) => crate::bulk::source::Reader::Client,
        },
        rules: LineRules {
            fhir,
            only_type,
            strip_nulls: options.strip_nulls,
            merge: options.merge.as_ref().and_then(LineRules::merge_members),
            own_types: matches!(subject, Subject::Root),
            format_check: options.format_check,
        },
        keep_history: options.update,
    };
    let what = only_type.map_or("mixed", |rt| rt.name());
    let report = Report::start("$load", what, subject.name(), "in");
    let progress = Arc::new(Progress::default());
    let (store, sources, tracked) = (&state.bulk_store, &state.sources, progress.clone());
    let loaded = match options.migration {
        true => migrate_tracked(store, sources, request, tracked, None).await,
        false => load_tracked(store, sources, request, tracked, None).await,
    };
    account(&report, &progress, &loaded);
    Ok(loaded?)
}

/// The body of a `$load` request.
struct LoadOptions {
    source: String,
    update: bool,
    strip_nulls: bool,
    merge: Option<Map<String, Value>>,
    /// Refuse a file plainly in the other format (default).
    format_check: bool,
    /// `mode: migration`: versions kept as they are (`bulk::migrate`).
    migration: bool,
}

impl LoadOptions {
    fn parse(body: Value) -> Result<LoadOptions, ApiError> {
        let Value::Object(body) = body else {
            return Err(ApiError::bad_request(
                "the $load body must be an object with a 'source' URL",
            ));
        };
        let mut options = LoadOptions {
            source: String::new(),
            update: false,
            strip_nulls: false,
            merge: None,
            format_check: true,
            migration: false,
        };
        let flag = |name: &str, value: &Value| {
            value.as_bool().ok_or_else(|| {
                ApiError::bad_request(format!("'{name}' must be true or false"))
                    .with_expression(name)
            })
        };
        for (name, value) in body {
            match name.as_str() {
                "source" => {
                    options.source = value
                        .as_str()
                        .ok_or_else(|| {
                            ApiError::bad_request("'source' must be a URL string")
                                .with_expression("source")
                        })?
                        .to_string()
                }
                "update" => options.update = flag(&name, &value)?,
                "strip-nulls" => options.strip_nulls = flag(&name, &value)?,
                "format-check" => options.format_check = flag(&name, &value)?,
                "mode" => {
                    options.migration = match value.as_str() {
                        Some("bulk") => false,
                        Some("migration") => true,
                        _ => {
                            return Err(ApiError::bad_request(format!(
                                "'mode' must be bulk (each line a new version) or migration (versions kept as they are), not {value}"
                            ))
                            .with_expression("mode"))
                        }
                    }
                }
                "merge" => match value {
                    Value::Object(merge) => {
                        // Identity and server-kept metadata are the load's, not the caller's.
                        if let Some(key) = ["id", "resourceType", "meta"]
                            .into_iter()
                            .find(|key| merge.contains_key(*key))
                        {
                            return Err(ApiError::bad_request(format!(
                                "'merge' may not set '{key}' (a load keeps each line's identity and its server metadata)"
                            ))
                            .with_expression(format!("merge.{key}")));
                        }
                        options.merge = Some(merge)
                    }
                    _ => {
                        return Err(ApiError::bad_request("'merge' must be an object")
                            .with_expression("merge"))
                    }
                },
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "unknown option '{name}' (supported: source, update, strip-nulls, merge, format-check, mode)"
                    ))
                    .with_expression(name))
                }
            }
        }
        if options.migration && options.update {
            return Err(ApiError::bad_request(
                "'update' has no meaning with mode migration: every version of the input is kept, in history or as the current one",
            )
            .with_expression("update"));
        }
        if options.source.is_empty() {
            return Err(
                ApiError::bad_request("the body needs 'source': the URL to load from")
                    .with_expression("source"),
            );
        }
        Ok(options)
    }
}
