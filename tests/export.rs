//! `$export` (FHIR Bulk Data Access IG 2.0.0) over HTTP: the IG's flow end to end, Patient and
//! Group level, `_since`, `_type`, `_typeFilter`, cancel, expiry, access, and a job that
//! outlives the process that ran it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::time::Duration;

use common::export::{
    as_root, download, exported_ids, ids, job_of, kick_off, manifest, set, small_world, start,
    waiting_job, FHIR_JSON,
};
use common::{diagnostics, load_synthea, JobOptions, TestServer, ROOT_PASSWORD};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn db_ids(server: &TestServer, table: &str) -> BTreeSet<String> {
    let db = server.db().await;
    db.query(&format!("SELECT id FROM \"{table}\""), &[])
        .await
        .expect("ids")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn the_ig_flow_exports_exactly_the_database() {
    let server = TestServer::start_with_jobs(JobOptions {
        // Small files, so that the big types are split.
        file_size: 256 * 1024,
        ..JobOptions::default()
    })
    .await;
    let loaded = load_synthea(&server).await;

    let status_url = start(&server, "/fhir/$export").await;
    assert!(
        status_url.starts_with(&server.url("/fhir/$export-status/")),
        "{status_url}"
    );
    let manifest = manifest(&server, &status_url).await;
    assert_eq!(manifest["requiresAccessToken"], true);
    assert_eq!(manifest["request"], server.url("/fhir/$export"));
    assert!(manifest["transactionTime"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert_eq!(manifest["error"], json!([]));

    let exported = download(&server, &manifest).await;
    let types: BTreeSet<&String> = exported.keys().collect();
    assert_eq!(
        types,
        loaded.keys().collect(),
        "exactly the types that have data"
    );
    for (type_name, count) in &loaded {
        let resources = &exported[type_name];
        assert_eq!(resources.len(), *count, "{type_name}");
        assert_eq!(
            ids(resources),
            db_ids(&server, &type_name.to_lowercase()).await
        );
    }
    let files_per_type = |name: &str| {
        manifest["output"]
            .as_array()
            .expect("output")
            .iter()
            .filter(|e| e["type"] == name)
            .count()
    };
    assert!(
        files_per_type("Procedure") > 1,
        "a big type is split into several files"
    );

    // FHIR format, exactly as a read of the same resource on /fhir/ gives it.
    let condition = &exported["Condition"][0];
    let id = condition["id"].as_str().expect("id");
    let (status, read) = server.get(&format!("/fhir/Condition/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(condition, &read);
    assert!(condition["subject"]["reference"]
        .as_str()
        .is_some_and(|r| r.starts_with("Patient/")));

    // gzip on request, the same bytes inside.
    let url = manifest["output"][0]["url"].as_str().expect("url");
    let plain = as_root(&server, Method::GET, url)
        .send()
        .await
        .expect("plain")
        .bytes()
        .await
        .expect("body");
    let raw = reqwest::Client::builder()
        .no_gzip()
        .build()
        .expect("client")
        .get(url)
        .basic_auth("root", Some(ROOT_PASSWORD))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("gzip");
    assert_eq!(raw.headers()["content-encoding"], "gzip");
    let compressed = raw.bytes().await.expect("body");
    let mut unzipped = Vec::new();
    flate2::read::MultiGzDecoder::new(&compressed[..])
        .read_to_end(&mut unzipped)
        .expect("gunzip");
    assert_eq!(unzipped, plain.to_vec());
}

#[tokio::test]
async fn kick_off_follows_the_ig_to_the_letter() {
    let server = TestServer::start().await;
    // Headers the IG requires.
    let no_accept = server
        .request(Method::GET, "/fhir/$export")
        .header("prefer", "respond-async");
    let (status, body) = server.send(no_accept).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(diagnostics(&body).contains("Accept"), "{body}");
    let no_prefer = server
        .request(Method::GET, "/fhir/$export")
        .header("accept", FHIR_JSON);
    let (status, body) = server.send(no_prefer).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(diagnostics(&body).contains("respond-async"), "{body}");

    // Parameters fhirbox cannot honour.
    for path in [
        "/fhir/$export?_outputFormat=text/csv",
        "/fhir/$export?_since=yesterday",
        "/fhir/$export?_type=NotAType",
        "/fhir/$export?_elements=Patient.name.given",
        "/fhir/$export?_typeFilter=Observation%3Fcode-value-quantity%3D5",
        "/fhir/$export?_typeFilter=Observation%3F_sort%3Ddate",
        "/fhir/Patient/$export?_type=Organization",
        "/fhir/$export?includeAssociatedData=LatestProvenanceResources",
        "/fhir/$export?organizeOutputBy=Patient",
        "/fhir/Patient/$export?organizeOutputBy=Encounter",
        "/fhir/$export?allowPartialManifests=maybe",
        "/fhir/$export?_until=tomorrow",
    ] {
        let (status, body, location) = kick_off(&server, Method::GET, path, None, &[]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["resourceType"], "OperationOutcome");
        assert!(location.is_none());
    }
    let (status, _, _) =
        kick_off(&server, Method::GET, "/fhir/Group/nope/$export", None, &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) =
        kick_off(&server, Method::GET, "/fhir/Observation/$export", None, &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Lenient or not, a filter that cannot be applied in full is refused: applying the rest
    // of it would export more than was asked for.
    let (status, body, _) = kick_off(
        &server,
        Method::GET,
        "/fhir/$export?_type=Patient&_typeFilter=Patient%3Fname%3Dx%26shoe-size%3D9",
        None,
        &[("prefer", "handling=lenient")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        diagnostics(&body).contains("never applied in part"),
        "{body}"
    );

    // Lenient: what cannot be honoured is ignored, and the manifest says so.
    let path =
        "/fhir/$export?_type=Patient&_shoeSize=9&includeAssociatedData=LatestProvenanceResources";
    let (status, body, location) = kick_off(
        &server,
        Method::GET,
        path,
        None,
        &[("prefer", "handling=lenient")],
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let manifest = manifest(&server, &location.expect("location")).await;
    let errors = manifest["error"].as_array().expect("error");
    assert_eq!(errors.len(), 1, "{manifest}");
    assert_eq!(errors[0]["type"], "OperationOutcome");
    let text = as_root(
        &server,
        Method::GET,
        errors[0]["url"].as_str().expect("url"),
    )
    .send()
    .await
    .expect("error file")
    .text()
    .await
    .expect("body");
    let outcomes: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(outcomes.len(), 2, "{text}");
    assert!(
        text.contains("_shoeSize") && text.contains("includeAssociatedData"),
        "{text}"
    );
    assert!(outcomes
        .iter()
        .all(|o| o["resourceType"] == "OperationOutcome"));

    // A POST body may be YAML too, like every body fhirbox takes.
    let response = server
        .request(Method::POST, "/fhir/Patient/$export")
        .header("accept", FHIR_JSON)
        .header("prefer", "respond-async")
        .header("content-type", "application/yaml")
        .body("resourceType: Parameters\nparameter:\n- {name: _type, valueString: Patient}\n")
        .send()
        .await
        .expect("kick-off");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let (status, body, _) = kick_off(
        &server,
        Method::POST,
        "/fhir/$export",
        Some(&json!({"resourceType": "Patient"})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(diagnostics(&body).contains("Parameters"), "{body}");

    // _outputFormat's three spellings.
    for format in ["application/fhir%2Bndjson", "application/ndjson", "ndjson"] {
        let path = format!("/fhir/$export?_type=Patient&_outputFormat={format}");
        let (status, body, _) = kick_off(&server, Method::GET, &path, None, &[]).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{format}: {body}");
    }
}

#[tokio::test]
async fn patient_and_group_exports_take_only_their_compartments() {
    let server = TestServer::start().await;
    small_world(&server).await;

    let everyone = exported_ids(&server, "/fhir/Patient/$export").await;
    assert_eq!(everyone["Patient"], set(&["p1", "p2", "p3"]));
    assert_eq!(
        everyone["Observation"],
        set(&["o1", "o2", "o3"]),
        "o-group is no patient's"
    );
    assert!(
        !everyone.contains_key("Organization"),
        "not in the compartment"
    );
    assert_eq!(
        everyone["Group"],
        set(&["g"]),
        "a Group is in its members' compartments"
    );

    let group = exported_ids(&server, "/fhir/Group/g/$export?_type=Patient,Observation").await;
    assert_eq!(
        group["Patient"],
        set(&["p1", "p2"]),
        "p3 is an inactive member"
    );
    assert_eq!(group["Observation"], set(&["o1", "o2"]));

    // POST with a Parameters body: one patient of the group.
    let parameters = json!({"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueReference": {"reference": "Patient/p2"}},
        {"name": "_type", "valueString": "Patient,Observation"},
    ]});
    let (status, body, location) = kick_off(
        &server,
        Method::POST,
        "/fhir/Group/g/$export",
        Some(&parameters),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let manifest = manifest(&server, &location.expect("location")).await;
    let one: BTreeMap<String, BTreeSet<String>> = download(&server, &manifest)
        .await
        .into_iter()
        .map(|(t, r)| (t, ids(&r)))
        .collect();
    assert_eq!(one["Patient"], set(&["p2"]));
    assert_eq!(one["Observation"], set(&["o2"]));

    // The compartment lookup uses its index.
    let db = server.db().await;
    db.batch_execute("SET enable_seqscan = off")
        .await
        .expect("set");
    let plan: String = db
        .query(
            "EXPLAIN SELECT id FROM observation WHERE fhirbox_patients_observation(resource) ?| ARRAY['p1']",
            &[],
        )
        .await
        .expect("explain")
        .iter()
        .map(|row| row.get::<_, String>(0))
        .collect();
    assert!(plan.contains("observation_fhirbox_patients"), "{plan}");
}

#[tokio::test]
async fn since_type_and_type_filters_select_what_they_say() {
    let server = TestServer::start().await;
    small_world(&server).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, _) = server
        .json(
            Method::PUT,
            "/fhir/Patient/p2",
            &json!({"resourceType": "Patient", "id": "p2", "active": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("_since", &since)
        .finish();
    let changed = exported_ids(&server, &format!("/fhir/$export?{query}")).await;
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(changed["Patient"], set(&["p2"]));

    let typed = exported_ids(&server, "/fhir/$export?_type=Organization,Group").await;
    assert_eq!(typed.keys().collect::<Vec<_>>(), ["Group", "Organization"]);

    // smart-fetch's encoding: filters joined by ',', commas inside a filter as %2C.
    let filters = "Observation?category=laboratory%2Cexam,Patient?_id=p1%2Cp3";
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("_type", "Patient,Observation")
        .append_pair("_typeFilter", filters)
        .finish();
    let filtered = exported_ids(&server, &format!("/fhir/$export?{query}")).await;
    assert_eq!(filtered["Observation"], set(&["o1", "o3"]));
    assert_eq!(filtered["Patient"], set(&["p1", "p3"]));

    // Two filters for a type: either may match. system|code tokens and _lastUpdated.
    let filters = [
        "Observation?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs",
        "Observation?_id=o3",
        &format!("Patient?_lastUpdated=gt{since}"),
    ];
    let mut query = form_urlencoded::Serializer::new(String::new());
    for filter in filters {
        query.append_pair("_typeFilter", filter);
    }
    let path = format!("/fhir/$export?_type=Patient,Observation&{}", query.finish());
    let either = exported_ids(&server, &path).await;
    assert_eq!(either["Observation"], set(&["o2", "o3"]));
    assert_eq!(either["Patient"], set(&["p2"]));
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("_typeFilter", "Observation?category=|laboratory")
        .append_pair("_type", "Observation")
        .finish();
    let none = exported_ids(&server, &format!("/fhir/$export?{query}")).await;
    assert!(none.is_empty(), "no coding without a system: {none:?}");
}

#[tokio::test]
async fn cancel_deletes_the_files_and_the_job() {
    let server = TestServer::start().await;
    small_world(&server).await;
    let status_url = start(&server, "/fhir/$export").await;
    let manifest = manifest(&server, &status_url).await;
    let job = job_of(&status_url);
    assert!(server.export_dir.join(&job).exists());

    let response = as_root(&server, Method::DELETE, &status_url)
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert!(!server.export_dir.join(&job).exists(), "files deleted");
    let gone = as_root(&server, Method::GET, &status_url)
        .send()
        .await
        .expect("status");
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    let file = as_root(
        &server,
        Method::GET,
        manifest["output"][0]["url"].as_str().expect("url"),
    )
    .send()
    .await
    .expect("file");
    assert_eq!(file.status(), StatusCode::NOT_FOUND);
    let again = as_root(&server, Method::DELETE, &status_url)
        .send()
        .await
        .expect("delete");
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn files_expire() {
    let server = TestServer::start_with_jobs(JobOptions {
        expiry: Duration::from_secs(1),
        ..JobOptions::default()
    })
    .await;
    small_world(&server).await;
    let status_url = start(&server, "/fhir/$export?_type=Patient").await;
    manifest(&server, &status_url).await;
    let job = job_of(&status_url);
    for _ in 0..100 {
        let (status, _) = server.get(&format!("/fhir/$export-status/{job}")).await;
        if status == StatusCode::NOT_FOUND {
            assert!(
                !server.export_dir.join(&job).exists(),
                "files deleted with the job"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the export did not expire");
}

#[tokio::test]
async fn a_job_outlives_the_process_that_was_running_it() {
    // A server without workers: the job waits, and its status says so.
    let (first, status_url, job) = waiting_job("/fhir/$export?_type=Patient,Observation").await;
    let response = as_root(&first, Method::GET, &status_url)
        .send()
        .await
        .expect("status");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        response.headers()["x-progress"].to_str().expect("ascii"),
        "0% (0 of 2 types, 0 resources written)"
    );

    // A worker of a process that died half-way through Observation: its claim has run out and
    // it left a partial file.
    let db = first.db().await;
    db.execute(
        "UPDATE fhirbox_task SET status = 'in-progress', worker = 'dead-1', attempts = 1,
                lease_until = now() - interval '1 second', started_at = now()
          WHERE job_id = $1 AND resource_type = 'Observation'",
        &[&job],
    )
    .await
    .expect("simulate a crash");
    let dir = first.export_dir.join(&job);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("Observation-1-1.ndjson"), "{\"partial\":").expect("partial file");
    std::fs::write(dir.join("Observation-1-2.ndjson"), "{\"partial\":").expect("partial file");

    // The next process takes both tasks over.
    let second = TestServer::start_on(first.database.clone(), JobOptions::default()).await;
    let manifest = manifest(&second, &second.url(&format!("/fhir/$export-status/{job}"))).await;
    let exported = download(&second, &manifest).await;
    assert_eq!(
        ids(&exported["Observation"]),
        set(&["o1", "o2", "o3", "o-group"])
    );
    assert_eq!(ids(&exported["Patient"]), set(&["p1", "p2", "p3"]));
    assert!(
        !dir.join("Observation-2.ndjson").exists(),
        "the crashed attempt's files are gone"
    );
    let attempts: i32 = db
        .query_one(
            "SELECT attempts FROM fhirbox_task WHERE job_id = $1 AND resource_type = 'Observation'",
            &[&job],
        )
        .await
        .expect("attempts")
        .get(0);
    assert_eq!(attempts, 2);
}

#[tokio::test]
async fn a_job_that_cannot_write_its_files_fails_with_an_outcome() {
    let (first, _, job) = waiting_job("/fhir/$export?_type=Patient,Observation").await;
    // Where the job's directory should be, a file: no directory can be made there.
    std::fs::create_dir_all(&first.export_dir).expect("export dir");
    std::fs::write(first.export_dir.join(&job), "in the way").expect("blocking file");

    // One worker: Patient fails first, and Observation is not started at all.
    let second = TestServer::start_on(
        first.database.clone(),
        JobOptions {
            workers: 1,
            ..JobOptions::default()
        },
    )
    .await;
    let url = second.url(&format!("/fhir/$export-status/{job}"));
    for _ in 0..100 {
        let (status, body) = second.send(as_root(&second, Method::GET, &url)).await;
        if status == StatusCode::ACCEPTED {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
        assert_eq!(body["resourceType"], "OperationOutcome");
        assert!(diagnostics(&body).contains("Patient"), "{body}");
        let skipped = first
            .db()
            .await
            .query_one(
                "SELECT status, error, attempts FROM fhirbox_task
                  WHERE job_id = $1 AND resource_type = 'Observation'",
                &[&job],
            )
            .await
            .expect("task");
        assert_eq!(skipped.get::<_, String>(0), "failed");
        assert_eq!(
            skipped.get::<_, Option<String>>(1).as_deref(),
            Some("not exported: Patient failed first")
        );
        assert_eq!(skipped.get::<_, i32>(2), 0, "never started");
        std::fs::remove_file(first.export_dir.join(&job)).expect("clean up");
        return;
    }
    panic!("the export did not fail");
}

#[tokio::test]
async fn access_policies_and_ownership_apply() {
    let server = TestServer::start().await;
    small_world(&server).await;
    let setup = r##"
- resourceType: Client
  id: exporter
  secret: s
  grant_types: ['basic']
- resourceType: Client
  id: other
  secret: s
  grant_types: ['basic']
- resourceType: AccessPolicy
  id: export-kick-off
  engine: matcho
  matcho:
    uri: "#^/fhir/(Patient/|Group/[^/]+/)?\\$export$"
  link:
  - {id: exporter, resourceType: Client}
  - {id: other, resourceType: Client}
"##;
    let (status, body) = server.yaml(Method::PUT, "/", setup).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let as_client = |user: &'static str, method: Method, url: String| {
        server
            .client
            .request(method, url)
            .basic_auth(user, Some("s"))
            .header("accept", FHIR_JSON)
            .header("prefer", "respond-async")
    };
    let response = as_client(
        "exporter",
        Method::GET,
        server.url("/fhir/$export?_type=Patient"),
    )
    .send()
    .await
    .expect("kick-off");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let status_url = response.headers()["content-location"]
        .to_str()
        .expect("ascii")
        .to_string();

    // The owner follows the job without a policy for it; another client may not.
    let mut manifest = Value::Null;
    for _ in 0..100 {
        let response = as_client("exporter", Method::GET, status_url.clone())
            .send()
            .await
            .expect("poll");
        match response.status() {
            StatusCode::OK => {
                manifest = response.json().await.expect("manifest");
                break;
            }
            // Polled faster than told: wait as told.
            StatusCode::TOO_MANY_REQUESTS => tokio::time::sleep(Duration::from_secs(1)).await,
            other => assert_eq!(other, StatusCode::ACCEPTED),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let file_url = manifest["output"][0]["url"]
        .as_str()
        .expect("a file")
        .to_string();
    let owner = as_client("exporter", Method::GET, file_url.clone())
        .send()
        .await
        .expect("file");
    assert_eq!(owner.status(), StatusCode::OK);
    for (method, url) in [
        (Method::GET, status_url.clone()),
        (Method::GET, file_url.clone()),
        (Method::DELETE, status_url.clone()),
    ] {
        let response = as_client("other", method.clone(), url.clone())
            .send()
            .await
            .expect("sent");
        // Someone else's job does not exist for this subject, whatever its policies say.
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{method} {url}");
    }
    // The seed's bulk-client may not export at all: deny by default.
    let (status, _) = server
        .yaml(
            Method::PUT,
            "/",
            &common::seed("put-client-and-policy.yaml"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let response = server
        .client
        .get(server.url("/fhir/$export"))
        .basic_auth("bulk-client", Some("secret"))
        .header("accept", FHIR_JSON)
        .header("prefer", "respond-async")
        .send()
        .await
        .expect("kick-off");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_server_finishes_the_export_after_its_restart() {
    let database = common::fresh_database().await;
    let url = common::cluster().url(&database);
    let data = tempfile::tempdir().expect("dir");
    let data_dir = data.path().to_str().expect("utf-8").to_string();
    let testdata = format!("{}/testdata", env!("CARGO_MANIFEST_DIR"));
    let args = [
        "--database-url",
        url.as_str(),
        "--admin-password",
        "pw",
        "--data-dir",
        data_dir.as_str(),
        "--source-dir",
        testdata.as_str(),
        "--import-lease",
        "2",
    ];
    let client = common::http_client();
    let mut first = common::process::ServerProcess::start(&args);
    let mut loaded = BTreeMap::new();
    for entry in std::fs::read_dir(format!("{testdata}/synthea-10")).expect("testdata") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        let type_name = name.split('.').next().expect("type").to_string();
        let response = client
            .post(format!("{}/fhir/{type_name}/$load", first.base))
            .basic_auth("root", Some("pw"))
            .json(&json!({"source": format!("file://{}", path.display())}))
            .send()
            .await
            .expect("load");
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.expect("json");
        loaded.insert(type_name, body["total"].as_u64().expect("total"));
    }

    // Every FHIR type, one task each: kill the server while the job runs.
    let response = client
        .get(format!("{}/fhir/$export", first.base))
        .basic_auth("root", Some("pw"))
        .header("accept", FHIR_JSON)
        .header("prefer", "respond-async")
        .send()
        .await
        .expect("kick-off");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["content-location"]
        .to_str()
        .expect("ascii")
        .to_string();
    let job = job_of(&location);
    let running = client
        .get(&location)
        .basic_auth("root", Some("pw"))
        .send()
        .await
        .expect("status");
    assert_eq!(running.status(), StatusCode::ACCEPTED, "not done yet");
    first.signal(nix::sys::signal::Signal::SIGKILL);

    let second = common::process::ServerProcess::start(&args);
    let status_url = format!("{}/fhir/$export-status/{job}", second.base);
    let mut manifest = Value::Null;
    for _ in 0..300 {
        let response = client
            .get(&status_url)
            .basic_auth("root", Some("pw"))
            .send()
            .await
            .expect("status");
        match response.status() {
            StatusCode::OK => {
                manifest = response.json().await.expect("manifest");
                break;
            }
            // Polled faster than told: wait as told.
            StatusCode::TOO_MANY_REQUESTS => tokio::time::sleep(Duration::from_secs(1)).await,
            other => assert_eq!(other, StatusCode::ACCEPTED),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut exported: BTreeMap<String, u64> = BTreeMap::new();
    for entry in manifest["output"].as_array().expect("the export finished") {
        let text = client
            .get(entry["url"].as_str().expect("url"))
            .basic_auth("root", Some("pw"))
            .send()
            .await
            .expect("file")
            .text()
            .await
            .expect("body");
        let type_name = entry["type"].as_str().expect("type").to_string();
        *exported.entry(type_name).or_default() += text.lines().count() as u64;
    }
    assert_eq!(
        exported, loaded,
        "every resource once: none missing, none duplicated"
    );
    let db = common::connect(common::cluster().config(&database)).await;
    let processes: i64 = db
        .query_one(
            "SELECT count(DISTINCT split_part(worker, '-', 1)) FROM fhirbox_task WHERE job_id = $1",
            &[&job],
        )
        .await
        .expect("workers")
        .get(0);
    eprintln!("tasks of the job were finished by {processes} process(es)");
    assert!(processes >= 1);
}
