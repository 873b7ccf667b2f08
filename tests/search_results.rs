//! What a search answers besides its matches, and the other ways to ask for one: `_sort`
//! paging under writes, `_include`/`_revinclude`, `_summary`, `POST _search` and compartment
//! search, each way in authorized as the search it stands for (with the attack that would
//! read another type through it). The oracle comparison of `_sort` and `_include` results
//! is in `search.rs`.

mod common;

use common::search::{chain_world, ids_of, next_path, searcher_of};
use common::TestServer;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// `(mode, Type/id)` of every entry, in order.
fn entries(bundle: &Value) -> Vec<(String, String)> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let r = &e["resource"];
            (
                e["search"]["mode"].as_str().unwrap_or("?").to_string(),
                format!(
                    "{}/{}",
                    r["resourceType"].as_str().unwrap_or("?"),
                    r["id"].as_str().unwrap_or("")
                ),
            )
        })
        .collect()
}

async fn put_patient(server: &TestServer, id: &str, family: &str) {
    let patient = json!({"resourceType": "Patient", "id": id, "name": [{"family": family}]});
    let (status, body) = server
        .json(Method::PUT, &format!("/fhir/Patient/{id}"), &patient)
        .await;
    assert!(status.is_success(), "{body}");
}

#[tokio::test]
async fn sorted_pages_neither_repeat_nor_skip_while_others_write() {
    let server = TestServer::start().await;
    chain_world(&server).await;
    let (status, first) = server.get("/fhir/Patient?_sort=-family&_count=1").await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let mut seen = ids_of(&first);
    // One that sorts before the page already read, one after it.
    put_patient(&server, "p0", "Zed").await;
    put_patient(&server, "p9", "Aaron").await;
    let mut path = next_path(&server, &first);
    while let Some(next) = path {
        let (status, page) = server.get(&next).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(ids_of(&page));
        path = next_path(&server, &page);
    }
    assert_eq!(
        seen,
        ["p2", "p1", "p3", "p9"],
        "Smythe, Smith, Jones, Aaron"
    );

    let (status, outcome) = server
        .get("/fhir/Patient?_sort=family&_cursor=bm90LWEtY3Vyc29y")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
    assert_eq!(outcome["issue"][0]["expression"][0], "_cursor");
}

#[tokio::test]
async fn includes_bring_what_the_matches_refer_to_and_what_refers_to_them() {
    let server = TestServer::start().await;
    chain_world(&server).await;
    let (_, bundle) = server
        .get("/fhir/Observation?_id=o1,o2&_include=Observation:subject&_include:iterate=Patient:organization")
        .await;
    let mut found = entries(&bundle);
    found.sort();
    let expected = [
        ("include", "Organization/acme"),
        ("include", "Organization/other"),
        ("include", "Patient/p1"),
        ("include", "Patient/p2"),
        ("match", "Observation/o1"),
        ("match", "Observation/o2"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(m, r)| (m.to_string(), r.to_string()))
        .collect();
    assert_eq!(found, expected, "{bundle}");

    let (_, bundle) = server
        .get("/fhir/Patient?_id=p1&_revinclude=Observation:subject")
        .await;
    let mut found = entries(&bundle);
    found.sort();
    assert_eq!(
        found,
        [
            ("include".to_string(), "Observation/o1".to_string()),
            ("include".to_string(), "Observation/o4".to_string()),
            ("match".to_string(), "Patient/p1".to_string()),
        ],
        "{bundle}"
    );
    let (status, outcome) = server
        .get("/fhir/Observation?_include=Observation:code")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .is_some_and(|d| d.contains("only references")),
        "{outcome}"
    );
}

/// The attack: read Patients through an `_include` (or Observations through a
/// `_revinclude`) of a type the client may search.
#[tokio::test]
async fn includes_leave_out_the_types_the_client_may_not_search() {
    let (server, get) = searcher_of("/fhir/Observation").await;
    let (status, bundle) = server
        .send(get(
            &server,
            "/fhir/Observation?_include=Observation:subject",
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    let found = entries(&bundle);
    assert!(
        found
            .iter()
            .all(|(_, r)| r.starts_with("Observation/") || r.starts_with("OperationOutcome/")),
        "no Patient may be included: {bundle}"
    );
    let note = bundle["entry"]
        .as_array()
        .and_then(|e| e.last())
        .map(|e| e["resource"]["issue"][0]["diagnostics"].to_string())
        .unwrap_or_default();
    assert!(
        note.contains("Patient resources were not included"),
        "{bundle}"
    );

    let (server, get) = searcher_of("/fhir/Patient").await;
    let (status, bundle) = server
        .send(get(
            &server,
            "/fhir/Patient?_revinclude=Observation:subject",
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert!(
        entries(&bundle)
            .iter()
            .all(|(_, r)| !r.starts_with("Observation/")),
        "no Observation may be included: {bundle}"
    );
}

#[tokio::test]
async fn summary_keeps_the_summary_elements_the_text_or_all_but_the_text() {
    let server = TestServer::start().await;
    let patient = json!({"resourceType": "Patient", "id": "s1", "active": true,
        "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">S</div>"},
        "name": [{"family": "Summers"}], "maritalStatus": {"text": "single"}});
    let (status, body) = server.json(Method::PUT, "/fhir/Patient/s1", &patient).await;
    assert!(status.is_success(), "{body}");
    let keys = |bundle: &Value| {
        let mut keys: Vec<String> = bundle["entry"][0]["resource"]
            .as_object()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        keys
    };
    let subsetted = |bundle: &Value| {
        bundle["entry"][0]["resource"]["meta"]["tag"]
            .to_string()
            .contains("SUBSETTED")
    };
    let (_, bundle) = server.get("/fhir/Patient?_summary=true").await;
    assert_eq!(
        keys(&bundle),
        ["active", "id", "meta", "name", "resourceType"],
        "{bundle}"
    );
    assert!(subsetted(&bundle));
    let (_, bundle) = server.get("/fhir/Patient?_summary=text").await;
    assert_eq!(
        keys(&bundle),
        ["id", "meta", "resourceType", "text"],
        "{bundle}"
    );
    let (_, bundle) = server.get("/fhir/Patient?_summary=data").await;
    assert_eq!(
        keys(&bundle),
        [
            "active",
            "id",
            "maritalStatus",
            "meta",
            "name",
            "resourceType"
        ],
        "{bundle}"
    );
    assert!(subsetted(&bundle));
    let (_, bundle) = server.get("/fhir/Patient?_summary=false").await;
    assert!(keys(&bundle).contains(&"text".to_string()) && !subsetted(&bundle));
}

#[tokio::test]
async fn post_search_and_compartment_search_answer_as_the_search_they_mean() {
    let server = TestServer::start().await;
    chain_world(&server).await;
    let (_, by_get) = server
        .get("/fhir/Observation?subject=Patient/p1&status=final")
        .await;
    let (status, by_post) = server
        .send(
            server
                .request(Method::POST, "/fhir/Observation/_search?status=final")
                .header("content-type", "application/x-www-form-urlencoded")
                .body("subject=Patient%2Fp1"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{by_post}");
    assert_eq!(ids_of(&by_post), ids_of(&by_get));
    assert_eq!(ids_of(&by_post), ["o1", "o4"]);

    let (status, _) = server
        .send(
            server
                .request(Method::POST, "/fhir/Observation/_search")
                .header("content-type", "application/json")
                .body("{}"),
        )
        .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    for path in ["/fhir/Patient/p1/Observation", "/Patient/p1/Observation"] {
        let (status, bundle) = server.get(path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {bundle}");
        assert_eq!(ids_of(&bundle), ["o1", "o4"], "{path}");
    }
    let (_, bundle) = server
        .get("/fhir/Patient/p1/Observation?status=amended")
        .await;
    assert!(ids_of(&bundle).is_empty(), "{bundle}");
    let (_, bundle) = server.get("/fhir/Patient/p1/Patient").await;
    assert_eq!(
        ids_of(&bundle),
        ["p1"],
        "a patient is in its own compartment"
    );
    for path in [
        "/fhir/Patient/p1/Organization",
        "/fhir/Encounter/e1/Observation",
    ] {
        let (status, outcome) = server.get(path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {outcome}");
    }
}

/// The attacks: search a type the client may not search by POSTing to its `_search`, or
/// through a patient's compartment; and search with a policy that only allows creating.
#[tokio::test]
async fn other_ways_into_a_search_are_authorized_as_that_search() {
    let (server, get) = searcher_of("/fhir/Patient").await;
    let post = |path: &str, form: &str| {
        server
            .client
            .post(server.url(path))
            .basic_auth("searcher", Some("pw"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_string())
    };
    let (status, bundle) = server
        .send(post("/fhir/Patient/_search", "name=smith"))
        .await;
    assert_eq!(status, StatusCode::OK, "its own type: {bundle}");
    assert_eq!(ids_of(&bundle), ["p1"]);
    let (status, _) = server
        .send(post("/fhir/Observation/_search", "code:text=x"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "Observations by POST");
    let (status, _) = server
        .send(get(&server, "/fhir/Patient/p1/Observation"))
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "Observations through a compartment"
    );

    let (server, get) = searcher_of("/fhir/Observation").await;
    let (status, bundle) = server
        .send(get(&server, "/fhir/Patient/p1/Observation"))
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(ids_of(&bundle), ["o1", "o4"]);

    let (status, body) = server
        .json(
            Method::PUT,
            "/",
            &json!([
                {"resourceType": "Client", "id": "writer", "secret": "pw", "grant_types": ["basic"]},
                {"resourceType": "AccessPolicy", "id": "create-only", "engine": "matcho",
                 "matcho": {"request-method": "post", "uri": "/fhir/Observation"},
                 "link": [{"resourceType": "Client", "id": "writer"}]},
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let response = server
        .client
        .post(server.url("/fhir/Observation/_search"))
        .basic_auth("writer", Some("pw"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("status=final")
        .send()
        .await
        .expect("sent");
    assert_eq!(
        response.status(),
        StatusCode::FORBIDDEN,
        "a create policy does not search"
    );
}

/// Every search parameter, `_include` and `_revinclude` the CapabilityStatement lists is
/// answered (on an empty store: what is checked is that each compiles and runs).
#[tokio::test(flavor = "multi_thread")]
async fn every_parameter_the_capability_statement_lists_works() {
    let server = TestServer::start().await;
    let (_, statement) = server.get("/fhir/metadata").await;
    let resources = statement["rest"][0]["resource"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(resources.len() > 140, "{}", resources.len());
    let sample = |kind: &str| match kind {
        "date" => "ge2020".to_string(),
        "number" | "quantity" => "5".to_string(),
        "reference" => "Patient/x".to_string(),
        _ => "x".to_string(),
    };
    let mut queries = Vec::new();
    for resource in &resources {
        let type_name = resource["type"].as_str().expect("a type");
        for param in resource["searchParam"].as_array().into_iter().flatten() {
            let (name, kind) = (
                param["name"].as_str().unwrap_or(""),
                param["type"].as_str().unwrap_or(""),
            );
            if name == "_count" {
                continue; // a result parameter, listed for its documentation
            }
            let value = match kind {
                // Every component of the composite, the same sample as its own type.
                "composite" => {
                    let definition =
                        fhirbox::search::parameter(type_name, name).expect("an R4 parameter");
                    definition
                        .components
                        .iter()
                        .map(|(k, _)| sample(k))
                        .collect::<Vec<_>>()
                        .join("$")
                }
                kind => sample(kind),
            };
            let value: String = form_urlencoded::byte_serialize(value.as_bytes()).collect();
            queries.push(format!("/fhir/{type_name}?{name}={value}"));
            queries.push(format!(
                "/fhir/{type_name}?{name}:missing=true&_sort={}",
                if kind == "composite" { "_id" } else { name }
            ));
        }
        for key in ["searchInclude", "searchRevInclude"] {
            let param = if key == "searchInclude" {
                "_include"
            } else {
                "_revinclude"
            };
            for value in resource[key].as_array().into_iter().flatten() {
                queries.push(format!(
                    "/fhir/{type_name}?{param}={}",
                    value.as_str().unwrap_or("")
                ));
            }
        }
    }
    let mut failures = Vec::new();
    for batch in queries.chunks(16) {
        let answers = futures_util::future::join_all(batch.iter().map(|q| server.get(q))).await;
        for (query, (status, body)) in batch.iter().zip(answers) {
            if status != StatusCode::OK {
                failures.push(format!(
                    "{query}: {status} {}",
                    body["issue"][0]["diagnostics"]
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fail:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn what_fhirbox_does_not_search_is_refused_by_name_never_ignored() {
    let server = TestServer::start().await;
    chain_world(&server).await;
    // The defaults, said out loud, are the search without them.
    let (_, plain) = server.get("/fhir/Observation?status=final").await;
    for query in [
        "/fhir/Observation?status=final&_contained=false",
        "/fhir/Observation?status=final&_containedType=container",
    ] {
        let (status, bundle) = server.get(query).await;
        assert_eq!(status, StatusCode::OK, "{query}: {bundle}");
        assert_eq!(ids_of(&bundle), ids_of(&plain), "{query}");
    }
    let mut answers = Vec::new();
    for query in [
        "/fhir/Observation?_contained=true",
        "/fhir/Observation?_contained=both",
        "/fhir/Observation?_containedType=contained",
        "/fhir/Observation?_text=cough",
        "/fhir/Observation?_content=cough",
        "/fhir/Location?near=42.25|-83.69|10|km",
    ] {
        let (status, outcome) = server.get(query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {outcome}");
        answers.push(json!({"query": query, "outcome": outcome}));
    }
    insta::assert_snapshot!(common::pretty(&answers));
}

/// The three R4 composites that need more than the others: a reference component
/// (`DocumentReference.relationship`, whose R4 definition pairs each component with the
/// other's type: the value is `code$target`), and components that read `%resource` from
/// inside each `variant` (`MolecularSequence`'s coordinates). Each component must hold on
/// the same item: a relatesTo's code with another relatesTo's target is no match.
#[tokio::test]
async fn composites_with_a_reference_or_the_whole_resource_match_item_by_item() {
    let server = TestServer::start().await;
    for resource in [
        json!({"resourceType": "DocumentReference", "id": "d1", "status": "current",
               "content": [{"attachment": {"url": "http://example.org/1"}}],
               "relatesTo": [{"code": "replaces", "target": {"reference": "DocumentReference/d0"}},
                             {"code": "appends", "target": {"reference": "DocumentReference/d9"}}]}),
        json!({"resourceType": "DocumentReference", "id": "d2", "status": "current",
               "content": [{"attachment": {"url": "http://example.org/2"}}],
               "relatesTo": [{"code": "transforms", "target": {"reference": "DocumentReference/d0"}}]}),
        json!({"resourceType": "MolecularSequence", "id": "m1", "coordinateSystem": 0,
               "referenceSeq": {"chromosome": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/chromosome-human", "code": "1"}]},
                                "referenceSeqId": {"coding": [{"system": "http://www.ncbi.nlm.nih.gov/nuccore", "code": "NC_000001.11"}]}},
               "variant": [{"start": 100, "end": 101}, {"start": 5000, "end": 5010}]}),
        json!({"resourceType": "MolecularSequence", "id": "m2", "coordinateSystem": 0,
               "referenceSeq": {"chromosome": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/chromosome-human", "code": "2"}]}},
               "variant": [{"start": 100, "end": 200}]}),
    ] {
        server.put_fhir(&resource).await;
    }
    for (query, expected) in [
        ("DocumentReference?relationship=replaces$DocumentReference/d0", vec!["d1"]),
        ("DocumentReference?relationship=replaces$d0,transforms$d0", vec!["d1", "d2"]),
        ("DocumentReference?relationship=appends$DocumentReference/d0", vec![]),
        ("DocumentReference?relationship=appends$d9", vec!["d1"]),
        ("MolecularSequence?chromosome-variant-coordinate=1$ge100$le101", vec!["m1"]),
        ("MolecularSequence?chromosome-variant-coordinate=1$gt200$lt6000", vec!["m1"]),
        ("MolecularSequence?chromosome-variant-coordinate=1$gt200$le101", vec![]),
        ("MolecularSequence?chromosome-variant-coordinate=http://terminology.hl7.org/CodeSystem/chromosome-human|2$100$200", vec!["m2"]),
        ("MolecularSequence?referenceseqid-variant-coordinate=NC_000001.11$ge5000$le5010", vec!["m1"]),
        ("MolecularSequence?referenceseqid-variant-coordinate=NC_000001.11$ge5000$le200", vec![]),
    ] {
        let (status, bundle) = server.get(&format!("/fhir/{query}")).await;
        assert_eq!(status, StatusCode::OK, "{query}: {bundle}");
        let mut got: Vec<String> = ids_of(&bundle);
        got.sort();
        let expected: Vec<String> = expected.iter().map(|id| id.to_string()).collect();
        assert_eq!(got, expected, "{query}");
    }
}
