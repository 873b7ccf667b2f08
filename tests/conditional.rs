//! Conditional create (`If-None-Exist`), update (`PUT /[type]?search`) and delete
//! (`DELETE /[type]?search`), alone and in Bundles: what each does for none, one and several
//! matches; two concurrent conditional creates of one identifier make one resource; and a
//! conditional write's search is authorized as a search (the attack: learn whether a
//! patient exists with a client that may only create).

mod common;

use common::TestServer;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn patient(identifier: &str, family: &str) -> Value {
    json!({"resourceType": "Patient",
           "identifier": [{"system": "urn:mrn", "value": identifier}],
           "name": [{"family": family}]})
}

async fn create_unless(server: &TestServer, identifier: &str, family: &str) -> (StatusCode, Value) {
    server
        .send(
            server
                .request(Method::POST, "/fhir/Patient")
                .header("if-none-exist", format!("identifier=urn:mrn|{identifier}"))
                .json(&patient(identifier, family)),
        )
        .await
}

async fn count(server: &TestServer, query: &str) -> u64 {
    let (_, bundle) = server
        .get(&format!("/fhir/Patient?{query}&_total=accurate"))
        .await;
    bundle["total"].as_u64().expect("a total")
}

#[tokio::test]
async fn a_conditional_create_creates_once_and_then_finds() {
    let server = TestServer::start().await;
    let (status, first) = create_unless(&server, "m1", "Ames").await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let (status, second) = create_unless(&server, "m1", "Other").await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second["id"], first["id"]);
    assert_eq!(
        second["name"][0]["family"], "Ames",
        "the existing one, untouched"
    );

    // Two matches: 412, nothing written.
    create_unless(&server, "m2", "Twin").await;
    let (status, _) = server
        .send(
            server
                .request(Method::POST, "/fhir/Patient")
                .json(&patient("m2", "Twin")),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, outcome) = create_unless(&server, "m2", "Third").await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{outcome}");
    assert_eq!(count(&server, "identifier=urn:mrn|m2").await, 2);

    // Only search parameters, strictly.
    for header in ["shoe-size=9", "identifier=x&_sort=name", ""] {
        let (status, outcome) = server
            .send(
                server
                    .request(Method::POST, "/fhir/Patient")
                    .header("if-none-exist", header)
                    .json(&patient("m3", "X")),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{header}: {outcome}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_conditional_creates_of_one_identifier_make_one_resource() {
    let server = TestServer::start().await;
    let singles = (0..8).map(|_| create_unless(&server, "race", "Single"));
    let transactions = (0..8).map(|i| {
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{
            "fullUrl": format!("urn:uuid:p{i}"),
            "resource": patient("race", "InBundle"),
            "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|race"}
        }]});
        let server = &server;
        async move { server.json(Method::POST, "/fhir", &bundle).await }
    });
    let (singles, transactions) = tokio::join!(
        futures_util::future::join_all(singles),
        futures_util::future::join_all(transactions)
    );
    let created = singles
        .iter()
        .chain(transactions.iter())
        .filter(|(status, body)| {
            assert!(status.is_success(), "{body}");
            *status == StatusCode::CREATED
                || body["entry"][0]["response"]["status"].as_str() == Some("201 Created")
        })
        .count();
    assert_eq!(created, 1, "exactly one of 16 creates");
    assert_eq!(count(&server, "identifier=urn:mrn|race").await, 1);
}

#[tokio::test]
async fn conditional_update_and_delete_touch_the_one_match() {
    let server = TestServer::start().await;
    let put = |query: &str, body: Value| {
        server.send(
            server
                .request(Method::PUT, &format!("/fhir/Patient?{query}"))
                .json(&body),
        )
    };
    let (status, created) = put("identifier=urn:mrn|u1", patient("u1", "First")).await;
    assert_eq!(status, StatusCode::CREATED, "no match: created, {created}");
    let (status, updated) = put("identifier=urn:mrn|u1", patient("u1", "Second")).await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["id"], created["id"]);
    assert!(updated["meta"]["versionId"].as_str().is_some());
    assert_ne!(updated["meta"]["versionId"], created["meta"]["versionId"]);
    let mut other = patient("u1", "Third");
    other["id"] = json!("not-the-match");
    let (status, outcome) = put("identifier=urn:mrn|u1", other).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");

    put("family=Dup", patient("d1", "Dup")).await;
    server
        .send(
            server
                .request(Method::POST, "/fhir/Patient")
                .json(&patient("d2", "Dup")),
        )
        .await;
    let (status, _) = put("family=Dup", patient("d3", "Dup")).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    let (status, _) = server
        .send(server.request(Method::DELETE, "/fhir/Patient?family=Dup"))
        .await;
    assert_eq!(
        status,
        StatusCode::PRECONDITION_FAILED,
        "two matches: nothing deleted"
    );
    assert_eq!(count(&server, "family=Dup").await, 2);

    let (status, _) = server
        .send(server.request(Method::DELETE, "/fhir/Patient?identifier=urn:mrn|u1"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(count(&server, "identifier=urn:mrn|u1").await, 0);
    let (status, _) = server
        .send(server.request(Method::DELETE, "/fhir/Patient?identifier=urn:mrn|u1"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "no match");
    let (status, _) = server
        .send(server.request(Method::DELETE, "/fhir/Patient"))
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a search that matches everything"
    );
}

#[tokio::test]
async fn a_transaction_refers_to_what_its_conditional_entries_found() {
    let server = TestServer::start().await;
    let (_, existing) = create_unless(&server, "t1", "Found").await;
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:obs", "resource": {"resourceType": "Observation", "status": "final",
            "code": {"text": "x"}, "subject": {"reference": "urn:uuid:pat"}},
         "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": "urn:uuid:pat", "resource": patient("t1", "Ignored"),
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|t1"}},
        {"resource": patient("t2", "Put"),
         "request": {"method": "PUT", "url": "Patient?identifier=urn:mrn|t2"}},
    ]});
    let (status, response) = server.json(Method::POST, "/fhir", &bundle).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    let statuses: Vec<&str> = response["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["response"]["status"].as_str())
        .collect();
    assert_eq!(
        statuses,
        ["201 Created", "200 OK", "201 Created"],
        "{response}"
    );
    let subject = &response["entry"][0]["resource"]["subject"]["reference"];
    assert_eq!(
        subject,
        &json!(format!(
            "Patient/{}",
            existing["id"].as_str().unwrap_or("?")
        ))
    );
    assert_eq!(count(&server, "identifier=urn:mrn|t1").await, 1);
}

/// The attack: a client that may only create Patients learns whether a patient exists (and
/// reads it) through `If-None-Exist`, a conditional `PUT`, or a Bundle entry.
#[tokio::test]
async fn a_conditional_write_searches_only_where_its_client_may_search() {
    let server = TestServer::start().await;
    create_unless(&server, "secret", "Hidden").await;
    let (status, body) = server
        .json(
            Method::PUT,
            "/",
            &json!([
                {"resourceType": "Client", "id": "writer", "secret": "pw", "grant_types": ["basic"]},
                {"resourceType": "AccessPolicy", "id": "write-patients", "engine": "matcho",
                 "matcho": {"request-method": {"$one-of": ["post", "put"]},
                            "uri": {"$one-of": ["/fhir/Patient", "/fhir"]}},
                 "link": [{"resourceType": "Client", "id": "writer"}]},
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let writer = |method: Method, path: &str| {
        server
            .client
            .request(method, server.url(path))
            .basic_auth("writer", Some("pw"))
    };
    let (status, created) = server
        .send(writer(Method::POST, "/fhir/Patient").json(&patient("new", "New")))
        .await;
    assert_eq!(status, StatusCode::CREATED, "it may create: {created}");
    let (status, outcome) = server
        .send(
            writer(Method::POST, "/fhir/Patient")
                .header("if-none-exist", "identifier=urn:mrn|secret")
                .json(&patient("secret", "Probe")),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{outcome}");
    let (status, _) = server
        .send(
            writer(Method::PUT, "/fhir/Patient?identifier=urn:mrn|secret")
                .json(&patient("secret", "P")),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [{
        "resource": patient("secret", "Probe"),
        "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|secret"}}]});
    let (status, response) = server
        .send(writer(Method::POST, "/fhir").json(&bundle))
        .await;
    assert_eq!(status, StatusCode::OK, "{response}");
    assert_eq!(
        response["entry"][0]["response"]["status"], "403 Forbidden",
        "{response}"
    );
    assert_eq!(
        count(&server, "identifier=urn:mrn|secret").await,
        1,
        "nothing written"
    );
}
