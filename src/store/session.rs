//! What one session of heavy work may take on the database server: the limits a view's
//! statement (a view export's, a materialization's) and an export's COPY run under, set for
//! their transaction only (`SET LOCAL`), so fhirbox's other sessions keep theirs.
//!
//! - `temp_file_limit`: the temp files one statement may write (a sort or a hash that spills).
//!   Only a superuser may set it: it is set when fhirbox's role is one (the managed
//!   PostgreSQL's is), and left to the server's configuration otherwise.
//! - `work_mem`: the memory of each sort or hash node before it spills.
//! - `statement_timeout`, for statements whose size a client decides (views).
//! - `client_connection_check_interval`: PostgreSQL looks every second whether fhirbox is
//!   still there, so a statement whose fhirbox died (a `$materialize` writing a table, a sort
//!   that sends nothing yet) is cancelled instead of running on for minutes.

use std::time::Duration;

use super::{GenericClient, StoreError};

/// How a view's statement is planned: without Memoize, which keys its cache on every outer
/// value a subquery reads, and a large view's fenced subqueries read thousands (PostgreSQL:
/// "number of columns (8100) exceeds limit (1664)" once the table had statistics).
pub const VIEW_PLANNING: &str = "SET LOCAL enable_memoize = off;";

/// How often PostgreSQL checks that the client of a long statement is still connected.
const CONNECTION_CHECK_MS: u64 = 1000;

/// The limits of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// `temp_file_limit`, in bytes (applied only when fhirbox is a superuser).
    pub temp_file_bytes: u64,
    /// `work_mem`, in bytes.
    pub work_mem_bytes: u64,
    /// `statement_timeout`; `None`: the server's.
    pub timeout: Option<Duration>,
}

impl SessionLimits {
    /// The `SET LOCAL`s of these limits: numbers fhirbox prints, never request text.
    pub fn sql(&self) -> String {
        let mut sql = format!(
            "SET LOCAL work_mem = '{}kB'; SET LOCAL client_connection_check_interval = {CONNECTION_CHECK_MS}; SET LOCAL jit = off; {VIEW_PLANNING} \
             DO $$ BEGIN IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN \
             PERFORM set_config('temp_file_limit', '{}kB', true); END IF; END $$;",
            (self.work_mem_bytes / 1024).max(64),
            self.temp_file_bytes.div_ceil(1024)
        );
        if let Some(timeout) = self.timeout {
            sql.push_str(&format!(
                " SET LOCAL statement_timeout = {};",
                timeout.as_millis().max(1)
            ));
        }
        sql
    }

    /// The same limits with another statement timeout.
    pub fn with_timeout(self, timeout: Duration) -> SessionLimits {
        SessionLimits {
            timeout: Some(timeout),
            ..self
        }
    }

    /// Applies them to the transaction open on `client`.
    pub async fn apply(&self, client: &impl GenericClient) -> Result<(), StoreError> {
        client.batch_execute(&self.sql()).await?;
        Ok(())
    }
}

impl SessionLimits {
    /// What a view's statement gets where no flags reach (the rebuild of a materialization
    /// when its ViewDefinition is written): the defaults of `--sql-temp-file-bytes`,
    /// `--sql-work-mem` and `--sql-timeout`.
    pub fn view_defaults() -> SessionLimits {
        SessionLimits {
            temp_file_bytes: 1 << 30,
            work_mem_bytes: 64 << 20,
            timeout: Some(Duration::from_secs(600)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_are_numbers_of_ours() {
        let limits = SessionLimits {
            temp_file_bytes: 1 << 30,
            work_mem_bytes: 64 << 20,
            timeout: None,
        };
        let sql = limits.sql();
        assert!(sql.starts_with("SET LOCAL work_mem = '65536kB'; SET LOCAL client_connection_check_interval = 1000;"), "{sql}");
        assert!(
            sql.contains("set_config('temp_file_limit', '1048576kB', true)"),
            "{sql}"
        );
        assert!(!sql.contains("statement_timeout"), "{sql}");
        let timed = limits.with_timeout(Duration::from_secs(2)).sql();
        assert!(
            timed.ends_with("SET LOCAL statement_timeout = 2000;"),
            "{timed}"
        );
    }
}
