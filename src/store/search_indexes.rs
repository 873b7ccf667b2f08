//! The search indexes in force, made so at start-up: each configured (type, parameter) gets
//! its terms function (`CREATE OR REPLACE`) and a GIN index on it; fhirbox's search indexes
//! that are no longer configured are dropped. Names and function bodies come from the R4
//! definitions and the checked configuration (`search::index`), never from a request.

use super::{Connection, StoreError};
use crate::search::index::Definition;

/// Prefix of every search index's name (what start-up may drop).
const PREFIX: &str = "fhirbox_sp_";

/// Makes the indexes of the database exactly `wanted`; the names of those created and
/// dropped. Serialized with other start-ups (and migrations) by a transaction lock.
pub async fn apply(
    conn: &mut Connection,
    wanted: &[Definition],
) -> Result<(Vec<String>, Vec<String>), StoreError> {
    let tx = conn.transaction().await?;
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('fhirbox search indexes'))",
        &[],
    )
    .await?;
    let existing: Vec<String> = tx
        .query(
            "SELECT indexname FROM pg_indexes
              WHERE schemaname = current_schema() AND starts_with(indexname, $1)",
            &[&PREFIX],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut created = Vec::new();
    for definition in wanted {
        tx.batch_execute(&format!(
            "CREATE OR REPLACE FUNCTION {}(resource jsonb) RETURNS text[]
             LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ {} $fn$",
            definition.function, definition.body
        ))
        .await?;
        if !existing.contains(&definition.index) {
            tx.batch_execute(&format!(
                "CREATE INDEX IF NOT EXISTS {} ON {} USING gin ({}(resource))",
                definition.index,
                definition.rt.table(),
                definition.function
            ))
            .await?;
            created.push(definition.index.clone());
        }
    }
    let mut dropped = Vec::new();
    for name in existing {
        if !wanted.iter().any(|d| d.index == name) {
            tx.batch_execute(&format!("DROP INDEX IF EXISTS \"{name}\""))
                .await?;
            dropped.push(name);
        }
    }
    tx.commit().await?;
    Ok((created, dropped))
}
