//! The SQL of `$load`: COPY straight into a type's table for new ids, a temporary staging
//! table and an upsert for ids that already exist (or repeat within the load).
//!
//! Direct rows take `txid` (a `nextval` of the global sequence), `cts` and `ts` (`now()`)
//! from the columns' defaults. Everything runs in the caller's transaction.

use std::collections::HashSet;

use bytes::Bytes;
use futures_util::SinkExt;

use super::{Connection, GenericClient, StoreError};
use crate::resource_type::ResourceType;

/// Whether `rt`'s table has no rows (then every id of a load is new, but for repeats).
pub async fn is_empty(client: &impl GenericClient, rt: ResourceType) -> Result<bool, StoreError> {
    let sql = format!("SELECT NOT EXISTS (SELECT 1 FROM {})", rt.table());
    let statement = client.prepare_cached(&sql).await?;
    Ok(client.query_one(&statement, &[]).await?.get(0))
}

/// Which of `ids` exist in `rt`'s table (committed rows).
pub async fn existing_ids(
    client: &impl GenericClient,
    rt: ResourceType,
    ids: &[&str],
) -> Result<HashSet<String>, StoreError> {
    let sql = format!("SELECT id FROM {} WHERE id = ANY($1)", rt.table());
    let statement = client.prepare_cached(&sql).await?;
    let rows = client.query(&statement, &[&ids]).await?;
    Ok(rows.into_iter().map(|row| row.get(0)).collect())
}

/// The COPY of new rows: fields `id`, `resource_type`, `status`, `resource`.
pub fn copy_direct_sql(rt: ResourceType) -> String {
    format!(
        "COPY {} (id, resource_type, status, resource) FROM STDIN (FORMAT binary)",
        rt.table()
    )
}

fn stage_table(rt: ResourceType) -> String {
    format!("\"fhirbox_load_{}\"", rt.table_name())
}

/// Creates the staging table of `rt` for this transaction.
pub async fn create_stage(client: &impl GenericClient, rt: ResourceType) -> Result<(), StoreError> {
    let sql = format!(
        "CREATE TEMP TABLE IF NOT EXISTS {} (id text NOT NULL, line bigint NOT NULL, resource jsonb NOT NULL)
         ON COMMIT DROP",
        stage_table(rt)
    );
    client.batch_execute(&sql).await?;
    Ok(())
}

/// The COPY into the staging table: fields `id`, `line`, `resource`.
pub fn copy_stage_sql(rt: ResourceType) -> String {
    format!(
        "COPY {} (id, line, resource) FROM STDIN (FORMAT binary)",
        stage_table(rt)
    )
}

/// Sends one complete binary COPY stream (header, tuples, trailer) with `sql`.
pub async fn copy_in(client: &Connection, sql: &str, data: Bytes) -> Result<u64, StoreError> {
    let sink = client.copy_in(sql).await?;
    let mut sink = std::pin::pin!(sink);
    sink.send(data).await?;
    Ok(sink.as_mut().finish().await?)
}

/// Applies the staged rows of `rt`: for each id, the last staged line wins; an existing
/// resource is replaced (and, with `keep_history`, its replaced version kept in history).
pub async fn apply_stage(
    client: &impl GenericClient,
    rt: ResourceType,
    keep_history: bool,
) -> Result<(), StoreError> {
    let (table, history, stage) = (rt.table(), rt.history_table(), stage_table(rt));
    if keep_history {
        client
            .batch_execute(&format!(
                "INSERT INTO {history} SELECT * FROM {table} WHERE id IN (SELECT id FROM {stage})"
            ))
            .await?;
    }
    let upsert = format!(
        "INSERT INTO {table} (id, resource_type, status, resource)
         SELECT DISTINCT ON (id) id, $1, 'created', resource FROM {stage} ORDER BY id, line DESC
         ON CONFLICT (id) DO UPDATE
            SET txid = excluded.txid, ts = excluded.ts, status = 'updated', resource = excluded.resource"
    );
    client.execute(&upsert, &[&rt.name()]).await?;
    Ok(())
}
