//! The search indexes in force, made so at start-up: each configured (type, parameter) gets
//! its function (`CREATE OR REPLACE`) and its index; fhirbox's search indexes that are no
//! longer configured are dropped with their functions. Names and function bodies come from
//! the R4 definitions and the checked configuration (`search::index`), never from a request.

use super::{Connection, StoreError};
use crate::resource_type::ResourceType;

/// Prefix of the name of every search index and its function (what start-up may drop).
pub const PREFIX: &str = "fhirbox_si_";

/// One index to create.
#[derive(Debug, Clone)]
pub struct Definition {
    pub rt: ResourceType,
    pub function: String,
    pub index: String,
    /// The function's SQL type.
    pub returns: &'static str,
    /// `USING ...` of the index: its method and expression.
    pub method: String,
    /// The extension the index needs, if any.
    pub extension: Option<&'static str>,
    /// The expression the function returns, of its argument `resource`.
    pub body: String,
}

/// What earlier versions named their search indexes and functions (`text[]` terms): dropped.
const LEGACY: (&str, &str) = ("fhirbox_sp_", "fhirbox_terms_");

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
              WHERE schemaname = current_schema()
                AND (starts_with(indexname, $1) OR starts_with(indexname, $2))",
            &[&PREFIX, &LEGACY.0],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut dropped = Vec::new();
    for name in &existing {
        if !wanted.iter().any(|d| &d.index == name) {
            // Names read back from the catalog, of fhirbox's own prefixes.
            let function = match name.strip_prefix(LEGACY.0) {
                Some(rest) => format!("{}{rest}", LEGACY.1),
                None => name.clone(),
            };
            tx.batch_execute(&format!(
                "DROP INDEX IF EXISTS \"{name}\"; DROP FUNCTION IF EXISTS \"{function}\"(jsonb)"
            ))
            .await?;
            dropped.push(name.clone());
        }
    }
    let schema: String = tx
        .query_one("SELECT quote_ident(current_schema())", &[])
        .await?
        .get(0);
    let mut created = Vec::new();
    for definition in wanted {
        if let Some(extension) = definition.extension {
            // A database fhirbox does not own may refuse: say what to do about it.
            if let Err(error) = tx
                .batch_execute(&format!("CREATE EXTENSION IF NOT EXISTS {extension}"))
                .await
            {
                return Err(StoreError::Invalid(format!(
                    "the search index {} needs the {extension} extension, which could not be \
                     created ({}): have the database owner run CREATE EXTENSION {extension}, \
                     or leave that index out of --search-indexes",
                    definition.index,
                    StoreError::from(error)
                )));
            }
        }
        // An index holds what its function computed: when this version computes something
        // else (another body), the index is built again, not left answering the old way.
        let source = format!(
            " SELECT {} ",
            super::search_functions::qualified(&definition.body, &schema)
        );
        let current: Option<String> = tx
            .query_opt(
                "SELECT prosrc FROM pg_proc
                  WHERE proname = $1 AND pronamespace = current_schema()::regnamespace",
                &[&definition.function],
            )
            .await?
            .map(|row| row.get(0));
        let stale = current.as_ref().is_some_and(|current| current != &source);
        if current.is_some() && !stale && existing.contains(&definition.index) {
            continue; // As this version makes it: nothing to do.
        }
        if stale {
            tx.batch_execute(&format!(
                "DROP INDEX IF EXISTS {}; DROP FUNCTION IF EXISTS {}(jsonb)",
                definition.index, definition.function
            ))
            .await?;
        }
        tx.batch_execute(&format!(
            "CREATE OR REPLACE FUNCTION {}(resource jsonb) RETURNS {}
             LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn${source}$fn$",
            definition.function, definition.returns
        ))
        .await?;
        if stale || !existing.contains(&definition.index) {
            tx.batch_execute(&format!(
                "CREATE INDEX IF NOT EXISTS {} ON {} USING {}",
                definition.index,
                definition.rt.table(),
                definition.method
            ))
            .await?;
            created.push(definition.index.clone());
        }
    }
    tx.commit().await?;
    Ok((created, dropped))
}
