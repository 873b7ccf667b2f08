//! Runs a [`Plan`]: one page of matches in the plan's order, what its includes add, the
//! total when asked, and the cursor of the next page.

use std::collections::HashSet;

use super::include::included;
use super::request::{Limits, Plan};
use super::{cursor, RunError};
use crate::resource::StoredResource;
use crate::resource_type::ResourceType;
use crate::store::search as statements;
use crate::store::Store;

/// A page of a search's answer.
#[derive(Debug, Default)]
pub struct Page {
    pub matches: Vec<StoredResource>,
    /// What `_include`/`_revinclude` added.
    pub included: Vec<StoredResource>,
    /// What the includes left out, and why.
    pub notes: Vec<String>,
    /// The `_cursor` of the next page, when there is one.
    pub next: Option<String>,
    pub total: Option<i64>,
}

/// Runs `plan`; includes read only the types in `readable`.
pub async fn run(
    store: &Store,
    plan: &Plan,
    readable: &HashSet<ResourceType>,
    limits: &Limits,
) -> Result<Page, RunError> {
    let mut conn = store.connection().await?;
    let client = statements::read_transaction(&mut conn, limits.timeout).await?;
    let mut page = Page::default();
    if plan.total {
        page.total = Some(statements::count(&client, plan.rt, &plan.filter).await?);
    }
    if plan.count_only || plan.count == 0 {
        client
            .commit()
            .await
            .map_err(crate::store::StoreError::from)?;
        return Ok(page);
    }
    let mut rows = statements::page(
        &client,
        plan.rt,
        &plan.filter,
        &plan.keys,
        plan.after.as_ref(),
        plan.count + 1,
    )
    .await?;
    if rows.len() as i64 > plan.count {
        rows.truncate(plan.count as usize);
        page.next = rows.last().map(|(r, keys)| cursor::write(keys, &r.id));
    }
    page.matches = rows.into_iter().map(|(r, _)| r).collect();
    if !plan.includes.is_empty() {
        let found = included(
            &client,
            &page.matches,
            &plan.includes,
            &plan.indexes,
            readable,
            limits.max_included,
        )
        .await?;
        page.included = found.resources;
        page.notes = found.notes;
    }
    client
        .commit()
        .await
        .map_err(crate::store::StoreError::from)?;
    Ok(page)
}
