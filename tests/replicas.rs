//! Read replicas (`--replica-url`) against a real streaming standby of the test cluster:
//! bulk reads go to the standby, a read started right after a write waits until the standby
//! has replayed it (the standby here applies commits a second late, so a read that did not
//! wait would miss them), and a standby that is stopped, paused, promoted or dies mid-stream
//! is skipped or fails only the stream it was serving.

mod common;

use std::time::{Duration, Instant};

use common::export::{download, manifest, start};
use common::standby::Standby;
use common::{fresh_database, TestServer};
use fhirbox::store::replicas::ReplicaSettings;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// How late the delayed standby applies each commit.
const APPLY_DELAY: &str = "1s";

/// A fresh database, a standby of it (with `standby_settings`), and a server reading there.
async fn server_with_standby(
    standby_settings: &[(&str, &str)],
    max_wait: Duration,
) -> (TestServer, Standby) {
    let database = fresh_database().await;
    let standby = Standby::start(standby_settings);
    standby.wait_for_database(&database).await;
    standby.catch_up(&database).await;
    let replica = standby.config(&database);
    let server = TestServer::start_custom(database, |settings| {
        settings.replicas = ReplicaSettings {
            servers: vec![replica],
            max_wait,
            check_interval: Duration::from_millis(100),
        };
    })
    .await;
    (server, standby)
}

/// `$dump-sql` as root: the rows as JSON objects.
async fn sql(server: &TestServer, query: &str) -> Vec<Value> {
    let response = server
        .request(Method::POST, "/$dump-sql?_format=ndjson")
        .json(&json!({ "query": query }))
        .send()
        .await
        .expect("sent");
    let status = response.status();
    let text = response.text().await.expect("body");
    assert_eq!(status, StatusCode::OK, "{query}: {text}");
    text.lines()
        .map(|line| serde_json::from_str(line).expect("json line"))
        .collect()
}

/// Whether root's `$dump-sql` ran on a standby.
async fn on_standby(server: &TestServer) -> bool {
    sql(server, "select pg_is_in_recovery() as standby").await[0]["standby"] == json!(true)
}

async fn put_patient(server: &TestServer, id: &str) {
    let (status, body) = server
        .json(
            Method::PUT,
            &format!("/fhir/Patient/{id}"),
            &json!({"resourceType": "Patient", "id": id}),
        )
        .await;
    assert!(status.is_success(), "{body}");
}

/// The lines of a streamed NDJSON read.
async fn lines(server: &TestServer, path: &str) -> Vec<String> {
    let response = server.get_ok(path).await;
    let text = response.text().await.expect("body");
    text.lines().map(str::to_string).collect()
}

/// The standby's own count of sequential scans of `patient` (its statistics are its own).
async fn standby_scans(standby: &Standby, database: &str) -> i64 {
    standby
        .connect(database)
        .await
        .query_one(
            "SELECT coalesce(sum(seq_scan), 0)::bigint FROM pg_stat_user_tables WHERE relname = 'patient'",
            &[],
        )
        .await
        .expect("stats")
        .get(0)
}

async fn standby_count(standby: &Standby, database: &str) -> i64 {
    standby
        .connect(database)
        .await
        .query_one("SELECT count(*) FROM patient", &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_reads_right_after_a_write_wait_for_the_standby_and_miss_nothing() {
    let (server, standby) = server_with_standby(
        &[("recovery_min_apply_delay", APPLY_DELAY)],
        Duration::from_secs(10),
    )
    .await;
    let view = json!({"resourceType": "ViewDefinition", "name": "ids", "resource": "Patient",
        "select": [{"column": [{"name": "id", "path": "id"}]}]});
    for round in 0..3i64 {
        let before = 5 * round;
        put_patient(&server, &format!("round-{round}")).await;
        // The standby has not applied it yet: a read that did not wait would miss it.
        assert_eq!(standby_count(&standby, &server.database).await, before);
        let started = Instant::now();
        let rows = sql(
            &server,
            "select pg_is_in_recovery() as standby, (select count(*) from patient) as n",
        )
        .await;
        assert_eq!(rows[0]["standby"], json!(true), "read on the standby");
        assert_eq!(rows[0]["n"], json!(before + 1), "round {round}: {rows:?}");
        assert!(started.elapsed() >= Duration::from_millis(500), "it waited");
        put_patient(&server, &format!("round-{round}-b")).await;
        let dumped = lines(&server, "/Patient/$dump").await;
        assert_eq!(dumped.len() as i64, before + 2, "$dump, round {round}");
        let since = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ");
        put_patient(&server, &format!("round-{round}-s")).await;
        let created = lines(&server, &format!("/Patient/$dump?_since={since}")).await;
        assert_eq!(created.len(), 1, "$dump?_since, round {round}: {created:?}");
        put_patient(&server, &format!("round-{round}-c")).await;
        let csv = lines(&server, "/Patient/$dump-csv").await;
        assert_eq!(
            csv.len() as i64,
            before + 4 + 1,
            "$dump-csv (a header line)"
        );
        put_patient(&server, &format!("round-{round}-d")).await;
        let response = server
            .request(Method::POST, "/fhir/ViewDefinition/$viewdefinition-run")
            .json(&json!({"resourceType": "Parameters", "parameter": [
                {"name": "viewResource", "resource": view},
                {"name": "_format", "valueCode": "ndjson"}]}))
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.text().await.expect("body");
        assert_eq!(text.lines().count() as i64, before + 5, "view run: {text}");
    }
    // And they were read there: the standby's own statistics saw the scans.
    assert!(standby_scans(&standby, &server.database).await >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_kicked_off_right_after_writes_reads_the_standby_and_exports_them_all() {
    let (server, standby) = server_with_standby(
        &[("recovery_min_apply_delay", APPLY_DELAY)],
        Duration::from_secs(10),
    )
    .await;
    for i in 0..20 {
        put_patient(&server, &format!("e{i}")).await;
    }
    let scans_before = standby_scans(&standby, &server.database).await;
    assert!(standby_count(&standby, &server.database).await < 20);
    let status_url = start(&server, "/fhir/$export?_type=Patient").await;
    let files = download(&server, &manifest(&server, &status_url).await).await;
    assert_eq!(
        files["Patient"].len(),
        20,
        "every Patient written before kick-off"
    );
    // The task read on the standby (its scan is counted there)...
    let deadline = Instant::now() + Duration::from_secs(10);
    while standby_scans(&standby, &server.database).await <= scans_before {
        assert!(
            Instant::now() < deadline,
            "the export did not read the standby"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and one that needs temporary tables (a _typeFilter's values) reads the primary,
    // and works.
    put_patient(&server, "filtered").await;
    let status_url = start(
        &server,
        "/fhir/$export?_type=Patient&_typeFilter=Patient%3F_id%3Dfiltered",
    )
    .await;
    let files = download(&server, &manifest(&server, &status_url).await).await;
    assert_eq!(files["Patient"].len(), 1);
    // A view export, right after a write, on the standby too.
    put_patient(&server, "viewed").await;
    let view = json!({"resourceType": "ViewDefinition", "name": "ids", "resource": "Patient",
        "select": [{"column": [{"name": "id", "path": "id"}]}]});
    let (status, body, location) = common::export::kick_off(
        &server,
        Method::POST,
        "/fhir/ViewDefinition/$viewdefinition-export",
        Some(&json!({"resourceType": "Parameters", "parameter": [
            {"name": "view", "part": [{"name": "name", "valueString": "ids"}, {"name": "viewResource", "resource": view}]},
            {"name": "_format", "valueCode": "ndjson"}]})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let manifest = manifest(&server, &location.expect("status URL")).await;
    let mut rows = 0;
    for output in manifest["output"].as_array().expect("output") {
        let url = output["url"].as_str().expect("url");
        let response = common::export::as_root(&server, Method::GET, url)
            .send()
            .await
            .expect("download");
        rows += response.text().await.expect("rows").lines().count();
    }
    assert_eq!(rows, 22, "{manifest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_sql_on_the_standby_keeps_its_roles_and_limits() {
    let database = fresh_database().await;
    let standby = Standby::start(&[]);
    standby.wait_for_database(&database).await;
    standby.catch_up(&database).await;
    let replica = standby.config(&database);
    let server = TestServer::start_custom(database, |settings| {
        settings.replicas = ReplicaSettings {
            servers: vec![replica],
            max_wait: Duration::from_secs(5),
            check_interval: Duration::from_millis(100),
        };
        settings.http.sql_limits.timeout = Duration::from_secs(1);
    })
    .await;
    // A Client with basic credentials that may do anything its policy allows.
    let (status, body) = server
        .json(
            Method::PUT,
            "/Client/bulk-client",
            &json!({"resourceType": "Client", "secret": "secret", "grant_types": ["basic"]}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    let (status, body) = server
        .json(
            Method::PUT,
            "/AccessPolicy/bulk-client",
            &json!({"resourceType": "AccessPolicy", "engine": "allow",
                    "link": [{"resourceType": "Client", "id": "bulk-client"}]}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    let as_client = |query: &str| {
        server
            .client
            .post(server.url("/$dump-sql?_format=ndjson"))
            .basic_auth("bulk-client", Some("secret"))
            .json(&json!({ "query": query }))
            .send()
    };
    let response = as_client("select pg_is_in_recovery() as standby, current_user as who")
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    let row: Value =
        serde_json::from_str(response.text().await.expect("body").trim()).expect("json");
    assert_eq!(row, json!({"standby": true, "who": "fhirbox_sql_reader"}));
    // The reader role may not read fhirbox's own tables there either.
    let response = as_client("select * from client").await.expect("sent");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // The statement timeout holds on the standby.
    let started = Instant::now();
    let response = as_client("select pg_sleep(30)").await.expect("sent");
    let status = response.status();
    let text = response.text().await.expect("body");
    assert!(!status.is_success(), "{status}: {text}");
    assert!(
        text.contains("timeout") || text.contains("canceling"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_standby_is_skipped() {
    let (server, mut standby) = server_with_standby(&[], Duration::from_secs(5)).await;
    assert!(on_standby(&server).await);
    standby.stop();
    put_patient(&server, "after-stop").await;
    let started = Instant::now();
    assert_eq!(lines(&server, "/Patient/$dump").await.len(), 1);
    assert!(!on_standby(&server).await, "on the primary now");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a stopped standby is not waited for: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_standby_is_waited_for_then_bypassed_until_it_catches_up() {
    let max_wait = Duration::from_millis(1500);
    let (server, standby) = server_with_standby(&[], max_wait).await;
    assert!(on_standby(&server).await);
    let db = standby.connect(&server.database).await;
    db.execute("SELECT pg_wal_replay_pause()", &[])
        .await
        .expect("pause");
    put_patient(&server, "while-paused").await;
    // Waited for up to max_wait, then read on the primary: the new Patient is there.
    let started = Instant::now();
    assert_eq!(lines(&server, "/Patient/$dump").await.len(), 1);
    let waited = started.elapsed();
    // Until max_wait, or until the checker found the standby lagging, whichever came first:
    // the checker counts from the write (before `started`), so on a busy machine it may cut
    // the wait short by the write's own time (1.34 s was seen under a parallel build).
    assert!(waited >= max_wait / 2, "it waited: {waited:?}");
    // Once the checker sees it lagging, reads skip it without waiting.
    tokio::time::sleep(max_wait + Duration::from_millis(500)).await;
    let started = Instant::now();
    assert!(!on_standby(&server).await);
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    db.execute("SELECT pg_wal_replay_resume()", &[])
        .await
        .expect("resume");
    // Caught up, it takes the reads again.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !on_standby(&server).await {
        assert!(Instant::now() < deadline, "the standby never came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_is_never_read_again() {
    let (server, standby) = server_with_standby(&[], Duration::from_secs(5)).await;
    assert!(on_standby(&server).await);
    let db = standby.connect(&server.database).await;
    let promoted: bool = db
        .query_one("SELECT pg_promote(true, 30)", &[])
        .await
        .expect("promote")
        .get(0);
    assert!(promoted);
    // It no longer follows the primary: what is written now is not there.
    put_patient(&server, "after-promotion").await;
    for _ in 0..5 {
        let rows = sql(
            &server,
            "select pg_is_in_recovery() as standby, (select count(*) from patient) as n",
        )
        .await;
        assert_eq!(rows[0], json!({"standby": false, "n": 1}));
        assert_eq!(lines(&server, "/Patient/$dump").await.len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_dying_mid_stream_fails_that_stream_and_the_next_goes_to_the_primary() {
    let (server, mut standby) = server_with_standby(&[], Duration::from_secs(5)).await;
    server.fill_patients(20_000, 2_000).await;
    assert!(on_standby(&server).await);
    // Replayed before the read starts: the dump streams from the standby.
    let standby = &mut standby;
    let (received, failed) = server
        .read_interrupted("/Patient/$dump", || async move { standby.stop() })
        .await;
    assert!(
        failed,
        "the body ended cleanly after {received} bytes: it must fail instead"
    );
    assert_eq!(lines(&server, "/Patient/$dump").await.len(), 20_000);
}
