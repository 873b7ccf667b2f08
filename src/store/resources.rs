//! Resource versions: create, update, delete, read, history and paging.
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
const COLUMNS: &str = "id, txid, cts, ts, status, resource";

/// What a read by id found.
#[derive(Debug)]
pub enum Lookup {
    Found(StoredResource),
    /// The resource existed and its latest version is a deletion.
    Deleted,
    Missing,
}

fn from_row(rt: ResourceType, row: &Row) -> StoredResource {
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

/// What a search page is filtered by (`_id`, `_lastUpdated`, token parameters); `None`: no
/// condition.
#[derive(Debug, Default, Clone)]
pub struct PageFilter {
    pub ids: Option<Vec<String>>,
    pub updated_from: Option<chrono::DateTime<chrono::Utc>>,
    pub updated_before: Option<chrono::DateTime<chrono::Utc>>,
    /// The search's other criteria, compiled by `search` to one condition on `r.resource`.
    pub condition: Option<super::condition::Condition>,
}

type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);

/// The filter as SQL on `r` (and the table's own columns), its values appended to `params`
/// (numbered after what is there already): bind parameters only.
fn filter_sql<'a>(filter: &'a PageFilter, params: &mut Vec<Param<'a>>) -> String {
    let n = params.len();
    let mut sql = format!(
        "(${a}::text[] IS NULL OR id = ANY(${a}))
            AND (${b}::timestamptz IS NULL OR ts >= ${b})
            AND (${c}::timestamptz IS NULL OR ts < ${c})",
        a = n + 1,
        b = n + 2,
        c = n + 3
    );
    params.extend([
        &filter.ids as Param<'a>,
        &filter.updated_from,
        &filter.updated_before,
    ]);
    if let Some(condition) = &filter.condition {
        let first = params.len() + 1;
        let rendered = condition.render(|i| format!("${}", first + i));
        sql.push_str(&format!(" AND ({rendered})"));
        params.extend(condition.binds.iter().map(|b| b as Param<'a>));
    }
    sql
}

/// Prepares a statement; those with search conditions vary with the request: not worth
/// caching (and the cache must not grow with what clients send).
async fn prepare(
    client: &impl GenericClient,
    filter: &PageFilter,
    sql: &str,
) -> Result<tokio_postgres::Statement, StoreError> {
    Ok(if filter.condition.is_none() {
        client.prepare_cached(sql).await?
    } else {
        client.prepare(sql).await?
    })
}

/// A page of current resources ordered by id, starting after `after` (keyset paging: stable
/// while other clients write, and an index range scan however deep the page). Fetches `limit`
/// rows.
pub async fn page(
    client: &impl GenericClient,
    rt: ResourceType,
    filter: &PageFilter,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<StoredResource>, StoreError> {
    // Ids are never empty, so '' starts before the first one.
    let after = after.unwrap_or("");
    let mut params: Vec<Param<'_>> = vec![&after, &limit];
    let condition = filter_sql(filter, &mut params);
    let sql = format!(
        "SELECT {COLUMNS} FROM {} AS r WHERE id > $1 AND {condition} ORDER BY id LIMIT $2",
        rt.table()
    );
    let statement = prepare(client, filter, &sql).await?;
    let rows = client.query(&statement, &params).await?;
    Ok(rows.iter().map(|row| from_row(rt, row)).collect())
}

/// How many current resources match the filter (a search's `_total=accurate`).
pub async fn count(
    client: &impl GenericClient,
    rt: ResourceType,
    filter: &PageFilter,
) -> Result<i64, StoreError> {
    let mut params: Vec<Param<'_>> = Vec::new();
    let condition = filter_sql(filter, &mut params);
    let sql = format!("SELECT count(*) FROM {} AS r WHERE {condition}", rt.table());
    let statement = prepare(client, filter, &sql).await?;
    Ok(client.query_one(&statement, &params).await?.get(0))
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
