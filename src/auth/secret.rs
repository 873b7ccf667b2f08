//! argon2id hashing of secrets (the root password, Client secrets). Slow on purpose, so it
//! runs on a blocking thread.

use argon2::password_hash::{PasswordHashString, SaltString};
use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};

use super::AuthError;

/// An argon2id hash (PHC string) of a secret with a fresh salt.
pub fn hash_secret(secret: &str) -> Result<PasswordHashString, AuthError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| AuthError::Hashing(e.to_string()))?;
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|hash| hash.serialize())
        .map_err(|e| AuthError::Hashing(e.to_string()))
}

/// [`hash_secret`] on a blocking thread.
pub async fn hash_secret_blocking(secret: String) -> Result<String, AuthError> {
    tokio::task::spawn_blocking(move || hash_secret(&secret).map(|hash| hash.as_str().to_string()))
        .await
        .map_err(|e| AuthError::Hashing(e.to_string()))?
}

/// Verifies a secret against a PHC hash (slow: call it off the async workers, through
/// [`super::guard::Guard::check`]). A malformed hash never matches.
pub fn verify_secret(hash: &str, secret: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    Argon2::default()
        .verify_password(secret.as_bytes(), &parsed)
        .is_ok()
}
