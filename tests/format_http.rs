//! The FHIR routes convert at the edges: the seed's sample data read through `/fhir/` is the
//! seed's FHIR output, FHIR written back is stored in the native form, Attributes take effect
//! at once, bad FHIR is a 400 naming the element.

mod common;

use common::{diagnostics, seed, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn with_seed_data() -> TestServer {
    let server = TestServer::start().await;
    let (status, body) = server
        .yaml(Method::POST, "/", &seed("post-sample-data-bundle.yaml"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server
}

/// The seed's FHIR line for a resource, with this server's version and timestamps.
fn expected_fhir(native: &Value, rest: Value) -> Value {
    let meta = &native["meta"];
    let mut doc = json!({
        "id": native["id"],
        "meta": {
            "versionId": meta["versionId"].to_string(),
            "lastUpdated": meta["lastUpdated"],
            "extension": [{"url": "ex:createdAt", "valueInstant": meta["createdAt"]}]
        },
        "resourceType": native["resourceType"],
    });
    if let (Value::Object(doc), Value::Object(rest)) = (&mut doc, rest) {
        doc.extend(rest);
    }
    doc
}

#[tokio::test]
async fn the_seed_sample_data_reads_as_the_seeds_fhir_output() {
    let server = with_seed_data().await;
    for (path, rest) in [
        ("Patient/pt-1", json!({"name": [{"given": ["Alice"]}]})),
        ("Patient/pt-2", json!({"name": [{"given": ["Bob"]}]})),
        (
            "Patient/pt-3",
            json!({"name": [{"given": ["Charles"]}],
                   "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-citizenship",
                                  "extension": [{"url": "code", "valueCodeableConcept": {"text": "ru"}}]}]}),
        ),
        (
            "Appointment/ap-1",
            json!({"status": "fulfilled",
                   "participant": [{"actor": {"reference": "Patient/pt-1"}, "status": "accepted"}]}),
        ),
        (
            "Appointment/ap-3",
            json!({"status": "fulfilled",
                   "participant": [{"actor": {"reference": "Patient/pt-2"}, "status": "accepted"}]}),
        ),
    ] {
        let (_, native) = server.get(&format!("/{path}")).await;
        let (status, fhir) = server.get(&format!("/fhir/{path}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(fhir, expected_fhir(&native, rest), "{path}");
    }
}

#[tokio::test]
async fn fhir_written_back_is_stored_in_the_native_form() {
    let server = with_seed_data().await;
    let (_, fhir) = server.get("/fhir/Patient/pt-3").await;
    let (status, _) = server.json(Method::PUT, "/fhir/Patient/pt-3", &fhir).await;
    assert_eq!(status, StatusCode::OK);
    let (_, appointment) = server.get("/fhir/Appointment/ap-2").await;
    let (status, _) = server
        .json(Method::PUT, "/fhir/Appointment/ap-2", &appointment)
        .await;
    assert_eq!(status, StatusCode::OK);

    let db = server.db().await;
    let stored = |table: &'static str, id: &'static str| {
        let db = &db;
        async move {
            db.query_one(
                &format!("SELECT resource FROM {table} WHERE id = $1"),
                &[&id],
            )
            .await
            .expect("row")
            .get::<_, Value>(0)
        }
    };
    assert_eq!(
        stored("patient", "pt-3").await,
        json!({"name": [{"given": ["Charles"]}], "citizenship": [{"code": {"text": "ru"}}]})
    );
    assert_eq!(
        stored("appointment", "ap-2").await,
        json!({"status": "booked", "participant": [{"status": "accepted",
               "actor": {"resourceType": "Patient", "id": "pt-1"}}]})
    );
}

#[tokio::test]
async fn attribute_changes_take_effect_on_the_next_request() {
    let server = with_seed_data().await;
    let (_, before) = server.get("/fhir/Patient/pt-3").await;
    assert!(before.get("citizenship").is_none());

    let (status, _) = server.delete("/Attribute/Patient.citizenship").await;
    assert_eq!(status, StatusCode::OK);
    let (_, without) = server.get("/fhir/Patient/pt-3").await;
    assert_eq!(
        without["citizenship"],
        json!([{"code": {"text": "ru"}}]),
        "no Attribute: kept as is"
    );
    assert!(without.get("extension").is_none());

    let attribute = json!({"resourceType": "Attribute", "resource": {"id": "Patient", "resourceType": "Entity"},
        "path": ["citizenship"], "isCollection": true,
        "extensionUrl": "http://example.org/citizenship"});
    let (status, _) = server
        .json(Method::PUT, "/Attribute/Patient.citizenship", &attribute)
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, again) = server.get("/fhir/Patient/pt-3").await;
    assert_eq!(
        again["extension"][0]["url"],
        "http://example.org/citizenship"
    );
    assert!(again.get("citizenship").is_none());

    // FHIR input uses the new url at once, too.
    let (status, created) = server
        .json(
            Method::PUT,
            "/fhir/Patient/pt-9",
            &json!({"resourceType": "Patient", "extension": [{"url": "http://example.org/citizenship",
                "extension": [{"url": "code", "valueCodeableConcept": {"text": "fr"}}]}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (_, native) = server.get("/Patient/pt-9").await;
    assert_eq!(native["citizenship"], json!([{"code": {"text": "fr"}}]));
}

#[tokio::test]
async fn bad_fhir_is_a_400_naming_the_element_and_writes_nothing() {
    let server = TestServer::start().await;
    for (body, expression, message) in [
        (
            json!({"resourceType": "Observation", "status": "final", "valueFoo": 1}),
            "Observation.valueFoo",
            "type 'Foo' is not allowed for value[x]",
        ),
        (
            json!({"resourceType": "Observation", "status": "final", "subject": {"reference": "Patient/not valid"}}),
            "Observation.subject.reference",
            "cannot parse the reference",
        ),
        (
            json!({"resourceType": "Observation", "component": [{"valueQuantity": {}}, {"valueBoolean": true, "valueString": "x"}]}),
            "Observation.component[1].valueString",
            "more than one value for value[x]",
        ),
    ] {
        let (status, outcome) = server
            .json(Method::PUT, "/fhir/Observation/o1", &body)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
        assert_eq!(
            outcome["issue"][0]["expression"],
            json!([expression]),
            "{outcome}"
        );
        assert!(diagnostics(&outcome).contains(message), "{outcome}");
    }
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "PUT", "url": "Patient/p1"}, "resource": {"resourceType": "Patient"}},
        {"request": {"method": "PUT", "url": "Observation/o2"},
         "resource": {"resourceType": "Observation", "subject": {"reference": "bad ref"}}}]});
    let (status, outcome) = server.json(Method::POST, "/fhir", &bundle).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
    assert!(
        diagnostics(&outcome).starts_with("entry 1: Observation.subject.reference"),
        "{outcome}"
    );
    assert_eq!(server.count("observation").await, 0);
    assert_eq!(server.count("patient").await, 0);
}

#[tokio::test]
async fn fhir_transactions_resolve_urn_uuid_references() {
    let server = TestServer::start().await;
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:6f0c2f5e-0000-4000-8000-000000000001",
         "request": {"method": "POST", "url": "Patient"},
         "resource": {"resourceType": "Patient", "name": [{"family": "Doe"}]}},
        {"request": {"method": "POST", "url": "Observation"},
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "hr"},
                      "valueQuantity": {"value": 72.0, "unit": "/min"},
                      "subject": {"reference": "urn:uuid:6f0c2f5e-0000-4000-8000-000000000001"}}}]});
    let (status, response) = server.json(Method::POST, "/fhir", &bundle).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    let patient_id = response["entry"][0]["resource"]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let observation = &response["entry"][1]["resource"];
    assert_eq!(
        observation["subject"],
        json!({"reference": format!("Patient/{patient_id}")})
    );
    assert_eq!(
        observation["valueQuantity"]["value"],
        json!(72.0),
        "decimals keep their digits"
    );
    let id = observation["id"].as_str().expect("id");
    let (_, native) = server.get(&format!("/Observation/{id}")).await;
    assert_eq!(
        native["subject"],
        json!({"resourceType": "Patient", "id": patient_id})
    );
    assert_eq!(
        native["value"],
        json!({"Quantity": {"value": 72.0, "unit": "/min"}})
    );
}
