//! Reverse chains: `Patient?_has:Observation:subject:code=1234` is the Patients that some
//! Observation refers to (by its `subject`) and that has code 1234: this row's id among the
//! ids that the other type's matches (the rest compiled against them, which may be another
//! `_has`) refer to through that parameter.

use std::cell::Cell;

use super::query::Criterion;
use super::sql::{conditions_sql, values_in, Binds, Level};
use super::SearchError;
use crate::fhir::meta::SearchParam;
use crate::resource_type::ResourceType;

/// How `_has` looks in the parameter table: it has no expression of its own.
pub(super) static HAS: SearchParam = SearchParam {
    base: "Resource",
    code: "_has",
    kind: "has",
    expression: "",
    targets: &[],
    components: &[],
};

/// `Type:reference:rest` of `_has:Type:reference:rest`, checked: the type, its reference
/// parameter (which must be able to point at `here`), and the rest.
pub(super) fn parts(
    here: &str,
    criterion: &Criterion,
) -> Result<(ResourceType, &'static SearchParam, String), SearchError> {
    let key = criterion.modifier.as_deref().unwrap_or_default();
    let key = match &criterion.chain {
        Some(chain) => format!("{key}.{chain}"),
        None => key.to_string(),
    };
    let mut pieces = key.splitn(3, ':');
    let (Some(type_name), Some(reference), Some(rest)) =
        (pieces.next(), pieces.next(), pieces.next())
    else {
        return Err(SearchError::invalid(
            "_has",
            "write _has:Type:reference:parameter=value (e.g. _has:Observation:subject:code=1234)",
        ));
    };
    let Some(rt) = ResourceType::parse(type_name) else {
        return Err(SearchError::invalid(
            "_has",
            format!("'{type_name}' is not a resource type"),
        ));
    };
    let param = super::parameter(type_name, reference)
        .filter(|p| p.kind == "reference")
        .ok_or_else(|| {
            SearchError::invalid(
                "_has",
                format!("{type_name} has no reference parameter '{reference}'"),
            )
        })?;
    if !param.targets.contains(&here) {
        return Err(SearchError::invalid(
            "_has",
            format!("{type_name}.{reference} never refers to a {here}"),
        ));
    }
    Ok((rt, param, rest.to_string()))
}

/// The SQL of one `_has` criterion on the row `at` stands for.
pub(super) fn has_sql(
    at: &Level<'_>,
    criterion: &Criterion,
    base_url: &str,
    binds: &mut Binds,
    counter: &Cell<usize>,
) -> Result<String, SearchError> {
    let Some(row) = at.resource.strip_suffix(".resource") else {
        return Err(SearchError::Unsupported(
            "_has: not supported here (it needs the row's own id)".into(),
        ));
    };
    if at.depth + 1 > super::sql::MAX_CHAIN {
        return Err(SearchError::invalid(
            "_has",
            format!(
                "chains go at most {} references deep",
                super::sql::MAX_CHAIN
            ),
        ));
    }
    let (rt, reference, rest) = parts(at.rt.name(), criterion)?;
    let nested = Criterion::parse(&rest, &criterion.values.join(","));
    let nested_param = match nested.name.as_str() {
        "_has" => &HAS,
        name => super::parameter(rt.name(), name).ok_or_else(|| {
            SearchError::invalid(
                "_has",
                format!("{} has no search parameter '{name}' in FHIR R4", rt.name()),
            )
        })?,
    };
    let alias = format!("has{}", counter.get() + 1);
    counter.set(counter.get() + 1);
    let inner = Level {
        rt,
        attributes: None,
        resource: format!("{alias}.resource"),
        depth: at.depth + 1,
        indexes: at.indexes,
    };
    let references = values_in(&inner, reference, counter)?;
    let here = binds.bind(at.rt.name());
    let condition = conditions_sql(&inner, &[(nested, nested_param)], base_url, binds, counter)?;
    // Uncorrelated: the other type's matches are found once (on their own indexes), and
    // the ids they refer to are looked up here by primary key.
    Ok(format!(
        "{row}.id IN (SELECT v ->> 'id' FROM {} AS {alias}, \
         jsonb_array_elements(coalesce({references}, '[]'::jsonb)) AS v \
         WHERE v ->> 'resourceType' = {here} AND {condition})",
        rt.table()
    ))
}
