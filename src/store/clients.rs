//! Client credentials: the argon2 hash of each Client's secret, kept in a table of its own
//! (`fhirbox_client_secret`), never in the Client resource, so no read path (REST, history,
//! `$dump`, `$dump-csv`, `$export`) can return it, and `$dump-sql`'s role cannot read it.

use serde_json::Value;

use super::{GenericClient, StoreError};

/// What authentication needs to know about a Client.
#[derive(Debug, Clone)]
pub struct ClientRecord {
    pub id: String,
    /// The version: a change of the Client invalidates cached verifications.
    pub txid: i64,
    /// When this Client was created (a Client deleted and created again is another one).
    pub created: chrono::DateTime<chrono::Utc>,
    /// The Client resource (without its secret, which is never in it).
    pub resource: Value,
    /// The secret's argon2 hash, if it has one.
    pub hash: Option<String>,
}

impl ClientRecord {
    /// What the Client's access tokens are bound to: a digest of when it was created and of
    /// what it may do and how it proves who it is (`scope`, `grant_types`, `jwks`,
    /// `jwks_uri`). Narrowing its scope, changing its keys or grants, or deleting and
    /// creating it again changes it, and its tokens stop working at once.
    pub fn generation(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut digest = Sha256::new();
        digest.update(self.created.timestamp_micros().to_le_bytes());
        for key in ["scope", "grant_types", "jwks", "jwks_uri"] {
            digest.update(key.as_bytes());
            digest.update(
                self.resource
                    .get(key)
                    .map(Value::to_string)
                    .unwrap_or_default()
                    .as_bytes(),
            );
            digest.update([0]);
        }
        digest
            .finalize()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Whether the Client's `grant_types` hold `grant` (`basic`, `client_credentials`).
    pub fn has_grant(&self, grant: &str) -> bool {
        self.resource
            .get("grant_types")
            .and_then(Value::as_array)
            .is_some_and(|grants| grants.iter().any(|g| g == grant))
    }
}

/// Sets (or replaces) a Client's secret hash.
pub async fn set_secret(
    client: &impl GenericClient,
    id: &str,
    hash: &str,
) -> Result<(), StoreError> {
    let statement = client
        .prepare_cached(
            "INSERT INTO fhirbox_client_secret (id, hash) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET hash = excluded.hash",
        )
        .await?;
    client.execute(&statement, &[&id, &hash]).await?;
    Ok(())
}

/// Removes a Client's secret (the Client was deleted).
pub async fn delete_secret(client: &impl GenericClient, id: &str) -> Result<(), StoreError> {
    let statement = client
        .prepare_cached("DELETE FROM fhirbox_client_secret WHERE id = $1")
        .await?;
    client.execute(&statement, &[&id]).await?;
    Ok(())
}

/// The current Client `id` and its secret hash, if the Client exists.
pub async fn find(
    client: &impl GenericClient,
    id: &str,
) -> Result<Option<ClientRecord>, StoreError> {
    let statement = client
        .prepare_cached(
            "SELECT c.txid, c.resource, s.hash, c.cts
               FROM client c LEFT JOIN fhirbox_client_secret s ON s.id = c.id
              WHERE c.id = $1",
        )
        .await?;
    let row = client.query_opt(&statement, &[&id]).await?;
    Ok(row.map(|row| ClientRecord {
        id: id.to_string(),
        txid: row.get(0),
        resource: row.get(1),
        hash: row.get(2),
        created: row.get(3),
    }))
}
