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

/// What the token endpoint says of any assertion it does not accept.
pub const REFUSED: &str = "the client assertion was not accepted (the server's log says why)";

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
        // Failures count against the client address and against the client id the
        // assertion claims (its back-off), never against one key shared by everyone.
        let claimed = assertion::claimed_issuer(&assertion).unwrap_or_default();
        let attempt = self
            .guard
            .admit(&format!("Client/{claimed}"), address)
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
        // Every way an assertion fails is one answer, which tells a caller nothing about
        // which clients exist or which keys they have; the reason goes to the log.
        let client = verified.map_err(|refused| {
            tracing::info!(
                client = %claimed,
                reason = %refused.description,
                "a client assertion was refused"
            );
            error("invalid_client", REFUSED)
        })?;
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
            .issue(&client.id, &client.generation(), &granted)
            .map_err(|e| error("server_error", e.to_string()))?;
        Ok(TokenResponse {
            access_token,
            token_type: "bearer",
            expires_in: self.bearer.lifetime(),
            scope: granted.to_string(),
        })
    }
}
