//! The search of several types at once, `GET /fhir?_type=A,B&...`: type by type in
//! `_type`'s order, pages that neither repeat nor skip, totals summed, parameters that
//! must mean something for every type; one type is that type's search; and each type is
//! authorized as its own search (the attack: reading Patients through a client allowed
//! Observations, by naming both).

mod common;

use common::search::{chain_world, next_path, searcher_of};
use common::TestServer;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["search"]["mode"] == "match")
        .map(|e| {
            format!(
                "{}/{}",
                e["resource"]["resourceType"].as_str().unwrap_or("?"),
                e["resource"]["id"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

#[tokio::test]
async fn several_types_come_type_by_type_in_pages() {
    let server = TestServer::start().await;
    chain_world(&server).await;
    let mut path = "/fhir?_type=Patient,Observation&_count=3".to_string();
    let mut pages = Vec::new();
    loop {
        let (status, bundle) = server.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {bundle}");
        pages.push(ids(&bundle));
        match next_path(&server, &bundle) {
            Some(next) => path = next,
            None => break,
        }
    }
    assert_eq!(
        pages,
        [
            vec!["Patient/p1", "Patient/p2", "Patient/p3"],
            vec!["Observation/o1", "Observation/o2", "Observation/o3"],
            vec!["Observation/o4"],
        ]
    );

    // Common parameters filter every type; totals add up.
    let (status, bundle) = server
        .get("/fhir?_type=Observation,Patient&_id=p2,o3,acme&_total=accurate")
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(ids(&bundle), ["Observation/o3", "Patient/p2"]);
    assert_eq!(bundle["total"], 2);
    let (_, bundle) = server
        .get("/fhir?_type=Patient,Observation,Organization&_summary=count")
        .await;
    assert_eq!(bundle["total"], 9, "{bundle}");
    assert!(bundle.get("entry").is_none());

    // One type is that type's search.
    let (status, bundle) = server.get("/fhir?_type=Observation&status=amended").await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(ids(&bundle), ["Observation/o2"]);
    assert!(bundle["link"][0]["url"]
        .as_str()
        .unwrap_or_default()
        .contains("/fhir/Observation?"));

    // What cannot be answered for every type, or at all, is refused by name.
    let mut answers = Vec::new();
    for query in [
        "/fhir?_type=Patient,Observation&status=final",
        "/fhir?_type=Patient,Observation&_sort=_id",
        "/fhir?_type=Patient,Nothing",
        "/fhir?status=final",
    ] {
        let (status, outcome) = server.get(query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {outcome}");
        answers.push(json!({"query": query, "outcome": outcome}));
    }
    insta::assert_snapshot!(common::pretty(&answers));
}

#[tokio::test]
async fn each_type_is_authorized_as_its_own_search() {
    let (server, get) = searcher_of("/fhir/Observation").await;
    // Its own type, asked the system way: fine (it is that search).
    let (status, bundle) = server.send(get(&server, "/fhir?_type=Observation")).await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(ids(&bundle).len(), 4);
    // The attack: Patients alongside the Observations it may search.
    let (status, outcome) = server
        .send(get(&server, "/fhir?_type=Observation,Patient"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{outcome}");

    // A client whose policy lets it at the root too is still asked type by type.
    let (status, body) = server
        .json(
            Method::PUT,
            "/",
            &json!([
                {"resourceType": "Client", "id": "rooted", "secret": "pw", "grant_types": ["basic"]},
                {"resourceType": "AccessPolicy", "id": "root-and-observations", "engine": "matcho",
                 "matcho": {"request-method": "get", "uri": {"$one-of": ["/fhir", "/fhir/Observation"]}},
                 "link": [{"resourceType": "Client", "id": "rooted"}]},
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let rooted = |path: &str| {
        server
            .client
            .get(server.url(path))
            .basic_auth("rooted", Some("pw"))
    };
    let (status, bundle) = server
        .send(rooted("/fhir?_type=Observation,Observation&_count=2"))
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    let (status, outcome) = server.send(rooted("/fhir?_type=Observation,Patient")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{outcome}");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or_default()
            .contains("Patient may not be searched here"),
        "{outcome}"
    );
    // And through a chain of one of the types.
    let (status, outcome) = server
        .send(rooted(
            "/fhir?_type=Observation,Observation&subject:Patient.name=smith",
        ))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{outcome}");
}
