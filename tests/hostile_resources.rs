//! Attacks on resources that got through in the second round (issue "Safe to expose, round
//! 2"), each performed against the real server: views that exhaust a PostgreSQL backend,
//! connections that never end, jobs that crowd out others, outputs without end, loads that
//! race on their tables. Memory is read where it is spent (a backend's `VmHWM`), and the
//! tests that would hurt the machine if the fix regressed run under a watchdog that kills the
//! backend they started and fails.

mod common;

use std::time::{Duration, Instant};

use common::backends;
use common::keys::Tls;
use common::process::ServerProcess;
use common::smart::https_server;
use common::{diagnostics, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

/// A Client `reader` (secret `pw`) allowed to run views and nothing else.
async fn reader(server: &TestServer) {
    let (status, body) = server
        .json(
            Method::PUT,
            "/",
            &json!([
                {"resourceType": "Client", "id": "reader", "secret": "pw", "grant_types": ["basic"]},
                {"resourceType": "AccessPolicy", "id": "reader-runs", "engine": "matcho",
                 "matcho": {"uri": "#\\$viewdefinition-run$"},
                 "link": [{"resourceType": "Client", "id": "reader"}]}
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Runs an inline view as `reader`; the status and the body.
async fn run_view(server: &TestServer, view: &Value, format: &str) -> (StatusCode, String) {
    let response = server
        .client
        .post(server.url(&format!(
            "/fhir/ViewDefinition/$viewdefinition-run?_format={format}"
        )))
        .basic_auth("reader", Some("pw"))
        .json(&json!({"resourceType": "Parameters",
                      "parameter": [{"name": "viewResource", "resource": view}]}))
        .send()
        .await
        .expect("sent");
    let status = response.status();
    (status, response.text().await.unwrap_or_default())
}

/// `gender` wrapped `depth` times in `(...).where($this = $this)`: each level repeats its
/// operand, so the SQL grows 3^depth.
fn nested_gender(depth: usize) -> String {
    let mut path = "gender".to_string();
    for _ in 0..depth {
        path = format!("({path}).where($this = $this)");
    }
    path
}

fn wide_view(columns: usize, depth: usize) -> Value {
    let path = nested_gender(depth);
    let columns: Vec<Value> = (0..columns)
        .map(|i| json!({"name": format!("c{i}"), "path": path}))
        .collect();
    json!({"resourceType": "ViewDefinition", "resource": "Patient", "select": [{"column": columns}]})
}

async fn patients(server: &TestServer, n: usize) {
    let list: Vec<Value> = (0..n)
        .map(|i| json!({"resourceType": "Patient", "id": format!("p{i}"), "gender": if i % 2 == 0 {"female"} else {"male"}}))
        .collect();
    let (status, body) = server.json(Method::PUT, "/", &Value::Array(list)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

// Row 1: the whole compiled statement is bounded before it reaches PostgreSQL.

#[tokio::test(flavor = "multi_thread")]
async fn a_wide_view_of_nested_wheres_is_refused_before_postgres_sees_it() {
    let server = TestServer::start().await;
    reader(&server).await;
    patients(&server, 10).await;
    let watch = backends::watch(&server.database, 2 * GIB).await;
    let view = wide_view(150, 8);
    assert!(
        view.to_string().len() < 40_000,
        "the attack's body is small"
    );
    let started = Instant::now();
    let (status, body) = run_view(&server, &view, "json").await;
    let watched = watch.finish().await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let outcome: Value = serde_json::from_str(&body).expect("an OperationOutcome");
    assert!(
        diagnostics(&outcome).contains("--view-max-sql-bytes"),
        "{outcome}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!watched.killed, "a backend grew past 2 GB");
    assert!(
        watched.peak < 200 * MIB,
        "no backend worked on it: {} MiB",
        watched.peak / MIB
    );
}

#[tokio::test]
async fn two_thousand_union_branches_are_refused() {
    let server = TestServer::start().await;
    reader(&server).await;
    let branches: Vec<Value> = (0..2000)
        .map(|_| json!({"column": [{"name": "g", "path": "gender"}]}))
        .collect();
    let view = json!({"resourceType": "ViewDefinition", "resource": "Patient",
                      "select": [{"unionAll": branches}]});
    let (status, body) = run_view(&server, &view, "json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let outcome: Value = serde_json::from_str(&body).expect("an OperationOutcome");
    insta::assert_snapshot!(common::pretty(&outcome));
    // Nesting too: selects in selects, deeper than allowed.
    let mut select = json!({"column": [{"name": "g", "path": "gender"}]});
    for _ in 0..20 {
        select = json!({"select": [select]});
    }
    let view = json!({"resourceType": "ViewDefinition", "resource": "Patient", "select": [select]});
    let (status, body) = run_view(&server, &view, "json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("--view-max-depth"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_largest_view_allowed_keeps_its_backend_under_a_gigabyte() {
    let server = TestServer::start().await;
    reader(&server).await;
    patients(&server, 500).await;
    // With statistics, as a table in use has them (the planner's choices change with them).
    server
        .db()
        .await
        .batch_execute("ANALYZE patient")
        .await
        .expect("analyze");
    // As large as the default bounds let these shapes be: four columns of 240 KB of SQL
    // each, and 100 unionAll branches of nested wheres.
    let branches: Vec<Value> = (0..100)
        .map(|_| json!({"column": [{"name": "g", "path": nested_gender(4)}]}))
        .collect();
    let union = json!({"resourceType": "ViewDefinition", "resource": "Patient",
                       "select": [{"unionAll": branches}]});
    for (view, rows) in [(wide_view(4, 8), 500), (union, 50_000)] {
        let watch = backends::watch(&server.database, 2 * GIB).await;
        let (status, body) = run_view(&server, &view, "csv").await;
        let watched = watch.finish().await;
        assert_eq!(status, StatusCode::OK, "{}", &body[..body.len().min(2000)]);
        assert_eq!(body.lines().count(), rows + 1, "a header and the rows");
        assert!(!watched.killed, "a backend grew past 2 GB");
        eprintln!(
            "largest backend: {} MiB over {} backends",
            watched.peak / MIB,
            watched.backends
        );
        assert!(watched.peak < GIB, "{} MiB", watched.peak / MIB);
    }
}

// Row 3: connections that say nothing are closed, over TLS too, and one address cannot hold
// every descriptor.

/// Completes a TLS handshake with the server (offering `alpn`), then says nothing; how long
/// the server keeps the connection open (up to `limit`).
async fn silent_tls(
    server: &TestServer,
    tls: &Tls,
    alpn: Option<&[u8]>,
    limit: Duration,
) -> Duration {
    use tokio::io::AsyncReadExt;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(tls.ca_der.clone()))
        .expect("CA");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.map(|p| vec![p.to_vec()]).unwrap_or_default();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let address = server.base.trim_start_matches("https://");
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut stream = connector.connect(name, tcp).await.expect("handshake");
    if let Some(alpn) = alpn {
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(alpn));
    }
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let _ = tokio::time::timeout(limit, stream.read(&mut byte)).await;
    started.elapsed()
}

#[tokio::test]
async fn a_tls_connection_that_says_nothing_after_its_handshake_is_closed() {
    let tls = Tls::new();
    let server = https_server(&tls, |settings| {
        settings.http.connections.header_timeout = Duration::from_secs(2);
    })
    .await;
    for alpn in [None, Some(&b"h2"[..]), Some(&b"http/1.1"[..])] {
        let open = silent_tls(&server, &tls, alpn, Duration::from_secs(15)).await;
        assert!(
            open < Duration::from_secs(5),
            "ALPN {alpn:?}: open for {open:?}"
        );
    }
    // A request still works, and an HTTP/2 connection idle after it is closed too.
    let (status, _) = server.get("/health").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_silent_connections_from_one_address_cannot_take_the_descriptors() {
    let database = common::fresh_database().await;
    let url = common::cluster().url(&database);
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().to_str().expect("utf-8").to_string();
    // Started as many services are, with a soft limit of 1024 open files.
    let server = ServerProcess::start_with_soft_fd_limit(
        &[
            "--database-url",
            &url,
            "--data-dir",
            &data,
            "--admin-password",
            "root-pw",
            "--max-connections-per-address",
            "50",
        ],
        1024,
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).expect("limits");
    let files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files")
        .split_whitespace()
        .skip(3)
        .take(2)
        .map(|n| n.parse::<u64>().unwrap_or(0))
        .collect::<Vec<_>>();
    assert_eq!(
        files[0], files[1],
        "the soft limit is raised to the hard one: {files:?}"
    );
    let address = server.base.trim_start_matches("http://").to_string();
    let local = std::net::SocketAddr::new("127.0.0.1".parse().expect("ip"), 0);
    let mut held = Vec::new();
    for _ in 0..400 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(local).expect("bind");
        if let Ok(stream) = socket.connect(address.parse().expect("address")).await {
            held.push(stream);
        }
    }
    // Past the first 50, each is closed at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let closed = held
        .iter()
        .filter(|stream| {
            let mut byte = [0u8; 1];
            match stream.try_read(&mut byte) {
                Ok(0) => true,
                Err(error) => error.kind() != std::io::ErrorKind::WouldBlock,
                Ok(_) => false,
            }
        })
        .count();
    assert!(closed >= 340, "closed at once: {closed} of {}", held.len());
    let fds = std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
        .expect("fds")
        .count();
    assert!(fds < 200, "{fds} descriptors open");
    // Anyone else still gets in, at once.
    let started = Instant::now();
    let response = client_from("127.0.0.2")
        .get(format!("{}/health", server.base))
        .send()
        .await
        .expect("health");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(held);
}

/// A client whose requests come from `address` (any of 127.0.0.0/8 is this machine).
fn client_from(address: &str) -> reqwest::Client {
    common::http_client();
    reqwest::Client::builder()
        .local_address(address.parse::<std::net::IpAddr>().expect("address"))
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_view_run_whose_client_left_is_cancelled_within_a_second() {
    let server = TestServer::start().await;
    reader(&server).await;
    patients(&server, 2000).await;
    let branches: Vec<Value> = (0..100)
        .map(|_| json!({"column": [{"name": "g", "path": nested_gender(5)}]}))
        .collect();
    let view = json!({"resourceType": "ViewDefinition", "resource": "Patient",
                      "select": [{"unionAll": branches}]});
    let mut response = server
        .client
        .post(server.url("/fhir/ViewDefinition/$viewdefinition-run?_format=ndjson"))
        .basic_auth("reader", Some("pw"))
        .json(&json!({"resourceType": "Parameters",
                      "parameter": [{"name": "viewResource", "resource": view}]}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    response.chunk().await.expect("a chunk").expect("rows");
    let db = server.db().await;
    let running = || async {
        db.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND usename = 'fhirbox_sql_reader' AND state = 'active'",
            &[],
        )
        .await
        .expect("activity")
        .get::<_, i64>(0)
    };
    assert_eq!(running().await, 1, "the view's query runs");
    drop(response);
    let left = Instant::now();
    while running().await > 0 {
        assert!(
            left.elapsed() < Duration::from_secs(1),
            "the query still runs a second after its client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// Row 13: a body declared over the limit is refused before `100 Continue`.

#[tokio::test]
async fn an_oversized_body_is_refused_before_100_continue() {
    use base64::Engine as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start().await;
    let address = server.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let credentials =
        base64::engine::general_purpose::STANDARD.encode(format!("root:{}", common::ROOT_PASSWORD));
    let request = format!(
        "POST /Patient HTTP/1.1\r\nHost: {address}\r\nAuthorization: Basic {credentials}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        200 * MIB
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut head))
        .await
        .expect("an answer without the body")
        .expect("read");
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
}

// Row 14: loads of one type at once never race on the table's DDL.

/// The lines of a test data file, split in `parts` (the usual shape of a bulk export).
fn split_testdata(name: &str, parts: usize) -> Vec<Vec<u8>> {
    use std::io::BufRead;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/smart-bulk-data-server-100")
        .join(name);
    let file = std::fs::File::open(path).expect("testdata");
    let lines: Vec<String> = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file))
        .lines()
        .map_while(Result::ok)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let size = lines.len().div_ceil(parts);
    lines
        .chunks(size)
        .map(|chunk| (chunk.join("\n") + "\n").into_bytes())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_import_with_two_files_per_type_into_empty_tables_loads_them_all() {
    use common::fixtures::{Fixture, FixtureServer};
    let types = [
        "AllergyIntolerance",
        "Condition",
        "Encounter",
        "Immunization",
        "Observation",
        "Procedure",
    ];
    let mut files = Vec::new();
    let mut expected = std::collections::BTreeMap::new();
    for rt in types {
        for (i, part) in split_testdata(&format!("{rt}.000.ndjson.gz"), 2)
            .into_iter()
            .enumerate()
        {
            *expected.entry(rt).or_insert(0) += part
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .count();
            files.push((format!("/{rt}.{i:03}.ndjson"), Fixture::Bytes(part)));
        }
    }
    let fixtures =
        FixtureServer::start(files.iter().map(|(p, f)| (p.as_str(), f.clone())).collect()).await;
    // Twice, each on a new server with empty tables: the race needs no luck to show.
    for round in 0..2 {
        let server = TestServer::start().await;
        let inputs: Vec<Value> = files
            .iter()
            .map(|(path, _)| {
                let rt = path
                    .trim_start_matches('/')
                    .split('.')
                    .next()
                    .expect("type");
                json!({"resourceType": rt, "url": fixtures.url(path)})
            })
            .collect();
        let (status, body) = server
            .json(
                Method::POST,
                "/fhir/$import",
                &json!({"id": "split", "inputs": inputs}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let deadline = Instant::now() + Duration::from_secs(120);
        let done = loop {
            let (_, status) = server.get("/BulkImportStatus/split").await;
            if status["status"] != "in-progress" {
                break status;
            }
            assert!(Instant::now() < deadline, "round {round}: {status}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(done["status"], "finished", "round {round}: {done}");
        for (rt, lines) in &expected {
            assert_eq!(
                server.count(&rt.to_ascii_lowercase()).await,
                *lines as i64,
                "round {round}: {rt}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_loads_into_the_empty_tables_of_a_new_server_all_land() {
    use common::fixtures::{Fixture, FixtureServer};
    let files: Vec<(String, Fixture)> = (0..4)
        .map(|i| {
            let lines: String = (0..2000)
                .map(|n| format!("{{\"resourceType\":\"Observation\",\"id\":\"o{i}-{n}\",\"status\":\"final\",\"code\":{{\"text\":\"x\"}},\"subject\":{{\"reference\":\"Patient/p{n}\"}}}}\n"))
                .collect();
            (format!("/obs{i}.ndjson"), Fixture::Bytes(lines.into_bytes()))
        })
        .collect();
    let fixtures =
        FixtureServer::start(files.iter().map(|(p, f)| (p.as_str(), f.clone())).collect()).await;
    for round in 0..3 {
        let server = TestServer::start().await;
        // Both routes: one type, and mixed.
        let loads = files.iter().enumerate().map(|(i, (path, _))| {
            let route = if i % 2 == 0 {
                "/fhir/Observation/$load"
            } else {
                "/fhir/$load"
            };
            let request = server
                .request(Method::POST, route)
                .json(&json!({"source": fixtures.url(path)}));
            async move {
                let response = request.send().await.expect("sent");
                (response.status(), response.text().await.unwrap_or_default())
            }
        });
        for (status, body) in futures_util::future::join_all(loads).await {
            assert_eq!(status, StatusCode::OK, "round {round}: {body}");
        }
        assert_eq!(server.count("observation").await, 8000, "round {round}");
    }
}

#[test]
fn a_database_error_in_a_job_is_said_in_words() {
    // What the failed input of the deadlock said, and what it says now.
    let load = fhirbox::bulk::load::LoadError::Statement {
        doing: "dropping AllergyIntolerance's compartment index".into(),
        error: fhirbox::store::StoreError::Invalid(
            "PostgreSQL: deadlock detected [SQLSTATE 40P01]".into(),
        ),
    };
    assert_eq!(
        load.to_string(),
        "while dropping AllergyIntolerance's compartment index: PostgreSQL: deadlock detected [SQLSTATE 40P01]"
    );
}

// Row 12: a materialized name belongs to one ViewDefinition.

#[tokio::test]
async fn a_second_view_cannot_take_over_a_materialized_name() {
    let server = TestServer::start().await;
    patients(&server, 5).await;
    let (status, body) = server
        .json(Method::PUT, "/", &json!([{"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"}}]))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for (id, resource) in [("first", "Patient"), ("second", "Observation")] {
        let view = json!({"resourceType": "ViewDefinition", "name": "shared", "resource": resource,
                          "select": [{"column": [{"name": "id", "path": "getResourceKey()"}]}]});
        let (status, body) = server
            .json(Method::PUT, &format!("/fhir/ViewDefinition/{id}"), &view)
            .await;
        assert!(status.is_success(), "{body}");
    }
    let materialize = |id: &'static str| {
        let request = server.request(
            Method::POST,
            &format!("/fhir/ViewDefinition/{id}/$materialize?type=table"),
        );
        async move {
            let response = request.send().await.expect("sent");
            (
                response.status(),
                response.json::<Value>().await.unwrap_or_default(),
            )
        }
    };
    let rows = || async {
        server
            .db()
            .await
            .query_one("SELECT count(*) FROM sof.shared", &[])
            .await
            .map(|row| row.get::<_, i64>(0))
            .ok()
    };
    assert_eq!(materialize("first").await.0, StatusCode::OK);
    assert_eq!(rows().await, Some(5));
    let (status, outcome) = materialize("second").await;
    assert_eq!(status, StatusCode::CONFLICT, "{outcome}");
    assert!(
        diagnostics(&outcome).contains("ViewDefinition/first"),
        "{outcome}"
    );
    assert_eq!(
        rows().await,
        Some(5),
        "the first view's rows are still there"
    );
    // Deleting the owner drops its relation; then the name is free.
    assert_eq!(
        server.delete("/fhir/ViewDefinition/first").await.0,
        StatusCode::OK
    );
    assert_eq!(rows().await, None, "sof.shared is gone with its view");
    assert_eq!(materialize("second").await.0, StatusCode::OK);
    assert_eq!(rows().await, Some(1));
}

// Row 6: per-subject job limits, fair scheduling, and bounded outputs.

/// `n` Observations written straight into the table (fast, for tests of volume).
async fn observations(server: &TestServer, n: usize) {
    server
        .db()
        .await
        .execute(
            "INSERT INTO observation (id, cts, ts, resource_type, status, resource)
             SELECT 'o' || g, now(), now(), 'Observation', 'created',
                    jsonb_build_object('status', 'final', 'code', jsonb_build_object('text', repeat('x', 200)))
               FROM generate_series(1, $1::int) g",
            &[&(n as i32)],
        )
        .await
        .expect("observations");
}

async fn kick_off_as(
    server: &TestServer,
    user: Option<(&str, &str)>,
    path: &str,
) -> reqwest::Response {
    let mut request = server
        .client
        .get(server.url(path))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async");
    request = match user {
        Some((name, secret)) => request.basic_auth(name, Some(secret)),
        None => request.basic_auth("root", Some(common::ROOT_PASSWORD)),
    };
    request.send().await.expect("kick-off")
}

#[tokio::test(flavor = "multi_thread")]
async fn one_subjects_queue_neither_grows_without_bound_nor_starves_root() {
    let server = TestServer::start_custom(common::fresh_database().await, |settings| {
        settings.jobs.workers = 1;
        settings.jobs.tasks_per_subject = 1;
    })
    .await;
    observations(&server, 20_000).await;
    let (status, body) = server
        .json(
            Method::PUT,
            "/",
            &json!([
                {"resourceType": "Client", "id": "greedy", "secret": "pw", "grant_types": ["basic"]},
                {"resourceType": "AccessPolicy", "id": "greedy-exports", "engine": "matcho",
                 "matcho": {"uri": "/fhir/$export"},
                 "link": [{"resourceType": "Client", "id": "greedy"}]}
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut accepted = Vec::new();
    let mut refused = 0;
    for _ in 0..12 {
        let response = kick_off_as(
            &server,
            Some(("greedy", "pw")),
            "/fhir/$export?_type=Observation",
        )
        .await;
        match response.status() {
            StatusCode::ACCEPTED => accepted.push(
                response.headers()["content-location"]
                    .to_str()
                    .expect("ascii")
                    .to_string(),
            ),
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(response.headers().contains_key("retry-after"));
                let outcome: Value = response.json().await.expect("json");
                assert!(
                    diagnostics(&outcome).contains("--jobs-per-subject"),
                    "{outcome}"
                );
                refused += 1;
            }
            other => panic!("{other}"),
        }
    }
    assert_eq!((accepted.len(), refused), (8, 4));
    // Root's export starts next, not after the greedy client's eight.
    let response = kick_off_as(&server, None, "/fhir/$export?_type=Observation").await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let root_status = response.headers()["content-location"]
        .to_str()
        .expect("ascii")
        .to_string();
    common::export::manifest(&server, &root_status).await;
    for status in &accepted {
        common::export::manifest(&server, status).await;
    }
    // When root's task ended, most of the greedy client's had not even started.
    let after: i64 = server
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM fhirbox_task t JOIN fhirbox_job j ON j.id = t.job_id
              WHERE j.subject = 'Client/greedy'
                AND t.started_at > (SELECT max(r.finished_at) FROM fhirbox_task r
                                      JOIN fhirbox_job rj ON rj.id = r.job_id WHERE rj.subject = 'root')",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert!(
        after >= 5,
        "root waited for {} of the greedy client's jobs",
        8 - after
    );
}

#[tokio::test]
async fn a_view_run_past_its_bound_ends_with_an_error() {
    let server = TestServer::start_custom(common::fresh_database().await, |settings| {
        settings.http.view_output = fhirbox::bulk::bounds::OutputBounds::views(100, 1 << 30);
    })
    .await;
    reader(&server).await;
    patients(&server, 500).await;
    let view = json!({"resourceType": "ViewDefinition", "resource": "Patient",
                      "select": [{"column": [{"name": "id", "path": "getResourceKey()"}]}]});
    let (status, body) = run_view(&server, &view, "csv").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("--view-max-rows"), "{body}");
}

/// Waits for an export's status to end; the last status and its body.
async fn export_ended(server: &TestServer, status_url: &str) -> (StatusCode, Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
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

#[tokio::test]
async fn an_export_past_its_bound_fails_naming_it_and_leaves_no_files() {
    let server = TestServer::start_custom(common::fresh_database().await, |settings| {
        settings.exports.output = fhirbox::bulk::bounds::OutputBounds::exports(u64::MAX, 1_000_000);
    })
    .await;
    observations(&server, 10_000).await;
    let status_url = common::export::start(&server, "/fhir/$export?_type=Observation").await;
    let (status, outcome) = export_ended(&server, &status_url).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{outcome}");
    assert!(
        outcome.to_string().contains("--export-max-bytes"),
        "{outcome}"
    );
    let job = common::export::job_of(&status_url);
    let dir = server.export_dir.join(&job);
    let files = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(files, 0, "no file left in {}", dir.display());
}

#[tokio::test]
async fn a_view_export_past_its_bound_fails_and_a_materialization_too() {
    let server = TestServer::start_custom(common::fresh_database().await, |settings| {
        let bounds = fhirbox::bulk::bounds::OutputBounds::views(100, 1 << 30);
        settings.exports.view_output = bounds;
        settings.http.view_output = bounds;
    })
    .await;
    patients(&server, 500).await;
    let view = json!({"resourceType": "ViewDefinition", "name": "everyone", "resource": "Patient",
                      "select": [{"column": [{"name": "id", "path": "getResourceKey()"}]}]});
    let response = server
        .request(Method::POST, "/fhir/ViewDefinition/$viewdefinition-export")
        .header("prefer", "respond-async")
        .json(&json!({"resourceType": "Parameters", "parameter": [
            {"name": "view", "part": [{"name": "viewResource", "resource": view}]},
            {"name": "_format", "valueCode": "csv"}]}))
        .send()
        .await
        .expect("kick-off");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let status_url = response.headers()["content-location"]
        .to_str()
        .expect("ascii")
        .to_string();
    let (status, outcome) = export_ended(&server, &status_url).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{outcome}");
    assert!(outcome.to_string().contains("--view-max-rows"), "{outcome}");
    let dir = server.export_dir.join(common::export::job_of(&status_url));
    assert_eq!(std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0), 0);
    // The same view as a table: stopped inside PostgreSQL, nothing created.
    let (status, _) = server
        .json(Method::PUT, "/fhir/ViewDefinition/everyone", &view)
        .await;
    assert!(status.is_success());
    let (status, outcome) = server
        .send(server.request(
            Method::POST,
            "/fhir/ViewDefinition/everyone/$materialize?type=table",
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
    assert!(
        diagnostics(&outcome).contains("--view-max-rows"),
        "{outcome}"
    );
    let exists: bool = server
        .db()
        .await
        .query_one("SELECT to_regclass('sof.everyone') IS NOT NULL", &[])
        .await
        .expect("regclass")
        .get(0);
    assert!(!exists);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_materialization_whose_fhirbox_died_is_cancelled() {
    let database = common::fresh_database().await;
    let url = common::cluster().url(&database);
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().to_str().expect("utf-8").to_string();
    let mut server = ServerProcess::start(&[
        "--database-url",
        &url,
        "--data-dir",
        &data,
        "--admin-password",
        "root-pw",
    ]);
    let client = common::http_client();
    let list: Vec<Value> = (0..10_000)
        .map(|i| json!({"resourceType": "Patient", "id": format!("p{i}"), "gender": "male"}))
        .collect();
    let response = client
        .put(format!("{}/", server.base))
        .basic_auth("root", Some("root-pw"))
        .json(&Value::Array(list))
        .send()
        .await
        .expect("patients");
    assert_eq!(response.status(), StatusCode::OK);
    let branches: Vec<Value> = (0..100)
        .map(|_| json!({"column": [{"name": "g", "path": nested_gender(4)}]}))
        .collect();
    let view = json!({"resourceType": "ViewDefinition", "name": "heavy", "resource": "Patient",
                      "select": [{"unionAll": branches}]});
    let response = client
        .put(format!("{}/fhir/ViewDefinition/heavy", server.base))
        .basic_auth("root", Some("root-pw"))
        .json(&view)
        .send()
        .await
        .expect("view");
    assert!(response.status().is_success());
    let materialize = client
        .post(format!(
            "{}/fhir/ViewDefinition/heavy/$materialize?type=table",
            server.base
        ))
        .basic_auth("root", Some("root-pw"))
        .send();
    let pending = tokio::spawn(materialize);
    let db = common::connect(common::cluster().config(&database)).await;
    let active = || async {
        db.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("activity")
        .get::<_, i64>(0)
    };
    let started = Instant::now();
    while active().await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the materialization never ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = pending.await;
    let killed = Instant::now();
    while active().await > 0 {
        assert!(
            killed.elapsed() < Duration::from_secs(3),
            "the statement still runs after fhirbox died"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Row 7: what a run that died left behind goes when the task runs again.

#[tokio::test(flavor = "multi_thread")]
async fn a_view_export_run_again_after_a_crash_removes_the_truncated_file() {
    let database = common::fresh_database().await;
    let url = common::cluster().url(&database);
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data").to_str().expect("utf-8").to_string();
    let exports = dir.path().join("exports");
    let exports_arg = exports.to_str().expect("utf-8").to_string();
    let args = [
        "--database-url",
        url.as_str(),
        "--data-dir",
        data.as_str(),
        "--admin-password",
        "root-pw",
        "--export-dir",
        exports_arg.as_str(),
        "--import-lease",
        "2",
        "--import-workers",
        "1",
    ];
    let mut first = ServerProcess::start(&args);
    let client = common::http_client();
    let list: Vec<Value> = (0..4_000)
        .map(|i| json!({"resourceType": "Patient", "id": format!("p{i}"), "gender": "male"}))
        .collect();
    let response = client
        .put(format!("{}/", first.base))
        .basic_auth("root", Some("root-pw"))
        .json(&Value::Array(list))
        .send()
        .await
        .expect("patients");
    assert_eq!(response.status(), StatusCode::OK);
    let branches: Vec<Value> = (0..100)
        .map(|_| json!({"column": [{"name": "g", "path": nested_gender(4)}]}))
        .collect();
    let view = json!({"resourceType": "ViewDefinition", "resource": "Patient",
                      "select": [{"unionAll": branches}]});
    let response = client
        .post(format!(
            "{}/fhir/ViewDefinition/$viewdefinition-export",
            first.base
        ))
        .basic_auth("root", Some("root-pw"))
        .header("prefer", "respond-async")
        .json(&json!({"resourceType": "Parameters", "parameter": [
            {"name": "view", "part": [{"name": "name", "valueString": "heavy"},
                                      {"name": "viewResource", "resource": view}]},
            {"name": "_format", "valueCode": "csv"}]}))
        .send()
        .await
        .expect("kick-off");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let status_path = response.headers()["content-location"]
        .to_str()
        .expect("ascii")
        .trim_start_matches(&first.base)
        .to_string();
    let job_dir = exports.join(common::export::job_of(&status_path));
    let truncated = job_dir.join("heavy-1-1.csv");
    let started = Instant::now();
    while std::fs::metadata(&truncated).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the first run wrote nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(truncated.exists());
    let second = ServerProcess::start(&args);
    let deadline = Instant::now() + Duration::from_secs(120);
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
    assert!(
        manifest["output"][0]["url"]
            .as_str()
            .is_some_and(|u| u.ends_with("heavy-2-1.csv")),
        "{manifest}"
    );
    assert!(
        !truncated.exists(),
        "the first run's truncated file is gone"
    );
}

// Row 8: no query text or value of a client in any log.

#[tokio::test(flavor = "multi_thread")]
async fn failing_queries_leave_no_literal_or_parameter_in_any_log() {
    let dir = tempfile::Builder::new()
        .prefix("fhirbox-logs-")
        .tempdir()
        .expect("dir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");
    // The managed PostgreSQL, as `./scripts/serve` runs it.
    let server = ServerProcess::start(&[
        "--data-dir",
        data,
        "--admin-password",
        "root-pw",
        "--log-format",
        "json",
    ]);
    let client = common::http_client();
    let (status, _) = (
        client
            .put(format!("{}/", server.base))
            .basic_auth("root", Some("root-pw"))
            .json(&json!([
                {"resourceType": "Client", "id": "analyst", "secret": "pw", "grant_types": ["basic"]},
                {"resourceType": "AccessPolicy", "id": "analyst-sql", "engine": "matcho",
                 "matcho": {"uri": "/$dump-sql"},
                 "link": [{"resourceType": "Client", "id": "analyst"}]}
            ]))
            .send()
            .await
            .expect("sent")
            .status(),
        (),
    );
    assert_eq!(status, StatusCode::OK);
    let long = format!(
        "select '{}' || 'LITERAL-SECRET-777'::int",
        "x".repeat(100_000)
    );
    for (user, body) in [
        (
            ("analyst", "pw"),
            json!({"query": "select $1::int", "params": ["PARAM-SECRET-123"]}),
        ),
        (
            ("analyst", "pw"),
            json!({"query": "select 'LITERAL-SECRET-777'::int"}),
        ),
        (("root", "root-pw"), json!({"query": long})),
        (
            ("root", "root-pw"),
            json!({"query": "select 1 from \"no_such_table_SECRET\""}),
        ),
    ] {
        let response = client
            .post(format!("{}/$dump-sql", server.base))
            .basic_auth(user.0, Some(user.1))
            .json(&body)
            .send()
            .await
            .expect("sent");
        assert!(response.status().is_client_error(), "{}", response.status());
        // The client is told everything.
        let text = response.text().await.unwrap_or_default();
        assert!(text.contains("SECRET"), "{text}");
    }
    // The managed cluster's settings in force.
    let response = client
        .post(format!("{}/$dump-sql", server.base))
        .basic_auth("root", Some("root-pw"))
        .json(&json!({"query": "select current_setting('log_min_error_statement'), current_setting('logging_collector'), current_setting('log_truncate_on_rotation')"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.text().await.expect("tsv").trim(), "panic\ton\ton");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut logs: Vec<String> = server.log();
    let postgres = std::path::Path::new(data).join("postgres");
    let mut files = vec![std::path::Path::new(data).join("run/postgresql.log")];
    if let Ok(entries) = std::fs::read_dir(postgres.join("log")) {
        files.extend(entries.flatten().map(|e| e.path()));
    }
    for file in &files {
        logs.extend(
            std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .map(str::to_string),
        );
    }
    assert!(files.len() >= 2, "PostgreSQL's own log files: {files:?}");
    let leaks: Vec<&String> = logs.iter().filter(|l| l.contains("SECRET")).collect();
    assert!(leaks.is_empty(), "{leaks:#?}");
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    assert!(
        total < 1_000_000,
        "the 100 kB query is not in PostgreSQL's log: {total} bytes"
    );
}

// Row 13: Parquet memory follows the row-group bound, not the largest row.

#[tokio::test(flavor = "multi_thread")]
async fn huge_rows_as_parquet_stay_in_bounded_memory() {
    let database = common::fresh_database().await;
    let url = common::cluster().url(&database);
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().to_str().expect("utf-8").to_string();
    let server = ServerProcess::start(&[
        "--database-url",
        &url,
        "--data-dir",
        &data,
        "--admin-password",
        "root-pw",
    ]);
    // 60 MB rows (the issue saw three take fhirbox up 338 MB), written straight into the
    // table: two, then five.
    let db = common::connect(common::cluster().config(&database)).await;
    let view = json!({"resourceType": "ViewDefinition", "resource": "Patient",
                      "select": [{"column": [{"name": "id", "path": "getResourceKey()"},
                                             {"name": "div", "path": "text.div"}]}]});
    let mut peaks = Vec::new();
    for (from, to) in [(1, 2), (3, 5)] {
        db.execute(
            "INSERT INTO patient (id, cts, ts, resource_type, status, resource)
             SELECT 'big' || g, now(), now(), 'Patient', 'created',
                    jsonb_build_object('gender', 'other', 'text', jsonb_build_object('div', repeat(chr(97 + g), 60000000)))
               FROM generate_series($1::int, $2::int) g",
            &[&from, &to],
        )
        .await
        .expect("rows");
        let before = server.rss();
        server.reset_peak_rss();
        let response = common::http_client()
            .post(format!("{}/fhir/ViewDefinition/$viewdefinition-run?_format=parquet", server.base))
            .basic_auth("root", Some("root-pw"))
            .json(&json!({"resourceType": "Parameters", "parameter": [{"name": "viewResource", "resource": view}]}))
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.bytes().await.expect("the file");
        assert!(body.starts_with(b"PAR1") && body.ends_with(b"PAR1"));
        let peak = server.peak_rss();
        let growth = peak.saturating_sub(before);
        eprintln!("{to} rows: peak growth {} MiB", growth / MIB);
        peaks.push((growth, peak));
    }
    // Each huge row is a row group of its own, gone once sent: the peak is the row-group
    // bound (16 MiB) and a few copies of the largest row (the stated bound: 8 of them;
    // 316-360 MiB measured), the same for two rows as for five, never the sum of the rows
    // (before the first fix: 530 MiB for five, growing with each). A faster Parquet path
    // (rows into the columns as COPY tuples) grew again by ~55 MiB a row, 276 / 416 / 575
    // MiB for 2 / 5 / 8 rows, while this test still passed most of the time on its absolute
    // bound alone: so it also compares two rows with five.
    for (growth, _) in &peaks {
        assert!(*growth < 16 * MIB + 8 * 60 * MIB, "{} MiB", growth / MIB);
    }
    // The process's peak, not its growth: the second run starts from what the first left.
    let ((_, two), (_, five)) = (peaks[0], peaks[1]);
    assert!(
        five < two + 60 * MIB,
        "at most {} MiB with five rows, {} MiB with two: memory grows with the rows",
        five / MIB,
        two / MIB
    );
}
