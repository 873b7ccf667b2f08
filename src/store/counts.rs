//! How many resources each type's table holds (`GET /$counts`): exact for small tables, the
//! statistics' live-row count for big ones, so the answer stays cheap at any size.

use super::{GenericClient, StoreError};
use crate::resource_type::ResourceType;

/// A type's count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Count {
    pub resource_type: ResourceType,
    pub count: i64,
    /// Taken from the statistics (`pg_stat_user_tables.n_live_tup`), not counted.
    pub estimate: bool,
}

/// The counts of `types`, in their order; types whose table holds nothing are left out.
/// Tables of at most `max_exact` live rows (as the statistics say) are counted exactly.
pub async fn counts(
    client: &impl GenericClient,
    types: &[ResourceType],
    max_exact: i64,
) -> Result<Vec<Count>, StoreError> {
    let names: Vec<&str> = types.iter().map(|rt| rt.table_name()).collect();
    let rows = client
        .query(
            "SELECT t.name, coalesce(s.n_live_tup, 0)
               FROM unnest($1::text[]) WITH ORDINALITY AS t(name, n)
               LEFT JOIN pg_stat_user_tables s
                      ON s.relname = t.name AND s.schemaname = current_schema()
              ORDER BY t.n",
            &[&names],
        )
        .await?;
    let mut counts = Vec::new();
    for (rt, row) in types.iter().zip(&rows) {
        let live: i64 = row.get(1);
        let count = if live > max_exact {
            Count {
                resource_type: *rt,
                count: live,
                estimate: true,
            }
        } else {
            // The statistics lag a moment behind a load: small tables are counted, and a
            // table the statistics think empty may not be.
            let sql = format!("SELECT count(*) FROM {}", rt.table());
            let exact: i64 = client.query_one(&sql, &[]).await?.get(0);
            Count {
                resource_type: *rt,
                count: exact,
                estimate: false,
            }
        };
        if count.count > 0 {
            counts.push(count);
        }
    }
    Ok(counts)
}
