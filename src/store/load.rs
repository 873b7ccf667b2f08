//! The SQL and the transaction of `$load`: COPY straight into a type's table, after deleting
//! the versions that the load replaces; a temporary staging table and an upsert only for ids
//! that repeat within the load.
//!
//! A [`LoadTx`] is the load's one transaction on a [`Dedicated`] connection: `BEGIN`, the
//! statements, a hook that runs last ([`BeforeCommit`]), `COMMIT`. Dropped before it commits
//! (an error, a client that went away), its connection is cancelled and closed, and
//! PostgreSQL rolls everything back. Copied rows take `txid` (a `nextval` of the global
//! sequence) from the column's default.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::SinkExt;

use super::conn::Dedicated;
use super::copy::PG_EPOCH_MICROS;
use super::{Connection, GenericClient, Store, StoreError};
use crate::resource_type::ResourceType;

/// Rows loaded per type.
pub type LoadCounts = BTreeMap<&'static str, u64>;

/// Runs in the load's transaction just before it commits, with the load's counts; `Ok(false)`
/// rolls the load back instead (the `$import` worker lost its claim on the input).
pub type BeforeCommit = Box<
    dyn for<'c> FnOnce(&'c Connection, &'c LoadCounts) -> BoxFuture<'c, Result<bool, StoreError>>
        + Send,
>;

/// The transaction of one load.
pub struct LoadTx {
    conn: Dedicated,
    /// The transaction's start (`now()`), in PostgreSQL's microseconds since 2000.
    now: i64,
    /// Per type, whether an `$export` was running when the load first replaced a row of it.
    exporting: std::sync::Mutex<HashMap<&'static str, bool>>,
}

impl LoadTx {
    /// Opens the load's transaction.
    pub async fn begin(store: &Store) -> Result<LoadTx, StoreError> {
        let conn = store.dedicated().await?;
        conn.batch_execute("BEGIN").await?;
        let now: DateTime<Utc> = conn.query_one("SELECT now()", &[]).await?.get(0);
        Ok(LoadTx {
            conn,
            now: now.timestamp_micros() - PG_EPOCH_MICROS,
            exporting: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The transaction's connection (for the migration SQL, `store::migrate`).
    pub(super) fn conn(&self) -> &Dedicated {
        &self.conn
    }

    /// Sends a binary COPY stream with `sql` (a `COPY ... FROM STDIN`).
    pub(super) async fn copy_in(&self, sql: &str, data: Bytes) -> Result<u64, StoreError> {
        copy_in(&self.conn, sql, data).await
    }

    /// The transaction's start time in PostgreSQL's microseconds: every row's `ts`, and the
    /// `cts` of new ones.
    pub fn now(&self) -> i64 {
        self.now
    }

    /// Whether `rt`'s table has no rows (then every id of a load is new, but for repeats).
    pub async fn is_empty(&self, rt: ResourceType) -> Result<bool, StoreError> {
        is_empty(&*self.conn, rt).await
    }

    /// See [`suspend_index`]. `single_type`: this load writes `rt` only.
    pub async fn suspend_index(
        &self,
        rt: ResourceType,
        single_type: bool,
    ) -> Result<bool, StoreError> {
        suspend_index(&*self.conn, rt, single_type).await
    }

    /// See [`restore_index`].
    pub async fn restore_index(&self, rt: ResourceType) -> Result<(), StoreError> {
        restore_index(&*self.conn, rt).await
    }

    /// See [`take_existing`].
    pub async fn take_existing(
        &self,
        rt: ResourceType,
        ids: &[&str],
        keep_history: bool,
    ) -> Result<HashMap<String, DateTime<Utc>>, StoreError> {
        let keep = self.keeps_history(rt, keep_history).await?;
        take_existing(&*self.conn, rt, ids, keep).await
    }

    /// Whether the versions a load replaces are kept in history: when asked (`update:
    /// true`), and also while an `$export` of the type runs, which may need them to export
    /// the resources as they were at its transactionTime (see `store::export`).
    async fn keeps_history(&self, rt: ResourceType, asked: bool) -> Result<bool, StoreError> {
        if asked {
            return Ok(true);
        }
        let known = self
            .exporting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(rt.name())
            .copied();
        if let Some(known) = known {
            return Ok(known);
        }
        let running = super::jobs::export_running(&*self.conn, rt.name()).await?;
        self.exporting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(rt.name(), running);
        Ok(running)
    }

    /// Copies a binary COPY stream of fields `id`, `cts`, `ts`, `resource_type`, `status`,
    /// `resource` into `rt`'s table.
    pub async fn copy_rows(&self, rt: ResourceType, data: Bytes) -> Result<u64, StoreError> {
        let sql = format!(
            "COPY {} (id, cts, ts, resource_type, status, resource) FROM STDIN (FORMAT binary)",
            rt.table()
        );
        copy_in(&self.conn, &sql, data).await
    }

    /// Copies a binary COPY stream of fields `id`, `line`, `resource` into `rt`'s staging
    /// table, creating it first when `create`.
    pub async fn copy_staged(
        &self,
        rt: ResourceType,
        data: Bytes,
        create: bool,
    ) -> Result<u64, StoreError> {
        if create {
            create_stage(&*self.conn, rt).await?;
        }
        let sql = format!(
            "COPY {} (id, line, resource) FROM STDIN (FORMAT binary)",
            stage_table(rt)
        );
        copy_in(&self.conn, &sql, data).await
    }

    /// See [`apply_stage`].
    pub async fn apply_stage(
        &self,
        rt: ResourceType,
        keep_history: bool,
    ) -> Result<(), StoreError> {
        let keep = self.keeps_history(rt, keep_history).await?;
        apply_stage(&*self.conn, rt, keep).await
    }

    /// Runs the hook, then commits; `Ok(false)`: the hook refused, nothing was committed.
    pub async fn commit(
        self,
        counts: &LoadCounts,
        before_commit: Option<BeforeCommit>,
    ) -> Result<bool, StoreError> {
        if let Some(check) = before_commit {
            if !check(&self.conn, counts).await? {
                // Dropping `self` rolls the load back.
                return Ok(false);
            }
        }
        self.conn.batch_execute("COMMIT").await?;
        self.conn.release();
        Ok(true)
    }
}

/// Whether `rt`'s table has no rows (then every id of a load is new, but for repeats).
async fn is_empty(client: &impl GenericClient, rt: ResourceType) -> Result<bool, StoreError> {
    let sql = format!("SELECT NOT EXISTS (SELECT 1 FROM {})", rt.table());
    let statement = client.prepare_cached(&sql).await?;
    Ok(client.query_one(&statement, &[]).await?.get(0))
}

/// Drops `rt`'s compartment index for the rest of this transaction, so that a load into an
/// empty table builds it once at the end ([`restore_index`]) instead of updating it row by
/// row (about a fifth of such a load's time). The drop locks the table until the load
/// commits. `false`: not dropped, and the load keeps the index up to date as usual.
///
/// Loads run at once (two inputs of one type in an `$import`, concurrent `$load`s) must not
/// deadlock on this DDL, so a load drops an index only when nothing can wait for it in a
/// cycle:
/// - only one load at a time per table may try (an advisory lock, not waited for), and it
///   takes the table's lock without waiting (`NOWAIT`: another load or a `$dump` already in
///   the table means no drop);
/// - a load of several types (a mixed `$load`, which may go on to wait for another table)
///   may drop only while no other mixed load holds a dropped index (one more advisory lock).
///
/// So whoever holds a dropped index either touches no other table or is the only mixed load
/// doing so: others may wait for it, it waits for no one who waits for it.
async fn suspend_index(
    client: &impl GenericClient,
    rt: ResourceType,
    single_type: bool,
) -> Result<bool, StoreError> {
    let Some((name, _)) = super::export::compartment_index(rt) else {
        return Ok(false);
    };
    // Both keys are fhirbox's constants and a table name from the closed type list.
    let allowed: bool = client
        .query_one(
            "SELECT pg_try_advisory_xact_lock(hashtext('fhirbox_suspend_index'), hashtext($1))
                AND ($2 OR pg_try_advisory_xact_lock(hashtext('fhirbox_suspend_index'), 0))",
            &[&rt.table_name(), &single_type],
        )
        .await?
        .get(0);
    if !allowed {
        return Ok(false);
    }
    client
        .batch_execute("SAVEPOINT fhirbox_suspend_index")
        .await?;
    // The index name is built from the closed type list, never from a request.
    let dropped = client
        .batch_execute(&format!(
            "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE NOWAIT; DROP INDEX IF EXISTS {name}",
            rt.table()
        ))
        .await;
    let restore = match &dropped {
        Ok(()) => "RELEASE SAVEPOINT fhirbox_suspend_index",
        Err(_) => {
            "ROLLBACK TO SAVEPOINT fhirbox_suspend_index; RELEASE SAVEPOINT fhirbox_suspend_index"
        }
    };
    client.batch_execute(restore).await?;
    match dropped {
        Ok(()) => Ok(true),
        Err(error)
            if error.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
        {
            Ok(false)
        }
        Err(error) => Err(error.into()),
    }
}

/// Builds again an index [`suspend_index`] dropped.
async fn restore_index(client: &impl GenericClient, rt: ResourceType) -> Result<(), StoreError> {
    if let Some((_, create)) = super::export::compartment_index(rt) {
        client.batch_execute(&create).await?;
    }
    Ok(())
}

/// Deletes the current versions of `ids` that exist (moving them to history with
/// `keep_history`) and returns their creation times: the load writes their new versions.
async fn take_existing(
    client: &impl GenericClient,
    rt: ResourceType,
    ids: &[&str],
    keep_history: bool,
) -> Result<HashMap<String, DateTime<Utc>>, StoreError> {
    let (table, history) = (rt.table(), rt.history_table());
    let sql = if keep_history {
        format!(
            "WITH gone AS (DELETE FROM {table} WHERE id = ANY($1) RETURNING *),
                  kept AS (INSERT INTO {history} SELECT * FROM gone)
             SELECT id, cts FROM gone"
        )
    } else {
        format!("DELETE FROM {table} WHERE id = ANY($1) RETURNING id, cts")
    };
    let statement = client.prepare_cached(&sql).await?;
    let rows = client.query(&statement, &[&ids]).await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect())
}

fn stage_table(rt: ResourceType) -> String {
    format!("\"fhirbox_load_{}\"", rt.table_name())
}

/// Creates the staging table of `rt` for this transaction.
async fn create_stage(client: &impl GenericClient, rt: ResourceType) -> Result<(), StoreError> {
    let sql = format!(
        "CREATE TEMP TABLE IF NOT EXISTS {} (id text NOT NULL, line bigint NOT NULL, resource jsonb NOT NULL)
         ON COMMIT DROP",
        stage_table(rt)
    );
    client.batch_execute(&sql).await?;
    Ok(())
}

/// Pieces a COPY stream is sent in: small enough that the driver's buffers stay small.
const SEND_PIECE: usize = 256 * 1024;

/// Sends one complete binary COPY stream (header, tuples, trailer) with `sql`.
async fn copy_in(client: &Connection, sql: &str, data: Bytes) -> Result<u64, StoreError> {
    let sink = client.copy_in(sql).await?;
    let mut sink = std::pin::pin!(sink);
    let mut rest = data;
    while !rest.is_empty() {
        let piece = rest.split_to(rest.len().min(SEND_PIECE));
        sink.feed(piece).await?;
    }
    sink.flush().await?;
    Ok(sink.as_mut().finish().await?)
}

/// Applies the staged rows of `rt` (lines whose id repeats within the load): for each id the
/// last staged line wins and replaces what the load wrote before (with `keep_history`, that
/// version is kept in history).
async fn apply_stage(
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
