//! What an operator relies on: the log (a line per request and per bulk operation, no colors
//! in files, no secrets), the metrics, progress that moves, sources that say what failed,
//! `$import` refusing at once what it will refuse later, job ids that can be used again, and
//! the format trap closed both ways.

mod common;

use std::time::{Duration, Instant};

use common::fixtures::{Fixture, FixtureServer};
use common::process::ServerProcess;
use common::{diagnostics, SourcePolicy, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// A child-process fhirbox on a fresh database (root's password `root-pw`).
async fn child(extra: &[&str]) -> ServerProcess {
    let database = common::fresh_database().await;
    let url = common::cluster().url(&database);
    let dir = tempfile::tempdir().expect("dir").keep();
    let data = dir.to_str().expect("utf-8").to_string();
    let fixtures = common::fixtures_dir().display().to_string();
    let mut args = vec![
        "--database-url",
        &url,
        "--data-dir",
        &data,
        "--admin-password",
        "root-pw",
        "--source-dir",
        &fixtures,
    ];
    args.extend_from_slice(extra);
    ServerProcess::start(&args)
}

fn as_root(server: &ServerProcess, method: Method, path: &str) -> reqwest::RequestBuilder {
    common::http_client()
        .request(method, format!("{}{path}", server.base))
        .basic_auth("root", Some("root-pw"))
}

/// Waits until the child's log has a line satisfying `wanted` (lines are written when an
/// answer's body ends, a moment after the client has it).
async fn wait_for_line(server: &ServerProcess, wanted: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = server.log().into_iter().find(|l| wanted(l)) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no such line in {:#?}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_json_log_has_a_line_per_request_and_per_bulk_operation_and_no_secret() {
    let server = child(&["--log-format", "json"]).await;
    let status = as_root(&server, Method::PUT, "/Patient/p1")
        .json(&json!({"resourceType": "Patient", "name": [{"given": ["Ann"]}]}))
        .send()
        .await
        .expect("sent")
        .status();
    assert_eq!(status, StatusCode::CREATED);
    // Refused (strict handling), so that the failure is logged too: without its query.
    let leaky = as_root(&server, Method::GET, "/Patient?access_token=shh")
        .header("prefer", "handling=strict")
        .send()
        .await
        .expect("sent");
    assert_eq!(leaky.status(), StatusCode::BAD_REQUEST);
    let dumped = as_root(&server, Method::GET, "/Patient/$dump?_since=2000-01-01")
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("body");
    assert_eq!(dumped.lines().count(), 1);
    let response = as_root(&server, Method::POST, "/$dump-sql")
        .json(&json!({"query": "select $1::text", "params": ["param-value-never-logged"]}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    let _ = response.text().await;
    let wrong = common::http_client()
        .get(format!("{}/Patient/p1", server.base))
        .basic_auth("root", Some("wrong-password-never-logged"))
        .send()
        .await
        .expect("sent");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);

    let request = wait_for_line(&server, |l| l.contains("\"path\":\"/Patient/$dump\"")).await;
    let request: Value = serde_json::from_str(&request).expect("a JSON line");
    assert_eq!(request["message"], "request");
    assert_eq!(request["method"], "GET");
    assert_eq!(request["status"], 200);
    assert_eq!(request["subject"], "root");
    assert!(request["bytes"].as_u64().is_some_and(|b| b > 0));
    assert!(request["ms"].is_u64());
    let bulk = wait_for_line(&server, |l| {
        l.contains("\"bulk operation\"") && l.contains("$dump\"")
    })
    .await;
    let bulk: Value = serde_json::from_str(&bulk).expect("a JSON line");
    assert_eq!(bulk["operation"], "$dump");
    assert_eq!(bulk["what"], "Patient");
    assert_eq!(bulk["rows"], 1);
    assert_eq!(bulk["outcome"], "finished");
    assert!(bulk["mb"].is_f64() && bulk["seconds"].is_f64() && bulk["mb_per_s"].is_f64());
    wait_for_line(&server, |l| l.contains("\"status\":401")).await;
    wait_for_line(&server, |l| l.contains("\"$dump-sql\"")).await;
    let log = server.log().join("\n");
    for secret in [
        "root-pw",
        "wrong-password-never-logged",
        "param-value-never-logged",
        "shh",
    ] {
        assert!(!log.contains(secret), "{secret} is in the log");
    }
    assert!(
        log.contains("\"message\":\"configuration\""),
        "the start-up configuration"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_text_log_has_no_colors_when_it_is_not_a_terminal() {
    let server = child(&[]).await;
    let response = as_root(&server, Method::GET, "/Patient/none")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let line = wait_for_line(&server, |l| l.contains("/Patient/none")).await;
    assert!(line.contains("status=404"), "{line}");
    let log = server.log().join("\n");
    assert!(!log.contains('\u{1b}'), "escape codes in the log: {log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_answer_on_their_own_address_with_the_named_families() {
    let server = child(&["--metrics-listen", "127.0.0.1:0"]).await;
    let metrics = server
        .printed
        .iter()
        .find_map(|l| l.strip_prefix("fhirbox metrics on "))
        .expect("the metrics address is printed")
        .to_string();
    let response = as_root(&server, Method::GET, "/Patient/$dump")
        .send()
        .await
        .expect("sent");
    let _ = response.text().await;
    let response = as_root(&server, Method::POST, "/$import")
        .json(&json!({"inputs": [{"resourceType": "Patient", "url": "http://127.0.0.1:9/none"}]}))
        .send()
        .await
        .expect("sent");
    // Refused at kick-off (a loopback source without --allow-private-sources): no job.
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let source = format!(
        "file://{}/load/patients.ndjson",
        common::fixtures_dir().display()
    );
    let response = as_root(&server, Method::POST, "/$import")
        .json(&json!({"inputs": [{"resourceType": "Patient", "url": source}]}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = common::http_client()
        .get(&metrics)
        .send()
        .await
        .expect("scraped")
        .text()
        .await
        .expect("text");
    for family in [
        "fhirbox_http_requests_total",
        "fhirbox_http_request_duration_seconds_bucket",
        "fhirbox_http_response_bytes_total",
        "fhirbox_bulk_rows_total",
        "fhirbox_bulk_bytes_total",
        "fhirbox_bulk_active",
        "fhirbox_db_connections",
        "fhirbox_job_tasks",
    ] {
        assert!(text.contains(family), "{family} missing from:\n{text}");
    }
    assert!(
        text.contains("route=\"/{type}/$dump\""),
        "routes are templates:\n{text}"
    );
    // The main API does not serve it.
    let (status, _) = (
        as_root(&server, Method::GET, "/metrics")
            .send()
            .await
            .expect("sent")
            .status(),
        (),
    );
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_imports_progress_moves_by_bytes_with_speed_and_time_left() {
    let lines: String = (0..3000)
        .map(|i| {
            format!(
                "{{\"resourceType\":\"Patient\",\"id\":\"p{i}\",\"text\":{{\"div\":\"{}\"}}}}\n",
                "x".repeat(500)
            )
        })
        .collect();
    let fixtures = FixtureServer::start(vec![(
        "/slow.ndjson",
        Fixture::Slow {
            bytes: lines.into_bytes(),
            chunk: 96 * 1024,
            every: Duration::from_millis(350),
        },
    )])
    .await;
    let server = TestServer::start().await;
    let (status, _) = server
        .json(
            Method::POST,
            "/$import",
            &json!({"id": "moving", "inputs": [{"resourceType": "Patient", "url": fixtures.url("/slow.ndjson")}]}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, document) = server.get("/BulkImportStatus/moving").await;
        let percent = document["progress"]["percent"].as_f64().unwrap_or(0.0);
        if document["status"] == "in-progress" && percent > 0.0 && percent < 100.0 {
            let input = &document["inputs"][0];
            assert!(
                input["size"].as_u64().is_some_and(|s| s > 1_000_000),
                "{document}"
            );
            assert!(input["resourcesPerSecond"].as_f64().is_some(), "{document}");
            assert!(input["secondsLeft"].as_i64().is_some(), "{document}");
            seen.push(percent);
        }
        if document["status"] == "finished" {
            assert_eq!(document["progress"]["percent"], json!(100.0));
            break;
        }
        assert!(Instant::now() < deadline, "{document}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    seen.dedup();
    assert!(
        seen.len() >= 2 && seen.windows(2).all(|w| w[0] < w[1]),
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_source_that_cannot_be_reached_says_why() {
    let server = TestServer::start().await;
    let (status, outcome) = server
        .json(
            Method::POST,
            "/Patient/$load",
            &json!({"source": "http://no-such-host.invalid/Patient.ndjson"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{outcome}");
    assert!(
        diagnostics(&outcome).contains("cannot resolve the host name 'no-such-host.invalid'"),
        "{outcome}"
    );
    let (status, outcome) = server
        .json(
            Method::POST,
            "/Patient/$load",
            &json!({"source": "http://127.0.0.1:9/x.ndjson"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{outcome}");
    assert!(
        diagnostics(&outcome).contains("cannot connect to 127.0.0.1:9: the connection was refused"),
        "{outcome}"
    );
    // The same words in an import's status.
    let (status, _) = server
        .json(
            Method::POST,
            "/$import",
            &json!({"id": "unreachable", "inputs": [{"resourceType": "Patient", "url": "http://no-such-host.invalid/p"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, document) = server.get("/BulkImportStatus/unreachable").await;
        if document["status"] == "failed" {
            let error = document["inputs"][0]["error"].as_str().unwrap_or_default();
            assert!(error.contains("no-such-host.invalid"), "{document}");
            break;
        }
        assert!(Instant::now() < deadline, "{document}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn import_refuses_at_kick_off_what_it_would_refuse_later() {
    let server = TestServer::start_with_sources(SourcePolicy::default()).await;
    let mut answers = Vec::new();
    for body in [
        json!({"inputs": [{"resourceType": "Patient", "url": "http://127.0.0.1:9/x.ndjson"}]}),
        json!({"inputs": [{"resourceType": "Patient", "url": "file:///etc/passwd"}]}),
        json!({"inputs": [{"resourceType": "Patient", "url": "ftp://example.org/x"}]}),
        json!({"inputs": [
            {"resourceType": "Patient", "url": "https://example.org/p.ndjson"},
            {"resourceType": "Patient", "url": "https://example.org/p.ndjson"}
        ]}),
    ] {
        let (status, outcome) = server.json(Method::POST, "/$import", &body).await;
        answers.push(common::answer(&body.to_string(), status, &outcome));
    }
    insta::assert_snapshot!(common::pretty(&answers));
    let (status, _) = server.get("/BulkImportStatus/x").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_ended_job_can_be_deleted_and_its_id_used_again() {
    let fixtures = FixtureServer::start(vec![("/missing", Fixture::Status(404))]).await;
    let server = TestServer::start().await;
    let body = json!({"id": "synthea", "inputs": [{"resourceType": "Patient", "url": fixtures.url("/missing")}]});
    let response = server
        .request(Method::POST, "/$import")
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(
        response.headers()["content-location"],
        format!("{}/BulkImportStatus/synthea", server.base).as_str(),
        "absolute, like $export's"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.get("/BulkImportStatus/synthea").await.1["status"] != "failed" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _) = server.json(Method::POST, "/$import", &body).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "the id is taken while the job exists"
    );
    let (status, _) = server.delete("/BulkImportStatus/synthea").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = server.get("/BulkImportStatus/synthea").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = server.json(Method::POST, "/$import", &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "the id is free again");
}

#[tokio::test]
async fn the_format_trap_is_refused_both_ways() {
    let server = TestServer::start().await;
    let fhir = "{\"resourceType\":\"Observation\",\"id\":\"o1\",\"status\":\"final\",\"code\":{\"text\":\"x\"},\"subject\":{\"reference\":\"Patient/p1\"},\"valueQuantity\":{\"value\":1}}\n";
    let native = "{\"resourceType\":\"Observation\",\"id\":\"o1\",\"status\":\"final\",\"code\":{\"text\":\"x\"},\"subject\":{\"resourceType\":\"Patient\",\"id\":\"p1\"},\"value\":{\"Quantity\":{\"value\":1}}}\n";
    let fixtures = FixtureServer::start(vec![
        ("/fhir.ndjson", Fixture::Bytes(fhir.into())),
        ("/native.ndjson", Fixture::Bytes(native.into())),
    ])
    .await;
    let mut answers = Vec::new();
    for (path, source) in [
        ("/Observation/$load", "/fhir.ndjson"),
        ("/fhir/Observation/$load", "/native.ndjson"),
    ] {
        let (status, outcome) = server
            .json(Method::POST, path, &json!({"source": fixtures.url(source)}))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
        answers.push(common::answer(
            &format!("{path} {source}"),
            status,
            &outcome,
        ));
    }
    insta::assert_snapshot!(common::pretty(&answers));
    assert_eq!(server.count("observation").await, 0);
    let (status, body) = server
        .json(
            Method::POST,
            "/Observation/$load",
            &json!({"source": fixtures.url("/fhir.ndjson"), "format-check": false}),
        )
        .await;
    assert_eq!(
        (status, &body),
        (StatusCode::OK, &json!({"total": 1})),
        "the check can be turned off"
    );
    let (status, body) = server
        .json(
            Method::POST,
            "/fhir/Observation/$load",
            &json!({"source": fixtures.url("/fhir.ndjson")}),
        )
        .await;
    assert_eq!(
        (status, &body),
        (StatusCode::OK, &json!({"total": 1})),
        "the right route"
    );
}
