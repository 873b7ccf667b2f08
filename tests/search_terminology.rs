//! Token modifiers over stored terminology: `:in`/`:not-in` a stored ValueSet (its
//! expansion, or its compose: listed concepts, whole systems, `is-a`/`descendent-of`
//! filters, imports and excludes) and `:below`/`:above` a code in a stored CodeSystem's
//! hierarchy (nested concepts and `parent` properties). Expected sets are written out by
//! hand from the fixtures below, not from fhirbox's SQL. What cannot be answered exactly is
//! a 400 that says why; the search is authorized as a read of ValueSet/CodeSystem too (the
//! attack: a client allowed Observations only, learning which codes a ValueSet holds).

mod common;

use common::search::{ids_of, searcher_of};
use common::TestServer;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const CS: &str = "http://ex.org/cs";
const LOINC: &str = "http://loinc.org";

/// The hierarchy a > a1 > a11, a > a2, a > b (by a `parent` property), and c on its own.
fn code_system() -> Value {
    json!({"resourceType": "CodeSystem", "id": "cs", "url": CS, "status": "active",
           "content": "complete",
           "concept": [
               {"code": "a", "concept": [
                   {"code": "a1", "concept": [{"code": "a11"}]},
                   {"code": "a2"}]},
               {"code": "b", "property": [{"code": "parent", "valueCode": "a"}]},
               {"code": "c"}]})
}

fn value_set(id: &str, url: &str, body: Value) -> Value {
    let mut vs = json!({"resourceType": "ValueSet", "id": id, "url": url, "status": "active"});
    if let (Some(vs), Some(body)) = (vs.as_object_mut(), body.as_object()) {
        vs.extend(body.clone());
    }
    vs
}

fn value_sets() -> Vec<Value> {
    let include = |system: &str, codes: &[&str]| json!({"system": system, "concept": codes.iter().map(|c| json!({"code": c})).collect::<Vec<_>>()});
    let filter = |op: &str, value: &str| json!({"system": CS, "filter": [{"property": "concept", "op": op, "value": value}]});
    vec![
        value_set(
            "list",
            "http://ex.org/vs/list",
            json!({"compose": {"include": [include(CS, &["a1", "c"]), include(LOINC, &["8302-2"])]}}),
        ),
        value_set(
            "isa",
            "http://ex.org/vs/isa",
            json!({"compose": {"include": [filter("is-a", "a")]}}),
        ),
        value_set(
            "desc",
            "http://ex.org/vs/desc",
            json!({"compose": {"include": [filter("descendent-of", "a")]}}),
        ),
        value_set(
            "whole",
            "http://ex.org/vs/whole",
            json!({"compose": {"include": [{"system": "http://other.org"}]}}),
        ),
        // The expansion decides, not the compose.
        value_set(
            "expanded",
            "http://ex.org/vs/expanded",
            json!({"compose": {"include": [include(CS, &["a"])]},
                   "expansion": {"timestamp": "2026-01-01T00:00:00Z", "contains": [
                       {"system": CS, "code": "c"},
                       {"abstract": true, "display": "group", "contains": [{"system": CS, "code": "a11"}]}]}}),
        ),
        value_set(
            "imports",
            "http://ex.org/vs/imports",
            json!({"compose": {"include": [{"valueSet": ["http://ex.org/vs/list"]}],
                               "exclude": [include(CS, &["c"])]}}),
        ),
        value_set(
            "v1",
            "http://ex.org/vs/versioned",
            json!({"version": "1", "compose": {"include": [include(CS, &["a"])]}}),
        ),
        value_set(
            "v2",
            "http://ex.org/vs/versioned",
            json!({"version": "2", "compose": {"include": [include(CS, &["b"])]}}),
        ),
        value_set(
            "status",
            "http://ex.org/vs/status",
            json!({"compose": {"include": [include("http://hl7.org/fhir/observation-status", &["amended"])]}}),
        ),
        value_set(
            "regex",
            "http://ex.org/vs/regex",
            json!({"compose": {"include": [filter("regex", "a.*")]}}),
        ),
        value_set(
            "cycle",
            "http://ex.org/vs/cycle",
            json!({"compose": {"include": [{"valueSet": ["http://ex.org/vs/cycle"]}]}}),
        ),
    ]
}

/// Observations by the codes they carry; the `a` family refers to Patient p1, the rest to p2.
fn observations() -> Vec<Value> {
    let coding = |system: &str, code: &str| json!({"system": system, "code": code});
    let mut out = Vec::new();
    for (id, codings, status) in [
        ("o-a", vec![coding(CS, "a")], "final"),
        ("o-a1", vec![coding(CS, "a1")], "final"),
        ("o-a11", vec![coding(CS, "a11")], "final"),
        ("o-a2", vec![coding(CS, "a2")], "final"),
        ("o-b", vec![coding(CS, "b")], "final"),
        ("o-c", vec![coding(CS, "c")], "amended"),
        ("o-loinc", vec![coding(LOINC, "8302-2")], "final"),
        ("o-other", vec![coding("http://other.org", "zzz")], "final"),
        (
            "o-two",
            vec![coding(LOINC, "9999-9"), coding(CS, "c")],
            "final",
        ),
    ] {
        let patient = if id.starts_with("o-a") || id == "o-b" {
            "p1"
        } else {
            "p2"
        };
        out.push(
            json!({"resourceType": "Observation", "id": id, "status": status,
                        "code": {"coding": codings},
                        "subject": {"reference": format!("Patient/{patient}")}}),
        );
    }
    out
}

async fn put_all(server: &TestServer, resources: Vec<Value>) {
    for resource in resources {
        server.put_fhir(&resource).await;
    }
}

async fn terminology_world(server: &TestServer) {
    let patients = ["p1", "p2"]
        .iter()
        .map(|id| json!({"resourceType": "Patient", "id": id}))
        .collect();
    put_all(server, patients).await;
    put_all(server, vec![code_system()]).await;
    put_all(server, value_sets()).await;
    put_all(server, observations()).await;
}

#[tokio::test]
async fn codes_in_value_sets_and_hierarchies() {
    let server = TestServer::start().await;
    terminology_world(&server).await;
    for (query, expected) in [
        (
            "Observation?code:in=http://ex.org/vs/list",
            &["o-a1", "o-c", "o-loinc", "o-two"][..],
        ),
        (
            "Observation?code:in=ValueSet/list",
            &["o-a1", "o-c", "o-loinc", "o-two"],
        ),
        (
            "Observation?code:not-in=ValueSet/list",
            &["o-a", "o-a11", "o-a2", "o-b", "o-other"],
        ),
        (
            "Observation?code:in=ValueSet/isa",
            &["o-a", "o-a1", "o-a11", "o-a2", "o-b"],
        ),
        (
            "Observation?code:in=ValueSet/desc",
            &["o-a1", "o-a11", "o-a2", "o-b"],
        ),
        ("Observation?code:in=ValueSet/whole", &["o-other"]),
        (
            "Observation?code:in=ValueSet/expanded",
            &["o-a11", "o-c", "o-two"],
        ),
        ("Observation?code:in=ValueSet/imports", &["o-a1", "o-loinc"]),
        ("Observation?code:in=http://ex.org/vs/versioned|2", &["o-b"]),
        (
            "Observation?code:in=ValueSet/list,ValueSet/whole",
            &["o-a1", "o-c", "o-loinc", "o-other", "o-two"],
        ),
        (
            "Observation?code:in=ValueSet/list&code:in=ValueSet/isa",
            &["o-a1"],
        ),
        // A plain code (no system) matches a ValueSet's code of any system.
        ("Observation?status:in=ValueSet/status", &["o-c"]),
        (
            "Observation?code:below=http://ex.org/cs|a",
            &["o-a", "o-a1", "o-a11", "o-a2", "o-b"],
        ),
        (
            "Observation?code:below=http://ex.org/cs|a1",
            &["o-a1", "o-a11"],
        ),
        (
            "Observation?code:above=http://ex.org/cs|a11",
            &["o-a", "o-a1", "o-a11"],
        ),
        ("Observation?code:above=http://ex.org/cs|b", &["o-a", "o-b"]),
        // Through a reverse chain and a chain.
        (
            "Patient?_has:Observation:subject:code:in=ValueSet/desc",
            &["p1"],
        ),
        (
            "Patient?_has:Observation:subject:code:not-in=ValueSet/isa",
            &["p2"],
        ),
    ] {
        let (status, bundle) = server.get(&format!("/fhir/{query}")).await;
        assert_eq!(status, StatusCode::OK, "{query}: {bundle}");
        assert_eq!(ids_of(&bundle), expected, "{query}");
    }
}

#[tokio::test]
async fn what_cannot_be_answered_exactly_is_refused() {
    let server = TestServer::start().await;
    terminology_world(&server).await;
    let mut answers = Vec::new();
    for query in [
        "Observation?code:in=http://ex.org/vs/absent",
        "Observation?code:in=ValueSet/absent",
        "Observation?code:in=http://ex.org/vs/versioned",
        "Observation?code:in=ValueSet/regex",
        "Observation?code:in=ValueSet/cycle",
        "Observation?code:below=http://absent.org|a",
        "Observation?code:above=a",
        "Observation?code:in=|x",
    ] {
        let (status, outcome) = server.get(&format!("/fhir/{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {outcome}");
        answers.push(json!({"query": query, "outcome": outcome}));
    }
    insta::assert_snapshot!(common::pretty(&answers));

    // Not in an export's _typeFilter: the export's authorization does not look at ValueSet.
    let (status, outcome, _) = common::export::kick_off(
        &server,
        Method::GET,
        "/fhir/$export?_type=Observation&_typeFilter=Observation%3Fcode%3Ain%3DValueSet%2Flist",
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome:?}");
}

#[tokio::test]
async fn reading_a_value_set_through_a_search_is_authorized_as_reading_it() {
    let (server, get) = searcher_of("/fhir/Observation").await;
    terminology_world(&server).await;
    let (status, bundle) = server
        .send(get(&server, "/fhir/Observation?code=http://ex.org/cs|a"))
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    // The attack: probing which codes a ValueSet (or a hierarchy) holds, through the
    // Observations the client may search.
    for query in [
        "/fhir/Observation?code:in=ValueSet/list",
        "/fhir/Observation?code:below=http://ex.org/cs|a",
        "/fhir/Observation?_has:Observation:has-member:code:not-in=ValueSet/isa",
    ] {
        let (status, outcome) = server.send(get(&server, query)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{query}: {outcome}");
        // CodeSystem is asked first (it is read by all three).
        assert!(
            common::diagnostics(&outcome).contains("the search reads CodeSystem too"),
            "{query}: {outcome}"
        );
    }
}
