//! `$export` with `_includeHistory=true` (issue 30, part 1): every version of every matching
//! resource with its own `meta.versionId` and `meta.lastUpdated`, and every deletion in the
//! manifest's `deleted` files as a DELETE entry carrying the deletion's version and time, so
//! that another store can replay them. Checked against what `_history` answers for each
//! resource, which is written independently of the export.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::export::{as_root, download, manifest, start};
use common::TestServer;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// A store with updates, deletions and a re-creation; returns the instant between its two
/// halves.
async fn changing_store(server: &TestServer) -> chrono::DateTime<chrono::Utc> {
    let patient =
        |id: &str, gender: &str| json!({"resourceType": "Patient", "id": id, "gender": gender});
    for gender in ["female", "male", "other"] {
        server.put_fhir(&patient("p1", gender)).await;
    }
    server.put_fhir(&patient("p2", "female")).await;
    server.put_fhir(&patient("p3", "male")).await;
    let observation = |status: &str| {
        json!({"resourceType": "Observation", "id": "o1", "status": status,
               "code": {"text": "x"}, "subject": {"reference": "Patient/p1"}})
    };
    server.put_fhir(&observation("preliminary")).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let between = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    server.put_fhir(&observation("final")).await;
    let (status, _) = server.delete("/fhir/Patient/p2").await;
    assert!(status.is_success());
    let (status, _) = server.delete("/fhir/Patient/p3").await;
    assert!(status.is_success());
    server.put_fhir(&patient("p3", "unknown")).await;
    between
}

/// What `_history` says of a resource: its versions (resources) and its deletions
/// (`response` of each DELETE entry).
async fn history(server: &TestServer, path: &str) -> (Vec<Value>, Vec<Value>) {
    let (status, bundle) = server.get(&format!("/fhir/{path}/_history")).await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    let mut versions = Vec::new();
    let mut deletions = Vec::new();
    for entry in bundle["entry"].as_array().expect("entries") {
        match entry["request"]["method"].as_str() {
            Some("DELETE") => deletions.push(entry["response"].clone()),
            _ => versions.push(entry["resource"].clone()),
        }
    }
    (versions, deletions)
}

/// The DELETE entries of a manifest's `deleted` files, by `Type/id`.
async fn deleted_entries(server: &TestServer, manifest: &Value) -> BTreeMap<String, Vec<Value>> {
    let mut by_url: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for file in manifest["deleted"].as_array().expect("deleted") {
        let text = as_root(server, Method::GET, file["url"].as_str().expect("url"))
            .send()
            .await
            .expect("download")
            .text()
            .await
            .expect("text");
        for line in text.lines() {
            let bundle: Value = serde_json::from_str(line).expect("a Bundle");
            assert_eq!(bundle["type"], "transaction");
            for entry in bundle["entry"].as_array().expect("entries") {
                assert_eq!(entry["request"]["method"], "DELETE");
                let url = entry["request"]["url"].as_str().expect("url").to_string();
                by_url
                    .entry(url)
                    .or_default()
                    .push(entry["response"].clone());
            }
        }
    }
    by_url
}

/// Resources by `Type/id`, sorted by version.
fn by_resource(exported: &BTreeMap<String, Vec<Value>>) -> BTreeMap<String, Vec<Value>> {
    let mut by_id: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for resources in exported.values() {
        for resource in resources {
            let key = format!(
                "{}/{}",
                resource["resourceType"].as_str().expect("type"),
                resource["id"].as_str().expect("id")
            );
            by_id.entry(key).or_default().push(resource.clone());
        }
    }
    for versions in by_id.values_mut() {
        versions.sort_by_key(|r| r["meta"]["versionId"].as_str().map(str::to_string));
    }
    by_id
}

fn sorted(mut versions: Vec<Value>) -> Vec<Value> {
    versions.sort_by_key(|r| r["meta"]["versionId"].as_str().map(str::to_string));
    versions
}

#[tokio::test]
async fn every_version_and_every_deletion_is_exported_as_history_has_them() {
    let server = TestServer::start().await;
    changing_store(&server).await;
    let status_url = start(
        &server,
        "/fhir/$export?_type=Patient,Observation&_includeHistory=true",
    )
    .await;
    let listed = manifest(&server, &status_url).await;
    let exported = by_resource(&download(&server, &listed).await);
    let deleted = deleted_entries(&server, &listed).await;

    let mut counts = BTreeMap::new();
    for path in ["Patient/p1", "Patient/p2", "Patient/p3", "Observation/o1"] {
        let (versions, deletions) = history(&server, path).await;
        // Every version, byte for byte as `_history` gives it (versionId, lastUpdated and
        // all), deleted resources' earlier versions included.
        assert_eq!(
            exported.get(path).cloned().unwrap_or_default(),
            sorted(versions.clone()),
            "{path}"
        );
        // Every deletion, with the version and time `_history` gives it.
        assert_eq!(
            deleted.get(path).cloned().unwrap_or_default(),
            deletions,
            "{path}"
        );
        counts.insert(path, (versions.len(), deletions.len()));
    }
    assert_eq!(
        counts,
        BTreeMap::from([
            ("Patient/p1", (3, 0)),
            ("Patient/p2", (1, 1)),
            ("Patient/p3", (2, 1)),
            ("Observation/o1", (2, 0)),
        ])
    );
    let versions: BTreeSet<&str> = deleted["Patient/p2"]
        .iter()
        .filter_map(|r| r["etag"].as_str())
        .collect();
    assert!(
        versions.iter().all(|v| v.starts_with("W/\"")),
        "{versions:?}"
    );

    // Without it, the same store exports one version of each current resource, no deletions.
    let status_url = start(&server, "/fhir/$export?_type=Patient,Observation").await;
    let plain = manifest(&server, &status_url).await;
    let current = by_resource(&download(&server, &plain).await);
    assert!(current.values().all(|versions| versions.len() == 1));
    assert_eq!(
        current.keys().map(String::as_str).collect::<Vec<_>>(),
        ["Observation/o1", "Patient/p1", "Patient/p3"]
    );
    assert_eq!(plain["deleted"], json!([]));
}

#[tokio::test]
async fn history_exports_keep_to_since_and_the_patient_compartment() {
    let server = TestServer::start().await;
    let between = changing_store(&server).await;
    let since = between.format("%Y-%m-%dT%H:%M:%S%.6fZ");
    let status_url = start(
        &server,
        &format!("/fhir/$export?_type=Patient,Observation&_includeHistory=true&_since={since}"),
    )
    .await;
    let listed = manifest(&server, &status_url).await;
    let exported = by_resource(&download(&server, &listed).await);
    // Only the versions written after _since: o1's final one and p3's re-creation.
    let shown: BTreeMap<&str, usize> = exported
        .iter()
        .map(|(k, v)| (k.as_str(), v.len()))
        .collect();
    assert_eq!(
        shown,
        BTreeMap::from([("Observation/o1", 1), ("Patient/p3", 1)])
    );
    assert_eq!(exported["Observation/o1"][0]["status"], "final");
    let deleted = deleted_entries(&server, &listed).await;
    assert_eq!(
        deleted.keys().map(String::as_str).collect::<Vec<_>>(),
        ["Patient/p2", "Patient/p3"]
    );

    // A Patient-level export: the compartment's resources, each with all its versions.
    let status_url = start(
        &server,
        "/fhir/Patient/$export?_type=Observation&_includeHistory=true",
    )
    .await;
    let listed = manifest(&server, &status_url).await;
    let exported = by_resource(&download(&server, &listed).await);
    assert_eq!(exported["Observation/o1"].len(), 2);

    // Patient blocks hold each resource once: the two do not go together.
    let (status, outcome, _) = common::export::kick_off(
        &server,
        Method::GET,
        "/fhir/Patient/$export?_includeHistory=true&organizeOutputBy=Patient",
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
    assert!(outcome.to_string().contains("_includeHistory"), "{outcome}");
}
