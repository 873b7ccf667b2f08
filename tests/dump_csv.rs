//! `GET /[type]/$dump-csv`: the seed's CSV exactly, RFC 4180 quoting, `_since`, `gzip`,
//! errors.

mod common;

use std::io::Read;

use common::{diagnostics, seed, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn csv(server: &TestServer, path: &str) -> String {
    let response = server.get_ok(path).await;
    assert_eq!(response.headers()["content-type"], "text/csv");
    assert_eq!(response.headers()["transfer-encoding"], "chunked");
    response.text().await.expect("body")
}

#[tokio::test]
async fn the_seeds_csv() {
    let server = TestServer::start().await;
    let (status, body) = server
        .yaml(Method::POST, "/", &seed("post-sample-data-bundle.yaml"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        csv(&server, "/Patient/$dump-csv").await,
        "citizenship.0.code.text,id,name.0.given.0,resourceType\r\n,pt-1,Alice,Patient\r\n,pt-2,Bob,Patient\r\nru,pt-3,Charles,Patient\r\n"
    );
    let appointments = csv(&server, "/Appointment/$dump-csv").await;
    assert_eq!(
        appointments.split("\r\n").next(),
        Some("id,participant.0.actor.id,participant.0.actor.resourceType,participant.0.status,resourceType,status")
    );
    assert!(
        appointments.contains("\r\nap-2,pt-1,Patient,accepted,Appointment,booked\r\n"),
        "{appointments}"
    );
    let (status, _) = server.get("/fhir/Patient/$dump-csv").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "native format only, off the FHIR routes"
    );
}

#[tokio::test]
async fn quoting_missing_values_since_and_gzip() {
    let server = TestServer::start().await;
    server
        .json(
            Method::PUT,
            "/Patient/a",
            &json!({"name": [{"text": "Smith, \"Jo\"\nline two", "given": ["x", "y"]}], "active": true, "multipleBirthInteger": 2}),
        )
        .await;
    let middle = chrono::Utc::now();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    server
        .json(Method::PUT, "/Patient/b", &json!({"gender": null}))
        .await;
    let text = csv(&server, "/Patient/$dump-csv").await;
    let mut lines = text.split("\r\n");
    assert_eq!(
        lines.next(),
        Some("active,gender,id,multipleBirthInteger,name.0.given.0,name.0.given.1,name.0.text,resourceType")
    );
    let rest: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    assert!(
        rest.contains(&"true,,a,2,x,y,\"Smith, \"\"Jo\"\"\nline two\",Patient"),
        "{text}"
    );
    assert!(
        rest.contains(&",,b,,,,,Patient"),
        "a null is an empty field: {text}"
    );

    let since = middle.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    assert_eq!(
        csv(&server, &format!("/Patient/$dump-csv?_since={since}")).await,
        "gender,id,resourceType\r\n,b,Patient\r\n"
    );
    let response = server
        .request(Method::GET, "/Patient/$dump-csv?gzip=true")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let mut plain = String::new();
    flate2::read::GzDecoder::new(&response.bytes().await.expect("body")[..])
        .read_to_string(&mut plain)
        .expect("gzip");
    assert_eq!(plain, text);
    assert_eq!(
        csv(&server, "/Observation/$dump-csv").await,
        "",
        "no resources, no columns"
    );
    for (path, status, message) in [
        (
            "/Patient/$dump-csv?fhir=true",
            StatusCode::BAD_REQUEST,
            "unknown parameter 'fhir'",
        ),
        (
            "/Patient/$dump-csv?_since=soon",
            StatusCode::BAD_REQUEST,
            "invalid _since",
        ),
        (
            "/Nope/$dump-csv",
            StatusCode::NOT_FOUND,
            "unknown resource type",
        ),
    ] {
        let (got, outcome): (StatusCode, Value) = server.get(path).await;
        assert_eq!(got, status, "{path}");
        assert!(diagnostics(&outcome).contains(message), "{path}: {outcome}");
    }
}
