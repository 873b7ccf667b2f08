//! `_list=[id]`: the resources a List names in its entries (`List.entry.item`), those marked
//! `deleted` aside. It reads the List, so the search is authorized as one of List too
//! (`chained_types`), and `$export`'s `_typeFilter` refuses it as it does chains.

use super::query::{unescape, Criterion};
use super::sql::{Binds, Level};
use super::SearchError;
use crate::fhir::meta::SearchParam;

/// How `_list` looks in the parameter table.
pub(super) static LIST: SearchParam = SearchParam {
    base: "Resource",
    code: "_list",
    kind: "list",
    expression: "",
    targets: &["List"],
    components: &[],
};

/// The SQL of a `_list=a,b` criterion on the row `at` stands for.
pub(super) fn list_sql(
    at: &Level<'_>,
    criterion: &Criterion,
    binds: &mut Binds,
) -> Result<String, SearchError> {
    let Some(row) = at.resource.strip_suffix(".resource") else {
        return Err(SearchError::Unsupported(
            "_list: not supported here (it needs the row's own id)".into(),
        ));
    };
    if criterion.modifier.is_some() {
        return Err(SearchError::invalid("_list", "_list takes no modifier"));
    }
    if criterion
        .values
        .iter()
        .any(|v| v.is_empty() || v.starts_with('$'))
    {
        return Err(SearchError::Unsupported(
            "_list: functional lists ($current-allergies and the like) are not supported; \
             name a List by its id"
                .into(),
        ));
    }
    let ids: Vec<String> = criterion
        .values
        .iter()
        .map(|v| binds.bind(unescape(v)))
        .collect();
    let here = binds.bind(at.rt.name());
    let lists = crate::resource_type::ResourceType::parse("List")
        .map(|rt| rt.table())
        .ok_or_else(|| SearchError::Unsupported("_list: List is not stored here".into()))?;
    Ok(format!(
        "{row}.id IN (SELECT e -> 'item' ->> 'id' FROM {lists} AS l, \
         jsonb_array_elements(CASE WHEN jsonb_typeof(l.resource -> 'entry') = 'array' \
         THEN l.resource -> 'entry' ELSE '[]' END) AS e \
         WHERE l.id IN ({}) AND e -> 'item' ->> 'resourceType' = {here} \
         AND NOT coalesce(e -> 'deleted' = 'true'::jsonb, false))",
        ids.join(", ")
    ))
}
