//! `POST /$dump-sql`: the seed's query verbatim, TSV and NDJSON, parameters, errors before and
//! after the first byte, limits, and every attack the endpoint must stop, with the database
//! and the credential tables shown untouched.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{diagnostics, seed, TestServer};
use fhirbox::bulk::dump_sql::SqlLimits;
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn with_seed_data(server: TestServer) -> TestServer {
    let (status, body) = server
        .yaml(Method::POST, "/", &seed("post-sample-data-bundle.yaml"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = server
        .yaml(Method::PUT, "/", &seed("put-client-and-policy.yaml"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server
}

/// Runs a query; returns the status, content type and body text.
async fn sql(server: &TestServer, query_string: &str, body: Value) -> (StatusCode, String, String) {
    let response = server
        .request(Method::POST, &format!("/$dump-sql{query_string}"))
        .json(&body)
        .send()
        .await
        .expect("sent");
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (
        status,
        content_type,
        response.text().await.unwrap_or_default(),
    )
}

#[tokio::test]
async fn the_seeds_query_verbatim() {
    let server = with_seed_data(TestServer::start().await).await;
    // The seed's request: a YAML body, with its Content-Type.
    let response = server
        .request(Method::POST, "/$dump-sql")
        .header("content-type", "application/yaml")
        .body("query: select id, resource#>>'{name,0,given,0}' from patient\n")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "text/tab-separated-values"
    );
    assert_eq!(response.headers()["transfer-encoding"], "chunked");
    assert_eq!(
        response.text().await.expect("body"),
        "pt-1\tAlice\npt-2\tBob\npt-3\tCharles\n"
    );
}

#[tokio::test]
async fn tsv_header_nulls_escapes_ndjson_types_params_and_gzip() {
    let server = with_seed_data(TestServer::start().await).await;
    let query = json!({"query": "select id, resource#>>'{citizenship,0,code,text}' as citizenship, E'a\\tb\\nc\\\\d' as odd from patient order by id;"});
    let (status, content_type, body) = sql(&server, "?_header=true", query.clone()).await;
    assert_eq!(
        (status, content_type.as_str()),
        (StatusCode::OK, "text/tab-separated-values")
    );
    assert_eq!(
        body,
        "id\tcitizenship\todd\npt-1\t\ta\\tb\\nc\\\\d\npt-2\t\ta\\tb\\nc\\\\d\npt-3\tru\ta\\tb\\nc\\\\d\n",
        "NULL is an empty field; tab, newline and backslash are escaped as COPY does"
    );

    let typed = json!({"query": "select id, txid, resource->'name' as name, true as flag, 1.50::numeric as n, null as nothing, cts from patient where id = 'pt-3'"});
    let (status, content_type, body) = sql(&server, "?_format=ndjson", typed).await;
    assert_eq!(
        (status, content_type.as_str()),
        (StatusCode::OK, "application/ndjson")
    );
    let row: Value = serde_json::from_str(body.trim()).expect("one JSON object");
    assert_eq!(row["id"], "pt-3");
    // An empty result is an empty 200 in both forms (NDJSON once panicked: its row stream
    // was polled again after its end).
    for format in ["?_format=ndjson", ""] {
        let none = json!({"query": "select id from patient where false"});
        let (status, _, body) = sql(&server, format, none).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, ""), "{format}");
    }
    assert!(row["txid"].is_u64(), "a bigint is a JSON number: {row}");
    assert_eq!(
        row["name"],
        json!([{"given": ["Charles"]}]),
        "jsonb is nested JSON, not a string"
    );
    assert_eq!(row["flag"], true);
    assert_eq!(
        body.matches("\"n\":1.50").count(),
        1,
        "numeric keeps its digits: {body}"
    );
    assert!(row["nothing"].is_null());
    assert!(row["cts"].is_string());

    // Parameters, in both formats (typed by PostgreSQL from the query).
    let by_id = json!({"query": "select id, resource#>>'{name,0,given,0}' from patient where id = $1 or txid < $2", "params": ["pt-2", 0]});
    let (status, _, body) = sql(&server, "", by_id.clone()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "pt-2\tBob\n"));
    let (status, _, body) = sql(&server, "?_format=json&_header=true", by_id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(body.trim()).expect("json")["id"],
        "pt-2"
    );
    let (status, _, body) = sql(
        &server,
        "?_header=true",
        json!({"query": "select $1::text as a, $2::int as b", "params": [null, "7"]}),
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "a\tb\n\t7\n"));

    let response = server
        .request(Method::POST, "/$dump-sql?gzip=true")
        .json(&json!({"query": "select id from patient order by id"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let mut text = String::new();
    flate2::read::GzDecoder::new(&response.bytes().await.expect("body")[..])
        .read_to_string(&mut text)
        .expect("gzip");
    assert_eq!(text, "pt-1\npt-2\npt-3\n");
}

#[tokio::test]
async fn errors_before_the_first_byte_are_operation_outcomes() {
    let server = with_seed_data(TestServer::start().await).await;
    for (query_string, body, status, message) in [
        (
            "",
            json!({"query": "select id frm patient"}),
            StatusCode::BAD_REQUEST,
            "syntax error at or near \"patient\" (at character 15",
        ),
        (
            "",
            json!({"query": "select nope from patient"}),
            StatusCode::BAD_REQUEST,
            "column \"nope\" does not exist (at character 8",
        ),
        (
            "",
            json!({"query": "select * from no_such_table"}),
            StatusCode::BAD_REQUEST,
            "relation \"no_such_table\" does not exist",
        ),
        (
            "",
            json!({"query": "select 1/0"}),
            StatusCode::BAD_REQUEST,
            "division by zero",
        ),
        (
            "?_format=ndjson",
            json!({"query": "select 1/0 as x"}),
            StatusCode::BAD_REQUEST,
            "division by zero",
        ),
        (
            "",
            json!({"query": "select $1::int", "params": ["x"]}),
            StatusCode::BAD_REQUEST,
            "invalid input syntax for type integer",
        ),
        (
            "",
            json!({"query": "select $1::int"}),
            StatusCode::BAD_REQUEST,
            "1 parameter(s) ($1..$n) but 0 were given",
        ),
        (
            "",
            json!({"query": "  ;  "}),
            StatusCode::BAD_REQUEST,
            "the query is empty",
        ),
        (
            "",
            json!({"sql": "select 1"}),
            StatusCode::BAD_REQUEST,
            "unknown field 'sql'",
        ),
        (
            "?_format=csv",
            json!({"query": "select 1"}),
            StatusCode::BAD_REQUEST,
            "invalid _format 'csv'",
        ),
        (
            "?limit=5",
            json!({"query": "select 1"}),
            StatusCode::BAD_REQUEST,
            "unknown parameter 'limit'",
        ),
    ] {
        let (got, content_type, text) = sql(&server, query_string, body.clone()).await;
        assert_eq!(got, status, "{body}: {text}");
        assert_eq!(content_type, "application/fhir+json", "{body}");
        let outcome: Value = serde_json::from_str(&text).expect("an OperationOutcome");
        assert!(
            diagnostics(&outcome).contains(message),
            "{body}: wanted '{message}' in {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_after_streaming_began_fails_the_transfer() {
    let server = TestServer::start().await;
    // A table scan streams rows as it goes (a function scan would compute them all first).
    server
        .db()
        .await
        .execute(
            "INSERT INTO patient (id, resource_type, status, resource)
             SELECT 'p' || g, 'Patient', 'created', jsonb_build_object('n', g, 'text', repeat('x', 500))
               FROM generate_series(1, 50000) g",
            &[],
        )
        .await
        .expect("fill");
    // The error depends on the row (a constant `1/0` would fail at planning, before any row).
    let query = json!({"query": "select case when (resource->>'n')::int < 49000 then resource::text else (1 / ((resource->>'n')::int - 49000))::text end from patient"});
    let response = server
        .request(Method::POST, "/$dump-sql")
        .json(&query)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.bytes_stream();
    let mut failed = false;
    while let Some(chunk) = body.next().await {
        if chunk.is_err() {
            failed = true;
        }
    }
    assert!(
        failed,
        "a failed query after the first byte must not look like a complete file"
    );
}

#[tokio::test]
async fn timeouts_and_limits() {
    let server = TestServer::start_with_sql_limits(SqlLimits {
        timeout: Duration::from_millis(500),
        max_rows: Some(1000),
        max_bytes: None,
    })
    .await;
    let (status, _, text) = sql(&server, "", json!({"query": "select pg_sleep(5)"})).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{text}");
    assert!(text.contains("statement timeout"), "{text}");
    let (status, _, body) = sql(
        &server,
        "",
        json!({"query": "select g from generate_series(1, 1000) g"}),
    )
    .await;
    assert_eq!((status, body.lines().count()), (StatusCode::OK, 1000));
    // Over the limit: an error answer if it shows in the first chunk, else a failed transfer;
    // never a complete-looking file.
    let response = server
        .request(Method::POST, "/$dump-sql")
        .json(&json!({"query": "select g from generate_series(1, 100000) g"}))
        .send()
        .await
        .expect("sent");
    if response.status() == StatusCode::OK {
        let mut body = response.bytes_stream();
        let mut failed = false;
        while let Some(chunk) = body.next().await {
            failed |= chunk.is_err();
        }
        assert!(failed, "more rows than allowed must not end cleanly");
    } else {
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let text = response.text().await.expect("body");
        assert!(text.contains("more than the allowed 1000 rows"), "{text}");
    }
}

/// What an attack must not change: the data and the credentials.
async fn fingerprint(server: &TestServer) -> (i64, i64, String) {
    let db = server.db().await;
    let patients: i64 = db
        .query_one("SELECT count(*) FROM patient", &[])
        .await
        .expect("count")
        .get(0);
    let clients: i64 = db
        .query_one("SELECT count(*) FROM client", &[])
        .await
        .expect("count")
        .get(0);
    let secret: String = db
        .query_one(
            "SELECT resource::text FROM client WHERE id = 'bulk-client'",
            &[],
        )
        .await
        .expect("client")
        .get(0);
    (patients, clients, secret)
}

#[tokio::test]
async fn attacks_are_refused_and_change_nothing() {
    let server = with_seed_data(TestServer::start().await).await;
    let before = fingerprint(&server).await;
    for (query, status) in [
        ("select 1; drop table patient", StatusCode::BAD_REQUEST),
        ("select 1) q; drop table patient; select (1", StatusCode::BAD_REQUEST),
        ("drop table patient", StatusCode::BAD_REQUEST),
        ("delete from patient returning id", StatusCode::BAD_REQUEST),
        ("with gone as (delete from patient returning id) select * from gone", StatusCode::BAD_REQUEST),
        ("update patient set resource = '{}' returning id", StatusCode::BAD_REQUEST),
        ("insert into patient (id, resource_type, status, resource) values ('x', 'Patient', 'created', '{}') returning id", StatusCode::BAD_REQUEST),
        // Root reads Client bodies (never a secret: those live elsewhere); clients may not
        // (tests/hostile.rs).
        ("select * from client", StatusCode::OK),
        ("select resource->>'secret' from client_history", StatusCode::OK),
        ("select * from fhirbox_client_secret", StatusCode::FORBIDDEN),
        ("select * from fhirbox_migrations", StatusCode::FORBIDDEN),
        ("select rolpassword from pg_authid", StatusCode::FORBIDDEN),
        ("select passwd from pg_shadow", StatusCode::FORBIDDEN),
        ("select pg_read_file('/etc/passwd')", StatusCode::FORBIDDEN),
        ("select pg_ls_dir('.')", StatusCode::FORBIDDEN),
        ("select lo_import('/etc/passwd')", StatusCode::FORBIDDEN),
        ("select set_config('role', 'postgres', false)", StatusCode::FORBIDDEN),
        ("select set_config('session_authorization', 'postgres', false)", StatusCode::FORBIDDEN),
        ("copy (select 1) to program 'touch /tmp/fhirbox-pwned'", StatusCode::BAD_REQUEST),
        ("select dblink_exec('dbname=x', 'drop table patient')", StatusCode::BAD_REQUEST),
        ("select nextval('transaction_id_seq')", StatusCode::FORBIDDEN),
    ] {
        let (got, _, text) = sql(&server, "", json!({"query": query})).await;
        assert_eq!(got, status, "{query}: {text}");
        assert!(!text.contains("$argon2") && !text.contains("\"secret\""), "{query} leaked: {text}");
    }
    assert!(!std::path::Path::new("/tmp/fhirbox-pwned").exists());
    assert_eq!(fingerprint(&server).await, before);
    // The reader may read what it is meant to.
    let (status, _, body) = sql(
        &server,
        "",
        json!({"query": "select count(*) from patient_history"}),
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "0\n"));
}
