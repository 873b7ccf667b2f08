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
//! [`cache`]): a changed Client is verified again. Every other password check goes through
//! the [`guard`]: a bounded pool, a budget of failures per client address, a back-off per
//! user name; and a user name that does not exist costs the same check as one that does (a
//! hash of a random secret stands in), so timing tells nothing about which names exist.

pub mod cache;
pub mod guard;
pub mod policy;
pub mod root;
pub mod secret;

use std::net::IpAddr;

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
    #[error("too many failed attempts from this address; try again in {} s", retry_after.as_secs())]
    Throttled { retry_after: std::time::Duration },
    #[error("too many password checks at once; try again in a moment")]
    Busy,
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
    guard: guard::Guard,
    /// What a password is checked against when the user name has none: the hash of a random
    /// secret, as slow to check as a real one.
    decoy: String,
    /// The AccessPolicies in force, compiled.
    pub policies: policy::PolicyCache,
}

impl Authenticator {
    pub fn new(
        root: RootPassword,
        limits: guard::GuardSettings,
    ) -> Result<Authenticator, AuthError> {
        let decoy = secret::hash_secret(&rand::random::<u64>().to_string())?;
        Ok(Authenticator {
            root,
            verified: cache::VerifiedCache::new(),
            guard: guard::Guard::new(limits),
            decoy: decoy.as_str().to_string(),
            policies: policy::PolicyCache::default(),
        })
    }

    /// Checks the request's credentials (root's, or a Client's) sent from `address`.
    pub async fn authenticate(
        &self,
        header: Option<&[u8]>,
        address: Option<IpAddr>,
        store: &Store,
    ) -> Result<Subject, AuthError> {
        let credentials = BasicCredentials::from_header(header)?;
        // Root's hash never changes while the process runs: its cache entries stay valid.
        const ROOT_GENERATION: i64 = 0;
        let (subject, hash, generation) = if credentials.user == "root" {
            (
                Some(Subject::Root),
                self.root.hash().to_string(),
                ROOT_GENERATION,
            )
        } else {
            let conn = store.connection().await?;
            let client = clients::find(&conn, &credentials.user).await?;
            drop(conn);
            match client {
                Some(client) if accepts_basic(&client) => match client.hash.clone() {
                    Some(hash) => {
                        let generation = client.txid;
                        (Some(Subject::Client(client)), hash, generation)
                    }
                    None => (None, self.decoy.clone(), 0),
                },
                _ => (None, self.decoy.clone(), 0),
            }
        };
        if subject.is_some() && self.verified.contains(&credentials, generation) {
            return subject.ok_or(AuthError::Rejected);
        }
        let turn = self.verified.turn(&credentials);
        let _turn = turn.lock().await;
        if subject.is_some() && self.verified.contains(&credentials, generation) {
            // Checked by the request that had the turn before.
            return subject.ok_or(AuthError::Rejected);
        }
        let attempt = self.guard.admit(&credentials.user, address).await?;
        let password = credentials.password.clone();
        let matches = self
            .guard
            .check(move || secret::verify_secret(&hash, &password))
            .await?;
        // A name without a password never matches, whatever the decoy says.
        let verified = matches && subject.is_some();
        attempt.finish(verified);
        match subject {
            Some(subject) if verified => {
                self.verified.insert(&credentials, generation);
                Ok(subject)
            }
            _ => Err(AuthError::Rejected),
        }
    }
}

/// Whether a Client may authenticate with basic credentials.
fn accepts_basic(client: &ClientRecord) -> bool {
    client
        .resource
        .get("grant_types")
        .and_then(|g| g.as_array())
        .is_some_and(|grants| grants.iter().any(|g| g == "basic"))
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
