//! FHIR search against an independent oracle: `tests/search_oracle/oracle.py` evaluates each
//! SearchParameter's expression with fhirpathpy (a FHIRPath engine nobody here wrote, with its
//! R4 model) on every resource of the Synthea data and applies the spec's matching rules in
//! its own code; fhirbox answers the same queries from PostgreSQL. The sets must be equal.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::search::{chain_world, ids_of, searcher_of};
use common::TestServer;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const DATASET: &str = "smart-bulk-data-server-100";

/// What the oracle says a query finds.
#[derive(Debug, PartialEq)]
struct Expected {
    ids: BTreeSet<String>,
    /// The ids in order, for a query with `_sort`.
    ordered: Option<Vec<String>>,
    /// `Type/id` of what `_include`/`_revinclude` add, for a query with them.
    included: Option<BTreeSet<String>>,
}

/// The oracle's answers: (feature, `Type?query`, what it finds or why it declined).
fn oracle() -> Vec<(String, String, Result<Expected, String>)> {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new(format!("{root}/scripts/ensure-fhirpathpy"))
        .output()
        .expect("run scripts/ensure-fhirpathpy");
    assert!(
        output.status.success(),
        "scripts/ensure-fhirpathpy failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let python = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let queries = format!("{root}/tests/search_oracle/queries.tsv");
    let output = Command::new(python)
        .arg(format!("{root}/tests/search_oracle/oracle.py"))
        .args(["--data", &format!("{root}/testdata/{DATASET}")])
        .args([
            "--params",
            &format!("{root}/fhir-r4/search-parameters.pristine-4.0.1.json.gz"),
        ])
        .args(["--queries", &queries])
        .output()
        .expect("run the oracle");
    assert!(
        output.status.success(),
        "the oracle failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let features: Vec<(String, String)> = std::fs::read_to_string(&queries)
        .expect("queries")
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (feature, query) = line.split_once('\t').expect("feature<TAB>query");
            (feature.to_string(), query.trim().to_string())
        })
        .collect();
    let answers: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("an oracle line"))
        .collect();
    assert_eq!(answers.len(), features.len(), "one answer per query");
    features
        .into_iter()
        .zip(answers)
        .map(|((feature, query), answer)| {
            assert_eq!(answer["query"], json!(query));
            let strings = |field: &str| {
                answer[field].as_array().map(|items| {
                    items
                        .iter()
                        .map(|id| id.as_str().expect("a string").to_string())
                        .collect::<Vec<_>>()
                })
            };
            let result = match strings("ids") {
                Some(ids) => Ok(Expected {
                    ids: ids.into_iter().collect(),
                    ordered: strings("ordered"),
                    included: strings("included").map(|i| i.into_iter().collect()),
                }),
                None => Err(answer["error"].as_str().unwrap_or("?").to_string()),
            };
            (feature, query, result)
        })
        .collect()
}

/// What fhirbox finds for `Type?query`, following `next` links (pages of 1000, or of 100 for
/// a sorted query, so that its order is checked across pages); or the refusal.
async fn search(server: &TestServer, query: &str) -> Result<Expected, (StatusCode, Value)> {
    let separator = if query.contains('?') { "&" } else { "?" };
    let base = server.url("");
    let count = if query.contains("_sort=") { 100 } else { 1000 };
    let mut path = format!("/fhir/{query}{separator}_count={count}");
    let mut ordered = Vec::new();
    let mut included = BTreeSet::new();
    loop {
        let (status, bundle) = server.get(&path).await;
        if status != StatusCode::OK {
            return Err((status, bundle));
        }
        for entry in bundle["entry"].as_array().into_iter().flatten() {
            let resource = &entry["resource"];
            let id = resource["id"].as_str().unwrap_or_default().to_string();
            match entry["search"]["mode"].as_str() {
                Some("match") => ordered.push(id),
                Some("include") => {
                    included.insert(format!(
                        "{}/{id}",
                        resource["resourceType"].as_str().unwrap_or("?")
                    ));
                }
                mode => {
                    return Err((
                        StatusCode::OK,
                        json!({"unexpected entry": mode, "bundle": bundle}),
                    ))
                }
            }
        }
        let next = bundle["link"]
            .as_array()
            .and_then(|links| links.iter().find(|l| l["relation"] == "next"))
            .and_then(|l| l["url"].as_str());
        match next {
            Some(next) => path = next.strip_prefix(&base).expect("a link here").to_string(),
            None => break,
        }
    }
    let type_name = query.split('?').next().unwrap_or_default();
    for id in &ordered {
        included.remove(&format!("{type_name}/{id}"));
    }
    Ok(Expected {
        ids: ordered.iter().cloned().collect(),
        ordered: query.contains("_sort=").then_some(ordered),
        included: (query.contains("_include") || query.contains("_revinclude")).then_some(included),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn every_query_finds_what_the_oracle_finds() {
    // The oracle (15 s of Python on one core) runs while the server loads the data.
    let oracle = tokio::task::spawn_blocking(oracle);
    let server = TestServer::start().await;
    common::load_testdata(&server, DATASET).await;
    let answers = oracle.await.expect("the oracle's thread");
    let (mut compared, mut mismatches) = (0, Vec::new());
    let mut exports = Vec::new();
    let asked: Vec<_> = answers
        .iter()
        .filter_map(|(feature, query, expected)| Some((feature, query, expected.as_ref().ok()?)))
        .collect();
    let declined = answers.len() - asked.len();
    // Four searches at a time: the server's work overlaps the reading of large pages.
    for batch in asked.chunks(4) {
        let found = futures_util::future::join_all(
            batch.iter().map(|(_, query, _)| search(&server, query)),
        )
        .await;
        for ((feature, query, expected), found) in batch.iter().zip(found) {
            match found {
                Ok(found) if &found == *expected => {
                    compared += 1;
                    // `_typeFilter` takes filters only (the IG refuses result parameters in it).
                    if !query.contains("_sort") && !query.contains("include") {
                        exports.push((query, found.ids));
                    }
                }
                Ok(found) if found.ids != expected.ids => mismatches.push(format!(
                    "{feature}\t{query}: fhirbox {} (only fhirbox: {:?}), oracle {} (only oracle: {:?})",
                    found.ids.len(),
                    found.ids.difference(&expected.ids).take(5).collect::<Vec<_>>(),
                    expected.ids.len(),
                    expected.ids.difference(&found.ids).take(5).collect::<Vec<_>>(),
                )),
                Ok(found) => mismatches.push(format!(
                    "{feature}\t{query}: same matches; fhirbox's order {:?} included {:?}, \
                     the oracle's order {:?} included {:?}",
                    found.ordered, found.included, expected.ordered, expected.included
                )),
                Err((status, outcome)) => {
                    mismatches.push(format!("{feature}\t{query}: {status} {outcome}"))
                }
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} queries differ from the oracle:\n{}",
        mismatches.len(),
        answers.len(),
        mismatches.join("\n")
    );
    // `$export`'s `_typeFilter` applies the same compiler: every filter exports exactly what
    // the search found (eight exports at a time, the harness's jobs per subject).
    for batch in exports.chunks(8) {
        let runs = batch.iter().map(|(query, found)| {
            let server = &server;
            async move {
                let type_name = query.split('?').next().expect("Type?query");
                let filter: String = form_urlencoded::byte_serialize(query.as_bytes()).collect();
                let path = format!("/fhir/$export?_type={type_name}&_typeFilter={filter}");
                let exported = common::export::exported_ids(server, &path).await;
                let exported = exported.get(type_name).cloned().unwrap_or_default();
                (exported != *found).then(|| {
                    format!(
                        "_typeFilter={query}: exported {}, search found {}",
                        exported.len(),
                        found.len()
                    )
                })
            }
        });
        mismatches.extend(
            futures_util::future::join_all(runs)
                .await
                .into_iter()
                .flatten(),
        );
    }
    assert!(
        mismatches.is_empty(),
        "exports differ from searches:\n{}",
        mismatches.join("\n")
    );
    assert!(
        compared >= answers.len() * 3 / 4,
        "only {compared} of {} queries compared ({declined} declined by the oracle)",
        answers.len()
    );
}

#[tokio::test]
async fn a_stored_date_that_is_no_date_matches_nothing_and_breaks_nothing() {
    let server = TestServer::start().await;
    for (id, born) in [("a", "1970-05-01"), ("z", "1971-01-01")] {
        let patient = json!({"resourceType": "Patient", "id": id, "birthDate": born});
        let (status, body) = server
            .json(Method::PUT, &format!("/fhir/Patient/{id}"), &patient)
            .await;
        assert!(status.is_success(), "{body}");
    }
    // Written by other means than the API (SQL, a load of another server's data): a year
    // 0 made PostgreSQL's make_date raise, and every date search over the type with it.
    for bad in ["0000", "1971-02-30", "soon"] {
        server
            .db()
            .await
            .execute(
                "UPDATE patient SET resource = jsonb_set(resource, '{birthDate}', to_jsonb($1::text))
                  WHERE id = 'z'",
                &[&bad],
            )
            .await
            .expect("update");
        for (query, expected) in [
            ("birthdate=ge1900", vec!["a"]),
            ("birthdate:missing=false&_sort=birthdate", vec!["a", "z"]),
        ] {
            let (status, bundle) = server.get(&format!("/fhir/Patient?{query}")).await;
            assert_eq!(status, StatusCode::OK, "{bad}: {query}: {bundle}");
            assert_eq!(ids_of(&bundle), expected, "{bad}: {query}");
        }
    }
}

#[tokio::test]
async fn search_values_are_bound_never_pasted() {
    let server = TestServer::start().await;
    server
        .json(
            Method::PUT,
            "/fhir/Patient/quote",
            &json!({"resourceType": "Patient", "id": "quote", "name": [{"family": "O'Brien"}]}),
        )
        .await;
    for (query, hits) in [
        ("family=O'Brien", 1),
        ("family=o%27b", 1),
        ("family=x') OR true --", 0),
        ("family:exact=O'Brien", 1),
        ("identifier=a|b') OR ('1'='1", 0),
        ("birthdate=ge2000-01-01' OR '1'='1", usize::MAX),
    ] {
        let (status, bundle) = server.get(&format!("/fhir/Patient?{query}")).await;
        if hits == usize::MAX {
            assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {bundle}");
            continue;
        }
        assert_eq!(status, StatusCode::OK, "{query}: {bundle}");
        let found = bundle["entry"].as_array().map_or(0, Vec::len);
        assert_eq!(found, hits, "{query}");
    }
}

#[tokio::test]
async fn absolute_references_match_only_when_they_name_this_server() {
    let server = TestServer::start().await;
    for (path, body) in [
        (
            "/fhir/Patient/p1",
            json!({"resourceType": "Patient", "id": "p1"}),
        ),
        (
            "/fhir/Observation/o1",
            json!({"resourceType": "Observation", "id": "o1", "status": "final",
                   "code": {"text": "x"}, "subject": {"reference": "Patient/p1"}}),
        ),
    ] {
        let (status, outcome) = server.json(Method::PUT, path, &body).await;
        assert!(status.is_success(), "{outcome}");
    }
    let ours = server.url("/fhir/Patient/p1");
    for (value, hits) in [
        ("Patient/p1", 1),
        ("p1", 1),
        (ours.as_str(), 1),
        ("Patient/p1/_history/1", 1),
        ("http://other.example/fhir/Patient/p1", 0),
        ("Group/p1", 0),
    ] {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("subject", value)
            .finish();
        let (status, bundle) = server.get(&format!("/fhir/Observation?{query}")).await;
        assert_eq!(status, StatusCode::OK, "{value}: {bundle}");
        assert_eq!(
            bundle["entry"].as_array().map_or(0, Vec::len),
            hits,
            "{value}"
        );
    }
}

#[tokio::test]
async fn totals_count_every_match_whatever_the_page() {
    let server = TestServer::start().await;
    for (id, gender) in [
        ("a", "male"),
        ("b", "female"),
        ("c", "male"),
        ("d", "male"),
        ("e", "other"),
    ] {
        let body = json!({"resourceType": "Patient", "id": id, "gender": gender});
        let (status, outcome) = server
            .json(Method::PUT, &format!("/fhir/Patient/{id}"), &body)
            .await;
        assert!(status.is_success(), "{outcome}");
    }
    let (status, first) = server
        .get("/fhir/Patient?gender=male&_count=2&_total=accurate")
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["total"], 3);
    assert_eq!(first["entry"].as_array().map_or(0, Vec::len), 2);
    let next = first["link"]
        .as_array()
        .and_then(|links| links.iter().find(|l| l["relation"] == "next"))
        .and_then(|l| l["url"].as_str())
        .expect("a next link");
    let (_, second) = server
        .get(next.strip_prefix(&server.url("")).expect("ours"))
        .await;
    assert_eq!(second["total"], 3, "the next page keeps _total");
    assert_eq!(second["entry"].as_array().map_or(0, Vec::len), 1);

    let (_, count) = server
        .get("/fhir/Patient?gender:not=male&_summary=count")
        .await;
    assert_eq!(count["total"], 2);
    assert!(count.get("entry").is_none(), "{count}");
    let (_, none) = server.get("/fhir/Patient?_total=none").await;
    assert!(none.get("total").is_none(), "{none}");

    for (query, code) in [
        ("_total=lots", "invalid"),
        ("_summary=sometimes", "invalid"),
        ("_elements=name&_summary=true", "invalid"),
    ] {
        let (status, outcome) = server.get(&format!("/fhir/Patient?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(outcome["issue"][0]["code"], code, "{outcome}");
    }
}

#[tokio::test]
async fn chains_follow_references_to_the_resources_they_name() {
    let server = TestServer::start().await;
    chain_world(&server).await;
    for (query, expected) in [
        ("Observation?subject:Patient.name=smith", vec!["o1", "o4"]),
        ("Observation?subject:Patient._id=p1", vec!["o1", "o4"]),
        (
            "Observation?subject:Patient.family=sm",
            vec!["o1", "o2", "o4"],
        ),
        (
            "Observation?subject:Patient.name=smith,jones",
            vec!["o1", "o3", "o4"],
        ),
        ("Patient?organization.name=acme", vec!["p1", "p3"]),
        (
            "Observation?subject:Patient.organization.name=acme",
            vec!["o1", "o3", "o4"],
        ),
        (
            "Observation?subject:Patient.organization.name=nobody",
            vec![],
        ),
        (
            "Observation?subject:Patient.name=smith&subject:Patient.organization.name=acme",
            vec!["o1", "o4"],
        ),
    ] {
        let (status, bundle) = server.get(&format!("/fhir/{query}")).await;
        assert_eq!(status, StatusCode::OK, "{query}: {bundle}");
        assert_eq!(ids_of(&bundle), expected, "{query}");
    }
    for (query, says) in [
        ("Observation?subject.name=smith", "name the type"),
        (
            "Observation?subject:Patient.shoe=1",
            "no search parameter 'shoe'",
        ),
        ("Observation?code.name=x", "only references chain"),
        (
            "Observation?subject:Practitioner.name=x",
            "cannot refer to a Practitioner",
        ),
    ] {
        let (status, outcome) = server.get(&format!("/fhir/{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {outcome}");
        assert!(
            outcome["issue"][0]["diagnostics"]
                .as_str()
                .unwrap_or_default()
                .contains(says),
            "{query}: {outcome}"
        );
    }
    // Not in a _typeFilter: an export's authorization does not look at the chained type.
    let (status, _, _) = common::export::kick_off(
        &server,
        Method::GET,
        "/fhir/$export?_type=Observation&_typeFilter=Observation%3Fsubject%3APatient.name%3Dsmith",
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn identifiers_match_by_their_type_and_references_by_their_identifier() {
    let server = TestServer::start().await;
    let mr = json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]});
    for (id, identifier) in [
        ("a", json!({"system": "urn:mrn", "value": "9", "type": mr})),
        ("b", json!({"system": "urn:mrn", "value": "9"})),
        ("c", json!({"value": "9", "type": mr})),
    ] {
        let patient = json!({"resourceType": "Patient", "id": id, "identifier": [identifier]});
        let (status, body) = server
            .json(Method::PUT, &format!("/fhir/Patient/{id}"), &patient)
            .await;
        assert!(status.is_success(), "{body}");
    }
    for (id, subject) in [
        (
            "x",
            json!({"identifier": {"system": "urn:mrn", "value": "9"}}),
        ),
        (
            "y",
            json!({"identifier": {"value": "9"}, "display": "someone"}),
        ),
        ("z", json!({"reference": "Patient/a"})),
    ] {
        let observation = json!({"resourceType": "Observation", "id": id, "status": "final",
            "code": {"text": "x"}, "subject": subject});
        let (status, body) = server
            .json(
                Method::PUT,
                &format!("/fhir/Observation/{id}"),
                &observation,
            )
            .await;
        assert!(status.is_success(), "{body}");
    }
    let v2 = "http://terminology.hl7.org/CodeSystem/v2-0203";
    for (query, expected) in [
        (
            format!("Patient?identifier:of-type={v2}|MR|9"),
            vec!["a", "c"],
        ),
        (format!("Patient?identifier:of-type={v2}|SS|9"), vec![]),
        (
            format!("Patient?identifier:of-type={v2}|MR|8,{v2}|MR|9"),
            vec!["a", "c"],
        ),
        ("Observation?subject:identifier=urn:mrn|9".into(), vec!["x"]),
        ("Observation?subject:identifier=9".into(), vec!["x", "y"]),
        ("Observation?subject:identifier=|9".into(), vec!["y"]),
        ("Observation?subject:identifier=urn:mrn|".into(), vec!["x"]),
        ("Observation?subject:identifier=urn:other|9".into(), vec![]),
    ] {
        let (status, bundle) = server.get(&format!("/fhir/{query}")).await;
        assert_eq!(status, StatusCode::OK, "{query}: {bundle}");
        assert_eq!(ids_of(&bundle), expected, "{query}");
    }
    for query in [
        "Patient?identifier:of-type=MR|9",
        "Patient?identifier:of-type=|MR|9",
    ] {
        let (status, outcome) = server.get(&format!("/fhir/{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {outcome}");
    }
}

#[tokio::test]
async fn a_list_names_the_resources_it_holds() {
    let server = TestServer::start().await;
    chain_world(&server).await;
    let list = json!({"resourceType": "List", "id": "l1", "status": "current", "mode": "working",
        "entry": [
            {"item": {"reference": "Observation/o1"}},
            {"item": {"reference": "Observation/o3"}, "deleted": true},
            {"item": {"reference": "Patient/p2"}},
            {"item": {"reference": "Observation/o4"}}]});
    let (status, body) = server.json(Method::PUT, "/fhir/List/l1", &list).await;
    assert!(status.is_success(), "{body}");
    for (query, expected) in [
        ("Observation?_list=l1", vec!["o1", "o4"]),
        ("Observation?_list=l1&status=final", vec!["o1", "o4"]),
        ("Patient?_list=l1", vec!["p2"]),
        ("Observation?_list=nothing,l1", vec!["o1", "o4"]),
        ("Observation?_list=nothing", vec![]),
    ] {
        let (status, bundle) = server.get(&format!("/fhir/{query}")).await;
        assert_eq!(status, StatusCode::OK, "{query}: {bundle}");
        assert_eq!(ids_of(&bundle), expected, "{query}");
    }
    let (status, outcome) = server
        .get("/fhir/Observation?_list=$current-allergies")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
    // Not in a _typeFilter: an export's authorization does not look at the List.
    let (status, _, _) = common::export::kick_off(
        &server,
        Method::GET,
        "/fhir/$export?_type=Observation&_typeFilter=Observation%3F_list%3Dl1",
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_chain_cannot_read_a_type_its_client_may_not_search() {
    let (server, get) = searcher_of("/fhir/Observation").await;
    let (status, bundle) = server
        .send(get(&server, "/fhir/Observation?code:text=x"))
        .await;
    assert_eq!(status, StatusCode::OK, "its own type: {bundle}");
    assert_eq!(ids_of(&bundle).len(), 4);
    let (status, _) = server.send(get(&server, "/fhir/Patient?name=smith")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "Patients directly");
    // The attack: learn which patients are called Smith through their Observations.
    for query in [
        "/fhir/Observation?subject:Patient.name=smith",
        "/fhir/Observation?subject:Patient.organization.name=acme",
        // Which observations some List holds: it reads the List.
        "/fhir/Observation?_list=l1",
    ] {
        let (status, outcome) = server.send(get(&server, query)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{query}: {outcome}");
        assert!(
            outcome["issue"][0]["diagnostics"]
                .as_str()
                .unwrap_or_default()
                .contains("the search reads"),
            "{outcome}"
        );
    }
}

#[tokio::test]
async fn reverse_chains_find_what_is_referred_to() {
    let server = TestServer::start().await;
    chain_world(&server).await;
    for (query, expected) in [
        (
            "Patient?_has:Observation:subject:status=amended",
            vec!["p2"],
        ),
        (
            "Patient?_has:Observation:subject:status=final",
            vec!["p1", "p3"],
        ),
        (
            "Patient?_has:Observation:patient:status=final,amended",
            vec!["p1", "p2", "p3"],
        ),
        (
            "Organization?_has:Patient:organization:name=jones",
            vec!["acme"],
        ),
        (
            "Organization?_has:Patient:organization:_has:Observation:subject:status=amended",
            vec!["other"],
        ),
        ("Patient?_has:Observation:subject:status=cancelled", vec![]),
        // `_id` inside a reverse chain is the other resource's id, not this one's (it was
        // this one's until the bench found a `_has:Encounter:patient:_id=...` with no match).
        (
            "Patient?_has:Observation:subject:_id=o2,o3",
            vec!["p2", "p3"],
        ),
        ("Patient?_has:Observation:subject:_id=p1", vec![]),
    ] {
        let (status, bundle) = server.get(&format!("/fhir/{query}")).await;
        assert_eq!(status, StatusCode::OK, "{query}: {bundle}");
        assert_eq!(ids_of(&bundle), expected, "{query}");
    }
    for (query, says) in [
        (
            "Patient?_has:Observation:status=final",
            "write _has:Type:reference:parameter",
        ),
        (
            "Patient?_has:Observation:code:status=final",
            "no reference parameter 'code'",
        ),
        (
            "Patient?_has:Observation:encounter:status=final",
            "never refers to a Patient",
        ),
    ] {
        let (status, outcome) = server.get(&format!("/fhir/{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {outcome}");
        assert!(
            outcome["issue"][0]["diagnostics"]
                .as_str()
                .unwrap_or_default()
                .contains(says),
            "{query}: {outcome}"
        );
    }
}

#[tokio::test]
async fn a_reverse_chain_cannot_read_a_type_its_client_may_not_search() {
    let (server, get) = searcher_of("/fhir/Patient").await;
    let (status, bundle) = server.send(get(&server, "/fhir/Patient?name=smith")).await;
    assert_eq!(status, StatusCode::OK, "its own type: {bundle}");
    // The attack: learn which patients have an amended Observation.
    let (status, outcome) = server
        .send(get(
            &server,
            "/fhir/Patient?_has:Observation:subject:status=amended",
        ))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{outcome}");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or_default()
            .contains("the search reads Observation too"),
        "{outcome}"
    );
}

#[tokio::test]
async fn elements_keep_what_is_listed_and_say_so() {
    let server = TestServer::start().await;
    for id in ["a", "b"] {
        let body = json!({"resourceType": "Patient", "id": id, "gender": "male",
                          "birthDate": "1970-01-01", "name": [{"family": "Smith"}]});
        let (status, outcome) = server
            .json(Method::PUT, &format!("/fhir/Patient/{id}"), &body)
            .await;
        assert!(status.is_success(), "{outcome}");
    }
    let (status, bundle) = server
        .get("/fhir/Patient?_elements=name,Patient.gender&_count=1")
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    let resource = &bundle["entry"][0]["resource"];
    let mut keys: Vec<&str> = resource
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["gender", "id", "meta", "name", "resourceType"],
        "{resource}"
    );
    assert!(
        resource["meta"]["tag"].to_string().contains("SUBSETTED"),
        "{resource}"
    );
    let next = bundle["link"]
        .as_array()
        .and_then(|links| links.iter().find(|l| l["relation"] == "next"))
        .and_then(|l| l["url"].as_str())
        .expect("a next link");
    assert!(next.contains("_elements="), "{next}");
    let (status, outcome) = server.get("/fhir/Patient?_elements=Name!").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
}
