//! FHIR search (`GET /fhir/{type}?...`): the query read into criteria ([`query`]), each
//! criterion's parameter found in the generated R4 table (`fhir::r4::SEARCH_PARAMS`), and
//! all of them compiled to one SQL condition ([`sql`]) on the same FHIRPath-to-SQL front
//! end as SQL on FHIR views (`crate::fhirpath`). `store` runs the condition; `http/search.rs`
//! reads the request and writes the Bundle.
//!
//! Supported: every R4 parameter of type string (`:exact`, `:contains`), token (`:not`,
//! `:text`), date (every prefix, the implicit range of each precision on both sides), number,
//! quantity, reference (`:Type`), uri (`:below`, `:above`), composite (every component on
//! the same value), and `:missing` on all of them; OR by commas, AND by repetition, FHIR's
//! escapes; chains (`subject:Patient.name=...`) and reverse chains (`_has:Observation:
//! subject:code=...`), up to three references deep. Not yet: special parameters and the
//! other modifiers: each a 400 saying so.

mod compartment;
mod composite;
pub mod cursor;
mod has;
pub mod include;
pub mod index;
mod list;
mod matchers;
pub mod query;
pub mod request;
pub mod run;
pub mod sort;
pub mod sql;
pub mod terminology;

pub use query::Criterion;
pub use request::{Limits, Plan};
pub use sql::Condition;

use crate::fhir::meta::SearchParam;
use crate::fhir::r4::SEARCH_PARAMS;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SearchError {
    /// The value (or the modifier) is not valid for its parameter.
    #[error("{param}: {message}")]
    Invalid { param: String, message: String },
    /// Valid FHIR that fhirbox does not search yet: refused rather than ignored (ignoring
    /// would answer with more than was asked for).
    #[error("{0}")]
    Unsupported(String),
}

/// Why a search could not run: the request, or the database.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Search(#[from] SearchError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl SearchError {
    pub fn invalid(param: &str, message: impl Into<String>) -> SearchError {
        SearchError::Invalid {
            param: param.to_string(),
            message: message.into(),
        }
    }

    /// The parameter the error is about, for the OperationOutcome's `expression`.
    pub fn param(&self) -> Option<&str> {
        match self {
            SearchError::Invalid { param, .. } => Some(param),
            SearchError::Unsupported(text) => text.split(':').next(),
        }
    }
}

/// The R4 search parameter `code` of `type_name` (its own, or a common one such as `_tag`).
pub fn parameter(type_name: &str, code: &str) -> Option<&'static SearchParam> {
    match code {
        "_has" => return Some(&has::HAS),
        "_compartment" => return Some(&compartment::COMPARTMENT),
        "_list" => return Some(&list::LIST),
        _ => {}
    }
    let find = |base: &str| {
        SEARCH_PARAMS
            .binary_search_by(|p| (p.base, p.code).cmp(&(base, code)))
            .ok()
            .map(|i| &SEARCH_PARAMS[i])
    };
    find(type_name)
        .or_else(|| find("Resource"))
        .or_else(|| find("DomainResource"))
}

/// The parameter types fhirbox searches.
pub const SUPPORTED_KINDS: &[&str] = &[
    "composite",
    "string",
    "token",
    "date",
    "number",
    "quantity",
    "reference",
    "uri",
];

/// Every parameter `type_name` can be searched by (its own and the common ones, `_id` and
/// `_lastUpdated` aside: those are the table's own columns).
pub fn searchable(type_name: &str) -> impl Iterator<Item = &'static SearchParam> + '_ {
    SEARCH_PARAMS.iter().filter(move |p| {
        (p.base == type_name || p.base == "Resource" || p.base == "DomainResource")
            && SUPPORTED_KINDS.contains(&p.kind)
            && !p.expression.is_empty()
            && p.code != "_id"
            && p.code != "_lastUpdated"
    })
}

/// Compiles `name[:modifier]=value` pairs (ANDed) for `rt` into one condition on the row's
/// `resource` column as `resource` names it: what `$export`'s `_typeFilter` applies, with the
/// same rules as search. Parameters the type does not have, chains and result parameters
/// are errors (a filter is never half-applied).
pub fn condition(
    rt: crate::resource_type::ResourceType,
    attributes: Option<&crate::format::attributes::TypeAttributes>,
    pairs: &[(String, String)],
    resource: &'static str,
    base_url: &str,
) -> Result<Condition, SearchError> {
    let mut criteria = Vec::new();
    for (key, value) in pairs {
        let name = key.split(':').next().unwrap_or(key);
        // A chain reads another type, which an export's authorization did not look at.
        if key.contains('.') || name == "_has" || name == "_list" {
            return Err(SearchError::Unsupported(format!(
                "{key}: chained parameters are not supported yet"
            )));
        }
        // So does a terminology modifier (it reads a ValueSet or CodeSystem).
        if let Some(modifier) = key.split(':').nth(1) {
            if terminology::MODIFIERS.contains(&modifier)
                && parameter(rt.name(), name).is_some_and(|p| p.kind == "token")
            {
                return Err(SearchError::Unsupported(format!(
                    "{key}: :{modifier} reads stored terminology, which an export's \
                     authorization does not cover; not supported in _typeFilter"
                )));
            }
        }
        let Some(definition) = parameter(rt.name(), name) else {
            return Err(SearchError::invalid(
                key,
                format!("{} has no search parameter '{name}' in FHIR R4", rt.name()),
            ));
        };
        criteria.push((Criterion::parse(key, value), definition));
    }
    sql::compile(
        rt,
        attributes,
        &criteria,
        resource,
        base_url,
        index::Indexes::none(),
    )
}

/// The types a chained parameter (`subject:Patient.organization.name`) reads besides
/// `type_name`, in order, as far as they can be told (a chain that names no type where it
/// must is an error when it is compiled). The caller authorizes reading each.
pub fn chained_types(type_name: &str, key: &str) -> Vec<&'static str> {
    if key == "_list" || key.starts_with("_list:") {
        return vec!["List"];
    }
    let mut types = Vec::new();
    let mut current = type_name.to_string();
    let mut key = key.to_string();
    loop {
        let criterion = Criterion::parse(&key, "");
        if criterion.name == "_has" {
            let Ok((rt, _, rest)) = has::parts(&current, &criterion) else {
                return types;
            };
            types.push(rt.name());
            current = rt.name().to_string();
            key = rest;
            continue;
        }
        let Some(param) = parameter(&current, &criterion.name) else {
            return types;
        };
        let Some(rest) = criterion.chain else {
            // The last parameter may read stored terminology (`code:in=...`).
            if let (Some(modifier), "token") = (criterion.modifier.as_deref(), param.kind) {
                types.extend(terminology::types_read(modifier));
            }
            return types;
        };
        let Ok(target) =
            sql::chain_target(&criterion.name, criterion.modifier.as_deref(), param, &rest)
        else {
            return types;
        };
        types.push(target);
        current = target.to_string();
        key = rest;
    }
}
