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
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "global version sequence",
        "CREATE SEQUENCE IF NOT EXISTS transaction_id_seq",
    ),
    (
        2,
        "client secret hashes, apart from the Client resources",
        "CREATE TABLE IF NOT EXISTS fhirbox_client_secret (
             id   text PRIMARY KEY,
             hash text NOT NULL
         )",
    ),
    (
        3,
        "import jobs and their inputs, claimed by workers",
        "CREATE TABLE IF NOT EXISTS fhirbox_import_job (
             id         text PRIMARY KEY,
             subject    text NOT NULL,
             fhir       boolean NOT NULL,
             keep_history boolean NOT NULL,
             cancelled  boolean NOT NULL DEFAULT false,
             created_at timestamptz NOT NULL DEFAULT now(),
             document   jsonb NOT NULL
         );
         CREATE TABLE IF NOT EXISTS fhirbox_import_input (
             job_id        text NOT NULL REFERENCES fhirbox_import_job (id) ON DELETE CASCADE,
             position      integer NOT NULL,
             resource_type text NOT NULL,
             url           text NOT NULL,
             status        text NOT NULL DEFAULT 'waiting',
             worker        text,
             lease_until   timestamptz,
             attempts      integer NOT NULL DEFAULT 0,
             total         bigint,
             bytes         bigint,
             started_at    timestamptz,
             finished_at   timestamptz,
             error         text,
             PRIMARY KEY (job_id, position)
         );
         CREATE INDEX IF NOT EXISTS fhirbox_import_input_claimable
             ON fhirbox_import_input (status, lease_until)",
    ),
    (
        4,
        "import jobs become generic jobs (imports and exports) and their tasks",
        "ALTER TABLE fhirbox_import_job RENAME TO fhirbox_job;
         ALTER TABLE fhirbox_job ADD COLUMN kind text NOT NULL DEFAULT 'import';
         ALTER TABLE fhirbox_import_input RENAME TO fhirbox_task;
         ALTER TABLE fhirbox_task ALTER COLUMN url DROP NOT NULL;
         ALTER TABLE fhirbox_task ADD COLUMN result jsonb;
         ALTER INDEX fhirbox_import_input_claimable RENAME TO fhirbox_task_claimable",
    ),
    (
        5,
        "a task's size: an import input's length in bytes, an export type's expected rows",
        "ALTER TABLE fhirbox_task ADD COLUMN size bigint",
    ),
    (
        6,
        "SMART Backend Services: the access-token signing key, used assertion ids",
        "CREATE TABLE IF NOT EXISTS fhirbox_token_key (
             id         integer PRIMARY KEY,
             secret     bytea NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now()
         );
         CREATE TABLE IF NOT EXISTS fhirbox_jti (
             client_id  text NOT NULL,
             jti        text NOT NULL,
             expires_at timestamptz NOT NULL,
             PRIMARY KEY (client_id, jti)
         );
         CREATE INDEX IF NOT EXISTS fhirbox_jti_expires ON fhirbox_jti (expires_at)",
    ),
    (
        7,
        "an export's manifest pages (allowPartialManifests): the task positions of each page",
        "ALTER TABLE fhirbox_job ADD COLUMN pages jsonb",
    ),
    (
        8,
        "SQL on FHIR views materialized in the sof schema, by the ViewDefinition they come from",
        "CREATE TABLE IF NOT EXISTS fhirbox_materialized (
             name       text PRIMARY KEY,
             view_id    text NOT NULL,
             kind       text NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now()
         );
         CREATE INDEX IF NOT EXISTS fhirbox_materialized_view ON fhirbox_materialized (view_id)",
    ),
];

/// Creates the database `name` on the server if it is missing (the managed cluster's first
/// start), over a connection of its own to `config` (the server's maintenance database).
pub async fn ensure_database(config: tokio_postgres::Config, name: &str) -> Result<(), StoreError> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        // A database name cannot be a bound parameter: quote it as an identifier.
        client
            .batch_execute(&format!(
                "CREATE DATABASE \"{}\"",
                name.replace('"', "\"\"")
            ))
            .await?;
    }
    drop(client);
    let _ = connection.await;
    Ok(())
}

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
    tx.batch_execute(&super::export::compartment_ddl()).await?;
    tx.batch_execute(super::view_functions::FUNCTIONS_DDL)
        .await?;
    let schema: String = tx
        .query_one("SELECT quote_ident(current_schema())", &[])
        .await?
        .get(0);
    tx.batch_execute(&super::search_functions::functions_ddl(&schema))
        .await?;
    tx.batch_execute(super::search_terminology::FUNCTIONS_DDL)
        .await?;
    tx.batch_execute(super::materialized::SCHEMA_DDL).await?;
    super::roles::grant(&tx).await?;
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
