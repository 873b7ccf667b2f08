//! Every resource of testdata/ (real Synthea bulk-export data, all files, all types):
//! FHIR -> native -> FHIR gives back the same JSON, and the native form holds no FHIR
//! `reference` string and no `value<Type>` key wherever the R4 definitions declare a Reference
//! or a choice element.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use fhirbox::fhir::meta::{type_def, type_index, Kind};
use fhirbox::format::walk::capitalize;
use fhirbox::format::Converter;
use serde_json::{Map, Value};

fn data_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut files = Vec::new();
    for dir in std::fs::read_dir(&root).expect("testdata") {
        let dir = dir.expect("entry").path();
        if !dir.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&dir).expect("dataset") {
            let file = file.expect("entry").path();
            if file.to_string_lossy().ends_with(".ndjson.gz") {
                files.push(file);
            }
        }
    }
    files.sort();
    files
}

/// Walks a native document with the definitions and reports every FHIR-shaped leftover.
struct NativeCheck {
    problems: Vec<String>,
    references: usize,
    choices: usize,
}

impl NativeCheck {
    fn resource(&mut self, doc: &Map<String, Value>, path: &str) {
        let Some(name) = doc.get("resourceType").and_then(Value::as_str) else {
            return;
        };
        self.object(doc, name, &format!("{path}{name}"));
    }

    fn object(&mut self, obj: &Map<String, Value>, type_name: &str, path: &str) {
        if type_name == "Reference" {
            return self.reference(obj, path);
        }
        let Some(ty) = type_index(type_name) else {
            return;
        };
        for (key, value) in obj {
            if key.starts_with('_') || key == "extension" || key == "modifierExtension" {
                continue;
            }
            let here = format!("{path}.{key}");
            match ty.def.element(key) {
                Some(element) => self.element(value, element.kind, &here),
                None => {
                    for choice in &ty.choices {
                        let Kind::Choice(codes) = choice.kind else {
                            continue;
                        };
                        if codes
                            .iter()
                            .any(|code| *key == format!("{}{}", choice.name, capitalize(code)))
                        {
                            self.problems.push(format!("{here}: an unconverted choice"));
                        }
                    }
                }
            }
        }
    }

    fn element(&mut self, value: &Value, kind: Kind, path: &str) {
        match value {
            Value::Array(items) => items.iter().for_each(|item| self.element(item, kind, path)),
            Value::Object(obj) => match kind {
                Kind::Complex(name) | Kind::ContentRef(name) => self.object(obj, name, path),
                Kind::Reference(_) => self.reference(obj, path),
                Kind::Resource => self.resource(obj, &format!("{path}/")),
                Kind::Choice(codes) => {
                    self.choices += 1;
                    match obj.iter().next() {
                        Some((code, inner)) if obj.len() == 1 && codes.contains(&code.as_str()) => {
                            let kind = if code == "Reference" {
                                Kind::Reference(&[])
                            } else if type_def(code).is_some() {
                                Kind::Complex(type_def(code).map(|t| t.name).unwrap_or_default())
                            } else {
                                Kind::Primitive("")
                            };
                            self.element(inner, kind, path);
                        }
                        _ => self
                            .problems
                            .push(format!("{path}: not a {{type: value}} choice")),
                    }
                }
                Kind::Primitive(_) => {}
            },
            _ => {
                if let Kind::Choice(_) = kind {
                    self.problems.push(format!("{path}: a bare choice value"));
                }
            }
        }
    }

    fn reference(&mut self, obj: &Map<String, Value>, path: &str) {
        self.references += 1;
        if obj.contains_key("reference") {
            self.problems
                .push(format!("{path}: still has a FHIR reference string"));
        }
        if let Some(Value::Object(identifier)) = obj.get("identifier") {
            self.object(identifier, "Identifier", &format!("{path}.identifier"));
        }
    }
}

#[test]
fn every_resource_round_trips_and_its_native_form_is_native() {
    let converter = Converter::default();
    let mut check = NativeCheck {
        problems: Vec::new(),
        references: 0,
        choices: 0,
    };
    let mut resources = 0;
    let mut types = std::collections::BTreeSet::new();
    let files = data_files();
    assert!(files.len() >= 30, "found {} data files", files.len());
    for file in &files {
        let reader = BufReader::new(flate2::read::MultiGzDecoder::new(
            std::fs::File::open(file).expect("open"),
        ));
        for (number, line) in reader.lines().enumerate() {
            let line = line.expect("line");
            if line.trim().is_empty() {
                continue;
            }
            let fhir: Value = serde_json::from_str(&line).expect("valid JSON");
            let where_ = format!("{}:{}", file.display(), number + 1);
            let native = converter
                .to_native(fhir.clone())
                .unwrap_or_else(|error| panic!("{where_}: {error}"));
            if let Value::Object(doc) = &native {
                check.resource(doc, &format!("{where_}: "));
                types.insert(doc["resourceType"].as_str().unwrap_or_default().to_string());
            }
            // The bulk exports' text path gives byte for byte the tree path's output.
            let mut text = Vec::new();
            converter
                .to_fhir_text(native.to_string().as_bytes(), &mut text)
                .expect("text path");
            let back = converter.to_fhir(native);
            assert_eq!(back, fhir, "{where_}: the round trip changed the resource");
            assert_eq!(
                String::from_utf8(text).expect("utf-8"),
                serde_json::to_string(&back).expect("json"),
                "{where_}: the text conversion differs from the tree conversion"
            );
            resources += 1;
        }
    }
    assert!(
        check.problems.is_empty(),
        "{} problems, e.g.:\n{}",
        check.problems.len(),
        check
            .problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(resources > 45_000, "{resources} resources");
    assert!(types.len() >= 20, "{types:?}");
    assert!(
        check.references > 100_000,
        "{} references checked",
        check.references
    );
    assert!(
        check.choices > 20_000,
        "{} choice values checked",
        check.choices
    );
}
