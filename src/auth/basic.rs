//! HTTP basic credentials: root's password, or a Client's `id:secret` when `basic` is among
//! its `grant_types`. Checked through the [`super::guard`], remembered by the
//! [`super::cache`].

use std::net::IpAddr;

use base64::Engine as _;

use super::{secret, AuthError, Authenticator, Subject};
use crate::store::clients;
use crate::store::Store;

/// Credentials from an `Authorization: Basic ...` header.
#[derive(Debug)]
pub struct BasicCredentials {
    pub user: String,
    pub password: String,
}

impl BasicCredentials {
    /// From the part of an `Authorization` header after `Basic `.
    pub fn decode(encoded: &str) -> Result<BasicCredentials, AuthError> {
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

impl Authenticator {
    /// Checks basic credentials (root's, or a Client's) sent from `address`.
    pub(super) async fn basic(
        &self,
        credentials: BasicCredentials,
        address: Option<IpAddr>,
        store: &Store,
    ) -> Result<Subject, AuthError> {
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
                Some(client) if client.has_grant("basic") => match client.hash.clone() {
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
