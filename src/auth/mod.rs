//! Authentication and authorization: every request except `GET /health` carries HTTP basic
//! credentials.
//!
//! - The root admin is `root`. Its password comes from configuration or is generated on first
//!   start; either way only an argon2 hash is kept (on disk, mode 0600, for a generated one).
//!   Root may do anything.
//! - A Client authenticates as `id:secret` when `basic` is among its `grant_types`; its
//!   secret's hash lives apart from the resource ([`crate::store::clients`]). What it may do
//!   is decided by AccessPolicies ([`policy`]): nothing, unless one allows it.
//!
//! Verifying argon2 costs tens of milliseconds, so verified credentials are remembered in a
//! bounded cache keyed by a keyed hash of the credentials and the version of the Client (see
//! [`cache`]): a changed Client is verified again.

pub mod cache;
pub mod policy;
pub mod root;
pub mod secret;

use base64::Engine as _;

use crate::store::clients::{self, ClientRecord};
use crate::store::{Store, StoreError};

pub use root::RootPassword;

/// Who a request comes from.
#[derive(Debug, Clone)]
pub enum Subject {
    /// The root admin: always allowed.
    Root,
    /// A Client, allowed what its AccessPolicies allow.
    Client(ClientRecord),
}

impl Subject {
    /// `root`, or `Client/<id>`.
    pub fn name(&self) -> String {
        match self {
            Subject::Root => "root".to_string(),
            Subject::Client(client) => format!("Client/{}", client.id),
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
    #[error(transparent)]
    Store(#[from] StoreError),
}
/// Credentials from an `Authorization: Basic ...` header.
#[derive(Debug)]
pub struct BasicCredentials {
    pub user: String,
    pub password: String,
}

impl BasicCredentials {
    /// From the `Authorization` header's value, if the request has one.
    pub fn from_header(value: Option<&[u8]>) -> Result<BasicCredentials, AuthError> {
        let value = value.ok_or(AuthError::Missing)?;
        let text = std::str::from_utf8(value).map_err(|_| AuthError::Malformed)?;
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
    /// The AccessPolicies in force, compiled.
    pub policies: policy::PolicyCache,
}

impl Authenticator {
    pub fn new(root: RootPassword) -> Authenticator {
        Authenticator {
            root,
            verified: cache::VerifiedCache::new(),
            policies: policy::PolicyCache::default(),
        }
    }

    /// Checks the request's credentials: root's, or a Client's.
    pub async fn authenticate(
        &self,
        header: Option<&[u8]>,
        store: &Store,
    ) -> Result<Subject, AuthError> {
        let credentials = BasicCredentials::from_header(header)?;
        if credentials.user != "root" {
            return self.authenticate_client(credentials, store).await;
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

    async fn authenticate_client(
        &self,
        credentials: BasicCredentials,
        store: &Store,
    ) -> Result<Subject, AuthError> {
        let conn = store.connection().await?;
        let Some(client) = clients::find(&conn, &credentials.user).await? else {
            return Err(AuthError::Rejected);
        };
        drop(conn);
        let basic = client
            .resource
            .get("grant_types")
            .and_then(|g| g.as_array())
            .is_some_and(|grants| grants.iter().any(|g| g == "basic"));
        let Some(hash) = client.hash.clone().filter(|_| basic) else {
            return Err(AuthError::Rejected);
        };
        if self.verified.contains(&credentials, client.txid) {
            return Ok(Subject::Client(client));
        }
        if secret::verify_secret(hash, credentials.password.clone()).await? {
            self.verified.insert(&credentials, client.txid);
            return Ok(Subject::Client(client));
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
        let header = b"Basic YnVsay1jbGllbnQ6c2VjcmV0";
        let credentials = BasicCredentials::from_header(Some(header)).expect("valid header");
        assert_eq!(
            (credentials.user.as_str(), credentials.password.as_str()),
            ("bulk-client", "secret")
        );
        assert!(matches!(
            BasicCredentials::from_header(Some(b"Bearer abc")),
            Err(AuthError::Malformed)
        ));
        assert!(matches!(
            BasicCredentials::from_header(None),
            Err(AuthError::Missing)
        ));
    }
}
