//! `$load` over real HTTP from fixtures served by a local HTTP server: every variant, gzip and
//! plain, replacement with and without history, the options, and every failure leaving the
//! database exactly as it was.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::Duration;

use common::fixtures::{gzip, Fixture, FixtureServer};
use common::{diagnostics, SourcePolicy, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// `n` native Patient lines, ids p0..p{n-1}, with `tag` in each.
fn patients(n: usize, tag: &str) -> Vec<u8> {
    (0..n)
        .map(|i| format!("{{\"resourceType\":\"Patient\",\"id\":\"p{i}\",\"name\":[{{\"given\":[\"{tag}{i}\"]}}]}}\n"))
        .collect::<String>()
        .into_bytes()
}

async fn load(server: &TestServer, path: &str, body: Value) -> (StatusCode, Value) {
    server.json(Method::POST, path, &body).await
}

async fn stored(server: &TestServer, table: &str, id: &str) -> Option<Value> {
    server
        .db()
        .await
        .query_opt(
            &format!("SELECT resource FROM {table} WHERE id = $1"),
            &[&id],
        )
        .await
        .expect("query")
        .map(|row| row.get(0))
}

/// Everything a failed load must not have changed.
async fn snapshot(server: &TestServer) -> Vec<(String, i64, i64)> {
    server
        .db()
        .await
        .query(
            "SELECT 'patient', count(*), coalesce(sum(txid), 0)::bigint FROM patient
             UNION ALL SELECT 'patient_history', count(*), coalesce(sum(txid), 0)::bigint FROM patient_history
             UNION ALL SELECT 'observation', count(*), coalesce(sum(txid), 0)::bigint FROM observation",
            &[],
        )
        .await
        .expect("snapshot")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn typed_load_plain_and_gzip_then_replacement_with_and_without_history() {
    let server = TestServer::start().await;
    let fixtures = FixtureServer::start(vec![
        ("/patients.ndjson", Fixture::Bytes(patients(500, "A"))),
        // Detected by content, whatever the name says.
        (
            "/patients-b.ndjson",
            Fixture::Bytes(gzip(&patients(500, "B"))),
        ),
        (
            "/patients-c.json",
            Fixture::Bytes(gzip(&patients(500, "C"))),
        ),
    ])
    .await;
    let (status, body) = load(
        &server,
        "/Patient/$load",
        json!({"source": fixtures.url("/patients.ndjson")}),
    )
    .await;
    assert_eq!((status, &body), (StatusCode::OK, &json!({"total": 500})));
    assert_eq!(server.count("patient").await, 500);
    assert_eq!(
        stored(&server, "patient", "p7").await,
        Some(json!({"name": [{"given": ["A7"]}]}))
    );
    let (_, read) = server.get("/Patient/p7").await;
    assert_eq!(read["meta"]["createdAt"], read["meta"]["lastUpdated"]);
    assert!(read["meta"]["versionId"].as_i64().is_some());

    // Again, every id replaced, without history (the default, for speed).
    let (status, body) = load(
        &server,
        "/Patient/$load",
        json!({"source": fixtures.url("/patients-b.ndjson")}),
    )
    .await;
    assert_eq!((status, &body), (StatusCode::OK, &json!({"total": 500})));
    assert_eq!(server.count("patient").await, 500);
    assert_eq!(server.count("patient_history").await, 0);
    assert_eq!(
        stored(&server, "patient", "p7").await,
        Some(json!({"name": [{"given": ["B7"]}]}))
    );
    let (_, replaced) = server.get("/Patient/p7").await;
    assert!(
        replaced["meta"]["versionId"].as_i64() > read["meta"]["versionId"].as_i64(),
        "a new version id"
    );
    assert_eq!(
        replaced["meta"]["createdAt"], read["meta"]["createdAt"],
        "creation time kept"
    );

    // With update: true, the replaced versions are kept.
    let (status, _) = load(
        &server,
        "/Patient/$load",
        json!({"source": fixtures.url("/patients-c.json"), "update": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server.count("patient_history").await, 500);
    let (_, history) = server.get("/Patient/p7/_history").await;
    assert_eq!(history["total"], 2);
    assert_eq!(history["entry"][1]["resource"]["name"][0]["given"][0], "B7");
}

#[tokio::test]
async fn mixed_load_partial_overlap_repeats_and_the_seed_yaml_body() {
    let server = TestServer::start().await;
    server
        .json(Method::PUT, "/Patient/p1", &json!({"active": true}))
        .await;
    let lines = [
        r#"{"resourceType": "Patient", "id": "p1", "gender": "female"}"#,
        r#"{"resourceType": "Patient", "id": "p2", "gender": "male"}"#,
        "",
        r#"{"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"resourceType": "Patient", "id": "p2"}}"#,
        r#"{"resourceType": "Patient", "id": "p2", "gender": "other"}"#,
        r#"{"resourceType": "Patient", "id": "p3"}"#,
    ]
    .join("\n");
    let fixtures = FixtureServer::start(vec![(
        "/all.ndjson.gz",
        Fixture::Bytes(gzip(lines.as_bytes())),
    )])
    .await;
    let body = format!("source: '{}'\n", fixtures.url("/all.ndjson.gz"));
    let (status, counts) = server.yaml(Method::POST, "/$load", &body).await;
    assert_eq!(
        (status, &counts),
        (StatusCode::OK, &json!({"Observation": 1, "Patient": 4}))
    );
    assert_eq!(
        stored(&server, "patient", "p1").await,
        Some(json!({"gender": "female"})),
        "an existing id is replaced"
    );
    assert_eq!(
        stored(&server, "patient", "p2").await,
        Some(json!({"gender": "other"})),
        "the last line wins"
    );
    assert_eq!(server.count("patient").await, 3);
    let (_, observation) = server.get("/Observation/o1").await;
    assert_eq!(
        observation["subject"],
        json!({"resourceType": "Patient", "id": "p2"})
    );
}

#[tokio::test]
async fn fhir_loads_convert_in_both_shapes() {
    let server = TestServer::start().await;
    let fhir = [
        r#"{"resourceType": "Patient", "id": "p1", "deceasedBoolean": false}"#,
        r#"{"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/p1"}, "valueQuantity": {"value": 1.50, "unit": "mg"}}"#,
    ]
    .join("\n");
    let observations = r#"{"id": "o2", "status": "final", "code": {"text": "y"}, "effectiveDateTime": "2020-01-01"}"#;
    let fixtures = FixtureServer::start(vec![
        ("/mixed.ndjson", Fixture::Bytes(fhir.into_bytes())),
        (
            "/obs.ndjson",
            Fixture::Bytes(observations.as_bytes().to_vec()),
        ),
    ])
    .await;
    let (status, counts) = load(
        &server,
        "/fhir/$load",
        json!({"source": fixtures.url("/mixed.ndjson")}),
    )
    .await;
    assert_eq!(
        (status, &counts),
        (StatusCode::OK, &json!({"Observation": 1, "Patient": 1}))
    );
    // `1.50` keeps its digits (json! would make it the float 1.5, so parse the text).
    let expected: Value = serde_json::from_str(
        r#"{"status": "final", "code": {"text": "x"}, "subject": {"resourceType": "Patient", "id": "p1"},
            "value": {"Quantity": {"value": 1.50, "unit": "mg"}}}"#,
    )
    .expect("json");
    assert_eq!(stored(&server, "observation", "o1").await, Some(expected));
    assert_eq!(
        stored(&server, "patient", "p1").await,
        Some(json!({"deceased": {"boolean": false}}))
    );
    let (status, total) = load(
        &server,
        "/fhir/Observation/$load",
        json!({"source": fixtures.url("/obs.ndjson")}),
    )
    .await;
    assert_eq!((status, &total), (StatusCode::OK, &json!({"total": 1})));
    assert_eq!(
        stored(&server, "observation", "o2")
            .await
            .map(|b| b["effective"].clone()),
        Some(json!({"dateTime": "2020-01-01"}))
    );
}

#[tokio::test]
async fn strip_nulls_and_merge() {
    let server = TestServer::start().await;
    let line = r#"{"resourceType": "Patient", "id": "p1", "active": false, "gender": null, "name": [{"family": null, "given": ["x"]}]}"#;
    let fixtures = FixtureServer::start(vec![(
        "/p.ndjson",
        Fixture::Bytes(line.as_bytes().to_vec()),
    )])
    .await;
    let (status, _) = load(
        &server,
        "/$load",
        json!({"source": fixtures.url("/p.ndjson"), "strip-nulls": true, "merge": {"active": true, "language": "en"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        stored(&server, "patient", "p1").await,
        Some(json!({"active": true, "language": "en", "name": [{"given": ["x"]}]}))
    );
    let (status, _) = load(
        &server,
        "/$load",
        json!({"source": fixtures.url("/p.ndjson")}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        stored(&server, "patient", "p1")
            .await
            .map(|b| b["gender"].clone()),
        Some(Value::Null),
        "nulls kept by default"
    );
}

#[tokio::test]
async fn every_failure_leaves_the_database_as_it_was() {
    let server = TestServer::start().await;
    server
        .json(Method::PUT, "/Patient/keep", &json!({"active": true}))
        .await;
    let before = snapshot(&server).await;
    let mut bad_line = patients(300, "X");
    bad_line.extend_from_slice(b"{\"resourceType\":\"Patient\",\"id\":\"broken\",\"name\":[}\n");
    bad_line.extend(patients(10, "Y"));
    let mut no_id = patients(5, "X");
    no_id.extend_from_slice(b"{\"resourceType\":\"Patient\",\"gender\":\"male\"}\n");
    let big = gzip(&patients(20_000, "Z"));
    let fixtures = FixtureServer::start(vec![
        ("/bad-line.ndjson", Fixture::Bytes(bad_line)),
        ("/no-id.ndjson", Fixture::Bytes(no_id)),
        (
            "/unknown.ndjson",
            Fixture::Bytes(b"{\"resourceType\":\"Nope\",\"id\":\"x\"}\n".to_vec()),
        ),
        (
            "/wrong-type.ndjson",
            Fixture::Bytes(b"{\"resourceType\":\"Observation\",\"id\":\"x\"}\n".to_vec()),
        ),
        (
            "/truncated.ndjson.gz",
            Fixture::Bytes(big[..big.len() / 2].to_vec()),
        ),
        (
            "/broken-off.ndjson.gz",
            Fixture::BrokenOff {
                bytes: big.clone(),
                cut: big.len() / 2,
            },
        ),
        ("/missing", Fixture::Status(404)),
        ("/error", Fixture::Status(500)),
    ])
    .await;
    let cases = [
        (
            "/Patient/$load",
            "/bad-line.ndjson",
            StatusCode::BAD_REQUEST,
            "line 301: malformed JSON at column",
        ),
        (
            "/Patient/$load",
            "/no-id.ndjson",
            StatusCode::BAD_REQUEST,
            "line 6: no id",
        ),
        (
            "/$load",
            "/unknown.ndjson",
            StatusCode::BAD_REQUEST,
            "line 1: unknown resourceType 'Nope'",
        ),
        (
            "/Patient/$load",
            "/wrong-type.ndjson",
            StatusCode::BAD_REQUEST,
            "line 1: resourceType 'Observation' in a load of Patient",
        ),
        (
            "/Patient/$load",
            "/truncated.ndjson.gz",
            StatusCode::BAD_REQUEST,
            "gzip data is damaged or truncated",
        ),
        (
            "/Patient/$load",
            "/broken-off.ndjson.gz",
            StatusCode::BAD_GATEWAY,
            "downloading the source failed",
        ),
        (
            "/Patient/$load",
            "/missing",
            StatusCode::BAD_GATEWAY,
            "the source answered HTTP 404",
        ),
        ("/$load", "/error", StatusCode::BAD_GATEWAY, "HTTP 500"),
    ];
    let mut answers = Vec::new();
    for (path, source, expected, message) in cases {
        let (status, outcome) = load(&server, path, json!({"source": fixtures.url(source)})).await;
        assert_eq!(status, expected, "{source}: {outcome}");
        assert!(
            diagnostics(&outcome).contains(message),
            "{source}: wanted '{message}' in {outcome}"
        );
        assert_eq!(
            snapshot(&server).await,
            before,
            "{source} changed the database"
        );
        answers.push(common::answer(
            &format!("{path} {source}"),
            status,
            &outcome,
        ));
    }
    for (body, message) in [
        (json!({}), "needs 'source'"),
        (json!({"source": 5}), "'source' must be a URL"),
        (
            json!({"source": "x", "update": "yes"}),
            "'update' must be true or false",
        ),
        (
            json!({"source": "x", "merge": [1]}),
            "'merge' must be an object",
        ),
        (
            json!({"source": "x", "validation": "on"}),
            "unknown option 'validation'",
        ),
        (json!({"source": "not a url"}), "is not a valid URL"),
        (
            json!({"source": "ftp://example.org/x"}),
            "unsupported source scheme 'ftp'",
        ),
    ] {
        let (status, outcome) = load(&server, "/$load", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {outcome}");
        assert!(diagnostics(&outcome).contains(message), "{body}: {outcome}");
        answers.push(common::answer(&format!("/$load {body}"), status, &outcome));
    }
    insta::assert_snapshot!(common::pretty(&answers));
    assert_eq!(snapshot(&server).await, before);
    common::assert_no_connection_left(&server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_mid_load_writes_nothing() {
    let server = TestServer::start().await;
    let before = snapshot(&server).await;
    let fixtures = FixtureServer::start(vec![(
        "/slow.ndjson",
        Fixture::Slow {
            bytes: patients(30_000, "S"),
            chunk: 64 * 1024,
            every: Duration::from_millis(100),
        },
    )])
    .await;
    let request = server
        .request(Method::POST, "/Patient/$load")
        .json(&json!({"source": fixtures.url("/slow.ndjson")}))
        .timeout(Duration::from_millis(700));
    assert!(request.send().await.is_err(), "the client gives up");
    // The server notices and drops the load, its transaction and its connection: soon no
    // other session works in the database. (The slow source alone takes ~2.3 s: a load that
    // went on would still be running, or would have committed, after the wait below.)
    let mut waited = Duration::ZERO;
    loop {
        let busy: i64 = server
            .db()
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                   AND pid <> pg_backend_pid() AND state <> 'idle'",
                &[],
            )
            .await
            .expect("activity")
            .get(0);
        if busy == 0 {
            break;
        }
        assert!(
            waited < Duration::from_secs(10),
            "the load is still running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(snapshot(&server).await, before);
}

#[tokio::test]
async fn source_rules() {
    let closed = TestServer::start_with_sources(SourcePolicy::default()).await;
    let mut answers = Vec::new();
    let fixtures = FixtureServer::start(vec![
        ("/p.ndjson", Fixture::Bytes(patients(1, "A"))),
        (
            "/to-metadata",
            Fixture::Redirect("http://169.254.169.254/latest/meta-data/".into()),
        ),
    ])
    .await;
    for (source, status, message) in [
        (
            fixtures.url("/p.ndjson"),
            StatusCode::FORBIDDEN,
            "is not allowed",
        ),
        (
            "http://169.254.169.254/latest/meta-data/".into(),
            StatusCode::FORBIDDEN,
            "169.254.169.254",
        ),
        (
            "http://localhost:1/x".into(),
            StatusCode::FORBIDDEN,
            "is not allowed",
        ),
        (
            "file:///etc/passwd".into(),
            StatusCode::FORBIDDEN,
            "file:// sources are disabled",
        ),
    ] {
        let (got, outcome) = load(&closed, "/$load", json!({"source": source})).await;
        assert_eq!(got, status, "{source}: {outcome}");
        assert!(
            diagnostics(&outcome).contains(message),
            "{source}: {outcome}"
        );
        answers.push(common::answer(&source, got, &outcome));
    }

    // Tests allow loopback and tests/fixtures/; link-local stays refused, redirects too.
    let open = TestServer::start().await;
    let (status, outcome) = load(
        &open,
        "/$load",
        json!({"source": fixtures.url("/to-metadata")}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{outcome}");
    let inside = format!(
        "file://{}/seeds/../load/patients.ndjson",
        common::fixtures_dir().display()
    );
    let (status, body) = load(&open, "/$load", json!({"source": inside})).await;
    assert_eq!((status, &body), (StatusCode::OK, &json!({"Patient": 2})));
    let outside = format!(
        "file://{}/../../Cargo.toml",
        common::fixtures_dir().display()
    );
    let (status, outcome) = load(&open, "/$load", json!({"source": outside})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{outcome}");
    answers.push(common::answer(&outside, status, &outcome));
    insta::assert_snapshot!(common::pretty(&answers));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_testdata_file_through_fhir_load() {
    let server = TestServer::start().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut files = Vec::new();
    for dir in std::fs::read_dir(&root)
        .expect("testdata")
        .flatten()
        .filter(|e| e.path().is_dir())
    {
        for file in std::fs::read_dir(dir.path()).expect("dataset").flatten() {
            if file.path().to_string_lossy().ends_with(".ndjson.gz") {
                files.push(file.path());
            }
        }
    }
    files.sort();
    let fixtures = FixtureServer::start(
        files
            .iter()
            .map(|f| {
                let name: &'static str = Box::leak(
                    format!("/{}", f.strip_prefix(&root).expect("under root").display())
                        .into_boxed_str(),
                );
                (name, Fixture::Bytes(std::fs::read(f).expect("read")))
            })
            .collect(),
    )
    .await;
    let mut distinct =
        std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
    for file in &files {
        let name = format!(
            "/{}",
            file.strip_prefix(&root).expect("under root").display()
        );
        let mut expected = std::collections::BTreeMap::<String, u64>::new();
        let reader = BufReader::new(flate2::read::MultiGzDecoder::new(
            std::fs::File::open(file).expect("open"),
        ));
        for line in reader
            .lines()
            .map_while(Result::ok)
            .filter(|l| !l.trim().is_empty())
        {
            let doc: Value = serde_json::from_str(&line).expect("json");
            let rt = doc["resourceType"].as_str().unwrap_or_default().to_string();
            *expected.entry(rt.clone()).or_default() += 1;
            distinct
                .entry(rt)
                .or_default()
                .insert(doc["id"].as_str().unwrap_or_default().to_string());
        }
        let (status, counts) = load(
            &server,
            "/fhir/$load",
            json!({"source": fixtures.url(&name)}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{name}: {counts}");
        assert_eq!(
            counts,
            serde_json::to_value(&expected).expect("json"),
            "{name}"
        );
    }
    for (rt, ids) in distinct {
        assert_eq!(
            server.count(&rt.to_ascii_lowercase()).await,
            ids.len() as i64,
            "{rt}"
        );
    }
}

/// Observations of patient `patient`, ids o0..o{n-1}.
fn observations(n: usize, patient: &str) -> Vec<u8> {
    (0..n)
        .map(|i| format!("{{\"resourceType\":\"Observation\",\"id\":\"o{i}\",\"status\":\"final\",\"subject\":{{\"resourceType\":\"Patient\",\"id\":\"{patient}\"}}}}\n"))
        .collect::<String>()
        .into_bytes()
}

async fn has_compartment_index(server: &TestServer) -> bool {
    server
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'observation_fhirbox_patients'",
            &[],
        )
        .await
        .expect("catalog")
        .get::<_, i64>(0)
        == 1
}

async fn patient_rows_found_by_index(server: &TestServer, patient: &str) -> i64 {
    let db = server.db().await;
    db.batch_execute("SET enable_seqscan = off")
        .await
        .expect("set");
    db.query_one(
        "SELECT count(*) FROM observation WHERE fhirbox_patients_observation(resource) ?| ARRAY[$1]",
        &[&patient],
    )
    .await
    .expect("count")
    .get(0)
}

#[tokio::test]
async fn a_load_into_an_empty_table_rebuilds_the_compartment_index() {
    let server = TestServer::start().await;
    let fixtures = FixtureServer::start(vec![
        ("/obs.ndjson", Fixture::Bytes(observations(500, "pa"))),
        (
            "/broken.ndjson",
            Fixture::Bytes([observations(10, "pb"), b"{not json\n".to_vec()].concat()),
        ),
    ])
    .await;

    // Empty table: the index is dropped for the load and built again before the commit.
    let (status, body) = load(
        &server,
        "/Observation/$load",
        json!({"source": fixtures.url("/obs.ndjson")}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(has_compartment_index(&server).await);
    assert_eq!(patient_rows_found_by_index(&server, "pa").await, 500);

    // A failed load into an empty table leaves the index as it was (the drop rolls back).
    server
        .db()
        .await
        .batch_execute("TRUNCATE observation")
        .await
        .expect("truncate");
    let (status, _) = load(
        &server,
        "/Observation/$load",
        json!({"source": fixtures.url("/broken.ndjson")}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(has_compartment_index(&server).await);

    // A reader holding the table: the load does not wait for it, it keeps the index up to
    // date row by row instead.
    let reader = server.db().await;
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM observation")
        .await
        .expect("hold the table");
    let started = std::time::Instant::now();
    let (status, body) = load(
        &server,
        "/Observation/$load",
        json!({"source": fixtures.url("/obs.ndjson")}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // It did not wait for the reader's lock (NOWAIT), it went on at once.
    assert!(started.elapsed() < Duration::from_secs(5));
    reader.batch_execute("COMMIT").await.expect("release");
    assert!(has_compartment_index(&server).await);
    assert_eq!(patient_rows_found_by_index(&server, "pa").await, 500);
}
