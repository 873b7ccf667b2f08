//! Schema migrations, applied at every start-up.
//!
//! Idempotent and safe when several fhirbox processes start at once: everything runs in one
//! transaction under an advisory lock, versioned steps are recorded in `fhirbox_migrations`,
//! and the per-type tables are created for every type that has none yet (the list of types is
//! code, so a new version of fhirbox that knows a new type creates its tables on start).

use crate::resource_type::ResourceType;

use super::{Connection, StoreError};

/// An arbitrary constant shared by every fhirbox process: the advisory lock's key.
const MIGRATION_LOCK_KEY: i64 = 0x6668_6972_626f_7801;

/// Versioned steps: (version, description, SQL). Append only; never edit a released step.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "global version sequence",
    "CREATE SEQUENCE IF NOT EXISTS transaction_id_seq",
)];

/// The highest migration version this build knows.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |(version, _, _)| *version)
}

/// Brings the database's schema up to date.
pub async fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction().await?;
    // `IF NOT EXISTS` reports every existing object as a NOTICE: not worth a log line each.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS fhirbox_migrations (
             version     integer PRIMARY KEY,
             description text NOT NULL,
             applied_at  timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let applied: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM fhirbox_migrations",
            &[],
        )
        .await?
        .get(0);
    for (version, description, sql) in MIGRATIONS.iter().filter(|(v, _, _)| *v > applied) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO fhirbox_migrations (version, description) VALUES ($1, $2)",
            &[version, description],
        )
        .await?;
        tracing::info!(version, description, "applied migration");
    }
    create_missing_resource_tables(&tx).await?;
    tx.commit().await?;
    Ok(())
}

/// Creates the table pair of every known type that has no table yet.
async fn create_missing_resource_tables(
    tx: &deadpool_postgres::Transaction<'_>,
) -> Result<(), StoreError> {
    let existing: Vec<String> = tx
        .query(
            "SELECT c.relname FROM pg_class c
              WHERE c.relkind IN ('r', 'p')
                AND c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())",
            &[],
        )
        .await?
        .into_iter()
        .map(|row| row.get(0))
        .collect();
    let mut ddl = String::new();
    for rt in ResourceType::all() {
        if existing.iter().any(|name| name == rt.table_name()) {
            continue;
        }
        ddl.push_str(&table_ddl(rt));
    }
    if !ddl.is_empty() {
        tx.batch_execute(&ddl).await?;
    }
    Ok(())
}

/// The DDL of one type's table pair. The names come from the closed type list, never from a
/// request, and the type name is a plain ASCII identifier, so it is safe as a string literal.
fn table_ddl(rt: ResourceType) -> String {
    let table = rt.table();
    let history = rt.history_table();
    let name = rt.name();
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
             id            text PRIMARY KEY,
             txid          bigint NOT NULL DEFAULT nextval('transaction_id_seq'),
             cts           timestamptz NOT NULL DEFAULT now(),
             ts            timestamptz NOT NULL DEFAULT now(),
             resource_type text NOT NULL DEFAULT '{name}',
             status        text NOT NULL,
             resource      jsonb NOT NULL
         );
         CREATE TABLE IF NOT EXISTS {history} (
             LIKE {table} INCLUDING DEFAULTS,
             PRIMARY KEY (id, txid)
         );\n"
    )
}
