//! First-class extensions: `Attribute` resources that turn FHIR extensions into native fields.
//!
//! An Attribute for resource type `R` (`resource: {id: R}`) at `path: [p]` with
//! `extensionUrl: U` maps FHIR `extension: [{url: U, value<T>: v}]` (with `type: {id: T}`) to
//! native `p: v`, or, without a `type`, FHIR `extension: [{url: U, extension: [..children..]}]`
//! to native `p: {child: ..}` where each child is an Attribute at `[p, child]` whose
//! `extensionUrl` is the child extension's url. `isCollection: true` makes the native field an
//! array, one extension per element. Attributes without `extensionUrl` are not converted (as
//! the reference product documents), nor are their children.
//!
//! Conversion never loses data: an extension whose shape does not fit its Attribute (another
//! value type, a child extension no Attribute describes) stays in `extension` unconverted, and
//! a native field that does not fit stays a native field. Converted extensions are appended to
//! the end of `extension` (as the reference product does), so with Attributes an `extension`
//! array's order can change on a round trip; its content does not.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::trail::Trail;
use super::walk::{capitalize, ToFhir, ToNative};
use super::FormatError;

/// All Attributes, by resource type.
#[derive(Debug, Default)]
pub struct Rules {
    by_type: HashMap<String, TypeAttributes>,
}

/// The root Attributes of one resource type.
#[derive(Debug, Default)]
pub struct TypeAttributes {
    roots: Vec<Attribute>,
}

#[derive(Debug)]
pub struct Attribute {
    /// The native key: the last element of the Attribute's path.
    key: String,
    url: String,
    collection: bool,
    /// The FHIR type of the value (`CodeableConcept`, `string`); `None`: complex, by children.
    value_type: Option<String>,
    children: Vec<Attribute>,
}

/// One Attribute resource as stored, reduced to what conversion uses.
struct Definition {
    resource_type: String,
    path: Vec<String>,
    url: Option<String>,
    collection: bool,
    value_type: Option<String>,
}

impl Definition {
    fn parse(body: &Value) -> Option<Definition> {
        let text = |value: &Value| value.as_str().map(str::to_string);
        Some(Definition {
            resource_type: body.get("resource")?.get("id").and_then(text)?,
            path: body
                .get("path")?
                .as_array()?
                .iter()
                .map(text)
                .collect::<Option<Vec<_>>>()?,
            url: body.get("extensionUrl").and_then(text),
            collection: body
                .get("isCollection")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            value_type: body.get("type").and_then(|t| t.get("id")).and_then(text),
        })
    }
}

impl Rules {
    /// Builds the rules from the bodies of every Attribute resource.
    pub fn from_attributes<'a>(bodies: impl IntoIterator<Item = &'a Value>) -> Rules {
        let mut definitions: Vec<Definition> =
            bodies.into_iter().filter_map(Definition::parse).collect();
        // Parents before children.
        definitions.sort_by_key(|d| d.path.len());
        let mut rules = Rules::default();
        for definition in definitions {
            let Some(url) = definition.url else { continue };
            let Some((key, parents)) = definition.path.split_last() else {
                continue;
            };
            let attribute = Attribute {
                key: key.clone(),
                url,
                collection: definition.collection,
                value_type: definition.value_type,
                children: Vec::new(),
            };
            let type_rules = rules.by_type.entry(definition.resource_type).or_default();
            insert(&mut type_rules.roots, parents, attribute);
        }
        rules
            .by_type
            .retain(|_, attributes| !attributes.roots.is_empty());
        rules
    }

    pub fn for_type(&self, resource_type: &str) -> Option<&TypeAttributes> {
        self.by_type.get(resource_type)
    }
}

/// Puts an Attribute under its parents (complex Attributes named by `parents`); one whose
/// parent is missing or typed is dropped: it could never be reached.
fn insert(siblings: &mut Vec<Attribute>, parents: &[String], attribute: Attribute) {
    match parents.split_first() {
        None => siblings.push(attribute),
        Some((parent, rest)) => {
            if let Some(found) = siblings
                .iter_mut()
                .find(|a| &a.key == parent && a.value_type.is_none())
            {
                insert(&mut found.children, rest, attribute);
            }
        }
    }
}

impl Attribute {
    /// The native field's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn is_collection(&self) -> bool {
        self.collection
    }

    /// The value's FHIR type; `None` for a complex extension (read through its children).
    pub fn value_type(&self) -> Option<&str> {
        self.value_type.as_deref()
    }

    /// The child Attribute for a nested extension's url.
    pub fn child_by_url(&self, url: &str) -> Option<&Attribute> {
        self.children.iter().find(|a| a.url == url)
    }
}

impl TypeAttributes {
    /// Moves the resource's extensions that Attributes describe into native fields.
    pub fn extensions_to_native(
        &self,
        doc: &mut Map<String, Value>,
        walker: &ToNative<'_>,
        trail: &Trail<'_>,
    ) -> Result<(), FormatError> {
        let Some(Value::Array(extensions)) = doc.get_mut("extension") else {
            return Ok(());
        };
        let mut kept = Vec::new();
        let mut fields: Vec<(&Attribute, Vec<Value>)> = Vec::new();
        for (index, extension) in std::mem::take(extensions).into_iter().enumerate() {
            let url = extension.get("url").and_then(Value::as_str);
            let attribute = self.roots.iter().find(|a| Some(a.url.as_str()) == url);
            let converted = match attribute {
                Some(attribute) => {
                    let trail = trail.key("extension");
                    attribute.to_native(&extension, walker, &trail.index(index))?
                }
                None => None,
            };
            match (attribute, converted) {
                (Some(attribute), Some(value)) => {
                    match fields.iter_mut().find(|(a, _)| std::ptr::eq(*a, attribute)) {
                        Some((_, values)) if attribute.collection => values.push(value),
                        // A second value for a single-valued field: keep it as an extension.
                        Some(_) => kept.push(extension),
                        None => fields.push((attribute, vec![value])),
                    }
                }
                _ => kept.push(extension),
            }
        }
        if kept.is_empty() {
            doc.shift_remove("extension");
        } else {
            doc.insert("extension".into(), Value::Array(kept));
        }
        for (attribute, mut values) in fields {
            let value = if attribute.collection {
                Value::Array(values)
            } else {
                values.swap_remove(0)
            };
            doc.insert(attribute.key.clone(), value);
        }
        Ok(())
    }

    /// The root Attribute for an extension url, for views that read `extension(url)`.
    pub fn by_url(&self, url: &str) -> Option<&Attribute> {
        self.roots.iter().find(|a| a.url == url)
    }

    /// Whether a root Attribute's native key is `key`.
    pub fn describes(&self, key: &[u8]) -> bool {
        self.roots.iter().any(|a| a.key.as_bytes() == key)
    }

    /// One native field -> its extensions, if an Attribute describes it and the value fits.
    pub fn field_to_fhir(
        &self,
        key: &str,
        value: &Value,
        walker: &ToFhir<'_>,
    ) -> Option<Vec<Value>> {
        self.roots
            .iter()
            .find(|a| a.key == key)?
            .to_fhir_all(value, walker)
    }

    /// Moves native fields that Attributes describe into the resource's `extension` array.
    pub fn fields_to_fhir(&self, doc: &mut Map<String, Value>, walker: &ToFhir<'_>) {
        let mut extensions = Vec::new();
        for attribute in &self.roots {
            let Some(value) = doc.get(&attribute.key) else {
                continue;
            };
            if let Some(mut converted) = attribute.to_fhir_all(value, walker) {
                doc.shift_remove(&attribute.key);
                extensions.append(&mut converted);
            }
        }
        if extensions.is_empty() {
            return;
        }
        match doc.get_mut("extension") {
            Some(Value::Array(existing)) => existing.append(&mut extensions),
            _ => {
                doc.insert("extension".into(), Value::Array(extensions));
            }
        }
    }
}

impl Attribute {
    /// One extension -> its native value, or `None` if it does not fit this Attribute.
    fn to_native(
        &self,
        extension: &Value,
        walker: &ToNative<'_>,
        trail: &Trail<'_>,
    ) -> Result<Option<Value>, FormatError> {
        if let Some(value_type) = &self.value_type {
            let key = format!("value{}", capitalize(value_type));
            let Some(value) = extension.get(&key) else {
                return Ok(None);
            };
            let mut value = value.clone();
            walker.typed(&mut value, value_type, &trail.key(&key))?;
            return Ok(Some(value));
        }
        let Some(Value::Array(children)) = extension.get("extension") else {
            return Ok(None);
        };
        let mut object = Map::new();
        for (index, child_extension) in children.iter().enumerate() {
            let url = child_extension.get("url").and_then(Value::as_str);
            let Some(child) = self.children.iter().find(|c| Some(c.url.as_str()) == url) else {
                return Ok(None);
            };
            let trail = trail.key("extension");
            let Some(value) = child.to_native(child_extension, walker, &trail.index(index))? else {
                return Ok(None);
            };
            match object.get_mut(&child.key) {
                Some(Value::Array(values)) if child.collection => values.push(value),
                Some(_) => return Ok(None),
                None if child.collection => {
                    object.insert(child.key.clone(), Value::Array(vec![value]));
                }
                None => {
                    object.insert(child.key.clone(), value);
                }
            }
        }
        Ok(Some(Value::Object(object)))
    }

    /// A native field -> its extensions (one per element of a collection), or `None` if the
    /// value does not fit this Attribute.
    fn to_fhir_all(&self, value: &Value, walker: &ToFhir<'_>) -> Option<Vec<Value>> {
        match (self.collection, value) {
            (true, Value::Array(items)) => items
                .iter()
                .map(|item| self.to_fhir(item, walker))
                .collect(),
            _ => Some(vec![self.to_fhir(value, walker)?]),
        }
    }

    fn to_fhir(&self, value: &Value, walker: &ToFhir<'_>) -> Option<Value> {
        let mut extension = Map::new();
        extension.insert("url".into(), Value::String(self.url.clone()));
        if let Some(value_type) = &self.value_type {
            let mut value = value.clone();
            walker.typed(&mut value, value_type);
            extension.insert(format!("value{}", capitalize(value_type)), value);
            return Some(Value::Object(extension));
        }
        let Value::Object(fields) = value else {
            return None;
        };
        let mut children = Vec::new();
        for (key, child_value) in fields {
            let child = self.children.iter().find(|c| &c.key == key)?;
            children.append(&mut child.to_fhir_all(child_value, walker)?);
        }
        extension.insert("extension".into(), Value::Array(children));
        Some(Value::Object(extension))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The seed's Attributes plus the reference product's US Core race example.
    fn rules() -> Rules {
        let bodies = [
            json!({"resource": {"id": "Patient", "resourceType": "Entity"}, "path": ["citizenship"],
                   "isCollection": true,
                   "extensionUrl": "http://hl7.org/fhir/StructureDefinition/patient-citizenship"}),
            json!({"resource": {"id": "Patient", "resourceType": "Entity"}, "path": ["citizenship", "code"],
                   "type": {"id": "CodeableConcept", "resourceType": "Entity"}, "extensionUrl": "code"}),
            json!({"resource": {"id": "Patient"}, "path": ["race"],
                   "extensionUrl": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"}),
            json!({"resource": {"id": "Patient"}, "path": ["race", "text"], "type": {"id": "string"},
                   "extensionUrl": "text"}),
            json!({"resource": {"id": "Patient"}, "path": ["race", "category"], "type": {"id": "Coding"},
                   "isCollection": true, "extensionUrl": "ombCategory"}),
            json!({"resource": {"id": "Patient"}, "path": ["gp"], "type": {"id": "Reference"},
                   "extensionUrl": "http://example.org/gp"}),
            json!({"resource": {"id": "Patient"}, "path": ["nickname"], "type": {"id": "string"}}),
        ];
        Rules::from_attributes(bodies.iter())
    }

    fn native(fhir: Value) -> Value {
        let rules = rules();
        let Value::Object(mut doc) = fhir else {
            panic!("object")
        };
        ToNative { rules: &rules }
            .resource(&mut doc, &Trail::root("Patient"))
            .expect("converts");
        Value::Object(doc)
    }

    fn fhir(native: Value) -> Value {
        let rules = rules();
        let Value::Object(mut doc) = native else {
            panic!("object")
        };
        ToFhir { rules: &rules }.resource(&mut doc);
        Value::Object(doc)
    }

    #[test]
    fn the_seeds_citizenship_both_ways() {
        let fhir_doc = json!({"resourceType": "Patient", "id": "pt-3", "name": [{"given": ["Charles"]}],
            "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-citizenship",
                           "extension": [{"url": "code", "valueCodeableConcept": {"text": "ru"}}]}]});
        let native_doc = json!({"resourceType": "Patient", "id": "pt-3", "name": [{"given": ["Charles"]}],
            "citizenship": [{"code": {"text": "ru"}}]});
        assert_eq!(native(fhir_doc.clone()), native_doc);
        assert_eq!(fhir(native_doc), fhir_doc);
    }

    #[test]
    fn nested_collections_typed_references_and_unknown_extensions() {
        let fhir_doc = json!({"resourceType": "Patient",
        "extension": [
            {"url": "http://unknown", "valueString": "keep"},
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
             "extension": [{"url": "ombCategory", "valueCoding": {"code": "2028-9"}},
                           {"url": "ombCategory", "valueCoding": {"code": "2106-3"}},
                           {"url": "text", "valueString": "Asian Indian"}]},
            {"url": "http://example.org/gp", "valueReference": {"reference": "Practitioner/p1"}}
        ]});
        let native_doc = native(fhir_doc.clone());
        assert_eq!(
            native_doc["extension"],
            json!([{"url": "http://unknown", "valueString": "keep"}])
        );
        assert_eq!(
            native_doc["race"],
            json!({"category": [{"code": "2028-9"}, {"code": "2106-3"}], "text": "Asian Indian"})
        );
        assert_eq!(
            native_doc["gp"],
            json!({"resourceType": "Practitioner", "id": "p1"})
        );
        // Back: the same extensions; converted ones come after the unknown one.
        assert_eq!(fhir(native_doc), fhir_doc);
    }

    #[test]
    fn extensions_that_do_not_fit_stay_extensions() {
        let fhir_doc = json!({"resourceType": "Patient", "extension": [
            {"url": "http://hl7.org/fhir/StructureDefinition/patient-citizenship",
             "extension": [{"url": "period", "valuePeriod": {"start": "2000"}}]},
            {"url": "http://example.org/gp", "valueString": "not a reference"}]});
        assert_eq!(native(fhir_doc.clone()), fhir_doc);
    }

    #[test]
    fn attributes_without_url_or_parent_are_ignored() {
        let rules = rules();
        let patient = rules.for_type("Patient").expect("patient rules");
        let keys: Vec<&str> = patient.roots.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(keys, ["citizenship", "race", "gp"]);
        assert!(rules.for_type("Observation").is_none());
    }
}
