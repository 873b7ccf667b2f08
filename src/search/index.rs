//! Search indexes: a GIN index per (type, parameter) on the parameter's "terms", an IMMUTABLE
//! SQL function of the `resource` column, so that PostgreSQL keeps the index up to date
//! itself and `$load`/`$import` still stream through COPY.
//!
//! The terms of a token value are `c<code>` (any system), `s<system>|<code>` and, without a
//! system, `n<code>`; of a reference `<Type>/<id>`, `i<id>` and `u<uri>`. A criterion whose
//! every value names its terms (`code`, `system|code`, `|code`; `Type/id`, `id`, a URL) gets
//! `terms(resource) && ARRAY[...]` ahead of its exact condition: a superset of the matches
//! that the index answers, the exact condition then deciding. Without the index the search
//! is the same, only slower; `--search-indexes` says which exist (see `docs/search.md`).

use std::cell::Cell;
use std::collections::BTreeSet;

use super::query::{split_escaped, unescape, Criterion};
use super::sql::{values_in, Binds, Level};
use super::SearchError;
use crate::fhir::meta::SearchParam;
use crate::resource_type::ResourceType;

/// The parameter types an index can serve.
pub const INDEXABLE_KINDS: &[&str] = &["token", "reference"];

/// What `--search-indexes common` creates: the references to a patient, subject and
/// encounter, identifiers and codes of the types real data has most of. Not made unless asked
/// for: the four on Observation make a `$load` into it about 5x slower (docs/search.md).
pub const COMMON_INDEXES: &[&str] = &[
    "Observation.code",
    "Observation.subject",
    "Observation.patient",
    "Observation.encounter",
    "Condition.code",
    "Condition.patient",
    "Encounter.patient",
    "Procedure.patient",
    "MedicationRequest.patient",
    "DiagnosticReport.patient",
    "Immunization.patient",
    "Patient.identifier",
    "Practitioner.identifier",
    "Organization.identifier",
];

/// The (type, parameter) pairs that have an index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Indexes(BTreeSet<(String, String)>);

static NONE: Indexes = Indexes(BTreeSet::new());

impl Indexes {
    /// No index (searches scan).
    pub fn none() -> &'static Indexes {
        &NONE
    }

    /// `--search-indexes`: `none`, `common`, and `Type.param` entries, comma-separated.
    pub fn parse(list: &str) -> Result<Indexes, SearchError> {
        let mut set = BTreeSet::new();
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let named: Vec<&str> = match item {
                "none" => Vec::new(),
                "common" => COMMON_INDEXES.to_vec(),
                other => vec![other],
            };
            for entry in named {
                let (rt, param) = indexable(entry)?;
                set.insert((rt.name().to_string(), param.code.to_string()));
            }
        }
        Ok(Indexes(set))
    }

    pub fn contains(&self, rt: ResourceType, code: &str) -> bool {
        self.0.contains(&(rt.name().to_string(), code.to_string()))
    }

    /// Each index: its type, its parameter, the name of its terms function and of the index,
    /// and the function's body (SQL from the R4 definitions only).
    pub fn definitions(&self) -> Result<Vec<Definition>, SearchError> {
        self.0
            .iter()
            .map(|(t, code)| {
                let (rt, param) = indexable(&format!("{t}.{code}"))?;
                Ok(Definition {
                    rt,
                    function: function_name(rt, code),
                    index: format!("fhirbox_sp_{}_{}", rt.table().trim_matches('"'), slug(code)),
                    body: terms_sql(rt, param)?,
                })
            })
            .collect()
    }
}

/// One index to create.
#[derive(Debug, Clone)]
pub struct Definition {
    pub rt: ResourceType,
    pub function: String,
    pub index: String,
    /// `SELECT` of the terms of the function's argument `resource`, as a `text[]`.
    pub body: String,
}

fn indexable(entry: &str) -> Result<(ResourceType, &'static SearchParam), SearchError> {
    let invalid = |message: String| SearchError::invalid("--search-indexes", message);
    let (type_name, code) = entry
        .split_once('.')
        .ok_or_else(|| invalid(format!("'{entry}' is not Type.parameter")))?;
    let rt = ResourceType::parse(type_name)
        .filter(|rt| rt.is_fhir())
        .ok_or_else(|| invalid(format!("{type_name} is not a FHIR resource type")))?;
    let param = super::parameter(type_name, code)
        .ok_or_else(|| invalid(format!("{type_name} has no search parameter '{code}'")))?;
    if !INDEXABLE_KINDS.contains(&param.kind) || param.expression.is_empty() {
        return Err(invalid(format!(
            "{entry} is a {} parameter; indexes serve {} parameters",
            param.kind,
            INDEXABLE_KINDS.join(" and ")
        )));
    }
    Ok((rt, param))
}

fn slug(code: &str) -> String {
    code.chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect()
}

fn function_name(rt: ResourceType, code: &str) -> String {
    format!(
        "fhirbox_terms_{}_{}",
        rt.table().trim_matches('"'),
        slug(code)
    )
}

/// The function's body: the terms of every value of the parameter in `resource`.
fn terms_sql(rt: ResourceType, param: &SearchParam) -> Result<String, SearchError> {
    let at = Level {
        rt,
        attributes: None,
        resource: "resource".into(),
        depth: 0,
        indexes: Indexes::none(),
    };
    let values = values_in(&at, param, &Cell::new(0))?;
    let terms = match param.kind {
        "token" => {
            "SELECT 'c' || t.code FROM fhirbox_search_tokens(v) AS t WHERE t.code IS NOT NULL \
             UNION ALL SELECT CASE WHEN t.system IS NULL THEN 'n' || t.code \
             ELSE 's' || t.system || '|' || t.code END \
             FROM fhirbox_search_tokens(v) AS t WHERE t.code IS NOT NULL"
        }
        _ => {
            "SELECT (v ->> 'resourceType') || '/' || (v ->> 'id') \
             UNION ALL SELECT 'i' || (v ->> 'id') UNION ALL SELECT 'u' || (v ->> 'uri')"
        }
    };
    let objects = if param.kind == "token" {
        ""
    } else {
        " WHERE jsonb_typeof(v) = 'object'"
    };
    Ok(format!(
        "SELECT coalesce(array_agg(DISTINCT x) FILTER (WHERE x IS NOT NULL), '{{}}'::text[]) \
         FROM jsonb_array_elements(coalesce({values}, '[]'::jsonb)) AS v, LATERAL ({terms}) AS t(x)\
         {objects}"
    ))
}

/// `terms(resource) && ARRAY[...]` for a criterion on `at`, when the parameter has an index
/// there and every value of the criterion names its terms.
pub(super) fn prefilter(
    at: &Level<'_>,
    criterion: &Criterion,
    param: &SearchParam,
    base_url: &str,
    binds: &mut Binds,
) -> Option<String> {
    if criterion.modifier.is_some() || !at.indexes.contains(at.rt, param.code) {
        return None;
    }
    let mut terms = Vec::new();
    for value in &criterion.values {
        terms.extend(match param.kind {
            "token" => token_terms(value)?,
            "reference" => reference_terms(value, base_url)?,
            _ => return None,
        });
    }
    let array: Vec<String> = terms.into_iter().map(|t| binds.bind(t)).collect();
    Some(format!(
        "{}({}) && ARRAY[{}]",
        function_name(at.rt, param.code),
        at.resource,
        array.join(", ")
    ))
}

fn token_terms(value: &str) -> Option<Vec<String>> {
    match split_escaped(value, '|').as_slice() {
        [code] => Some(vec![format!("c{}", unescape(code))]),
        ["", code] => Some(vec![format!("n{}", unescape(code))]),
        [system, code] if !system.is_empty() && !code.is_empty() => {
            Some(vec![format!("s{}|{}", unescape(system), unescape(code))])
        }
        _ => None,
    }
}

/// As `matchers::reference_test` reads a reference: this server's base dropped, any
/// version, `Type/id`, a bare id, or another server's URL.
fn reference_terms(value: &str, base_url: &str) -> Option<Vec<String>> {
    let value = unescape(value);
    let local = value
        .strip_prefix(base_url.trim_end_matches('/'))
        .map(|rest| rest.trim_start_matches('/'))
        .unwrap_or(&value);
    let local = local.split("/_history/").next().unwrap_or(local);
    if local.contains("://") {
        return Some(vec![format!("u{local}")]);
    }
    match local.rsplit_once('/') {
        Some((ty, id)) if !id.is_empty() => Some(vec![format!(
            "{}/{id}",
            ty.rsplit('/').next().unwrap_or(ty)
        )]),
        Some(_) => None,
        None if local.is_empty() => None,
        None => Some(vec![format!("i{local}")]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_set_names_indexable_parameters() {
        let indexes = Indexes::parse("common").expect("the common set is valid");
        assert_eq!(indexes.0.len(), COMMON_INDEXES.len());
        assert_eq!(
            indexes.definitions().expect("compile").len(),
            COMMON_INDEXES.len()
        );
        assert!(Indexes::parse("none").expect("valid").0.is_empty());
        for (list, says) in [
            ("Observation.date", "indexes serve"),
            ("Observation.colour", "no search parameter"),
            ("Nothing.code", "not a FHIR resource type"),
            ("code", "Type.parameter"),
        ] {
            let error = Indexes::parse(list).expect_err(list);
            assert!(error.to_string().contains(says), "{list}: {error}");
        }
    }

    #[test]
    fn values_name_the_terms_their_matches_hold() {
        assert_eq!(token_terms("8302-2"), Some(vec!["c8302-2".into()]));
        assert_eq!(token_terms("|x"), Some(vec!["nx".into()]));
        assert_eq!(
            token_terms("http://loinc.org|8302-2"),
            Some(vec!["shttp://loinc.org|8302-2".into()])
        );
        assert_eq!(token_terms("http://loinc.org|"), None);
        let base = "http://h/fhir";
        assert_eq!(
            reference_terms("Patient/1", base),
            Some(vec!["Patient/1".into()])
        );
        assert_eq!(
            reference_terms("http://h/fhir/Patient/1/_history/2", base),
            Some(vec!["Patient/1".into()])
        );
        assert_eq!(reference_terms("1", base), Some(vec!["i1".into()]));
        assert_eq!(
            reference_terms("http://other/Patient/1", base),
            Some(vec!["uhttp://other/Patient/1".into()])
        );
    }
}
