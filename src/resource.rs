//! The native resource document: what is stored and what is shown.
//!
//! The `resource` column holds the body without `id`, `resourceType` and the server-managed
//! `meta.versionId`, `meta.lastUpdated`, `meta.createdAt`; those come from the row's `id`,
//! `txid`, `ts` and `cts` when a resource is shown. Other `meta` keys (`profile`, `tag`) are
//! part of the body.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::resource_type::ResourceType;

/// The `meta` keys fhirbox manages itself; a client's values for them are ignored.
const SERVER_META_KEYS: [&str; 3] = ["versionId", "lastUpdated", "createdAt"];

/// One version of a resource as stored.
#[derive(Debug, Clone)]
pub struct StoredResource {
    pub resource_type: ResourceType,
    pub id: String,
    /// The version id: a value of the global `transaction_id_seq`.
    pub txid: i64,
    /// Created at (first version).
    pub cts: DateTime<Utc>,
    /// Last updated (this version).
    pub ts: DateTime<Utc>,
    /// `created`, `updated`, `recreated` or `deleted`.
    pub status: String,
    /// The stored body.
    pub body: Map<String, Value>,
}

impl StoredResource {
    /// The native document: `resourceType`, `id`, `meta` first, then the body's keys.
    pub fn to_native(&self) -> Value {
        let mut doc = Map::with_capacity(self.body.len() + 3);
        doc.insert("resourceType".into(), self.resource_type.name().into());
        doc.insert("id".into(), self.id.clone().into());
        let mut meta = Map::new();
        meta.insert("versionId".into(), self.txid.into());
        meta.insert("lastUpdated".into(), format_instant(&self.ts).into());
        meta.insert("createdAt".into(), format_instant(&self.cts).into());
        if let Some(Value::Object(stored_meta)) = self.body.get("meta") {
            for (meta_key, meta_value) in stored_meta {
                meta.entry(meta_key.clone())
                    .or_insert_with(|| meta_value.clone());
            }
        }
        doc.insert("meta".into(), Value::Object(meta));
        for (key, value) in &self.body {
            if key != "meta" {
                doc.insert(key.clone(), value.clone());
            }
        }
        Value::Object(doc)
    }

    pub fn is_deleted(&self) -> bool {
        self.status == "deleted"
    }
}

/// `2021-06-10T08:26:10.707454Z`: microseconds and `Z`, as the reference product prints them.
pub fn format_instant(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// Turns a native document into the body to store: drops `id`, `resourceType` and the
/// server-managed `meta` keys (and `meta` itself if nothing else is left in it).
pub fn body_for_storage(mut doc: Map<String, Value>) -> Map<String, Value> {
    doc.shift_remove("id");
    doc.shift_remove("resourceType");
    if let Some(Value::Object(meta)) = doc.get_mut("meta") {
        for key in SERVER_META_KEYS {
            meta.shift_remove(key);
        }
        if meta.is_empty() {
            doc.shift_remove("meta");
        }
    }
    doc
}

/// Whether `id` is a valid FHIR id: 1 to 64 of `A-Z a-z 0-9 - .`.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A new server-assigned id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(body: Value) -> StoredResource {
        let at = DateTime::parse_from_rfc3339("2021-06-10T08:26:10.707454Z")
            .map(|t| t.with_timezone(&Utc))
            .expect("valid instant");
        StoredResource {
            resource_type: ResourceType::parse("Patient").expect("known type"),
            id: "pt-1".into(),
            txid: 481,
            cts: at,
            ts: at,
            status: "created".into(),
            body: body.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn native_document_has_server_meta_and_keeps_other_meta() {
        let doc = stored(json!({"name": [{"given": ["Alice"]}], "meta": {"tag": [{"code": "x"}]}}))
            .to_native();
        assert_eq!(
            doc,
            json!({
                "resourceType": "Patient", "id": "pt-1",
                "meta": {"versionId": 481, "lastUpdated": "2021-06-10T08:26:10.707454Z",
                         "createdAt": "2021-06-10T08:26:10.707454Z", "tag": [{"code": "x"}]},
                "name": [{"given": ["Alice"]}]
            })
        );
    }

    #[test]
    fn storage_body_drops_identity_and_server_meta() {
        let doc = json!({"resourceType": "Patient", "id": "x", "active": true,
                         "meta": {"versionId": "9", "lastUpdated": "t", "createdAt": "t"}});
        let body = body_for_storage(doc.as_object().cloned().unwrap_or_default());
        assert_eq!(Value::Object(body), json!({"active": true}));
    }

    #[test]
    fn ids_follow_the_fhir_rule() {
        assert!(is_valid_id("pt-1"));
        assert!(is_valid_id("Patient.citizenship"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id(&"x".repeat(65)));
    }
}
