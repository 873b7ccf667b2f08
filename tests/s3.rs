//! Object storage against a real S3-compatible server (SeaweedFS, started by the harness):
//! `$export` and view exports written to a bucket, manifests with signed links (and proxied
//! ones), cancelled and failed jobs leaving no objects and no uploads, `s3://` sources for
//! `$load` and `$import` (a bucket prefix as one input), who may read which bucket, and errors
//! said in words. Every manifest URL is downloaded and checked against the database.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::export::{small_world, FHIR_JSON};
use common::s3::s3;
use common::{diagnostics, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// A fhirbox whose exports go to a fresh bucket (under a prefix); `tune` after.
async fn bucket_server(tune: impl FnOnce(&mut common::AppSettings)) -> (TestServer, String) {
    let bucket = s3().bucket();
    let location = format!("s3://{bucket}/exports");
    let server = TestServer::start_custom(common::fresh_database().await, |settings| {
        settings.s3 = s3().settings();
        settings.exports.bucket = fhirbox::objects::Location::parse(&location);
        tune(settings);
    })
    .await;
    (server, bucket)
}

/// Polls a status URL (as root) until the export ends; the status and the body.
async fn ended(server: &TestServer, status_url: &str) -> (StatusCode, Value) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let response = common::export::as_root(server, Method::GET, status_url)
            .send()
            .await
            .expect("status");
        let status = response.status();
        if status != StatusCode::ACCEPTED && status != StatusCode::TOO_MANY_REQUESTS {
            return (status, response.json().await.unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "the export did not end");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Downloads every output URL of a manifest with no credentials at all (signed links):
/// the ids by type, each resource once.
async fn download_signed(manifest: &Value) -> std::collections::BTreeMap<String, BTreeSet<String>> {
    let client = common::http_client();
    let mut ids: std::collections::BTreeMap<String, BTreeSet<String>> = Default::default();
    for entry in manifest["output"].as_array().expect("output") {
        let url = entry["url"].as_str().expect("url");
        assert!(
            url.starts_with(&s3().endpoint),
            "straight from the bucket: {url}"
        );
        assert!(url.contains("X-Amz-Signature="), "{url}");
        let response = client.get(url).send().await.expect("download");
        assert_eq!(response.status(), StatusCode::OK, "{url}");
        let text = response.text().await.expect("file");
        let mut lines = 0;
        for line in text.lines() {
            let resource: Value = serde_json::from_str(line).expect("a resource a line");
            let type_name = resource["resourceType"].as_str().expect("type").to_string();
            assert!(
                ids.entry(type_name)
                    .or_default()
                    .insert(resource["id"].as_str().expect("id").to_string()),
                "each resource once"
            );
            lines += 1;
        }
        assert_eq!(entry["count"], lines, "{entry}");
    }
    ids
}

async fn db_ids(server: &TestServer, table: &str) -> BTreeSet<String> {
    server
        .db()
        .await
        .query(&format!("SELECT id FROM {table}"), &[])
        .await
        .expect("ids")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_lands_in_the_bucket_with_fresh_signed_links() {
    let (server, bucket) = bucket_server(|_| {}).await;
    small_world(&server).await;
    let status_url =
        common::export::start(&server, "/fhir/$export?_type=Patient,Observation").await;
    let (status, manifest) = ended(&server, &status_url).await;
    assert_eq!(status, StatusCode::OK, "{manifest}");
    assert_eq!(manifest["requiresAccessToken"], false, "{manifest}");
    let ids = download_signed(&manifest).await;
    assert_eq!(ids["Patient"], db_ids(&server, "patient").await);
    assert_eq!(ids["Observation"], db_ids(&server, "observation").await);
    let job = common::export::job_of(&status_url);
    assert!(s3().count(&bucket, &format!("exports/{job}/")) >= 2);
    assert_eq!(s3().uploads(&bucket), 0, "no upload left in progress");
    // Signed at each poll: a later poll gets other URLs, which work as well.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, again) = ended(&server, &status_url).await;
    assert_ne!(again["output"][0]["url"], manifest["output"][0]["url"]);
    download_signed(&again).await;
    // Cancelled (deleted): its objects go.
    let response = common::export::as_root(&server, Method::DELETE, &status_url)
        .send()
        .await
        .expect("cancel");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(s3().count(&bucket, &format!("exports/{job}/")), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn proxied_links_stream_from_the_bucket_and_resume_with_a_range() {
    let (server, _) = bucket_server(|settings| {
        settings.exports.links = Some(fhirbox::bulk::export::Links::Proxy);
    })
    .await;
    small_world(&server).await;
    let status_url = common::export::start(&server, "/fhir/$export?_type=Patient").await;
    let manifest = common::export::manifest(&server, &status_url).await;
    assert_eq!(manifest["requiresAccessToken"], true);
    let exported = common::export::download(&server, &manifest).await;
    let ids: BTreeSet<String> = exported["Patient"]
        .iter()
        .map(|p| p["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids, db_ids(&server, "patient").await);
    let url = manifest["output"][0]["url"].as_str().expect("url");
    assert!(url.starts_with(&server.base), "{url}");
    let whole = common::export::as_root(&server, Method::GET, url)
        .header("accept-encoding", "identity")
        .send()
        .await
        .expect("whole")
        .bytes()
        .await
        .expect("bytes");
    let tail = common::export::as_root(&server, Method::GET, url)
        .header("range", "bytes=7-")
        .send()
        .await
        .expect("range");
    assert_eq!(tail.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(&tail.bytes().await.expect("tail")[..], &whole[7..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_export_leaves_no_object_and_no_upload() {
    let (server, bucket) = bucket_server(|settings| {
        // Several parts of 5 MiB, then past the job's bound.
        settings.exports.part_size = 5 << 20;
        settings.exports.output = fhirbox::bulk::bounds::OutputBounds::exports(u64::MAX, 12 << 20);
    })
    .await;
    server
        .db()
        .await
        .execute(
            "INSERT INTO observation (id, cts, ts, resource_type, status, resource)
             SELECT 'o' || g, now(), now(), 'Observation', 'created',
                    jsonb_build_object('status', 'final', 'code', jsonb_build_object('text', md5(g::text) || repeat('x', 500)))
               FROM generate_series(1, 40000) g",
            &[],
        )
        .await
        .expect("rows");
    let status_url = common::export::start(&server, "/fhir/$export?_type=Observation").await;
    let (status, outcome) = ended(&server, &status_url).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{outcome}");
    assert!(
        outcome.to_string().contains("--export-max-bytes"),
        "{outcome}"
    );
    let job = common::export::job_of(&status_url);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s3().uploads(&bucket) > 0 || s3().count(&bucket, &format!("exports/{job}/")) > 0 {
        assert!(Instant::now() < deadline, "uploads or objects left behind");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_view_export_writes_csv_and_parquet_to_the_bucket() {
    let (server, _) = bucket_server(|_| {}).await;
    small_world(&server).await;
    for format in ["csv", "parquet"] {
        let view = json!({"resourceType": "ViewDefinition", "resource": "Patient",
                          "select": [{"column": [{"name": "id", "path": "getResourceKey()"}]}]});
        let response = server
            .request(Method::POST, "/fhir/ViewDefinition/$viewdefinition-export")
            .header("prefer", "respond-async")
            .json(&json!({"resourceType": "Parameters", "parameter": [
                {"name": "view", "part": [{"name": "name", "valueString": "patients"},
                                          {"name": "viewResource", "resource": view}]},
                {"name": "_format", "valueCode": format}]}))
            .send()
            .await
            .expect("kick-off");
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let status_url = response.headers()["content-location"]
            .to_str()
            .expect("ascii")
            .to_string();
        let (status, manifest) = ended(&server, &status_url).await;
        assert_eq!(status, StatusCode::OK, "{manifest}");
        let url = manifest["output"][0]["url"].as_str().expect("url");
        let body = common::http_client()
            .get(url)
            .send()
            .await
            .expect("download")
            .bytes()
            .await
            .expect("bytes");
        match format {
            "csv" => {
                let text = String::from_utf8_lossy(&body);
                assert_eq!(
                    text.lines().count(),
                    1 + db_ids(&server, "patient").await.len()
                );
            }
            _ => assert!(body.starts_with(b"PAR1") && body.ends_with(b"PAR1")),
        }
    }
}

/// A Client `loader` (secret `pw`) allowed to `$load` and `$import`.
async fn loader(server: &TestServer) {
    let (status, body) = server
        .json(
            Method::PUT,
            "/",
            &json!([
                {"resourceType": "Client", "id": "loader", "secret": "pw", "grant_types": ["basic"]},
                {"resourceType": "AccessPolicy", "id": "loader-loads", "engine": "matcho",
                 "matcho": {"uri": {"$one-of": ["/fhir/$load", "/fhir/$import", "#/fhir/[A-Za-z]+/\\$load$"]}},
                 "link": [{"resourceType": "Client", "id": "loader"}]}
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

fn ndjson_file(dir: &std::path::Path, name: &str, lines: &[Value]) -> std::path::PathBuf {
    let path = dir.join(name);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).expect("write");
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_sources_are_loaded_by_whom_may_read_them() {
    let allowed = s3().bucket();
    let other = s3().bucket();
    let server = TestServer::start_custom(common::fresh_database().await, |settings| {
        settings.s3 = s3().settings();
        settings.sources.client_buckets =
            vec![
                fhirbox::objects::Location::parse(&format!("s3://{allowed}/shared"))
                    .expect("location"),
            ];
    })
    .await;
    loader(&server).await;
    let dir = tempfile::tempdir().expect("dir");
    let patients: Vec<Value> = (0..5)
        .map(|i| json!({"resourceType": "Patient", "id": format!("s3p{i}")}))
        .collect();
    let file = ndjson_file(dir.path(), "Patient.ndjson", &patients);
    for (bucket, key) in [
        (&allowed, "shared/Patient.ndjson"),
        (&allowed, "private/Patient.ndjson"),
        (&other, "Patient.ndjson"),
    ] {
        s3().put(bucket, key, &file);
    }
    // Root reads any bucket.
    let (status, body) = server
        .json(
            Method::POST,
            "/fhir/Patient/$load",
            &json!({"source": format!("s3://{other}/Patient.ndjson")}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(server.count("patient").await, 5);
    // A Client only what --source-buckets names.
    let as_loader = |source: String| {
        let request = server
            .client
            .post(server.url("/fhir/Patient/$load"))
            .basic_auth("loader", Some("pw"))
            .json(&json!({"source": source}));
        async move {
            let response = request.send().await.expect("sent");
            (
                response.status(),
                response.json::<Value>().await.unwrap_or_default(),
            )
        }
    };
    let (status, body) = as_loader(format!("s3://{allowed}/shared/Patient.ndjson")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for refused in [
        format!("s3://{allowed}/private/Patient.ndjson"),
        format!("s3://{other}/Patient.ndjson"),
    ] {
        let (status, body) = as_loader(refused.clone()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{refused}: {body}");
        assert!(diagnostics(&body).contains("--source-buckets"), "{body}");
    }
    // A missing object is said in words, before anything is written.
    let (status, body) = server
        .json(
            Method::POST,
            "/fhir/$import",
            &json!({"inputs": [
            {"resourceType": "Patient", "url": format!("s3://{other}/no-such.ndjson")}]}),
        )
        .await;
    assert!(status.is_client_error(), "{status} {body}");
    assert!(diagnostics(&body).contains("no such object"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_prefix_imports_every_object_named_after_a_type() {
    let bucket = s3().bucket();
    let server = TestServer::start_custom(common::fresh_database().await, |settings| {
        settings.s3 = s3().settings();
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let patients: Vec<Value> = (0..4)
        .map(|i| json!({"resourceType": "Patient", "id": format!("p{i}")}))
        .collect();
    let observations = |from: usize| -> Vec<Value> {
        (from..from + 3)
            .map(|i| json!({"resourceType": "Observation", "id": format!("o{i}"), "status": "final", "code": {"text": "x"}}))
            .collect()
    };
    s3().put(
        &bucket,
        "run/Patient.ndjson",
        &ndjson_file(dir.path(), "p", &patients),
    );
    s3().put(
        &bucket,
        "run/Observation.000.ndjson",
        &ndjson_file(dir.path(), "o0", &observations(0)),
    );
    s3().put(
        &bucket,
        "run/Observation.001.ndjson",
        &ndjson_file(dir.path(), "o1", &observations(3)),
    );
    s3().put(
        &bucket,
        "run/README.txt",
        &ndjson_file(dir.path(), "r", &[]),
    );
    let (status, body) = server
        .json(
            Method::POST,
            "/fhir/$import",
            &json!({"id": "from-bucket", "inputs": [{"url": format!("s3://{bucket}/run/")}]}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["inputs"].as_array().map(Vec::len), Some(3), "{body}");
    assert!(
        body["warnings"].to_string().contains("README.txt"),
        "{body}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, status) = server.get("/BulkImportStatus/from-bucket").await;
        if status["status"] != "in-progress" {
            assert_eq!(status["status"], "finished", "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(server.count("patient").await, 4);
    assert_eq!(server.count("observation").await, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_credentials_and_a_missing_bucket_are_said_in_words() {
    let bucket = s3().bucket();
    let server = TestServer::start_custom(common::fresh_database().await, |settings| {
        let mut wrong = s3().settings();
        wrong.credentials = Some((common::s3::ACCESS_KEY.into(), "not-the-secret".into()));
        settings.s3 = wrong;
    })
    .await;
    let (status, body) = server
        .json(
            Method::POST,
            "/fhir/$import",
            &json!({"inputs": [
            {"resourceType": "Patient", "url": format!("s3://{bucket}/Patient.ndjson")}]}),
        )
        .await;
    assert!(status.is_client_error(), "{status} {body}");
    assert!(diagnostics(&body).contains("credentials"), "{body}");
    // The export storage is checked at start-up: a missing bucket is a clear error.
    let settings = {
        let mut settings = common::test_settings("postgres");
        settings.s3 = s3().settings();
        settings.exports.bucket = fhirbox::objects::Location::parse("s3://no-such-bucket-here/x");
        settings
    };
    let root = fhirbox::auth::RootPassword::from_password("x").expect("hash");
    let started = Instant::now();
    let error = fhirbox::app::build(common::cluster().config(&server.database), root, settings)
        .await
        .err()
        .expect("refused");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(error.to_string().contains("no-such-bucket-here"), "{error}");
    let _ = FHIR_JSON;
}

/// `fhirbox serve` as a process on `database`, its exports in `bucket`, a data directory of
/// its own (no shared disk).
fn process_on(
    database: &str,
    bucket: &str,
    data: &std::path::Path,
    extra: &[&str],
) -> common::process::ServerProcess {
    let url = common::cluster().url(database);
    let data = data.to_str().expect("utf-8").to_string();
    let storage = format!("s3://{bucket}/exports");
    let mut args = vec![
        "--database-url",
        url.as_str(),
        "--data-dir",
        data.as_str(),
        "--admin-password",
        "root-pw",
        "--export-storage",
        storage.as_str(),
        "--s3-endpoint",
        s3().endpoint.as_str(),
        "--import-lease",
        "2",
    ];
    args.extend_from_slice(extra);
    common::process::ServerProcess::start_with_env(
        &args,
        &[
            ("AWS_ACCESS_KEY_ID", common::s3::ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", common::s3::SECRET_KEY),
        ],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_without_a_shared_disk_finish_one_export() {
    let bucket = s3().bucket();
    let database = common::fresh_database().await;
    let db = common::connect(common::cluster().config(&database)).await;
    db.execute(
        "INSERT INTO observation (id, cts, ts, resource_type, status, resource)
         SELECT 'o' || g, now(), now(), 'Observation', 'created',
                jsonb_build_object('status', 'final', 'code', jsonb_build_object('text', md5(g::text) || repeat('x', 300)))
           FROM generate_series(1, 150000) g",
        &[],
    )
    .await
    .expect("rows");
    let (one, two) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    // A short expiry makes the janitor (which aborts a dead run's upload) pass every 10 s.
    let links = [
        "--export-links",
        "proxy",
        "--export-file-size",
        "8000000",
        "--export-expiry",
        "40",
    ];
    let mut first = process_on(&database, &bucket, one.path(), &links);
    let client = common::http_client();
    let response = client
        .get(format!("{}/fhir/$export?_type=Observation", first.base))
        .basic_auth("root", Some("root-pw"))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .send()
        .await
        .expect("kick-off");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let status_path = response.headers()["content-location"]
        .to_str()
        .expect("ascii")
        .trim_start_matches(&first.base)
        .to_string();
    // Killed half-way: once its upload is under way.
    let started = Instant::now();
    while s3().uploads(&bucket) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no upload started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.signal(nix::sys::signal::Signal::SIGKILL);
    let second = process_on(&database, &bucket, two.path(), &links);
    let deadline = Instant::now() + Duration::from_secs(180);
    let manifest: Value = loop {
        let response = client
            .get(format!("{}{status_path}", second.base))
            .basic_auth("root", Some("root-pw"))
            .send()
            .await
            .expect("status");
        match response.status() {
            StatusCode::OK => break response.json().await.expect("manifest"),
            StatusCode::ACCEPTED | StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("{other}: {}", response.text().await.unwrap_or_default()),
        }
        assert!(Instant::now() < deadline, "the export did not finish");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // The first process again, on its own directory: every file downloads through either.
    let again = process_on(&database, &bucket, one.path(), &links);
    let files = manifest["output"].as_array().expect("output");
    assert!(files.len() > 1, "several files: {manifest}");
    for process in [&second, &again] {
        let mut seen = BTreeSet::new();
        for entry in files {
            let path = entry["url"]
                .as_str()
                .expect("url")
                .rsplit_once("/fhir/")
                .expect("fhirbox's URL")
                .1;
            let text = client
                .get(format!("{}/fhir/{path}", process.base))
                .basic_auth("root", Some("root-pw"))
                .send()
                .await
                .expect("download")
                .text()
                .await
                .expect("file");
            for line in text.lines() {
                let resource: Value = serde_json::from_str(line).expect("a resource");
                assert!(
                    seen.insert(resource["id"].as_str().expect("id").to_string()),
                    "each resource once"
                );
            }
        }
        assert_eq!(seen.len(), 150_000);
    }
    // The killed process's upload is aborted by the janitor (no part left behind).
    let deadline = Instant::now() + Duration::from_secs(30);
    while s3().uploads(&bucket) > 0 {
        assert!(Instant::now() < deadline, "a dead run's upload left behind");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_storage_that_goes_away_fails_the_export_saying_so_and_nothing_else() {
    let storage = common::s3::S3::private("faults");
    let bucket = storage.bucket();
    let location = format!("s3://{bucket}/exports");
    let settings = fhirbox::objects::S3Settings {
        endpoint: Some(storage.endpoint.clone()),
        ..s3().settings()
    };
    let server = TestServer::start_custom(common::fresh_database().await, |s| {
        s.s3 = settings.clone();
        s.exports.bucket = fhirbox::objects::Location::parse(&location);
    })
    .await;
    server
        .db()
        .await
        .execute(
            "INSERT INTO observation (id, cts, ts, resource_type, status, resource)
             SELECT 'o' || g, now(), now(), 'Observation', 'created',
                    jsonb_build_object('status', 'final', 'code', jsonb_build_object('text', md5(g::text) || repeat('x', 300)))
               FROM generate_series(1, 100000) g",
            &[],
        )
        .await
        .expect("rows");
    let status_url = common::export::start(&server, "/fhir/$export?_type=Observation").await;
    let started = Instant::now();
    while storage.uploads(&bucket) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no upload started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    storage.kill();
    let (status, outcome) = ended(&server, &status_url).await;
    assert_eq!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "nothing half-uploaded is listed: {outcome}"
    );
    let said = outcome.to_string();
    assert!(
        said.contains("Observation") && said.contains("upload"),
        "{said}"
    );
    // The server stays healthy, and a kick-off now says the storage is away, at once.
    assert_eq!(server.get("/health").await.0, StatusCode::OK);
    assert_eq!(
        server
            .json(Method::PUT, "/Patient/still", &json!({}))
            .await
            .0,
        StatusCode::CREATED
    );
    let asked = Instant::now();
    let (status, body, _) = common::export::kick_off(
        &server,
        Method::GET,
        "/fhir/$export?_type=Patient",
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.to_string().contains("export storage"), "{body}");
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "{:?}",
        asked.elapsed()
    );
    // And a fhirbox started on it now refuses to start, saying why.
    let mut refused = common::test_settings("postgres");
    refused.s3 = settings;
    refused.exports.bucket = fhirbox::objects::Location::parse(&location);
    let root = fhirbox::auth::RootPassword::from_password("x").expect("hash");
    let error = fhirbox::app::build(common::cluster().config(&server.database), root, refused)
        .await
        .err()
        .expect("refused");
    assert!(error.to_string().contains(&bucket), "{error}");
}
