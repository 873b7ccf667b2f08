//! Compartment search: `GET /Patient/123/Observation?...` is a search of Observation with
//! `_compartment=Patient/123` (the route is rewritten before routing, so that it is
//! authorized exactly as that search): the resources that the Patient compartment's
//! parameters of their type (R4's CompartmentDefinition `patient`) tie to that patient, ORed.

use std::cell::Cell;

use super::query::{unescape, Criterion};
use super::sql::{conditions_sql, Binds, Level};
use super::SearchError;
use crate::fhir::meta::SearchParam;
use crate::fhir::r4::PATIENT_COMPARTMENT_PARAMS;

/// How `_compartment` looks in the parameter table.
pub(super) static COMPARTMENT: SearchParam = SearchParam {
    base: "Resource",
    code: "_compartment",
    kind: "compartment",
    expression: "",
    targets: &["Patient"],
    components: &[],
};

/// The SQL of a `_compartment=Patient/[id]` criterion on the row `at` stands for.
pub(super) fn compartment_sql(
    at: &Level<'_>,
    criterion: &Criterion,
    base_url: &str,
    binds: &mut Binds,
    counter: &Cell<usize>,
) -> Result<String, SearchError> {
    let invalid = |message: String| SearchError::invalid("_compartment", message);
    let id = match criterion.values.as_slice() {
        [one] => one.strip_prefix("Patient/").filter(|id| !id.is_empty()),
        _ => None,
    }
    .ok_or_else(|| invalid("names one patient, as Patient/[id]".into()))?;
    let Some((_, codes)) = PATIENT_COMPARTMENT_PARAMS
        .iter()
        .find(|(name, _)| *name == at.rt.name())
    else {
        return Err(invalid(format!(
            "{} is not in the Patient compartment",
            at.rt
        )));
    };
    let row = at.resource.strip_suffix(".resource").unwrap_or("r");
    let mut alternatives = Vec::new();
    // A patient is in its own compartment.
    if at.rt.name() == "Patient" {
        alternatives.push(format!("{row}.id = {}", binds.bind(unescape(id))));
    }
    for code in codes.iter() {
        if *code == "{def}" {
            alternatives.push(format!("{row}.id = {}", binds.bind(unescape(id))));
            continue;
        }
        let param = super::parameter(at.rt.name(), code)
            .ok_or_else(|| invalid(format!("{} has no parameter {code}", at.rt)))?;
        // The value as sent, escapes and all.
        let nested = Criterion::parse(code, &format!("Patient/{id}"));
        alternatives.push(conditions_sql(
            at,
            &[(nested, param)],
            base_url,
            binds,
            counter,
        )?);
    }
    let exact = format!("({})", alternatives.join(" OR "));
    // The compartment index `$export` keeps (the ids of the Patients a resource refers to
    // through the compartment's paths) holds every match: it goes first.
    if crate::store::export::compartment_paths(at.rt.name()).is_none() {
        return Ok(exact);
    }
    let function = crate::store::export::patients_function(at.rt);
    let bound = binds.bind(unescape(id));
    let indexed = if at.rt.name() == "Patient" {
        format!(
            "({row}.id = {bound} OR {function}({}) ? {bound})",
            at.resource
        )
    } else {
        format!("{function}({}) ? {bound}", at.resource)
    };
    Ok(format!("({indexed} AND {exact})"))
}
