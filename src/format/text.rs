//! Native -> FHIR on JSON text, for the bulk exports: the same rules as [`super::walk::ToFhir`],
//! applied in one pass over the text without building a tree. Unchanged spans are copied
//! (compacted); only choice keys, References and `meta` are rewritten. The output is compact
//! JSON, byte for byte what serializing the tree conversion gives (a test checks every resource
//! of testdata/), at several times its speed, which is what lets `$dump?fhir=true` keep up
//! with PostgreSQL's COPY.
//!
//! Fields described by Attributes (rare, small) are handed to the tree conversion.

use serde_json::Value;

use super::attributes::Rules;
use super::walk::{capitalize, ToFhir, CREATED_AT_URL};
use crate::fhir::meta::{type_index, Kind, TypeIndex};
use crate::json_text::{self, first_byte, string_inner, write_compact, Ends, Member};

/// Converts one native resource to a compact FHIR JSON text, appended to `out`. `None` if the
/// input is not a JSON object (then `out` may hold a partial write: truncate on error).
pub fn native_to_fhir(rules: &Rules, input: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let mut ends = Ends::default();
    ends.index(input);
    Writer {
        rules,
        out,
        ends: &ends,
        member_lists: Vec::new(),
        item_lists: Vec::new(),
    }
    .resource(input)
}

struct Writer<'r, 'o, 'e, 'i> {
    rules: &'r Rules,
    out: &'o mut Vec<u8>,
    /// Where the input's objects and arrays end, found once.
    ends: &'e Ends,
    /// Scratch vectors for the members and items of nested objects and arrays, reused so
    /// that a conversion allocates a handful of vectors, not one per object.
    member_lists: Vec<Vec<Member<'i>>>,
    item_lists: Vec<Vec<&'i [u8]>>,
}

impl<'i> Writer<'_, '_, '_, 'i> {
    /// The members of an object, in a pooled vector (give it back with `give_members`).
    fn members_of(&mut self, text: &'i [u8]) -> Option<Vec<Member<'i>>> {
        let mut members = self.member_lists.pop().unwrap_or_default();
        match self.ends.members(text, &mut members) {
            Some(()) => Some(members),
            None => {
                self.member_lists.push(members);
                None
            }
        }
    }

    fn give_members(&mut self, members: Vec<Member<'i>>) {
        self.member_lists.push(members);
    }

    fn items_of(&mut self, text: &'i [u8]) -> Option<Vec<&'i [u8]>> {
        let mut items = self.item_lists.pop().unwrap_or_default();
        match self.ends.items(text, &mut items) {
            Some(()) => Some(items),
            None => {
                self.item_lists.push(items);
                None
            }
        }
    }

    fn resource(&mut self, text: &'i [u8]) -> Option<()> {
        let members = self.members_of(text)?;
        let resource_type = members
            .iter()
            .find(|m| m.key == b"resourceType")
            .and_then(|m| string_inner(m.value))
            .and_then(|name| std::str::from_utf8(name).ok())
            .unwrap_or_default()
            .to_string();
        let ty = type_index(&resource_type);
        // Attribute fields become extensions appended to `extension`.
        let mut extensions: Vec<Value> = Vec::new();
        let mut converted: Vec<&[u8]> = Vec::new();
        if let Some(attributes) = self.rules.for_type(&resource_type) {
            let walker = ToFhir { rules: self.rules };
            for member in members.iter().filter(|m| attributes.describes(m.key)) {
                let key = std::str::from_utf8(member.key).ok()?;
                let value: Value = serde_json::from_slice(member.value).ok()?;
                if let Some(mut list) = attributes.field_to_fhir(key, &value, &walker) {
                    extensions.append(&mut list);
                    converted.push(member.key);
                }
            }
        }
        self.out.push(b'{');
        let mut first = true;
        let mut extensions_written = extensions.is_empty();
        for member in &members {
            if converted.contains(&member.key) {
                continue;
            }
            self.separator(&mut first);
            match member.key {
                b"meta" => {
                    self.key(b"meta");
                    self.meta(member.value)?;
                }
                b"extension" if !extensions.is_empty() => {
                    self.key(b"extension");
                    self.array_with(member.value, &extensions)?;
                    extensions_written = true;
                }
                _ => self.member(member, ty)?,
            }
        }
        if !extensions_written {
            self.separator(&mut first);
            self.key(b"extension");
            self.array_with(b"[]", &extensions)?;
        }
        self.out.push(b'}');
        self.give_members(members);
        Some(())
    }

    fn separator(&mut self, first: &mut bool) {
        if !*first {
            self.out.push(b',');
        }
        *first = false;
    }

    fn key(&mut self, key: &[u8]) {
        self.out.push(b'"');
        self.out.extend_from_slice(key);
        self.out.extend_from_slice(b"\":");
    }

    /// A member of an object of type `ty`.
    fn member(&mut self, member: &Member<'i>, ty: Option<&TypeIndex>) -> Option<()> {
        let key = member.key;
        let plain =
            key.first() == Some(&b'_') || key == b"extension" || key == b"modifierExtension";
        let element = match (plain, ty) {
            (false, Some(ty)) => ty.def.element_named(key),
            _ => None,
        };
        let Some(element) = element else {
            write_compact(self.out, member.member);
            return Some(());
        };
        match element.kind {
            Kind::Choice(codes) => {
                if let Some((code, inner)) = single_member(member.value, codes) {
                    self.out.push(b'"');
                    self.out.extend_from_slice(key);
                    self.out.extend_from_slice(capitalize(code).as_bytes());
                    self.out.extend_from_slice(b"\":");
                    return self.typed(inner, code);
                }
                write_compact(self.out, member.member);
            }
            Kind::Primitive(_) => write_compact(self.out, member.member),
            kind => {
                self.key(key);
                self.element(member.value, kind)?;
            }
        }
        Some(())
    }

    /// A value of an element of `kind`: an object, or an array of them.
    fn element(&mut self, value: &'i [u8], kind: Kind) -> Option<()> {
        match first_byte(value) {
            Some(b'[') => {
                let items = self.items_of(value)?;
                self.out.push(b'[');
                for (index, item) in items.iter().enumerate() {
                    if index > 0 {
                        self.out.push(b',');
                    }
                    self.element(item, kind)?;
                }
                self.out.push(b']');
                self.item_lists.push(items);
                Some(())
            }
            Some(b'{') => match kind {
                Kind::Complex(name) | Kind::ContentRef(name) => self.complex(value, name),
                Kind::Reference(_) => self.reference(value),
                Kind::Resource => self.resource(value),
                Kind::Primitive(_) | Kind::Choice(_) => {
                    write_compact(self.out, value);
                    Some(())
                }
            },
            _ => {
                write_compact(self.out, value);
                Some(())
            }
        }
    }

    /// A value of a FHIR type (a choice's chosen type).
    fn typed(&mut self, value: &'i [u8], code: &str) -> Option<()> {
        if code == "Reference" {
            return self.element(value, Kind::Reference(&[]));
        }
        match type_index(code) {
            Some(ty) => self.element(value, Kind::Complex(ty.def.name)),
            None => {
                write_compact(self.out, value);
                Some(())
            }
        }
    }

    fn complex(&mut self, value: &'i [u8], name: &str) -> Option<()> {
        if name == "Reference" {
            return self.reference(value);
        }
        let Some(ty) = type_index(name) else {
            write_compact(self.out, value);
            return Some(());
        };
        let members = self.members_of(value)?;
        self.out.push(b'{');
        for (index, member) in members.iter().enumerate() {
            if index > 0 {
                self.out.push(b',');
            }
            self.member(member, Some(ty))?;
        }
        self.out.push(b'}');
        self.give_members(members);
        Some(())
    }

    /// A native Reference: `{"resourceType": T, "id": I}` -> `{"reference": "T/I"}`,
    /// `localRef` -> `#id`, `uri` -> itself, an id-less `resourceType` -> `type`.
    fn reference(&mut self, value: &'i [u8]) -> Option<()> {
        let members = self.members_of(value)?;
        let string = |key: &[u8]| {
            members.iter().find(|m| m.key == key).and_then(|m| {
                (first_byte(m.value) == Some(b'"'))
                    .then(|| string_inner(m.value))
                    .flatten()
            })
        };
        let has = |key: &[u8]| members.iter().any(|m| m.key == key);
        // Which member becomes the reference, and what it says.
        let rewrite: Option<(&[u8], Vec<u8>)> = if has(b"reference") {
            None
        } else if let Some(local) = string(b"localRef") {
            Some((b"localRef", [b"#", local].concat()))
        } else if let (Some(rt), Some(id)) = (string(b"resourceType"), string(b"id")) {
            Some((b"resourceType", [rt, b"/", id].concat()))
        } else {
            string(b"uri").map(|uri| (&b"uri"[..], uri.to_vec()))
        };
        let retype =
            rewrite.is_none() && !has(b"reference") && has(b"resourceType") && !has(b"type");
        let drop_id = matches!(&rewrite, Some((b"resourceType", _)));
        self.out.push(b'{');
        let mut first = true;
        for member in &members {
            if drop_id && member.key == b"id" {
                continue;
            }
            self.separator(&mut first);
            match &rewrite {
                Some((key, reference)) if member.key == *key => {
                    self.out.extend_from_slice(b"\"reference\":\"");
                    self.out.extend_from_slice(reference);
                    self.out.push(b'"');
                }
                _ if retype && member.key == b"resourceType" => {
                    self.key(b"type");
                    write_compact(self.out, member.value);
                }
                _ if member.key == b"identifier" && first_byte(member.value) == Some(b'{') => {
                    self.key(b"identifier");
                    self.complex(member.value, "Identifier")?;
                }
                _ => write_compact(self.out, member.member),
            }
        }
        self.out.push(b'}');
        self.give_members(members);
        Some(())
    }

    /// `meta`: `versionId` as a string, `createdAt` as the `ex:createdAt` extension (appended
    /// to `meta.extension`).
    fn meta(&mut self, value: &'i [u8]) -> Option<()> {
        let mut members = Vec::with_capacity(4);
        json_text::members(value, &mut members)?;
        let created = members
            .iter()
            .find(|m| m.key == b"createdAt")
            .map(|m| m.value);
        let created_extension = created.map(|at| {
            let mut extension = Vec::with_capacity(64);
            extension.extend_from_slice(b"{\"url\":\"");
            extension.extend_from_slice(CREATED_AT_URL.as_bytes());
            extension.extend_from_slice(b"\",\"valueInstant\":");
            write_compact(&mut extension, at);
            extension.push(b'}');
            extension
        });
        self.out.push(b'{');
        let mut first = true;
        let mut extension_written = created_extension.is_none();
        for member in &members {
            match member.key {
                b"createdAt" => continue,
                b"versionId"
                    if first_byte(member.value)
                        .is_some_and(|b| b.is_ascii_digit() || b == b'-') =>
                {
                    self.separator(&mut first);
                    self.out.extend_from_slice(b"\"versionId\":\"");
                    self.out.extend_from_slice(member.value.trim_ascii());
                    self.out.push(b'"');
                }
                b"extension" if !extension_written && first_byte(member.value) == Some(b'[') => {
                    self.separator(&mut first);
                    self.key(b"extension");
                    self.append_raw(
                        member.value,
                        created_extension.as_deref().unwrap_or_default(),
                    )?;
                    extension_written = true;
                }
                _ => {
                    self.separator(&mut first);
                    write_compact(self.out, member.member);
                }
            }
        }
        if let (false, Some(extension)) = (extension_written, &created_extension) {
            self.separator(&mut first);
            self.key(b"extension");
            self.out.push(b'[');
            self.out.extend_from_slice(extension);
            self.out.push(b']');
        }
        self.out.push(b'}');
        Some(())
    }

    /// An array, compacted, with `extra` (an already written JSON value) appended.
    fn append_raw(&mut self, array: &[u8], extra: &[u8]) -> Option<()> {
        let mut items = Vec::new();
        json_text::items(array, &mut items)?;
        self.out.push(b'[');
        for item in &items {
            write_compact(self.out, item);
            self.out.push(b',');
        }
        self.out.extend_from_slice(extra);
        self.out.push(b']');
        Some(())
    }

    /// An array, compacted, with `values` appended.
    fn array_with(&mut self, array: &[u8], values: &[Value]) -> Option<()> {
        let mut items = Vec::new();
        json_text::items(array, &mut items)?;
        self.out.push(b'[');
        for item in &items {
            write_compact(self.out, item);
            self.out.push(b',');
        }
        for (index, value) in values.iter().enumerate() {
            if index > 0 {
                self.out.push(b',');
            }
            serde_json::to_writer(&mut *self.out, value).ok()?;
        }
        self.out.push(b']');
        Some(())
    }
}

/// `{code: inner}` with an allowed code: the code and the inner value's text.
fn single_member<'a>(
    value: &'a [u8],
    codes: &'static [&'static str],
) -> Option<(&'static str, &'a [u8])> {
    use json_text::{end_of_string, end_of_value, skip_whitespace};
    let open = skip_whitespace(value, 0);
    if value.get(open) != Some(&b'{') {
        return None;
    }
    let key_start = skip_whitespace(value, open + 1);
    let key_end = end_of_string(value, key_start)?;
    let colon = skip_whitespace(value, key_end);
    if value.get(colon) != Some(&b':') {
        return None;
    }
    let inner_start = skip_whitespace(value, colon + 1);
    let inner_end = end_of_value(value, inner_start)?;
    if value.get(skip_whitespace(value, inner_end)) != Some(&b'}') {
        return None;
    }
    let key = &value[key_start + 1..key_end - 1];
    let code = codes.iter().find(|code| code.as_bytes() == key)?;
    Some((code, &value[inner_start..inner_end]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn both(rules: &Rules, native: Value) {
        let mut out = Vec::new();
        native_to_fhir(rules, native.to_string().as_bytes(), &mut out).expect("converts");
        let Value::Object(mut tree) = native else {
            panic!("object")
        };
        ToFhir { rules }.resource(&mut tree);
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            serde_json::to_string(&tree).expect("json")
        );
    }

    #[test]
    fn matches_the_tree_conversion_byte_for_byte() {
        let rules = Rules::default();
        both(
            &rules,
            json!({"resourceType": "Observation", "id": "o",
            "meta": {"versionId": 481, "lastUpdated": "t", "createdAt": "c", "tag": [{"code": "x"}]},
            "subject": {"resourceType": "Patient", "id": "p", "display": "A"},
            "performer": [{"uri": "http://x/P/1"}, {"localRef": "m"}, {"resourceType": "Practitioner", "identifier": {"value": "1", "assigner": {"resourceType": "Organization", "id": "o1"}}}],
            "value": {"Quantity": {"value": 1.50, "unit": "mg"}},
            "component": [{"value": {"string": "a b , c"}}, {"value": {"Reference": {"resourceType": "Device", "id": "d"}}}],
            "effective": {"unknownType": 1},
            "extension": [{"url": "u", "valueReference": {"resourceType": "Patient", "id": "stays"}}],
            "_status": {"extension": []},
            "contained": [{"resourceType": "Patient", "id": "c1", "deceased": {"boolean": true}, "managingOrganization": {"reference": "Organization/x"}}],
            "unknownElement": {"resourceType": "Patient", "id": "not a reference element"}}),
        );
        both(
            &rules,
            json!({"resourceType": "Patient", "meta": {"createdAt": "c", "extension": [{"url": "x", "valueString": "y"}]}}),
        );
        both(&rules, json!({"resourceType": "Patient", "id": "e"}));
    }

    #[test]
    fn attributes_as_the_tree_does() {
        let bodies = [
            json!({"resource": {"id": "Patient"}, "path": ["citizenship"], "isCollection": true,
                   "extensionUrl": "http://hl7.org/fhir/StructureDefinition/patient-citizenship"}),
            json!({"resource": {"id": "Patient"}, "path": ["citizenship", "code"],
                   "type": {"id": "CodeableConcept"}, "extensionUrl": "code"}),
        ];
        let rules = Rules::from_attributes(bodies.iter());
        both(
            &rules,
            json!({"id": "pt-3", "meta": {"createdAt": "c", "versionId": 483, "lastUpdated": "l"},
            "name": [{"given": ["Charles"]}], "citizenship": [{"code": {"text": "ru"}}], "resourceType": "Patient"}),
        );
        both(
            &rules,
            json!({"resourceType": "Patient", "extension": [{"url": "other", "valueString": "x"}],
            "citizenship": [{"code": {"text": "ru"}}, {"code": {"text": "fr"}}]}),
        );
    }
}
