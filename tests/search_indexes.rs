//! Search indexes: made at start-up as `--search-indexes` says (`none`, the common set,
//! extra `Type.parameter` entries; those no longer configured dropped, and those of earlier
//! versions), and used: the condition search compiles for an indexed parameter (or one its
//! index serves) is answered by a scan of its index.
//! (That results stay exact with the indexes is `search.rs`'s oracle comparison, which runs
//! with the common set.)

mod common;

use std::sync::Arc;

use common::TestServer;
use fhirbox::search::index::{Indexes, COMMON_INDEXES};
use fhirbox::search::{Limits, Plan};
use reqwest::{Method, StatusCode};
use serde_json::json;

async fn index_names(server: &TestServer) -> Vec<String> {
    let db = server.db().await;
    let rows = db
        .query(
            "SELECT indexname FROM pg_indexes WHERE starts_with(indexname, 'fhirbox_si_') ORDER BY 1",
            &[],
        )
        .await
        .expect("indexes listed");
    rows.iter().map(|row| row.get(0)).collect()
}

/// The plan of `Type?query` as the server compiles it (with the common indexes), with
/// sequential scans priced out so that any index that can answer it does.
async fn plan_of(server: &TestServer, type_name: &str, query: &str) -> String {
    let rt = fhirbox::resource_type::ResourceType::parse(type_name).expect("a type");
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let indexes = std::sync::Arc::new(Indexes::parse("common").expect("the common set"));
    let plan = Plan::parse(
        rt,
        None,
        &params,
        true,
        "http://localhost/fhir",
        &Limits::default(),
        &indexes,
    )
    .expect("a plan");
    let condition = plan.filter.condition.expect("a condition");
    let sql = format!(
        "EXPLAIN SELECT r.id FROM {} AS r WHERE {}",
        rt.table(),
        condition.render(|i| format!("${}", i + 1))
    );
    let db = server.db().await;
    db.batch_execute("SET enable_seqscan = off")
        .await
        .expect("set");
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = condition
        .binds
        .iter()
        .map(|b| b as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let rows = db.query(&sql, &params).await.expect("explained");
    rows.iter()
        .map(|row| row.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn the_configured_indexes_exist_and_searches_use_them() {
    let database = common::fresh_database().await;
    // The harness's servers run with the common set (the server's default).
    let server = TestServer::start_custom(database.clone(), |_| {}).await;
    let names = index_names(&server).await;
    assert_eq!(names.len(), COMMON_INDEXES.len(), "{names:?}");
    for name in [
        "fhirbox_si_observation_code",
        "fhirbox_si_observation_subject",
        "fhirbox_si_patient_identifier",
    ] {
        assert!(names.contains(&name.to_string()), "{name}: {names:?}");
    }
    for (type_name, query, index) in [
        (
            "Observation",
            "code=http://loinc.org|8302-2",
            "fhirbox_si_observation_code",
        ),
        (
            "Observation",
            "code=8302-2,8480-6&status=final",
            "fhirbox_si_observation_code",
        ),
        (
            "Observation",
            "subject=Patient/p1",
            "fhirbox_si_observation_subject",
        ),
        // Served by subject's index: patient is subject where it is a Patient.
        (
            "Observation",
            "patient=p1",
            "fhirbox_si_observation_subject",
        ),
        (
            "Observation",
            "subject:Patient=p1,p2",
            "fhirbox_si_observation_subject",
        ),
        ("Patient", "family=smi", "fhirbox_si_patient_name"),
        ("Patient", "name:contains=mit", "fhirbox_si_patient_name"),
        ("Patient", "given:exact=Jon", "fhirbox_si_patient_name"),
        (
            "Patient",
            "birthdate=1970-01",
            "fhirbox_si_patient_birthdate",
        ),
        (
            "Patient",
            "birthdate=ge2001-02-03",
            "fhirbox_si_patient_birthdate",
        ),
        (
            "Patient",
            "birthdate=eb1970",
            "fhirbox_si_patient_birthdate",
        ),
        (
            "Patient",
            "identifier=urn:mrn|123",
            "fhirbox_si_patient_identifier",
        ),
    ] {
        let plan = plan_of(&server, type_name, query).await;
        assert!(
            plan.contains(index),
            "{type_name}?{query} does not use {index}:\n{plan}"
        );
    }
    // A negation, a system alone, a date `ne`: no index can say which rows, so the search
    // scans (and stays exact).
    for (type_name, query) in [
        ("Observation", "code:not=8302-2"),
        ("Observation", "code=http://loinc.org|"),
        ("Patient", "birthdate=ne1970"),
        ("Patient", "name=o\"brien"),
    ] {
        let plan = plan_of(&server, type_name, query).await;
        assert!(!plan.contains("fhirbox_si_"), "{type_name}?{query}: {plan}");
    }

    // Results through the index are the same as without: one quick check here.
    for (id, code) in [("o1", "8302-2"), ("o2", "8480-6")] {
        let body = json!({"resourceType": "Observation", "id": id, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "subject": {"reference": "Patient/p1"}});
        let (status, _) = server
            .json(Method::PUT, &format!("/fhir/Observation/{id}"), &body)
            .await;
        assert!(status.is_success());
    }
    let (status, bundle) = server
        .get("/fhir/Observation?code=http://loinc.org|8302-2&patient=p1")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        bundle["entry"].as_array().map(Vec::len),
        Some(1),
        "{bundle}"
    );

    // Another configuration on the same database: `none` drops them all (and what an
    // earlier version made: `fhirbox_sp_` indexes on `fhirbox_terms_` functions); an entry
    // adds one.
    let db = server.db().await;
    drop(server);
    db.batch_execute(
        "CREATE FUNCTION fhirbox_terms_observation_status(resource jsonb) RETURNS text[]
           LANGUAGE sql IMMUTABLE AS $$ SELECT ARRAY[resource ->> 'status'] $$;
         CREATE INDEX fhirbox_sp_observation_status ON observation
           USING gin (fhirbox_terms_observation_status(resource))",
    )
    .await
    .expect("a legacy index");
    let server = TestServer::start_custom(database.clone(), |settings| {
        settings.http.search_indexes =
            Arc::new(Indexes::parse("none,Encounter.class").expect("valid"));
    })
    .await;
    assert_eq!(index_names(&server).await, ["fhirbox_si_encounter_class"]);
    let legacy = db
        .query(
            "SELECT 1 FROM pg_class WHERE relname = 'fhirbox_sp_observation_status'
             UNION ALL SELECT 1 FROM pg_proc WHERE proname = 'fhirbox_terms_observation_status'",
            &[],
        )
        .await
        .expect("catalog read");
    assert!(legacy.is_empty(), "the legacy index and function are gone");
    let (_, bundle) = server.get("/fhir/Observation?code=8302-2").await;
    assert_eq!(
        bundle["entry"].as_array().map(Vec::len),
        Some(1),
        "no index, same answer"
    );

    // A function that computes something else than this version's (as after an upgrade that
    // changed it) gets its index built again at start-up.
    let encounter = json!({"resourceType": "Encounter", "id": "e1", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}});
    let (status, _) = server
        .json(Method::PUT, "/fhir/Encounter/e1", &encounter)
        .await;
    assert!(status.is_success());
    let source = "SELECT prosrc FROM pg_proc WHERE proname = 'fhirbox_si_encounter_class'";
    let wanted: String = db.query_one(source, &[]).await.expect("read").get(0);
    drop(server);
    db.batch_execute(
        "CREATE OR REPLACE FUNCTION fhirbox_si_encounter_class(resource jsonb) RETURNS jsonb
           LANGUAGE sql IMMUTABLE AS $$ SELECT '[]'::jsonb $$;
         REINDEX INDEX fhirbox_si_encounter_class;
         SET enable_seqscan = off",
    )
    .await
    .expect("an index built by another function");
    let through_index = "SELECT count(*) FROM encounter
        WHERE fhirbox_si_encounter_class(resource) @> '[{\"code\": \"AMB\"}]'";
    let found: i64 = db
        .query_one(through_index, &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(found, 0, "the stale index misses e1");
    let server = TestServer::start_custom(database, |settings| {
        settings.http.search_indexes = Arc::new(Indexes::parse("Encounter.class").expect("valid"));
    })
    .await;
    // A new session: an old one keeps the index's expression as it first read it.
    let db = server.db().await;
    let now: String = db.query_one(source, &[]).await.expect("read").get(0);
    assert_eq!(now, wanted);
    db.batch_execute("SET enable_seqscan = off")
        .await
        .expect("set");
    let plan: Vec<String> = db
        .query(&format!("EXPLAIN {through_index}"), &[])
        .await
        .expect("explain")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        plan.join("\n")
            .contains("Index Scan on fhirbox_si_encounter_class"),
        "{plan:?}"
    );
    let found: i64 = db
        .query_one(through_index, &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(found, 1, "the index was built again");
}

/// Autovacuum's ANALYZE (and, from PostgreSQL 17 on, every maintenance command) evaluates
/// index expressions with only `pg_catalog` on the search_path. The index functions that
/// call fhirbox's own (a name's folded text, a date's span) once failed there, on every
/// table that had one, every minute: statistics never refreshed, and a log full of errors.
#[tokio::test]
async fn indexed_tables_can_be_analyzed_as_autovacuum_does() {
    let server = TestServer::start().await;
    for resource in [
        json!({"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-02",
               "name": [{"family": "Ångström"}]}),
        json!({"resourceType": "Observation", "id": "o1", "status": "final",
               "code": {"coding": [{"code": "8302-2"}]}, "subject": {"reference": "Patient/p1"}}),
    ] {
        server.put_fhir(&resource).await;
    }
    let db = server.db().await;
    let tables: Vec<String> = db
        .query(
            "SELECT DISTINCT quote_ident(schemaname) || '.' || quote_ident(tablename)
               FROM pg_indexes WHERE starts_with(indexname, 'fhirbox_si_') ORDER BY 1",
            &[],
        )
        .await
        .expect("tables listed")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(tables.len() >= 8, "{tables:?}");
    db.batch_execute("SET search_path = pg_catalog, pg_temp")
        .await
        .expect("set");
    for table in &tables {
        db.batch_execute(&format!("ANALYZE {table}"))
            .await
            .unwrap_or_else(|e| panic!("ANALYZE {table}: {e:?}"));
    }
    // And a write under that search_path computes the index entries too.
    db.batch_execute(
        "UPDATE public.patient SET resource = resource || '{\"birthDate\": \"1971\"}'",
    )
    .await
    .expect("a write with only pg_catalog on the search_path");
}

#[test]
fn only_parameters_an_index_can_answer_are_indexed() {
    let error = Indexes::parse("common,Observation.value-quantity").expect_err("a quantity");
    assert!(
        error
            .to_string()
            .contains("indexes serve token, reference, string, date"),
        "{error}"
    );
}
