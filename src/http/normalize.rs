//! One canonical form of the request path, decided before routing and access control.
//!
//! The path is percent-decoded exactly once; then only the characters that cannot appear raw
//! in a path are encoded again. So `/Patient/%24dump` becomes `/Patient/$dump`: the router,
//! the access policies and the handlers all see the same path, and no encoding can reach a
//! handler that a policy did not see. Refused with 400: an encoded `/` (`%2F`) or NUL, which
//! would change the path's segments after the policy saw them; `.` and `..` segments; empty
//! segments (`//`); paths that are not UTF-8. A trailing `/` is dropped (`/fhir/` = `/fhir`).

use axum::extract::Request;
use axum::http::uri::{PathAndQuery, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

use super::error::ApiError;

/// Characters encoded in a path segment: those not allowed raw by RFC 3986 plus `%` itself.
/// Everything else (`$`, `:`, `@`, `-`, `.`, `_`, `~`, ...) stays as it is.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}')
    .add(b'/');

/// The middleware: rewrites the request's URI to the canonical path, or answers 400.
pub async fn normalize_path(mut request: Request, next: Next) -> Response {
    let uri = request.uri();
    let canonical = match canonical_path(uri.path()) {
        Ok(path) => path,
        Err(error) => return error.into_response(),
    };
    if canonical != uri.path() {
        let path_and_query = match uri.query() {
            Some(query) => format!("{canonical}?{query}"),
            None => canonical,
        };
        let mut parts = uri.clone().into_parts();
        parts.path_and_query = match PathAndQuery::try_from(path_and_query) {
            Ok(pq) => Some(pq),
            Err(_) => {
                return ApiError::bad_request("the request path is not valid").into_response()
            }
        };
        match Uri::from_parts(parts) {
            Ok(new_uri) => *request.uri_mut() = new_uri,
            Err(_) => {
                return ApiError::bad_request("the request path is not valid").into_response()
            }
        }
    }
    next.run(request).await
}

/// The canonical form of a raw (still percent-encoded) path.
pub fn canonical_path(raw: &str) -> Result<String, ApiError> {
    let refuse = |why: &str| {
        Err(ApiError::bad_request(format!(
            "invalid request path: {why}"
        )))
    };
    if raw == "/" || raw.is_empty() {
        return Ok("/".to_string());
    }
    let trimmed = raw.strip_suffix('/').unwrap_or(raw);
    let mut out = String::with_capacity(raw.len());
    for raw_segment in trimmed.strip_prefix('/').unwrap_or(trimmed).split('/') {
        let decoded = match percent_decode_str(raw_segment).decode_utf8() {
            Ok(text) => text,
            Err(_) => return refuse("it is not UTF-8 once decoded"),
        };
        if decoded.is_empty() {
            return refuse("empty segment ('//')");
        }
        if decoded == "." || decoded == ".." {
            return refuse("'.' and '..' segments are not allowed");
        }
        if decoded.contains('/') {
            return refuse("an encoded '/' (%2F) inside a segment");
        }
        if decoded.contains('\0') {
            return refuse("an encoded NUL");
        }
        out.push('/');
        out.extend(utf8_percent_encode(&decoded, SEGMENT));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        canonical_path(raw).unwrap_or_else(|e| panic!("{raw}: {}", e.message))
    }

    #[test]
    fn decodes_once_into_one_form() {
        assert_eq!(ok("/Patient/%24dump"), "/Patient/$dump");
        assert_eq!(ok("/Patient/$dump"), "/Patient/$dump");
        assert_eq!(ok("/%50atient/pt-1"), "/Patient/pt-1");
        assert_eq!(ok("/fhir/"), "/fhir");
        assert_eq!(ok("/"), "/");
        // A double-encoded `$` decodes once to `%24`, which must stay a literal `%24`.
        assert_eq!(ok("/Patient/%2524dump"), "/Patient/%2524dump");
        assert_eq!(ok("/Patient/a%20b"), "/Patient/a%20b");
    }

    #[test]
    fn refuses_tricks() {
        for raw in [
            "/Patient/..",
            "/Patient/../Client/x",
            "/Patient/%2e%2e/Client",
            "/Patient/.",
            "//Patient",
            "/Patient//x",
            "/Patient%2F$dump",
            "/Patient/%00",
            "/Patient/%ff",
        ] {
            assert!(canonical_path(raw).is_err(), "{raw} must be refused");
        }
    }
}
