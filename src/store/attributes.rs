//! Small configuration tables read whole and cached: Attributes (format conversion) and
//! AccessPolicies (authorization). A [`Stamp`] tells a cache when to read them again.

use serde_json::Value;

use super::{GenericClient, StoreError};
use crate::resource_type::ResourceType;

/// Changes whenever a resource of the table is created, changed or deleted: the newest
/// version id in the table and in its history (a delete adds a history version), and the row
/// count (rows removed by hand with SQL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp(Option<i64>, Option<i64>, i64);

pub async fn stamp_of(client: &impl GenericClient, rt: ResourceType) -> Result<Stamp, StoreError> {
    let sql = format!(
        "SELECT (SELECT max(txid) FROM {table}), (SELECT max(txid) FROM {history}),
                (SELECT count(*) FROM {table})",
        table = rt.table(),
        history = rt.history_table()
    );
    let statement = client.prepare_cached(&sql).await?;
    let row = client.query_one(&statement, &[]).await?;
    Ok(Stamp(row.get(0), row.get(1), row.get(2)))
}

/// Every current resource of the table: (id, body).
pub async fn all_of(
    client: &impl GenericClient,
    rt: ResourceType,
) -> Result<Vec<(String, Value)>, StoreError> {
    let sql = format!("SELECT id, resource FROM {}", rt.table());
    let statement = client.prepare_cached(&sql).await?;
    let rows = client.query(&statement, &[]).await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

fn attribute() -> ResourceType {
    ResourceType::parse("Attribute").expect("a fhirbox type")
}

/// The stamp of the `attribute` table.
pub async fn stamp(client: &impl GenericClient) -> Result<Stamp, StoreError> {
    stamp_of(client, attribute()).await
}

/// The bodies of every current Attribute.
pub async fn all(client: &impl GenericClient) -> Result<Vec<Value>, StoreError> {
    Ok(all_of(client, attribute())
        .await?
        .into_iter()
        .map(|(_, body)| body)
        .collect())
}
