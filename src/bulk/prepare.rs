//! One NDJSON line -> one row to load: its type, id and the body to store.
//!
//! `$load` validates nothing beyond what storing needs (as the reference product documents):
//! each line must be a JSON object with a known `resourceType` (or the URL's type) and a valid
//! `id`. Native lines are not parsed into a tree: a borrowed scan finds `id` and
//! `resourceType`, and a validating pass without allocation makes sure PostgreSQL will accept
//! the JSON (so a bad line is reported by its number, here, not as a COPY failure). FHIR lines
//! are parsed and converted. Options: `strip-nulls` removes `null` members (as
//! `jsonb_strip_nulls`), `merge` shallow-merges an object into every resource (its keys win).

use serde::de::IgnoredAny;
use serde_json::{Map, Value};

use crate::format::shape::Shape;
use crate::format::Converter;
use crate::json_text::{self, string_inner};
use crate::resource::{body_for_storage, is_valid_id};
use crate::resource_type::ResourceType;

/// How lines are read.
#[derive(Clone)]
pub struct LineRules {
    /// `Some`: FHIR lines, converted with these rules; `None`: native lines.
    pub fhir: Option<Converter>,
    /// The URL's type (`/Patient/$load`): lines may leave out `resourceType`, and may not
    /// name another one.
    pub only_type: Option<ResourceType>,
    pub strip_nulls: bool,
    /// The members of the `merge` object, as JSON text (`"active":true,...`).
    pub merge: Option<String>,
    /// Whether lines may be of fhirbox's own types that a load may write (`Attribute`,
    /// `BulkImportStatus`): root's loads only. (`Client` and `AccessPolicy` never.)
    pub own_types: bool,
    /// Refuse a load whose first lines are plainly in the other format (`format-check`).
    pub format_check: bool,
}

/// The lines looked at by the format check: enough to catch a file in the wrong format,
/// few enough to cost nothing.
pub const FORMAT_CHECK_LINES: u64 = 10;

/// A line ready to store.
pub struct Prepared {
    pub resource_type: ResourceType,
    pub id: String,
    /// The body to store (JSON text without `id`, `resourceType`, server `meta` keys).
    pub body: Vec<u8>,
}

/// Why a line cannot be loaded (the caller adds the line number).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct LineError {
    pub message: String,
    /// The line is well formed, but the subject may not load it (a fhirbox type).
    pub forbidden: bool,
}

fn error(message: impl Into<String>) -> LineError {
    LineError {
        message: message.into(),
        forbidden: false,
    }
}

impl LineRules {
    /// Refuses a line plainly in the other format than the load's (see
    /// [`crate::format::shape`]); only the first [`FORMAT_CHECK_LINES`] lines are looked at.
    pub fn check_format(&self, number: u64, line: &[u8]) -> Result<(), LineError> {
        if !self.format_check || number > FORMAT_CHECK_LINES {
            return Ok(());
        }
        let Ok(Value::Object(mut doc)) = serde_json::from_slice::<Value>(line) else {
            return Ok(()); // prepare says what is wrong with it
        };
        if let Some(rt) = self.only_type {
            doc.entry("resourceType")
                .or_insert_with(|| rt.name().into());
        }
        let advice = match (crate::format::shape::sign(&doc), self.fhir.is_some()) {
            (Some(Shape::Fhir(sign)), false) => format!(
                "this looks like FHIR format ({sign}): load FHIR files through the /fhir/ route (/fhir/$load), or send format-check: false"
            ),
            (Some(Shape::Native(sign)), true) => format!(
                "this looks like the native format ({sign}): load native files through the route without /fhir/, or send format-check: false"
            ),
            _ => return Ok(()),
        };
        Err(error(advice))
    }

    /// The `merge` option's members as JSON text, checked to be an object.
    pub fn merge_members(merge: &Map<String, Value>) -> Option<String> {
        if merge.is_empty() {
            return None;
        }
        let text = Value::Object(merge.clone()).to_string();
        Some(text[1..text.len() - 1].to_string())
    }

    pub fn prepare(&self, line: &[u8]) -> Result<Prepared, LineError> {
        if let Err(e) = serde_json::from_slice::<IgnoredAny>(line) {
            return Err(error(format!(
                "malformed JSON at column {}: {}",
                e.column(),
                reason(&e)
            )));
        }
        check_text(line)?;
        match &self.fhir {
            Some(converter) => self.prepare_fhir(line, converter),
            None if self.strip_nulls => self.prepare_tree(line),
            None => self.prepare_native(line),
        }
    }

    /// A native line by borrowed scan: the body is the line's members but `id` and
    /// `resourceType`, plus the `merge` members.
    fn prepare_native(&self, line: &[u8]) -> Result<Prepared, LineError> {
        let mut members = Vec::with_capacity(16);
        json_text::members(line, &mut members).ok_or_else(|| error("not a JSON object"))?;
        if members.iter().any(|m| m.key.contains(&b'\\')) {
            // An escaped key (`"i\u0064"`) may spell `id` or `resourceType`: let the parser
            // unescape it.
            return self.prepare_tree(line);
        }
        // Of repeated keys the last counts, as everywhere else (serde_json, jsonb).
        let named_type = members
            .iter()
            .rev()
            .find(|m| m.key == b"resourceType")
            .map(|m| m.value);
        let resource_type = self.resource_type(named_type.map(|v| string_inner(v).ok_or(v)))?;
        let id = members
            .iter()
            .rev()
            .find(|m| m.key == b"id")
            .map(|m| m.value);
        let id = check_id(id.map(|v| string_inner(v).ok_or(v)))?;
        let mut body = Vec::with_capacity(line.len() + self.merge.as_ref().map_or(0, String::len));
        body.push(b'{');
        for member in members
            .iter()
            .filter(|m| m.key != b"id" && m.key != b"resourceType")
        {
            if body.len() > 1 {
                body.push(b',');
            }
            if member.key == b"meta" && has_server_meta(member.value) {
                // Rare: a line carrying versionId/lastUpdated/createdAt. Drop them via a tree.
                let Value::Object(meta) =
                    serde_json::from_slice(member.value).map_err(|e| error(e.to_string()))?
                else {
                    return Err(error("meta must be an object"));
                };
                let cleaned =
                    body_for_storage(Map::from_iter([("meta".to_string(), Value::Object(meta))]));
                match cleaned.get("meta") {
                    Some(meta) => {
                        body.extend_from_slice(b"\"meta\":");
                        body.extend_from_slice(meta.to_string().as_bytes());
                    }
                    None => {
                        if body.last() == Some(&b',') {
                            body.pop();
                        }
                    }
                }
                continue;
            }
            body.extend_from_slice(member.member);
        }
        self.append_merge(&mut body);
        body.push(b'}');
        Ok(Prepared {
            resource_type,
            id,
            body,
        })
    }

    /// A native line through a tree (`strip-nulls`).
    fn prepare_tree(&self, line: &[u8]) -> Result<Prepared, LineError> {
        let doc: Value = serde_json::from_slice(line).map_err(|e| error(e.to_string()))?;
        self.finish_tree(doc)
    }

    fn prepare_fhir(&self, line: &[u8], converter: &Converter) -> Result<Prepared, LineError> {
        let mut doc: Value = serde_json::from_slice(line).map_err(|e| error(e.to_string()))?;
        if let (Some(rt), Value::Object(map)) = (self.only_type, &mut doc) {
            map.entry("resourceType")
                .or_insert_with(|| rt.name().into());
        }
        let doc = converter.to_native(doc).map_err(|e| error(e.to_string()))?;
        self.finish_tree(doc)
    }

    /// Checks, strips and serializes a tree.
    fn finish_tree(&self, doc: Value) -> Result<Prepared, LineError> {
        let Value::Object(mut doc) = doc else {
            return Err(error("not a JSON object"));
        };
        let resource_type = self.resource_type(as_text(doc.get("resourceType")))?;
        let id = check_id(as_text(doc.get("id")))?;
        if self.strip_nulls {
            doc = strip_nulls(doc);
        }
        let mut body =
            serde_json::to_vec(&Value::Object(body_for_storage(std::mem::take(&mut doc))))
                .map_err(|e| error(e.to_string()))?;
        if self.merge.is_some() {
            body.pop(); // the closing brace
            self.append_merge(&mut body);
            body.push(b'}');
        }
        Ok(Prepared {
            resource_type,
            id,
            body,
        })
    }

    /// Appends the `merge` members to an open object. jsonb keeps the last of duplicate keys,
    /// so the merged values win over the line's.
    fn append_merge(&self, body: &mut Vec<u8>) {
        if let Some(merge) = &self.merge {
            if body.len() > 1 {
                body.push(b',');
            }
            body.extend_from_slice(merge.as_bytes());
        }
    }

    /// The line's type: `Ok(name)` if the line names one as a string, `Err(raw)` if it
    /// names one otherwise, nothing if it has none.
    fn resource_type(
        &self,
        named: Option<Result<&[u8], &[u8]>>,
    ) -> Result<ResourceType, LineError> {
        let rt = self.named_type(named)?;
        if let Some(refusal) = own_type_refusal(rt, self.own_types) {
            return Err(LineError {
                message: refusal,
                forbidden: true,
            });
        }
        Ok(rt)
    }

    fn named_type(&self, named: Option<Result<&[u8], &[u8]>>) -> Result<ResourceType, LineError> {
        match (named, self.only_type) {
            (None, Some(rt)) => Ok(rt),
            (None, None) => Err(error("no resourceType")),
            (Some(Err(_)), _) => Err(error("resourceType must be a string")),
            (Some(Ok(name)), only) => {
                let name = std::str::from_utf8(name).unwrap_or_default();
                let rt = ResourceType::parse(name)
                    .ok_or_else(|| error(format!("unknown resourceType '{name}'")))?;
                match only {
                    Some(expected) if expected != rt => Err(error(format!(
                        "resourceType '{name}' in a load of {expected} (use /$load for mixed types)"
                    ))),
                    _ => Ok(rt),
                }
            }
        }
    }
}

/// Why a load may not write `rt`, if it may not: fhirbox's own types configure the server
/// for everyone (Attributes change every client's FHIR output, BulkImportStatus is another
/// subject's job), so only root may bulk-load them; Clients and AccessPolicies never (a load
/// copies bodies as they are: a secret would be stored in clear, a policy unchecked).
pub fn own_type_refusal(rt: ResourceType, root: bool) -> Option<String> {
    if rt.is_fhir() {
        return None;
    }
    match rt.name() {
        "Client" | "AccessPolicy" => Some(format!(
            "{rt} resources cannot be bulk loaded: write them with PUT"
        )),
        _ if root => None,
        _ => Some(format!(
            "{rt} is one of fhirbox's own types: only root may bulk-load it"
        )),
    }
}

/// A tree value as the text checks take it: `Ok` for a string, `Err` for anything else.
fn as_text(value: Option<&Value>) -> Option<Result<&[u8], &[u8]>> {
    value.map(|v| v.as_str().map(str::as_bytes).ok_or(&b""[..]))
}

fn check_id(id: Option<Result<&[u8], &[u8]>>) -> Result<String, LineError> {
    match id {
        None => Err(error("no id")),
        Some(Err(_)) => Err(error("id must be a string")),
        Some(Ok(id)) => {
            let id = std::str::from_utf8(id).map_err(|_| error("id is not UTF-8"))?;
            if is_valid_id(id) {
                Ok(id.to_string())
            } else {
                Err(error(format!(
                    "'{id}' is not a valid id (1-64 of A-Z, a-z, 0-9, '-', '.')"
                )))
            }
        }
    }
}

/// Whether a `meta` object's text names a server-managed key.
fn has_server_meta(meta: &[u8]) -> bool {
    let find = |needle: &[u8]| meta.windows(needle.len()).any(|w| w == needle);
    find(b"\"versionId\"") || find(b"\"lastUpdated\"") || find(b"\"createdAt\"")
}

/// How deep objects and arrays may nest in a line (FHIR resources need about 20 levels;
/// PostgreSQL's jsonb parser gives up, with a server error, somewhere in the thousands).
pub const MAX_DEPTH: usize = 100;

/// What PostgreSQL's jsonb would refuse in a line that parses as JSON: text that is not
/// UTF-8, `\u0000`, a lone UTF-16 surrogate escape, nesting deeper than [`MAX_DEPTH`]. One
/// pass over the bytes.
fn check_text(line: &[u8]) -> Result<(), LineError> {
    if let Err(e) = std::str::from_utf8(line) {
        return Err(error(format!(
            "invalid UTF-8 at byte {} of the line",
            e.valid_up_to() + 1
        )));
    }
    let (mut depth, mut in_string, mut i) = (0usize, false, 0usize);
    while i < line.len() {
        match (line[i], in_string) {
            (b'"', _) => in_string = !in_string,
            (b'\\', true) => {
                if line.get(i + 1) == Some(&b'u') {
                    i = check_escape(line, i)?;
                    continue;
                }
                i += 1; // the escaped character
            }
            (b'{' | b'[', false) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(error(format!(
                        "objects and arrays nest deeper than {MAX_DEPTH} levels"
                    )));
                }
            }
            (b'}' | b']', false) => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Checks the `\uXXXX` escape at `at`: not NUL, and a surrogate only as a high-low pair.
/// Returns where the escape (or the pair) ends.
fn check_escape(line: &[u8], at: usize) -> Result<usize, LineError> {
    let unit = |at: usize| {
        line.get(at + 2..at + 6)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u16::from_str_radix(hex, 16).ok())
    };
    match unit(at) {
        Some(0) => Err(error(
            "a string contains \\u0000, which PostgreSQL's jsonb cannot store",
        )),
        Some(0xD800..=0xDBFF) => {
            let low = (line.get(at + 6..at + 8) == Some(b"\\u"))
                .then(|| unit(at + 6))
                .flatten();
            match low {
                Some(0xDC00..=0xDFFF) => Ok(at + 12),
                _ => Err(lone_surrogate()),
            }
        }
        Some(0xDC00..=0xDFFF) => Err(lone_surrogate()),
        _ => Ok(at + 6),
    }
}

fn lone_surrogate() -> LineError {
    error("a string has a lone UTF-16 surrogate escape (\\uD800-\\uDFFF outside a pair)")
}

/// serde_json's message without " at line 1 column C" (the caller says where).
fn reason(e: &serde_json::Error) -> String {
    let text = e.to_string();
    text.find(" at line ")
        .map_or(text.clone(), |at| text[..at].to_string())
}

/// Removes object members whose value is `null`, at any depth (as `jsonb_strip_nulls`).
fn strip_nulls(doc: Map<String, Value>) -> Map<String, Value> {
    doc.into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k, strip_value(v)))
        .collect()
}

fn strip_value(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(strip_nulls(map)),
        Value::Array(items) => Value::Array(items.into_iter().map(strip_value).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules() -> LineRules {
        LineRules {
            fhir: None,
            only_type: None,
            strip_nulls: false,
            merge: None,
            own_types: true,
            format_check: true,
        }
    }

    fn body(prepared: &Prepared) -> Value {
        serde_json::from_slice(&prepared.body).expect("valid JSON body")
    }

    #[test]
    fn native_lines_by_scan() {
        let line = br#"{"resourceType": "Patient", "id": "p1", "name": [{"given": ["A"]}], "meta": {"tag": []}}"#;
        let prepared = rules().prepare(line).expect("valid");
        assert_eq!(
            (prepared.resource_type.name(), prepared.id.as_str()),
            ("Patient", "p1")
        );
        assert_eq!(
            body(&prepared),
            json!({"name": [{"given": ["A"]}], "meta": {"tag": []}})
        );
        let with_server_meta = br#"{"resourceType":"Patient","id":"p1","meta":{"versionId":"3","lastUpdated":"x"},"active":true}"#;
        assert_eq!(
            body(&rules().prepare(with_server_meta).expect("valid")),
            json!({"active": true})
        );
    }

    #[test]
    fn every_bad_line_says_why() {
        for (line, expected) in [
            (
                &br#"{"resourceType": "Patient", "id": "p1""#[..],
                "malformed JSON",
            ),
            (
                br#"{"resourceType": "Patient", "id": "p1", "x": tru}"#,
                "malformed JSON at column",
            ),
            (br#"["Patient"]"#, "not a JSON object"),
            (br#"{"id": "p1"}"#, "no resourceType"),
            (
                br#"{"resourceType": "Nope", "id": "p1"}"#,
                "unknown resourceType 'Nope'",
            ),
            (br#"{"resourceType": "Patient"}"#, "no id"),
            (
                br#"{"resourceType": "Client", "id": "c", "secret": "s"}"#,
                "cannot be bulk loaded",
            ),
            (
                br#"{"resourceType": "Patient", "id": 5}"#,
                "id must be a string",
            ),
            (
                br#"{"resourceType": "Patient", "id": "a b"}"#,
                "not a valid id",
            ),
            (
                br#"{"resourceType": "Patient", "id": "p", "x": "\u0000"}"#,
                "\\u0000",
            ),
        ] {
            let message = rules()
                .prepare(line)
                .err()
                .map(|e| e.message)
                .unwrap_or_default();
            assert!(
                message.contains(expected),
                "{}: {message}",
                String::from_utf8_lossy(line)
            );
        }
        assert!(
            rules()
                .prepare(br#"{"resourceType": "Patient", "id": "p", "x": "\\u0000"}"#)
                .is_ok(),
            "an escaped backslash"
        );
    }

    #[test]
    fn typed_loads_options_and_fhir() {
        let patient = ResourceType::parse("Patient");
        let typed = LineRules {
            only_type: patient,
            ..rules()
        };
        assert_eq!(
            typed
                .prepare(br#"{"id": "p1"}"#)
                .expect("typed")
                .resource_type
                .name(),
            "Patient"
        );
        assert!(typed
            .prepare(br#"{"resourceType": "Observation", "id": "o"}"#)
            .is_err());

        let merge = Map::from_iter([("active".to_string(), json!(true))]);
        let options = LineRules {
            strip_nulls: true,
            merge: LineRules::merge_members(&merge),
            ..rules()
        };
        let prepared = options
            .prepare(br#"{"resourceType": "Patient", "id": "p", "active": false, "gender": null, "name": [{"text": null, "given": ["x"]}]}"#)
            .expect("valid");
        // Duplicate keys: jsonb keeps the last one, the merged value.
        assert!(String::from_utf8_lossy(&prepared.body).ends_with(",\"active\":true}"));
        let mut parsed = body(&prepared);
        parsed.as_object_mut().map(|m| m.remove("active"));
        assert_eq!(parsed, json!({"name": [{"given": ["x"]}]}));

        let fhir = LineRules {
            fhir: Some(Converter::default()),
            ..rules()
        };
        let prepared = fhir
            .prepare(br#"{"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/p"}, "valueString": "x"}"#)
            .expect("valid");
        assert_eq!(
            body(&prepared),
            json!({"subject": {"resourceType": "Patient", "id": "p"}, "value": {"string": "x"}})
        );
        let bad = fhir.prepare(br#"{"resourceType": "Observation", "id": "o", "valueFoo": 1}"#);
        assert!(bad
            .err()
            .map(|e| e.message)
            .unwrap_or_default()
            .contains("Observation.valueFoo"));
    }
}
