//! Attacks that once got through (issue "Safe to expose"), each performed against the real
//! server: a test here fails on the fhirbox that let the attack through. Memory is read from
//! the server's own peak RSS (`VmHWM`), so those tests run the binary as a child process.

mod common;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fixtures::{Fixture, FixtureServer};
use common::process::ServerProcess;
use common::{diagnostics, seed, TestServer};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const MIB: u64 = 1024 * 1024;

/// A client whose requests come from `address` (any of 127.0.0.0/8 is this machine).
fn client_from(address: &str) -> reqwest::Client {
    common::http_client();
    reqwest::Client::builder()
        .local_address(address.parse::<IpAddr>().expect("address"))
        .build()
        .expect("client")
}

/// A child-process fhirbox on a fresh database, with root's password `root-pw`.
async fn child(extra: &[&str]) -> ServerProcess {
    let database = common::fresh_database().await;
    let url = common::cluster().url(&database);
    let dir = tempfile::tempdir().expect("dir").keep();
    let data = dir.to_str().expect("utf-8").to_string();
    let mut args = vec![
        "--database-url",
        &url,
        "--data-dir",
        &data,
        "--admin-password",
        "root-pw",
        "--allow-private-sources",
    ];
    args.extend_from_slice(extra);
    ServerProcess::start(&args)
}

/// The seed's bulk-client and its policy, on an in-process server.
async fn seeded() -> TestServer {
    let server = TestServer::start().await;
    let (status, body) = server
        .yaml(Method::PUT, "/", &seed("put-client-and-policy.yaml"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server
}

fn as_bulk_client(server: &TestServer, method: Method, path: &str) -> reqwest::RequestBuilder {
    server
        .client
        .request(method, server.url(path))
        .basic_auth("bulk-client", Some("secret"))
}

// 1. Password floods.

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_wrong_passwords_is_bounded_and_the_right_one_gets_through() {
    let server = child(&[]).await;
    let flood = client_from("127.0.0.1");
    let url = format!("{}/Patient?_count=1", server.base);
    let (flood_url, flood) = (url.clone(), flood);
    let attack = futures_util::stream::iter(0..600)
        .map(move |i| {
            let request = flood
                .get(&flood_url)
                .basic_auth("root", Some(format!("guess-{i}")));
            async move {
                request
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        })
        .buffer_unordered(60)
        .collect::<Vec<u16>>();
    let attack = tokio::spawn(attack);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let right = client_from("127.0.0.2")
        .get(&url)
        .basic_auth("root", Some("root-pw"))
        .send()
        .await
        .expect("sent");
    let took = started.elapsed();
    assert_eq!(right.status(), StatusCode::OK);
    assert!(
        took < Duration::from_secs(2),
        "the right password took {took:?}"
    );
    let statuses = attack.await.expect("the flood");
    assert!(
        statuses.iter().all(|s| matches!(s, 401 | 429 | 503)),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().filter(|s| **s == 429).count() > 500,
        "{statuses:?}"
    );
    let peak = server.peak_rss();
    assert!(peak < 600 * MIB, "peak RSS {} MiB", peak / MIB);
}

#[tokio::test]
async fn wrong_passwords_from_one_address_must_wait_others_do_not() {
    let server = TestServer::start().await;
    let here = client_from("127.0.0.3");
    let try_root = |client: &reqwest::Client, password: &str| {
        client
            .get(server.url("/Patient?_count=1"))
            .basic_auth("root", Some(password))
            .send()
    };
    let mut statuses = Vec::new();
    for i in 0..12 {
        let response = try_root(&here, &format!("wrong-{i}")).await.expect("sent");
        statuses.push(response.status().as_u16());
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry: u64 = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .expect("Retry-After");
            assert!((1..=60).contains(&retry), "{retry}");
        }
    }
    assert_eq!(statuses[..10], [401; 10], "{statuses:?}");
    assert_eq!(statuses[10..], [429; 2], "{statuses:?}");
    // The same address, even with the right password, waits its turn; another does not.
    let blocked = try_root(&here, common::ROOT_PASSWORD).await.expect("sent");
    assert_eq!(blocked.status(), StatusCode::TOO_MANY_REQUESTS);
    let elsewhere = try_root(&client_from("127.0.0.4"), common::ROOT_PASSWORD)
        .await
        .expect("sent");
    assert_eq!(elsewhere.status(), StatusCode::OK);
}

#[tokio::test]
async fn unknown_user_names_cost_what_known_ones_cost() {
    let server = seeded().await;
    let mut timings = Vec::new();
    for (user, address) in [
        ("bulk-client", "127.0.0.5"),
        ("nobody-by-that-name", "127.0.0.6"),
    ] {
        let client = client_from(address);
        let mut took = Vec::new();
        for i in 0..7 {
            let started = Instant::now();
            let response = client
                .get(server.url("/Patient?_count=1"))
                .basic_auth(user, Some(format!("wrong-{i}")))
                .send()
                .await
                .expect("sent");
            took.push(started.elapsed());
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        }
        took.sort();
        timings.push(took[took.len() / 2]);
    }
    let (known, unknown) = (timings[0], timings[1]);
    assert!(
        unknown * 2 > known && known * 2 > unknown,
        "median of a known name {known:?}, of an unknown one {unknown:?}"
    );
}

// 2. Endless lines.

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_line_ends_the_load_naming_it_in_bounded_memory() {
    let sent = Arc::new(AtomicU64::new(0));
    let fixtures = FixtureServer::start(vec![(
        "/endless.ndjson",
        Fixture::Endless {
            chunk: Bytes::from(vec![b'x'; 256 * 1024]),
            sent: sent.clone(),
        },
    )])
    .await;
    let server = child(&["--max-line-bytes", "16777216"]).await;
    let started = Instant::now();
    let response = common::http_client()
        .post(format!("{}/Patient/$load", server.base))
        .basic_auth("root", Some("root-pw"))
        .json(&json!({"source": fixtures.url("/endless.ndjson")}))
        .send()
        .await
        .expect("sent");
    let status = response.status();
    let outcome: Value = response.json().await.expect("an OperationOutcome");
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
    assert!(
        diagnostics(&outcome).contains("line 1 is longer than the limit of 16777216 bytes"),
        "{outcome}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        server.peak_rss() < 256 * MIB,
        "{} MiB",
        server.peak_rss() / MIB
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_whose_client_left_stops_reading_its_source() {
    let sent = Arc::new(AtomicU64::new(0));
    let fixtures = FixtureServer::start(vec![(
        "/endless.ndjson",
        Fixture::Endless {
            chunk: Bytes::from(vec![b'x'; 64 * 1024]),
            sent: sent.clone(),
        },
    )])
    .await;
    let server = TestServer::start_custom(common::fresh_database().await, |settings| {
        settings.sources.max_line_bytes = 1 << 40;
    })
    .await;
    let gone = server
        .request(Method::POST, "/Patient/$load")
        .json(&json!({"source": fixtures.url("/endless.ndjson")}))
        .timeout(Duration::from_millis(700))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_leaving = sent.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A chunk or two may be in the sockets' buffers: nothing more than that.
    let more = sent.load(Ordering::Relaxed) - after_leaving;
    assert!(
        more <= 4 * 64 * 1024,
        "the source was still read: {more} more bytes"
    );
    common::assert_no_connection_left(&server).await;
}

// 3. Abandoned $dump-sql.

#[tokio::test(flavor = "multi_thread")]
async fn an_abandoned_dump_sql_is_cancelled_and_leaves_nothing_to_the_next_query() {
    let server = seeded().await;
    let sql = |query: &str| {
        as_bulk_client(&server, Method::POST, "/$dump-sql").json(&json!({"query": query}))
    };
    // Gone before the first row.
    let gone = sql("select pg_sleep(30), 1")
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(gone.is_err());
    // Settings made by one query do not outlive it.
    let response = sql("select set_config('TimeZone', 'Pacific/Apia', false)")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    let db = server.db().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let sleeping: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("activity")
            .get(0);
        if sleeping == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the abandoned query still runs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    db.batch_execute(
        "INSERT INTO patient (id, status, resource) VALUES ('fresh', 'created', '{}')",
    )
    .await
    .expect("insert");
    let text = sql(
        "select current_setting('TimeZone'), (select count(*) from patient where id = 'fresh')",
    )
    .send()
    .await
    .expect("sent")
    .text()
    .await
    .expect("text");
    assert!(!text.contains("Apia"), "a setting leaked: {text}");
    assert!(
        text.trim_end().ends_with("\t1"),
        "a row committed before was missed: {text}"
    );
    common::assert_no_connection_left(&server).await;
}

#[tokio::test]
async fn one_query_cannot_fill_the_disk_with_temp_files() {
    let server = TestServer::start_custom(common::fresh_database().await, |settings| {
        settings.roles.temp_file_kb = 1024;
        // Sorts spill to temp files past work_mem: keep it small so this one does.
        settings.roles.work_mem_kb = 1024;
    })
    .await;
    let (status, outcome) = server
        .json(
            Method::POST,
            "/$dump-sql",
            &json!({"query": "select g, md5(g::text) from generate_series(1, 500000) g order by 2"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
    assert!(
        diagnostics(&outcome).contains("temp_file_limit"),
        "{outcome}"
    );
}

// 4. Bulk streams and the pool.

#[tokio::test(flavor = "multi_thread")]
async fn slow_bulk_readers_of_one_client_cannot_starve_others() {
    let server = TestServer::start_custom(common::fresh_database().await, |settings| {
        settings.allowance.total = 8;
        settings.allowance.per_subject = 4;
    })
    .await;
    let (status, body) = server
        .yaml(Method::PUT, "/", &seed("put-client-and-policy.yaml"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // ~40 MB: far more than socket buffers hold, so a reader that does not read holds on.
    server
        .db()
        .await
        .batch_execute(
            "INSERT INTO patient (id, status, resource)
             SELECT 'p' || g, 'created', jsonb_build_object('text', jsonb_build_object('div', repeat('x', 2000)))
               FROM generate_series(1, 20000) g",
        )
        .await
        .expect("fill");
    // 24 readers that never read.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..24 {
        let response = as_bulk_client(&server, Method::GET, "/Patient/$dump")
            .send()
            .await
            .expect("sent");
        match response.status() {
            StatusCode::OK => held.push(response),
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(response.headers().contains_key("retry-after"));
                refused += 1;
            }
            other => panic!("{other}"),
        }
    }
    assert_eq!((held.len(), refused), (4, 20));
    let started = Instant::now();
    let (status, _) = server.get("/Patient/p1").await;
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(3));
    // Another subject still has its share of the server's allowance.
    let response = server
        .request(Method::GET, "/Patient/$dump")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_pool_says_busy_not_unavailable() {
    let server = TestServer::start_custom(common::fresh_database().await, |settings| {
        settings.pool_size = 1;
        settings.pool_wait = Duration::from_secs(1);
    })
    .await;
    let (status, _) = server
        .json(Method::PUT, "/Patient/locked", &json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    // The pool's one connection waits for a row lock the test holds.
    let mut db = server.db().await;
    let tx = db.transaction().await.expect("begin");
    tx.execute("SELECT 1 FROM patient WHERE id = 'locked' FOR UPDATE", &[])
        .await
        .expect("lock");
    let waiting = tokio::spawn(
        server
            .request(Method::PUT, "/Patient/locked")
            .json(&json!({"active": true}))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = server
        .request(Method::GET, "/Patient/locked")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let outcome: Value = response.json().await.expect("json");
    assert!(diagnostics(&outcome).contains("busy"), "{outcome}");
    tx.rollback().await.expect("rollback");
    let updated = waiting.await.expect("task").expect("sent");
    assert_eq!(updated.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_source_that_stalls_fails_the_load() {
    let fixtures = FixtureServer::start(vec![("/stall", Fixture::Stall)]).await;
    let server = TestServer::start_custom(common::fresh_database().await, |settings| {
        settings.sources.read_timeout = Duration::from_secs(1);
    })
    .await;
    let body = json!({"source": fixtures.url("/stall")});
    let load = server.json(Method::POST, "/Patient/$load", &body);
    let (status, outcome) = tokio::time::timeout(Duration::from_secs(10), load)
        .await
        .expect("the load ended instead of waiting forever");
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{outcome}");
}

// 5. Environment proxies.

#[tokio::test(flavor = "multi_thread")]
async fn an_environment_proxy_is_never_used() {
    let proxied = Arc::new(AtomicU64::new(0));
    let proxy = {
        let proxied = proxied.clone();
        let app = axum::Router::new().fallback(move || {
            proxied.fetch_add(1, Ordering::Relaxed);
            async { "{\"resourceType\":\"Patient\",\"id\":\"via-proxy\"}\n" }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}")
    };
    let database = common::fresh_database().await;
    let url = common::cluster().url(&database);
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().to_str().expect("utf-8");
    let env: Vec<(&str, &str)> = [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .into_iter()
    .map(|name| (name, proxy.as_str()))
    .collect();
    let server = ServerProcess::start_with_env(
        &[
            "--database-url",
            &url,
            "--data-dir",
            data,
            "--admin-password",
            "root-pw",
        ],
        &env,
    );
    for source in [
        "http://localhost:9/Patient.ndjson",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://169.254.169.254/latest/meta-data/",
    ] {
        let response = common::http_client()
            .post(format!("{}/Patient/$load", server.base))
            .basic_auth("root", Some("root-pw"))
            .json(&json!({"source": source}))
            .send()
            .await
            .expect("sent");
        assert!(
            response.status() == StatusCode::FORBIDDEN
                || response.status() == StatusCode::BAD_GATEWAY,
            "{source}: {}",
            response.status()
        );
    }
    assert_eq!(
        proxied.load(Ordering::Relaxed),
        0,
        "a request went to the proxy"
    );
}

// 6. and 7. What a load may write.

#[tokio::test]
async fn merge_cannot_rewrite_identity_or_server_metadata() {
    let server = TestServer::start().await;
    let source = format!(
        "file://{}/load/patients.ndjson",
        common::fixtures_dir().display()
    );
    let mut answers = Vec::new();
    for merge in [
        json!({"resourceType": "AccessPolicy", "id": "zz"}),
        json!({"id": "zz"}),
        json!({"meta": {"versionId": "1"}}),
    ] {
        let (status, outcome) = server
            .json(
                Method::POST,
                "/$load",
                &json!({"source": source, "merge": merge}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
        answers.push(common::answer(&merge.to_string(), status, &outcome));
    }
    insta::assert_snapshot!(common::pretty(&answers));
    assert_eq!(server.count("patient").await, 0);
    assert_eq!(server.count("accesspolicy").await, 0);
}

#[tokio::test]
async fn fhirbox_types_are_bulk_loaded_by_root_only() {
    let server = seeded().await;
    let attribute = format!(
        "file://{}/load/attribute.ndjson",
        common::fixtures_dir().display()
    );
    let mut answers = Vec::new();
    for (path, body) in [
        ("/Attribute/$load", json!({"source": attribute})),
        ("/$load", json!({"source": attribute})),
        (
            "/$import",
            json!({"inputs": [{"resourceType": "BulkImportStatus", "url": "http://127.0.0.1:9/x"}]}),
        ),
    ] {
        let response = as_bulk_client(&server, Method::POST, path)
            .json(&body)
            .send()
            .await
            .expect("sent");
        let status = response.status();
        let outcome: Value = response.json().await.expect("json");
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {outcome}");
        answers.push(common::answer(path, status, &outcome));
    }
    insta::assert_snapshot!(common::pretty(&answers));
    assert_eq!(server.count("attribute").await, 0);
    let (status, body) = server
        .json(
            Method::POST,
            "/Attribute/$load",
            &json!({"source": attribute}),
        )
        .await;
    assert_eq!(
        (status, &body),
        (StatusCode::OK, &json!({"total": 1})),
        "root may"
    );
}

// 8. $dump-sql isolation.

#[tokio::test(flavor = "multi_thread")]
async fn dump_sql_subjects_see_neither_each_others_queries_nor_fhirbox_tables() {
    let server = seeded().await;
    let root_query = tokio::spawn({
        let request = server
            .request(Method::POST, "/$dump-sql")
            .json(&json!({"query": "select pg_sleep(2), 'root-secret-literal'"}));
        async move { request.send().await.map(|r| r.status()) }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut answers = Vec::new();
    for query in [
        "select query from pg_stat_activity",
        "select pg_stat_get_backend_activity(s) from pg_stat_get_backend_idset() s",
        "select * from accesspolicy",
        "select * from bulkimportstatus",
        "select * from attribute",
        "select * from client",
    ] {
        let response = as_bulk_client(&server, Method::POST, "/$dump-sql")
            .json(&json!({"query": query}))
            .send()
            .await
            .expect("sent");
        let status = response.status();
        let text = response.text().await.expect("text");
        assert!(!text.contains("root-secret-literal"), "{query}: {text}");
        assert_eq!(status, StatusCode::FORBIDDEN, "{query}: {text}");
        let outcome: Value = serde_json::from_str(&text).expect("an OperationOutcome");
        answers.push(common::answer(query, status, &outcome));
    }
    insta::assert_snapshot!(common::pretty(&answers));
    assert_eq!(
        root_query.await.expect("root").expect("sent"),
        StatusCode::OK
    );
    let (status, _) = server
        .json(
            Method::POST,
            "/$dump-sql",
            &json!({"query": "select * from accesspolicy"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "root may read fhirbox's own tables");
}

// 9. Huge rows.

#[tokio::test(flavor = "multi_thread")]
async fn huge_rows_end_dump_sql_in_bounded_memory() {
    let server = child(&["--sql-max-row-bytes", "8388608"]).await;
    let queries = (0..3).map(|_| {
        common::http_client()
            .post(format!("{}/$dump-sql", server.base))
            .basic_auth("root", Some("root-pw"))
            .json(&json!({"query": "select repeat('x', 100000000)"}))
            .send()
    });
    for response in futures_util::future::join_all(queries).await {
        let response = response.expect("sent");
        let status = response.status();
        let text = response.text().await.expect("text");
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert!(
            text.contains("larger than the limit of 8388608 bytes"),
            "{text}"
        );
    }
    // Below the limit, rows come through.
    let response = common::http_client()
        .post(format!("{}/$dump-sql", server.base))
        .basic_auth("root", Some("root-pw"))
        .json(&json!({"query": "select repeat('x', 1000000)"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.text().await.expect("text").trim_end().len(),
        1_000_000
    );
    assert!(
        server.peak_rss() < 200 * MIB,
        "{} MiB",
        server.peak_rss() / MIB
    );
}

// 10. and 11. The managed PostgreSQL.

#[tokio::test(flavor = "multi_thread")]
async fn the_managed_postgres_is_locked_and_supervised() {
    let dir = tempfile::Builder::new()
        .prefix("fhirbox-hostile-")
        .tempdir()
        .expect("dir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");
    let args = ["--data-dir", data, "--admin-password", "root-pw"];
    let first = ServerProcess::start(&args);
    let put = common::http_client()
        .put(format!("{}/Patient/kept", first.base))
        .basic_auth("root", Some("root-pw"))
        .json(&json!({"resourceType": "Patient"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(put.status(), StatusCode::CREATED);

    // A second fhirbox on the same directory exits at once and touches nothing.
    let (status, log) = ServerProcess::run_to_exit(&args, Duration::from_secs(10));
    assert!(!status.success());
    assert!(
        log.contains("another fhirbox is running on the data directory"),
        "{log}"
    );
    let read = |base: String| async move {
        common::http_client()
            .get(format!("{base}/Patient/kept"))
            .basic_auth("root", Some("root-pw"))
            .send()
            .await
            .map(|r| r.status())
    };
    assert_eq!(
        read(first.base.clone()).await.expect("sent"),
        StatusCode::OK
    );

    // PostgreSQL killed: fhirbox starts it again, and nothing committed is lost.
    let pid_file =
        std::fs::read_to_string(dir.path().join("data/postgres/postmaster.pid")).expect("pid file");
    let postmaster: i32 = pid_file
        .lines()
        .next()
        .and_then(|l| l.parse().ok())
        .expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(postmaster),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(StatusCode::OK) = read(first.base.clone()).await {
            break;
        }
        assert!(Instant::now() < deadline, "fhirbox did not recover");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(first.log().iter().any(|l| l.contains("starting it again")));
}

// 12. The smaller ones.

#[tokio::test]
async fn nul_characters_deep_nesting_and_bad_text_are_400s_naming_the_place() {
    let server = TestServer::start().await;
    let mut answers = Vec::new();
    let (status, outcome) = server
        .json(
            Method::PUT,
            "/Patient/nul",
            &json!({"resourceType": "Patient", "name": [{"text": "a\u{0}b"}]}),
        )
        .await;
    answers.push(common::answer("PUT /Patient/nul", status, &outcome));
    let deep = format!(
        "{{\"resourceType\":\"Patient\",\"id\":\"deep\",\"x\":{}1{}}}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let mut bad_utf8 = b"{\"resourceType\":\"Patient\",\"id\":\"ok\"}\n{\"resourceType\":\"Patient\",\"id\":\"u\",\"text\":\"".to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe]);
    bad_utf8.extend_from_slice(b"\"}\n");
    let fixtures = FixtureServer::start(vec![
        ("/deep.ndjson", Fixture::Bytes(deep.into_bytes())),
        ("/utf8.ndjson", Fixture::Bytes(bad_utf8)),
        (
            "/surrogate.ndjson",
            Fixture::Bytes(
                b"{\"resourceType\":\"Patient\",\"id\":\"s\",\"text\":\"\\ud800 alone\"}\n"
                    .to_vec(),
            ),
        ),
        (
            "/nul.ndjson",
            Fixture::Bytes(
                b"{\"resourceType\":\"Patient\",\"id\":\"n\",\"text\":\"a\\u0000b\"}\n".to_vec(),
            ),
        ),
    ])
    .await;
    for source in [
        "/deep.ndjson",
        "/utf8.ndjson",
        "/surrogate.ndjson",
        "/nul.ndjson",
    ] {
        let (status, outcome) = server
            .json(
                Method::POST,
                "/Patient/$load",
                &json!({"source": fixtures.url(source)}),
            )
            .await;
        answers.push(common::answer(source, status, &outcome));
    }
    for answer in &answers {
        assert_eq!(answer["status"], json!(400), "{answer}");
    }
    insta::assert_snapshot!(common::pretty(&answers));
    assert_eq!(server.count("patient").await, 0);
}

#[tokio::test]
async fn repeated_keys_mean_the_same_everywhere_the_last_one() {
    let server = TestServer::start().await;
    let line = "{\"resourceType\":\"Patient\",\"id\":\"first\",\"id\":\"last\",\"gender\":\"male\",\"gender\":\"female\"}\n";
    let fixtures = FixtureServer::start(vec![("/twice.ndjson", Fixture::Bytes(line.into()))]).await;
    let (status, body) = server
        .json(
            Method::POST,
            "/$load",
            &json!({"source": fixtures.url("/twice.ndjson")}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, loaded) = server.get("/Patient/last").await;
    assert_eq!(status, StatusCode::OK, "the last id counts in $load");
    assert_eq!(loaded["gender"], "female");
    let response = server
        .request(Method::PUT, "/Patient/last")
        .header("content-type", "application/json")
        .body(line.trim_end().to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the last id counts in PUT too"
    );
}

#[tokio::test]
async fn file_sources_neither_hang_on_a_fifo_nor_tell_what_exists_outside() {
    let dir = tempfile::tempdir().expect("dir");
    let root = std::fs::canonicalize(dir.path()).expect("canonical");
    nix::unistd::mkfifo(&root.join("pipe.ndjson"), nix::sys::stat::Mode::S_IRWXU).expect("fifo");
    let server = TestServer::start_custom(common::fresh_database().await, |settings| {
        settings.sources.source_dir = Some(root.clone());
    })
    .await;
    let load = |path: String| {
        let server = &server;
        async move {
            tokio::time::timeout(
                Duration::from_secs(10),
                server.json(
                    Method::POST,
                    "/$load",
                    &json!({"source": format!("file://{path}")}),
                ),
            )
            .await
            .expect("no hang")
        }
    };
    let (status, outcome) = load(format!("{}/pipe.ndjson", root.display())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
    assert!(
        diagnostics(&outcome).contains("not a regular file"),
        "{outcome}"
    );
    let existing = load(format!("{}/../../etc/passwd", root.display())).await;
    let missing = load(format!("{}/../../etc/no-such-file-here", root.display())).await;
    assert_eq!(existing.0, StatusCode::FORBIDDEN);
    assert_eq!(missing.0, StatusCode::FORBIDDEN);
    let shape = |outcome: &Value| {
        diagnostics(outcome)
            .replace("passwd", "X")
            .replace("no-such-file-here", "X")
    };
    assert_eq!(
        shape(&existing.1),
        shape(&missing.1),
        "the answers tell nothing about what exists"
    );
}

#[tokio::test]
async fn private_addresses_in_ipv6_clothing_are_refused() {
    let server = TestServer::start_with_sources(common::SourcePolicy::default()).await;
    for host in [
        "[::7f00:1]",
        "[64:ff9b::7f00:1]",
        "[2002:7f00:1::1]",
        "[::ffff:127.0.0.1]",
    ] {
        let (status, outcome) = server
            .json(
                Method::POST,
                "/$load",
                &json!({"source": format!("http://{host}:9/x.ndjson")}),
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{host}: {outcome}");
    }
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start_custom(common::fresh_database().await, |settings| {
        settings.http.connections.header_timeout = Duration::from_secs(1);
    })
    .await;
    let address = server.base.trim_start_matches("http://").to_string();
    let closed_within = |mut stream: tokio::net::TcpStream| async move {
        let started = Instant::now();
        let mut buffer = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buffer)).await;
        (started.elapsed(), buffer)
    };
    // Connects and says nothing.
    let silent = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let (took, _) = closed_within(silent).await;
    assert!(
        took < Duration::from_secs(5),
        "a silent connection stayed {took:?}"
    );
    // Trickles a request line, never the end of its headers.
    let mut slow = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let (took, _) = closed_within(slow).await;
    assert!(
        took < Duration::from_secs(5),
        "a header-less request stayed {took:?}"
    );
    // One request, then idle on keep-alive.
    let mut idle = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (took, answer) = closed_within(idle).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    assert!(
        took < Duration::from_secs(5),
        "an idle connection stayed {took:?}"
    );
}
