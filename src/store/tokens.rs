//! The SQL of SMART Backend Services: the key that signs access tokens (one per database, so
//! every fhirbox process on it can check any token without asking the database again) and
//! the `jti`s of client assertions already used (so an assertion is accepted once, by any
//! process, within its lifetime).

use chrono::{DateTime, Utc};

use super::{GenericClient, StoreError};

/// The key access tokens are signed with: made on first use, then the same for every process.
pub async fn signing_key(client: &impl GenericClient) -> Result<Vec<u8>, StoreError> {
    let fresh: [u8; 32] = rand::random();
    client
        .execute(
            "INSERT INTO fhirbox_token_key (id, secret) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
            &[&fresh.as_slice()],
        )
        .await?;
    let row = client
        .query_one("SELECT secret FROM fhirbox_token_key WHERE id = 1", &[])
        .await?;
    Ok(row.get(0))
}

/// Records an assertion's `jti` for `client_id` until `expires`; `false` if it was seen
/// before (a replay). Forgets the expired ones on the way.
pub async fn first_use(
    client: &impl GenericClient,
    client_id: &str,
    jti: &str,
    expires: DateTime<Utc>,
) -> Result<bool, StoreError> {
    client
        .execute(
            "DELETE FROM fhirbox_jti WHERE expires_at < now() - interval '5 minutes'",
            &[],
        )
        .await?;
    let inserted = client
        .execute(
            "INSERT INTO fhirbox_jti (client_id, jti, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (client_id, jti) DO NOTHING",
            &[&client_id, &jti, &expires],
        )
        .await?;
    Ok(inserted == 1)
}
