//! `$export` against the Bulk Data IG 3.0.0: what real clients tripped on (a manifest file
//! that was gone, types outside the compartment), the SHALLs (transactionTime, Provenance,
//! files accessible), the SHOULDs (deleted resources, patients by reference, poll limits,
//! Groups by identifier) and the STU3 parameters (`_until`, `_elements`,
//! `allowPartialManifests`, `organizeOutputBy`). Every manifest these tests fetch has each of
//! its URLs downloaded (`common::export::manifest`).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::export::{
    as_root, download, exported_ids, ids, kick_off, manifest, set, small_world, start, waiting_job,
};
use common::fixtures::{Fixture, FixtureServer};
use common::{diagnostics, JobOptions, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// The lines of an export file.
async fn lines(server: &TestServer, url: &str) -> Vec<Value> {
    let text = as_root(server, Method::GET, url)
        .send()
        .await
        .expect("download")
        .text()
        .await
        .expect("file");
    text.lines()
        .map(|line| serde_json::from_str(line).expect("a line of JSON"))
        .collect()
}

/// The warnings of a manifest's error files, as one text.
async fn warnings(server: &TestServer, manifest: &Value) -> String {
    let mut text = String::new();
    for entry in manifest["error"].as_array().into_iter().flatten() {
        for outcome in lines(server, entry["url"].as_str().expect("url")).await {
            text.push_str(&outcome["issue"][0]["diagnostics"].to_string());
        }
    }
    text
}

#[tokio::test]
async fn every_file_of_a_lenient_system_export_without_type_answers() {
    // bulk-data-client --global aborted here: the OperationOutcome type's own task deleted
    // the warnings file the manifest listed.
    let server = TestServer::start().await;
    small_world(&server).await;
    let (status, body, location) = kick_off(
        &server,
        Method::GET,
        "/fhir/$export?includeAssociatedData=LatestProvenanceResources",
        None,
        &[("prefer", "handling=lenient")],
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let manifest = manifest(&server, &location.expect("location")).await;
    assert_eq!(
        manifest["error"].as_array().map(Vec::len),
        Some(1),
        "{manifest}"
    );
    assert!(warnings(&server, &manifest)
        .await
        .contains("includeAssociatedData"));
    let exported = download(&server, &manifest).await;
    assert_eq!(ids(&exported["Patient"]), set(&["p1", "p2", "p3"]));
}

#[tokio::test]
async fn group_exports_drop_types_outside_the_compartment_and_say_so() {
    let server = TestServer::start().await;
    small_world(&server).await;
    server.put_fhir(&json!({"resourceType": "Device", "id": "pump", "patient": {"reference": "Patient/p1"}}))
    .await;
    server
        .put_fhir(&json!({"resourceType": "Device", "id": "spare"}))
        .await;
    // smart-fetch bulk --group asks for Device among its defaults; Organization is not the
    // patients' either.
    let status_url = start(
        &server,
        "/fhir/Group/g/$export?_type=Patient,Device,Organization",
    )
    .await;
    let manifest = manifest(&server, &status_url).await;
    let exported = download(&server, &manifest).await;
    assert_eq!(
        ids(&exported["Device"]),
        set(&["pump"]),
        "Device.patient links it"
    );
    assert!(!exported.contains_key("Organization"));
    let said = warnings(&server, &manifest).await;
    assert!(
        said.contains("Organization") && !said.contains("Device"),
        "{said}"
    );
    // Nothing exportable at all is still an error.
    let (status, body, _) = kick_off(
        &server,
        Method::GET,
        "/fhir/Group/g/$export?_type=Organization",
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn resources_are_exported_as_they_were_at_transaction_time() {
    let (first, status_url, job) = waiting_job("/fhir/$export?_type=Patient,Observation").await;
    // While the export waits: an update, a delete, a creation, and a $load that replaces
    // without asking for history.
    first
        .put_fhir(&json!({"resourceType": "Patient", "id": "p1", "gender": "female"}))
        .await;
    let (status, _) = first.delete("/fhir/Observation/o1").await;
    assert!(status.is_success());
    first.put_fhir(&json!({"resourceType": "Observation", "id": "o-new", "status": "final", "code": {"text": "x"}})).await;
    let file = b"{\"resourceType\":\"Patient\",\"id\":\"p2\",\"gender\":\"male\"}\n".to_vec();
    let fixtures = FixtureServer::start(vec![("/p2.ndjson", Fixture::Bytes(file))]).await;
    let (status, body) = first
        .json(
            Method::POST,
            "/fhir/Patient/$load",
            &json!({"source": fixtures.url("/p2.ndjson")}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A process with workers runs the job now.
    let second = TestServer::start_on(first.database.clone(), JobOptions::default()).await;
    let manifest = manifest(&second, &second.url(&format!("/fhir/$export-status/{job}"))).await;
    assert!(status_url.ends_with(&job));
    let exported = download(&second, &manifest).await;
    assert_eq!(ids(&exported["Patient"]), set(&["p1", "p2", "p3"]));
    for patient in &exported["Patient"] {
        assert!(
            patient.get("gender").is_none(),
            "the version at transactionTime: {patient}"
        );
    }
    assert_eq!(
        ids(&exported["Observation"]),
        set(&["o1", "o2", "o3", "o-group"])
    );
}

#[tokio::test]
async fn provenance_of_compartment_resources_comes_with_a_group_export() {
    let server = TestServer::start().await;
    small_world(&server).await;
    let provenance = |id: &str, target: &str| {
        json!({"resourceType": "Provenance", "id": id, "recorded": "2024-01-01T00:00:00Z",
               "agent": [{"who": {"reference": "Organization/org"}}],
               "target": [{"reference": target}]})
    };
    server
        .put_fhir(&provenance("of-o1", "Observation/o1"))
        .await;
    server.put_fhir(&provenance("of-p2", "Patient/p2")).await;
    server
        .put_fhir(&provenance("of-o3", "Observation/o3"))
        .await; // p3 is an inactive member
    server
        .put_fhir(&provenance("of-org", "Organization/org"))
        .await;
    let exported = exported_ids(&server, "/fhir/Group/g/$export?_type=Provenance").await;
    assert_eq!(exported["Provenance"], set(&["of-o1", "of-p2"]));
    let everyone = exported_ids(&server, "/fhir/Patient/$export?_type=Provenance").await;
    assert_eq!(everyone["Provenance"], set(&["of-o1", "of-p2", "of-o3"]));
}

#[tokio::test]
async fn patients_are_named_by_reference_and_strangers_are_refused() {
    let server = TestServer::start().await;
    small_world(&server).await;
    let exported = exported_ids(
        &server,
        "/fhir/Patient/$export?patient=Patient/p1&_type=Patient,Observation",
    )
    .await;
    assert_eq!(exported["Patient"], set(&["p1"]));
    assert_eq!(exported["Observation"], set(&["o1"]));
    for (path, named) in [
        (
            "/fhir/Patient/$export?patient=Patient/nobody",
            "Patient/nobody",
        ),
        ("/fhir/Group/g/$export?patient=Patient/p3", "Patient/p3"),
        ("/fhir/Patient/$export?patient=Group/g", "Group/g"),
    ] {
        let (status, body, _) = kick_off(&server, Method::GET, path, None, &[]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert!(diagnostics(&body).contains(named), "{body}");
    }
}

#[tokio::test]
async fn deletions_since_come_as_bundles_of_deletes() {
    let server = TestServer::start().await;
    small_world(&server).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let since = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, _) = server.delete("/fhir/Observation/o2").await;
    assert!(status.is_success());
    server.put_fhir(&json!({"resourceType": "Observation", "id": "o3", "status": "amended", "code": {"text": "x"}})).await;
    let path = format!(
        "/fhir/$export?_type=Observation,Patient&_since={}",
        since.format("%Y-%m-%dT%H:%M:%S%.6fZ")
    );
    let status_url = start(&server, &path).await;
    let since_manifest = manifest(&server, &status_url).await;
    let exported = download(&server, &since_manifest).await;
    assert_eq!(ids(&exported["Observation"]), set(&["o3"]));
    assert!(!exported.contains_key("Patient"));
    let deleted = since_manifest["deleted"].as_array().expect("deleted");
    assert_eq!(deleted.len(), 1, "{since_manifest}");
    assert_eq!(deleted[0]["type"], "Bundle");
    let bundles = lines(&server, deleted[0]["url"].as_str().expect("url")).await;
    assert_eq!(
        bundles,
        [json!({"resourceType": "Bundle", "type": "transaction",
                "entry": [{"request": {"method": "DELETE", "url": "Observation/o2"}}]})]
    );
    // Without _since, no deleted files.
    let status_url = start(&server, "/fhir/$export?_type=Observation").await;
    let plain = manifest(&server, &status_url).await;
    assert_eq!(plain["deleted"], json!([]));
}

#[tokio::test]
async fn until_and_elements() {
    let server = TestServer::start().await;
    small_world(&server).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let until = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    server.put_fhir(&json!({"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "2000-01-01"})).await;
    let path = format!(
        "/fhir/$export?_type=Patient&_until={}",
        until.format("%Y-%m-%dT%H:%M:%S%.6fZ")
    );
    let exported = exported_ids(&server, &path).await;
    assert_eq!(
        exported["Patient"],
        set(&["p2", "p3"]),
        "p1 changed after _until"
    );

    let status_url = start(
        &server,
        "/fhir/$export?_type=Patient,Observation&_elements=Patient.gender",
    )
    .await;
    let manifest = manifest(&server, &status_url).await;
    let exported = download(&server, &manifest).await;
    let p1 = exported["Patient"]
        .iter()
        .find(|p| p["id"] == "p1")
        .expect("p1");
    assert_eq!(p1["gender"], "female");
    assert!(p1.get("birthDate").is_none(), "{p1}");
    assert_eq!(p1["meta"]["tag"][0]["code"], "SUBSETTED");
    let o1 = exported["Observation"]
        .iter()
        .find(|o| o["id"] == "o1")
        .expect("o1");
    assert_eq!(
        o1["category"][0]["coding"][0]["code"], "laboratory",
        "no element named: whole"
    );
}

#[tokio::test]
async fn output_organized_by_patient_comes_in_blocks() {
    let server = TestServer::start().await;
    small_world(&server).await;
    let status_url = start(
        &server,
        "/fhir/Group/g/$export?organizeOutputBy=Patient&_type=Patient,Observation",
    )
    .await;
    let manifest = manifest(&server, &status_url).await;
    assert_eq!(manifest["outputOrganizedBy"], "Patient");
    let mut blocks: Vec<(String, Vec<String>)> = Vec::new();
    for entry in manifest["output"].as_array().expect("output") {
        assert!(entry.get("type").is_none(), "{entry}");
        let lines = lines(&server, entry["url"].as_str().expect("url")).await;
        // `count` is of resources, the headers not counted (the reference client checks it).
        let resources = lines
            .iter()
            .filter(|l| l["resourceType"] != "Parameters")
            .count();
        assert_eq!(entry["count"], resources, "{entry}");
        for line in lines {
            if line["resourceType"] == "Parameters" {
                assert_eq!(line["parameter"][0]["name"], "header");
                let patient = line["parameter"][0]["valueReference"]["reference"]
                    .as_str()
                    .expect("reference");
                blocks.push((patient.to_string(), Vec::new()));
            } else {
                let block = blocks.last_mut().expect("a header first");
                block.1.push(format!(
                    "{}/{}",
                    line["resourceType"].as_str().expect("type"),
                    line["id"].as_str().expect("id")
                ));
            }
        }
    }
    assert_eq!(
        blocks,
        [
            (
                "Patient/p1".to_string(),
                vec!["Patient/p1".to_string(), "Observation/o1".to_string()]
            ),
            (
                "Patient/p2".to_string(),
                vec!["Patient/p2".to_string(), "Observation/o2".to_string()]
            ),
        ]
    );
}

#[tokio::test]
async fn partial_manifests_list_the_types_finished_so_far() {
    let server = TestServer::start().await;
    small_world(&server).await;
    // The Observation task waits for this lock: the Patient task finishes first.
    let db = server.db().await;
    db.batch_execute("BEGIN; LOCK TABLE observation IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let status_url = start(
        &server,
        "/fhir/$export?_type=Patient,Observation&allowPartialManifests=true",
    )
    .await;
    let first_page = loop {
        let response = as_root(&server, Method::GET, &status_url)
            .send()
            .await
            .expect("poll");
        match response.status() {
            StatusCode::ACCEPTED if response.headers().get("content-type").is_some() => {
                assert!(response.headers().get("link").is_none());
                break response.json::<Value>().await.expect("a partial manifest");
            }
            StatusCode::ACCEPTED | StatusCode::TOO_MANY_REQUESTS => {
                tokio::time::sleep(Duration::from_millis(600)).await
            }
            other => panic!("{other}"),
        }
    };
    let types: BTreeSet<&str> = first_page["output"]
        .as_array()
        .expect("output")
        .iter()
        .filter_map(|o| o["type"].as_str())
        .collect();
    assert_eq!(types, BTreeSet::from(["Patient"]), "{first_page}");
    common::export::every_url_answers(&server, &first_page).await;

    db.batch_execute("COMMIT").await.expect("unlock");
    let done = manifest(&server, &status_url).await;
    // Page 1 is what it was, with a link to page 2, which has the rest.
    let next = done["link"][0]["url"]
        .as_str()
        .expect("a next page")
        .to_string();
    assert_eq!(done["link"][0]["relation"], "next");
    let mut unlinked = done.clone();
    unlinked.as_object_mut().expect("object").remove("link");
    assert_eq!(unlinked, first_page);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let response = as_root(&server, Method::GET, &next)
        .send()
        .await
        .expect("page 2");
    assert_eq!(response.status(), StatusCode::OK);
    let second_page: Value = response.json().await.expect("page 2");
    common::export::every_url_answers(&server, &second_page).await;
    let exported = download(&server, &second_page).await;
    assert_eq!(
        ids(&exported["Observation"]),
        set(&["o1", "o2", "o3", "o-group"])
    );
    assert!(second_page.get("link").is_none());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, _) = server
        .send(as_root(
            &server,
            Method::GET,
            &format!("{status_url}?page=3"),
        ))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn polling_faster_than_retry_after_is_refused() {
    let (server, status_url, job) = waiting_job("/fhir/$export?_type=Patient").await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let response = as_root(&server, Method::GET, &status_url)
            .send()
            .await
            .expect("poll");
        statuses.push(response.status());
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(response.headers().contains_key("retry-after"));
            let body: Value = response.json().await.expect("an OperationOutcome");
            assert!(diagnostics(&body).contains(&job), "{body}");
        } else {
            let progress = response.headers()["x-progress"]
                .to_str()
                .expect("ascii")
                .to_string();
            assert!(
                progress.starts_with("0% ") && progress.len() < 100,
                "{progress}"
            );
        }
    }
    assert_eq!(&statuses[..5], [StatusCode::ACCEPTED; 5]);
    assert!(
        statuses[5..]
            .iter()
            .all(|s| *s == StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    // Waiting as told is enough.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let response = as_root(&server, Method::GET, &status_url)
        .send()
        .await
        .expect("poll");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn groups_are_found_by_identifier_and_filters_are_discoverable() {
    let server = TestServer::start().await;
    small_world(&server).await;
    server.put_fhir(&json!({"resourceType": "Group", "id": "cohort", "type": "person", "actual": true,
                        "identifier": [{"system": "https://example.org/cohorts", "value": "diabetes-2024"}]})).await;
    let (status, bundle) = server
        .get("/fhir/Group?identifier=https://example.org/cohorts%7Cdiabetes-2024")
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    let found: Vec<&str> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["resource"]["id"].as_str())
        .collect();
    assert_eq!(found, ["cohort"]);
    let (_, none) = server
        .get("/fhir/Group?identifier=https://example.org/cohorts%7Cother")
        .await;
    assert!(none["entry"].as_array().is_none_or(Vec::is_empty), "{none}");
    let (status, body) = server
        .send(
            server
                .request(Method::GET, "/fhir/Group?shoe-size=x")
                .header("prefer", "handling=strict"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        diagnostics(&body).contains("no search parameter 'shoe-size'"),
        "the message names it: {body}"
    );

    let (_, statement) = server.get("/fhir/metadata").await;
    let observation = statement["rest"][0]["resource"]
        .as_array()
        .expect("resources")
        .iter()
        .find(|r| r["type"] == "Observation")
        .expect("Observation");
    let params: Vec<&str> = observation["searchParam"]
        .as_array()
        .expect("searchParam")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(
        params.contains(&"category") && params.contains(&"code"),
        "{params:?}"
    );
}

#[tokio::test]
async fn an_interrupted_download_resumes_with_a_range() {
    let server = TestServer::start().await;
    small_world(&server).await;
    let status_url = start(&server, "/fhir/$export?_type=Patient").await;
    let manifest = manifest(&server, &status_url).await;
    let url = manifest["output"][0]["url"]
        .as_str()
        .expect("url")
        .to_string();
    let whole = as_root(&server, Method::GET, &url)
        .header("accept-encoding", "identity")
        .send()
        .await
        .expect("download");
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    let whole = whole.bytes().await.expect("file");
    assert!(whole.len() > 20);
    for (range, expected) in [
        ("bytes=10-", &whole[10..]),
        ("bytes=0-9", &whole[..10]),
        ("bytes=-5", &whole[whole.len() - 5..]),
    ] {
        let response = as_root(&server, Method::GET, &url)
            .header("range", range)
            .header("accept-encoding", "gzip")
            .send()
            .await
            .expect("range");
        assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert!(response.headers()["content-range"]
            .to_str()
            .expect("ascii")
            .ends_with(&format!("/{}", whole.len())));
        assert!(
            response.headers().get("content-encoding").is_none(),
            "a range is of the file's bytes"
        );
        assert_eq!(
            &response.bytes().await.expect("part")[..],
            expected,
            "{range}"
        );
    }
    let past = as_root(&server, Method::GET, &url)
        .header("range", format!("bytes={}-", whole.len()))
        .send()
        .await
        .expect("range");
    assert_eq!(past.status(), StatusCode::RANGE_NOT_SATISFIABLE);
}
