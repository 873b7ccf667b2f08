//! The SQL of a migration-mode import (`mode: migration`): versions that keep the
//! `versionId` (`txid`) and `lastUpdated` (`ts`) they had in the store they come from, in any
//! order, deletions among them, merged into a type's current and history tables.
//!
//! The versions are copied into a staging table (in the load's transaction), then merged in
//! set-based statements, one type at a time (an advisory lock per type: two inputs holding
//! versions of the same ids take turns):
//! 1. a version that is stored already with other content (or staged twice so) is an error
//!    naming its line; the same content again is skipped (a re-run changes nothing);
//! 2. per id, the newest new version that is newer than every stored one becomes the top:
//!    the current row it supersedes moves to history, and it becomes the current row (or,
//!    a deletion, leaves none);
//! 3. every other new version goes to history; a deletion keeps the body of the version
//!    before it (as fhirbox's own deletions do), `{}` when there is none;
//! 4. the version sequence moves past the highest version, so later writes get newer ones.

use super::copy::PG_EPOCH_MICROS;
use super::load::LoadTx;
use super::StoreError;
use crate::resource_type::ResourceType;

const STAGE: &str = "pg_temp.fhirbox_migrate";

/// A version refused: stored already (or staged twice) with other content.
#[derive(Debug)]
pub struct Conflict {
    pub line: i64,
    pub id: String,
    pub version: i64,
}

/// Creates the staging table (once per transaction).
pub async fn create_stage(tx: &LoadTx) -> Result<(), StoreError> {
    tx.conn()
        .batch_execute(&format!(
            "CREATE TEMP TABLE IF NOT EXISTS {STAGE} (
                 line bigint NOT NULL, resource_type text NOT NULL, id text NOT NULL,
                 txid bigint NOT NULL, ts timestamptz NOT NULL, status text NOT NULL,
                 resource jsonb NOT NULL
             ) ON COMMIT DROP"
        ))
        .await?;
    Ok(())
}

/// Copies a binary COPY stream of (line, resource_type, id, txid, ts, status, resource).
pub async fn copy_stage(tx: &LoadTx, data: bytes::Bytes) -> Result<u64, StoreError> {
    let sql = format!(
        "COPY {STAGE} (line, resource_type, id, txid, ts, status, resource) FROM STDIN (FORMAT binary)"
    );
    tx.copy_in(&sql, data).await
}

/// Merges the staged versions of `rt`; the versions written, or the first conflict.
pub async fn merge(tx: &LoadTx, rt: ResourceType) -> Result<Result<u64, Conflict>, StoreError> {
    let conn = tx.conn();
    let (table, history) = (rt.table(), rt.history_table());
    let name = rt.name();
    conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('fhirbox-migrate'), hashtext($1))",
        &[&name],
    )
    .await?;
    // Temporary tables have no statistics until analyzed: without them the planner takes
    // nested loops over them, quadratic in the versions (minutes at 100,000).
    conn.batch_execute(&format!("ANALYZE {STAGE}")).await?;
    let conflict = conn
        .query_opt(
            &format!(
                "SELECT max(line), id, txid FROM (
                     SELECT s.line, s.id, s.txid, s.status, s.resource FROM {STAGE} s
                      WHERE s.resource_type = $1
                     UNION ALL
                     SELECT NULL, e.id, e.txid, e.status, e.resource
                       FROM (SELECT id, txid, status, resource FROM {table}
                             UNION ALL SELECT id, txid, status, resource FROM {history}) e
                      WHERE EXISTS (SELECT 1 FROM {STAGE} s WHERE s.resource_type = $1
                                       AND s.id = e.id AND s.txid = e.txid)
                 ) AS v
                 GROUP BY id, txid
                 HAVING count(DISTINCT CASE WHEN status <> 'deleted' THEN resource END)
                        + max(CASE WHEN status = 'deleted' THEN 1 ELSE 0 END) > 1
                 ORDER BY 1 LIMIT 1"
            ),
            &[&name],
        )
        .await?;
    if let Some(row) = conflict {
        return Ok(Err(Conflict {
            line: row.get::<_, Option<i64>>(0).unwrap_or(0),
            id: row.get(1),
            version: row.get(2),
        }));
    }
    let statements = format!(
        "CREATE TEMP TABLE fhirbox_migrate_new AS
         SELECT DISTINCT ON (s.id, s.txid) s.id, s.txid, s.ts, s.status, s.resource
           FROM {STAGE} s
          WHERE s.resource_type = '{name}'
            AND NOT EXISTS (SELECT 1 FROM {table} t WHERE t.id = s.id AND t.txid = s.txid)
            AND NOT EXISTS (SELECT 1 FROM {history} h WHERE h.id = s.id AND h.txid = s.txid)
          ORDER BY s.id, s.txid, s.line;
         CREATE INDEX ON fhirbox_migrate_new (id, txid);
         ANALYZE fhirbox_migrate_new;
         UPDATE fhirbox_migrate_new d SET resource = coalesce((
             SELECT v.resource FROM (
                 SELECT id, txid, status, resource FROM fhirbox_migrate_new
                 UNION ALL SELECT id, txid, status, resource FROM {table}
                 UNION ALL SELECT id, txid, status, resource FROM {history}
             ) v WHERE v.id = d.id AND v.txid < d.txid AND v.status <> 'deleted'
             ORDER BY v.txid DESC LIMIT 1), '{{}}'::jsonb)
          WHERE d.status = 'deleted';
         CREATE TEMP TABLE fhirbox_migrate_top AS
         SELECT DISTINCT ON (n.id) n.id, n.txid FROM fhirbox_migrate_new n
          ORDER BY n.id, n.txid DESC;
         CREATE INDEX ON fhirbox_migrate_top (id);
         ANALYZE fhirbox_migrate_top;
         DELETE FROM fhirbox_migrate_top p
          WHERE EXISTS (SELECT 1 FROM {table} t WHERE t.id = p.id AND t.txid > p.txid)
             OR EXISTS (SELECT 1 FROM {history} h WHERE h.id = p.id AND h.txid > p.txid);
         WITH moved AS (
             DELETE FROM {table} t USING fhirbox_migrate_top p WHERE t.id = p.id
             RETURNING t.id, t.txid, t.cts, t.ts, t.resource_type, t.status, t.resource)
         INSERT INTO {history} (id, txid, cts, ts, resource_type, status, resource)
         SELECT * FROM moved;
         CREATE TEMP TABLE fhirbox_migrate_rows AS
         SELECT n.id, n.txid, n.ts, n.resource,
                CASE WHEN n.status = 'deleted' THEN 'deleted'
                     WHEN n.txid > min(n.txid) OVER (PARTITION BY n.id)
                       OR EXISTS (SELECT 1 FROM {history} h WHERE h.id = n.id AND h.txid < n.txid)
                       OR EXISTS (SELECT 1 FROM {table} t WHERE t.id = n.id AND t.txid < n.txid)
                     THEN 'updated' ELSE 'created' END AS status,
                (n.status <> 'deleted' AND EXISTS (SELECT 1 FROM fhirbox_migrate_top p
                                                    WHERE p.id = n.id AND p.txid = n.txid)) AS current
           FROM fhirbox_migrate_new n;
         INSERT INTO {table} (id, txid, cts, ts, resource_type, status, resource)
         SELECT id, txid, ts, ts, '{name}', status, resource FROM fhirbox_migrate_rows WHERE current;
         INSERT INTO {history} (id, txid, cts, ts, resource_type, status, resource)
         SELECT id, txid, ts, ts, '{name}', status, resource FROM fhirbox_migrate_rows WHERE NOT current;
         SELECT setval('transaction_id_seq', greatest(
             (SELECT max(txid) FROM fhirbox_migrate_rows),
             (SELECT last_value FROM transaction_id_seq)));"
    );
    conn.batch_execute(&statements).await?;
    let written: i64 = conn
        .query_one("SELECT count(*) FROM fhirbox_migrate_rows", &[])
        .await?
        .get(0);
    conn.batch_execute("DROP TABLE fhirbox_migrate_new, fhirbox_migrate_top, fhirbox_migrate_rows")
        .await?;
    Ok(Ok(written as u64))
}

/// An instant in PostgreSQL's binary form (microseconds since 2000-01-01 UTC).
pub fn pg_micros(at: &chrono::DateTime<chrono::Utc>) -> i64 {
    at.timestamp_micros() - PG_EPOCH_MICROS
}
