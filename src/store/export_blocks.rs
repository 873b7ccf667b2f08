//! The SQL of `$export` with `organizeOutputBy=Patient`: one COPY of every exported type's
//! rows, each paired with a Patient it belongs to, ordered by that Patient, so that the
//! writer sees each patient's block (its Patient first, then its compartment's resources)
//! as one run of rows.
//!
//! A row is in the block of every patient of its compartment (a resource naming two patients
//! is in both blocks, which the IG allows). A Provenance belongs to the patients of its
//! targets (a target that is a Patient, or a compartment resource of one). The sort is
//! PostgreSQL's (spilling to its temporary files); fhirbox's memory stays one batch.

use super::copy_out::CopyOut;
use super::export::{
    at_time_sql, compartment, conditions, patients_function, run_copy, ExportQuery, PatientSource,
    Patients, ValueRow,
};
use super::{Store, StoreError};
use crate::resource_type::ResourceType;

/// PostgreSQL's memory for sorting one organized export (its `work_mem`, in the export's own
/// transaction): the sort holds the whole export, and with the default 4 MB a sort of
/// gigabytes merges its runs in many passes. It is PostgreSQL's memory, once per running
/// organized export, not fhirbox's.
const SORT_MEMORY_MB: u32 = 256;

/// The fields of a block row: the patient, the row's type, then the dump's fields.
pub mod fields {
    pub const PATIENT: usize = 0;
    pub const TYPE: usize = 1;
    pub const ID: usize = 2;
    pub const TXID: usize = 3;
    pub const CTS: usize = 4;
    pub const TS: usize = 5;
    pub const RESOURCE: usize = 6;
    pub const COUNT: usize = 7;
}

/// Starts the COPY of an organized export: `queries` are the exported types (each with its
/// conditions), all at the same transactionTime and with the same patients.
pub async fn start(
    store: &Store,
    queries: &[ExportQuery<'_>],
    patients: PatientSource<'_>,
    limits: &super::session::SessionLimits,
) -> Result<CopyOut, StoreError> {
    let (sql, values) = blocks_sql(queries)?;
    run_copy(store, &sql, &values, patients, limits, Some(SORT_MEMORY_MB)).await
}

fn blocks_sql(queries: &[ExportQuery<'_>]) -> Result<(String, Vec<ValueRow>), StoreError> {
    let mut values = Vec::new();
    let mut parts = Vec::new();
    for query in queries {
        let rt = query.rt;
        let name = rt.name();
        // Whose block a row goes to: a jsonb array of Patient ids.
        let owners = match name {
            "Patient" => "jsonb_build_array(x.id)".to_string(),
            "Provenance" => provenance_patients("x.resource"),
            _ if super::export::compartment_paths(name).is_some() => {
                format!("{}(x.resource)", patients_function(rt))
            }
            // Not in the compartment: in no patient's block.
            _ => continue,
        };
        let rows = at_time_sql(rt, &query.at, &conditions(query, &mut values)?);
        let kind = if name == "Patient" { 0 } else { 1 };
        parts.push(format!(
            "SELECT p.id AS pid, {kind} AS kind, '{name}' AS rtype, x.id, x.txid, x.cts, x.ts, x.resource
               FROM ({rows}) AS x,
                    jsonb_array_elements_text({owners}) AS p(id)
              WHERE {}",
            owner_condition(&query.patients)
        ));
    }
    if parts.is_empty() {
        parts.push(
            "SELECT NULL::text, 0, NULL::text, NULL::text, 0::bigint, now(), now(), NULL::jsonb WHERE false"
                .to_string(),
        );
    }
    let sql = format!(
        "COPY (SELECT pid, rtype, id, txid, cts, ts, resource FROM ({}) AS rows
                ORDER BY pid COLLATE \"C\", kind, rtype COLLATE \"C\", id COLLATE \"C\")
              TO STDOUT (FORMAT binary)",
        parts.join("\n UNION ALL\n")
    );
    Ok((sql, values))
}

/// Which owners get a block: the listed patients, or (every patient) those that exist.
fn owner_condition(patients: &Patients) -> &'static str {
    match patients {
        Patients::Listed => "p.id IN (SELECT id FROM pg_temp.fhirbox_export_patients)",
        Patients::Every | Patients::Any => "p.id IN (SELECT id FROM patient)",
    }
}

/// The Patient ids a Provenance belongs to through its targets: a target Patient, and the
/// patients of a target compartment resource.
pub fn provenance_patients(resource: &str) -> String {
    let branches: String = compartment()
        .filter(|(name, _)| *name != "Provenance" && *name != "Patient")
        .filter_map(|(name, _)| {
            let rt = ResourceType::parse(name)?;
            Some(format!(
                " WHEN '{name}' THEN (SELECT {}(resource) FROM {} WHERE id = t.ref ->> 'id')",
                patients_function(rt),
                rt.table()
            ))
        })
        .collect();
    format!(
        "(SELECT coalesce(jsonb_agg(DISTINCT o.id), '[]'::jsonb)
            FROM jsonb_path_query({resource}, 'lax $.target[*]') AS t(ref),
                 jsonb_array_elements_text(coalesce(CASE t.ref ->> 'resourceType'
                     WHEN 'Patient' THEN jsonb_build_array(t.ref ->> 'id'){branches}
                     END, '[]'::jsonb)) AS o(id))"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::export::Versions;

    #[test]
    fn every_type_pairs_with_its_patients_and_request_text_stays_out() {
        let filters = vec![vec![crate::store::export::Criterion::Id(vec![
            "x'); DROP TABLE patient; --".into(),
        ])]];
        let query = |name: &str| ExportQuery {
            rt: ResourceType::parse(name).expect("a type"),
            at: chrono::Utc::now(),
            since: None,
            until: None,
            patients: Patients::Listed,
            filters: &filters,
            versions: Versions::AtTime,
        };
        let queries = [
            query("Patient"),
            query("Observation"),
            query("Provenance"),
            query("Organization"),
        ];
        let (sql, values) = blocks_sql(&queries).expect("builds");
        assert!(!sql.contains("DROP"));
        assert_eq!(values.len(), 3, "one filter value per type that has rows");
        assert!(sql.contains("fhirbox_patients_observation(x.resource)"));
        assert!(!sql.contains("'Organization' AS rtype"));
        assert!(sql.contains("ORDER BY pid COLLATE"));
    }
}
