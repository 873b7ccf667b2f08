//! `GET /console`: the web console, a single page compiled into the binary (the files under
//! `console/` in the repository: the page, its stylesheet, and its script as ES modules, the
//! entry `console.js` importing the others as `/console/{name}`). It is only an API client:
//! it signs in with a Client's credentials (or root's), sent on each request, and everything
//! it shows comes from the API under the same authorization as any other client
//! (docs/security.md says why no cookie). The page itself holds no data, so it is public; it
//! is served with a strict Content-Security-Policy (its own script and style only, no inline
//! code, no framing).

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

const PAGE: &str = "text/html; charset=utf-8";
const SCRIPT: &str = "text/javascript; charset=utf-8";
const STYLE: &str = "text/css; charset=utf-8";

/// The console's files: name, media type, content. Every module the page imports must be
/// listed here (`tests/console.rs` follows the imports and fetches each).
const FILES: &[(&str, &str, &str)] = &[
    ("index.html", PAGE, include_str!("../../console/index.html")),
    (
        "console.js",
        SCRIPT,
        include_str!("../../console/console.js"),
    ),
    (
        "session.js",
        SCRIPT,
        include_str!("../../console/session.js"),
    ),
    ("api.js", SCRIPT, include_str!("../../console/api.js")),
    ("dom.js", SCRIPT, include_str!("../../console/dom.js")),
    ("jobs.js", SCRIPT, include_str!("../../console/jobs.js")),
    ("load.js", SCRIPT, include_str!("../../console/load.js")),
    (
        "job-progress.js",
        SCRIPT,
        include_str!("../../console/job-progress.js"),
    ),
    (
        "job-details.js",
        SCRIPT,
        include_str!("../../console/job-details.js"),
    ),
    ("data.js", SCRIPT, include_str!("../../console/data.js")),
    ("sql.js", SCRIPT, include_str!("../../console/sql.js")),
    ("health.js", SCRIPT, include_str!("../../console/health.js")),
    (
        "console.css",
        STYLE,
        include_str!("../../console/console.css"),
    ),
];

const POLICY: &str = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; \
                      script-src 'self'; connect-src 'self'; frame-ancestors 'none'; \
                      base-uri 'none'; form-action 'self'";

/// `GET /console`: the page.
pub async fn page() -> Response {
    file_response("index.html").unwrap_or_else(|error| error.into_response())
}

/// `GET /console/{name}`: one of its files.
pub async fn file(Path(name): Path<String>) -> Result<Response, ApiError> {
    file_response(&name)
}

fn file_response(name: &str) -> Result<Response, ApiError> {
    let (_, media_type, content) = FILES
        .iter()
        .find(|(file, _, _)| *file == name)
        .ok_or_else(|| ApiError::not_found(format!("the console has no file '{name}'")))?;
    let mut response = (StatusCode::OK, *content).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(media_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // A new binary may bring a new console: always revalidate.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}
