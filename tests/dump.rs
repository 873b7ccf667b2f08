//! `GET /[type]/$dump`: the seeds' output byte for byte, `fhir`, `gzip`, `_since`, errors
//! before the first byte, a client that goes away, a failure mid-stream, one snapshot while
//! writers run.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{diagnostics, seed, TestServer};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn with_seed_data() -> TestServer {
    let server = TestServer::start().await;
    let (status, body) = server
        .yaml(Method::POST, "/", &seed("post-sample-data-bundle.yaml"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server
}

/// The text of a dump, checking the headers of an NDJSON stream.
async fn dump_text(server: &TestServer, path: &str) -> String {
    let response = server.get_ok(path).await;
    assert_eq!(response.headers()["content-type"], "application/ndjson");
    assert_eq!(response.headers()["transfer-encoding"], "chunked");
    response.text().await.expect("body")
}

/// (txid, timestamp text) of every row of a table, by id.
async fn versions(server: &TestServer, table: &str) -> Vec<(String, i64, String)> {
    server
        .db()
        .await
        .query(
            &format!(
                "SELECT id, txid, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM {table} ORDER BY id"
            ),
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

#[tokio::test]
async fn native_dump_is_the_seeds_output_byte_for_byte() {
    let server = with_seed_data().await;
    let mut expected = String::new();
    let patients = versions(&server, "patient").await;
    for ((id, txid, at), rest) in patients.iter().zip([
        r#""name": [{"given": ["Alice"]}]"#,
        r#""name": [{"given": ["Bob"]}]"#,
        r#""name": [{"given": ["Charles"]}], "citizenship": [{"code": {"text": "ru"}}]"#,
    ]) {
        expected.push_str(&format!(
            "{{\"id\": \"{id}\", \"meta\": {{\"createdAt\": \"{at}\", \"versionId\": {txid}, \"lastUpdated\": \"{at}\"}}, {rest}, \"resourceType\": \"Patient\"}}\n"
        ));
    }
    let mut lines: Vec<String> = dump_text(&server, "/Patient/$dump")
        .await
        .lines()
        .map(|l| format!("{l}\n"))
        .collect();
    lines.sort();
    assert_eq!(lines.concat(), expected);

    let mut expected = String::new();
    for ((id, txid, at), (status, patient)) in versions(&server, "appointment").await.iter().zip([
        ("fulfilled", "pt-1"),
        ("booked", "pt-1"),
        ("fulfilled", "pt-2"),
    ]) {
        expected.push_str(&format!(
            "{{\"id\": \"{id}\", \"meta\": {{\"createdAt\": \"{at}\", \"versionId\": {txid}, \"lastUpdated\": \"{at}\"}}, \"status\": \"{status}\", \"participant\": [{{\"actor\": {{\"id\": \"{patient}\", \"resourceType\": \"Patient\"}}, \"status\": \"accepted\"}}], \"resourceType\": \"Appointment\"}}\n"
        ));
    }
    let mut lines: Vec<String> = dump_text(&server, "/Appointment/$dump")
        .await
        .lines()
        .map(|l| format!("{l}\n"))
        .collect();
    lines.sort();
    assert_eq!(lines.concat(), expected);
}

#[tokio::test]
async fn fhir_dump_is_the_seeds_fhir_output() {
    let server = with_seed_data().await;
    let mut expected = String::new();
    for ((id, txid, at), rest) in versions(&server, "patient").await.iter().zip([
        r#""name":[{"given":["Alice"]}],"resourceType":"Patient""#,
        r#""name":[{"given":["Bob"]}],"resourceType":"Patient""#,
        r#""name":[{"given":["Charles"]}],"resourceType":"Patient","extension":[{"url":"http://hl7.org/fhir/StructureDefinition/patient-citizenship","extension":[{"url":"code","valueCodeableConcept":{"text":"ru"}}]}]"#,
    ]) {
        expected.push_str(&format!(
            "{{\"id\":\"{id}\",\"meta\":{{\"versionId\":\"{txid}\",\"lastUpdated\":\"{at}\",\"extension\":[{{\"url\":\"ex:createdAt\",\"valueInstant\":\"{at}\"}}]}},{rest}}}\n"
        ));
    }
    for path in ["/Patient/$dump?fhir=true", "/fhir/Patient/$dump"] {
        let mut lines: Vec<String> = dump_text(&server, path)
            .await
            .lines()
            .map(|l| format!("{l}\n"))
            .collect();
        lines.sort();
        assert_eq!(lines.concat(), expected, "{path}");
    }
    let native = dump_text(&server, "/fhir/Patient/$dump?fhir=false").await;
    assert!(
        native.contains("\"citizenship\": ["),
        "fhir=false under /fhir gives native"
    );

    let appointments = dump_text(&server, "/Appointment/$dump?fhir=true").await;
    for line in appointments.lines() {
        let doc: Value = serde_json::from_str(line).expect("json");
        assert!(doc["participant"][0]["actor"]["reference"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Patient/pt-"));
    }
}

#[tokio::test]
async fn gzip_dumps_decompress_to_the_same_lines() {
    let server = with_seed_data().await;
    for (plain_path, gzip_path) in [
        ("/Patient/$dump", "/Patient/$dump?gzip=true"),
        (
            "/Patient/$dump?fhir=true",
            "/Patient/$dump?fhir=true&gzip=true",
        ),
    ] {
        let plain = dump_text(&server, plain_path).await;
        let response = server
            .request(Method::GET, gzip_path)
            .send()
            .await
            .expect("sent");
        assert_eq!(response.headers()["content-encoding"], "gzip");
        assert_eq!(response.headers()["content-type"], "application/ndjson");
        let compressed = response.bytes().await.expect("body");
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(&compressed[..])
            .read_to_string(&mut text)
            .expect("valid gzip");
        let sorted = |text: &str| {
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            lines.sort();
            lines
        };
        assert_eq!(sorted(&text), sorted(&plain), "{gzip_path}");
    }
}

#[tokio::test]
async fn since_deleted_and_updated_resources() {
    let server = TestServer::start().await;
    server
        .json(Method::PUT, "/Patient/old", &json!({"active": true}))
        .await;
    server.json(Method::PUT, "/Patient/gone", &json!({})).await;
    server.delete("/Patient/gone").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let middle = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    server.json(Method::PUT, "/Patient/new", &json!({})).await;
    server
        .json(Method::PUT, "/Patient/old", &json!({"active": false}))
        .await;

    let ids = |text: String| {
        let mut ids: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).expect("json")["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        ids.sort();
        ids
    };
    let all = dump_text(&server, "/Patient/$dump").await;
    assert!(all.contains("\"active\": false"), "the current version");
    assert_eq!(ids(all), ["new", "old"], "deleted resources are not dumped");
    // `_since` filters on creation time: the updated `old` was created before.
    let since = middle.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    assert_eq!(
        ids(dump_text(&server, &format!("/Patient/$dump?_since={since}")).await),
        ["new"]
    );
    let local = middle.format("%Y-%m-%dT%H:%M:%S%.6f").to_string();
    assert_eq!(
        ids(dump_text(&server, &format!("/Patient/$dump?_since={local}")).await),
        ["new"],
        "no zone: UTC"
    );
    let shifted = (middle + chrono::Duration::hours(2))
        .format("%Y-%m-%dT%H:%M:%S%.6f%%2B02:00")
        .to_string();
    assert_eq!(
        ids(dump_text(&server, &format!("/Patient/$dump?_since={shifted}")).await),
        ["new"],
        "with a zone"
    );
    assert_eq!(
        ids(dump_text(&server, "/Patient/$dump?_since=2000-01-01").await),
        ["new", "old"]
    );
    assert_eq!(
        ids(dump_text(&server, "/Patient/$dump?_since=2999-01-01").await),
        Vec::<String>::new()
    );
    assert_eq!(
        dump_text(&server, "/Observation/$dump").await,
        "",
        "an empty table is an empty body"
    );
}

#[tokio::test]
async fn bad_requests_fail_before_any_byte() {
    let server = TestServer::start().await;
    for (path, status, message) in [
        (
            "/Patient/$dump?_since=yesterday",
            StatusCode::BAD_REQUEST,
            "invalid _since 'yesterday'",
        ),
        (
            "/Patient/$dump?fhir=maybe",
            StatusCode::BAD_REQUEST,
            "invalid fhir 'maybe'",
        ),
        (
            "/Patient/$dump?gzip=1",
            StatusCode::BAD_REQUEST,
            "invalid gzip '1'",
        ),
        (
            "/Patient/$dump?_count=5",
            StatusCode::BAD_REQUEST,
            "unknown parameter '_count'",
        ),
        (
            "/Nope/$dump",
            StatusCode::NOT_FOUND,
            "unknown resource type 'Nope'",
        ),
        (
            "/fhir/Nope/$dump",
            StatusCode::NOT_FOUND,
            "unknown resource type 'Nope'",
        ),
    ] {
        let response = server
            .request(Method::GET, path)
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(response.headers()["content-type"], "application/fhir+json");
        let outcome: Value = response.json().await.expect("outcome");
        assert!(diagnostics(&outcome).contains(message), "{path}: {outcome}");
    }
    let (status, _) = server
        .send(server.request(Method::POST, "/Patient/$dump"))
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        server.raw_get("/Patient/%24dump").await,
        200,
        "the encoded form is the same route"
    );
}

/// How many COPY statements are running in the test's database.
async fn running_copies(server: &TestServer) -> i64 {
    server
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'COPY%' AND state = 'active'",
            &[],
        )
        .await
        .expect("activity")
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_cancels_the_query_and_frees_its_connection() {
    let server = TestServer::start().await;
    server.fill_patients(20_000, 2_000).await; // ~40 MB: far more than socket buffers hold
    let response = server
        .request(Method::GET, "/Patient/$dump")
        .send()
        .await
        .expect("sent");
    let mut body = response.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("bytes");
    assert!(!first.is_empty());
    assert_eq!(
        running_copies(&server).await,
        1,
        "the first bytes left before the query finished"
    );
    drop(body);

    let mut waited = Duration::ZERO;
    while running_copies(&server).await > 0 {
        assert!(
            waited < Duration::from_secs(10),
            "the COPY was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    // Nothing of the abandoned dump is left, and the pool is whole: as many requests as it
    // holds connections are served at once.
    common::assert_no_connection_left(&server).await;
    let mut readers = Vec::new();
    for _ in 0..server.store.status().max_size {
        readers.push(server.get("/Patient/p0000001"));
    }
    for (status, _) in futures_util::future::join_all(readers).await {
        assert_eq!(status, StatusCode::OK);
    }
    let full = dump_text(&server, "/Patient/$dump").await;
    assert_eq!(full.lines().count(), 20_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_mid_stream_is_a_failed_transfer_not_a_short_file() {
    let server = TestServer::start().await;
    server.fill_patients(20_000, 2_000).await;
    let (received, failed) = server
        .read_interrupted("/Patient/$dump", || async {
            server
                .db()
                .await
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                      WHERE datname = current_database() AND query LIKE 'COPY%' AND state = 'active'",
                    &[],
                )
                .await
                .expect("terminate");
        })
        .await;
    assert!(
        failed,
        "the body ended cleanly after {received} bytes: it must fail instead"
    );
    assert!(received < 40_000_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dump_sees_one_snapshot_while_writers_run() {
    let server = TestServer::start().await;
    // Ten accounts updated together, transaction by transaction: every version of the set
    // carries the same counter.
    let db = server.db().await;
    db.execute(
        "INSERT INTO account (id, txid, resource_type, status, resource)
         SELECT 'a' || g, nextval('transaction_id_seq'), 'Account', 'created', '{\"n\": 0}'
           FROM generate_series(1, 10) g",
        &[],
    )
    .await
    .expect("accounts");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    // Writer 1: appends patients p0, p1, ... one transaction each, in order.
    {
        let server_db = common::connect(common::cluster().config(&server.database)).await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                server_db
                    .execute(
                        "INSERT INTO patient (id, txid, resource_type, status, resource)
                         VALUES ('p' || lpad($1::bigint::text, 7, '0'), nextval('transaction_id_seq'), 'Patient', 'created', '{}')",
                        &[&n],
                    )
                    .await
                    .expect("insert");
                n += 1;
            }
            n
        }));
    }
    // Writer 2: bumps all ten accounts in one transaction, again and again.
    {
        let mut server_db = common::connect(common::cluster().config(&server.database)).await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let tx = server_db.transaction().await.expect("tx");
                for account in 1..=10 {
                    tx.execute(
                        "UPDATE account SET txid = nextval('transaction_id_seq'), resource = jsonb_build_object('n', $1::bigint)
                          WHERE id = 'a' || $2::int",
                        &[&n, &account],
                    )
                    .await
                    .expect("update");
                }
                tx.commit().await.expect("commit");
            }
            n
        }));
    }
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let patients = dump_text(&server, "/Patient/$dump").await;
        let mut numbers: Vec<i64> = patients
            .lines()
            .map(|line| {
                let doc: Value = serde_json::from_str(line).expect("json");
                doc["id"].as_str().unwrap_or_default()[1..]
                    .parse()
                    .expect("number")
            })
            .collect();
        numbers.sort();
        for (expected, found) in numbers.iter().enumerate() {
            assert_eq!(
                *found, expected as i64,
                "committed rows are all in, in order: no gaps"
            );
        }
        let accounts = dump_text(&server, "/Account/$dump").await;
        let counters: std::collections::BTreeSet<i64> = accounts
            .lines()
            .map(|line| {
                serde_json::from_str::<Value>(line).expect("json")["n"]
                    .as_i64()
                    .expect("n")
            })
            .collect();
        assert_eq!(
            counters.len(),
            1,
            "all accounts from one transaction: {counters:?}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        assert!(writer.await.expect("writer") > 0);
    }
}
