//! Authentication: every request except `GET /health` carries HTTP basic credentials.
//!
//! The root admin is `root`. Its password comes from configuration or is generated on first
//! start; either way only an argon2 hash is kept (on disk, mode 0600, for a generated one).
//! Verifying argon2 costs tens of milliseconds, so verified credentials are remembered in a
//! bounded cache keyed by a keyed hash of the credentials (see [`cache`]).

pub mod cache;
pub mod root;

use axum::http::{HeaderValue, StatusCode};
use base64::Engine as _;

use crate::http::error::ApiError;

pub use root::RootPassword;

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// The root admin: always allowed.
    Root,
}

impl Subject {
    pub fn name(&self) -> &str {
        match self {
            Subject::Root => "root",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: send HTTP basic credentials")]
    Missing,
    #[error("the Authorization header is not valid basic credentials")]
    Malformed,
    #[error("wrong user name or password")]
    Rejected,
    #[error("password hashing failed: {0}")]
    Hashing(String),
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> ApiError {
        if let AuthError::Hashing(_) = error {
            tracing::error!(%error, "authentication failed internally");
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                "authentication failed internally (logged on the server)",
            );
        }
        let mut api = ApiError::new(StatusCode::UNAUTHORIZED, "login", error.to_string());
        api.challenge = true;
        api
    }
}

/// Credentials from an `Authorization: Basic ...` header.
#[derive(Debug)]
pub struct BasicCredentials {
    pub user: String,
    pub password: String,
}

impl BasicCredentials {
    pub fn from_header(value: Option<&HeaderValue>) -> Result<BasicCredentials, AuthError> {
        let value = value.ok_or(AuthError::Missing)?;
        let text = value.to_str().map_err(|_| AuthError::Malformed)?;
        let (scheme, encoded) = text.trim().split_once(' ').ok_or(AuthError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(AuthError::Malformed);
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| AuthError::Malformed)?;
        let decoded = String::from_utf8(decoded).map_err(|_| AuthError::Malformed)?;
        let (user, password) = decoded.split_once(':').ok_or(AuthError::Malformed)?;
        Ok(BasicCredentials {
            user: user.to_string(),
            password: password.to_string(),
        })
    }
}

/// The authenticator shared by all requests.
pub struct Authenticator {
    root: RootPassword,
    verified: cache::VerifiedCache,
}

impl Authenticator {
    pub fn new(root: RootPassword) -> Authenticator {
        Authenticator {
            root,
            verified: cache::VerifiedCache::new(),
        }
    }

    /// Checks the request's credentials.
    pub async fn authenticate(&self, header: Option<&HeaderValue>) -> Result<Subject, AuthError> {
        let credentials = BasicCredentials::from_header(header)?;
        if credentials.user != "root" {
            return Err(AuthError::Rejected);
        }
        // Root's hash never changes while the process runs: its cache entries stay valid.
        const ROOT_GENERATION: i64 = 0;
        if self.verified.contains(&credentials, ROOT_GENERATION) {
            return Ok(Subject::Root);
        }
        if self.root.verify(&credentials.password).await? {
            self.verified.insert(&credentials, ROOT_GENERATION);
            return Ok(Subject::Root);
        }
        Err(AuthError::Rejected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_basic_credentials() {
        // The seed's header for bulk-client:secret.
        let header = HeaderValue::from_static("Basic YnVsay1jbGllbnQ6c2VjcmV0");
        let credentials = BasicCredentials::from_header(Some(&header)).expect("valid header");
        assert_eq!(
            (credentials.user.as_str(), credentials.password.as_str()),
            ("bulk-client", "secret")
        );
        let bearer = HeaderValue::from_static("Bearer abc");
        assert!(matches!(
            BasicCredentials::from_header(Some(&bearer)),
            Err(AuthError::Malformed)
        ));
        assert!(matches!(
            BasicCredentials::from_header(None),
            Err(AuthError::Missing)
        ));
    }
}
