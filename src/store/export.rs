//! The SQL of `$export`: the Patient compartment as SQL functions with GIN indexes, and the
//! COPY that reads one resource type of an export.
//!
//! **The compartment.** For every type in the R4 Patient CompartmentDefinition, the
//! generated table [`crate::fhir::r4::PATIENT_COMPARTMENT`] lists the element paths whose
//! Patient references put a resource in a patient's compartment. Each type gets an IMMUTABLE
//! function `fhirbox_patients_<table>(resource) -> jsonb` (the array of the ids of the
//! Patients it references through those paths, read from the native `{resourceType, id}`
//! references) and a GIN index on it, so that "the resources of these 12 patients" is an index
//! lookup (`fhirbox_patients_observation(resource) ?| $patients`) and not a scan of every row.
//!
//! **No request text in SQL.** COPY takes no bind parameters. What comes from a request
//! (patient ids, `_id` values, token codes and systems) is inserted with bind parameters into
//! temporary tables of the export's own transaction, and the COPY reads them from there; the
//! statement text holds only table and function names, element paths from the generated
//! table, numbers fhirbox counts itself, and timestamps it prints itself from parsed values.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::copy_out::{copy_out, copy_out_on, CopyOut};
use super::{timestamp_literal, Store, StoreError};
use crate::fhir::r4::{PATIENT_COMPARTMENT, TOKEN_PARAMS};
use crate::resource_type::ResourceType;

/// The element paths linking a type to its patients, if it is in the Patient compartment.
pub fn compartment_paths(type_name: &str) -> Option<&'static [&'static str]> {
    PATIENT_COMPARTMENT
        .iter()
        .find(|(name, _)| *name == type_name)
        .map(|(_, paths)| *paths)
}

/// The token search parameter `code` of a type, if `_typeFilter` supports it: its element
/// paths with their FHIR types.
pub fn token_param(type_name: &str, code: &str) -> Option<&'static [(&'static str, &'static str)]> {
    TOKEN_PARAMS
        .iter()
        .find(|(name, param, _)| *name == type_name && *param == code)
        .map(|(_, _, paths)| *paths)
}

/// The compartment index of a type, if it has one: `(name, CREATE INDEX statement)`.
pub fn compartment_index(rt: ResourceType) -> Option<(String, String)> {
    compartment_paths(rt.name())?;
    let name = format!("{}_fhirbox_patients", rt.table_name());
    let create = format!(
        "CREATE INDEX IF NOT EXISTS {name} ON {} USING gin ({}(resource))",
        rt.table(),
        patients_function(rt)
    );
    Some((name, create))
}

fn patients_function(rt: ResourceType) -> String {
    format!("fhirbox_patients_{}", rt.table_name())
}

/// The compartment functions and their indexes. Idempotent; run at every start-up.
///
/// (A later change to a type's paths must also `REINDEX` its index: `CREATE OR REPLACE`
/// changes the function but not what the index already holds.)
pub fn compartment_ddl() -> String {
    let mut ddl = String::new();
    for (type_name, paths) in PATIENT_COMPARTMENT {
        let Some(rt) = ResourceType::parse(type_name) else {
            continue;
        };
        let function = patients_function(rt);
        let arrays: Vec<String> = paths
            .iter()
            .map(|path| {
                format!(
                    "jsonb_path_query_array(resource, '{}')",
                    patient_ids_path(path)
                )
            })
            .collect();
        // One expression of built-in functions (no subquery), so PostgreSQL inlines the
        // function into the index and the queries: evaluating it costs what the jsonpath costs.
        let (_, create_index) = compartment_index(rt).expect("a compartment type");
        ddl.push_str(&format!(
            "CREATE OR REPLACE FUNCTION {function}(resource jsonb) RETURNS jsonb
                 LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
                 AS $fn$ SELECT {} $fn$;
             {create_index};\n",
            arrays.join(" || "),
        ));
    }
    ddl
}

/// The jsonpath of the ids of the Patients referenced at a dotted element path (lax mode
/// walks through arrays at every step).
fn patient_ids_path(path: &str) -> String {
    format!("lax $.{path} ? (@.resourceType == \"Patient\").id")
}

/// Which resources of a type an export takes, by patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Patients {
    /// System level: every resource.
    Any,
    /// Patient level: every resource in some patient's compartment.
    Every,
    /// Group level, or `patient` parameters: the compartments of these patients only (they are
    /// in the export's patient table).
    Listed,
}

/// One criterion of a `_typeFilter` (the criteria of one filter must all hold).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Criterion {
    /// `_id=a,b`: one of these ids.
    Id(Vec<String>),
    /// `_lastUpdated=ge2024-01-01` and friends: `from <= ts < to`.
    LastUpdated {
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    },
    /// A token parameter (`category=laboratory`, `code=http://loinc.org|8302-2`): one of the
    /// values.
    Token { param: String, values: Vec<Token> },
}

/// One token value: `code`, `system|code`, `|code` (no system) or `system|`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub system: Option<String>,
    pub code: Option<String>,
    /// `|code`: the coding must have no system.
    pub no_system: bool,
}

/// What one export task reads.
pub struct ExportQuery<'a> {
    pub rt: ResourceType,
    /// The export's transactionTime: nothing changed after it.
    pub until: DateTime<Utc>,
    /// `_since`: only resources changed after it.
    pub since: Option<DateTime<Utc>>,
    pub patients: Patients,
    /// `_typeFilter`s of this type: a resource is exported if any filter matches (none: all).
    pub filters: &'a [Vec<Criterion>],
}

/// Who the patients of a `Listed` export are: the `member` Patients of a Group (not
/// `inactive`), or listed ids, or the listed ids that are members of the Group.
pub struct PatientSource<'a> {
    pub group: Option<&'a str>,
    pub ids: Option<&'a [String]>,
}

/// Starts the COPY of one export task. When it needs patients or filter values, on its own
/// connection, in a REPEATABLE READ transaction that holds them in temporary tables; the
/// connection is closed when the COPY ends (its transaction and tables go with it).
pub async fn start(
    store: &Store,
    query: &ExportQuery<'_>,
    patients: PatientSource<'_>,
) -> Result<CopyOut, StoreError> {
    let (sql, values) = export_sql(query)?;
    if !sql.contains("pg_temp.") {
        // Nothing from the request to hand over: a plain COPY on a pooled connection (one
        // statement is one snapshot).
        return copy_out(store, &sql).await;
    }
    let conn = store.dedicated().await?;
    conn.batch_execute(
        "BEGIN ISOLATION LEVEL REPEATABLE READ;
         SET LOCAL client_min_messages = warning;
         CREATE TEMP TABLE fhirbox_export_patients (id text PRIMARY KEY) ON COMMIT DROP;
         CREATE TEMP TABLE fhirbox_export_values (key integer NOT NULL, code text, vars jsonb) ON COMMIT DROP",
    )
    .await?;
    if let Some(id) = patients.group {
        conn.execute(
            &format!(
                "INSERT INTO pg_temp.fhirbox_export_patients
                 SELECT DISTINCT p #>> '{{}}' FROM \"group\" g,
                        jsonb_path_query(g.resource, '{}') AS p
                  WHERE g.id = $1 ON CONFLICT DO NOTHING",
                "lax $.member ? (!exists(@.inactive) || @.inactive != true).entity ? (@.resourceType == \"Patient\").id"
            ),
            &[&id],
        )
        .await?;
    }
    match (patients.group, patients.ids) {
        (Some(_), Some(ids)) => {
            conn.execute(
                "DELETE FROM pg_temp.fhirbox_export_patients WHERE id <> ALL($1::text[])",
                &[&ids],
            )
            .await?;
        }
        (None, Some(ids)) => {
            conn.execute(
                "INSERT INTO pg_temp.fhirbox_export_patients SELECT DISTINCT unnest($1::text[])",
                &[&ids],
            )
            .await?;
        }
        _ => {}
    }
    for (key, code, vars) in &values {
        conn.execute(
            "INSERT INTO pg_temp.fhirbox_export_values (key, code, vars) VALUES ($1, $2, $3)",
            &[key, code, vars],
        )
        .await?;
    }
    conn.execute("ANALYZE pg_temp.fhirbox_export_patients", &[])
        .await?;
    // (On an error above, dropping `conn` closes it with its transaction.) The COPY ends the
    // connection's use: it holds the transaction and its temporary tables.
    Ok(copy_out_on(conn, &sql).await?.close_after())
}

/// A row of the values table: (key, code, jsonpath variables).
type ValueRow = (i32, Option<String>, Option<Value>);

/// The COPY statement of a task, and the filter values it reads from the values table.
fn export_sql(query: &ExportQuery<'_>) -> Result<(String, Vec<ValueRow>), StoreError> {
    let rt = query.rt;
    let mut conditions = vec![format!("ts <= {}", timestamp_literal(&query.until))];
    if let Some(since) = &query.since {
        conditions.push(format!("ts > {}", timestamp_literal(since)));
    }
    if let Some(condition) = patient_condition(rt, &query.patients) {
        conditions.push(condition);
    }
    let mut values = Vec::new();
    if !query.filters.is_empty() {
        let mut any = Vec::new();
        for filter in query.filters {
            let mut all = vec!["true".to_string()];
            for criterion in filter {
                all.push(criterion_sql(rt, criterion, &mut values)?);
            }
            any.push(format!("({})", all.join(" AND ")));
        }
        conditions.push(format!("({})", any.join(" OR ")));
    }
    let sql = format!(
        "COPY (SELECT id, txid, cts, ts, resource FROM {} WHERE {}) TO STDOUT (FORMAT binary)",
        rt.table(),
        conditions.join(" AND ")
    );
    Ok((sql, values))
}

fn patient_condition(rt: ResourceType, patients: &Patients) -> Option<String> {
    let listed = "(SELECT coalesce(array_agg(id), '{}') FROM pg_temp.fhirbox_export_patients)";
    let empty = "'[]'::jsonb";
    let function = compartment_paths(rt.name()).map(|_| patients_function(rt));
    let is_patient = rt.name() == "Patient";
    Some(match (patients, function) {
        (Patients::Any, _) => return None,
        (Patients::Every, _) if is_patient => return None,
        (Patients::Every, Some(function)) => format!("{function}(resource) <> {empty}"),
        (Patients::Listed, Some(function)) if is_patient => format!(
            "(id IN (SELECT id FROM pg_temp.fhirbox_export_patients) OR {function}(resource) ?| {listed})"
        ),
        (Patients::Listed, Some(function)) => format!("{function}(resource) ?| {listed}"),
        // Not in the compartment: nothing of it belongs to a patient.
        (_, None) => "false".to_string(),
    })
}

fn criterion_sql(
    rt: ResourceType,
    criterion: &Criterion,
    values: &mut Vec<ValueRow>,
) -> Result<String, StoreError> {
    let key = values.len() as i32 + 1;
    Ok(match criterion {
        Criterion::Id(ids) => {
            values.extend(ids.iter().map(|id| (key, Some(id.clone()), None)));
            // An empty list still needs its key to exist nowhere: no match.
            format!("id IN (SELECT code FROM pg_temp.fhirbox_export_values WHERE key = {key})")
        }
        Criterion::LastUpdated { from, to } => {
            let mut parts = vec!["true".to_string()];
            if let Some(from) = from {
                parts.push(format!("ts >= {}", timestamp_literal(from)));
            }
            if let Some(to) = to {
                parts.push(format!("ts < {}", timestamp_literal(to)));
            }
            format!("({})", parts.join(" AND "))
        }
        Criterion::Token {
            param,
            values: tokens,
        } => {
            let Some(paths) = token_param(rt.name(), param) else {
                return Err(StoreError::Invalid(format!(
                    "{} has no token search parameter '{param}'",
                    rt.name()
                )));
            };
            for token in tokens {
                let vars = json!({
                    "system": token.system,
                    "code": token.code,
                    "nosys": token.no_system,
                });
                values.push((key, None, Some(vars)));
            }
            let tests: Vec<String> = paths
                .iter()
                .map(|(path, kind)| {
                    format!(
                        "jsonb_path_exists(resource, '{}', v.vars)",
                        token_path(path, kind)
                    )
                })
                .collect();
            format!(
                "EXISTS (SELECT 1 FROM pg_temp.fhirbox_export_values v WHERE v.key = {key} AND ({}))",
                tests.join(" OR ")
            )
        }
    })
}

/// The jsonpath that finds a token at a path of FHIR type `kind`, with the variables `$code`,
/// `$system` (JSON null: any) and `$nosys` (true: the coding must have no system).
fn token_path(path: &str, kind: &str) -> String {
    let coded = |code_field: &str| {
        format!(
            "($system == null || @.system == $system) && ($code == null || @.{code_field} == $code) \
             && ($nosys == false || !(exists(@.system)))"
        )
    };
    match kind {
        "CodeableConcept" => format!("lax $.{path}.coding ? ({})", coded("code")),
        "Coding" => format!("lax $.{path} ? ({})", coded("code")),
        "Identifier" => format!("lax $.{path} ? ({})", coded("value")),
        // A plain code has no system.
        _ => format!("lax $.{path} ? (($code == null || @ == $code) && $system == null)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(name: &str) -> ResourceType {
        ResourceType::parse(name).expect("known type")
    }

    #[test]
    fn the_compartment_comes_from_the_definitions() {
        assert_eq!(
            compartment_paths("Observation"),
            Some(&["performer", "subject"][..])
        );
        assert_eq!(compartment_paths("Patient"), Some(&["link.other"][..]));
        assert_eq!(compartment_paths("Organization"), None);
        assert_eq!(
            token_param("Observation", "category"),
            Some(&[("category", "CodeableConcept")][..])
        );
    }

    #[test]
    fn request_values_never_reach_the_statement() {
        let filters = vec![vec![
            Criterion::Id(vec!["x'); DROP TABLE patient; --".into()]),
            Criterion::Token {
                param: "category".into(),
                values: vec![Token {
                    system: Some("'evil'".into()),
                    code: Some("laboratory".into()),
                    no_system: false,
                }],
            },
        ]];
        let until = Utc::now();
        let query = ExportQuery {
            rt: rt("Observation"),
            until,
            since: None,
            patients: Patients::Listed,
            filters: &filters,
        };
        let (sql, values) = export_sql(&query).expect("builds");
        assert!(!sql.contains("DROP") && !sql.contains("evil") && !sql.contains("laboratory"));
        assert_eq!(values.len(), 2);
        assert!(sql.contains("fhirbox_patients_observation(resource) ?|"));
    }

    #[test]
    fn types_outside_the_compartment_give_nothing_at_patient_level() {
        assert_eq!(
            patient_condition(rt("Organization"), &Patients::Every).as_deref(),
            Some("false")
        );
        assert_eq!(patient_condition(rt("Patient"), &Patients::Every), None);
        assert_eq!(patient_condition(rt("Organization"), &Patients::Any), None);
    }
}
