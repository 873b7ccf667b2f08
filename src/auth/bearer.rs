//! Access tokens for SMART Backend Services: short-lived JWTs signed (HS256) with a key kept in
//! the database, read once at start-up. Every fhirbox process on the database can check any
//! token without a database round trip; a token names its Client and its granted scopes, and
//! is never stored or logged.

use std::time::Duration;

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::scope::Scopes;
use super::AuthError;

/// Who signs: the `iss` of fhirbox's tokens.
const ISSUER: &str = "fhirbox";

/// The claims of an access token.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    /// The Client's id.
    sub: String,
    scope: String,
    exp: i64,
    iat: i64,
    jti: String,
    /// The Client's generation when the token was issued (see `ClientRecord::generation`).
    #[serde(default)]
    gen: String,
}

/// Issues and checks access tokens.
pub struct Bearer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    lifetime: Duration,
}

/// What a valid token says.
#[derive(Debug, Clone)]
pub struct Grant {
    pub client_id: String,
    pub scopes: Scopes,
    /// The generation of the Client it was issued to; the Client must still have it.
    pub generation: String,
}

impl Bearer {
    pub fn new(key: &[u8], lifetime: Duration) -> Bearer {
        Bearer {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            lifetime,
        }
    }

    /// Seconds a token lives.
    pub fn lifetime(&self) -> u64 {
        self.lifetime.as_secs()
    }

    /// A token for `client_id` (now at `generation`) with `scopes`.
    pub fn issue(
        &self,
        client_id: &str,
        generation: &str,
        scopes: &Scopes,
    ) -> Result<String, AuthError> {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            iss: ISSUER.to_string(),
            sub: client_id.to_string(),
            scope: scopes.to_string(),
            exp: now + self.lifetime.as_secs() as i64,
            iat: now,
            jti: crate::resource::new_id(),
            gen: generation.to_string(),
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Hashing(e.to_string()))
    }

    /// The grant of a token, if it is ours, intact and not expired (no leeway: fhirbox's
    /// processes share one clock source, the database's host's, closely enough).
    pub fn check(&self, token: &str) -> Result<Grant, AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = 0;
        let data = decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        Ok(Grant {
            client_id: data.claims.sub,
            scopes: Scopes::parse(&data.claims.scope),
            generation: data.claims.gen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_tampering_is_refused() {
        let bearer = Bearer::new(
            b"0123456789abcdef0123456789abcdef",
            Duration::from_secs(300),
        );
        let scopes = Scopes::parse("system/Patient.rs");
        let token = bearer.issue("bulk", "g1", &scopes).expect("issued");
        let grant = bearer.check(&token).expect("valid");
        assert_eq!(grant.client_id, "bulk");
        assert_eq!(grant.scopes, scopes);
        let other = Bearer::new(
            b"another key, another server.....",
            Duration::from_secs(300),
        );
        assert!(matches!(
            other.check(&token),
            Err(AuthError::InvalidToken(_))
        ));
        let mut tampered = token.clone();
        tampered.insert(token.find('.').expect("a dot") + 3, 'x');
        assert!(bearer.check(&tampered).is_err());
        let expired = Bearer::new(b"0123456789abcdef0123456789abcdef", Duration::ZERO);
        let token = expired.issue("bulk", "g1", &scopes).expect("issued");
        std::thread::sleep(Duration::from_millis(1100));
        assert!(expired.check(&token).is_err());
    }
}
