//! SMART Backend Services over HTTP: `GET /.well-known/smart-configuration` (and under
//! `/fhir`), public, what clients read to find the token endpoint; and `POST /auth/token`,
//! the token endpoint itself (form-encoded, as OAuth 2.0 has it), public too: the client
//! authenticates with its signed assertion.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use serde_json::json;

use super::body::form_urlencoded_pairs;
use super::context::origin;
use super::error::oauth_error;
use super::AppState;
use crate::auth::TokenRequest;

/// Largest body of a token request (an assertion is a few kilobytes).
const MAX_TOKEN_BODY: usize = 64 * 1024;

/// Largest JWK Set fetched from a Client's `jwks_uri`.
const MAX_JWKS: usize = 256 * 1024;

pub async fn configuration(State(state): State<AppState>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    // The token endpoint that checks assertions against it; else where the caller came.
    let origin = match state.settings.trusted_base() {
        Some(base) => base.to_string(),
        None => origin(&parts, &state.settings),
    };
    let document = json!({
        "issuer": origin,
        "token_endpoint": format!("{origin}/auth/token"),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384", "RS256", "ES256"],
        "scopes_supported": [
            "system/*.rs", "system/*.cruds", "system/*.read", "system/*.write", "system/*.*",
            "system/Patient.rs"
        ],
        "capabilities": ["client-confidential-asymmetric", "permission-v2", "permission-v1"],
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        document.to_string(),
    )
        .into_response()
}

pub async fn token(State(state): State<AppState>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    // The assertion's aud must be this endpoint's public URL, which only the configuration
    // can say: the Host header is the caller's to choose.
    let Some(base) = state.settings.trusted_base() else {
        return oauth_error(
            "server_error",
            "the token endpoint needs fhirbox's public base URL (serve --base-url, or \
             FHIRBOX_BASE_URL) to check an assertion's aud; SMART Backend Services is off \
             until it is set",
        );
    };
    let token_url = format!("{base}/auth/token");
    let address = ConnectInfo::<SocketAddr>::from_request_parts(&mut parts, &state)
        .await
        .ok()
        .map(|ConnectInfo(address)| address.ip());
    let Ok(body) = axum::body::to_bytes(body, MAX_TOKEN_BODY).await else {
        return oauth_error(
            "invalid_request",
            "the body is too large or could not be read",
        );
    };
    let request = token_request(&body);
    let sources = state.sources.clone();
    let fetch = move |uri: String| -> BoxFuture<'static, _> {
        let sources = sources.clone();
        Box::pin(async move {
            sources
                .fetch_small(&uri, MAX_JWKS)
                .await
                .map_err(|e| e.to_string())
        })
    };
    match state
        .auth
        .token(request, address, &token_url, &state.store, &fetch)
        .await
    {
        Ok(granted) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
                (header::PRAGMA, "no-cache"),
            ],
            json!(granted).to_string(),
        )
            .into_response(),
        Err(error) => oauth_error(error.code, &error.description),
    }
}

/// The form fields of a token request (others are ignored, as OAuth 2.0 says).
fn token_request(body: &Bytes) -> TokenRequest {
    let mut request = TokenRequest::default();
    for (name, value) in form_urlencoded_pairs(&String::from_utf8_lossy(body)) {
        match name.as_str() {
            "grant_type" => request.grant_type = Some(value),
            "client_assertion_type" => request.client_assertion_type = Some(value),
            "client_assertion" => request.client_assertion = Some(value),
            "scope" => request.scope = Some(value),
            _ => {}
        }
    }
    request
}
