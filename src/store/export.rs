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
use serde_json::Value;

use super::copy_out::{copy_out_on, CopyOut};
use super::session::SessionLimits;
pub use super::token::Token;
use super::token::{token_param, token_path};
use super::{timestamp_literal, GenericClient, Store, StoreError};
use crate::fhir::r4::PATIENT_COMPARTMENT;
use crate::resource_type::ResourceType;

/// Types fhirbox adds to the R4 Patient compartment for exports, with their links. R4 leaves
/// `Device` out, but a Device with `Device.patient` set is that patient's (an implant, a
/// pump), and bulk clients ask for it at Patient and Group level (smart-fetch's default
/// types include it). R5 puts Device in the compartment the same way.
const EXPORT_COMPARTMENT_EXTRAS: &[(&str, &[&str])] = &[("Device", &["patient"])];

/// The element paths linking a type to its patients, if it is in the Patient compartment (as
/// fhirbox exports it: R4's, plus [`EXPORT_COMPARTMENT_EXTRAS`]).
pub fn compartment_paths(type_name: &str) -> Option<&'static [&'static str]> {
    compartment()
        .find(|(name, _)| *name == type_name)
        .map(|(_, paths)| paths)
}

/// Every type of the compartment with its paths.
pub(super) fn compartment() -> impl Iterator<Item = (&'static str, &'static [&'static str])> {
    PATIENT_COMPARTMENT
        .iter()
        .chain(EXPORT_COMPARTMENT_EXTRAS)
        .map(|(name, paths)| (*name, *paths))
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

pub(crate) fn patients_function(rt: ResourceType) -> String {
    format!("fhirbox_patients_{}", rt.table_name())
}

/// The compartment functions and their indexes. Idempotent; run at every start-up.
///
/// (A later change to a type's paths must also `REINDEX` its index: `CREATE OR REPLACE`
/// changes the function but not what the index already holds.)
pub fn compartment_ddl() -> String {
    let mut ddl = String::new();
    for (type_name, paths) in compartment() {
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
    /// A token parameter (`category=laboratory`): one of the values. Only in the specs of
    /// jobs kicked off by earlier versions; new ones say [`Criterion::Search`].
    Token { param: String, values: Vec<Token> },
    /// Any search parameter, as the client wrote it (`code:text`, `heart`).
    Search { name: String, value: String },
    /// The `Search` criteria of one filter compiled by `search` (in memory only: a task
    /// compiles its filters when it runs).
    #[serde(skip)]
    Compiled(super::condition::Condition),
}

/// What one export task reads.
pub struct ExportQuery<'a> {
    pub rt: ResourceType,
    /// The export's transactionTime: each resource is exported as it was then.
    pub at: DateTime<Utc>,
    /// `_since`: only resources changed after it.
    pub since: Option<DateTime<Utc>>,
    /// `_until`: only resources whose version at `at` was written at or before it.
    pub until: Option<DateTime<Utc>>,
    pub patients: Patients,
    /// `_typeFilter`s of this type: a resource is exported if any filter matches (none: all).
    pub filters: &'a [Vec<Criterion>],
    /// The versions read: the resources as they were at `at`, or those deleted (after
    /// `since`, at or before `at`).
    pub versions: Versions,
}

/// Which versions an export task reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    /// Each resource as it was at the transactionTime.
    AtTime,
    /// The `deleted` versions of the resources whose last version at the transactionTime is a
    /// deletion: the manifest's `deleted` files.
    Deleted,
    /// Every version written at or before the transactionTime (`_includeHistory`): the
    /// current rows and the history's, deletions aside.
    Every,
    /// Every deletion at or before the transactionTime (`_includeHistory`), even of a
    /// resource created again since.
    EveryDeletion,
}

/// Who the patients of a `Listed` export are: the `member` Patients of a Group (not
/// `inactive`), or listed ids, or the listed ids that are members of the Group.
pub struct PatientSource<'a> {
    pub group: Option<&'a str>,
    pub ids: Option<&'a [String]>,
}

/// The ids of a Group's active Patient members, as a jsonpath over the Group.
const GROUP_MEMBERS: &str =
    "lax $.member ? (!exists(@.inactive) || @.inactive != true).entity ? (@.resourceType == \"Patient\").id";

/// The active Patient members of a Group; `None` when there is no such Group.
pub async fn group_members(store: &Store, id: &str) -> Result<Option<Vec<String>>, StoreError> {
    let conn = store.connection().await?;
    let sql = format!(
        "SELECT coalesce((SELECT array_agg(p #>> '{{}}') FROM jsonb_path_query(g.resource, '{GROUP_MEMBERS}') AS p), '{{}}')
           FROM \"group\" g WHERE g.id = $1"
    );
    let row = conn.query_opt(&sql, &[&id]).await?;
    Ok(row.map(|row| row.get(0)))
}

/// Of the `patient` parameters of a kick-off, those that name no current Patient, or (with a
/// Group) no active member of it: the IG wants them refused at kick-off.
pub async fn unknown_patients(
    client: &impl GenericClient,
    ids: &[String],
    group: Option<&str>,
) -> Result<Vec<String>, StoreError> {
    let sql = format!(
        "SELECT asked FROM unnest($1::text[]) AS asked
          WHERE NOT EXISTS (SELECT 1 FROM patient WHERE id = asked)
             OR ($2::text IS NOT NULL AND NOT EXISTS (
                   SELECT 1 FROM \"group\" g, jsonb_path_query(g.resource, '{GROUP_MEMBERS}') AS p
                    WHERE g.id = $2 AND p #>> '{{}}' = asked))"
    );
    let rows = client.query(&sql, &[&ids, &group]).await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Starts the COPY of one export task, on its own connection, in a REPEATABLE READ
/// transaction that holds the patients and filter values in temporary tables; the connection
/// is closed when the COPY ends (its transaction and tables go with it).
pub async fn start(
    store: &Store,
    query: &ExportQuery<'_>,
    patients: PatientSource<'_>,
    limits: &SessionLimits,
) -> Result<CopyOut, StoreError> {
    let (sql, values) = export_sql(query)?;
    run_copy(store, &sql, &values, patients, limits, None).await
}

/// Runs an export's COPY under `limits`, handing the patients and filter values over in
/// temporary tables when the statement reads them; `sort_memory_mb`: PostgreSQL's `work_mem`
/// for it, over the limits' own.
pub(super) async fn run_copy(
    store: &Store,
    sql: &str,
    values: &[ValueRow],
    patients: PatientSource<'_>,
    limits: &SessionLimits,
    sort_memory_mb: Option<u32>,
) -> Result<CopyOut, StoreError> {
    let conn = store.dedicated().await?;
    // No JIT: an export statement is planned once and read once, and PostgreSQL compiling
    // its expressions (hundreds of them in a Provenance or patient-block statement) took
    // seconds, longer than running them.
    conn.batch_execute(
        "BEGIN ISOLATION LEVEL REPEATABLE READ;
         SET LOCAL jit = off;
         SET LOCAL client_min_messages = warning",
    )
    .await?;
    // Only when the statement reads them: a standby (read-only) cannot create them, and the
    // exports that need none read there.
    let tables = patients.group.is_some() || patients.ids.is_some() || !values.is_empty();
    if tables {
        conn.batch_execute(
            "CREATE TEMP TABLE fhirbox_export_patients (id text PRIMARY KEY) ON COMMIT DROP;
             CREATE TEMP TABLE fhirbox_export_values (key integer NOT NULL, code text, vars jsonb) ON COMMIT DROP",
        )
        .await?;
    }
    limits.apply(&*conn).await?;
    if let Some(mb) = sort_memory_mb {
        // A number fhirbox chose, not request text.
        conn.batch_execute(&format!("SET LOCAL work_mem = '{mb}MB'"))
            .await?;
    }
    if let Some(id) = patients.group {
        conn.execute(
            &format!(
                "INSERT INTO pg_temp.fhirbox_export_patients
                 SELECT DISTINCT p #>> '{{}}' FROM \"group\" g,
                        jsonb_path_query(g.resource, '{GROUP_MEMBERS}') AS p
                  WHERE g.id = $1 ON CONFLICT DO NOTHING"
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
    for (key, code, vars) in values {
        conn.execute(
            "INSERT INTO pg_temp.fhirbox_export_values (key, code, vars) VALUES ($1, $2, $3)",
            &[key, code, vars],
        )
        .await?;
    }
    if tables {
        conn.execute("ANALYZE pg_temp.fhirbox_export_patients", &[])
            .await?;
    }
    // (On an error above, dropping `conn` closes it with its transaction.) The COPY ends the
    // connection's use: it holds the transaction and its temporary tables.
    Ok(copy_out_on(conn, sql).await?.close_after())
}

/// A row of the values table: (key, code, jsonpath variables).
pub(super) type ValueRow = (i32, Option<String>, Option<Value>);

/// The COPY statement of a task, and the filter values it reads from the values table.
fn export_sql(query: &ExportQuery<'_>) -> Result<(String, Vec<ValueRow>), StoreError> {
    let mut values = Vec::new();
    let conditions = conditions(query, &mut values)?;
    let select = match query.versions {
        Versions::AtTime => at_time_sql(query.rt, &query.at, &conditions),
        Versions::Deleted => deleted_sql(query.rt, &query.at, query.since.as_ref(), &conditions),
        Versions::Every => every_version_sql(query.rt, &query.at, &conditions),
        Versions::EveryDeletion => every_deletion_sql(query.rt, &query.at, &conditions),
    };
    Ok((format!("COPY ({select}) TO STDOUT (FORMAT binary)"), values))
}

/// What a task's rows must meet besides their version: `_since`, `_until`, the patients,
/// the `_typeFilter`s (whose values go to `values`). On unqualified `id`, `ts`, `resource`.
pub(super) fn conditions(
    query: &ExportQuery<'_>,
    values: &mut Vec<ValueRow>,
) -> Result<String, StoreError> {
    let rt = query.rt;
    let mut conditions = vec!["true".to_string()];
    if let Some(since) = &query.since {
        conditions.push(format!("ts > {}", timestamp_literal(since)));
    }
    if let Some(until) = &query.until {
        conditions.push(format!("ts <= {}", timestamp_literal(until)));
    }
    if let Some(condition) = patient_condition(rt, &query.patients) {
        conditions.push(condition);
    }
    if !query.filters.is_empty() {
        let mut any = Vec::new();
        for filter in query.filters {
            let mut all = vec!["true".to_string()];
            for criterion in filter {
                all.push(criterion_sql(rt, criterion, values)?);
            }
            any.push(format!("({})", all.join(" AND ")));
        }
        conditions.push(format!("({})", any.join(" OR ")));
    }
    Ok(conditions.join(" AND "))
}

/// The resources of a type as they were at `at` (the IG's transactionTime), meeting
/// `conditions` (on unqualified `id`, `ts`, `resource`).
///
/// A current row written at or before `at` is that version. A resource changed after `at`
/// (its current row is newer, or it was deleted since) was, at `at`, its newest version in
/// the history table written at or before `at`, unless that is a deletion. Every CRUD write
/// and every `$load` with `update: true` keeps the replaced version in history; a `$load`
/// that replaces without history keeps it too while an export is running (see
/// `store::load`), so a version is missing only when it was replaced without history before
/// the export began and after its transactionTime, which cannot happen.
///
/// Finding the resources changed after `at` reads the table's `ts` a second time (there is no
/// index on it: loads would pay for one); the history side is an index lookup by id.
pub(super) fn at_time_sql(rt: ResourceType, at: &DateTime<Utc>, conditions: &str) -> String {
    let (table, history) = (rt.table(), rt.history_table());
    let at = timestamp_literal(at);
    format!(
        "SELECT id, txid, cts, ts, resource FROM {table} WHERE ts <= {at} AND {conditions}
         UNION ALL
         SELECT id, txid, cts, ts, resource FROM (
             SELECT DISTINCT ON (h.id) h.id, h.txid, h.cts, h.ts, h.status, h.resource
               FROM {history} h
              WHERE h.ts <= {at}
                AND h.id IN (SELECT id FROM {table} WHERE ts > {at}
                             UNION SELECT id FROM {history} WHERE ts > {at} AND status = 'deleted')
              ORDER BY h.id, h.txid DESC
         ) AS then_
          WHERE status <> 'deleted'
            AND NOT EXISTS (SELECT 1 FROM {table} c WHERE c.id = then_.id AND c.ts <= {at})
            AND {conditions}"
    )
}

/// Every version of the resources of a type written at or before `at` (the current rows and
/// the replaced ones the history keeps), deletions aside, each meeting `conditions` on its
/// own (`_since` and `_until` bound each version's time; a patient or filter condition is
/// met by what that version says).
fn every_version_sql(rt: ResourceType, at: &DateTime<Utc>, conditions: &str) -> String {
    let (table, history) = (rt.table(), rt.history_table());
    let at = timestamp_literal(at);
    format!(
        "SELECT id, txid, cts, ts, resource FROM {table} WHERE ts <= {at} AND {conditions}
         UNION ALL
         SELECT id, txid, cts, ts, resource FROM {history}
          WHERE ts <= {at} AND status <> 'deleted' AND {conditions}"
    )
}

/// Every deletion of a type at or before `at` meeting `conditions` (on the body the deletion
/// kept), each with its own version and time.
fn every_deletion_sql(rt: ResourceType, at: &DateTime<Utc>, conditions: &str) -> String {
    let history = rt.history_table();
    let at = timestamp_literal(at);
    format!(
        "SELECT id, txid, cts, ts, resource FROM {history}
          WHERE ts <= {at} AND status = 'deleted' AND {conditions}"
    )
}

/// The deletion versions of the resources deleted after `since` whose newest version at `at`
/// is that deletion (not re-created by then), meeting `conditions` (the patient and filter
/// conditions apply to the body the deletion kept).
fn deleted_sql(
    rt: ResourceType,
    at: &DateTime<Utc>,
    since: Option<&DateTime<Utc>>,
    conditions: &str,
) -> String {
    let (table, history) = (rt.table(), rt.history_table());
    let at = timestamp_literal(at);
    let after = since.map_or_else(
        || "true".to_string(),
        |s| format!("ts > {}", timestamp_literal(s)),
    );
    let deleted =
        format!("SELECT id FROM {history} WHERE status = 'deleted' AND {after} AND ts <= {at}");
    format!(
        "SELECT id, txid, cts, ts, resource FROM (
             SELECT DISTINCT ON (v.id) v.id, v.txid, v.cts, v.ts, v.status, v.resource FROM (
                 SELECT id, txid, cts, ts, status, resource FROM {history}
                  WHERE ts <= {at} AND id IN ({deleted})
                 UNION ALL
                 SELECT id, txid, cts, ts, status, resource FROM {table}
                  WHERE ts <= {at} AND id IN ({deleted})
             ) AS v
             ORDER BY v.id, v.txid DESC
         ) AS gone
          WHERE status = 'deleted' AND {conditions}"
    )
}

fn patient_condition(rt: ResourceType, patients: &Patients) -> Option<String> {
    let direct = compartment_condition(rt, patients)?;
    if rt.name() != "Provenance" {
        return Some(direct);
    }
    // The IG: a Patient or Group export includes the Provenance whose target is any exported
    // compartment resource, not only the Patient itself.
    let owners = super::export_blocks::provenance_patients("resource");
    Some(match patients {
        Patients::Listed => format!("({direct} OR {owners} ?| {LISTED})"),
        _ => format!("({direct} OR {owners} <> '[]'::jsonb)"),
    })
}

/// The export's listed patients, as a text array (for `?|`).
const LISTED: &str = "(SELECT coalesce(array_agg(id), '{}') FROM pg_temp.fhirbox_export_patients)";

/// Whether a resource of `rt` is in the compartment of the export's patients (`None`: no
/// condition, every one is).
fn compartment_condition(rt: ResourceType, patients: &Patients) -> Option<String> {
    let (listed, empty) = (LISTED, "'[]'::jsonb");
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
        Criterion::Search { name, .. } => {
            return Err(StoreError::Invalid(format!(
                "the _typeFilter criterion {name} was not compiled"
            )))
        }
        Criterion::Compiled(condition) => {
            let first = key;
            values.extend(
                condition
                    .binds
                    .iter()
                    .enumerate()
                    .map(|(i, bind)| (first + i as i32, Some(bind.clone()), None)),
            );
            // COPY takes no parameters: the values are rows of the values table.
            format!(
                "({})",
                condition.render(|i| format!(
                    "(SELECT code FROM pg_temp.fhirbox_export_values WHERE key = {})",
                    first + i as i32
                ))
            )
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
                values.push((key, None, Some(token.vars())));
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
        assert_eq!(compartment_paths("Device"), Some(&["patient"][..]));
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
            at: until,
            since: None,
            until: None,
            patients: Patients::Listed,
            filters: &filters,
            versions: Versions::AtTime,
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
