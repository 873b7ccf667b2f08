//! Composite parameters (`Observation?code-value-quantity=http://loinc.org|8480-6$gt150`):
//! every component must match on the same value of the parameter's expression (the same
//! Observation, or the same `component` of it). Each part of the expression's union is a
//! value of its own type, and each component's expression is compiled relative to it.

use super::matchers::{
    date_test, number_test, quantity_test, reference_test, string_test, token_test, uri_test,
};
use super::query::{split_escaped, Criterion};
use super::sql::Binds;
use super::SearchError;
use crate::fhir::meta::SearchParam;
use crate::fhirpath::{self, as_many, Expr, Focus, Op, Scope, Shape, Val};

/// The SQL of one composite criterion (its alternatives ORed).
pub(super) fn composite_sql(
    scope: &Scope<'_, '_>,
    focus: &Focus<'_>,
    criterion: &Criterion,
    param: &SearchParam,
    binds: &mut Binds,
    base_url: &str,
) -> Result<String, SearchError> {
    let name = criterion.name.as_str();
    if let Some(modifier) = &criterion.modifier {
        return Err(SearchError::Unsupported(format!(
            "{name}: the modifier :{modifier} is not supported on composite parameters"
        )));
    }
    let unsupported = |why: String| SearchError::Unsupported(format!("{name}: {why}"));
    let expr = fhirpath::parse(param.expression).map_err(|e| unsupported(e.to_string()))?;
    let mut parts = Vec::new();
    union_parts(&expr, &mut parts);
    let mut alternatives = Vec::new();
    for value in &criterion.values {
        let pieces = split_escaped(value, '$');
        if pieces.len() != param.components.len() {
            return Err(SearchError::invalid(
                name,
                format!(
                    "'{value}' has {} parts; {name} takes {} separated by $",
                    pieces.len(),
                    param.components.len()
                ),
            ));
        }
        for part in &parts {
            let items =
                fhirpath::to_sql(scope, focus, part).map_err(|e| unsupported(e.to_string()))?;
            let items = fhirpath::resolve(items);
            let alias = scope.fresh("c");
            let mut item = Val::new(alias.clone(), Shape::One, items.ty.clone());
            item.root = false;
            let on_item = Focus {
                this: item,
                row_index: "0".into(),
            };
            let mut tests = Vec::new();
            for ((kind, expression), piece) in param.components.iter().zip(&pieces) {
                let component =
                    fhirpath::parse(expression).map_err(|e| unsupported(e.to_string()))?;
                let values = fhirpath::to_sql(scope, &on_item, &component)
                    .map_err(|e| unsupported(e.to_string()))?;
                let values = as_many(&fhirpath::resolve(values));
                let test = match *kind {
                    "token" => token_test(name, None, piece, binds)?,
                    "string" => string_test(name, None, piece, binds)?,
                    "date" => date_test(name, None, piece, binds)?,
                    "number" => number_test(name, None, piece, binds)?,
                    "quantity" => quantity_test(name, None, piece, binds)?,
                    "uri" => uri_test(name, None, piece, binds)?,
                    // No modifier reaches a component, so the targets `reference_test`
                    // checks a type modifier against are not needed.
                    "reference" => reference_test(name, None, piece, param, binds, base_url)?,
                    other => {
                        return Err(unsupported(format!(
                            "a composite with a {other} component is not supported yet"
                        )))
                    }
                };
                tests.push(format!(
                    "EXISTS (SELECT 1 FROM jsonb_array_elements(coalesce({values}, '[]'::jsonb)) AS v WHERE {test})"
                ));
            }
            alternatives.push(format!(
                "EXISTS (SELECT 1 FROM jsonb_array_elements(coalesce({}, '[]'::jsonb)) AS {alias} WHERE {})",
                as_many(&items),
                tests.join(" AND ")
            ));
        }
    }
    Ok(format!("({})", alternatives.join(" OR ")))
}

/// The operands of a top-level union (`Observation | Observation.component`), each a value
/// of its own type.
fn union_parts<'e>(expr: &'e Expr, parts: &mut Vec<&'e Expr>) {
    match expr {
        Expr::Binary(Op::Union, left, right) => {
            union_parts(left, parts);
            union_parts(right, parts);
        }
        other => parts.push(other),
    }
}
