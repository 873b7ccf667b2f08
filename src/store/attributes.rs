//! The `attribute` table, as the format converter reads it.

use serde_json::Value;

use super::{GenericClient, StoreError};

/// Changes whenever an Attribute is created, changed or deleted: the newest version id in the
/// table and in its history (a delete adds a history version), and the row count (rows
/// removed by hand with SQL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp(Option<i64>, Option<i64>, i64);

pub async fn stamp(client: &impl GenericClient) -> Result<Stamp, StoreError> {
    let statement = client
        .prepare_cached(
            "SELECT (SELECT max(txid) FROM attribute), (SELECT max(txid) FROM attribute_history),
                    (SELECT count(*) FROM attribute)",
        )
        .await?;
    let row = client.query_one(&statement, &[]).await?;
    Ok(Stamp(row.get(0), row.get(1), row.get(2)))
}

/// The bodies of every current Attribute.
pub async fn all(client: &impl GenericClient) -> Result<Vec<Value>, StoreError> {
    let statement = client
        .prepare_cached("SELECT resource FROM attribute")
        .await?;
    let rows = client.query(&statement, &[]).await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}
