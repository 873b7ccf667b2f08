//! The type-driven walk over a document, in both directions, guided by the generated R4
//! element table: choice elements, References, contained resources, `meta`.
//!
//! | FHIR R4 JSON                                   | native                                   |
//! | ---------------------------------------------- | ---------------------------------------- |
//! | `{"reference": "Patient/pt-1", ...}`           | `{"resourceType": "Patient", "id": "pt-1", ...}` |
//! | `{"reference": "http://x/P/1"}`, `urn:uuid:..` | `{"uri": "http://x/P/1"}`                |
//! | `{"reference": "#p1"}`                         | `{"localRef": "p1"}`                     |
//! | `{"type": "Patient", "identifier": ..}` (no reference) | `{"resourceType": "Patient", "identifier": ..}` |
//! | `valueQuantity: {..}`, `deceasedBoolean: true` | `value: {"Quantity": {..}}`, `deceased: {"boolean": true}` |
//! | `meta.extension[url=ex:createdAt].valueInstant`| `meta.createdAt`                         |
//! | `meta.versionId: "481"`                        | `meta.versionId: 481`                    |
//!
//! `extension`/`modifierExtension` (that no Attribute describes) and primitive siblings
//! (`_birthDate`) are carried unchanged, references and choices inside them included, as the
//! reference product does by default. Elements the table does not know are kept as they are.
//! Versioned relative references (`Patient/1/_history/2`) and conditional ones
//! (`Practitioner?identifier=x|1`) cannot become `{resourceType, id}`: they become `uri`, so
//! they round-trip.

mod to_fhir;
mod to_native;

pub use to_fhir::ToFhir;
pub use to_native::ToNative;

use serde_json::{Map, Value};

use crate::fhir::meta::{Element, Kind, TypeIndex};

/// The `meta.extension` url that carries `createdAt` in FHIR.
pub const CREATED_AT_URL: &str = "ex:createdAt";

/// What a key of a FHIR object is, for the FHIR -> native direction.
pub(super) enum Class<'t> {
    /// Carried unchanged.
    Keep,
    /// A known element, converted in place.
    Element(&'static Element),
    /// A concrete choice (`valueQuantity`): becomes `base: {code: ..}`.
    Choice {
        base: &'static str,
        code: &'static str,
    },
    /// A choice name with a type the definition does not allow.
    BadChoice {
        element: &'static Element,
        suffix: &'t str,
    },
}

pub(super) fn classify<'k>(ty: &TypeIndex, key: &'k str) -> Class<'k> {
    if key.starts_with('_') || key == "extension" || key == "modifierExtension" {
        return Class::Keep;
    }
    if let Some(element) = ty.def.element(key) {
        return match element.kind {
            Kind::Choice(_) | Kind::Primitive(_) => Class::Keep,
            _ => Class::Element(element),
        };
    }
    for element in &ty.choices {
        let Some(suffix) = key.strip_prefix(element.name) else {
            continue;
        };
        if !suffix.starts_with(|c: char| c.is_ascii_uppercase()) {
            continue;
        }
        let Kind::Choice(codes) = element.kind else {
            continue;
        };
        return match codes.iter().find(|code| is_capitalized(code, suffix)) {
            Some(code) => Class::Choice {
                base: element.name,
                code,
            },
            None => Class::BadChoice { element, suffix },
        };
    }
    Class::Keep
}

/// Whether `suffix` is `code` with its first letter in upper case (`DateTime` / `dateTime`).
pub(super) fn is_capitalized(code: &str, suffix: &str) -> bool {
    let (mut c, mut s) = (code.chars(), suffix.chars());
    match (c.next(), s.next()) {
        (Some(first), Some(upper)) => first.to_ascii_uppercase() == upper && c.eq(s),
        _ => false,
    }
}

/// `dateTime` -> `DateTime`.
pub fn capitalize(code: &str) -> String {
    let mut chars = code.chars();
    match chars.next() {
        Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

/// Replaces `key` by the entries `make` returns, at the same position.
pub(super) fn rename_key(
    obj: &mut Map<String, Value>,
    key: &str,
    make: impl FnOnce(Value) -> Vec<(String, Value)>,
) {
    let Some(position) = obj.keys().position(|k| k == key) else {
        return;
    };
    let old = std::mem::take(obj);
    let mut make = Some(make);
    for (index, (k, v)) in old.into_iter().enumerate() {
        if index == position {
            if let Some(make) = make.take() {
                for (new_key, new_value) in make(v) {
                    obj.insert(new_key, new_value);
                }
            }
        } else {
            obj.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::attributes::Rules;
    use crate::format::trail::Trail;
    use crate::format::FormatError;
    use serde_json::json;

    fn to_native(doc: Value) -> Result<Value, FormatError> {
        let rules = Rules::default();
        let Value::Object(mut map) = doc else {
            panic!("object")
        };
        let name = map
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        ToNative { rules: &rules }.resource(&mut map, &Trail::root(&name))?;
        Ok(Value::Object(map))
    }

    fn to_fhir(doc: Value) -> Value {
        let rules = Rules::default();
        let Value::Object(mut map) = doc else {
            panic!("object")
        };
        ToFhir { rules: &rules }.resource(&mut map);
        Value::Object(map)
    }

    fn both_ways(fhir: Value, native: Value) {
        let converted = to_native(fhir.clone()).expect("converts");
        assert_eq!(converted, native, "FHIR -> native");
        assert_eq!(to_fhir(converted), fhir, "native -> FHIR");
    }

    #[test]
    fn references_of_every_kind() {
        both_ways(
            json!({"resourceType": "Observation",
                   "subject": {"reference": "Patient/pt-1", "display": "Alice"},
                   "performer": [{"reference": "https://other/fhir/Practitioner/9"},
                                 {"reference": "urn:uuid:0f1a"}, {"reference": "#m1"},
                                 {"reference": "Practitioner/p/_history/2"},
                                 {"reference": "Practitioner?identifier=http://x|9"}],
                   "basedOn": [{"type": "ServiceRequest", "identifier": {"value": "x",
                                "assigner": {"reference": "Organization/o1"}}}]}),
            json!({"resourceType": "Observation",
                   "subject": {"resourceType": "Patient", "id": "pt-1", "display": "Alice"},
                   "performer": [{"uri": "https://other/fhir/Practitioner/9"}, {"uri": "urn:uuid:0f1a"},
                                 {"localRef": "m1"}, {"uri": "Practitioner/p/_history/2"},
                                 {"uri": "Practitioner?identifier=http://x|9"}],
                   "basedOn": [{"resourceType": "ServiceRequest", "identifier": {"value": "x",
                                "assigner": {"resourceType": "Organization", "id": "o1"}}}]}),
        );
    }

    #[test]
    fn choices_at_any_depth() {
        both_ways(
            json!({"resourceType": "Observation", "effectiveDateTime": "2021-06-10",
                   "valueQuantity": {"value": 1.50, "unit": "mg"},
                   "component": [{"code": {"text": "x"}, "valueString": "abc"},
                                 {"valueCodeableConcept": {"text": "y"}}],
                   "_status": {"extension": [{"url": "http://x", "valueCode": "y"}]}}),
            json!({"resourceType": "Observation", "effective": {"dateTime": "2021-06-10"},
                   "value": {"Quantity": {"value": 1.50, "unit": "mg"}},
                   "component": [{"code": {"text": "x"}, "value": {"string": "abc"}},
                                 {"value": {"CodeableConcept": {"text": "y"}}}],
                   "_status": {"extension": [{"url": "http://x", "valueCode": "y"}]}}),
        );
        // In a datatype (Timing.repeat.bounds[x]) and a reference chosen by a choice.
        both_ways(
            json!({"resourceType": "MedicationRequest",
                   "medicationReference": {"reference": "Medication/m1"},
                   "dosageInstruction": [{"timing": {"repeat": {"boundsPeriod": {"start": "2020"}}}}]}),
            json!({"resourceType": "MedicationRequest",
                   "medication": {"Reference": {"resourceType": "Medication", "id": "m1"}},
                   "dosageInstruction": [{"timing": {"repeat": {"bounds": {"Period": {"start": "2020"}}}}}]}),
        );
    }

    #[test]
    fn meta_created_at_and_version() {
        both_ways(
            json!({"resourceType": "Patient", "id": "pt-1",
                   "meta": {"versionId": "481", "lastUpdated": "2021-06-10T08:26:10.707454Z",
                            "extension": [{"url": "ex:createdAt", "valueInstant": "2021-06-10T08:26:10.707454Z"}]}}),
            json!({"resourceType": "Patient", "id": "pt-1",
                   "meta": {"versionId": 481, "lastUpdated": "2021-06-10T08:26:10.707454Z",
                            "createdAt": "2021-06-10T08:26:10.707454Z"}}),
        );
    }

    #[test]
    fn unknown_extensions_and_contained_resources() {
        both_ways(
            json!({"resourceType": "Patient",
                   "extension": [{"url": "http://unknown", "valueReference": {"reference": "Patient/x"}}],
                   "contained": [{"resourceType": "Observation", "id": "o", "valueBoolean": true,
                                  "subject": {"reference": "Patient/p"}}],
                   "managingOrganization": {"reference": "#o"}}),
            json!({"resourceType": "Patient",
                   "extension": [{"url": "http://unknown", "valueReference": {"reference": "Patient/x"}}],
                   "contained": [{"resourceType": "Observation", "id": "o", "value": {"boolean": true},
                                  "subject": {"resourceType": "Patient", "id": "p"}}],
                   "managingOrganization": {"localRef": "o"}}),
        );
    }

    #[test]
    fn bad_references_and_choice_types_name_the_element() {
        let error = to_native(json!({"resourceType": "Observation", "valueFoo": 1}))
            .expect_err("bad choice");
        assert_eq!(error.expression(), Some("Observation.valueFoo"));
        assert!(
            error.to_string().contains("not allowed for value[x]"),
            "{error}"
        );
        let error = to_native(json!({"resourceType": "Observation",
            "component": [{}, {"valueBool": true}]}))
        .expect_err("bad choice");
        assert_eq!(
            error.expression(),
            Some("Observation.component[1].valueBool")
        );
        for bad in [
            "Patient/",
            "not a ref",
            "Nope/1",
            "Patient/a b",
            "#",
            "",
            "Nope?x=1",
            "Patient?",
        ] {
            let error =
                to_native(json!({"resourceType": "Observation", "subject": {"reference": bad}}))
                    .expect_err(bad);
            assert_eq!(
                error.expression(),
                Some("Observation.subject.reference"),
                "{bad}"
            );
        }
        let error = to_native(json!({"resourceType": "Observation", "subject": {"reference": 5}}))
            .expect_err("not a string");
        assert!(error.to_string().contains("must be a string"));
    }

    #[test]
    fn capitalization() {
        assert!(is_capitalized("dateTime", "DateTime"));
        assert!(is_capitalized("Quantity", "Quantity"));
        assert!(!is_capitalized("dateTime", "Datetime"));
        assert_eq!(capitalize("base64Binary"), "Base64Binary");
    }
}
