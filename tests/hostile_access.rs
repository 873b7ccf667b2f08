//! Attacks on authorization that got through in the second round (issue "Safe to expose,
//! round 2"), each performed against the real server: Bundle entries past AccessPolicies,
//! job routes past token scopes, and `*` scopes over fhirbox's own types. Each test fails on
//! the fhirbox that let the attack through.

mod common;

use std::time::{Duration, Instant};

use common::keys::{jwks, SigningKey, Tls};
use common::smart::{access_token, https_server, register, with_token};
use common::{diagnostics, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// A Client `mallory` (secret `pw`) whose only AccessPolicy allows `POST /` (and `POST /fhir`).
async fn poster(server: &TestServer) {
    let (status, body) = server
        .json(
            Method::PUT,
            "/",
            &json!([
                {"resourceType": "Client", "id": "mallory", "secret": "pw", "grant_types": ["basic"]},
                {"resourceType": "AccessPolicy", "id": "mallory-posts", "engine": "matcho",
                 "matcho": {"request-method": "post", "uri": {"$one-of": ["/", "/fhir", "/fhir/"]}},
                 "link": [{"resourceType": "Client", "id": "mallory"}]},
                {"resourceType": "Client", "id": "victim", "secret": "victim-secret", "grant_types": ["basic"]},
                {"resourceType": "AccessPolicy", "id": "victim-reads", "engine": "allow",
                 "link": [{"resourceType": "Client", "id": "victim"}]},
                {"resourceType": "Patient", "id": "pt-1", "name": [{"given": ["Alice"]}]}
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn as_mallory(
    server: &TestServer,
    method: Method,
    path: &str,
    body: &Value,
) -> (StatusCode, Value) {
    let request = server
        .client
        .request(method, server.url(path))
        .basic_auth("mallory", Some("pw"))
        .json(body);
    server.send(request).await
}

fn statuses(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            e["response"]["status"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

// Row 2: Bundle entries are authorized exactly as the requests they stand for.

#[tokio::test]
async fn batch_entries_cannot_read_what_their_requests_could_not() {
    let server = TestServer::start().await;
    poster(&server).await;
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Client/victim"}},
        {"request": {"method": "GET", "url": "AccessPolicy/victim-reads"}},
        {"request": {"method": "GET", "url": "BulkImportStatus/nightly"}},
        {"request": {"method": "GET", "url": "Patient/pt-1"}}
    ]});
    for path in ["/", "/fhir"] {
        let (status, bundle) = as_mallory(&server, Method::POST, path, &batch).await;
        assert_eq!(status, StatusCode::OK, "{bundle}");
        assert_eq!(
            statuses(&bundle),
            vec!["403 Forbidden"; 4],
            "{path}: {bundle}"
        );
        for entry in bundle["entry"].as_array().expect("entries") {
            assert!(entry.get("resource").is_none(), "{entry}");
        }
    }
}

#[tokio::test]
async fn batch_entries_cannot_create_clients_or_delete_policies() {
    let server = TestServer::start().await;
    poster(&server).await;
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "POST", "url": "Client"},
         "resource": {"resourceType": "Client", "id": "backdoor", "secret": "x", "grant_types": ["basic"]}},
        {"request": {"method": "PUT", "url": "Client/backdoor"},
         "resource": {"resourceType": "Client", "id": "backdoor", "secret": "x", "grant_types": ["basic"]}},
        {"request": {"method": "DELETE", "url": "AccessPolicy/victim-reads"}}
    ]});
    let (status, bundle) = as_mallory(&server, Method::POST, "/fhir", &batch).await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(statuses(&bundle), vec!["403 Forbidden"; 3], "{bundle}");
    let outcome = &bundle["entry"][0]["response"]["outcome"];
    assert_eq!(
        diagnostics(outcome),
        "Client/mallory is not allowed to POST /fhir/Client"
    );
    assert_eq!(
        server.get("/Client/backdoor").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        server.get("/AccessPolicy/victim-reads").await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_transaction_cannot_grant_its_sender_more() {
    let server = TestServer::start().await;
    poster(&server).await;
    let transaction = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "PUT", "url": "Patient/pt-2"},
         "resource": {"resourceType": "Patient", "id": "pt-2"}},
        {"request": {"method": "PUT", "url": "AccessPolicy/mallory-everything"},
         "resource": {"resourceType": "AccessPolicy", "id": "mallory-everything", "engine": "allow",
                      "link": [{"resourceType": "Client", "id": "mallory"}]}}
    ]});
    let (status, outcome) = as_mallory(&server, Method::POST, "/", &transaction).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{outcome}");
    insta::assert_snapshot!(common::pretty(&outcome));
    // Nothing written, not even the first entry, and nothing opened.
    assert_eq!(server.get("/Patient/pt-2").await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        server.get("/AccessPolicy/mallory-everything").await.0,
        StatusCode::NOT_FOUND
    );
    for (method, path) in [(Method::GET, "/Observation"), (Method::POST, "/$dump-sql")] {
        let (status, _) = as_mallory(&server, method, path, &json!({"query": "select 1"})).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
    }
}

#[tokio::test]
async fn entries_a_policy_allows_run_and_a_put_list_is_checked_element_by_element() {
    let server = TestServer::start().await;
    poster(&server).await;
    // mallory may also PUT Patients and PUT / (a list).
    let (status, body) = server
        .json(
            Method::PUT,
            "/AccessPolicy/mallory-patients",
            &json!({"resourceType": "AccessPolicy", "engine": "matcho",
                    "matcho": {"$one-of": [
                        {"request-method": "put", "uri": "#^/(fhir/)?Patient/[^/]+$"},
                        {"request-method": "put", "uri": "/"}]},
                    "link": [{"resourceType": "Client", "id": "mallory"}]}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    let transaction = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "PUT", "url": "Patient/pt-2"},
         "resource": {"resourceType": "Patient", "id": "pt-2"}}
    ]});
    let (status, bundle) = as_mallory(&server, Method::POST, "/fhir", &transaction).await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(statuses(&bundle), vec!["201 Created"]);
    let list = json!([
        {"resourceType": "Patient", "id": "pt-3"},
        {"resourceType": "AccessPolicy", "id": "mallory-everything", "engine": "allow",
         "link": [{"resourceType": "Client", "id": "mallory"}]}
    ]);
    let (status, outcome) = as_mallory(&server, Method::PUT, "/", &list).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{outcome}");
    assert_eq!(
        diagnostics(&outcome),
        "entry 1: Client/mallory is not allowed to PUT /AccessPolicy/mallory-everything"
    );
    assert_eq!(server.get("/Patient/pt-3").await.0, StatusCode::NOT_FOUND);
    let (status, _) = as_mallory(
        &server,
        Method::PUT,
        "/",
        &json!([{"resourceType": "Patient", "id": "pt-3"}]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

// Row 4: a job's routes are its owner's and root's, with scopes covering its types.

/// An HTTPS server whose jobs wait (no workers) unless `workers`, with a Backend Services
/// Client `reader` (an `allow` policy, as in the README) registered for `scope`.
async fn smart_server(tls: &Tls, key: &SigningKey, scope: &str, workers: usize) -> TestServer {
    let server = https_server(tls, |settings| settings.jobs.workers = workers).await;
    register(
        &server,
        "reader",
        json!({"grant_types": ["client_credentials"], "jwks": jwks(&[key]), "scope": scope}),
    )
    .await;
    server
}

async fn root_import(server: &TestServer, id: &str) {
    let fixtures = common::fixtures::FixtureServer::start(vec![(
        "/Patient.ndjson",
        common::fixtures::Fixture::Bytes(b"{\"resourceType\":\"Patient\",\"id\":\"p\"}\n".to_vec()),
    )])
    .await;
    let (status, body) = server
        .json(
            Method::POST,
            "/$import",
            &json!({"id": id, "inputs": [{"resourceType": "Patient", "url": fixtures.url("/Patient.ndjson")}]}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

#[tokio::test]
async fn other_subjects_jobs_do_not_exist_for_a_token() {
    let tls = Tls::new();
    let key = SigningKey::es384();
    let server = smart_server(&tls, &key, "system/Patient.rs system/*.rs", 0).await;
    root_import(&server, "nightly").await;
    root_import(&server, "nightly2").await;
    let token = access_token(&server, "reader", &key, "system/Patient.rs").await;
    let (missing_status, missing) = server
        .send(with_token(
            &server,
            Method::GET,
            "/BulkImportStatus/no-such-job",
            &token,
        ))
        .await;
    assert_eq!(missing_status, StatusCode::NOT_FOUND);
    for (method, id) in [(Method::GET, "nightly"), (Method::DELETE, "nightly2")] {
        let (status, body) = server
            .send(with_token(
                &server,
                method.clone(),
                &format!("/BulkImportStatus/{id}"),
                &token,
            ))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {id}: {body}");
        assert_eq!(
            diagnostics(&body),
            diagnostics(&missing).replace("no-such-job", id),
            "indistinguishable from a job that does not exist"
        );
    }
    let (status, body) = server.get("/BulkImportStatus/nightly2").await;
    assert_eq!(status, StatusCode::OK, "not cancelled: {body}");
    assert_eq!(body["status"], "in-progress", "{body}");
    // Nor through CRUD, search or a Bundle entry: the status resource is root's record.
    for path in [
        "/fhir/BulkImportStatus/nightly",
        "/BulkImportStatus",
        "/BulkImportStatus/nightly/_history",
    ] {
        let (status, body) = server
            .send(with_token(&server, Method::GET, path, &token))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
    }
    // The id is root's: a client cannot take it over or learn its content by colliding.
    let wide = access_token(&server, "reader", &key, "system/*.rs").await;
    let (status, body) = server
        .send(
            with_token(&server, Method::POST, "/$import", &wide)
                .json(&json!({"id": "nightly", "inputs": [{"resourceType": "Patient", "url": "https://example.org/p.ndjson"}]})),
        )
        .await;
    assert!(status.is_client_error(), "{status} {body}");
    assert!(!body.to_string().contains("in-progress"), "{body}");
}

#[tokio::test]
async fn an_export_and_its_files_are_its_owners_and_need_scopes_for_its_types() {
    let tls = Tls::new();
    let key = SigningKey::es384();
    let server = smart_server(&tls, &key, "system/*.rs", 2).await;
    let (status, body) = server
        .json(
            Method::PUT,
            "/",
            &json!([{"resourceType": "Observation", "id": "o1", "status": "final",
                     "code": {"text": "x"}}]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Root's export: the client never sees it.
    let status_url = common::export::start(&server, "/fhir/$export?_type=Observation").await;
    let manifest = common::export::manifest(&server, &status_url).await;
    let file = manifest["output"][0]["url"]
        .as_str()
        .expect("a file")
        .to_string();
    let narrow = access_token(&server, "reader", &key, "system/Patient.rs").await;
    let wide = access_token(&server, "reader", &key, "system/*.rs").await;
    for token in [&narrow, &wide] {
        for url in [&status_url, &file] {
            let response = server
                .client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("sent");
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{url}");
        }
        let response = server
            .client
            .delete(&status_url)
            .bearer_auth(token)
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
    assert_eq!(
        common::export::as_root(&server, Method::GET, &file)
            .send()
            .await
            .expect("sent")
            .status(),
        StatusCode::OK,
        "root's file is still there"
    );
    // The client's own export: its own token opens it, a token without Observation does not.
    let response = server
        .client
        .get(server.url("/fhir/$export?_type=Observation"))
        .bearer_auth(&wide)
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let own = response.headers()["content-location"]
        .to_str()
        .expect("ascii")
        .to_string();
    let response = server
        .client
        .get(&own)
        .bearer_auth(&narrow)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: Value = response.json().await.expect("json");
    assert!(
        diagnostics(&body).contains("does not cover Observation"),
        "{body}"
    );
    let response = server
        .client
        .get(&own)
        .bearer_auth(&wide)
        .send()
        .await
        .expect("sent");
    assert!(response.status().is_success(), "{}", response.status());
}

// Row 13: `*` never covers fhirbox's own types.

#[tokio::test]
async fn a_star_scope_does_not_read_clients_or_policies() {
    let tls = Tls::new();
    let key = SigningKey::es384();
    let server = smart_server(&tls, &key, "system/*.rs system/Client.rs", 0).await;
    let star = access_token(&server, "reader", &key, "system/*.rs").await;
    for path in [
        "/Client/reader",
        "/AccessPolicy/reader-may",
        "/Attribute",
        "/fhir/Client/reader",
    ] {
        let (status, body) = server
            .send(with_token(&server, Method::GET, path, &star))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
    }
    let (status, _) = server
        .send(with_token(&server, Method::GET, "/Patient", &star))
        .await;
    assert_eq!(status, StatusCode::OK);
    // A scope that names Client, registered and asked for, reads Clients.
    let named = access_token(&server, "reader", &key, "system/Client.rs").await;
    let (status, body) = server
        .send(with_token(&server, Method::GET, "/Client/reader", &named))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("secret").is_none());
}

// Row 5: the token endpoint's audience is the configured base URL, never `Host`.

#[tokio::test]
async fn an_assertion_for_another_host_gets_no_token_whatever_host_says() {
    let tls = Tls::new();
    let key = SigningKey::es384();
    let server = smart_server(&tls, &key, "system/*.rs", 0).await;
    let evil = key.assertion("reader", "https://evil.example/auth/token", 120);
    let response = server
        .client
        .post(server.url("/auth/token"))
        .header("host", "evil.example")
        .form(&[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", evil.as_str()),
            ("scope", "system/*.rs"),
        ])
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "invalid_client", "{body}");
}

#[tokio::test]
async fn without_a_base_url_the_token_endpoint_says_it_needs_one() {
    let database = common::fresh_database().await;
    let url = common::cluster().url(&database);
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().to_str().expect("utf-8").to_string();
    // Listening on every address: no one address to be the public base either.
    let server = common::process::ServerProcess::start(&[
        "--listen",
        "0.0.0.0:0",
        "--database-url",
        &url,
        "--data-dir",
        &data,
        "--admin-password",
        "root-pw",
    ]);
    assert!(
        server.log().iter().any(|l| l.contains("no --base-url")),
        "a warning at start-up"
    );
    let response = common::http_client()
        .post(format!("{}/auth/token", server.base))
        .header("host", "evil.example")
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect("sent");
    let body: Value = response.json().await.expect("json");
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| d.contains("--base-url")),
        "{body}"
    );
}

// Row 9: a JWK Set fetched over https never continues over plain http.

#[tokio::test]
async fn a_jwks_uri_redirecting_to_plain_http_is_refused() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let tls = Tls::new();
    let key = SigningKey::es384();
    // The JWK Set in clear, counting who reads it.
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let set = jwks(&[&key]).to_string();
    let plain = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            let set = set.clone();
            async move { set }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let plain_url = format!(
        "http://{}/jwks.json",
        listener.local_addr().expect("address")
    );
    tokio::spawn(async move { axum::serve(listener, plain).await });
    let redirect = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let to = plain_url.clone();
            async move { axum::response::Redirect::temporary(&to) }
        }),
    );
    let base = common::smart::https_app(&tls, redirect).await;
    let server = https_server(&tls, |_| {}).await;
    register(
        &server,
        "hosted",
        json!({"grant_types": ["client_credentials"], "scope": ["system/*.rs"], "jwks_uri": format!("{base}/jwks.json")}),
    )
    .await;
    let assertion = key.assertion("hosted", &common::smart::token_url(&server), 120);
    let (status, body) = common::smart::token_with(&server, &assertion, "system/*.rs").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the JWK Set never travelled in clear"
    );
}

// Row 10: throttled per address and per client, one answer for every failure, bounded and
// shared JWK fetches.

#[tokio::test(flavor = "multi_thread")]
async fn one_address_failing_does_not_slow_other_clients() {
    let tls = Tls::new();
    let key = SigningKey::es384();
    let server = smart_server(&tls, &key, "system/*.rs", 0).await;
    let url = common::smart::token_url(&server);
    let stranger = SigningKey::es384();
    let attacker = common::smart::client_from(&tls, "127.0.0.3");
    for _ in 0..28 {
        let forged = stranger.assertion("reader", &url, 60);
        let _ = attacker
            .post(&url)
            .form(&[
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", forged.as_str()),
                ("scope", "system/*.rs"),
            ])
            .send()
            .await
            .expect("sent");
    }
    // Another client, from another address.
    register(
        &server,
        "bystander",
        json!({"grant_types": ["client_credentials"], "jwks": jwks(&[&key]), "scope": "system/*.rs"}),
    )
    .await;
    let started = Instant::now();
    let response = common::smart::client_from(&tls, "127.0.0.4")
        .post(&url)
        .form(&[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            (
                "client_assertion",
                key.assertion("bystander", &url, 60).as_str(),
            ),
            ("scope", "system/*.rs"),
        ])
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn every_refused_assertion_gets_the_same_answer() {
    let tls = Tls::new();
    let key = SigningKey::es384();
    let server = smart_server(&tls, &key, "system/*.rs", 0).await;
    register(
        &server,
        "basic-only",
        json!({"grant_types": ["basic"], "secret": "s", "jwks": jwks(&[&key])}),
    )
    .await;
    let url = common::smart::token_url(&server);
    let stranger = SigningKey::es384();
    let mut answers = Vec::new();
    for assertion in [
        stranger.assertion("reader", &url, 60),
        key.assertion("nobody", &url, 60),
        key.assertion("basic-only", &url, 60),
    ] {
        let (status, body) = common::smart::token_with(&server, &assertion, "system/*.rs").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(!body.to_string().contains(&key.kid), "no kid named: {body}");
        answers.push(body);
    }
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
}

/// An HTTPS JWK Set server that answers after `delay` (or trickles forever), counting hits.
async fn jwks_server(
    tls: &Tls,
    key: &SigningKey,
    trickle: bool,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let set = jwks(&[key]).to_string();
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            let set = set.clone();
            async move {
                let body = if trickle {
                    // One byte a second, for ever.
                    let bytes = futures_util::stream::unfold((), |()| async {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        Some((Ok::<_, std::io::Error>(bytes::Bytes::from_static(b" ")), ()))
                    });
                    axum::body::Body::from_stream(bytes)
                } else {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    axum::body::Body::from(set)
                };
                (
                    [
                        ("content-type", "application/json"),
                        ("cache-control", "max-age=60"),
                    ],
                    body,
                )
            }
        }),
    );
    let base = common::smart::https_app(tls, app).await;
    (format!("{base}/jwks.json"), hits)
}

#[tokio::test(flavor = "multi_thread")]
async fn jwk_fetches_have_a_deadline_and_are_shared() {
    use std::sync::atomic::Ordering;
    let tls = Tls::new();
    let key = SigningKey::es384();
    let server = https_server(&tls, |_| {}).await;
    let url = common::smart::token_url(&server);
    // A trickling JWK server does not hold a token request for long.
    let (slow_uri, _) = jwks_server(&tls, &key, true).await;
    register(&server, "trickler", json!({"grant_types": ["client_credentials"], "scope": ["system/*.rs"], "jwks_uri": slow_uri})).await;
    let started = Instant::now();
    let (status, _) =
        common::smart::token_with(&server, &key.assertion("trickler", &url, 60), "system/*.rs")
            .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // Eight token requests at once make one fetch.
    let (uri, hits) = jwks_server(&tls, &key, false).await;
    register(
        &server,
        "hosted",
        json!({"grant_types": ["client_credentials"], "scope": ["system/*.rs"], "jwks_uri": uri}),
    )
    .await;
    let requests = (0..8).map(|_| {
        let assertion = key.assertion("hosted", &url, 60);
        let server = &server;
        async move {
            common::smart::token_with(server, &assertion, "system/*.rs")
                .await
                .0
        }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

// Row 11: tokens and assertions from the future, and tokens of a Client that changed.

#[tokio::test]
async fn assertions_from_the_future_are_refused() {
    let tls = Tls::new();
    let key = SigningKey::es384();
    let server = smart_server(&tls, &key, "system/*.rs", 0).await;
    let url = common::smart::token_url(&server);
    let now = chrono::Utc::now().timestamp();
    for (what, extra) in [
        ("nbf", json!({"nbf": now + 200})),
        ("iat", json!({"iat": now + 10_000})),
    ] {
        let mut claims = json!({"iss": "reader", "sub": "reader", "aud": url, "exp": now + 120,
                                "jti": uuid::Uuid::new_v4().to_string()});
        claims[what] = extra[what].clone();
        let (status, body) =
            common::smart::token_with(&server, &key.sign(&claims), "system/*.rs").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
    }
}

#[tokio::test]
async fn a_token_dies_when_its_client_changes() {
    let tls = Tls::new();
    let key = SigningKey::es384();
    let server = smart_server(&tls, &key, "system/*.rs", 0).await;
    let works = |token: String| {
        let request = with_token(&server, Method::GET, "/Patient", &token);
        async move { request.send().await.expect("sent").status() }
    };
    let client = |scope: &str, keys: Value| json!({"resourceType": "Client", "grant_types": ["client_credentials"], "jwks": keys, "scope": scope});
    // The scope narrowed.
    let token = access_token(&server, "reader", &key, "system/*.rs").await;
    assert_eq!(works(token.clone()).await, StatusCode::OK);
    let (status, _) = server
        .json(
            Method::PUT,
            "/Client/reader",
            &client("system/Patient.rs", jwks(&[&key])),
        )
        .await;
    assert!(status.is_success());
    assert_eq!(works(token).await, StatusCode::UNAUTHORIZED);
    // Its keys removed.
    let token = access_token(&server, "reader", &key, "system/Patient.rs").await;
    let (status, _) = server
        .json(
            Method::PUT,
            "/Client/reader",
            &client("system/Patient.rs", json!({"keys": []})),
        )
        .await;
    assert!(status.is_success());
    assert_eq!(works(token).await, StatusCode::UNAUTHORIZED);
    // Deleted and created again, the same.
    let (status, _) = server
        .json(
            Method::PUT,
            "/Client/reader",
            &client("system/Patient.rs", jwks(&[&key])),
        )
        .await;
    assert!(status.is_success());
    let token = access_token(&server, "reader", &key, "system/Patient.rs").await;
    assert_eq!(works(token.clone()).await, StatusCode::OK);
    assert_eq!(server.delete("/Client/reader").await.0, StatusCode::OK);
    let (status, _) = server
        .json(
            Method::PUT,
            "/Client/reader",
            &client("system/Patient.rs", jwks(&[&key])),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(works(token).await, StatusCode::UNAUTHORIZED);
}
