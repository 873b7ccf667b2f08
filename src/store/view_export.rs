//! The statements of a view export (`$viewdefinition-export`): every view of one request
//! reads the same snapshot. A leader transaction exports its snapshot; each view's COPY runs
//! on a connection of its own in a read-only transaction that imports it (PostgreSQL's
//! `pg_export_snapshot` / `SET TRANSACTION SNAPSHOT`), so the views can be read one after
//! another and still agree.

use super::conn::Dedicated;
use super::copy_out::{copy_out_on, CopyOut};
use super::{Store, StoreError};

/// The open transaction whose snapshot the views read; dropping it ends the snapshot.
pub struct Snapshot {
    _leader: Dedicated,
    id: String,
}

/// Opens the leader transaction and exports its snapshot.
pub async fn snapshot(store: &Store) -> Result<Snapshot, StoreError> {
    let leader = store.dedicated().await?;
    leader
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let id: String = leader
        .query_one("SELECT pg_export_snapshot()", &[])
        .await?
        .get(0);
    Ok(Snapshot {
        _leader: leader,
        id,
    })
}

/// Starts `COPY (query) TO STDOUT` with `options` (`FORMAT csv, HEADER true`) in the
/// snapshot, under `limits` (a view's: its statement timeout, temp files, work memory); the
/// connection closes when the COPY ends.
pub async fn copy_in(
    store: &Store,
    snapshot: &Snapshot,
    query: &str,
    options: &str,
    limits: &super::session::SessionLimits,
) -> Result<CopyOut, StoreError> {
    let conn = store.dedicated().await?;
    // The snapshot id is PostgreSQL's own text (hex digits and dashes), checked besides.
    if !snapshot
        .id
        .bytes()
        .all(|b| b.is_ascii_hexdigit() || b == b'-')
    {
        return Err(StoreError::Invalid(format!(
            "unexpected snapshot id {}",
            snapshot.id
        )));
    }
    conn.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
         SET TRANSACTION SNAPSHOT '{}';",
        snapshot.id
    ))
    .await?;
    limits.apply(&*conn).await?;
    let copy = copy_out_on(conn, &format!("COPY (\n{query}\n) TO STDOUT ({options})")).await?;
    Ok(copy.close_after())
}
