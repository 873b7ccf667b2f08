//! The SQL of `$dump-csv`: the set of leaf paths of a type's resources (one aggregate pass),
//! then the resources themselves, in one snapshot.

use chrono::{DateTime, Utc};

use super::conn::Dedicated;
use super::copy_out::{copy_out_on, CopyOut};
use super::{Store, StoreError};
use crate::resource_type::ResourceType;

/// The fields of each row of [`start`]'s COPY.
pub mod fields {
    pub const ID: usize = 0;
    pub const RESOURCE: usize = 1;
    pub const COUNT: usize = 2;
}

fn since_filter(alias: &str, since: Option<&DateTime<Utc>>) -> String {
    since
        .map(|at| format!(" WHERE {alias}cts > {}", super::timestamp_literal(at)))
        .unwrap_or_default()
}

/// A read-only snapshot on a connection of its own, between [`paths`] and [`rows`].
pub struct Snapshot(Dedicated);

impl Snapshot {
    /// Ends the snapshot without reading rows (there are none).
    pub fn close(self) {
        self.0.close();
    }
}

/// Opens a read-only snapshot on a connection of its own and returns it with the sorted,
/// distinct leaf paths (`name.0.given.0`) of the documents `resource` + `id` + `resourceType`.
pub async fn paths(
    store: &Store,
    rt: ResourceType,
    since: Option<&DateTime<Utc>>,
) -> Result<(Snapshot, Vec<String>), StoreError> {
    let conn = store.dedicated().await?;
    conn.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let sql = format!(
        "WITH RECURSIVE leaves(path, value) AS (
             SELECT ARRAY[e.key], e.value
               FROM {table} t,
                    jsonb_each(t.resource || jsonb_build_object('id', t.id, 'resourceType', t.resource_type)) e
              {filter}
             UNION ALL
             SELECT l.path || c.k, c.v
               FROM leaves l
              CROSS JOIN LATERAL (
                  SELECT o.key AS k, o.value AS v
                    FROM jsonb_each(CASE WHEN jsonb_typeof(l.value) = 'object' THEN l.value END) o
                  UNION ALL
                  SELECT (a.i - 1)::text, a.v
                    FROM jsonb_array_elements(CASE WHEN jsonb_typeof(l.value) = 'array' THEN l.value END)
                         WITH ORDINALITY a(v, i)
              ) c
         )
         SELECT DISTINCT array_to_string(path, '.') FROM leaves
          WHERE jsonb_typeof(value) NOT IN ('object', 'array')",
        table = rt.table(),
        filter = since_filter("t.", since),
    );
    let rows = conn.query(&sql, &[]).await?;
    let mut paths: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    // Bytewise order, whatever the database's collation.
    paths.sort();
    // On an error above, dropping `conn` closes it with its transaction.
    Ok((Snapshot(conn), paths))
}

/// The rows, on the connection (and in the snapshot) [`paths`] opened.
pub async fn rows(
    Snapshot(conn): Snapshot,
    rt: ResourceType,
    since: Option<&DateTime<Utc>>,
) -> Result<CopyOut, StoreError> {
    let sql = format!(
        "COPY (SELECT id, resource FROM {}{}) TO STDOUT (FORMAT binary)",
        rt.table(),
        since_filter("", since)
    );
    Ok(copy_out_on(conn, &sql).await?.close_after())
}
