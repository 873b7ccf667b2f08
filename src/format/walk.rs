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

use serde_json::{Map, Value};

use super::attributes::Rules;
use super::trail::Trail;
use super::FormatError;
use crate::fhir::meta::{type_index, Element, Kind, TypeIndex};
use crate::resource::is_valid_id;
use crate::resource_type::ResourceType;

/// The `meta.extension` url that carries `createdAt` in FHIR.
pub const CREATED_AT_URL: &str = "ex:createdAt";

/// What a key of a FHIR object is, for the FHIR -> native direction.
enum Class<'t> {
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

fn classify<'k>(ty: &TypeIndex, key: &'k str) -> Class<'k> {
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
fn is_capitalized(code: &str, suffix: &str) -> bool {
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

/// FHIR -> native.
pub struct ToNative<'r> {
    pub rules: &'r Rules,
}

impl ToNative<'_> {
    /// Converts a resource in place.
    pub fn resource(
        &self,
        doc: &mut Map<String, Value>,
        trail: &Trail<'_>,
    ) -> Result<(), FormatError> {
        let Some(resource_type) = doc
            .get("resourceType")
            .and_then(Value::as_str)
            .map(str::to_string)
        else {
            return Ok(());
        };
        if let Some(Value::Object(meta)) = doc.get_mut("meta") {
            meta_to_native(meta);
        }
        if let Some(attributes) = self.rules.for_type(&resource_type) {
            attributes.extensions_to_native(doc, self, trail)?;
        }
        if let Some(ty) = type_index(&resource_type) {
            self.object(doc, ty, trail)?;
        }
        Ok(())
    }

    fn object(
        &self,
        obj: &mut Map<String, Value>,
        ty: &TypeIndex,
        trail: &Trail<'_>,
    ) -> Result<(), FormatError> {
        let mut renames = false;
        for (key, value) in obj.iter_mut() {
            match classify(ty, key) {
                Class::Keep => {}
                Class::Element(element) => self.element(value, element.kind, &trail.key(key))?,
                Class::Choice { .. } => renames = true,
                Class::BadChoice { element, suffix } => {
                    let Kind::Choice(codes) = element.kind else {
                        continue;
                    };
                    return Err(FormatError::invalid(
                        &trail.key(key),
                        format!(
                            "type '{suffix}' is not allowed for {}[x] (allowed: {})",
                            element.name,
                            codes
                                .iter()
                                .map(|c| capitalize(c))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
        }
        if !renames {
            return Ok(());
        }
        // A choice key changes name: rebuild the object, keeping the order of its keys.
        let old = std::mem::take(obj);
        for (key, mut value) in old {
            if let Class::Choice { base, code } = classify(ty, &key) {
                let trail = trail.key(&key);
                self.typed(&mut value, code, &trail)?;
                if obj.contains_key(base) {
                    return Err(FormatError::invalid(
                        &trail,
                        format!("more than one value for {base}[x]"),
                    ));
                }
                obj.insert(
                    base.to_string(),
                    Value::Object(Map::from_iter([(code.to_string(), value)])),
                );
            } else {
                obj.insert(key, value);
            }
        }
        Ok(())
    }

    /// Converts the value of an element of a given kind (an object, or an array of them).
    fn element(&self, value: &mut Value, kind: Kind, trail: &Trail<'_>) -> Result<(), FormatError> {
        match value {
            Value::Array(items) => {
                for (index, item) in items.iter_mut().enumerate() {
                    self.element(item, kind, &trail.index(index))?;
                }
                Ok(())
            }
            Value::Object(obj) => match kind {
                Kind::Complex(name) | Kind::ContentRef(name) => self.complex(obj, name, trail),
                Kind::Reference(_) => self.reference(obj, trail),
                Kind::Resource => self.resource(obj, trail),
                Kind::Primitive(_) | Kind::Choice(_) => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// A value of a FHIR type (a choice's chosen type, or an Attribute's type).
    pub fn typed(
        &self,
        value: &mut Value,
        code: &str,
        trail: &Trail<'_>,
    ) -> Result<(), FormatError> {
        if code == "Reference" {
            return self.element(value, Kind::Reference(&[]), trail);
        }
        match type_index(code) {
            Some(ty) => self.element(value, Kind::Complex(ty.def.name), trail),
            None => Ok(()), // a primitive
        }
    }

    fn complex(
        &self,
        obj: &mut Map<String, Value>,
        name: &str,
        trail: &Trail<'_>,
    ) -> Result<(), FormatError> {
        if name == "Reference" {
            return self.reference(obj, trail);
        }
        match type_index(name) {
            Some(ty) => self.object(obj, ty, trail),
            None => Ok(()),
        }
    }

    fn reference(
        &self,
        obj: &mut Map<String, Value>,
        trail: &Trail<'_>,
    ) -> Result<(), FormatError> {
        if let (Some(Value::Object(identifier)), Some(ty)) =
            (obj.get_mut("identifier"), type_index("Identifier"))
        {
            self.object(identifier, ty, &trail.key("identifier"))?;
        }
        let target = match obj.get("reference") {
            None => {
                // A logical reference: `type` names the resource type.
                if obj.contains_key("type") && !obj.contains_key("resourceType") {
                    rename_key(obj, "type", |value| vec![("resourceType".into(), value)]);
                }
                return Ok(());
            }
            Some(Value::String(reference)) => parse_reference(reference)
                .ok_or_else(|| FormatError::invalid(
                    &trail.key("reference"),
                    format!("cannot parse the reference '{reference}': expected Type/id, an absolute URL, urn:uuid:/urn:oid:, or #id"),
                ))?,
            Some(_) => return Err(FormatError::invalid(&trail.key("reference"), "a reference must be a string")),
        };
        rename_key(obj, "reference", |_| match target {
            Target::Local(id) => vec![("localRef".into(), Value::String(id))],
            Target::Relative(resource_type, id) => vec![
                ("resourceType".into(), Value::String(resource_type)),
                ("id".into(), Value::String(id)),
            ],
            Target::Uri(uri) => vec![("uri".into(), Value::String(uri))],
        });
        Ok(())
    }
}

/// Replaces `key` by the entries `make` returns, at the same position.
fn rename_key(
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

/// What a FHIR `reference` string points at.
enum Target {
    Local(String),
    Relative(String, String),
    Uri(String),
}

fn parse_reference(reference: &str) -> Option<Target> {
    if let Some(local) = reference.strip_prefix('#') {
        return (!local.is_empty()).then(|| Target::Local(local.to_string()));
    }
    if let Some((resource_type, id)) = reference.split_once('/') {
        if ResourceType::parse(resource_type).is_some() && is_valid_id(id) {
            return Some(Target::Relative(resource_type.to_string(), id.to_string()));
        }
        // `Patient/1/_history/2`: a valid relative reference, kept whole.
        let mut parts = reference.split('/');
        if let (Some(t), Some(id), Some("_history"), Some(version), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            if ResourceType::parse(t).is_some() && is_valid_id(id) && is_valid_id(version) {
                return Some(Target::Uri(reference.to_string()));
            }
        }
    }
    // A conditional reference (`Practitioner?identifier=...`), as Synthea and transaction
    // Bundles write them: resolvable only by search, kept whole.
    if let Some((resource_type, query)) = reference.split_once('?') {
        if ResourceType::parse(resource_type).is_some() && !query.is_empty() {
            return Some(Target::Uri(reference.to_string()));
        }
    }
    if is_absolute(reference) {
        return Some(Target::Uri(reference.to_string()));
    }
    None
}

/// `scheme:rest` with an RFC 3986 scheme (`http:`, `https:`, `urn:`), no spaces.
fn is_absolute(reference: &str) -> bool {
    let Some((scheme, rest)) = reference.split_once(':') else {
        return false;
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    scheme_ok && !rest.is_empty() && !reference.contains(char::is_whitespace)
}

fn meta_to_native(meta: &mut Map<String, Value>) {
    if let Some(Value::String(version)) = meta.get("versionId") {
        if let Ok(number) = version.parse::<i64>() {
            if number.to_string() == *version {
                meta.insert("versionId".into(), number.into());
            }
        }
    }
    let Some(Value::Array(extensions)) = meta.get_mut("extension") else {
        return;
    };
    let position = extensions.iter().position(|ext| {
        ext.get("url").and_then(Value::as_str) == Some(CREATED_AT_URL)
            && ext.get("valueInstant").is_some()
    });
    let Some(position) = position else { return };
    let created = extensions.remove(position);
    let empty = extensions.is_empty();
    if empty {
        meta.shift_remove("extension");
    }
    if let Some(instant) = created.get("valueInstant") {
        meta.insert("createdAt".into(), instant.clone());
    }
}

/// Native -> FHIR. Never fails: what does not have the expected native shape is left as it is.
pub struct ToFhir<'r> {
    pub rules: &'r Rules,
}

impl ToFhir<'_> {
    pub fn resource(&self, doc: &mut Map<String, Value>) {
        let Some(resource_type) = doc
            .get("resourceType")
            .and_then(Value::as_str)
            .map(str::to_string)
        else {
            return;
        };
        if let Some(Value::Object(meta)) = doc.get_mut("meta") {
            meta_to_fhir(meta);
        }
        if let Some(ty) = type_index(&resource_type) {
            self.object(doc, ty);
        }
        if let Some(attributes) = self.rules.for_type(&resource_type) {
            attributes.fields_to_fhir(doc, self);
        }
    }

    fn object(&self, obj: &mut Map<String, Value>, ty: &TypeIndex) {
        let mut renames = false;
        for (key, value) in obj.iter_mut() {
            if key.starts_with('_') || key == "extension" || key == "modifierExtension" {
                continue;
            }
            let Some(element) = ty.def.element(key) else {
                continue;
            };
            match element.kind {
                Kind::Choice(codes) => renames |= choice_code(value, codes).is_some(),
                Kind::Primitive(_) => {}
                kind => self.element(value, kind),
            }
        }
        if !renames {
            return;
        }
        let old = std::mem::take(obj);
        for (key, value) in old {
            let choice = ty.def.element(&key).and_then(|element| match element.kind {
                Kind::Choice(codes) => choice_code(&value, codes),
                _ => None,
            });
            match (choice, value) {
                (Some(code), Value::Object(wrapper)) => {
                    let Some((_, mut inner)) = wrapper.into_iter().next() else {
                        continue;
                    };
                    self.typed(&mut inner, code);
                    obj.insert(format!("{key}{}", capitalize(code)), inner);
                }
                (_, value) => {
                    obj.insert(key, value);
                }
            }
        }
    }

    fn element(&self, value: &mut Value, kind: Kind) {
        match value {
            Value::Array(items) => items.iter_mut().for_each(|item| self.element(item, kind)),
            Value::Object(obj) => match kind {
                Kind::Complex(name) | Kind::ContentRef(name) => self.complex(obj, name),
                Kind::Reference(_) => self.reference(obj),
                Kind::Resource => self.resource(obj),
                Kind::Primitive(_) | Kind::Choice(_) => {}
            },
            _ => {}
        }
    }

    pub fn typed(&self, value: &mut Value, code: &str) {
        if code == "Reference" {
            if let Value::Object(obj) = value {
                self.reference(obj);
            }
            return;
        }
        if let Some(ty) = type_index(code) {
            self.element(value, Kind::Complex(ty.def.name));
        }
    }

    fn complex(&self, obj: &mut Map<String, Value>, name: &str) {
        if name == "Reference" {
            return self.reference(obj);
        }
        if let Some(ty) = type_index(name) {
            self.object(obj, ty);
        }
    }

    fn reference(&self, obj: &mut Map<String, Value>) {
        if let (Some(Value::Object(identifier)), Some(ty)) =
            (obj.get_mut("identifier"), type_index("Identifier"))
        {
            self.object(identifier, ty);
        }
        if obj.contains_key("reference") {
            return;
        }
        let text = |key: &str| obj.get(key).and_then(Value::as_str).map(str::to_string);
        if let Some(local) = text("localRef") {
            rename_key(obj, "localRef", |_| {
                vec![("reference".into(), Value::String(format!("#{local}")))]
            });
        } else if let (Some(resource_type), Some(id)) = (text("resourceType"), text("id")) {
            obj.shift_remove("id");
            rename_key(obj, "resourceType", |_| {
                vec![(
                    "reference".into(),
                    Value::String(format!("{resource_type}/{id}")),
                )]
            });
        } else if let Some(uri) = text("uri") {
            rename_key(obj, "uri", |_| {
                vec![("reference".into(), Value::String(uri))]
            });
        } else if obj.contains_key("resourceType") && !obj.contains_key("type") {
            rename_key(obj, "resourceType", |value| vec![("type".into(), value)]);
        }
    }
}

/// The type code of a native choice value `{code: value}` with an allowed code.
fn choice_code(value: &Value, codes: &'static [&'static str]) -> Option<&'static str> {
    let Value::Object(wrapper) = value else {
        return None;
    };
    if wrapper.len() != 1 {
        return None;
    }
    let (code, _) = wrapper.iter().next()?;
    codes.iter().find(|allowed| **allowed == code).copied()
}

fn meta_to_fhir(meta: &mut Map<String, Value>) {
    if let Some(Value::Number(version)) = meta.get("versionId") {
        let text = version.to_string();
        meta.insert("versionId".into(), Value::String(text));
    }
    if let Some(created) = meta.shift_remove("createdAt") {
        let extension = serde_json::json!({"url": CREATED_AT_URL, "valueInstant": created});
        match meta.get_mut("extension") {
            Some(Value::Array(extensions)) => extensions.push(extension),
            _ => {
                meta.insert("extension".into(), Value::Array(vec![extension]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
