//! SMART's `client-confidential-asymmetric` authentication: the signed JWT ("client
//! assertion") a Backend Services client sends to the token endpoint.
//!
//! Checked as the profile says: the Client named by `iss` exists and may use
//! `client_credentials`; its key is found by `kid` (and a `kty` that fits `alg`) in its
//! registered `jwks`, or in the JWK Set at its `jwks_uri` (fetched, cached as the response's
//! `Cache-Control` allows, at most [`MAX_CACHE`], fetched again when a `kid` is unknown); a
//! `jku` header must be the registered `jwks_uri`; the signature verifies (RS384, ES384,
//! RS256 or ES256); `iss` = `sub` = the client id, `aud` = the token endpoint, `exp` at most
//! five minutes ahead and not past (a minute of clock skew allowed), `jti` never seen before
//! for this client within its lifetime (kept in the database, so across processes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::future::BoxFuture;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use crate::store::clients::{self, ClientRecord};
use crate::store::{tokens, Store};

/// The signing algorithms fhirbox accepts for client assertions.
pub const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS384,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::ES256,
];

/// How far ahead an assertion's `exp` may be (the profile's five minutes).
const MAX_LIFETIME: i64 = 300;

/// Clock skew allowed between the client and fhirbox.
const LEEWAY: u64 = 60;

/// The longest a fetched JWK Set is kept.
const MAX_CACHE: Duration = Duration::from_secs(300);

/// How soon a JWK Set may be fetched again for an unknown `kid` (a bad assertion must not
/// make fhirbox hammer a client's server).
const REFETCH_AFTER: Duration = Duration::from_secs(10);

/// Fetches a JWK Set URL: its body and the `max-age` its `Cache-Control` gives.
pub type Fetch<'a> =
    &'a (dyn Fn(String) -> BoxFuture<'static, Result<(Vec<u8>, Option<Duration>), String>> + Sync);

/// Why an assertion is refused: an OAuth 2.0 error code and a description.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {description}")]
pub struct OAuthError {
    /// `invalid_client`, `invalid_grant`, `invalid_scope`, `unsupported_grant_type`, ...
    pub code: &'static str,
    pub description: String,
}

fn invalid_client(description: impl Into<String>) -> OAuthError {
    OAuthError {
        code: "invalid_client",
        description: description.into(),
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    iss: Option<String>,
    exp: Option<i64>,
    iat: Option<i64>,
    jti: Option<String>,
}

/// How long fetching a JWK Set may take in all (a server that trickles its answer must not
/// hold a token request for minutes).
const FETCH_DEADLINE: Duration = Duration::from_secs(10);

/// Fetched JWK Sets by URL.
#[derive(Default)]
pub struct KeyCache {
    sets: Mutex<HashMap<String, (JwkSet, Instant, Duration)>>,
    /// One fetch at a time per URL: token requests arriving together wait for it and share it.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// The `iss` an assertion claims, before anything is verified (to count failures per
/// client), if it has one.
pub fn claimed_issuer(assertion: &str) -> Option<String> {
    payload(assertion).ok()?.iss
}

/// Checks a Client's SMART registration when it is written: `jwks` a JWK Set whose keys are
/// RSA or EC with a `kid`, `jwks_uri` an `https` URL, `scope` a list (or a space-separated
/// string) of scopes. `Err((element, message))`.
pub fn check_registration(client: &serde_json::Map<String, Value>) -> Result<(), (String, String)> {
    if let Some(jwks) = client.get("jwks") {
        let set: JwkSet = serde_json::from_value(jwks.clone())
            .map_err(|e| ("jwks".to_string(), format!("not a JWK Set: {e}")))?;
        for (index, jwk) in set.keys.iter().enumerate() {
            let usable = matches!(
                jwk.algorithm,
                AlgorithmParameters::RSA(_) | AlgorithmParameters::EllipticCurve(_)
            );
            if !usable || jwk.common.key_id.is_none() {
                return Err((
                    format!("jwks.keys[{index}]"),
                    "each key must be an RSA or EC public key with a kid".into(),
                ));
            }
        }
    }
    if let Some(uri) = client.get("jwks_uri") {
        let ok = uri
            .as_str()
            .and_then(|u| url::Url::parse(u).ok())
            .is_some_and(|u| u.scheme() == "https");
        if !ok {
            return Err(("jwks_uri".into(), "jwks_uri must be an https URL".into()));
        }
    }
    match client.get("scope") {
        None | Some(Value::String(_)) => Ok(()),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => Ok(()),
        Some(_) => Err((
            "scope".into(),
            "scope must be a list of scopes (or one space-separated string)".into(),
        )),
    }
}

/// Verifies an assertion sent to `token_url`; the Client it authenticates.
pub async fn verify(
    assertion: &str,
    token_url: &str,
    store: &Store,
    cache: &KeyCache,
    fetch: Fetch<'_>,
) -> Result<ClientRecord, OAuthError> {
    let header = decode_header(assertion)
        .map_err(|e| invalid_client(format!("the client_assertion is not a JWT: {e}")))?;
    if !ALGORITHMS.contains(&header.alg) {
        return Err(invalid_client(format!(
            "the client_assertion is signed with {:?}; fhirbox accepts RS384, ES384, RS256 and ES256",
            header.alg
        )));
    }
    let kid = header
        .kid
        .clone()
        .ok_or_else(|| invalid_client("the client_assertion's header has no kid"))?;
    let unverified = payload(assertion)?;
    let client_id = unverified
        .iss
        .clone()
        .ok_or_else(|| invalid_client("the client_assertion has no iss"))?;
    let client = {
        let conn = store
            .connection()
            .await
            .map_err(|e| invalid_client(format!("clients cannot be read now: {e}")))?;
        clients::find(&conn, &client_id)
            .await
            .map_err(|e| invalid_client(format!("clients cannot be read now: {e}")))?
    }
    .ok_or_else(|| invalid_client(format!("no Client '{client_id}' is registered")))?;
    if !client.has_grant("client_credentials") {
        return Err(OAuthError {
            code: "unauthorized_client",
            description: format!("Client '{client_id}' may not use client_credentials"),
        });
    }
    let jwks_uri = client.resource.get("jwks_uri").and_then(Value::as_str);
    if let Some(jku) = &header.jku {
        if Some(jku.as_str()) != jwks_uri {
            return Err(invalid_client(
                "the jku header is not the Client's registered jwks_uri",
            ));
        }
    }
    let key = match (client.resource.get("jwks"), jwks_uri) {
        (Some(jwks), _) => {
            let set: JwkSet = serde_json::from_value(jwks.clone())
                .map_err(|e| invalid_client(format!("the Client's jwks is not a JWK Set: {e}")))?;
            pick(&set, &kid, header.alg)?
        }
        (None, Some(uri)) => cache.key(uri, &kid, header.alg, fetch).await?,
        (None, None) => {
            return Err(invalid_client(format!(
                "Client '{client_id}' has no jwks nor jwks_uri"
            )))
        }
    };
    let claims = check_signature(assertion, &key, header.alg, &client_id, token_url)?;
    let (Some(exp), Some(jti)) = (claims.exp, claims.jti) else {
        return Err(invalid_client("the client_assertion needs exp and jti"));
    };
    let now = chrono::Utc::now().timestamp();
    // RFC 7523: an assertion issued in the future is refused (`nbf` is checked with the
    // signature).
    if claims.iat.is_some_and(|iat| iat > now + LEEWAY as i64) {
        return Err(invalid_client(
            "the client_assertion's iat is in the future",
        ));
    }
    if exp > now + MAX_LIFETIME + LEEWAY as i64 {
        return Err(invalid_client(
            "the client_assertion's exp is more than five minutes ahead",
        ));
    }
    let expires = chrono::DateTime::from_timestamp(exp, 0).unwrap_or_else(chrono::Utc::now);
    let first = {
        let conn = store
            .connection()
            .await
            .map_err(|e| invalid_client(format!("the jti cannot be checked now: {e}")))?;
        tokens::first_use(&conn, &client_id, &jti, expires)
            .await
            .map_err(|e| invalid_client(format!("the jti cannot be checked now: {e}")))?
    };
    if !first {
        return Err(invalid_client(
            "this client_assertion's jti was used before (a replay)",
        ));
    }
    Ok(client)
}

/// The claims, before the signature is checked (to find the Client and its keys).
fn payload(assertion: &str) -> Result<Claims, OAuthError> {
    let part = assertion
        .split('.')
        .nth(1)
        .ok_or_else(|| invalid_client("the client_assertion is not a JWT"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| invalid_client("the client_assertion's claims are not base64url"))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| invalid_client(format!("the client_assertion's claims: {e}")))
}

/// Verifies the signature and the registered claims.
fn check_signature(
    assertion: &str,
    key: &DecodingKey,
    alg: Algorithm,
    client_id: &str,
    token_url: &str,
) -> Result<Claims, OAuthError> {
    let mut validation = Validation::new(alg);
    validation.set_audience(&[token_url]);
    validation.set_issuer(&[client_id]);
    validation.sub = Some(client_id.to_string());
    validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    validation.leeway = LEEWAY;
    validation.validate_nbf = true;
    decode::<Claims>(assertion, key, &validation)
        .map(|data| data.claims)
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            let why = match e.kind() {
                ErrorKind::InvalidSignature => {
                    "its signature does not verify with the Client's key".to_string()
                }
                ErrorKind::InvalidAudience => {
                    format!("its aud is not the token endpoint ({token_url})")
                }
                ErrorKind::ExpiredSignature => "it has expired".to_string(),
                ErrorKind::ImmatureSignature => "its nbf is in the future".to_string(),
                ErrorKind::InvalidIssuer => "its iss is not the client id".to_string(),
                ErrorKind::InvalidSubject => "its sub is not the client id".to_string(),
                ErrorKind::MissingRequiredClaim(claim) => format!("it has no {claim}"),
                _ => e.to_string(),
            };
            invalid_client(format!("the client_assertion is refused: {why}"))
        })
}

/// The one key of `set` with this `kid` and a type that fits `alg`.
fn pick(set: &JwkSet, kid: &str, alg: Algorithm) -> Result<DecodingKey, OAuthError> {
    let fits = |jwk: &&Jwk| {
        jwk.common.key_id.as_deref() == Some(kid)
            && matches!(
                (&jwk.algorithm, alg),
                (
                    AlgorithmParameters::RSA(_),
                    Algorithm::RS256 | Algorithm::RS384
                ) | (
                    AlgorithmParameters::EllipticCurve(_),
                    Algorithm::ES256 | Algorithm::ES384
                )
            )
    };
    let mut found = set.keys.iter().filter(fits);
    match (found.next(), found.next()) {
        (Some(jwk), None) => DecodingKey::from_jwk(jwk)
            .map_err(|e| invalid_client(format!("the key '{kid}' cannot be used: {e}"))),
        (None, _) => Err(invalid_client(format!(
            "the Client has no key with kid '{kid}' for {alg:?}"
        ))),
        (Some(_), Some(_)) => Err(invalid_client(format!(
            "the Client has more than one key with kid '{kid}'"
        ))),
    }
}

impl KeyCache {
    /// The key `kid` of the JWK Set at `uri`, from the cache or fetched.
    async fn key(
        &self,
        uri: &str,
        kid: &str,
        alg: Algorithm,
        fetch: Fetch<'_>,
    ) -> Result<DecodingKey, OAuthError> {
        let cached = self
            .lock()
            .get(uri)
            .filter(|(_, at, max_age)| at.elapsed() < *max_age)
            .map(|(set, at, _)| (set.clone(), *at));
        if let Some((set, at)) = &cached {
            match pick(set, kid, alg) {
                Ok(key) => return Ok(key),
                // An unknown kid: the client may have rotated its keys; fetch again, but not
                // more often than REFETCH_AFTER.
                Err(error) if at.elapsed() < REFETCH_AFTER => return Err(error),
                Err(_) => {}
            }
        }
        // One fetch per URL at a time; whoever waited for it reads what it cached.
        let turn = self.turn(uri);
        let _turn = turn.lock().await;
        let fresh = self
            .lock()
            .get(uri)
            .filter(|(_, at, max_age)| {
                at.elapsed() < *max_age && cached.as_ref().is_none_or(|(_, before)| at > before)
            })
            .map(|(set, _, _)| set.clone());
        if let Some(set) = fresh {
            return pick(&set, kid, alg);
        }
        let (body, max_age) = tokio::time::timeout(FETCH_DEADLINE, fetch(uri.to_string()))
            .await
            .map_err(|_| {
                invalid_client(format!(
                    "the Client's jwks_uri did not answer within {} s",
                    FETCH_DEADLINE.as_secs()
                ))
            })?
            .map_err(|e| invalid_client(format!("the Client's jwks_uri cannot be read: {e}")))?;
        let set: JwkSet = serde_json::from_slice(&body)
            .map_err(|e| invalid_client(format!("the Client's jwks_uri is not a JWK Set: {e}")))?;
        let max_age = max_age.unwrap_or(MAX_CACHE).min(MAX_CACHE);
        self.lock()
            .insert(uri.to_string(), (set.clone(), Instant::now(), max_age));
        pick(&set, kid, alg)
    }

    /// The lock fetches of `uri` take turns on.
    fn turn(&self, uri: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        // Forget the turns nobody waits on (bounded by the registered jwks_uris anyway).
        fetching.retain(|_, turn| Arc::strong_count(turn) > 1);
        fetching.entry(uri.to_string()).or_default().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (JwkSet, Instant, Duration)>> {
        self.sets.lock().unwrap_or_else(|p| p.into_inner())
    }
}
