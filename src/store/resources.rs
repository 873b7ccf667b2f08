//! Resource versions: create, update, delete, read and history (searches: [`super::search`]).
//!
//! Writes run inside a caller's transaction, so that a bundle or `PUT /` commits all of its
//! writes or none. Concurrent writers of one resource serialize on its row lock
//! (`SELECT ... FOR UPDATE`): each update copies the version it replaces into history before
//! replacing it, so every version is kept and none is lost.
//!
//! Table names come from [`ResourceType`], a closed list; every value is a bound parameter.

use serde_json::{Map, Value};
use tokio_postgres::Row;

use crate::resource::StoredResource;
use crate::resource_type::ResourceType;

use super::{GenericClient, StoreError, Tx};

/// The columns every read selects, in the order [`from_row`] expects.
pub(super) const COLUMNS: &str = "id, txid, cts, ts, status, resource";

/// What a read by id found.
#[derive(Debug)]
pub enum Lookup {
    Found(StoredResource),
    /// The resource existed and its latest version is a deletion.
    Deleted,
    Missing,
}

pub(super) fn from_row(rt: ResourceType, row: &Row) -> StoredResource {
    let body: Value = row.get(5);
    StoredResource {
        resource_type: rt,
        id: row.get(0),
        txid: row.get(1),
        cts: row.get(2),
        ts: row.get(3),
        status: row.get(4),
        body: match body {
            Value::Object(map) => map,
            // Only objects are ever written; anything else came from outside fhirbox.
            other => Map::from_iter([("value".to_string(), other)]),
        },
    }
}

/// The current version of a resource, or why there is none.
pub async fn read(
    client: &impl GenericClient,
    rt: ResourceType,
    id: &str,
) -> Result<Lookup, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM {} WHERE id = $1", rt.table());
    let statement = client.prepare_cached(&sql).await?;
    if let Some(row) = client.query_opt(&statement, &[&id]).await? {
        return Ok(Lookup::Found(from_row(rt, &row)));
    }
    Ok(
        if last_history_status(client, rt, id).await?.as_deref() == Some("deleted") {
            Lookup::Deleted
        } else {
            Lookup::Missing
        },
    )
}

/// The status of the newest history version, if any.
async fn last_history_status(
    client: &impl GenericClient,
    rt: ResourceType,
    id: &str,
) -> Result<Option<String>, StoreError> {
    let sql = format!(
        "SELECT status FROM {} WHERE id = $1 ORDER BY txid DESC LIMIT 1",
        rt.history_table()
    );
    let statement = client.prepare_cached(&sql).await?;
    Ok(client
        .query_opt(&statement, &[&id])
        .await?
        .map(|row| row.get(0)))
}

/// Creates a resource with a given id; fails with [`StoreError::AlreadyExists`] if a current
/// version exists. An id whose last version was deleted is re-created (`recreated`).
pub async fn create(
    tx: &Tx,
    rt: ResourceType,
    id: &str,
    body: &Map<String, Value>,
) -> Result<StoredResource, StoreError> {
    match insert_if_absent(tx, rt, id, body).await? {
        Some(created) => Ok(created),
        None => Err(StoreError::AlreadyExists {
            resource_type: rt.name().to_string(),
            id: id.to_string(),
        }),
    }
}

/// Creates or replaces a resource. Returns the new version and whether it was created.
pub async fn upsert(
    tx: &Tx,
    rt: ResourceType,
    id: &str,
    body: &Map<String, Value>,
) -> Result<(StoredResource, bool), StoreError> {
    let lock = format!("SELECT 1 FROM {} WHERE id = $1 FOR UPDATE", rt.table());
    let replace = format!(
        "WITH previous AS (INSERT INTO {history} SELECT * FROM {table} WHERE id = $1)
         UPDATE {table}
            SET txid = nextval('transaction_id_seq'), ts = now(), status = 'updated', resource = $2
          WHERE id = $1
         RETURNING {COLUMNS}",
        history = rt.history_table(),
        table = rt.table(),
    );
    let body_value = Value::Object(body.clone());
    loop {
        let lock = tx.prepare_cached(&lock).await?;
        if tx.query_opt(&lock, &[&id]).await?.is_some() {
            // We hold the row lock: the version we copy to history is the one we replace.
            let replace = tx.prepare_cached(&replace).await?;
            let row = tx.query_one(&replace, &[&id, &body_value]).await?;
            return Ok((from_row(rt, &row), false));
        }
        if let Some(created) = insert_if_absent(tx, rt, id, body).await? {
            return Ok((created, true));
        }
        // Another transaction created it between our two statements: lock and replace it.
    }
}

/// Inserts a first (or re-created) version unless a current version exists.
async fn insert_if_absent(
    tx: &Tx,
    rt: ResourceType,
    id: &str,
    body: &Map<String, Value>,
) -> Result<Option<StoredResource>, StoreError> {
    let status = match last_history_status(&**tx, rt, id).await?.as_deref() {
        Some("deleted") => "recreated",
        _ => "created",
    };
    let sql = format!(
        "INSERT INTO {} (id, txid, cts, ts, resource_type, status, resource)
         VALUES ($1, nextval('transaction_id_seq'), now(), now(), $2, $3, $4)
         ON CONFLICT (id) DO NOTHING
         RETURNING {COLUMNS}",
        rt.table()
    );
    let statement = tx.prepare_cached(&sql).await?;
    let body = Value::Object(body.clone());
    let row = tx
        .query_opt(&statement, &[&id, &rt.name(), &status, &body])
        .await?;
    Ok(row.map(|row| from_row(rt, &row)))
}

/// Deletes a resource: its current version moves to history, followed by a `deleted` version.
/// Returns the deleted version, or `None` if there was no current version.
pub async fn delete(
    tx: &Tx,
    rt: ResourceType,
    id: &str,
) -> Result<Option<StoredResource>, StoreError> {
    let sql = format!(
        "WITH gone AS (DELETE FROM {table} WHERE id = $1 RETURNING *),
              kept AS (INSERT INTO {history} SELECT * FROM gone)
         INSERT INTO {history} (id, txid, cts, ts, resource_type, status, resource)
         SELECT id, nextval('transaction_id_seq'), cts, now(), resource_type, 'deleted', resource
           FROM gone
         RETURNING {COLUMNS}",
        table = rt.table(),
        history = rt.history_table(),
    );
    let statement = tx.prepare_cached(&sql).await?;
    let row = tx.query_opt(&statement, &[&id]).await?;
    Ok(row.map(|row| from_row(rt, &row)))
}

/// Every version of a resource, newest first, at most `limit`.
pub async fn history(
    client: &impl GenericClient,
    rt: ResourceType,
    id: &str,
    limit: i64,
) -> Result<Vec<StoredResource>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM {table} WHERE id = $1
         UNION ALL
         SELECT {COLUMNS} FROM {history} WHERE id = $1
         ORDER BY txid DESC LIMIT $2",
        table = rt.table(),
        history = rt.history_table(),
    );
    let statement = client.prepare_cached(&sql).await?;
    let rows = client.query(&statement, &[&id, &limit]).await?;
    Ok(rows.iter().map(|row| from_row(rt, row)).collect())
}

/// One version of a resource by its version id.
pub async fn version(
    client: &impl GenericClient,
    rt: ResourceType,
    id: &str,
    txid: i64,
) -> Result<Option<StoredResource>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM {table} WHERE id = $1 AND txid = $2
         UNION ALL
         SELECT {COLUMNS} FROM {history} WHERE id = $1 AND txid = $2",
        table = rt.table(),
        history = rt.history_table(),
    );
    let statement = client.prepare_cached(&sql).await?;
    let row = client.query_opt(&statement, &[&id, &txid]).await?;
    Ok(row.map(|row| from_row(rt, &row)))
}

/// Creates or replaces a resource without keeping the replaced version: for server-managed
/// documents rewritten often (an import's status while it runs), where history would be noise.
pub async fn replace_in_place(
    client: &impl GenericClient,
    rt: ResourceType,
    id: &str,
    body: &Value,
) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO {} (id, resource_type, status, resource) VALUES ($1, $2, 'created', $3)
         ON CONFLICT (id) DO UPDATE
            SET txid = nextval('transaction_id_seq'), ts = now(), status = 'updated', resource = excluded.resource",
        rt.table()
    );
    let statement = client.prepare_cached(&sql).await?;
    client.execute(&statement, &[&id, &rt.name(), body]).await?;
    Ok(())
}

/// Removes a server-managed document and its history entirely (its id may be used again).
pub async fn remove(
    client: &impl GenericClient,
    rt: ResourceType,
    id: &str,
) -> Result<(), StoreError> {
    for table in [rt.table(), rt.history_table()] {
        let sql = format!("DELETE FROM {table} WHERE id = $1");
        let statement = client.prepare_cached(&sql).await?;
        client.execute(&statement, &[&id]).await?;
    }
    Ok(())
}
