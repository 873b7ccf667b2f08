//! Search indexes: per (type, parameter), an IMMUTABLE SQL function of the `resource` column
//! and an index on it, so that PostgreSQL keeps the index up to date itself and
//! `$load`/`$import` still stream through COPY.
//!
//! Each function is one expression of built-in functions (PostgreSQL inlines it, into the
//! index and into the queries): what it costs per row on a load is what its jsonpath costs.
//! - **token, reference**: the parameter's values as a jsonb array, in a GIN
//!   `jsonb_path_ops` index; a criterion becomes containments of the shapes its values can
//!   take (`[{"coding": [{"code": "x"}]}]`, `[{"resourceType": "Patient", "id": "1"}]`, ...).
//! - **string**: the values' JSON text, case- and accent-folded, in a trigram index (the
//!   `pg_trgm` extension): a prefix `smi` is the text containing `"smi`.
//! - **date**: the one range spanning every value's instants, in a GiST index: a criterion
//!   becomes "overlaps" of the range its prefix allows.
//!
//! Every such condition is a necessary one (a superset of the matches), put ahead of the
//! criterion's exact condition, which decides. An index also serves a parameter whose
//! values are a part of its own: `subject`'s serves `patient`
//! (`Observation.subject.where(resolve() is Patient)`), `name`'s serves `family` and `given`.
//! Without an index the search is the same, only slower; `--search-indexes` says which exist
//! (see `docs/search.md`).

use std::cell::Cell;
use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::query::{split_escaped, unescape, Criterion};
use super::sql::{values_in, Binds, Level};
use super::SearchError;
use crate::fhir::meta::SearchParam;
use crate::resource_type::ResourceType;

/// The parameter types an index can serve.
pub const INDEXABLE_KINDS: &[&str] = &["token", "reference", "string", "date"];

pub use crate::store::search_indexes::{Definition, PREFIX};

/// What `--search-indexes common` creates: references to a patient, subject and encounter,
/// identifiers and codes of the types real data has most of, and a patient's name and birth
/// date. Three on Observation cost a `$load` into it about a third more time
/// (docs/search.md has the measurements).
pub const COMMON_INDEXES: &[&str] = &[
    "Observation.code",
    "Observation.subject",
    "Observation.encounter",
    "Condition.code",
    "Condition.subject",
    "Encounter.subject",
    "Procedure.subject",
    "MedicationRequest.subject",
    "DiagnosticReport.subject",
    "Immunization.patient",
    "Patient.identifier",
    "Patient.name",
    "Patient.birthdate",
    "Practitioner.identifier",
    "Organization.identifier",
];

/// The (type, parameter) pairs that have an index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Indexes(BTreeSet<(String, String)>);

static NONE: Indexes = Indexes(BTreeSet::new());

/// An index that can answer a criterion on some parameter: its function, its kind, and the
/// reference type the parameter keeps (`patient` served by `subject`'s index).
#[derive(Debug, Clone, Copy)]
struct Served {
    function_of: &'static SearchParam,
    only_type: Option<&'static str>,
}

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

    /// The index that answers criteria on `param` of `rt`, if one does.
    fn serving(&self, rt: ResourceType, param: &SearchParam) -> Option<Served> {
        self.0
            .iter()
            .filter(|(t, _)| t == rt.name())
            .filter_map(|(t, code)| super::parameter(t, code))
            .find_map(|indexed| serves(indexed, param))
    }

    /// Each index: its type, names, what it is built with, and its function's body (SQL
    /// from the R4 definitions only).
    pub fn definitions(&self) -> Result<Vec<Definition>, SearchError> {
        self.0
            .iter()
            .map(|(t, code)| {
                let (rt, param) = indexable(&format!("{t}.{code}"))?;
                let name = object_name(rt, code);
                let (returns, method) = match param.kind {
                    "string" => ("text", format!("gin ({name}(resource) gin_trgm_ops)")),
                    "date" => ("tstzrange", format!("gist ({name}(resource))")),
                    _ => ("jsonb", format!("gin ({name}(resource) jsonb_path_ops)")),
                };
                Ok(Definition {
                    rt,
                    function: name.clone(),
                    index: name,
                    returns,
                    method,
                    extension: (param.kind == "string").then_some("pg_trgm"),
                    body: function_sql(rt, param)?,
                })
            })
            .collect()
    }
}

/// Whether the index on `indexed` answers criteria on `param` (the same parameter, or one
/// whose values are some of its values).
fn serves(indexed: &'static SearchParam, param: &SearchParam) -> Option<Served> {
    let served = |only_type| {
        Some(Served {
            function_of: indexed,
            only_type,
        })
    };
    if indexed.code == param.code {
        return served(None);
    }
    match (indexed.kind, param.kind) {
        ("reference", "reference") => {
            let rest = param.expression.strip_prefix(indexed.expression)?;
            let target = rest
                .strip_prefix(".where(resolve() is ")?
                .strip_suffix(')')?;
            let target = param.targets.iter().find(|t| **t == target)?;
            served(Some(*target))
        }
        ("string", "string") => {
            let rest = param.expression.strip_prefix(indexed.expression)?;
            let simple = |c: char| c.is_ascii_alphanumeric() || c == '.';
            if rest.starts_with('.') && rest.chars().all(simple) {
                served(None)
            } else {
                None
            }
        }
        _ => None,
    }
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
            INDEXABLE_KINDS.join(", ")
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

/// The name of both the index and its function.
fn object_name(rt: ResourceType, code: &str) -> String {
    format!("{PREFIX}{}_{}", rt.table().trim_matches('"'), slug(code))
}

/// The function's expression: the values, their folded text, or their span.
fn function_sql(rt: ResourceType, param: &SearchParam) -> Result<String, SearchError> {
    let at = Level {
        rt,
        attributes: None,
        resource: "resource".into(),
        depth: 0,
        indexes: Indexes::none(),
    };
    let values = format!(
        "coalesce({}, '[]'::jsonb)",
        values_in(&at, param, &Cell::new(0))?
    );
    Ok(match param.kind {
        "string" => format!("fhirbox_search_norm({values}::text)"),
        // No value: NULL, which no range overlaps. A Period ending before it starts still
        // lies inside the span (least/greatest).
        "date" => format!("fhirbox_search_span({values})"),
        _ => values,
    })
}

/// The necessary condition an index gives for a criterion on `at`, when one serves the
/// parameter and every value of the criterion can be put to it.
pub(super) fn prefilter(
    at: &Level<'_>,
    criterion: &Criterion,
    param: &SearchParam,
    base_url: &str,
    binds: &mut Binds,
) -> Option<String> {
    let served = at.indexes.serving(at.rt, param)?;
    let function = format!(
        "{}({})",
        object_name(at.rt, served.function_of.code),
        at.resource
    );
    let modifier = criterion.modifier.as_deref();
    let mut alternatives = Vec::new();
    for value in &criterion.values {
        match param.kind {
            "token" if modifier.is_none() => {
                for shape in token_shapes(value)? {
                    alternatives.push(format!(
                        "{function} @> {}::jsonb",
                        binds.bind(shape.to_string())
                    ));
                }
            }
            "reference" => {
                let shape = reference_shape(value, base_url, modifier, served.only_type)?;
                alternatives.push(format!(
                    "{function} @> {}::jsonb",
                    binds.bind(shape.to_string())
                ));
            }
            "string" => alternatives.push(string_filter(&function, value, modifier, binds)?),
            "date" if modifier.is_none() => {
                alternatives.push(date_filter(&function, value, binds)?)
            }
            _ => return None,
        }
    }
    (!alternatives.is_empty()).then(|| format!("({})", alternatives.join(" OR ")))
}

/// The names a chain's join uses: the type it goes to (its name, and the bind holding it),
/// that type's table and alias, and the alias of this type's rows that refer to it.
pub(super) struct Join<'a> {
    pub target: &'a str,
    pub target_sql: &'a str,
    pub target_table: &'a str,
    pub alias: &'a str,
    pub via: &'a str,
}

/// A chain through `param` as a semi-join on the index serving it: the rows of `at` that
/// some row of the target meeting `condition` is referred to by. Exact, not a prefilter:
/// the index holds the parameter's values, and a value holding `{resourceType, id}` of the
/// match is a reference to it. PostgreSQL starts from the matches (found on their own
/// indexes) and probes this index for each; `OFFSET 0` keeps it from walking this type in
/// page order instead, probing each row against the matches (713 ms against 25 ms for
/// `Encounter?subject:Patient.identifier=...` at 1M resources, measured).
pub(super) fn chain_join(
    at: &Level<'_>,
    param: &SearchParam,
    join: &Join<'_>,
    condition: &str,
) -> Option<String> {
    let row = at.resource.strip_suffix(".resource")?;
    let served = at.indexes.serving(at.rt, param)?;
    if served.only_type.is_some_and(|t| t != join.target) {
        return None;
    }
    let Join {
        target_sql,
        target_table,
        alias,
        via,
        ..
    } = join;
    Some(format!(
        "{row}.id IN (SELECT {via}.id FROM {target_table} AS {alias} JOIN {} AS {via} \
         ON {}({via}.resource) @> jsonb_build_array(jsonb_build_object('resourceType', \
         {target_sql}, 'id', {alias}.id)) WHERE {condition} OFFSET 0)",
        at.rt.table(),
        object_name(at.rt, served.function_of.code),
    ))
}

/// `Source:param` of a `_revinclude` referring to one of `refs` (`Type/id`) through the index
/// serving it, as containments: a prefilter of the exact condition.
pub(super) fn referring_any(
    at: &Level<'_>,
    param: &SearchParam,
    refs: &[String],
    binds: &mut Binds,
) -> Option<String> {
    let served = at.indexes.serving(at.rt, param)?;
    let function = format!(
        "{}({})",
        object_name(at.rt, served.function_of.code),
        at.resource
    );
    let alternatives: Vec<String> = refs
        .iter()
        .filter_map(|r| r.split_once('/'))
        .map(|(ty, id)| {
            let shape = json!([{ "resourceType": ty, "id": id }]).to_string();
            format!("{function} @> {}::jsonb", binds.bind(shape))
        })
        .collect();
    (!alternatives.is_empty()).then(|| format!("({})", alternatives.join(" OR ")))
}

/// The shapes, as jsonb arrays of one value, that a token's matches contain: a
/// CodeableConcept's Coding, a Coding, an Identifier or ContactPoint, a plain code (string,
/// boolean or number), as `fhirbox_search_tokens` reads each.
fn token_shapes(value: &str) -> Option<Vec<Value>> {
    let (system, code) = match split_escaped(value, '|').as_slice() {
        [code] | ["", code] if !code.is_empty() => (None, unescape(code)),
        [system, code] if !system.is_empty() && !code.is_empty() => {
            (Some(unescape(system)), unescape(code))
        }
        _ => return None,
    };
    let with_system = |mut object: Value| {
        if let Some(system) = &system {
            object["system"] = json!(system);
        }
        object
    };
    let mut shapes = vec![
        json!([{ "coding": [with_system(json!({ "code": code }))] }]),
        json!([with_system(json!({ "code": code }))]),
        json!([with_system(json!({ "value": code }))]),
    ];
    if system.is_none() {
        shapes.push(json!([code]));
        if let Ok(plain) = serde_json::from_str::<Value>(&code) {
            if plain.is_boolean() || plain.is_number() {
                shapes.push(json!([plain]));
            }
        }
    }
    Some(shapes)
}

/// The shape of a reference's matches, as `matchers::reference_test` reads a reference: this
/// server's base dropped, any version, `Type/id`, a bare id (typed by a `:Type` modifier or
/// by the parameter an index serves), or another server's URL.
fn reference_shape(
    value: &str,
    base_url: &str,
    modifier: Option<&str>,
    only_type: Option<&str>,
) -> Option<Value> {
    let type_modifier = match modifier {
        None => None,
        Some(t) if t.starts_with(char::is_uppercase) => Some(t),
        Some(_) => return None,
    };
    let value = unescape(value);
    let (ty, id) = match super::matchers::local_reference(&value, base_url) {
        super::matchers::Target::Url(url) => return Some(json!([{ "uri": url }])),
        super::matchers::Target::Local(ty, id) => (ty.or(type_modifier).or(only_type), id),
    };
    if id.is_empty() {
        return None;
    }
    Some(match ty {
        Some(ty) => json!([{ "resourceType": ty, "id": id }]),
        None => json!([{ "id": id }]),
    })
}

/// `text LIKE pattern` for a string criterion: the folded value after a quote (a part
/// starting with it), anywhere (`:contains`), or between quotes (`:exact`). Values that
/// JSON text escapes (a quote, a backslash, control characters) get no prefilter.
fn string_filter(
    function: &str,
    value: &str,
    modifier: Option<&str>,
    binds: &mut Binds,
) -> Option<String> {
    let value = unescape(value);
    if value.is_empty()
        || value
            .chars()
            .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        return None;
    }
    let (before, after) = match modifier {
        None => ("%\"", "%"),
        Some("contains") => ("%", "%"),
        Some("exact") => ("%\"", "\"%"),
        Some(_) => return None,
    };
    let folded = format!(
        "replace(replace(replace(fhirbox_search_norm({}), '\\', '\\\\'), '%', '\\%'), '_', '\\_')",
        binds.bind(value)
    );
    Some(format!(
        "{function} LIKE '{before}' || {folded} || '{after}'"
    ))
}

/// `span && range` for a date criterion: the instants a match must have some of, for each
/// prefix as `matchers::date_test` decides it (`ne` and `ap` give none).
fn date_filter(function: &str, value: &str, binds: &mut Binds) -> Option<String> {
    let (prefix, date) = super::matchers::prefixed(value);
    let range = match prefix {
        "eq" => "tstzrange(w.low, w.high, '[]')",
        "gt" => "tstzrange(w.high, NULL, '()')",
        "lt" => "tstzrange(NULL, w.low, '()')",
        "ge" => "tstzrange(w.low, NULL, '[)')",
        "le" => "tstzrange(NULL, w.high, '(]')",
        "sa" => "tstzrange(w.high, NULL, '[)')",
        "eb" => "tstzrange(NULL, w.low, '(]')",
        _ => return None,
    };
    let date = binds.bind(unescape(date));
    Some(format!(
        "{function} && (SELECT {range} FROM fhirbox_search_instant_range({date}) AS w)"
    ))
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
            ("Observation.value-quantity", "indexes serve"),
            ("Observation.colour", "no search parameter"),
            ("Nothing.code", "not a FHIR resource type"),
            ("code", "Type.parameter"),
        ] {
            let error = Indexes::parse(list).expect_err(list);
            assert!(error.to_string().contains(says), "{list}: {error}");
        }
    }

    #[test]
    fn an_index_serves_the_parameters_whose_values_are_part_of_its_own() {
        let indexes = Indexes::parse("common").expect("valid");
        let rt = |name| ResourceType::parse(name).expect("a type");
        let param = |t, code| crate::search::parameter(t, code).expect("a parameter");
        let served = indexes
            .serving(rt("Observation"), param("Observation", "patient"))
            .expect("subject's index serves patient");
        assert_eq!(served.function_of.code, "subject");
        assert_eq!(served.only_type, Some("Patient"));
        let served = indexes
            .serving(rt("Patient"), param("Patient", "family"))
            .expect("name's index serves family");
        assert_eq!(served.function_of.code, "name");
        assert!(indexes
            .serving(rt("Observation"), param("Observation", "performer"))
            .is_none());
        assert!(indexes
            .serving(rt("Patient"), param("Patient", "address-city"))
            .is_none());
    }

    #[test]
    fn values_name_the_shapes_their_matches_hold() {
        assert_eq!(
            token_shapes("http://loinc.org|8302-2").expect("shapes"),
            vec![
                json!([{"coding": [{"code": "8302-2", "system": "http://loinc.org"}]}]),
                json!([{"code": "8302-2", "system": "http://loinc.org"}]),
                json!([{"value": "8302-2", "system": "http://loinc.org"}]),
            ]
        );
        assert_eq!(token_shapes("true").expect("shapes").len(), 5);
        assert_eq!(token_shapes("|x").expect("shapes").len(), 4);
        assert_eq!(token_shapes("http://loinc.org|"), None);
        let base = "http://h/fhir";
        let reference = |value, modifier, only| reference_shape(value, base, modifier, only);
        assert_eq!(
            reference("Patient/1", None, None),
            Some(json!([{"resourceType": "Patient", "id": "1"}]))
        );
        assert_eq!(
            reference("http://h/fhir/Patient/1/_history/2", None, None),
            Some(json!([{"resourceType": "Patient", "id": "1"}]))
        );
        assert_eq!(reference("1", None, None), Some(json!([{"id": "1"}])));
        assert_eq!(
            reference("1", None, Some("Patient")),
            Some(json!([{"resourceType": "Patient", "id": "1"}]))
        );
        assert_eq!(
            reference("1", Some("Group"), None),
            Some(json!([{"resourceType": "Group", "id": "1"}]))
        );
        assert_eq!(reference("1", Some("identifier"), None), None);
        assert_eq!(
            reference("http://other/Patient/1", None, None),
            Some(json!([{"uri": "http://other/Patient/1"}]))
        );
    }
}
