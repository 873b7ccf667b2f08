//! FHIR Bulk Data `$export` (IG 3.0.0), on `/fhir/` only:
//!
//! - kick-off: `GET`/`POST /fhir/$export`, `/fhir/Patient/$export`, `/fhir/Group/<id>/$export`,
//!   with `Accept: application/fhir+json` and `Prefer: respond-async` (else 400) -> 202 with
//!   `Content-Location: <base>/$export-status/<job>`;
//! - status: `GET /fhir/$export-status/<job>` -> 202 with `X-Progress` and `Retry-After`
//!   while it runs, 200 with the manifest when done, 500 with an OperationOutcome if it
//!   failed; `DELETE` cancels the job and deletes its files (202);
//! - files: `GET /fhir/$export-file/<job>/<name>` (`application/fhir+ndjson`; gzip when the
//!   client accepts it).
//!
//! Status and files are the job owner's (see `access.rs`), besides what policies allow.

use axum::extract::{FromRequestParts, OriginalUri, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::json;

use super::access::Granted;
use super::body::{form_urlencoded_pairs, http_date, prefers, set_header, streamed, MaybeDocument};
use super::context::ApiContext;
use super::error::ApiError;
use super::AppState;
use crate::auth::scope::Interaction;
use crate::auth::Subject;
use crate::bulk::export::request::{parameters_body, specify, KickOff, Level};
use crate::bulk::export::{is_file_name, ExportStatus};
use crate::resource_type::ResourceType;

/// Seconds a client should wait between status polls.
const RETRY_AFTER_SECONDS: &str = "1";

/// What a kick-off reads from its request besides its parameters: who asks (and a token's
/// scopes), the URL as sent, the headers.
pub struct Caller {
    subject: Subject,
    granted: Option<Granted>,
    uri: axum::http::Uri,
    headers: HeaderMap,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Caller, ApiError> {
        let subject = parts
            .extensions
            .get::<Subject>()
            .cloned()
            .ok_or_else(|| ApiError::internal("a kick-off without a subject", "no Subject"))?;
        let uri = parts
            .extensions
            .get::<OriginalUri>()
            .map_or_else(|| parts.uri.clone(), |OriginalUri(uri)| uri.clone());
        Ok(Caller {
            subject,
            granted: parts.extensions.get::<Granted>().cloned(),
            uri,
            headers: parts.headers.clone(),
        })
    }
}

pub async fn system(
    State(state): State<AppState>,
    caller: Caller,
    ctx: ApiContext,
    MaybeDocument(body): MaybeDocument,
) -> Result<Response, ApiError> {
    kick_off(&state, caller, &ctx, Level::System, body).await
}

pub async fn patient(
    State(state): State<AppState>,
    Path(type_name): Path<String>,
    caller: Caller,
    ctx: ApiContext,
    MaybeDocument(body): MaybeDocument,
) -> Result<Response, ApiError> {
    if type_name != "Patient" {
        return Err(ApiError::not_found(format!(
            "$export is defined on the system, on Patient and on a Group, not on {type_name}"
        )));
    }
    kick_off(&state, caller, &ctx, Level::Patient, body).await
}

pub async fn group(
    State(state): State<AppState>,
    Path((type_name, id)): Path<(String, String)>,
    caller: Caller,
    ctx: ApiContext,
    MaybeDocument(body): MaybeDocument,
) -> Result<Response, ApiError> {
    if type_name != "Group" {
        return Err(ApiError::not_found(format!(
            "$export on an instance is defined for a Group, not for {type_name}"
        )));
    }
    kick_off(&state, caller, &ctx, Level::Group { id }, body).await
}

async fn kick_off(
    state: &AppState,
    caller: Caller,
    ctx: &ApiContext,
    level: Level,
    body: Option<serde_json::Value>,
) -> Result<Response, ApiError> {
    let Caller {
        subject,
        granted,
        uri,
        headers,
    } = caller;
    let headers = &headers;
    let accepts_fhir_json = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|media| media.split(';').next().unwrap_or_default().trim() == "application/fhir+json");
    if !accepts_fhir_json {
        return Err(ApiError::bad_request(
            "an $export kick-off needs the header 'Accept: application/fhir+json'",
        ));
    }
    if !prefers(headers, "respond-async") {
        return Err(ApiError::bad_request(
            "an $export kick-off needs the header 'Prefer: respond-async'",
        ));
    }
    let lenient = prefers(headers, "handling=lenient");

    let mut params = form_urlencoded_pairs(uri.query().unwrap_or_default());
    if let Some(document) = body {
        params.extend(parameters_body(&document).map_err(ApiError::bad_request)?);
    }
    let path_and_query = uri.path_and_query().map_or("", |pq| pq.as_str());
    let request = format!(
        "{}{path_and_query}",
        ctx.url("/").trim_end_matches("/fhir/")
    );
    let spec = specify(KickOff {
        level,
        params,
        lenient,
        request,
        now: Utc::now(),
    })
    .map_err(ApiError::bad_request)?;
    if let Some(Granted(scopes)) = &granted {
        // A token exports only the types its scopes let it read and search.
        if let Some(denied) = spec
            .types
            .iter()
            .find(|name| !scopes.allow_all(ResourceType::parse(name), &Interaction::READ_ALL))
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "the access token's scope ({scopes}) does not allow exporting {denied}; narrow _type"
                ),
            ));
        }
    }
    let warnings = spec.warnings.clone();
    let id = state
        .background
        .exports
        .start(spec, &subject.name())
        .await?;
    let mut issues = vec![json!({
        "severity": "information",
        "code": "informational",
        "diagnostics": format!("export {id} started"),
    })];
    issues.extend(warnings.iter().map(
        |message| json!({"severity": "warning", "code": "not-supported", "diagnostics": message}),
    ));
    let outcome = json!({"resourceType": "OperationOutcome", "issue": issues});
    let mut response = ctx.reply(StatusCode::ACCEPTED, &outcome);
    let status_url = ctx.url(&format!("$export-status/{id}"));
    set_header(&mut response, header::CONTENT_LOCATION, &status_url);
    Ok(response)
}

pub async fn status(
    State(state): State<AppState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    ctx: ApiContext,
) -> Result<Response, ApiError> {
    // `page` of a paged manifest (allowPartialManifests); the status URL itself is page 1.
    let page = match form_urlencoded_pairs(query.as_deref().unwrap_or_default())
        .into_iter()
        .find(|(name, _)| name == "page")
    {
        None => None,
        Some((_, value)) => Some(value.parse::<usize>().ok().filter(|n| *n >= 1).ok_or_else(
            || ApiError::bad_request(format!("page must be a number from 1, not '{value}'")),
        )?),
    };
    if let Err(wait) = state.background.exports.admit_poll(&id) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            format!(
                "export {id} is polled faster than its Retry-After ({RETRY_AFTER_SECONDS} s) \
                 asks; wait that long between polls"
            ),
        )
        .retry_after(wait.as_secs_f64().ceil() as u64));
    }
    let base = ctx.url("/");
    let status = state
        .background
        .exports
        .status(&id, base.trim_end_matches('/'), page)
        .await?;
    match status {
        None => Err(no_export(&id)),
        Some(ExportStatus::InProgress { progress, page }) => {
            let mut response = match page {
                // allowPartialManifests: the files ready so far.
                Some(page) => manifest_response(StatusCode::ACCEPTED, &page),
                None => StatusCode::ACCEPTED.into_response(),
            };
            set_header(&mut response, header::RETRY_AFTER, RETRY_AFTER_SECONDS);
            set_header(&mut response, "x-progress", &progress);
            Ok(response)
        }
        Some(ExportStatus::Failed(reasons)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            format!("the export failed: {}", reasons.join("; ")),
        )),
        Some(ExportStatus::Complete { manifest, expires }) => {
            let mut response = manifest_response(StatusCode::OK, &manifest);
            set_header(&mut response, header::EXPIRES, &http_date(&expires));
            Ok(response)
        }
    }
}

/// A manifest (or manifest page) as JSON, its `next` link also as a `Link` header.
fn manifest_response(status: StatusCode, manifest: &serde_json::Value) -> Response {
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        manifest.to_string(),
    )
        .into_response();
    if let Some(next) = manifest["link"][0]["url"].as_str() {
        set_header(
            &mut response,
            header::LINK,
            &format!("<{next}>; rel=\"next\""),
        );
    }
    response
}

pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ctx: ApiContext,
) -> Result<Response, ApiError> {
    if !state.background.exports.cancel(&id).await? {
        return Err(no_export(&id));
    }
    let outcome = json!({"resourceType": "OperationOutcome", "issue": [{
        "severity": "information",
        "code": "informational",
        "diagnostics": format!("export {id} cancelled and its files deleted"),
    }]});
    Ok(ctx.reply(StatusCode::ACCEPTED, &outcome))
}

pub async fn file(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let not_found = || no_file(&id, &name);
    if !is_file_name(&name) {
        return Err(not_found());
    }
    let exports = &state.background.exports;
    // View exports write CSV and Parquet files too.
    let media = crate::bulk::export::storage::media_type(&name);
    // A download that broke off resumes where it stopped (`Range: bytes=N-`). Several ranges
    // at once get the whole file, as RFC 9110 allows.
    let single = headers
        .get(header::RANGE)
        .filter(|r| !r.as_bytes().contains(&b','))
        .and_then(|r| r.to_str().ok());
    if let Some(range) = single {
        let Some(length) = exports.file_size(&id, &name).await? else {
            return Err(not_found());
        };
        let Some((start, end)) = byte_range(range, length) else {
            let mut response = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            set_header(
                &mut response,
                header::CONTENT_RANGE,
                &format!("bytes */{length}"),
            );
            return Ok(response);
        };
        let Some(opened) = exports.open(&id, &name, Some((start, end))).await? else {
            return Err(not_found());
        };
        // A range is of the file's own bytes: never compressed on the way.
        let mut response = streamed(opened.body, media, false);
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        set_header(&mut response, header::ACCEPT_RANGES, "bytes");
        set_header(
            &mut response,
            header::CONTENT_RANGE,
            &format!("bytes {start}-{end}/{length}"),
        );
        set_header(
            &mut response,
            header::CONTENT_LENGTH,
            &(end + 1 - start).to_string(),
        );
        return Ok(response);
    }
    let Some(opened) = exports.open(&id, &name, None).await? else {
        return Err(not_found());
    };
    let gzip = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or_default().trim();
            let refused = parts.any(|p| p.trim().replace(' ', "") == "q=0");
            name == "gzip" && !refused
        });
    let mut response = streamed(opened.body, media, gzip);
    set_header(&mut response, header::VARY, "accept-encoding");
    set_header(&mut response, header::ACCEPT_RANGES, "bytes");
    Ok(response)
}

/// The first and last byte of a single `bytes=` range within `length` bytes, if it is one.
fn byte_range(header: &str, length: u64) -> Option<(u64, u64)> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') || length == 0 {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    let (start, end) = match (first.is_empty(), last.is_empty()) {
        (false, _) => {
            let start: u64 = first.parse().ok()?;
            let end = if last.is_empty() {
                length - 1
            } else {
                last.parse::<u64>().ok()?.min(length - 1)
            };
            (start, end)
        }
        (true, false) => {
            let suffix: u64 = last.parse().ok()?;
            (length.saturating_sub(suffix), length - 1)
        }
        (true, true) => return None,
    };
    (start <= end && start < length).then_some((start, end))
}

pub(super) fn no_file(id: &str, name: &str) -> ApiError {
    ApiError::not_found(format!("export {id} has no file {name}"))
}

pub(super) fn no_export(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "no export {id} (it may have been cancelled, or its files expired)"
    ))
}

#[cfg(test)]
mod tests {
    use super::byte_range;

    #[test]
    fn byte_ranges() {
        assert_eq!(byte_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(byte_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(byte_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(byte_range("bytes=95-200", 100), Some((95, 99)));
        assert_eq!(byte_range("bytes=100-", 100), None);
        assert_eq!(byte_range("bytes=5-2", 100), None);
        assert_eq!(byte_range("bytes=0-1,5-6", 100), None);
        assert_eq!(byte_range("items=0-1", 100), None);
    }
}
