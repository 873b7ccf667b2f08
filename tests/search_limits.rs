//! Every bound a search has is a flag, and a search past one gets a clear answer: `_count`
//! above the most a page carries is capped (not refused: fhir-kindling asks for 5000), too
//! many values or parameters are a 400 naming the flag, includes past their bound stop with
//! a note saying so, and a search running past its time is cancelled with a 408. Run with
//! small bounds, as `--search-*` would set them.

mod common;

use std::time::Duration;

use common::TestServer;
use fhirbox::search::Limits;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn small_server(timeout: Duration) -> TestServer {
    let database = common::fresh_database().await;
    TestServer::start_custom(database, |settings| {
        settings.http.search = Limits {
            default_count: 2,
            max_count: 3,
            max_values: 2,
            max_parameters: 2,
            max_included: 1,
            timeout,
        };
    })
    .await
}

fn entries(bundle: &Value) -> usize {
    bundle["entry"].as_array().map_or(0, Vec::len)
}

#[tokio::test]
async fn a_search_past_each_bound_is_capped_or_refused_by_name() {
    let server = small_server(Duration::from_secs(30)).await;
    for id in ["p1", "p2", "p3", "p4"] {
        server
            .put_fhir(&json!({"resourceType": "Patient", "id": id, "name": [{"family": "Smith"}]}))
            .await;
    }
    for (id, patient) in [("o1", "p1"), ("o2", "p2")] {
        server
            .put_fhir(
                &json!({"resourceType": "Observation", "id": id, "status": "final",
                "code": {"text": "x"}, "subject": {"reference": format!("Patient/{patient}")}}),
            )
            .await;
    }

    // `_count`: the default when unsaid, the most a page carries when more is asked for.
    let (status, bundle) = server.get("/fhir/Patient").await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(entries(&bundle), 2);
    let (status, bundle) = server.get("/fhir/Patient?_count=5000").await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(entries(&bundle), 3);

    // Values of one parameter, and parameters of one search: a 400 naming the flag.
    let mut answers = Vec::new();
    for query in [
        "/fhir/Patient?family=a,b,c",
        "/fhir/Patient?family=smith&given=x&gender=male",
    ] {
        let (status, outcome) = server.get(query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {outcome}");
        answers.push(json!({"query": query, "outcome": outcome}));
    }
    insta::assert_snapshot!(common::pretty(&answers));
    // At the bounds, they are answered.
    let (status, bundle) = server
        .get("/fhir/Patient?family=a,smith&gender:missing=true")
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(entries(&bundle), 2, "a page of the 4 matches");

    // Includes: one resource, then a note that the rest were left out.
    let (status, bundle) = server
        .get("/fhir/Observation?_include=Observation:subject")
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    let modes: Vec<&str> = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["search"]["mode"].as_str())
        .collect();
    assert_eq!(modes, ["match", "match", "include", "outcome"], "{bundle}");
    let note = bundle["entry"][3]["resource"]["issue"].to_string();
    assert!(
        note.contains("more resources are included than the 1"),
        "{note}"
    );
}

#[tokio::test]
async fn a_search_running_past_its_time_is_cancelled() {
    let server = small_server(Duration::from_millis(1)).await;
    // 50,000 patients and a parameter no index serves: a scan of them all takes longer.
    server.fill_patients(50_000, 50).await;
    let (status, outcome) = server
        .get("/fhir/Patient?address-city:contains=nowhere&_total=accurate")
        .await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{outcome}");
    insta::assert_snapshot!(common::pretty(&outcome));

    // A conditional write's search has the same bound, alone and in a transaction, and
    // writes nothing past it.
    let before = server.count("patient").await;
    let patient = json!({"resourceType": "Patient", "name": [{"family": "Late"}]});
    let (status, outcome) = server
        .send(
            server
                .request(reqwest::Method::POST, "/fhir/Patient")
                .header("If-None-Exist", "address-city:contains=nowhere")
                .json(&patient),
        )
        .await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{outcome}");
    assert!(
        common::diagnostics(&outcome).contains("If-None-Exist search ran longer"),
        "{outcome}"
    );
    let transaction = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient, "request": {"method": "PUT", "url": "Patient?address-city:contains=nowhere"}}]});
    let (status, outcome) = server
        .json(reqwest::Method::POST, "/fhir", &transaction)
        .await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{outcome}");
    assert_eq!(server.count("patient").await, before);
}
