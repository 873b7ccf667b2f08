//! Small configuration tables read whole and cached: Attributes (format conversion) and
//! AccessPolicies (authorization).
//!
//! A [`TableCache`] keeps what was built from every resource of one table, with the table's
//! [`Stamp`]; each use checks the stamp with one cheap query and builds again only when it
//! changed. So a created, changed or deleted Attribute or AccessPolicy takes effect on the
//! next request, in every fhirbox process, without a restart.

use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::{GenericClient, Store, StoreError};
use crate::resource_type::ResourceType;

/// Changes whenever a resource of the table is created, changed or deleted: the newest
/// version id in the table and in its history (a delete adds a history version), and the row
/// count (rows removed by hand with SQL).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Option<i64>, Option<i64>, i64);

async fn stamp_of(client: &impl GenericClient, rt: ResourceType) -> Result<Stamp, StoreError> {
    let sql = format!(
        "SELECT (SELECT max(txid) FROM {table}), (SELECT max(txid) FROM {history}),
                (SELECT count(*) FROM {table})",
        table = rt.table(),
        history = rt.history_table()
    );
    let statement = client.prepare_cached(&sql).await?;
    let row = client.query_one(&statement, &[]).await?;
    Ok(Stamp(row.get(0), row.get(1), row.get(2)))
}

/// Every current resource of the table: (id, body).
pub async fn all_of(
    client: &impl GenericClient,
    rt: ResourceType,
) -> Result<Vec<(String, Value)>, StoreError> {
    let sql = format!("SELECT id, resource FROM {}", rt.table());
    let statement = client.prepare_cached(&sql).await?;
    let rows = client.query(&statement, &[]).await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// What was built from one table's resources, rebuilt when the table changes.
pub struct TableCache<T> {
    rt: ResourceType,
    cached: Mutex<Option<(Stamp, Arc<T>)>>,
}

impl<T> TableCache<T> {
    /// A cache of what is built from the resources of `type_name` (one of fhirbox's own).
    pub fn new(rt: ResourceType) -> TableCache<T> {
        TableCache {
            rt,
            cached: Mutex::new(None),
        }
    }

    /// The value for the table as it is now: the cached one, or `build` over its resources
    /// (id, body) if the table changed since.
    pub async fn get(
        &self,
        store: &Store,
        build: impl FnOnce(Vec<(String, Value)>) -> T,
    ) -> Result<Arc<T>, StoreError> {
        let conn = store.connection().await?;
        let stamp = stamp_of(&conn, self.rt).await?;
        if let Some((cached, value)) = self.lock().as_ref() {
            if *cached == stamp {
                return Ok(value.clone());
            }
        }
        let value = Arc::new(build(all_of(&conn, self.rt).await?));
        *self.lock() = Some((stamp, value.clone()));
        Ok(value)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Stamp, Arc<T>)>> {
        self.cached
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
