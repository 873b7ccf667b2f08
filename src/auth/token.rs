//! The token endpoint of SMART Backend Services (`POST /auth/token`): a client credentials
//! grant authenticated by a signed assertion ([`super::assertion`]), answered with a
//! short-lived access token ([`super::bearer`]) for the scopes asked for and registered
//! ([`super::scope`]). Failed attempts count against the client address like failed
//! passwords ([`super::guard`]).

use std::net::IpAddr;

use serde::Serialize;

use super::assertion::{self, Fetch, OAuthError};
use super::scope::Scopes;
use super::{AuthError, Authenticator};
use crate::store::Store;

/// The only client assertion type.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The form of a token request.
#[derive(Debug, Default)]
pub struct TokenRequest {
    pub grant_type: Option<String>,
    pub client_assertion_type: Option<String>,
    pub client_assertion: Option<String>,
    pub scope: Option<String>,
}

/// A granted token.
#[derive(Debug, Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    pub scope: String,
}

fn error(code: &'static str, description: impl Into<String>) -> OAuthError {
    OAuthError {
        code,
        description: description.into(),
    }
}

impl Authenticator {
    /// Answers a token request sent from `address` to `token_url` (the endpoint's public URL:
    /// the assertion's `aud` must be it).
    pub async fn token(
        &self,
        request: TokenRequest,
        address: Option<IpAddr>,
        token_url: &str,
        store: &Store,
        fetch: Fetch<'_>,
    ) -> Result<TokenResponse, OAuthError> {
        match request.grant_type.as_deref() {
            Some("client_credentials") => {}
            Some(other) => {
                return Err(error(
                    "unsupported_grant_type",
                    format!("grant_type '{other}' is not supported: use client_credentials"),
                ))
            }
            None => return Err(error("invalid_request", "grant_type is missing")),
        }
        if request.client_assertion_type.as_deref() != Some(JWT_BEARER) {
            return Err(error(
                "invalid_client",
                format!("client_assertion_type must be {JWT_BEARER}"),
            ));
        }
        let assertion = request
            .client_assertion
            .ok_or_else(|| error("invalid_client", "client_assertion is missing"))?;
        let asked = Scopes::parse(request.scope.as_deref().unwrap_or_default());
        if asked.is_empty() {
            return Err(error(
                "invalid_scope",
                "scope is missing or has no system/ scope fhirbox knows (system/Patient.rs, system/*.rs, system/*.read)",
            ));
        }
        let attempt = self
            .guard
            .admit("token endpoint", address)
            .await
            .map_err(|e| match e {
                AuthError::Throttled { retry_after } => error(
                    "temporarily_unavailable",
                    format!(
                        "too many failed attempts from this address; try again in {} s",
                        retry_after.as_secs()
                    ),
                ),
                other => error("temporarily_unavailable", other.to_string()),
            })?;
        let verified = assertion::verify(&assertion, token_url, store, &self.keys, fetch).await;
        attempt.finish(verified.is_ok());
        let client = verified?;
        let registered = match client.resource.get("scope") {
            Some(serde_json::Value::String(text)) => Scopes::parse(text),
            Some(serde_json::Value::Array(items)) => {
                Scopes::from_list(items.iter().filter_map(serde_json::Value::as_str))
            }
            _ => Scopes::default(),
        };
        let granted = asked.intersect(&registered);
        if granted.is_empty() {
            return Err(error(
                "invalid_scope",
                format!(
                    "none of the scopes asked for ({asked}) is within the registered scope of Client '{}' ({registered})",
                    client.id
                ),
            ));
        }
        let access_token = self
            .bearer
            .issue(&client.id, &granted)
            .map_err(|e| error("server_error", e.to_string()))?;
        Ok(TokenResponse {
            access_token,
            token_type: "bearer",
            expires_in: self.bearer.lifetime(),
            scope: granted.to_string(),
        })
    }
}
