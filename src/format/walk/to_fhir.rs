//! Native -> FHIR R4 JSON: the walk [`ToFhir`] (see the table in [`super`]).

use serde_json::{Map, Value};

use super::{capitalize, rename_key, CREATED_AT_URL};
use crate::fhir::meta::{type_index, Kind, TypeIndex};
use crate::format::attributes::Rules;

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
