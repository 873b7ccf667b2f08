//! A small world for search tests (two organizations, three patients, four observations)
//! and a Client that may search one path only.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::TestServer;

/// Two organizations, three patients, observations on them.
pub async fn chain_world(server: &TestServer) {
    let (status, body) = server
        .json(
            Method::PUT,
            "/fhir/Organization/acme",
            &json!({"resourceType": "Organization", "id": "acme", "name": "Acme Clinic"}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    server
        .json(
            Method::PUT,
            "/fhir/Organization/other",
            &json!({"resourceType": "Organization", "id": "other", "name": "Other"}),
        )
        .await;
    for (id, family, org) in [
        ("p1", "Smith", "acme"),
        ("p2", "Smythe", "other"),
        ("p3", "Jones", "acme"),
    ] {
        let patient = json!({"resourceType": "Patient", "id": id, "name": [{"family": family}],
                             "managingOrganization": {"reference": format!("Organization/{org}")}});
        let (status, body) = server
            .json(Method::PUT, &format!("/fhir/Patient/{id}"), &patient)
            .await;
        assert!(status.is_success(), "{body}");
    }
    for (id, patient) in [("o1", "p1"), ("o2", "p2"), ("o3", "p3"), ("o4", "p1")] {
        let status = if id == "o2" { "amended" } else { "final" };
        let observation = json!({"resourceType": "Observation", "id": id, "status": status,
                                 "code": {"text": "x"}, "subject": {"reference": format!("Patient/{patient}")}});
        let (status, body) = server
            .json(
                Method::PUT,
                &format!("/fhir/Observation/{id}"),
                &observation,
            )
            .await;
        assert!(status.is_success(), "{body}");
    }
}

pub fn ids_of(bundle: &Value) -> Vec<String> {
    let mut ids: Vec<String> = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["resource"]["id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

/// The chain world, and a Client whose only AccessPolicy lets it search `path`: a function
/// that makes its GETs.
pub async fn searcher_of(
    path: &'static str,
) -> (
    TestServer,
    impl Fn(&TestServer, &str) -> reqwest::RequestBuilder,
) {
    let server = TestServer::start().await;
    chain_world(&server).await;
    let (status, body) = server
        .json(
            Method::PUT,
            "/",
            &json!([
                {"resourceType": "Client", "id": "searcher", "secret": "pw", "grant_types": ["basic"]},
                {"resourceType": "AccessPolicy", "id": "search-one-type", "engine": "matcho",
                 "matcho": {"request-method": "get", "uri": {"$one-of": [path]}},
                 "link": [{"resourceType": "Client", "id": "searcher"}]},
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let get = |server: &TestServer, path: &str| {
        server
            .client
            .get(server.url(path))
            .basic_auth("searcher", Some("pw"))
    };
    (server, get)
}

/// The path (from the server's root) of a searchset's `next` link, if it has one.
pub fn next_path(server: &TestServer, bundle: &Value) -> Option<String> {
    let next = bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == "next")?["url"]
        .as_str()?;
    Some(
        next.strip_prefix(&server.url(""))
            .expect("ours")
            .to_string(),
    )
}
