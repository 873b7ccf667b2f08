//! Criteria compiled to one SQL condition over a type's table (`r`), with every value the
//! client sent as a bind parameter.
//!
//! A parameter's expression (from the generated R4 table) is compiled by the FHIRPath front
//! end into a jsonb collection of its values; each criterion is then an `EXISTS` over those
//! values, matched by the rules of the parameter's type with the SQL functions of
//! `store::search_functions`, which look at each value's shape at run time (a choice element
//! is a dateTime in one resource and a Period in the next).

use std::cell::{Cell, RefCell};
use std::collections::HashSet;

use super::index::Indexes;
use super::matchers::{
    date_test, number_test, quantity_test, reference_test, string_test, token_test, uri_test,
};
use super::query::Criterion;
use super::SearchError;
use crate::fhir::meta::SearchParam;
use crate::fhirpath::{self, as_many, Budget, Focus, Scope, Shape, Ty, Val};
use crate::format::attributes::TypeAttributes;
use crate::resource_type::ResourceType;

/// The most SQL one search may compile to (the expressions come from the R4 definitions,
/// only their number comes from the client).
const MAX_SQL: usize = 1024 * 1024;

pub use crate::store::condition::Condition;

/// Collects the values a condition compares (see [`Condition::placeholder`]).
pub(super) struct Binds {
    values: Vec<String>,
}

impl Binds {
    pub(super) fn new() -> Binds {
        Binds { values: Vec::new() }
    }

    /// The condition `sql` with the values bound so far.
    pub(super) fn condition(self, sql: String) -> Condition {
        Condition {
            sql,
            binds: self.values,
        }
    }

    pub(super) fn bind(&mut self, value: impl Into<String>) -> String {
        self.values.push(value.into());
        format!("({}::text)", Condition::placeholder(self.values.len() - 1))
    }
}

/// Compiles `criteria` (each with its parameter's definition) for `rt`, on the row's
/// `resource` column as `resource` names it (`r.resource`, or unqualified). `base_url`: this
/// server's FHIR base, so that absolute references to it match.
pub fn compile(
    rt: ResourceType,
    attributes: Option<&TypeAttributes>,
    criteria: &[(Criterion, &'static SearchParam)],
    resource: &'static str,
    base_url: &str,
    indexes: &Indexes,
) -> Result<Condition, SearchError> {
    let mut binds = Binds::new();
    let counter = Cell::new(0);
    let at = Level {
        rt,
        attributes,
        resource: resource.to_string(),
        depth: 0,
        indexes,
    };
    let sql = conditions_sql(&at, criteria, base_url, &mut binds, &counter)?;
    Ok(binds.condition(sql))
}

/// Chains go at most this deep (`subject:Patient.organization.name` is two).
pub(super) const MAX_CHAIN: usize = 3;

/// The resource criteria apply to: its type, the Attributes in force for it (known for the
/// searched type only), its SQL, and how deep in a chain it is.
pub(super) struct Level<'a> {
    pub(super) rt: ResourceType,
    pub(super) attributes: Option<&'a TypeAttributes>,
    pub(super) resource: String,
    pub(super) depth: usize,
    /// The search indexes in force (a criterion on an indexed parameter gets a prefilter).
    pub(super) indexes: &'a Indexes,
}

impl<'a> Level<'a> {
    /// The resource itself, where its parameters' expressions start.
    fn focus(&self) -> Focus<'a> {
        let mut root = Val::new(
            self.resource.clone(),
            Shape::One,
            Ty::Complex(self.rt.name()),
        );
        root.root = true;
        Focus {
            this: root,
            row_index: "0".into(),
        }
    }
}

/// What one level's expressions are compiled with: its bound on the SQL, and the
/// compiler's own bookkeeping.
struct Frame {
    budget: Budget,
    text_columns: RefCell<HashSet<String>>,
}

impl Frame {
    fn new() -> Frame {
        Frame {
            budget: Budget::new(MAX_SQL, "the search's size"),
            text_columns: RefCell::new(HashSet::new()),
        }
    }

    fn scope<'s>(&'s self, at: &'s Level<'s>, counter: &'s Cell<usize>) -> Scope<'s, 's> {
        Scope {
            // The row whose columns (`id`) the expressions read: the level's own alias (a
            // chain's or a `_has`'s table), not the outer row.
            row: at.resource.strip_suffix(".resource").unwrap_or("r"),
            resource: at.rt.name(),
            constants: &[],
            attributes: at.attributes,
            counter,
            text_columns: &self.text_columns,
            budget: &self.budget,
            fence: false,
        }
    }
}

/// The values of `param`'s expression in the resource `at` stands for, as a jsonb array.
pub(super) fn values_in(
    at: &Level<'_>,
    param: &SearchParam,
    counter: &Cell<usize>,
) -> Result<String, SearchError> {
    let frame = Frame::new();
    let scope = frame.scope(at, counter);
    let focus = at.focus();
    let criterion = Criterion::parse(param.code, "");
    values_of(&scope, &focus, &criterion, param)
}

pub(super) fn conditions_sql(
    at: &Level<'_>,
    criteria: &[(Criterion, &'static SearchParam)],
    base_url: &str,
    binds: &mut Binds,
    counter: &Cell<usize>,
) -> Result<String, SearchError> {
    let frame = Frame::new();
    let scope = frame.scope(at, counter);
    let focus = at.focus();
    let mut parts = Vec::new();
    for (criterion, param) in criteria {
        match param.kind {
            "has" => {
                parts.push(super::has::has_sql(
                    at, criterion, base_url, binds, counter,
                )?);
                continue;
            }
            "list" => {
                parts.push(super::list::list_sql(at, criterion, binds)?);
                continue;
            }
            "compartment" => {
                parts.push(super::compartment::compartment_sql(
                    at, criterion, base_url, binds, counter,
                )?);
                continue;
            }
            _ => {}
        }
        if let Some(ids) = ids_sql(at, criterion, param, binds) {
            parts.push(ids);
            continue;
        }
        let values = values_of(&scope, &focus, criterion, param)?;
        parts.push(match (param.kind, criterion.modifier.as_deref()) {
            _ if criterion.chain.is_some() => {
                chain_sql(at, &scope, criterion, param, &values, base_url, binds)?
            }
            ("composite", modifier) if modifier != Some("missing") => {
                super::composite::composite_sql(&scope, &focus, criterion, param, binds, base_url)?
            }
            _ => {
                let exact = criterion_sql(criterion, param, &values, binds, base_url)?;
                match super::index::prefilter(at, criterion, param, base_url, binds) {
                    Some(indexed) => format!("({indexed} AND {exact})"),
                    None => exact,
                }
            }
        });
        if !frame.budget.spend(parts.last().map_or(0, String::len)) {
            return Err(SearchError::invalid(
                &criterion.name,
                "the search compiles to too much SQL; ask for fewer parameters",
            ));
        }
    }
    Ok(parts.join(" AND "))
}

/// `_id=a,b` as the row's own column (its primary key), where the row has an alias: what
/// a chain's or a `_has`'s other type is looked up by.
fn ids_sql(
    at: &Level<'_>,
    criterion: &Criterion,
    param: &SearchParam,
    binds: &mut Binds,
) -> Option<String> {
    let row = at.resource.strip_suffix(".resource")?;
    if param.code != "_id" || criterion.modifier.is_some() || criterion.chain.is_some() {
        return None;
    }
    let ids: Vec<String> = criterion
        .values
        .iter()
        .map(|v| binds.bind(super::query::unescape(v)))
        .collect();
    Some(format!("{row}.id IN ({})", ids.join(", ")))
}

/// A chained criterion (`subject:Patient.name=peter`): a reference to a resource of the
/// target type that meets the rest of the chain.
fn chain_sql(
    at: &Level<'_>,
    scope: &Scope<'_, '_>,
    criterion: &Criterion,
    param: &SearchParam,
    values: &str,
    base_url: &str,
    binds: &mut Binds,
) -> Result<String, SearchError> {
    let name = criterion.name.as_str();
    let rest = criterion.chain.as_deref().unwrap_or_default();
    if param.kind != "reference" {
        return Err(SearchError::invalid(
            name,
            format!(
                "{name} is a {} parameter; only references chain",
                param.kind
            ),
        ));
    }
    if at.depth + 1 > MAX_CHAIN {
        return Err(SearchError::invalid(
            name,
            format!("chains go at most {MAX_CHAIN} references deep"),
        ));
    }
    let target = chain_target(name, criterion.modifier.as_deref(), param, rest)?;
    let Some(target_rt) = ResourceType::parse(target) else {
        return Err(SearchError::Unsupported(format!(
            "{name}: {target} is not stored here"
        )));
    };
    let nested = Criterion::parse(rest, &criterion.values.join(","));
    let Some(nested_param) = super::parameter(target, &nested.name) else {
        return Err(SearchError::invalid(
            name,
            format!(
                "{target} has no search parameter '{}' in FHIR R4",
                nested.name
            ),
        ));
    };
    let alias = scope.fresh("chain");
    let inner = Level {
        rt: target_rt,
        attributes: None,
        resource: format!("{alias}.resource"),
        depth: at.depth + 1,
        indexes: at.indexes,
    };
    let condition = conditions_sql(
        &inner,
        &[(nested, nested_param)],
        base_url,
        binds,
        scope.counter,
    )?;
    let target_sql = binds.bind(target);
    let via = scope.fresh("via");
    let through = super::index::Join {
        target,
        target_sql: &target_sql,
        target_table: &target_rt.table(),
        alias: &alias,
        via: &via,
    };
    if let Some(joined) = super::index::chain_join(at, param, &through, &condition) {
        return Ok(joined);
    }
    let target = target_sql;
    Ok(format!(
        "EXISTS (SELECT 1 FROM jsonb_array_elements(coalesce({values}, '[]'::jsonb)) AS v \
         WHERE v ->> 'resourceType' = {target} AND EXISTS (SELECT 1 FROM {} AS {alias} \
         WHERE {alias}.id = v ->> 'id' AND {condition}))",
        target_rt.table()
    ))
}

/// The type a chain goes through: the one its `:Type` names, or the parameter's only target.
pub(super) fn chain_target(
    name: &str,
    modifier: Option<&str>,
    param: &SearchParam,
    rest: &str,
) -> Result<&'static str, SearchError> {
    match modifier {
        Some(t) => param
            .targets
            .iter()
            .find(|x| **x == t)
            .copied()
            .ok_or_else(|| {
                SearchError::invalid(
                    name,
                    format!(
                        "{name} cannot refer to a {t} (it refers to {})",
                        param.targets.join(", ")
                    ),
                )
            }),
        None => match param.targets {
            [only] => Ok(only),
            targets => Err(SearchError::invalid(
                name,
                format!(
                    "{name} may refer to {}: name the type, as {name}:{}.{rest}",
                    targets.join(", "),
                    targets.first().unwrap_or(&"Type")
                ),
            )),
        },
    }
}

/// The parameter's values in a resource, as a jsonb array (NULL when none).
fn values_of(
    scope: &Scope<'_, '_>,
    focus: &Focus<'_>,
    criterion: &Criterion,
    param: &SearchParam,
) -> Result<String, SearchError> {
    let unsupported = |why: String| SearchError::Unsupported(format!("{}: {why}", criterion.name));
    if param.expression.is_empty() {
        return Err(unsupported("R4 gives this parameter no expression".into()));
    }
    let expr = fhirpath::parse(param.expression).map_err(|e| unsupported(e.to_string()))?;
    let val = fhirpath::to_sql(scope, focus, &expr).map_err(|e| unsupported(e.to_string()))?;
    Ok(as_many(&fhirpath::resolve(val)))
}

fn criterion_sql(
    criterion: &Criterion,
    param: &SearchParam,
    values: &str,
    binds: &mut Binds,
    base_url: &str,
) -> Result<String, SearchError> {
    let name = criterion.name.as_str();
    let modifier = criterion.modifier.as_deref();
    if modifier == Some("missing") {
        let missing = match criterion.values.as_slice() {
            [v] if v == "true" => true,
            [v] if v == "false" => false,
            _ => return Err(SearchError::invalid(name, ":missing takes true or false")),
        };
        let none = format!("coalesce(jsonb_array_length({values}), 0) = 0");
        return Ok(if missing {
            none
        } else {
            format!("NOT ({none})")
        });
    }
    let each = |test: &str| {
        format!("EXISTS (SELECT 1 FROM jsonb_array_elements(coalesce({values}, '[]'::jsonb)) AS v WHERE {test})")
    };
    let mut alternatives = Vec::new();
    for value in &criterion.values {
        if param.kind == "token" && matches!(modifier, None | Some("not")) {
            if let Some(test) = super::matchers::token_path_test(values, value, binds) {
                alternatives.push(test);
                continue;
            }
        }
        let test = match (param.kind, modifier) {
            ("token", Some(m)) if super::terminology::MODIFIERS.contains(&m) => {
                super::terminology::token_test(name, m, value, base_url, binds)?
            }
            _ => plain_test(name, modifier, value, param, binds, base_url)?,
        };
        alternatives.push(each(&test));
    }
    let any = format!("({})", alternatives.join(" OR "));
    Ok(match (param.kind, modifier) {
        ("token", Some("not" | "not-in")) => format!("NOT {any}"),
        _ => any,
    })
}

/// The test of one value `v` by the rules of the parameter's type.
fn plain_test(
    name: &str,
    modifier: Option<&str>,
    value: &str,
    param: &SearchParam,
    binds: &mut Binds,
    base_url: &str,
) -> Result<String, SearchError> {
    Ok(match param.kind {
        "string" => string_test(name, modifier, value, binds)?,
        "token" => token_test(name, modifier, value, binds)?,
        "date" => date_test(name, modifier, value, binds)?,
        "number" => number_test(name, modifier, value, binds)?,
        "quantity" => quantity_test(name, modifier, value, binds)?,
        "reference" => reference_test(name, modifier, value, param, binds, base_url)?,
        "uri" => uri_test(name, modifier, value, binds)?,
        other => {
            return Err(SearchError::Unsupported(format!(
                "{name}: {other} parameters are not supported yet"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_r4_parameter_of_a_supported_type_compiles() {
        use crate::fhir::r4::SEARCH_PARAMS;
        let mut failures = Vec::new();
        for param in SEARCH_PARAMS
            .iter()
            .filter(|p| super::super::SUPPORTED_KINDS.contains(&p.kind))
        {
            let Some(rt) =
                ResourceType::parse(param.base).or_else(|| ResourceType::parse("Patient"))
            else {
                continue;
            };
            if param.expression.is_empty() {
                continue;
            }
            let sample = |kind: &str| match kind {
                "date" => "2020",
                "number" | "quantity" => "5",
                _ => "x",
            };
            let value = match param.kind {
                "composite" => param
                    .components
                    .iter()
                    .map(|(kind, _)| sample(kind))
                    .collect::<Vec<_>>()
                    .join("$"),
                kind => sample(kind).to_string(),
            };
            let criterion = Criterion::parse(param.code, &value);
            if let Err(e) = compile(
                rt,
                None,
                &[(criterion, param)],
                "r.resource",
                "http://localhost/fhir",
                Indexes::none(),
            ) {
                failures.push(format!("{}.{}: {e}", param.base, param.code));
            }
        }
        assert!(
            failures.is_empty(),
            "{} failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    #[test]
    fn values_are_bound_and_never_in_the_sql() {
        let rt = ResourceType::parse("Observation").expect("a type");
        let criteria: Vec<(Criterion, &SearchParam)> = [
            ("code", "http://loinc.org|8302-2"),
            ("date", "ge2020-01"),
            ("subject", "Patient/O'Hara"),
        ]
        .into_iter()
        .map(|(name, value)| {
            let param = super::super::parameter("Observation", name).expect("an R4 parameter");
            (Criterion::parse(name, value), param)
        })
        .collect();
        let condition = compile(
            rt,
            None,
            &criteria,
            "r.resource",
            "http://localhost/fhir",
            Indexes::none(),
        )
        .expect("compiles");
        assert_eq!(
            condition.binds,
            ["8302-2", "http://loinc.org", "2020-01", "O'Hara", "Patient"]
        );
        for value in &condition.binds {
            assert!(
                !condition.sql.contains(value.as_str()),
                "{value} pasted: {}",
                condition.sql
            );
        }
        let sql = condition.render(|i| format!("${}", i + 6));
        assert!(sql.contains("($10::text)"), "{sql}");
        if std::env::var_os("FHIRBOX_PRINT_SEARCH_SQL").is_some() {
            println!("{sql}");
        }
    }
}
