//! `_sort=a,-b`: each key compiled to one SQL value per resource, from the parameter's values
//! in it. Ascending takes the smallest value, descending the largest (a date's range: its
//! start ascending, its end descending); text is compared folded as string search folds it,
//! by code point; a resource without a value comes last either way, and the id breaks ties.
//! `store::search` pages in that order by key.

use std::cell::Cell;

use super::sql::{values_in, Level};
use super::SearchError;
use crate::resource_type::ResourceType;
use crate::store::search::{KeyType, SortKey};

/// Keys one search may sort by.
pub const MAX_SORT_KEYS: usize = 5;

/// The keys `_sort`'s value names, for a search of `rt`.
pub fn keys(rt: ResourceType, value: &str) -> Result<Vec<SortKey>, SearchError> {
    let names: Vec<&str> = value.split(',').map(str::trim).collect();
    if names.len() > MAX_SORT_KEYS {
        return Err(SearchError::invalid(
            "_sort",
            format!("at most {MAX_SORT_KEYS} keys, not {}", names.len()),
        ));
    }
    names.into_iter().map(|name| key(rt, name)).collect()
}

fn key(rt: ResourceType, name: &str) -> Result<SortKey, SearchError> {
    let (descending, code) = match name.strip_prefix('-') {
        Some(code) => (true, code),
        None => (false, name),
    };
    let keyed = |sql: &str, ty| {
        Ok(SortKey {
            sql: sql.to_string(),
            ty,
            descending,
        })
    };
    match code {
        "_id" => return keyed("r.id", KeyType::Text),
        "_lastUpdated" => return keyed("r.ts", KeyType::Instant),
        "" => return Err(SearchError::invalid("_sort", "an empty key")),
        _ => {}
    }
    let Some(param) = super::parameter(rt.name(), code) else {
        return Err(SearchError::invalid(
            "_sort",
            format!("{} has no search parameter '{code}' in FHIR R4", rt.name()),
        ));
    };
    let at = Level {
        rt,
        attributes: None,
        resource: "r.resource".into(),
        depth: 0,
        indexes: super::index::Indexes::none(),
    };
    let values = || values_in(&at, param, &Cell::new(0));
    let pick = if descending { "max" } else { "min" };
    let over = |each: &str, value: &str, ty| {
        let values = values()?;
        keyed(
            &format!(
                "(SELECT {pick}({value}) FROM jsonb_array_elements(coalesce({values}, '[]'::jsonb)) AS v{each})"
            ),
            ty,
        )
    };
    match param.kind {
        "string" => over(
            ", fhirbox_search_strings(v) AS s",
            "fhirbox_search_norm(s) COLLATE \"C\"",
            KeyType::Text,
        ),
        "token" => over(
            ", fhirbox_search_tokens(v) AS t",
            "t.code COLLATE \"C\"",
            KeyType::Text,
        ),
        "date" => {
            // A date's range, a Period's start (end), open where missing; not through
            // `fhirbox_search_ranges`, whose UNION is slow once per row (Timing events do
            // not sort).
            let (bound, other, field, open) = match descending {
                true => ("end", "start", "high", "infinity"),
                false => ("start", "end", "low", "-infinity"),
            };
            over(
                &format!(
                    " LEFT JOIN LATERAL fhirbox_search_instant_range(CASE WHEN jsonb_typeof(v) = \
                     'string' THEN v #>> '{{}}' WHEN jsonb_typeof(v) = 'object' THEN v ->> \
                     '{bound}' END) AS i ON true"
                ),
                &format!(
                    "CASE WHEN jsonb_typeof(v) = 'object' AND NOT v ? '{bound}' AND v ? '{other}' \
                     THEN '{open}'::timestamptz ELSE i.{field} END"
                ),
                KeyType::Instant,
            )
        }
        "number" => over(
            " WHERE jsonb_typeof(v) = 'number'",
            "(v #>> '{}')::numeric",
            KeyType::Number,
        ),
        "quantity" => over(
            " WHERE jsonb_typeof(v -> 'value') = 'number'",
            "(v ->> 'value')::numeric",
            KeyType::Number,
        ),
        "reference" => over(
            "",
            "coalesce((v ->> 'resourceType') || '/' || (v ->> 'id'), v ->> 'uri') COLLATE \"C\"",
            KeyType::Text,
        ),
        "uri" => over(
            " WHERE jsonb_typeof(v) = 'string'",
            "(v #>> '{}') COLLATE \"C\"",
            KeyType::Text,
        ),
        kind => Err(SearchError::invalid(
            "_sort",
            format!("{code} is a {kind} parameter, which fhirbox does not sort by"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observation() -> ResourceType {
        ResourceType::parse("Observation").expect("a type")
    }

    #[test]
    fn every_key_type_compiles_with_its_direction() {
        let keys = keys(observation(), "-date,code,_id,value-quantity").expect("keys");
        let directions: Vec<bool> = keys.iter().map(|k| k.descending).collect();
        assert_eq!(directions, [true, false, false, false]);
        assert!(keys[0].sql.contains("i.high"), "{}", keys[0].sql);
        assert_eq!(keys[2].sql, "r.id");
        assert_eq!(keys[3].ty, KeyType::Number);
    }

    #[test]
    fn a_key_that_cannot_sort_says_which() {
        let error = keys(observation(), "code-value-quantity").expect_err("composite");
        assert!(error.to_string().contains("composite"), "{error}");
        let error = keys(observation(), "colour").expect_err("unknown");
        assert!(error.to_string().contains("'colour'"), "{error}");
        let error = keys(observation(), "a,b,c,d,e,f").expect_err("too many");
        assert!(error.to_string().contains("at most 5"), "{error}");
    }
}
