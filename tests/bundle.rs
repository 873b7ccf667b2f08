//! `PUT /` and `POST /` Bundles: the seeds' requests verbatim, `urn:uuid` references,
//! transaction atomicity, batch independence.

mod common;

use common::{diagnostics, seed, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// The stored body (`resource` column) of a row, or None.
async fn stored(server: &TestServer, table: &str, id: &str) -> Option<Value> {
    server
        .db()
        .await
        .query_opt(
            &format!("SELECT resource FROM \"{table}\" WHERE id = $1"),
            &[&id],
        )
        .await
        .expect("query")
        .map(|row| row.get(0))
}

#[tokio::test]
async fn seed_put_of_client_and_policy_verbatim() {
    let server = TestServer::start().await;
    let (status, body) = server
        .yaml(Method::PUT, "/", &seed("put-client-and-policy.yaml"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let list = body.as_array().expect("the stored list");
    assert_eq!(list.len(), 2);
    assert_eq!(
        (&list[0]["resourceType"], &list[0]["id"]),
        (&json!("Client"), &json!("bulk-client"))
    );
    assert_eq!(list[1]["id"], "bulk-client-dump");

    let policy = stored(&server, "accesspolicy", "bulk-client-dump")
        .await
        .expect("policy");
    assert_eq!(policy["engine"], "matcho");
    assert_eq!(
        policy["link"],
        json!([{"id": "bulk-client", "resourceType": "Client"}])
    );
    let branches = policy["matcho"]["$one-of"].as_array().expect("branches");
    assert_eq!(branches.len(), 5);
    assert_eq!(
        branches[0],
        json!({"uri": "/$dump-sql", "request-method": "post"})
    );
    assert_eq!(
        branches[1]["uri"], r"#/.*/\$dump$",
        "YAML escapes decoded exactly"
    );
    assert_eq!(
        branches[4]["uri"]["$one-of"],
        json!(["/$load", "/fhir/$load", r"#/.*/\$load$"])
    );
    let client = stored(&server, "client", "bulk-client")
        .await
        .expect("client");
    assert_eq!(client["grant_types"], json!(["basic"]));
}

#[tokio::test]
async fn seed_sample_data_bundle_verbatim() {
    let server = TestServer::start().await;
    let (status, response) = server
        .yaml(Method::POST, "/", &seed("post-sample-data-bundle.yaml"))
        .await;
    assert_eq!(status, StatusCode::OK, "{response}");
    assert_eq!(response["type"], "transaction-response");
    let entries = response["entry"].as_array().expect("entries");
    assert_eq!(entries.len(), 8);
    for entry in entries {
        assert_eq!(entry["response"]["status"], "201 Created", "{entry}");
    }

    // Exactly the resources the seed describes, with the ids it gives.
    let attribute = stored(&server, "attribute", "Patient.citizenship")
        .await
        .expect("attribute");
    assert_eq!(
        attribute,
        json!({
            "description": "The patient's legal status as citizen of a country.",
            "resource": {"id": "Patient", "resourceType": "Entity"},
            "path": ["citizenship"],
            "isCollection": true,
            "extensionUrl": "http://hl7.org/fhir/StructureDefinition/patient-citizenship"
        })
    );
    let code = stored(&server, "attribute", "Patient.citizenship.code")
        .await
        .expect("attribute");
    assert_eq!(
        code["type"],
        json!({"id": "CodeableConcept", "resourceType": "Entity"})
    );
    assert_eq!(code["path"], json!(["citizenship", "code"]));

    assert_eq!(
        stored(&server, "patient", "pt-1").await,
        Some(json!({"name": [{"given": ["Alice"]}]}))
    );
    assert_eq!(
        stored(&server, "patient", "pt-2").await,
        Some(json!({"name": [{"given": ["Bob"]}]}))
    );
    assert_eq!(
        stored(&server, "patient", "pt-3").await,
        Some(json!({"name": [{"given": ["Charles"]}], "citizenship": [{"code": {"text": "ru"}}]}))
    );
    for (id, status, patient) in [
        ("ap-1", "fulfilled", "pt-1"),
        ("ap-2", "booked", "pt-1"),
        ("ap-3", "fulfilled", "pt-2"),
    ] {
        assert_eq!(
            stored(&server, "appointment", id).await,
            Some(
                json!({"status": status, "participant": [{"status": "accepted",
                        "actor": {"resourceType": "Patient", "id": patient}}]})
            ),
            "{id}"
        );
    }
    assert_eq!(server.count("patient").await, 3);
    assert_eq!(server.count("appointment").await, 3);

    // As the seed's $dump shows: one transaction, one timestamp, one version id per resource.
    let rows = server
        .db()
        .await
        .query(
            "SELECT txid, ts, cts FROM patient UNION ALL SELECT txid, ts, cts FROM appointment ORDER BY txid",
            &[],
        )
        .await
        .expect("rows");
    let txids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert!(txids.windows(2).all(|w| w[0] < w[1]), "{txids:?}");
    let first_ts: chrono::DateTime<chrono::Utc> = rows[0].get(1);
    assert!(rows
        .iter()
        .all(|r| r.get::<_, chrono::DateTime<chrono::Utc>>(1) == first_ts));
    let (_, pt1) = server.get("/Patient/pt-1").await;
    assert_eq!(pt1["meta"]["createdAt"], pt1["meta"]["lastUpdated"]);
}

#[tokio::test]
async fn transaction_resolves_urn_uuid_references_in_any_order() {
    let server = TestServer::start().await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "request": {"method": "POST", "url": "Observation"},
                "resource": {"status": "final", "subject": {"uri": "urn:uuid:0f1a", "display": "Ann"},
                             "code": {"text": "x"}}
            },
            {
                "fullUrl": "urn:uuid:0f1a",
                "request": {"method": "POST", "url": "Patient"},
                "resource": {"resourceType": "Patient", "name": [{"family": "Ann"}]}
            }
        ]
    });
    let (status, response) = server.json(Method::POST, "/", &bundle).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    let observation = &response["entry"][0]["resource"];
    let patient_id = response["entry"][1]["resource"]["id"]
        .as_str()
        .expect("patient id");
    assert_eq!(
        observation["subject"],
        json!({"display": "Ann", "resourceType": "Patient", "id": patient_id})
    );
}

#[tokio::test]
async fn a_failing_transaction_writes_nothing() {
    let server = TestServer::start().await;
    server
        .json(Method::PUT, "/Patient/existing", &json!({"active": true}))
        .await;
    server
        .json(Method::PUT, "/Patient/taken", &json!({"active": true}))
        .await;
    let before = server.count("patient").await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "PUT", "url": "/Patient/new-1"}, "resource": {"active": true}},
            {"request": {"method": "DELETE", "url": "/Patient/existing"}},
            {"request": {"method": "POST", "url": "/Observation"}, "resource": {"status": "final"}},
            {"request": {"method": "POST", "url": "/Patient"}, "resource": {"id": "taken"}}
        ]
    });
    let (status, outcome) = server.json(Method::POST, "/", &bundle).await;
    assert_eq!(status, StatusCode::CONFLICT, "{outcome}");
    assert!(diagnostics(&outcome).starts_with("entry 3:"), "{outcome}");
    assert_eq!(server.count("patient").await, before);
    assert_eq!(
        server.count("patient_history").await,
        0,
        "the delete was rolled back"
    );
    assert_eq!(server.count("observation").await, 0);
    let (status, _) = server.get("/Patient/existing").await;
    assert_eq!(status, StatusCode::OK);

    for (bad, expected) in [
        (
            json!({"type": "collection", "entry": []}),
            "Bundle.type must be",
        ),
        (
            json!({"resourceType": "Patient", "type": "transaction"}),
            "type Bundle",
        ),
        (
            json!({"type": "transaction", "entry": [{"resource": {}}]}),
            "request.method and request.url",
        ),
        (
            json!({"type": "transaction", "entry": [{"request": {"method": "PATCH", "url": "Patient/x"}}]}),
            "unsupported entry request",
        ),
    ] {
        let (status, outcome) = server.json(Method::POST, "/", &bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
        assert!(diagnostics(&outcome).contains(expected), "{outcome}");
    }
    let (status, outcome) = server
        .json(
            Method::POST,
            "/",
            &json!({"type": "transaction", "entry": [{"request": {"method": "POST", "url": "Nope"}, "resource": {}}]}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{outcome}");
}

#[tokio::test]
async fn batch_entries_succeed_or_fail_on_their_own() {
    let server = TestServer::start().await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "PUT", "url": "Patient/b1"}, "resource": {"active": true}},
            {"request": {"method": "GET", "url": "Patient/missing"}},
            {"request": {"method": "POST", "url": "Patient"}, "resource": {"id": "b1"}},
            {"request": {"method": "GET", "url": "Patient/b1"}}
        ]
    });
    let (status, response) = server.json(Method::POST, "/", &bundle).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    assert_eq!(response["type"], "batch-response");
    let statuses: Vec<&str> = response["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        statuses,
        ["201 Created", "404 Not Found", "409 Conflict", "200 OK"]
    );
    assert_eq!(
        response["entry"][1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(response["entry"][3]["resource"]["active"], true);
}

#[tokio::test]
async fn put_list_is_all_or_nothing() {
    let server = TestServer::start().await;
    let (status, outcome) = server
        .json(
            Method::PUT,
            "/",
            &json!([{"resourceType": "Patient", "id": "a"}, {"resourceType": "Patient"}]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(diagnostics(&outcome), "entry 1: the resource has no id");
    assert_eq!(server.count("patient").await, 0);

    let (status, outcome) = server
        .json(Method::PUT, "/", &json!({"resourceType": "Patient"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(diagnostics(&outcome).contains("takes a list"));

    // Upsert: the second PUT of the same list makes new versions, history keeps the old.
    let list = json!([{"resourceType": "Patient", "id": "a"}, {"resourceType": "Observation", "id": "o", "status": "final"}]);
    for _ in 0..2 {
        let (status, body) = server.json(Method::PUT, "/", &list).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(server.count("patient_history").await, 1);
    assert_eq!(server.count("observation").await, 1);
}

#[tokio::test]
async fn fhir_transactions_assign_ids_to_posts() {
    let server = TestServer::start().await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient", "id": "ignored"}}]
    });
    let (status, response) = server.json(Method::POST, "/fhir", &bundle).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    let id = response["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap_or_default();
    assert_ne!(id, "ignored");
    assert!(response["entry"][0]["response"]["location"]
        .as_str()
        .unwrap_or_default()
        .contains("/fhir/Patient/"));
}
