//! A search request read into a [`Plan`]: what to filter by (compiled to SQL), in which
//! order, which page, what to include, whether to count. Parameters that shape the answer's
//! entries (`_elements`, `_summary` but `count`, `_format`) are the caller's.

use std::sync::Arc;

use super::include::Include;
use super::index::Indexes;
use super::sort;
use super::{Criterion, SearchError};
use crate::format::attributes::TypeAttributes;
use crate::resource_type::ResourceType;
use crate::store::search::{After, PageFilter, SortKey};

/// The bounds on what one search may ask for (each a flag, see `config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Entries a page carries when `_count` does not say.
    pub default_count: i64,
    /// The most a page carries: a larger `_count` is this.
    pub max_count: i64,
    /// Values (ORed) one parameter may list.
    pub max_values: usize,
    /// Parameters one search may have.
    pub max_parameters: usize,
    /// Resources `_include`/`_revinclude` may add to one page.
    pub max_included: usize,
    /// How long one search's statements may run, together.
    pub timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            default_count: 100,
            max_count: 1000,
            max_values: 100,
            max_parameters: 50,
            max_included: 1000,
            timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// Parameters that shape the answer rather than filter it; the caller applies those not
/// read here.
pub const RESULT_PARAMETERS: &[&str] = &[
    "_count",
    "_cursor",
    "_format",
    "_pretty",
    "_total",
    "_summary",
    "_elements",
    "_sort",
    "_include",
    "_revinclude",
];

/// Parameters FHIR defines that fhirbox does not apply: refused, never ignored (ignoring one
/// would answer with more than was asked for).
const NOT_SUPPORTED: &[&str] = &["_text", "_content", "_query", "_filter"];

/// A search, ready to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub rt: ResourceType,
    pub filter: PageFilter,
    pub keys: Vec<SortKey>,
    pub includes: Vec<Include>,
    pub count: i64,
    /// Count the matches (`_total=accurate|estimate`, `_summary=count`).
    pub total: bool,
    /// Answer with the count alone (`_summary=count`).
    pub count_only: bool,
    /// Where the page starts (`_cursor`).
    pub after: Option<After>,
    /// The parameters that say this search (for the links), cursor aside.
    pub said: Vec<(String, String)>,
    /// Parameters ignored as unknown (lenient handling), to be said so.
    pub ignored: Vec<String>,
    /// The search indexes in force (includes use them too), shared with the server's.
    pub indexes: Arc<Indexes>,
}

impl Plan {
    /// Reads `params` for a search of `rt`. `strict`: an unknown parameter is an error rather
    /// than ignored. `base_url`: this server's, for absolute references.
    pub fn parse(
        rt: ResourceType,
        attributes: Option<&TypeAttributes>,
        params: &[(String, String)],
        strict: bool,
        base_url: &str,
        limits: &Limits,
        indexes: &Arc<Indexes>,
    ) -> Result<Plan, SearchError> {
        let mut plan = Plan {
            rt,
            filter: PageFilter::default(),
            keys: Vec::new(),
            includes: Vec::new(),
            count: limits.default_count,
            total: false,
            count_only: false,
            after: None,
            said: Vec::new(),
            ignored: Vec::new(),
            indexes: Arc::clone(indexes),
        };
        let mut criteria = Vec::new();
        let mut cursor = None;
        for (key, value) in params {
            let name = key.split(['.', ':']).next().unwrap_or(key);
            match name {
                "_count" => plan.count = count(value, limits)?,
                "_cursor" => {
                    cursor = Some(value.as_str());
                    continue;
                }
                "_total" => plan.total |= total(value)?,
                "_summary" if value == "count" => (plan.total, plan.count_only) = (true, true),
                "_sort" => plan.keys = sort::keys(rt, value)?,
                "_include" | "_revinclude" => plan.includes.push(Include::parse(key, value)?),
                _ if RESULT_PARAMETERS.contains(&name) => {}
                // What every search does anyway: match containers, not what they contain.
                "_contained" if key == name && value == "false" => {}
                "_containedType" if key == name && value == "container" => {}
                "_contained" | "_containedType" => {
                    return Err(SearchError::Unsupported(format!(
                        "{key}={value}: fhirbox does not search inside contained resources \
                         (only _contained=false and _containedType=container, the defaults)"
                    )))
                }
                "_id" if key == name => plan.ids(value),
                "_lastUpdated" if key == name => plan.last_updated(value)?,
                _ if NOT_SUPPORTED.contains(&name) => {
                    return Err(SearchError::Unsupported(format!(
                        "{key}: fhirbox does not support this parameter"
                    )))
                }
                _ => match super::parameter(rt.name(), name) {
                    Some(definition) => {
                        let criterion = Criterion::parse(key, value);
                        if criterion.values.len() > limits.max_values {
                            return Err(SearchError::invalid(
                                key,
                                format!(
                                    "{} values; at most {} are allowed (--search-max-values)",
                                    criterion.values.len(),
                                    limits.max_values
                                ),
                            ));
                        }
                        criteria.push((criterion, definition));
                    }
                    None if strict => {
                        return Err(SearchError::invalid(
                            key,
                            format!(
                                "{} has no search parameter '{name}' in FHIR R4 (refused, not \
                                 ignored: 'Prefer: handling=strict', or a search of several types)",
                                rt.name()
                            ),
                        ))
                    }
                    None => {
                        plan.ignored.push(key.clone());
                        continue;
                    }
                },
            }
            plan.said.push((key.clone(), value.clone()));
        }
        if criteria.len() > limits.max_parameters {
            return Err(SearchError::Invalid {
                param: criteria[limits.max_parameters].0.name.clone(),
                message: format!(
                    "the search has {} parameters; at most {} are allowed (--search-max-parameters)",
                    criteria.len(),
                    limits.max_parameters
                ),
            });
        }
        if !criteria.is_empty() {
            plan.filter.condition = Some(super::sql::compile(
                rt,
                attributes,
                &criteria,
                "r.resource",
                base_url,
                indexes,
            )?);
        }
        plan.after = cursor
            .map(|c| super::cursor::read(c, plan.keys.len()))
            .transpose()?;
        Ok(plan)
    }

    /// The filter of a conditional write's search (`identifier=x&active=true`): search
    /// parameters only (strictly: an unknown one would widen what the write touches), at
    /// least one.
    pub fn filter_only(
        rt: ResourceType,
        attributes: Option<&TypeAttributes>,
        params: &[(String, String)],
        base_url: &str,
        limits: &Limits,
        indexes: &Arc<Indexes>,
    ) -> Result<PageFilter, SearchError> {
        if let Some((key, _)) = params
            .iter()
            .find(|(key, _)| RESULT_PARAMETERS.contains(&key.split(':').next().unwrap_or(key)))
        {
            return Err(SearchError::invalid(
                key,
                "a conditional write's search takes search parameters only",
            ));
        }
        if params.is_empty() {
            return Err(SearchError::invalid(
                "search",
                "a conditional write needs search parameters (an empty search matches everything)",
            ));
        }
        let mut filter =
            Plan::parse(rt, attributes, params, true, base_url, limits, indexes)?.filter;
        filter.timeout = Some(limits.timeout);
        Ok(filter)
    }

    /// Repeated `_id`s must all hold: the ids in every list.
    fn ids(&mut self, value: &str) {
        let ids: Vec<String> = value.split(',').map(str::to_string).collect();
        self.filter.ids = Some(match self.filter.ids.take() {
            Some(before) => before.into_iter().filter(|id| ids.contains(id)).collect(),
            None => ids,
        });
    }

    fn last_updated(&mut self, value: &str) -> Result<(), SearchError> {
        let (from, to) = crate::bulk::params::last_updated(value)
            .map_err(|message| SearchError::invalid("_lastUpdated", message))?;
        let filter = &mut self.filter;
        if let Some(from) = from {
            filter.updated_from = Some(filter.updated_from.map_or(from, |f| f.max(from)));
        }
        if let Some(to) = to {
            filter.updated_before = Some(filter.updated_before.map_or(to, |t| t.min(to)));
        }
        Ok(())
    }
}

/// `_count`: above the maximum is the maximum (clients ask for thousands by default).
fn count(text: &str, limits: &Limits) -> Result<i64, SearchError> {
    match text.parse::<i64>() {
        Ok(n) if n >= 0 => Ok(n.min(limits.max_count)),
        _ => Err(SearchError::invalid(
            "_count",
            format!(
                "a whole number (at most {} are sent), not '{text}'",
                limits.max_count
            ),
        )),
    }
}

/// `_total`: `estimate` and `accurate` both count exactly.
fn total(text: &str) -> Result<bool, SearchError> {
    match text {
        "none" => Ok(false),
        "estimate" | "accurate" => Ok(true),
        other => Err(SearchError::invalid(
            "_total",
            format!("_total is none, estimate or accurate, not '{other}'"),
        )),
    }
}
