//! FHIR R4 JSON -> native: the walk [`ToNative`] (see the table in [`super`]).

use serde_json::{Map, Value};

use super::{capitalize, classify, rename_key, Class, CREATED_AT_URL};
use crate::fhir::meta::{type_index, Kind, TypeIndex};
use crate::format::attributes::Rules;
use crate::format::trail::Trail;
use crate::format::FormatError;
use crate::resource::is_valid_id;
use crate::resource_type::ResourceType;

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
