//! The roles `$dump-sql` runs SQL as, and what they may read.
//!
//! Both log in (so each is the session user, and no `SET ROLE`/`set_config('role', ...)` can
//! take a query back to fhirbox's own privileges) and may only read:
//!
//! - [`SQL_READER_ROLE`], for clients: the FHIR resource tables and their history;
//! - [`SQL_ADMIN_ROLE`], for root: those and fhirbox's own types (`Client` bodies, which never
//!   hold secrets, `AccessPolicy`, `Attribute`, `BulkImportStatus`).
//!
//! Neither may read fhirbox's internal tables (secret hashes, jobs, migrations). Other
//! sessions' query text (`pg_stat_activity.query`, which would show one subject the literals
//! of another's query, since all clients share one role) is closed to them: the functions
//! behind it are taken from `PUBLIC` in fhirbox's database and given to `pg_read_all_stats`
//! (monitoring roles keep them). Per role and database, a `temp_file_limit` bounds the temp
//! files one query may write, and `idle_in_transaction_session_timeout` ends a session that
//! fhirbox left open by accident. Changing these needs a superuser; without one fhirbox warns
//! and carries on (the statement timeout and fhirbox's own limits still hold).

use deadpool_postgres::Transaction;

use super::{Connection, StoreError};
use crate::resource_type::ResourceType;

/// The role clients' `$dump-sql` runs as.
pub const SQL_READER_ROLE: &str = "fhirbox_sql_reader";

/// The role root's `$dump-sql` runs as.
pub const SQL_ADMIN_ROLE: &str = "fhirbox_sql_admin";

/// fhirbox's tables no `$dump-sql` may read.
const INTERNAL_TABLES: &str =
    "fhirbox_migrations, fhirbox_client_secret, fhirbox_job, fhirbox_task, fhirbox_materialized";

/// The statistics functions that return other sessions' query text.
const QUERY_TEXT_FUNCTIONS: &[&str] = &[
    "pg_catalog.pg_stat_get_activity(integer)",
    "pg_catalog.pg_stat_get_backend_activity(integer)",
];

/// Limits the roles carry in fhirbox's database.
#[derive(Debug, Clone)]
pub struct RoleLimits {
    /// The most temp-file space one query may use, in kB.
    pub temp_file_kb: u64,
    /// The memory of one sort or hash before it spills, in kB.
    pub work_mem_kb: u64,
    /// A session idle inside a transaction this long is ended, in ms.
    pub idle_in_transaction_ms: u64,
}

/// Creates the roles (if fhirbox may create roles) and grants them what they may read.
/// Without the privilege to create roles, `$dump-sql` stays unavailable (it says so) and
/// everything else works.
pub async fn grant(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let (superuser, can_create): (bool, bool) = {
        let row = tx
            .query_one(
                "SELECT rolsuper, rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await?;
        (row.get(0), row.get(1))
    };
    let schema: String = tx
        .query_one("SELECT quote_ident(current_schema())", &[])
        .await?
        .get(0);
    let mut sql = String::new();
    for role in [SQL_READER_ROLE, SQL_ADMIN_ROLE] {
        let exists: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)",
                &[&role],
            )
            .await?
            .get(0);
        if !exists && !can_create {
            tracing::warn!(
                role,
                "cannot create the $dump-sql role (no CREATEROLE): $dump-sql is unavailable"
            );
            return Ok(());
        }
        // The roles are constants of ours; a role name cannot be a bound parameter. Roles are
        // cluster-wide: another database's fhirbox may create them at the same time.
        sql.push_str(&format!(
            "DO $$ BEGIN
                 CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS;
             EXCEPTION WHEN duplicate_object THEN NULL;
             END $$;
             GRANT USAGE ON SCHEMA {schema} TO {role};
             REVOKE ALL ON {INTERNAL_TABLES} FROM {role};
             GRANT USAGE ON SCHEMA sof TO {role};
             GRANT SELECT ON ALL TABLES IN SCHEMA sof TO {role};
             ALTER DEFAULT PRIVILEGES IN SCHEMA sof GRANT SELECT ON TABLES TO {role};\n"
        ));
        for rt in ResourceType::all() {
            let readable = rt.is_fhir() || role == SQL_ADMIN_ROLE;
            let (table, history) = (rt.table(), rt.history_table());
            sql.push_str(&match readable {
                true => format!("GRANT SELECT ON {table}, {history} TO {role};\n"),
                false => format!("REVOKE ALL ON {table}, {history} FROM {role};\n"),
            });
        }
    }
    if superuser {
        for function in QUERY_TEXT_FUNCTIONS {
            sql.push_str(&format!(
                "REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC;
                 GRANT EXECUTE ON FUNCTION {function} TO pg_read_all_stats;\n"
            ));
        }
    } else {
        tracing::warn!(
            "fhirbox is not a superuser: $dump-sql clients can read each other's query text in pg_stat_activity"
        );
    }
    tx.batch_execute(&sql).await?;
    Ok(())
}

/// Sets the roles' limits in fhirbox's database (at every start: the flags may change).
pub async fn limit(conn: &Connection, limits: &RoleLimits) -> Result<(), StoreError> {
    let superuser: bool = conn
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?
        .get(0);
    if !superuser {
        tracing::warn!(
            "fhirbox is not a superuser: the $dump-sql roles get no temp_file_limit (set it with ALTER ROLE)"
        );
        return Ok(());
    }
    let exists: bool = conn
        .query_one(
            "SELECT count(*) = 2 FROM pg_roles WHERE rolname IN ($1, $2)",
            &[&SQL_READER_ROLE, &SQL_ADMIN_ROLE],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(());
    }
    // Numbers fhirbox prints; the database's name is quoted by format('%I').
    let mut sql = String::new();
    for role in [SQL_READER_ROLE, SQL_ADMIN_ROLE] {
        for (setting, value) in [
            ("temp_file_limit", format!("{}kB", limits.temp_file_kb)),
            ("work_mem", format!("{}kB", limits.work_mem_kb.max(64))),
            // A query whose fhirbox went away is noticed within a second, not when it
            // next writes.
            ("client_connection_check_interval", "1000".to_string()),
            // No JIT: compiling a view's large expressions (or a client's) took more memory
            // and time than running them.
            ("jit", "off".to_string()),
            // A client's failing query is answered to the client; the server's log keeps
            // neither its text nor the values its error names.
            ("log_min_messages", "fatal".to_string()),
            ("log_min_error_statement", "panic".to_string()),
            (
                "idle_in_transaction_session_timeout",
                format!("{}ms", limits.idle_in_transaction_ms),
            ),
        ] {
            sql.push_str(&format!(
                "EXECUTE format('ALTER ROLE {role} IN DATABASE %I SET {setting} = %L', current_database(), '{value}');\n"
            ));
        }
    }
    conn.batch_execute(&format!("DO $$ BEGIN\n{sql}END $$"))
        .await?;
    Ok(())
}
