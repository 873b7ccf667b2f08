//! `_elements`: resources cut down to the listed root elements.
//!
//! An element is `Type.name` (for that type) or `name` (for every type that has it). A
//! resource keeps `resourceType`, `id`, `meta`, its type's mandatory elements (generated from
//! the R4 definitions, [`MANDATORY_ELEMENTS`]) and the listed ones, and is tagged `SUBSETTED`
//! so that nobody mistakes it for the whole resource. A type no listed element names is
//! exported whole (a client that asks for `Patient.id` still gets its Observations as they
//! are). A choice element is named without its type (`value` keeps `valueQuantity`).

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::fhir::r4::{MANDATORY_ELEMENTS, SUMMARY_ELEMENTS};
use crate::resource_type::ResourceType;

/// The tag of a subsetted resource (FHIR's `SUBSETTED`).
const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// What `_elements` listed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Elements {
    /// Names listed without a type: for every type.
    pub any: BTreeSet<String>,
    /// Names listed as `Type.name`.
    pub by_type: BTreeMap<String, BTreeSet<String>>,
}

impl Elements {
    /// Adds one listed element, or says why it is not one.
    pub fn add(&mut self, item: &str) -> Result<(), String> {
        let is_name = |s: &str| {
            s.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                && s.chars().all(|c| c.is_ascii_alphanumeric())
        };
        match item.split_once('.') {
            None if is_name(item) => {
                self.any.insert(item.to_string());
                Ok(())
            }
            Some((type_name, name))
                if is_name(name) && ResourceType::parse(type_name).is_some_and(|rt| rt.is_fhir()) =>
            {
                self.by_type
                    .entry(type_name.to_string())
                    .or_default()
                    .insert(name.to_string());
                Ok(())
            }
            _ => Err(format!(
                "_elements '{item}' is not a root element (name or Type.name, like Patient.birthDate)"
            )),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.any.is_empty() && self.by_type.is_empty()
    }

    /// The names a resource of `type_name` keeps, or `None` if it is exported whole.
    fn kept(&self, type_name: &str) -> Option<BTreeSet<&str>> {
        let typed = self.by_type.get(type_name);
        if self.any.is_empty() && typed.is_none() {
            return None;
        }
        let mandatory = MANDATORY_ELEMENTS
            .iter()
            .find(|(name, _)| *name == type_name)
            .map_or(&[][..], |(_, names)| *names);
        Some(
            ["resourceType", "id", "meta"]
                .into_iter()
                .chain(mandatory.iter().copied())
                .chain(self.any.iter().map(String::as_str))
                .chain(typed.into_iter().flatten().map(String::as_str))
                .collect(),
        )
    }

    /// Cuts a batch of FHIR NDJSON lines of one type down to what it keeps.
    pub fn subset_batch(&self, type_name: &str, batch: &[u8]) -> Result<Bytes, io::Error> {
        let Some(kept) = self.kept(type_name) else {
            return Ok(Bytes::copy_from_slice(batch));
        };
        let mut out = Vec::with_capacity(batch.len() / 2);
        for line in batch.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let mut resource: Map<String, Value> =
                serde_json::from_slice(line).map_err(io::Error::other)?;
            cut(&kept, &mut resource);
            serde_json::to_writer(&mut out, &resource).map_err(io::Error::other)?;
            out.push(b'\n');
        }
        Ok(out.into())
    }

    /// Cuts one resource of `type_name` down to what it keeps (a search's `_elements`).
    pub fn subset(&self, type_name: &str, resource: &mut Value) {
        if let (Some(kept), Value::Object(resource)) = (self.kept(type_name), resource) {
            cut(&kept, resource);
        }
    }
}

/// `_summary` of a search: `true` keeps the type's summary elements (`isSummary`), `text`
/// the narrative and the mandatory elements, `data` all but the narrative; each with
/// `resourceType`, `id` and `meta`, tagged `SUBSETTED`.
pub fn summary(type_name: &str, mode: &str, resource: &mut Value) {
    let Value::Object(resource) = resource else {
        return;
    };
    let listed = |table: &[(&str, &'static [&'static str])]| {
        table
            .iter()
            .find(|(name, _)| *name == type_name)
            .map_or(&[][..], |(_, names)| *names)
    };
    let base = ["resourceType", "id", "meta"].into_iter();
    let kept: BTreeSet<&str> = match mode {
        "true" => base
            .chain(listed(SUMMARY_ELEMENTS).iter().copied())
            .collect(),
        "text" => base
            .chain(["text"])
            .chain(listed(MANDATORY_ELEMENTS).iter().copied())
            .collect(),
        _ => {
            resource.remove("text");
            tag_subsetted(resource);
            return;
        }
    };
    cut(&kept, resource);
}

fn cut(kept: &BTreeSet<&str>, resource: &mut Map<String, Value>) {
    resource.retain(|key, _| keeps(kept, key));
    tag_subsetted(resource);
}

/// Whether `key` is one of `kept`, or a choice element's typed form of one (`valueQuantity`
/// for `value`).
fn keeps(kept: &BTreeSet<&str>, key: &str) -> bool {
    let key = key.strip_prefix('_').unwrap_or(key);
    kept.contains(key)
        || kept.iter().any(|name| {
            key.strip_prefix(name)
                .is_some_and(|rest| rest.chars().next().is_some_and(|c| c.is_ascii_uppercase()))
        })
}

fn tag_subsetted(resource: &mut Map<String, Value>) {
    let meta = resource
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(meta) = meta {
        let tags = meta.entry("tag").or_insert_with(|| json!([]));
        if let Value::Array(tags) = tags {
            tags.push(json!({"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_and_mandatory_elements_stay_and_the_resource_is_tagged() {
        let mut elements = Elements::default();
        elements.add("Observation.value").expect("valid");
        elements.add("id").expect("valid");
        assert!(elements.add("Observation.code.coding").is_err());
        assert!(elements.add("Nope.value").is_err());
        let line = br#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"},"valueQuantity":{"value":1},"note":[{"text":"n"}],"_status":{"id":"s"}}
"#;
        let out = elements.subset_batch("Observation", line).expect("subset");
        let resource: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(resource["valueQuantity"]["value"], 1);
        assert_eq!(resource["status"], "final", "mandatory");
        assert_eq!(resource["code"]["text"], "x", "mandatory");
        assert_eq!(
            resource["_status"]["id"], "s",
            "a primitive's extension goes with it"
        );
        assert!(resource.get("note").is_none());
        assert_eq!(resource["meta"]["tag"][0]["code"], "SUBSETTED");
        // A type no element names is whole.
        let mut only_patient = Elements::default();
        only_patient.add("Patient.birthDate").expect("valid");
        assert_eq!(
            only_patient
                .subset_batch("Observation", line)
                .expect("whole"),
            Bytes::copy_from_slice(line)
        );
    }
}
