//! Token modifiers that read stored terminology: `:in`/`:not-in` a ValueSet (by its
//! canonical url, `url|version`, or `ValueSet/[id]`) and `:below`/`:above` a code in a
//! CodeSystem's hierarchy (`system|code`).
//!
//! The codes are worked out in SQL (`store::search_terminology`), once per search: the
//! condition holds the function call as an uncorrelated subquery. What cannot be answered
//! exactly (nothing stored under that url, a ValueSet filter other than `is-a`) is a 400 the
//! function raises, never a partial answer. Reading a ValueSet or CodeSystem is reading
//! those types: the search is authorized as one of them too ([`super::chained_types`]).

use super::matchers::{local_reference, Target};
use super::query::{split_escaped, unescape};
use super::sql::Binds;
use super::SearchError;

/// The token modifiers this module answers.
pub const MODIFIERS: &[&str] = &["in", "not-in", "below", "above"];

/// The types a search with `modifier` on a token reads besides its own.
pub fn types_read(modifier: &str) -> &'static [&'static str] {
    match modifier {
        "in" | "not-in" => &["ValueSet", "CodeSystem"],
        "below" | "above" => &["CodeSystem"],
        _ => &[],
    }
}

/// The test of one value `v` of the parameter `name` against one criterion value: `:not-in`
/// gives the `:in` test, which the caller negates as it does `:not`.
pub(super) fn token_test(
    name: &str,
    modifier: &str,
    value: &str,
    base_url: &str,
    binds: &mut Binds,
) -> Result<String, SearchError> {
    let codes = match modifier {
        "in" | "not-in" => value_set(name, value, base_url, binds)?,
        "below" | "above" => hierarchy(name, modifier == "below", value, binds)?,
        other => {
            return Err(SearchError::Unsupported(format!(
                "{name}: :{other} is not a terminology modifier"
            )))
        }
    };
    // `(SELECT ...)` without a reference to the row: PostgreSQL evaluates it once (an
    // InitPlan), however often it is written. Written out rather than a function of `v`,
    // which PostgreSQL would call per row: 5x slower, measured.
    let k = format!("(SELECT {codes})");
    Ok(format!(
        "EXISTS (SELECT 1 FROM fhirbox_search_tokens(v) AS t WHERE CASE \
         WHEN t.system IS NULL THEN {k} -> 'c' ? t.code \
         ELSE {k} -> 's' ? (t.system || '|' || t.code) OR {k} -> 'w' ? t.system END)"
    ))
}

fn value_set(
    name: &str,
    value: &str,
    base_url: &str,
    binds: &mut Binds,
) -> Result<String, SearchError> {
    let pieces = split_escaped(value, '|');
    let (reference, version) = match pieces.as_slice() {
        [url] if !url.is_empty() => (unescape(url), None),
        [url, version] if !url.is_empty() && !version.is_empty() => {
            (unescape(url), Some(unescape(version)))
        }
        _ => {
            return Err(SearchError::invalid(
                name,
                format!("'{value}' is not a ValueSet: give its url, url|version or ValueSet/[id]"),
            ))
        }
    };
    let by_id = match local_reference(&reference, base_url) {
        Target::Local(Some("ValueSet"), id) if version.is_none() && !id.is_empty() => {
            Some(id.to_string())
        }
        _ => None,
    };
    Ok(match by_id {
        Some(id) => format!("fhirbox_search_value_set(true, {}, NULL)", binds.bind(id)),
        None => {
            let version = match version {
                Some(version) => binds.bind(version),
                None => "NULL".to_string(),
            };
            format!(
                "fhirbox_search_value_set(false, {}, {version})",
                binds.bind(reference)
            )
        }
    })
}

fn hierarchy(
    name: &str,
    below: bool,
    value: &str,
    binds: &mut Binds,
) -> Result<String, SearchError> {
    match split_escaped(value, '|').as_slice() {
        [system, code] if !system.is_empty() && !code.is_empty() => Ok(format!(
            "fhirbox_search_hierarchy({}, {}, {below})",
            binds.bind(unescape(system)),
            binds.bind(unescape(code))
        )),
        _ => Err(SearchError::invalid(
            name,
            format!(
                "'{value}': :{} takes system|code (the CodeSystem whose hierarchy it follows)",
                if below { "below" } else { "above" }
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled(modifier: &str, value: &str) -> Result<String, SearchError> {
        token_test(
            "code",
            modifier,
            value,
            "https://fhir.example/fhir",
            &mut Binds::new(),
        )
    }

    #[test]
    fn a_value_set_is_named_by_url_version_or_id() {
        let by_url = compiled("in", "http://loinc.org/vs/x").unwrap_or_default();
        assert!(by_url.contains("fhirbox_search_value_set(false, ("));
        assert!(by_url.contains("::text), NULL))"));
        let versioned = compiled("in", "http://loinc.org/vs/x|2.0").unwrap_or_default();
        assert!(!versioned.contains("::text), NULL)"));
        for by_id in ["ValueSet/vs1", "https://fhir.example/fhir/ValueSet/vs1"] {
            let sql = compiled("not-in", by_id).unwrap_or_default();
            assert!(sql.contains("fhirbox_search_value_set(true, ("));
        }
    }

    #[test]
    fn a_hierarchy_needs_its_system() {
        assert!(compiled("below", "http://snomed.info/sct|73211009").is_ok());
        assert!(compiled("above", "73211009").is_err());
        assert!(compiled("in", "|x").is_err());
    }
}
