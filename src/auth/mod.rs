//! Authentication and authorization: every request but the public ones carries HTTP basic
//! credentials or a SMART Backend Services access token.
//!
//! - The root admin is `root`. Its password comes from configuration or is generated on first
//!   start; either way only an argon2 hash is kept (on disk, mode 0600, for a generated one).
//!   Root may do anything.
//! - A Client authenticates as `id:secret` when `basic` is among its `grant_types` ([`basic`];
//!   its secret's hash lives apart from the resource, [`crate::store::clients`]), or with a
//!   bearer token it got from the token endpoint with a signed assertion, when
//!   `client_credentials` is among them ([`token`], [`assertion`], [`bearer`]). What it may
//!   do is decided by AccessPolicies ([`policy`]): nothing, unless one allows it; a token's
//!   [`scope`]s narrow that further.
//!
//! Verifying argon2 costs tens of milliseconds, so verified credentials are remembered in a
//! bounded cache keyed by a keyed hash of the credentials and the version of the Client (see
//! [`cache`]): a changed Client is verified again. Every other password check goes through
//! the [`guard`]: a bounded pool, a budget of failures per client address, a back-off per
//! user name; and a user name that does not exist costs the same check as one that does (a
//! hash of a random secret stands in), so timing tells nothing about which names exist.

pub mod access;
pub mod assertion;
mod basic;
pub mod bearer;
pub mod cache;
pub mod guard;
pub mod policy;
pub mod root;
pub mod scope;
pub mod secret;
mod token;

use std::net::IpAddr;
use std::time::Duration;

use crate::store::clients::{self, ClientRecord};
use crate::store::{Store, StoreError};

pub use basic::BasicCredentials;
pub use root::RootPassword;
use scope::Scopes;
pub use token::{TokenRequest, TokenResponse};

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

/// An authenticated request: who, and for a bearer token, the scopes it was granted.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub subject: Subject,
    pub scopes: Option<Scopes>,
}

/// The credentials of a request.
pub enum Credentials {
    Basic(BasicCredentials),
    Bearer(String),
}

impl Credentials {
    /// From the `Authorization` header's value, if the request has one.
    pub fn from_header(value: Option<&[u8]>) -> Result<Credentials, AuthError> {
        let value = value.ok_or(AuthError::Missing)?;
        let text = std::str::from_utf8(value).map_err(|_| AuthError::Malformed)?;
        let text = text.trim();
        if text.eq_ignore_ascii_case("bearer") {
            return Ok(Credentials::Bearer(String::new()));
        }
        let (scheme, rest) = text.split_once(' ').ok_or(AuthError::Malformed)?;
        if scheme.eq_ignore_ascii_case("basic") {
            return BasicCredentials::decode(rest).map(Credentials::Basic);
        }
        if scheme.eq_ignore_ascii_case("bearer") {
            return Ok(Credentials::Bearer(rest.trim().to_string()));
        }
        Err(AuthError::Malformed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: send HTTP basic credentials or a bearer token")]
    Missing,
    #[error("the Authorization header is neither basic credentials nor a bearer token")]
    Malformed,
    /// A bearer token that is not ours, was changed, or expired.
    #[error("the access token is not valid ({0}); get a new one from the token endpoint")]
    InvalidToken(String),
    #[error("wrong user name or password")]
    Rejected,
    #[error("password hashing failed: {0}")]
    Hashing(String),
    #[error("too many failed attempts from this address; try again in {} s", retry_after.as_secs())]
    Throttled { retry_after: std::time::Duration },
    #[error("too many password checks at once; try again in a moment")]
    Busy,
    #[error(transparent)]
    Store(#[from] StoreError),
}
/// The authenticator shared by all requests.
pub struct Authenticator {
    root: RootPassword,
    verified: cache::VerifiedCache,
    guard: guard::Guard,
    /// What a password is checked against when the user name has none: the hash of a random
    /// secret, as slow to check as a real one.
    decoy: String,
    /// Issues and checks access tokens.
    bearer: bearer::Bearer,
    /// The JWK Sets fetched from Clients' `jwks_uri`s.
    keys: assertion::KeyCache,
    /// The AccessPolicies in force, compiled.
    pub policies: policy::PolicyCache,
}

impl Authenticator {
    /// `token_key`: the key access tokens are signed with (the database's); tokens live
    /// `token_lifetime`.
    pub fn new(
        root: RootPassword,
        limits: guard::GuardSettings,
        token_key: &[u8],
        token_lifetime: Duration,
    ) -> Result<Authenticator, AuthError> {
        let decoy = secret::hash_secret(&rand::random::<u64>().to_string())?;
        Ok(Authenticator {
            root,
            verified: cache::VerifiedCache::new(),
            guard: guard::Guard::new(limits),
            decoy: decoy.as_str().to_string(),
            bearer: bearer::Bearer::new(token_key, token_lifetime),
            keys: assertion::KeyCache::default(),
            policies: policy::PolicyCache::default(),
        })
    }

    /// Checks the request's credentials sent from `address`: basic credentials (root's, or a
    /// Client's) or a bearer token (a Client's, with its scopes).
    pub async fn authenticate(
        &self,
        header: Option<&[u8]>,
        address: Option<IpAddr>,
        store: &Store,
    ) -> Result<Authenticated, AuthError> {
        match Credentials::from_header(header)? {
            Credentials::Basic(credentials) => Ok(Authenticated {
                subject: self.basic(credentials, address, store).await?,
                scopes: None,
            }),
            Credentials::Bearer(token) => {
                let grant = self.bearer.check(&token)?;
                let conn = store.connection().await?;
                let client = clients::find(&conn, &grant.client_id).await?;
                // A Client deleted (or no longer allowed client_credentials) since the token
                // was issued: its tokens die with it. So do they when its scope, keys or
                // grants changed, or when it was deleted and created again.
                let client = client
                    .filter(|c| c.has_grant("client_credentials"))
                    .ok_or_else(|| AuthError::InvalidToken("its Client is gone".into()))?;
                if client.generation() != grant.generation {
                    return Err(AuthError::InvalidToken(
                        "its Client's registration changed since it was issued".into(),
                    ));
                }
                Ok(Authenticated {
                    subject: Subject::Client(client),
                    scopes: Some(grant.scopes),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_basic_and_bearer_headers() {
        // The seed's header for bulk-client:secret.
        let header = b"Basic YnVsay1jbGllbnQ6c2VjcmV0";
        let Ok(Credentials::Basic(credentials)) = Credentials::from_header(Some(header)) else {
            panic!("basic credentials")
        };
        assert_eq!(
            (credentials.user.as_str(), credentials.password.as_str()),
            ("bulk-client", "secret")
        );
        assert!(matches!(
            Credentials::from_header(Some(b"Bearer abc")),
            Ok(Credentials::Bearer(token)) if token == "abc"
        ));
        assert!(matches!(
            Credentials::from_header(Some(b"Digest x")),
            Err(AuthError::Malformed)
        ));
        assert!(matches!(
            Credentials::from_header(None),
            Err(AuthError::Missing)
        ));
    }
}
