//! `_include` and `_revinclude` (`Source:param[:Target]`, `Source:*`, `:iterate`): the
//! resources a page's matches refer to, and those that refer to them, added to the page with
//! `search.mode = include`.
//!
//! Both run on the page just read, so their cost is bounded by the page: `_include` reads the
//! references its matches hold through the parameter (compiled as in a search) and then those
//! resources by id; `_revinclude` is a search of the source type for references to the
//! page's resources. `:iterate` applies again to what was included, at most [`MAX_ROUNDS`]
//! times. Types the subject may not read are left out (and said so), never read.

use super::index::Indexes;
use std::cell::Cell;
use std::collections::HashSet;

use super::sql::{values_in, Binds, Level};
use super::{RunError, SearchError};
use crate::fhir::meta::SearchParam;
use crate::fhir::r4::SEARCH_PARAMS;
use crate::resource::StoredResource;
use crate::resource_type::ResourceType;
use crate::store::search::{self as statements, PageFilter};
use crate::store::GenericClient;

/// Rounds of `:iterate` after the first.
pub const MAX_ROUNDS: usize = 3;

/// One `_include` or `_revinclude`.
#[derive(Debug, Clone)]
pub struct Include {
    pub reverse: bool,
    pub iterate: bool,
    /// The type whose references are followed.
    pub source: ResourceType,
    /// Its reference parameters followed (one, or every one for `*`).
    pub params: Vec<&'static SearchParam>,
    /// Only references to this type.
    pub target: Option<&'static str>,
}

impl Include {
    /// `key` is `_include`, `_revinclude`, or either with `:iterate`.
    pub fn parse(key: &str, value: &str) -> Result<Include, SearchError> {
        let (name, modifier) = key.split_once(':').unwrap_or((key, ""));
        let iterate = match modifier {
            "" => false,
            "iterate" | "recurse" => true,
            other => {
                return Err(SearchError::invalid(
                    key,
                    format!("{name} takes :iterate, not :{other}"),
                ))
            }
        };
        let invalid = |message: String| SearchError::invalid(name, message);
        let mut parts = value.split(':');
        let (Some(source), Some(code)) = (parts.next(), parts.next()) else {
            return Err(invalid(format!(
                "'{value}' is not Type:parameter[:TargetType] or Type:*"
            )));
        };
        let source = ResourceType::parse(source)
            .ok_or_else(|| invalid(format!("{source} is not a resource type stored here")))?;
        let params: Vec<&'static SearchParam> = match code {
            "*" => reference_params(source.name()).collect(),
            code => match super::parameter(source.name(), code) {
                Some(p) if p.kind == "reference" => vec![p],
                Some(p) => {
                    return Err(invalid(format!(
                        "{code} is a {} parameter of {source}; only references can be included",
                        p.kind
                    )))
                }
                None => {
                    return Err(invalid(format!(
                        "{source} has no search parameter '{code}' in FHIR R4"
                    )))
                }
            },
        };
        let target = match parts.next() {
            None => None,
            Some(t) => Some(
                params
                    .iter()
                    .flat_map(|p| p.targets.iter())
                    .find(|x| **x == t)
                    .copied()
                    .ok_or_else(|| invalid(format!("{source}:{code} cannot refer to a {t}")))?,
            ),
        };
        if parts.next().is_some() {
            return Err(invalid(format!("'{value}' has too many parts")));
        }
        Ok(Include {
            reverse: name == "_revinclude",
            iterate,
            source,
            params,
            target,
        })
    }

    /// The types this include may read: its targets, or its source when reversed.
    pub fn reads(&self) -> Vec<ResourceType> {
        if self.reverse {
            return vec![self.source];
        }
        let mut types: Vec<ResourceType> = self
            .params
            .iter()
            .flat_map(|p| p.targets.iter())
            .filter(|t| self.target.is_none_or(|only| only == **t))
            .filter_map(|t| ResourceType::parse(t))
            .collect();
        types.sort_by_key(|t| t.name());
        types.dedup();
        types
    }
}

fn reference_params(base: &str) -> impl Iterator<Item = &'static SearchParam> + '_ {
    SEARCH_PARAMS
        .iter()
        .filter(move |p| p.base == base && p.kind == "reference" && !p.expression.is_empty())
}

/// What the includes added to a page, and what they left out and why.
#[derive(Debug, Default)]
pub struct Included {
    pub resources: Vec<StoredResource>,
    pub notes: Vec<String>,
}

/// The resources `includes` bring to a page of `matches`, at most `max`; only of the types
/// `allowed` says the subject may read.
pub async fn included(
    client: &impl GenericClient,
    matches: &[StoredResource],
    includes: &[Include],
    indexes: &Indexes,
    allowed: &HashSet<ResourceType>,
    max: usize,
) -> Result<Included, RunError> {
    let key = |r: &StoredResource| (r.resource_type, r.id.clone());
    let mut seen: HashSet<(ResourceType, String)> = matches.iter().map(key).collect();
    let mut out = Included::default();
    let mut frontier: Vec<StoredResource> = matches.to_vec();
    for round in 0..=MAX_ROUNDS {
        let mut found = Vec::new();
        for include in includes.iter().filter(|i| round == 0 || i.iterate) {
            for (rt, mut resources) in one(client, &frontier, include, indexes, max).await? {
                if !allowed.contains(&rt) {
                    let note =
                        format!("{rt} resources were not included: this subject may not read them");
                    if !out.notes.contains(&note) {
                        out.notes.push(note);
                    }
                    continue;
                }
                resources.retain(|r| seen.insert(key(r)));
                found.extend(resources);
            }
        }
        if out.resources.len() + found.len() > max {
            found.truncate(max - out.resources.len());
            out.resources.extend(found);
            out.notes.push(format!(
                "more resources are included than the {max} a page carries; the rest were left out"
            ));
            return Ok(out);
        }
        if found.is_empty() {
            return Ok(out);
        }
        out.resources.extend(found.iter().cloned());
        frontier = found;
        if round == MAX_ROUNDS && includes.iter().any(|i| i.iterate) {
            out.notes.push(format!(
                ":iterate stopped after {MAX_ROUNDS} rounds; what further rounds would add was left out"
            ));
        }
    }
    Ok(out)
}

/// What one include brings for `from`, by type.
async fn one(
    client: &impl GenericClient,
    from: &[StoredResource],
    include: &Include,
    indexes: &Indexes,
    max: usize,
) -> Result<Vec<(ResourceType, Vec<StoredResource>)>, RunError> {
    let limit = max as i64 + 1;
    let page = |rt, filter| async move {
        let rows = statements::page(client, rt, &filter, &[], None, limit).await?;
        Ok::<_, RunError>(rows.into_iter().map(|(r, _)| r).collect::<Vec<_>>())
    };
    if include.reverse {
        let refs: Vec<String> = from
            .iter()
            .filter(|r| include.target.is_none_or(|t| t == r.resource_type.name()))
            .map(|r| format!("{}/{}", r.resource_type, r.id))
            .collect();
        if refs.is_empty() {
            return Ok(Vec::new());
        }
        let filter = PageFilter {
            condition: Some(referring(include, &refs, indexes)?),
            ..PageFilter::default()
        };
        return Ok(vec![(include.source, page(include.source, filter).await?)]);
    }
    let ids: Vec<String> = from
        .iter()
        .filter(|r| r.resource_type == include.source)
        .map(|r| r.id.clone())
        .collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut targets: Vec<(String, String)> = Vec::new();
    for param in &include.params {
        let values = values_in(
            &level(include.source, Indexes::none()),
            param,
            &Cell::new(0),
        )?;
        for (ty, id) in statements::references(client, include.source, &ids, &values, limit).await?
        {
            let wanted =
                include.target.is_none_or(|t| t == ty) && param.targets.contains(&ty.as_str());
            if wanted && !targets.contains(&(ty.clone(), id.clone())) {
                targets.push((ty, id));
            }
        }
    }
    let mut out = Vec::new();
    for rt in include.reads() {
        let ids: Vec<String> = targets
            .iter()
            .filter(|(ty, _)| ty == rt.name())
            .map(|(_, id)| id.clone())
            .collect();
        if ids.is_empty() {
            continue;
        }
        let filter = PageFilter {
            ids: Some(ids),
            ..PageFilter::default()
        };
        out.push((rt, page(rt, filter).await?));
    }
    Ok(out)
}

fn level(rt: ResourceType, indexes: &Indexes) -> Level<'_> {
    Level {
        rt,
        attributes: None,
        resource: "r.resource".into(),
        depth: 0,
        indexes,
    }
}

/// The condition "refers to one of `refs` (`Type/id`) through one of the include's
/// parameters", on the source type's rows; the references are one bound JSON array. An
/// index on a parameter puts its containments ahead (the exact test then decides).
fn referring(
    include: &Include,
    refs: &[String],
    indexes: &Indexes,
) -> Result<super::Condition, SearchError> {
    let mut binds = Binds::new();
    let list = binds.bind(serde_json::Value::from(refs.to_vec()).to_string());
    let at = level(include.source, indexes);
    let mut alternatives = Vec::new();
    for param in &include.params {
        let values = values_in(&at, param, &Cell::new(0))?;
        let exact = format!(
            "EXISTS (SELECT 1 FROM jsonb_array_elements(coalesce({values}, '[]'::jsonb)) AS v \
             WHERE (v ->> 'resourceType') || '/' || (v ->> 'id') \
                   IN (SELECT jsonb_array_elements_text({list}::jsonb)))"
        );
        alternatives.push(
            match super::index::referring_any(&at, param, refs, &mut binds) {
                Some(indexed) => format!("({indexed} AND {exact})"),
                None => exact,
            },
        );
    }
    if alternatives.is_empty() {
        alternatives.push("false".into());
    }
    Ok(binds.condition(alternatives.join(" OR ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includes_read_their_form() {
        let include = Include::parse("_include", "Observation:subject:Patient").expect("parses");
        assert_eq!(
            include.reads(),
            [ResourceType::parse("Patient").expect("a type")]
        );
        let all = Include::parse("_include:iterate", "Encounter:*").expect("parses");
        assert!(all.iterate && all.params.len() > 3, "{all:?}");
        let rev = Include::parse("_revinclude", "Observation:subject").expect("parses");
        assert!(rev.reverse);
        assert_eq!(
            rev.reads(),
            [ResourceType::parse("Observation").expect("a type")]
        );
        for (key, value, says) in [
            ("_include", "Observation", "Type:parameter"),
            ("_include", "Observation:code", "token parameter"),
            (
                "_include",
                "Observation:subject:Medication",
                "cannot refer to a Medication",
            ),
            ("_include:deep", "Observation:subject", ":iterate"),
            ("_include", "Nothing:subject", "not a resource type"),
        ] {
            let error = Include::parse(key, value).expect_err(value);
            assert!(error.to_string().contains(says), "{value}: {error}");
        }
    }
}
