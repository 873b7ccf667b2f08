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

/// A version as two stores may differ on it and still hold the same data: without what a
/// server sets for itself (`meta.source`, the createdAt extension).
fn comparable(mut resource: Value) -> Value {
    if let Some(meta) = resource["meta"].as_object_mut() {
        meta.remove("source");
        if let Some(extensions) = meta.get_mut("extension").and_then(Value::as_array_mut) {
            extensions.retain(|e| !e["url"].as_str().unwrap_or_default().contains("createdAt"));
            if extensions.is_empty() {
                meta.remove("extension");
            }
        }
    }
    resource
}

/// A `$dump`'s resources, comparable and in id order.
async fn dumped(server: &TestServer, path: &str) -> Vec<Value> {
    let response = server
        .request(Method::GET, path)
        .send()
        .await
        .expect("dump");
    let text = response.text().await.expect("text");
    let mut lines: Vec<Value> = text
        .lines()
        .map(|line| comparable(serde_json::from_str(line).expect("a resource")))
        .collect();
    lines.sort_by_key(|r| r["id"].as_str().map(str::to_string));
    lines
}

/// Polls an import's status until it ends.
async fn imported(server: &TestServer, id: &str) -> Value {
    for _ in 0..600 {
        let (_, status) = server.get(&format!("/BulkImportStatus/{id}")).await;
        if status["status"] != "in-progress" && !status["status"].is_null() {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the import {id} did not end");
}

/// Every file an export's manifest lists in `output` and `deleted`: (list, type, content).
async fn export_files(server: &TestServer, listed: &Value) -> Vec<(&'static str, String, Vec<u8>)> {
    let mut files = Vec::new();
    for list in ["output", "deleted"] {
        for entry in listed[list].as_array().expect("files") {
            let url = entry["url"].as_str().expect("url");
            let bytes = as_root(server, Method::GET, url)
                .send()
                .await
                .expect("download")
                .bytes()
                .await
                .expect("bytes");
            let type_name = entry["type"].as_str().expect("type").to_string();
            files.push((list, type_name, bytes.to_vec()));
        }
    }
    files
}

/// The round trip of issue 30: a store with updates and deletions, exported with
/// `_includeHistory` and imported in migration mode into an empty store, has the same
/// `_history` for every resource (every version, equal but for what a server sets for
/// itself) and the same current resources; and the import run again changes nothing.
#[tokio::test]
async fn a_history_export_imported_in_migration_mode_makes_the_same_store() {
    let source = TestServer::start().await;
    common::load_synthea(&source).await;
    changing_store(&source).await;
    let status_url = start(&source, "/fhir/$export?_includeHistory=true").await;
    let listed = manifest(&source, &status_url).await;

    // The export's files, served to the second store as an import's sources.
    let mut files = Vec::new();
    let mut inputs = Vec::new();
    for (index, (list, type_name, bytes)) in
        export_files(&source, &listed).await.into_iter().enumerate()
    {
        let path = format!("/{list}-{index}.ndjson");
        inputs.push((type_name, path.clone()));
        files.push((path, common::fixtures::Fixture::Bytes(bytes)));
    }
    let fixtures = common::fixtures::FixtureServer::start(
        files.iter().map(|(p, f)| (p.as_str(), f.clone())).collect(),
    )
    .await;
    let target = TestServer::start().await;
    let body = |id: &str| {
        json!({"id": id, "inputFormat": "application/fhir+ndjson", "mode": "migration",
               "inputs": inputs.iter().map(|(t, p)| json!({"resourceType": t, "url": fixtures.url(p)})).collect::<Vec<_>>()})
    };
    let (status, answer) = target
        .json(Method::POST, "/fhir/$import", &body("migration"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let done = imported(&target, "migration").await;
    assert_eq!(done["status"], "finished", "{done}");

    // Every resource the export named: the same versions and deletions on both sides.
    let mut paths = BTreeSet::new();
    for resources in download(&source, &listed).await.values() {
        for r in resources {
            paths.insert(format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap_or_default(),
                r["id"].as_str().unwrap_or_default()
            ));
        }
    }
    paths.extend(deleted_entries(&source, &listed).await.into_keys());
    assert!(paths.len() > 7000, "{} resources", paths.len());
    let compare = |side: (Vec<Value>, Vec<Value>)| {
        (
            side.0.into_iter().map(comparable).collect::<Vec<_>>(),
            side.1,
        )
    };
    // Every resource with more than one version, and one in 50 of the others (a request
    // each: all 7,000 take 40 s).
    let changed = ["Patient/p1", "Patient/p2", "Patient/p3", "Observation/o1"];
    let sampled = paths
        .iter()
        .enumerate()
        .filter(|(index, path)| index % 50 == 0 || changed.contains(&path.as_str()));
    for (_, path) in sampled {
        let before = compare(history(&source, path).await);
        let after = compare(history(&target, path).await);
        assert_eq!(after, before, "{path}");
    }
    // The current resources of every type, as `$dump` gives them.
    let types = listed["output"].as_array().expect("output").iter();
    for type_name in types.filter_map(|o| o["type"].as_str()) {
        let path = format!("/fhir/{type_name}/$dump");
        assert_eq!(
            dumped(&target, &path).await,
            dumped(&source, &path).await,
            "{type_name}"
        );
    }
    // New writes on the target get newer versions than any imported.
    target
        .put_fhir(&json!({"resourceType": "Patient", "id": "p1", "gender": "female"}))
        .await;
    let (versions, _) = history(&target, "Patient/p1").await;
    let numbers: Vec<i64> = versions
        .iter()
        .filter_map(|v| v["meta"]["versionId"].as_str()?.parse().ok())
        .collect();
    assert_eq!(numbers.len(), 4);
    assert!(
        numbers.iter().max() == numbers.last() || numbers.iter().max() == numbers.first(),
        "{numbers:?}"
    );

    // Run again: nothing changes (every version is there with the same content).
    let (status, answer) = target
        .json(Method::POST, "/fhir/$import", &body("again"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(imported(&target, "again").await["status"], "finished");
    let (versions, _) = history(&target, "Patient/p1").await;
    assert_eq!(versions.len(), 4, "the same versions again are skipped");
}

/// What migration mode refuses: a version stored already with other content (naming the
/// line), a line without its version, and anyone but root.
#[tokio::test]
async fn migration_mode_refuses_rewriting_a_version_and_is_roots_only() {
    let server = TestServer::start().await;
    server
        .put_fhir(&json!({"resourceType": "Patient", "id": "p1", "gender": "female"}))
        .await;
    let (_, stored) = server.get("/fhir/Patient/p1").await;
    let version = stored["meta"]["versionId"]
        .as_str()
        .expect("versionId")
        .to_string();
    let at = stored["meta"]["lastUpdated"].clone();
    let line = |gender: &str, version: &str| {
        json!({"resourceType": "Patient", "id": "p1", "gender": gender,
               "meta": {"versionId": version, "lastUpdated": at}})
        .to_string()
    };
    let files = [
        ("/same.ndjson", format!("{}\n", line("female", &version))),
        (
            "/other.ndjson",
            format!("{}\n{}\n", line("female", "1"), line("male", &version)),
        ),
        (
            "/bare.ndjson",
            "{\"resourceType\": \"Patient\", \"id\": \"p9\"}\n".to_string(),
        ),
    ];
    let fixtures = common::fixtures::FixtureServer::start(
        files
            .iter()
            .map(|(p, text)| {
                (
                    *p,
                    common::fixtures::Fixture::Bytes(text.clone().into_bytes()),
                )
            })
            .collect(),
    )
    .await;
    let run = |id: &'static str, path: &str| {
        let body = json!({"id": id, "inputFormat": "application/fhir+ndjson", "mode": "migration",
            "inputs": [{"resourceType": "Patient", "url": fixtures.url(path)}]});
        let server = &server;
        async move {
            let (status, answer) = server.json(Method::POST, "/fhir/$import", &body).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
            imported(server, id).await
        }
    };
    assert_eq!(run("same", "/same.ndjson").await["status"], "finished");
    let refused = run("other", "/other.ndjson").await;
    let error = refused["inputs"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!(
            "line 2: Patient/p1 version {version} is stored already"
        )),
        "{refused}"
    );
    let (versions, _) = history(&server, "Patient/p1").await;
    assert_eq!(
        versions.len(),
        1,
        "nothing of the refused input was written"
    );
    let bare = run("bare", "/bare.ndjson").await;
    let error = bare["inputs"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("line 1: meta.versionId"), "{bare}");

    let (status, body) = server.yaml(Method::PUT, "/", "- {resourceType: Client, id: c, secret: s, grant_types: [basic]}\n- {resourceType: AccessPolicy, id: all, engine: allow, link: [{id: c, resourceType: Client}]}\n").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let response = server
        .client
        .post(server.url("/fhir/$import"))
        .basic_auth("c", Some("s"))
        .json(&json!({"mode": "migration", "inputs": [{"resourceType": "Patient", "url": fixtures.url("/same.ndjson")}]}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

/// Migration mode through `$load` (one request, one transaction): every file of a history
/// export, versions and deletion Bundles together in one mixed NDJSON, makes the same store;
/// run again it changes nothing; `update` beside it is a 400, and a Client is refused.
#[tokio::test]
async fn a_history_export_loaded_in_migration_mode_makes_the_same_store() {
    let source = TestServer::start().await;
    changing_store(&source).await;
    let status_url = start(&source, "/fhir/$export?_includeHistory=true").await;
    let listed = manifest(&source, &status_url).await;
    let mut all = Vec::new();
    for (_, _, bytes) in export_files(&source, &listed).await {
        all.extend_from_slice(&bytes);
        if !all.ends_with(b"\n") {
            all.push(b'\n');
        }
    }
    let fixtures = common::fixtures::FixtureServer::start(vec![(
        "/all.ndjson",
        common::fixtures::Fixture::Bytes(all),
    )])
    .await;
    let target = TestServer::start().await;
    let body = json!({"source": fixtures.url("/all.ndjson"), "mode": "migration"});
    for round in ["first", "again"] {
        let (status, answer) = target.json(Method::POST, "/fhir/$load", &body).await;
        assert_eq!(status, StatusCode::OK, "{round}: {answer}");
        for path in ["Patient/p1", "Patient/p2", "Patient/p3", "Observation/o1"] {
            let before = history(&source, path).await;
            let after = history(&target, path).await;
            assert_eq!(after.1, before.1, "{round}: {path}'s deletions");
            assert_eq!(
                after.0.into_iter().map(comparable).collect::<Vec<_>>(),
                before.0.into_iter().map(comparable).collect::<Vec<_>>(),
                "{round}: {path}'s versions"
            );
        }
        for path in ["/fhir/Patient/$dump", "/fhir/Observation/$dump"] {
            assert_eq!(
                dumped(&target, path).await,
                dumped(&source, path).await,
                "{round}: {path}"
            );
        }
    }

    let mut with_update = body.clone();
    with_update["update"] = json!(true);
    let (status, answer) = target.json(Method::POST, "/fhir/$load", &with_update).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let (status, answer) = target.yaml(Method::PUT, "/", "- {resourceType: Client, id: c, secret: s, grant_types: [basic]}\n- {resourceType: AccessPolicy, id: all, engine: allow, link: [{id: c, resourceType: Client}]}\n").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let response = target
        .client
        .post(target.url("/fhir/$load"))
        .basic_auth("c", Some("s"))
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}
