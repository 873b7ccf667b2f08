//! Which format a document is plainly in: the reference product's documentation warns (in
//! red) that loading FHIR-format files through the native `$load` stores FHIR-shaped data that
//! its native API then misreads. A few telltale elements at the top of a resource decide:
//!
//! - FHIR: a choice element with its type in its name (`valueQuantity`,
//!   `effectiveDateTime`), or a Reference written as `{"reference": "Patient/1"}`;
//! - native: a choice element as an object keyed by its type (`value: {"Quantity": {..}}`),
//!   or a Reference written as `{"resourceType": "Patient", "id": "1"}` without `reference`.
//!
//! Anything else (most resources have neither) says nothing.

use serde_json::{Map, Value};

use super::walk::{classify, Class};
use crate::fhir::meta::{type_index, Kind};

/// A sign of one format, in words a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    Fhir(String),
    Native(String),
}

/// The first sign of a format among a resource's top-level elements, if any.
pub fn sign(doc: &Map<String, Value>) -> Option<Shape> {
    let type_name = doc.get("resourceType").and_then(Value::as_str)?;
    let index = type_index(type_name)?;
    for (key, value) in doc {
        if let Class::Choice { base, code } = classify(index, key) {
            return Some(Shape::Fhir(format!(
                "'{key}' is FHIR's form of a choice element (native: '{base}: {{{code}: ...}}')"
            )));
        }
        let Some(element) = index.def.element(key) else {
            continue;
        };
        let first = match value {
            Value::Array(items) => items.first(),
            other => Some(other),
        };
        let Some(Value::Object(object)) = first else {
            continue;
        };
        match element.kind {
            Kind::Reference(_) if object.get("reference").is_some_and(Value::is_string) => {
                return Some(Shape::Fhir(format!(
                    "'{key}.reference' is FHIR's form of a Reference (native: '{{resourceType, id}}')"
                )))
            }
            Kind::Reference(_)
                if object.contains_key("resourceType")
                    && object.contains_key("id")
                    && !object.contains_key("reference") =>
            {
                return Some(Shape::Native(format!(
                    "'{key}: {{resourceType, id}}' is the native form of a Reference (FHIR: '{key}.reference')"
                )))
            }
            Kind::Choice(codes) if object.len() == 1 => {
                if let Some(code) = object.keys().next().filter(|k| codes.contains(&k.as_str())) {
                    return Some(Shape::Native(format!(
                        "'{key}: {{{code}: ...}}' is the native form of a choice element (FHIR: '{key}{}')",
                        super::walk::capitalize(code)
                    )));
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn of(value: Value) -> Option<Shape> {
        match value {
            Value::Object(map) => sign(&map),
            _ => None,
        }
    }

    #[test]
    fn telltales_of_each_format() {
        let fhir = of(json!({"resourceType": "Observation", "valueQuantity": {"value": 1}}));
        assert!(
            matches!(fhir, Some(Shape::Fhir(ref m)) if m.contains("valueQuantity")),
            "{fhir:?}"
        );
        let fhir =
            of(json!({"resourceType": "Observation", "subject": {"reference": "Patient/1"}}));
        assert!(matches!(fhir, Some(Shape::Fhir(_))));
        let native =
            of(json!({"resourceType": "Observation", "value": {"Quantity": {"value": 1}}}));
        assert!(
            matches!(native, Some(Shape::Native(ref m)) if m.contains("valueQuantity")),
            "{native:?}"
        );
        let native = of(
            json!({"resourceType": "Observation", "subject": {"resourceType": "Patient", "id": "1"}}),
        );
        assert!(matches!(native, Some(Shape::Native(_))));
        assert_eq!(
            of(json!({"resourceType": "Patient", "gender": "female"})),
            None
        );
    }
}
