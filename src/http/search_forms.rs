//! The other ways FHIR asks for a search, turned into the `GET /[type]?...` they mean
//! before routing, so that access control and the handler see exactly that search (one
//! authorization, whatever the way in):
//!
//! - `POST /[type]/_search` with a form body (`application/x-www-form-urlencoded`): its
//!   parameters are appended to the query's.
//! - `GET /Patient/[id]/[type]?...`, a Patient compartment search: the type's search with
//!   `_compartment=Patient/[id]` (see `search::compartment`). Other compartments are a 400.
//! - `GET /?_type=[type]&...`, a search of the whole server naming one type: that type's
//!   search (several types: `search_system`).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use percent_encoding::percent_decode_str;

use super::body::form_urlencoded_pairs;
use super::error::ApiError;
use crate::resource_type::ResourceType;

/// The middleware; `max_body` bounds a form body (`--max-body-bytes`).
pub async fn rewrite(State(max_body): State<usize>, request: Request, next: Next) -> Response {
    match rewritten(request, max_body).await {
        Ok(request) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

async fn rewritten(request: Request, max_body: usize) -> Result<Request, ApiError> {
    let path = request.uri().path().to_string();
    if let Some(target) = one_type_search(&request, &path) {
        return retarget(request, &target, Vec::new(), &["_type"]);
    }
    let (prefix, rest) = match path.strip_prefix("/fhir/") {
        Some(rest) => ("/fhir", rest),
        None => ("", path.trim_start_matches('/')),
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let is_type = |s: &str| ResourceType::parse(s).is_some();
    match (request.method(), segments.as_slice()) {
        (&Method::POST, [ty, "_search"]) if is_type(ty) => {
            let target = format!("{prefix}/{ty}");
            form_search(request, &target, max_body).await
        }
        (&Method::GET, ["Patient", id, ty]) if is_type(ty) && !id.starts_with(['$', '_']) => {
            let id = percent_decode_str(id).decode_utf8_lossy();
            let escaped = id
                .replace('\\', "\\\\")
                .replace(',', "\\,")
                .replace('|', "\\|")
                .replace('$', "\\$");
            let extra = vec![("_compartment".to_string(), format!("Patient/{escaped}"))];
            let target = format!("{prefix}/{ty}");
            retarget(request, &target, extra, &[])
        }
        (
            &Method::GET,
            [c @ ("Encounter" | "RelatedPerson" | "Practitioner" | "Device"), id, ty],
        ) if is_type(ty) && !id.starts_with(['$', '_']) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "not-supported",
            format!("compartment search is supported for the Patient compartment, not {c}"),
        )),
        _ => Ok(request),
    }
}

/// `POST /[type]/_search`: the form body's parameters after the query's, as a `GET`.
async fn form_search(request: Request, target: &str, max_body: usize) -> Result<Request, ApiError> {
    let form = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|t| t.starts_with("application/x-www-form-urlencoded"));
    if !form {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
            "POST _search takes its parameters as a form (application/x-www-form-urlencoded)",
        ));
    }
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, max_body).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-costly",
            format!("the form is larger than {max_body} bytes (--max-body-bytes)"),
        )
    })?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::bad_request("the form body is not UTF-8"))?;
    let request = Request::from_parts(parts, Body::empty());
    retarget(request, target, form_urlencoded_pairs(text), &[])
}

/// `GET /?_type=Observation&...` (one type): the path of that type's search.
fn one_type_search(request: &Request, path: &str) -> Option<String> {
    let prefix = match path {
        "/fhir" | "/fhir/" => "/fhir",
        "/" => "",
        _ => return None,
    };
    if request.method() != Method::GET {
        return None;
    }
    let pairs = form_urlencoded_pairs(request.uri().query().unwrap_or_default());
    let mut types: Vec<&str> = pairs
        .iter()
        .filter(|(name, _)| name == "_type")
        .flat_map(|(_, value)| value.split(','))
        .map(str::trim)
        .collect();
    types.dedup();
    match types.as_slice() {
        [one] if ResourceType::parse(one).is_some_and(|rt| rt.is_fhir()) => {
            Some(format!("{prefix}/{one}"))
        }
        _ => None,
    }
}

/// The request as `GET target?query&extra`, without the query's parameters named in `drop`.
fn retarget(
    mut request: Request,
    target: &str,
    extra: Vec<(String, String)>,
    drop: &[&str],
) -> Result<Request, ApiError> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    let given = form_urlencoded_pairs(request.uri().query().unwrap_or_default());
    let kept = given
        .iter()
        .filter(|(name, _)| !drop.contains(&name.as_str()));
    for (name, value) in kept.chain(extra.iter()) {
        query.append_pair(name, value);
    }
    let uri: Uri = format!("{target}?{}", query.finish())
        .parse()
        .map_err(|_| ApiError::bad_request("the search cannot be written as a URL"))?;
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    headers.remove(header::CONTENT_TYPE);
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::TRANSFER_ENCODING);
    Ok(request)
}
