//! The kick-off request of `$export`, checked and turned into the job's specification.
//!
//! Parameters come from the query string and, for `POST`, from a `Parameters` resource; both
//! are read into one list of `(name, value)` first. What fhirbox cannot honour is an error
//! (400), unless the client sent `Prefer: handling=lenient`: then it is left out and the
//! manifest's `error` file says so (the IG's lenient handling).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::elements::Elements;
use crate::bulk::params::{last_updated, parse_instant};
use crate::resource_type::ResourceType;
use crate::store::export::{compartment_paths, Criterion};

/// The output formats the IG names for NDJSON; all mean the same file.
const OUTPUT_FORMATS: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];

/// Which resources an export covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "level")]
pub enum Level {
    /// `/$export`: everything.
    System,
    /// `/Patient/$export`: every patient's compartment.
    Patient,
    /// `/Group/<id>/$export`: the compartments of the Group's member Patients.
    Group { id: String },
}

/// An export job's specification, stored with the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportSpec {
    #[serde(flatten)]
    pub level: Level,
    /// The resource types to export, in order.
    pub types: Vec<String>,
    pub since: Option<DateTime<Utc>>,
    /// Nothing changed after this instant is exported (the manifest's `transactionTime`).
    pub transaction_time: DateTime<Utc>,
    /// The kick-off URL, echoed in the manifest.
    pub request: String,
    /// `patient` parameters: only these patients' compartments.
    pub patients: Option<Vec<String>>,
    /// `_typeFilter`s by type: a resource is exported if any of its type's filters matches.
    pub filters: BTreeMap<String, Vec<Vec<Criterion>>>,
    /// What lenient handling left out, for the manifest's error file.
    pub warnings: Vec<String>,
    /// `_until`: only resources whose version at transactionTime was written at or before it.
    #[serde(default)]
    pub until: Option<DateTime<Utc>>,
    /// `_elements`: the root elements to keep (none: whole resources).
    #[serde(default, skip_serializing_if = "Elements::is_empty")]
    pub elements: Elements,
    /// `organizeOutputBy=Patient`: files of patient blocks instead of files by type.
    #[serde(default)]
    pub by_patient: bool,
    /// `_includeHistory=true` (HAPI's name): every version of each resource, not only the one
    /// current at transactionTime, and every deletion in `deleted`, even without `_since`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_history: bool,
    /// `allowPartialManifests=true`: the status shows the files of finished types while the
    /// export runs, in manifest pages.
    #[serde(default)]
    pub partial_manifests: bool,
    /// `$viewdefinition-export`: the views to write instead of resources, one file each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub views: Vec<super::views::ViewExport>,
    /// Their format: `csv`, `ndjson`, `parquet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view_format: Option<String>,
    /// The primary's WAL position at kick-off: a standby reads the tasks only once it has
    /// replayed past it (none without replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<crate::store::replicas::Position>,
}

/// A kick-off as the HTTP layer received it.
pub struct KickOff {
    pub level: Level,
    /// `(name, value)` from the query string and the `Parameters` body.
    pub params: Vec<(String, String)>,
    pub lenient: bool,
    pub request: String,
    pub now: DateTime<Utc>,
}

/// Reads a `Parameters` resource into `(name, value)` pairs (`patient` references as ids).
pub fn parameters_body(body: &Value) -> Result<Vec<(String, String)>, String> {
    if body.is_null() {
        return Ok(Vec::new());
    }
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err("the body of a POST $export must be a Parameters resource".into());
    }
    let mut out = Vec::new();
    for parameter in body["parameter"].as_array().into_iter().flatten() {
        let Some(name) = parameter["name"].as_str() else {
            return Err("a parameter has no name".into());
        };
        let value = parameter.as_object().and_then(|p| {
            p.iter()
                .find(|(key, _)| key.starts_with("value"))
                .map(|(_, v)| v)
        });
        let text = match (name, value) {
            ("patient", Some(Value::Object(reference))) => {
                let Some(target) = reference.get("reference").and_then(Value::as_str) else {
                    return Err("a patient parameter needs valueReference.reference".into());
                };
                let Some(id) = target
                    .strip_prefix("Patient/")
                    .filter(|id| !id.contains('/'))
                else {
                    return Err(format!(
                        "patient parameter '{target}' is not a Patient/<id> reference"
                    ));
                };
                id.to_string()
            }
            (_, Some(Value::String(text))) => text.clone(),
            (_, Some(Value::Bool(flag))) => flag.to_string(),
            _ => return Err(format!("parameter '{name}' has no usable value")),
        };
        out.push((name.to_string(), text));
    }
    Ok(out)
}

/// Checks a kick-off and builds the specification.
pub fn specify(kick_off: KickOff) -> Result<ExportSpec, String> {
    let KickOff {
        level,
        params,
        lenient,
        request,
        now,
    } = kick_off;
    let mut warnings = Vec::new();
    // Unsupported things: an error, or with lenient handling a warning.
    let mut refuse = |message: String| -> Result<(), String> {
        if lenient {
            warnings.push(message);
            Ok(())
        } else {
            Err(format!(
                "{message} (send 'Prefer: handling=lenient' to ignore it)"
            ))
        }
    };
    let mut since = None;
    let mut type_lists = Vec::new();
    let mut filter_texts = Vec::new();
    let mut patients: Option<Vec<String>> = None;
    let mut associated_data = Vec::new();
    let mut until = None;
    let mut elements = Elements::default();
    let mut by_patient = false;
    let mut partial_manifests = false;
    let mut include_history = false;
    for (name, value) in &params {
        match name.as_str() {
            "_outputFormat" => {
                if !OUTPUT_FORMATS.contains(&value.as_str()) {
                    return Err(format!(
                        "_outputFormat '{value}' is not supported; use one of: {}",
                        OUTPUT_FORMATS.join(", ")
                    ));
                }
            }
            "_since" => {
                since = Some(parse_instant(value).ok_or_else(|| {
                    format!("_since '{value}' is not a FHIR instant (like 2024-01-31T12:00:00Z)")
                })?);
            }
            "_until" => {
                until = Some(parse_instant(value).ok_or_else(|| {
                    format!("_until '{value}' is not a FHIR instant (like 2024-01-31T12:00:00Z)")
                })?);
            }
            "_elements" => {
                for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                    if let Err(message) = elements.add(item) {
                        refuse(message)?;
                    }
                }
            }
            "organizeOutputBy" => match (value.as_str(), &level) {
                ("Patient", Level::Patient | Level::Group { .. }) => by_patient = true,
                ("Patient", Level::System) => refuse(
                    "organizeOutputBy=Patient is supported at Patient and Group level \
                     (/Patient/$export, /Group/<id>/$export), not for a system export"
                        .to_string(),
                )?,
                (other, _) => refuse(format!(
                    "organizeOutputBy '{other}' is not supported (only Patient is)"
                ))?,
            },
            "allowPartialManifests" => match value.as_str() {
                "true" => partial_manifests = true,
                "false" => partial_manifests = false,
                other => {
                    return Err(format!(
                        "allowPartialManifests must be true or false, not '{other}'"
                    ))
                }
            },
            "_includeHistory" => match value.as_str() {
                "true" => include_history = true,
                "false" => include_history = false,
                other => {
                    return Err(format!(
                        "_includeHistory must be true or false, not '{other}'"
                    ))
                }
            },
            "_type" => type_lists.push(value.clone()),
            "_typeFilter" => filter_texts.push(value.clone()),
            "patient" => {
                if level == Level::System {
                    return Err(
                        "the patient parameter applies to Patient and Group exports only".into(),
                    );
                }
                let listed = patients.get_or_insert_with(Vec::new);
                for reference in value.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                    listed.push(patient_id(reference)?);
                }
            }
            "includeAssociatedData" => associated_data.push(value.clone()),
            other => refuse(format!("the parameter '{other}' is not supported"))?,
        }
    }

    let in_scope = |name: &str| match level {
        Level::System => true,
        _ => compartment_paths(name).is_some() || name == "Patient",
    };
    let mut types: Vec<String> = Vec::new();
    let mut outside: Vec<String> = Vec::new();
    let mut dropped = None;
    if type_lists.is_empty() {
        types.extend(
            ResourceType::all()
                .filter(|rt| rt.is_fhir() && in_scope(rt.name()))
                .map(|rt| rt.name().to_string()),
        );
    } else {
        for name in type_lists
            .iter()
            .flat_map(|list| list.split(','))
            .map(str::trim)
        {
            if name.is_empty() || types.iter().any(|t| t == name) {
                continue;
            }
            match ResourceType::parse(name).filter(|rt| rt.is_fhir()) {
                None => refuse(format!("_type '{name}' is not a FHIR R4 resource type"))?,
                // The IG: drop what a Patient or Group export cannot hold and say so; an
                // error only when nothing asked for is exportable (below).
                Some(_) if !in_scope(name) => {
                    outside.push(name.to_string());
                }
                Some(_) => types.push(name.to_string()),
            }
        }
        if types.is_empty() && !outside.is_empty() {
            return Err(format!(
                "none of the types in _type ({}) is in the Patient compartment, so a Patient or \
                 Group export has nothing to give; export them at system level (/$export)",
                outside.join(", ")
            ));
        }
        if types.is_empty() {
            return Err("_type names no resource type to export".into());
        }
        if !outside.is_empty() {
            dropped = Some(format!(
                "not exported: {} (not in the Patient compartment; a Patient or Group export \
                 holds the compartment's types only)",
                outside.join(", ")
            ));
        }
    }

    let mut filters: BTreeMap<String, Vec<Vec<Criterion>>> = BTreeMap::new();
    for text in &filter_texts {
        for filter in split_filters(text) {
            let (type_name, criteria) = parse_filter(&filter)?;
            if !types.contains(&type_name) {
                refuse(format!(
                    "_typeFilter '{filter}' is for {type_name}, which this export does not include"
                ))?;
                continue;
            }
            filters.entry(type_name).or_default().push(criteria);
        }
    }

    if !associated_data.is_empty() {
        // The IG: a server that cannot honour it SHOULD refuse it (lenient: ignore and say so).
        // The Provenance a Patient or Group export includes is the IG's default anyway.
        refuse(format!(
            "includeAssociatedData ({}) is not supported",
            associated_data.join(",")
        ))?;
    }
    if include_history && by_patient {
        return Err(
            "_includeHistory=true and organizeOutputBy=Patient cannot be combined: \
                    a patient block holds each resource once"
                .into(),
        );
    }
    warnings.extend(dropped);
    Ok(ExportSpec {
        level,
        types,
        since,
        transaction_time: now,
        request,
        patients,
        filters,
        warnings,
        until,
        elements,
        by_patient,
        include_history,
        partial_manifests,
        views: Vec::new(),
        view_format: None,
        position: None,
    })
}

/// A `patient` value's id: `Patient/<id>` (the IG's reference) or a bare `<id>`.
fn patient_id(reference: &str) -> Result<String, String> {
    let id = reference.strip_prefix("Patient/").unwrap_or(reference);
    if crate::resource::is_valid_id(id) {
        Ok(id.to_string())
    } else {
        Err(format!(
            "patient '{reference}' is not a Patient reference (Patient/<id>)"
        ))
    }
}

/// Splits a `_typeFilter` value into filters. Filters are comma-separated; a comma inside a
/// filter should be escaped (`%2C`), but a piece that does not start with `Type?` is taken as
/// the rest of the previous filter, so an unescaped `code=a,b` still works.
fn split_filters(text: &str) -> Vec<String> {
    let mut filters: Vec<String> = Vec::new();
    for piece in text.split(',') {
        let starts_filter = piece
            .split_once('?')
            .is_some_and(|(name, _)| ResourceType::parse(name).is_some());
        match filters.last_mut() {
            Some(last) if !starts_filter => {
                last.push(',');
                last.push_str(piece);
            }
            _ => filters.push(piece.to_string()),
        }
    }
    filters.retain(|f| !f.trim().is_empty());
    filters
}

/// One filter, `Type?name=value&...`, as criteria that must all hold.
fn parse_filter(filter: &str) -> Result<(String, Vec<Criterion>), String> {
    let Some((type_name, query)) = filter.split_once('?') else {
        return Err(format!(
            "_typeFilter '{filter}' is not of the form Type?search"
        ));
    };
    if ResourceType::parse(type_name)
        .filter(|rt| rt.is_fhir())
        .is_none()
    {
        return Err(format!(
            "_typeFilter '{filter}': '{type_name}' is not a FHIR R4 resource type"
        ));
    }
    let mut criteria = Vec::new();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        // Refused even when lenient: a filter applied in part would export more than asked.
        match parse_criterion(type_name, &name, &value) {
            Ok(criterion) => criteria.push(criterion),
            Err(message) => {
                return Err(format!(
                    "_typeFilter '{filter}': {message} (a filter is never applied in part)"
                ))
            }
        }
    }
    Ok((type_name.to_string(), criteria))
}

fn parse_criterion(type_name: &str, name: &str, value: &str) -> Result<Criterion, String> {
    let values: Vec<&str> = value.split(',').collect();
    match name {
        "_id" => Ok(Criterion::Id(
            values.iter().map(|v| v.to_string()).collect(),
        )),
        "_lastUpdated" => {
            let [one] = values.as_slice() else {
                return Err("_lastUpdated takes one value (repeat it for a range)".into());
            };
            let (from, to) = last_updated(one)?;
            Ok(Criterion::LastUpdated { from, to })
        }
        _ => {
            let rt = ResourceType::parse(type_name)
                .ok_or_else(|| format!("'{type_name}' is not a resource type"))?;
            // Compiled now so that a filter that cannot be applied is refused at kick-off
            // (the task compiles it again for the Attributes in force when it runs).
            let pairs = [(name.to_string(), value.to_string())];
            crate::search::condition(rt, None, &pairs, "resource", "")
                .map_err(|e| e.to_string())?;
            Ok(Criterion::Search {
                name: name.to_string(),
                value: value.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kick_off(
        level: Level,
        params: &[(&str, &str)],
        lenient: bool,
    ) -> Result<ExportSpec, String> {
        specify(KickOff {
            level,
            params: params
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            lenient,
            request: "http://x/fhir/$export".into(),
            now: Utc::now(),
        })
    }

    #[test]
    fn defaults_are_every_type_or_the_compartment() {
        let system = kick_off(Level::System, &[], false).expect("valid");
        assert!(system.types.contains(&"Organization".to_string()));
        assert!(!system.types.contains(&"Client".to_string()));
        let patient = kick_off(Level::Patient, &[], false).expect("valid");
        assert!(patient.types.contains(&"Observation".to_string()));
        assert!(patient.types.contains(&"Patient".to_string()));
        assert!(!patient.types.contains(&"Organization".to_string()));
    }

    #[test]
    fn smart_fetch_filters_parse() {
        let spec = kick_off(
            Level::System,
            &[
                ("_type", "Patient,Observation"),
                (
                    "_typeFilter",
                    "Observation?category=social-history%2Cvital-signs,Patient?_lastUpdated=gt2024-01-01",
                ),
            ],
            false,
        )
        .expect("valid");
        // One decode happened in the HTTP layer; the filter's own query is decoded here.
        let observation = &spec.filters["Observation"];
        assert_eq!(
            observation[0],
            vec![Criterion::Search {
                name: "category".into(),
                value: "social-history,vital-signs".into(),
            }]
        );
        let Criterion::LastUpdated { from, to } = &spec.filters["Patient"][0][0] else {
            panic!("a _lastUpdated criterion");
        };
        assert_eq!(
            from.map(|f| f.to_rfc3339()),
            Some("2024-01-02T00:00:00+00:00".into())
        );
        assert_eq!(*to, None);
    }

    #[test]
    fn unsupported_things_are_refused_unless_lenient_and_filters_always() {
        for filter in [
            "Observation?_has:Observation:patient:code=1",
            "Observation?shoe-size=5",
            "Observation?_sort=date",
            "Observation?subject:Patient.name=x",
            "Observation?code:in=http://x",
        ] {
            // Never applied in part, lenient or not: that would export more than asked.
            for lenient in [false, true] {
                let error =
                    kick_off(Level::System, &[("_typeFilter", filter)], lenient).expect_err(filter);
                assert!(error.contains("never applied in part"), "{error}");
            }
        }
        let spec = kick_off(
            Level::System,
            &[("_typeFilter", "Observation?value-quantity=gt5&date=2020")],
            false,
        )
        .expect("every search parameter");
        assert_eq!(spec.filters["Observation"][0].len(), 2);

        assert!(kick_off(Level::System, &[("_outputFormat", "text/csv")], true).is_err());
        assert!(kick_off(Level::System, &[("_since", "yesterday")], true).is_err());
        assert!(kick_off(Level::System, &[("_type", "Nope")], false).is_err());
        assert!(kick_off(Level::System, &[("patient", "p1")], false).is_err());
        let associated = [("includeAssociatedData", "LatestProvenanceResources")];
        assert!(kick_off(Level::System, &associated, false).is_err());
        let spec = kick_off(Level::System, &associated, true).expect("ignored");
        assert_eq!(spec.warnings.len(), 1);
    }

    #[test]
    fn types_outside_the_compartment_are_dropped_with_a_warning() {
        let spec = kick_off(
            Level::Patient,
            &[("_type", "Patient,Organization,Device")],
            false,
        )
        .expect("valid");
        assert_eq!(spec.types, ["Patient", "Device"]);
        assert_eq!(spec.warnings.len(), 1);
        assert!(
            spec.warnings[0].contains("Organization"),
            "{:?}",
            spec.warnings
        );
        let error = kick_off(
            Level::Group { id: "g".into() },
            &[("_type", "Organization")],
            false,
        )
        .expect_err("nothing exportable");
        assert!(error.contains("/$export"), "{error}");
    }

    #[test]
    fn patients_are_references_or_ids() {
        let spec = kick_off(
            Level::Patient,
            &[("patient", "Patient/p1,p2"), ("patient", "Patient/p3")],
            false,
        )
        .expect("valid");
        assert_eq!(
            spec.patients,
            Some(vec!["p1".into(), "p2".into(), "p3".into()])
        );
        assert!(kick_off(Level::Patient, &[("patient", "Group/g1")], false).is_err());
    }

    #[test]
    fn unescaped_commas_stay_in_their_filter() {
        assert_eq!(
            split_filters("Observation?code=a,b,Patient?_id=1"),
            vec![
                "Observation?code=a,b".to_string(),
                "Patient?_id=1".to_string()
            ]
        );
    }

    #[test]
    fn parameters_bodies() {
        let body = serde_json::json!({"resourceType": "Parameters", "parameter": [
            {"name": "_type", "valueString": "Observation"},
            {"name": "patient", "valueReference": {"reference": "Patient/p1"}},
        ]});
        assert_eq!(
            parameters_body(&body).expect("valid"),
            vec![
                ("_type".into(), "Observation".into()),
                ("patient".into(), "p1".into())
            ]
        );
        assert!(parameters_body(&serde_json::json!({"resourceType": "Patient"})).is_err());
    }
}
