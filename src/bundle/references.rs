//! References to a Bundle entry's `fullUrl` (`urn:uuid:...`), rewritten to the id the entry
//! gets: native `{"uri": "urn:uuid:..."}` becomes `{"resourceType": T, "id": I}`, and a
//! FHIR-shaped `{"reference": "urn:uuid:..."}` becomes `{"reference": "T/I"}`.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::resource_type::ResourceType;

/// Rewrites, everywhere in `value`, references to the `fullUrl`s in `targets`.
pub(super) fn rewrite(value: &mut Value, targets: &HashMap<String, (ResourceType, String)>) {
    match value {
        Value::Object(map) => {
            rewrite_reference_object(map, targets);
            for child in map.values_mut() {
                rewrite(child, targets);
            }
        }
        Value::Array(items) => {
            for item in items {
                rewrite(item, targets);
            }
        }
        _ => {}
    }
}

fn rewrite_reference_object(
    map: &mut Map<String, Value>,
    targets: &HashMap<String, (ResourceType, String)>,
) {
    let target = |key: &str| {
        map.get(key)
            .and_then(Value::as_str)
            .and_then(|url| targets.get(url))
            .cloned()
    };
    if let Some((rt, id)) = target("uri") {
        map.shift_remove("uri");
        map.insert("resourceType".into(), rt.name().into());
        map.insert("id".into(), id.into());
    } else if let Some((rt, id)) = target("reference") {
        map.insert("reference".into(), format!("{rt}/{id}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn full_url_references_are_rewritten_in_both_shapes() {
        let rt = ResourceType::parse("Patient").expect("known type");
        let targets = HashMap::from([("urn:uuid:1".to_string(), (rt, "p1".to_string()))]);
        let mut doc = json!({
            "subject": {"uri": "urn:uuid:1", "display": "Alice"},
            "performer": [{"reference": "urn:uuid:1"}, {"uri": "urn:uuid:other"}]
        });
        rewrite(&mut doc, &targets);
        assert_eq!(
            doc,
            json!({
                "subject": {"display": "Alice", "resourceType": "Patient", "id": "p1"},
                "performer": [{"reference": "Patient/p1"}, {"uri": "urn:uuid:other"}]
            })
        );
    }
}
