//! `$import`: the seed's body against local fixtures, failures per input, cancel, progress,
//! access of the job's owner, a crash in the middle, and two processes sharing one job.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use common::fixtures::{gzip, Fixture, FixtureServer};
use common::process::ServerProcess;
use common::{diagnostics, TestServer};
use nix::sys::signal::Signal;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn testdata(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/smart-bulk-data-server-100")
            .join(name),
    )
    .expect("testdata")
}

fn line_count(gz: &[u8]) -> usize {
    BufReader::new(flate2::read::MultiGzDecoder::new(gz))
        .lines()
        .map_while(Result::ok)
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// `n` native Patient lines `prefix0..`, for big or slow inputs.
fn patients(n: usize, prefix: &str) -> Vec<u8> {
    (0..n)
        .map(|i| format!("{{\"resourceType\":\"Patient\",\"id\":\"{prefix}{i}\",\"name\":[{{\"given\":[\"{}\"]}}]}}\n", "x".repeat(200)))
        .collect::<String>()
        .into_bytes()
}

/// Polls a job's status until it is no longer in progress.
async fn wait_for(base: &str, client: &reqwest::Client, auth: (&str, &str), id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let response = client
            .get(format!("{base}/BulkImportStatus/{id}"))
            .basic_auth(auth.0, Some(auth.1))
            .send()
            .await
            .expect("status");
        let status: Value = response.json().await.expect("json");
        if status["status"] != "in-progress" && status["status"] != Value::Null {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the import did not end: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seeds_body_against_local_fixtures() {
    let server = TestServer::start().await;
    let (encounters, organizations, patients) = (
        testdata("Encounter.000.ndjson.gz"),
        testdata("Organization.000.ndjson.gz"),
        testdata("Patient.000.ndjson.gz"),
    );
    let expected = [
        line_count(&encounters),
        line_count(&organizations),
        line_count(&patients),
    ];
    let fixtures = FixtureServer::start(vec![
        (
            "/aidbox-public/synthea/100/Encounter.ndjson.gz",
            Fixture::Bytes(encounters),
        ),
        (
            "/aidbox-public/synthea/100/Organization.ndjson.gz",
            Fixture::Bytes(organizations),
        ),
        (
            "/aidbox-public/synthea/100/Patient.ndjson.gz",
            Fixture::Bytes(patients),
        ),
    ])
    .await;
    // The seed's request, verbatim but for the host the files come from.
    let body = "id: synthea\ninputFormat: application/fhir+ndjson\ncontentEncoding: gzip\nmode: bulk\ninputs:\n\
                - resourceType: Encounter\n  url: https://storage.googleapis.com/aidbox-public/synthea/100/Encounter.ndjson.gz\n\
                - resourceType: Organization\n  url: https://storage.googleapis.com/aidbox-public/synthea/100/Organization.ndjson.gz\n\
                - resourceType: Patient\n  url: https://storage.googleapis.com/aidbox-public/synthea/100/Patient.ndjson.gz\n"
        .replace("https://storage.googleapis.com", &fixtures.base);
    let response = server
        .request(Method::POST, "/fhir/$import")
        .header("content-type", "application/yaml")
        .body(body.clone())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(
        response.headers()["content-location"],
        format!("{}/BulkImportStatus/synthea", server.base).as_str()
    );
    let accepted: Value = response.json().await.expect("status");
    assert_eq!(
        (&accepted["resourceType"], &accepted["id"]),
        (&json!("BulkImportStatus"), &json!("synthea"))
    );
    assert_eq!(accepted["type"], "fhir");

    let status = wait_for(
        &server.base,
        &server.client,
        ("root", common::ROOT_PASSWORD),
        "synthea",
    )
    .await;
    assert_eq!(status["status"], "finished", "{status}");
    assert_eq!(status["contentEncoding"], "gzip");
    assert!(
        status["time"]["start"].is_string() && status["time"]["end"].is_string(),
        "{status}"
    );
    for (input, expected) in status["inputs"]
        .as_array()
        .expect("inputs")
        .iter()
        .zip(expected)
    {
        assert_eq!(input["status"], "finished", "{input}");
        assert_eq!(input["total"], expected, "{input}");
        assert!(
            input["duration"].as_i64().is_some()
                && input["ts"].is_string()
                && input["bytes"].as_i64() > Some(0),
            "{input}"
        );
    }
    assert_eq!(server.count("encounter").await as usize, expected[0]);
    assert_eq!(server.count("organization").await as usize, expected[1]);
    assert_eq!(server.count("patient").await as usize, expected[2]);
    let (_, patient) = server.get("/Patient?_count=1").await;
    assert!(
        patient["entry"][0]["resource"].get("birthDate").is_some(),
        "converted from FHIR"
    );

    // The same id again: 409. YAML status, and the search.
    let again = server
        .request(Method::POST, "/fhir/$import")
        .header("content-type", "application/yaml")
        .body(body)
        .send()
        .await
        .expect("sent");
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let yaml = server
        .request(Method::GET, "/BulkImportStatus/synthea?_format=yaml")
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("text");
    assert!(yaml.contains("status: finished"), "{yaml}");
    let (_, search) = server.get("/BulkImportStatus").await;
    assert_eq!(search["entry"][0]["resource"]["id"], "synthea");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_input_fails_alone_with_its_reason() {
    let server = TestServer::start().await;
    let mut bad = patients(10, "b");
    bad.extend_from_slice(b"{\"resourceType\":\"Patient\",\"id\":\"x\",\"name\":\n");
    let fixtures = FixtureServer::start(vec![
        ("/good.ndjson", Fixture::Bytes(patients(50, "g"))),
        ("/bad.ndjson", Fixture::Bytes(gzip(&bad))),
        ("/gone.ndjson", Fixture::Status(404)),
    ])
    .await;
    let (status, accepted) = server
        .json(
            Method::POST,
            "/$import",
            &json!({"inputs": [
                {"resourceType": "Patient", "url": fixtures.url("/good.ndjson")},
                {"resourceType": "Patient", "url": fixtures.url("/bad.ndjson")},
                {"resourceType": "Observation", "url": fixtures.url("/gone.ndjson")},
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let id = accepted["id"].as_str().expect("a generated id").to_string();
    assert_eq!(accepted["type"], "aidbox");
    let status = wait_for(
        &server.base,
        &server.client,
        ("root", common::ROOT_PASSWORD),
        &id,
    )
    .await;
    assert_eq!(status["status"], "failed", "{status}");
    let inputs = status["inputs"].as_array().expect("inputs");
    assert_eq!(
        (&inputs[0]["status"], &inputs[0]["total"]),
        (&json!("finished"), &json!(50))
    );
    assert_eq!(inputs[1]["status"], "failed");
    assert!(
        inputs[1]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("line 11"),
        "{status}"
    );
    assert_eq!(inputs[2]["status"], "failed");
    assert!(
        inputs[2]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("HTTP 404"),
        "{status}"
    );
    assert_eq!(
        server.count("patient").await,
        50,
        "the failed input wrote nothing"
    );

    for (body, message) in [
        (json!({"inputs": []}), "at least one input"),
        (
            json!({"inputs": [{"resourceType": "Nope", "url": "http://x"}]}),
            "unknown resourceType 'Nope'",
        ),
        (
            json!({"inputs": [{"url": "http://x"}]}),
            "needs resourceType and url",
        ),
        (
            json!({"contentEncoding": "zip", "inputs": [{"resourceType": "Patient", "url": "http://x"}]}),
            "contentEncoding must be gzip or plain",
        ),
        (
            json!({"mode": "transaction", "inputs": [{"resourceType": "Patient", "url": "http://x"}]}),
            "mode must be bulk",
        ),
    ] {
        let (status, outcome) = server.json(Method::POST, "/$import", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {outcome}");
        assert!(diagnostics(&outcome).contains(message), "{body}: {outcome}");
    }
    let body = json!({"inputs": [{"resourceType": "Client", "url": "http://x"}]});
    let (status, outcome) = server.json(Method::POST, "/$import", &body).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{outcome}");
    assert!(
        diagnostics(&outcome).contains("cannot be bulk loaded"),
        "{outcome}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_cancel_and_the_owners_access() {
    let server = TestServer::start().await;
    server
        .json(
            Method::PUT,
            "/Client/importer",
            &json!({"secret": "s", "grant_types": ["basic"]}),
        )
        .await;
    server
        .json(
            Method::PUT,
            "/Client/other",
            &json!({"secret": "s", "grant_types": ["basic"]}),
        )
        .await;
    server
        .json(
            Method::PUT,
            "/AccessPolicy/imports",
            &json!({"engine": "matcho", "matcho": {"uri": "/$import", "request-method": "post"}}),
        )
        .await;
    // About 4 MB, several of the loader's 1 MB batches, arriving over ~10 s.
    let slow = Fixture::Slow {
        bytes: patients(16_000, "s"),
        chunk: 64 * 1024,
        every: Duration::from_millis(150),
    };
    let fixtures = FixtureServer::start(vec![("/slow.ndjson", slow)]).await;
    let response = server
        .client
        .post(server.url("/$import"))
        .basic_auth("importer", Some("s"))
        .json(&json!({"id": "slow-job", "inputs": [{"resourceType": "Patient", "url": fixtures.url("/slow.ndjson")}]}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::ACCEPTED);

    // Progress shows while it runs; the owner may read it, another client may not.
    let status_as = |user: &'static str| {
        let request = server
            .client
            .get(server.url("/BulkImportStatus/slow-job"))
            .basic_auth(user, Some("s"));
        async move {
            let response = request.send().await.expect("sent");
            (
                response.status(),
                response.json::<Value>().await.unwrap_or_default(),
            )
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, document) = status_as("importer").await;
        assert_eq!(status, StatusCode::OK);
        if document["inputs"][0]["total"].as_i64() > Some(0) {
            assert_eq!(document["status"], "in-progress");
            assert_eq!(document["inputs"][0]["status"], "in-progress");
            break;
        }
        assert!(Instant::now() < deadline, "no progress shown: {document}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // To anyone else the job does not exist.
    assert_eq!(status_as("other").await.0, StatusCode::NOT_FOUND);
    let denied = server
        .client
        .delete(server.url("/BulkImportStatus/slow-job"))
        .basic_auth("other", Some("s"))
        .send()
        .await
        .expect("sent");
    assert_eq!(denied.status(), StatusCode::NOT_FOUND);

    // The owner cancels: the input's load is rolled back.
    let cancelled = server
        .client
        .delete(server.url("/BulkImportStatus/slow-job"))
        .basic_auth("importer", Some("s"))
        .send()
        .await
        .expect("sent");
    assert_eq!(cancelled.status(), StatusCode::OK);
    let document: Value = cancelled.json().await.expect("json");
    assert_eq!(document["status"], "cancelled");
    assert_eq!(document["inputs"][0]["status"], "cancelled");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        server.count("patient").await,
        0,
        "the cancelled input wrote nothing"
    );
    let (_, document) = status_as("importer").await;
    assert_eq!(document["status"], "cancelled");
    let (status, _) = server.delete("/BulkImportStatus/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_server_leaves_nothing_half_done() {
    let database = common::fresh_database().await;
    let url = common::cluster().url(&database);
    let data = tempfile::tempdir().expect("dir");
    let data_dir = data.path().to_str().expect("utf-8").to_string();
    let args = [
        "--database-url",
        url.as_str(),
        "--admin-password",
        "pw",
        "--data-dir",
        data_dir.as_str(),
        "--allow-private-sources",
        "--import-lease",
        "2",
        "--import-workers",
        "2",
    ];
    let big = patients(30_000, "k");
    let fixtures = FixtureServer::start(vec![
        (
            "/a.ndjson",
            Fixture::Slow {
                bytes: big.clone(),
                chunk: 256 * 1024,
                every: Duration::from_millis(200),
            },
        ),
        (
            "/b.ndjson.gz",
            Fixture::Slow {
                bytes: gzip(&patients(20_000, "m")),
                chunk: 64 * 1024,
                every: Duration::from_millis(300),
            },
        ),
    ])
    .await;
    let client = common::http_client();
    let mut first = ServerProcess::start(&args);
    let response = client
        .post(format!("{}/$import", first.base))
        .basic_auth("root", Some("pw"))
        .json(&json!({"id": "crash", "inputs": [
            {"resourceType": "Patient", "url": fixtures.url("/a.ndjson")},
            {"resourceType": "Patient", "url": fixtures.url("/b.ndjson.gz")},
        ]}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    // Kill it in the middle of both loads.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status: Value = client
            .get(format!("{}/BulkImportStatus/crash", first.base))
            .basic_auth("root", Some("pw"))
            .send()
            .await
            .expect("sent")
            .json()
            .await
            .expect("json");
        let running = status["inputs"]
            .as_array()
            .map(|i| i.iter().filter(|i| i["total"].as_i64() > Some(0)).count());
        if running == Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the loads did not start: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.signal(Signal::SIGKILL);
    let second = ServerProcess::start(&args);
    let status = wait_for(&second.base, &client, ("root", "pw"), "crash").await;
    assert_eq!(status["status"], "finished", "{status}");
    assert_eq!(status["inputs"][0]["total"], 30_000);
    assert_eq!(status["inputs"][1]["total"], 20_000);
    let db = common::connect(common::cluster().config(&database)).await;
    let rows: i64 = db
        .query_one("SELECT count(*) FROM patient", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        rows, 50_000,
        "every resource once: none missing, none duplicated"
    );
    let attempts: i64 = db
        .query_one("SELECT max(attempts)::bigint FROM fhirbox_task", &[])
        .await
        .expect("attempts")
        .get(0);
    assert!(attempts >= 2, "the inputs were taken over after the crash");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_share_one_job() {
    let database = common::fresh_database().await;
    let url = common::cluster().url(&database);
    let data = tempfile::tempdir().expect("dir");
    let data_dir = data.path().to_str().expect("utf-8").to_string();
    let args = [
        "--database-url",
        url.as_str(),
        "--admin-password",
        "pw",
        "--data-dir",
        data_dir.as_str(),
        "--allow-private-sources",
        "--import-workers",
        "1",
    ];
    let files: Vec<(String, Fixture)> = (0..4)
        .map(|i| {
            (
                format!("/part-{i}.ndjson"),
                Fixture::Slow {
                    bytes: patients(3000, &format!("p{i}-")),
                    chunk: 128 * 1024,
                    every: Duration::from_millis(200),
                },
            )
        })
        .collect();
    let fixtures =
        FixtureServer::start(files.iter().map(|(p, f)| (p.as_str(), f.clone())).collect()).await;
    let one = ServerProcess::start(&args);
    let two = ServerProcess::start(&args);
    let client = common::http_client();
    let inputs: Vec<Value> = (0..4).map(|i| json!({"resourceType": "Patient", "url": fixtures.url(&format!("/part-{i}.ndjson"))})).collect();
    let response = client
        .post(format!("{}/$import", one.base))
        .basic_auth("root", Some("pw"))
        .json(&json!({"id": "shared", "inputs": inputs}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let status = wait_for(&two.base, &client, ("root", "pw"), "shared").await;
    assert_eq!(status["status"], "finished", "{status}");
    let db = common::connect(common::cluster().config(&database)).await;
    let rows: i64 = db
        .query_one("SELECT count(*) FROM patient", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 12_000);
    let processes: i64 = db
        .query_one(
            "SELECT count(DISTINCT split_part(worker, '-', 1)) FROM fhirbox_task",
            &[],
        )
        .await
        .expect("workers")
        .get(0);
    assert_eq!(processes, 2, "both processes loaded inputs");
    drop((one, two));
}
