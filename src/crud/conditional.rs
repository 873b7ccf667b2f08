//! Conditional create (`If-None-Exist`), update (`PUT /[type]?search`) and delete
//! (`DELETE /[type]?search`), alone or as Bundle entries.
//!
//! The search runs inside the write's transaction after a lock that every conditional write
//! of the type takes (`store::search::lock_conditional`), so a second conditional create of
//! the same identifier waits for the first to commit and then finds what it created: two
//! concurrent conditional creates make one resource. The search is compiled by `search`,
//! filters only (no `_sort`, `_include`, paging), bounded by `--search-timeout-ms` as a
//! search is (past it, a 408 and nothing written); more than one match is 412.

use super::{create_in, delete_in, update_in, Checked, CrudError, Deleted};
use crate::resource::StoredResource;
use crate::resource_type::ResourceType;
use crate::store::search::{self as statements, PageFilter};
use crate::store::{Store, Tx};

/// The one current resource of `rt` matching `filter`, if any; 412 if several do. Takes the
/// type's conditional-write lock first.
pub async fn find_in(
    tx: &Tx,
    rt: ResourceType,
    filter: &PageFilter,
    what: &str,
) -> Result<Option<StoredResource>, CrudError> {
    statements::lock_conditional(&**tx, rt).await?;
    let mut found = statements::bounded_page(&**tx, rt, filter, 2)
        .await
        .map_err(|error| match error.is_timeout() {
            true => CrudError::Timeout(format!(
                "the {what} ran longer than this server allows (--search-timeout-ms): make it \
                 more selective, or search by a parameter with an index"
            )),
            false => error.into(),
        })?;
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop().map(|(r, _)| r)),
        _ => Err(CrudError::PreconditionFailed(format!(
            "the {what} matches more than one {rt}; make the search select one"
        ))),
    }
}

/// Creates `checked` unless `filter` finds one: the resource, and whether it was created.
pub async fn create_in_unless(
    tx: &Tx,
    checked: Checked,
    keep_id: bool,
    filter: &PageFilter,
) -> Result<(StoredResource, bool), CrudError> {
    match find_in(tx, checked.resource_type, filter, "If-None-Exist search").await? {
        Some(existing) => Ok((existing, false)),
        None => Ok((create_in(tx, checked, keep_id).await?, true)),
    }
}

/// Updates the resource `filter` finds, or creates one (with the body's id, if it has one):
/// the version, and whether it was created.
pub async fn update_in_where(
    tx: &Tx,
    checked: Checked,
    filter: &PageFilter,
) -> Result<(StoredResource, bool), CrudError> {
    let rt = checked.resource_type;
    match find_in(tx, rt, filter, "conditional update's search").await? {
        Some(existing) => {
            if checked.id.as_deref().is_some_and(|id| id != existing.id) {
                return Err(CrudError::invalid(format!(
                    "the search found {rt}/{}, but the body's id is {}",
                    existing.id,
                    checked.id.as_deref().unwrap_or_default()
                )));
            }
            update_in(tx, checked, &existing.id).await
        }
        None => match checked.id.clone() {
            Some(id) => update_in(tx, checked, &id).await,
            None => Ok((create_in(tx, checked, false).await?, true)),
        },
    }
}

/// Deletes the resource `filter` finds; `None` when it finds none.
pub async fn delete_in_where(
    tx: &Tx,
    rt: ResourceType,
    filter: &PageFilter,
) -> Result<Option<Deleted>, CrudError> {
    match find_in(tx, rt, filter, "conditional delete's search").await? {
        Some(existing) => Ok(Some(delete_in(tx, rt, &existing.id).await?)),
        None => Ok(None),
    }
}

/// [`create_in_unless`] in a transaction of its own.
pub async fn create_unless(
    store: &Store,
    checked: Checked,
    keep_id: bool,
    filter: &PageFilter,
) -> Result<(StoredResource, bool), CrudError> {
    let tx = store.begin().await?;
    let result = create_in_unless(&tx, checked, keep_id, filter).await;
    tx.finish(result).await
}

/// [`update_in_where`] in a transaction of its own.
pub async fn update_where(
    store: &Store,
    checked: Checked,
    filter: &PageFilter,
) -> Result<(StoredResource, bool), CrudError> {
    let tx = store.begin().await?;
    let result = update_in_where(&tx, checked, filter).await;
    tx.finish(result).await
}

/// [`delete_in_where`] in a transaction of its own.
pub async fn delete_where(
    store: &Store,
    rt: ResourceType,
    filter: &PageFilter,
) -> Result<Option<Deleted>, CrudError> {
    let tx = store.begin().await?;
    let result = delete_in_where(&tx, rt, filter).await;
    tx.finish(result).await
}
