//! `$export` from the client's side, as the IG describes it: kick-off, polling, the manifest,
//! downloads. Shared by the export test files.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::{JobOptions, TestServer, ROOT_PASSWORD};

pub const FHIR_JSON: &str = "application/fhir+json";

/// A kick-off as root with the IG's headers (plus `extra`); returns the status, the body and
/// the Content-Location.
pub async fn kick_off(
    server: &TestServer,
    method: Method,
    path: &str,
    body: Option<&Value>,
    extra: &[(&str, &str)],
) -> (StatusCode, Value, Option<String>) {
    let mut request = server
        .request(method, path)
        .header("accept", FHIR_JSON)
        .header("prefer", "respond-async");
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", FHIR_JSON)
            .body(body.to_string());
    }
    let response = request.send().await.expect("kick-off sent");
    let status = response.status();
    let location = response
        .headers()
        .get("content-location")
        .map(|v| v.to_str().expect("ascii").to_string());
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body, location)
}

/// Starts an export that must be accepted; returns the status URL.
pub async fn start(server: &TestServer, path: &str) -> String {
    let (status, body, location) = kick_off(server, Method::GET, path, None, &[]).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{path}: {body}");
    location.expect("Content-Location")
}

/// Polls a status URL as the IG says (waiting `Retry-After` when told to) until the manifest
/// arrives; then fetches every URL the manifest lists (`output`, `deleted`, `error`): the IG
/// says they SHALL be accessible, and every export test checks it this way.
pub async fn manifest(server: &TestServer, status_url: &str) -> Value {
    for _ in 0..600 {
        let response = as_root(server, Method::GET, status_url)
            .header("accept", "application/json")
            .send()
            .await
            .expect("poll");
        let retry = || -> u64 {
            response.headers()["retry-after"]
                .to_str()
                .expect("ascii")
                .parse()
                .expect("Retry-After in seconds")
        };
        match response.status() {
            StatusCode::ACCEPTED => {
                let retry = retry();
                assert!(response.headers().contains_key("x-progress"));
                tokio::time::sleep(Duration::from_millis(200).min(Duration::from_secs(retry)))
                    .await;
            }
            // Polled faster than asked: wait as told.
            StatusCode::TOO_MANY_REQUESTS => {
                tokio::time::sleep(Duration::from_secs(retry())).await;
            }
            StatusCode::OK => {
                let manifest: Value = response.json().await.expect("manifest");
                every_url_answers(server, &manifest).await;
                return manifest;
            }
            other => panic!(
                "status {other}: {}",
                response.text().await.unwrap_or_default()
            ),
        }
    }
    panic!("the export did not finish");
}

/// Every file a manifest lists answers 200 (NDJSON when named so).
pub async fn every_url_answers(server: &TestServer, manifest: &Value) {
    for list in ["output", "deleted", "error"] {
        for entry in manifest[list].as_array().into_iter().flatten() {
            let url = entry["url"].as_str().expect("url");
            let response = as_root(server, Method::GET, url)
                .send()
                .await
                .expect("download");
            assert_eq!(response.status(), StatusCode::OK, "{list}: {entry}");
            let text = response.bytes().await.expect("file");
            // (View exports also write CSV and Parquet files.)
            if url.ends_with(".ndjson") {
                assert!(
                    String::from_utf8_lossy(&text)
                        .lines()
                        .all(|line| serde_json::from_str::<Value>(line).is_ok()),
                    "{url} is not NDJSON"
                );
            }
        }
    }
}

/// Downloads every output file of a manifest: resources by type.
pub async fn download(server: &TestServer, manifest: &Value) -> BTreeMap<String, Vec<Value>> {
    let mut by_type: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for entry in manifest["output"].as_array().expect("output") {
        let response = server
            .client
            .get(entry["url"].as_str().expect("url"))
            .basic_auth("root", Some(ROOT_PASSWORD))
            .header("accept", "application/fhir+ndjson")
            .send()
            .await
            .expect("download");
        assert_eq!(response.status(), StatusCode::OK, "{entry}");
        assert_eq!(
            response.headers()["content-type"],
            "application/fhir+ndjson"
        );
        let text = response.text().await.expect("file");
        let lines: Vec<Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).expect("one resource a line"))
            .collect();
        assert_eq!(
            lines.len() as u64,
            entry["count"].as_u64().expect("count"),
            "{entry}"
        );
        let type_name = entry["type"].as_str().expect("type");
        assert!(lines.iter().all(|r| r["resourceType"] == type_name));
        by_type
            .entry(type_name.to_string())
            .or_default()
            .extend(lines);
    }
    by_type
}

/// A request as root to an absolute URL (the ones the server hands out).
pub fn as_root(server: &TestServer, method: Method, url: &str) -> reqwest::RequestBuilder {
    server
        .client
        .request(method, url)
        .basic_auth("root", Some(ROOT_PASSWORD))
}

/// The job id at the end of a status URL.
pub fn job_of(status_url: &str) -> String {
    status_url.rsplit('/').next().expect("id").to_string()
}

/// A server without workers (its jobs wait), the small world, and a job started there:
/// the server, the status URL and the job id.
pub async fn waiting_job(path: &str) -> (TestServer, String, String) {
    let server = TestServer::start_with_jobs(JobOptions {
        workers: 0,
        ..JobOptions::default()
    })
    .await;
    small_world(&server).await;
    let status_url = start(&server, path).await;
    let job = job_of(&status_url);
    (server, status_url, job)
}

pub fn ids(resources: &[Value]) -> BTreeSet<String> {
    resources
        .iter()
        .map(|r| r["id"].as_str().expect("id").to_string())
        .collect()
}

/// Patients p1..p3, their Observations (by subject and by performer), an Organization, and a
/// Group of p1 and p2.
pub async fn small_world(server: &TestServer) {
    let mut entries = Vec::new();
    for p in ["p1", "p2", "p3"] {
        entries.push(json!({"resourceType": "Patient", "id": p}));
    }
    let observation = |id: &str, field: &str, patient: &str, category: &str| {
        let mut o = json!({
            "resourceType": "Observation", "id": id, "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
            "code": {"text": "x"},
        });
        let reference = json!({"reference": format!("Patient/{patient}")});
        o[field] = if field == "performer" {
            json!([reference])
        } else {
            reference
        };
        o
    };
    entries.push(observation("o1", "subject", "p1", "laboratory"));
    entries.push(observation("o2", "performer", "p2", "vital-signs"));
    entries.push(observation("o3", "subject", "p3", "laboratory"));
    entries.push(
        json!({"resourceType": "Observation", "id": "o-group", "status": "final",
                        "code": {"text": "x"}, "subject": {"reference": "Group/g"}}),
    );
    entries.push(json!({"resourceType": "Organization", "id": "org"}));
    entries.push(
        json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true,
        "member": [{"entity": {"reference": "Patient/p1"}},
                   {"entity": {"reference": "Patient/p2"}},
                   {"entity": {"reference": "Patient/p3"}, "inactive": true}]}),
    );
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries.iter().map(|r| json!({
        "resource": r,
        "request": {"method": "PUT", "url": format!("{}/{}", r["resourceType"].as_str().unwrap_or_default(), r["id"].as_str().unwrap_or_default())},
    })).collect::<Vec<_>>()});
    let (status, body) = server.json(Method::POST, "/fhir", &bundle).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

pub async fn exported_ids(server: &TestServer, path: &str) -> BTreeMap<String, BTreeSet<String>> {
    let status_url = start(server, path).await;
    let manifest = manifest(server, &status_url).await;
    download(server, &manifest)
        .await
        .into_iter()
        .map(|(type_name, resources)| (type_name, ids(&resources)))
        .collect()
}

pub fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}
