//! The SQL of AccessPolicies: an `engine: sql` policy's query, with the request's values
//! bound as parameters, run read-only with a short timeout.

use std::time::Duration;

use super::dump_sql::TextParam;
use super::{Store, StoreError};

/// Runs a policy's query (its `{{path}}`s already replaced by `$1..$n`) with `params` in a
/// read-only transaction; the policy allows when it returns one row whose first column is
/// `true`.
pub async fn sql_allows(
    store: &Store,
    query: &str,
    params: Vec<Option<String>>,
    timeout: Duration,
) -> Result<bool, StoreError> {
    let params: Vec<TextParam> = params.into_iter().map(TextParam).collect();
    let conn = store.dedicated().await?;
    // The timeout is a number fhirbox prints; SET takes no bind parameters.
    conn.batch_execute(&format!(
        "BEGIN READ ONLY; SET LOCAL statement_timeout = {}",
        timeout.as_millis()
    ))
    .await?;
    let row = conn
        .query_opt(query, &params.iter().map(|p| p as _).collect::<Vec<_>>())
        .await?;
    conn.batch_execute("ROLLBACK").await?;
    conn.release();
    Ok(row
        .and_then(|row| row.try_get::<_, Option<bool>>(0).ok().flatten())
        .unwrap_or(false))
}
