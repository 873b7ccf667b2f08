//! No `WWW-Authenticate: Basic` for requests made from a page's JavaScript.
//!
//! A 401 offers basic credentials (and bearer tokens) in `WWW-Authenticate`, as HTTP clients
//! expect. A browser that sees a `Basic` challenge on a request made by a page's script pops
//! its own sign-in box over the page (and headless Chromium waits on it). A request that
//! says `X-Requested-With: XMLHttpRequest` (the convention jQuery, Angular and Spring use for
//! this) gets the same 401 and OperationOutcome with the `Bearer` challenge only, so that
//! the page can say what went wrong itself. This is how a console in the browser signs in
//! with a Client's basic credentials (docs/security.md says why this and not a session
//! cookie). It only takes a header away from an answer that already refused.

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

/// The header, and the value, that ask for no `Basic` challenge.
pub const HEADER: &str = "x-requested-with";
pub const VALUE: &str = "XMLHttpRequest";

pub async fn suppress_basic(request: Request, next: Next) -> Response {
    let scripted = request
        .headers()
        .get(HEADER)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(VALUE.as_bytes()));
    let mut response = next.run(request).await;
    if scripted && response.status() == StatusCode::UNAUTHORIZED {
        let kept: Vec<HeaderValue> = response
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter(|v| {
                !v.as_bytes()
                    .get(..5)
                    .is_some_and(|scheme| scheme.eq_ignore_ascii_case(b"basic"))
            })
            .cloned()
            .collect();
        let headers = response.headers_mut();
        headers.remove(header::WWW_AUTHENTICATE);
        for value in kept {
            headers.append(header::WWW_AUTHENTICATE, value);
        }
    }
    response
}
