//! Clients, basic auth and AccessPolicy: the seed's bulk-client policy works exactly, every
//! engine, secrets never shown, changes take effect at once, everything else is denied.

mod common;

use common::{diagnostics, seed, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// The seed's client and policy (as root), and its sample data.
async fn seeded() -> TestServer {
    let server = TestServer::start().await;
    let (status, body) = server
        .yaml(Method::PUT, "/", &seed("put-client-and-policy.yaml"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = server
        .yaml(Method::POST, "/", &seed("post-sample-data-bundle.yaml"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server
}

/// A request as `user:password`.
fn as_client(
    server: &TestServer,
    method: Method,
    path: &str,
    user: &str,
    password: &str,
) -> reqwest::RequestBuilder {
    server
        .client
        .request(method, server.url(path))
        .basic_auth(user, Some(password))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Allowed by the policy: the handler answers (any status but 401/403).
    Allowed,
    /// Allowed, and with this status.
    Status(u16),
    Denied,
}

#[tokio::test]
async fn the_seeds_bulk_client_policy_table() {
    let server = seeded().await;
    let load_body = json!({"source": "http://127.0.0.1:1/nothing.ndjson"});
    let import_body = json!({"inputFormat": "application/fhir+ndjson", "inputs": []});
    let sql_yaml = "query: select id, resource#>>'{name,0,given,0}' from patient\n";
    let cases: Vec<(Method, &str, Option<Value>, Expect)> = vec![
        // Every allowed form in the seed.
        (Method::POST, "/$dump-sql", None, Expect::Status(200)),
        (
            Method::POST,
            "/$dump-sql?_format=ndjson",
            None,
            Expect::Status(200),
        ),
        (Method::GET, "/Patient/$dump", None, Expect::Status(200)),
        (
            Method::GET,
            "/Patient/$dump?fhir=true&gzip=true",
            None,
            Expect::Status(200),
        ),
        (Method::GET, "/Appointment/$dump", None, Expect::Status(200)),
        (
            Method::GET,
            "/fhir/Patient/$dump",
            None,
            Expect::Status(200),
        ),
        (Method::GET, "/Patient/$dump-csv", None, Expect::Status(200)),
        (
            Method::GET,
            "/Appointment/$dump-csv?gzip=true",
            None,
            Expect::Status(200),
        ),
        (
            Method::POST,
            "/$import",
            Some(import_body.clone()),
            Expect::Allowed,
        ),
        (
            Method::POST,
            "/fhir/$import",
            Some(import_body.clone()),
            Expect::Allowed,
        ),
        (
            Method::POST,
            "/$load",
            Some(load_body.clone()),
            Expect::Allowed,
        ),
        (
            Method::POST,
            "/fhir/$load",
            Some(load_body.clone()),
            Expect::Allowed,
        ),
        (
            Method::POST,
            "/Patient/$load",
            Some(load_body.clone()),
            Expect::Allowed,
        ),
        (
            Method::POST,
            "/fhir/Patient/$load",
            Some(load_body.clone()),
            Expect::Allowed,
        ),
        // The $load branch names no method: the policy lets any through, routing says 405.
        (
            Method::PUT,
            "/Patient/$load",
            Some(load_body.clone()),
            Expect::Status(405),
        ),
        // Denied.
        (Method::GET, "/Patient/pt-1", None, Expect::Denied),
        (Method::GET, "/fhir/Patient/pt-1", None, Expect::Denied),
        (Method::DELETE, "/Patient/pt-1", None, Expect::Denied),
        (
            Method::PUT,
            "/Patient/pt-1",
            Some(json!({})),
            Expect::Denied,
        ),
        (Method::GET, "/Patient", None, Expect::Denied),
        (Method::PUT, "/", Some(json!([])), Expect::Denied),
        (
            Method::POST,
            "/",
            Some(json!({"type": "batch", "entry": []})),
            Expect::Denied,
        ),
        (Method::GET, "/Client/bulk-client", None, Expect::Denied),
        (
            Method::GET,
            "/AccessPolicy/bulk-client-dump",
            None,
            Expect::Denied,
        ),
        // Someone else's job (or none): the 404 of a job that does not exist.
        (
            Method::GET,
            "/BulkImportStatus/x",
            None,
            Expect::Status(404),
        ),
        (Method::GET, "/fhir/metadata", None, Expect::Status(200)),
        (Method::POST, "/Patient/$dump", None, Expect::Denied),
        (Method::GET, "/$dump-sql", None, Expect::Denied),
        (Method::POST, "/$dump-sql/extra", None, Expect::Denied),
        (Method::GET, "/Patient/$dump/extra", None, Expect::Denied),
        (Method::GET, "/Patient/$dump/../pt-1", None, Expect::Denied),
        (Method::GET, "/Patient/$dumpx", None, Expect::Denied),
        (Method::GET, "/Patient/x$dump", None, Expect::Denied),
        (Method::GET, "/Patient/$dump-csv/x", None, Expect::Denied),
        (
            Method::POST,
            "/$import/x",
            Some(import_body.clone()),
            Expect::Denied,
        ),
        (Method::GET, "/$import", None, Expect::Denied),
        (Method::POST, "/Patient", Some(json!({})), Expect::Denied),
    ];
    assert!(cases.len() >= 30);
    let mut denials = Vec::new();
    for (method, path, body, expect) in cases {
        let mut request = as_client(&server, method.clone(), path, "bulk-client", "secret");
        request = match (path, body) {
            (p, None) if p.starts_with("/$dump-sql") && method == Method::POST => request
                .header("content-type", "application/yaml")
                .body(sql_yaml),
            (_, Some(body)) => request.json(&body),
            (_, None) => request,
        };
        let response = request.send().await.expect("sent");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        match expect {
            Expect::Allowed => assert!(
                status != 401 && status != 403,
                "{method} {path} should pass the policy: {status} {text}"
            ),
            Expect::Status(code) => assert_eq!(status, code, "{method} {path}: {text}"),
            Expect::Denied => {
                assert_eq!(status, 403, "{method} {path} should be denied: {text}");
                let outcome: Value = serde_json::from_str(&text).expect("an OperationOutcome");
                let status = StatusCode::from_u16(status).expect("a status");
                denials.push(common::answer(
                    &format!("{method} {path}"),
                    status,
                    &outcome,
                ));
            }
        }
    }
    insta::assert_snapshot!(common::pretty(&denials));
    // Encodings and dot tricks: the same request for routing and for the policy.
    assert_eq!(
        raw(&server, "GET", "/Patient/%24dump").await,
        200,
        "%24dump is $dump"
    );
    assert_eq!(raw(&server, "GET", "/%50atient/%24dump").await, 200);
    for tricky in [
        "/Patient/%24dump%2F..%2Fpt-1",
        "/Patient/..%2Fpt-1",
        "/Patient/$dump/..",
        "/x/../Patient/pt-1",
        "/Patient/%2e%2e/Client/bulk-client",
    ] {
        let status = raw(&server, "GET", tricky).await;
        assert!(status == 400 || status == 403, "{tricky}: {status}");
    }
    assert_eq!(
        raw(&server, "GET", "/Patient/$dump%3Fx=1").await,
        403,
        "an encoded ? is part of the path"
    );
}

/// A raw request as bulk-client (HTTP clients resolve `..` and `%2e` themselves).
async fn raw(server: &TestServer, method: &str, path: &str) -> u16 {
    use base64::Engine as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = server.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let credentials = base64::engine::general_purpose::STANDARD.encode("bulk-client:secret");
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Basic {credentials}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    String::from_utf8_lossy(&response)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn credentials() {
    let server = seeded().await;
    for (user, password) in [
        ("bulk-client", "wrong"),
        ("nobody", "secret"),
        ("bulk-client", ""),
    ] {
        let response = as_client(&server, Method::GET, "/Patient/$dump", user, password)
            .send()
            .await
            .expect("sent");
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{user}:{password}"
        );
        // Basic credentials or a bearer token (RFC 6750): both are offered.
        let challenges: Vec<&str> = response
            .headers()
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert!(
            challenges.iter().any(|c| c.starts_with("Basic ")),
            "{challenges:?}"
        );
        assert!(
            challenges.iter().any(|c| c.starts_with("Bearer ")),
            "{challenges:?}"
        );
    }
    // The seed's Authorization header, as written.
    let response = server
        .client
        .get(server.url("/Patient/$dump"))
        .header("authorization", "Basic YnVsay1jbGllbnQ6c2VjcmV0")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);

    // The secret is never shown, nor stored in the resource.
    let (_, client) = server.get("/Client/bulk-client").await;
    assert!(client.get("secret").is_none(), "{client}");
    assert_eq!(client["grant_types"], json!(["basic"]));
    let (_, history) = server.get("/Client/bulk-client/_history").await;
    assert!(!history.to_string().contains("secret\""), "{history}");
    let dump = server
        .request(Method::GET, "/Client/$dump")
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("body");
    assert!(
        !dump.contains("secret") && !dump.contains("argon2"),
        "{dump}"
    );
    let stored: Value = server
        .db()
        .await
        .query_one("SELECT resource FROM client WHERE id = 'bulk-client'", &[])
        .await
        .expect("row")
        .get(0);
    assert!(stored.get("secret").is_none());
    let hash: String = server
        .db()
        .await
        .query_one(
            "SELECT hash FROM fhirbox_client_secret WHERE id = 'bulk-client'",
            &[],
        )
        .await
        .expect("row")
        .get(0);
    assert!(hash.starts_with("$argon2id$"), "{hash}");

    // Writing the Client back without its secret keeps the secret; a new one replaces it at
    // once (the cached verification of the old one is not used).
    let (status, _) = server
        .json(Method::PUT, "/Client/bulk-client", &client)
        .await;
    assert_eq!(status, StatusCode::OK);
    let status = as_client(
        &server,
        Method::GET,
        "/Patient/$dump",
        "bulk-client",
        "secret",
    )
    .send()
    .await
    .expect("sent")
    .status();
    assert_eq!(status, StatusCode::OK, "the secret survived the update");
    let mut changed = client.clone();
    changed["secret"] = json!("new-secret");
    server
        .json(Method::PUT, "/Client/bulk-client", &changed)
        .await;
    let old = as_client(
        &server,
        Method::GET,
        "/Patient/$dump",
        "bulk-client",
        "secret",
    )
    .send()
    .await
    .expect("sent")
    .status();
    assert_eq!(old, StatusCode::UNAUTHORIZED);
    let new = as_client(
        &server,
        Method::GET,
        "/Patient/$dump",
        "bulk-client",
        "new-secret",
    )
    .send()
    .await
    .expect("sent")
    .status();
    assert_eq!(new, StatusCode::OK);
    // Without the basic grant, or deleted: no more access.
    changed["grant_types"] = json!(["client_credentials"]);
    changed.as_object_mut().map(|c| c.remove("secret"));
    server
        .json(Method::PUT, "/Client/bulk-client", &changed)
        .await;
    let status = as_client(
        &server,
        Method::GET,
        "/Patient/$dump",
        "bulk-client",
        "new-secret",
    )
    .send()
    .await
    .expect("sent")
    .status();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    server.delete("/Client/bulk-client").await;
    let count: i64 = server
        .db()
        .await
        .query_one("SELECT count(*) FROM fhirbox_client_secret", &[])
        .await
        .expect("row")
        .get(0);
    assert_eq!(count, 0, "a deleted Client's secret is gone");

    // Clients and policies cannot come in through a bulk load.
    let (status, outcome) = server
        .json(Method::POST, "/$load", &json!({"source": format!("file://{}/load/client.ndjson", common::fixtures_dir().display())}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{outcome}");
    let answer = common::answer("POST /$load client.ndjson", status, &outcome);
    insta::assert_snapshot!(common::pretty(&answer));
}

#[tokio::test]
async fn engines_links_and_changes_at_once() {
    let server = TestServer::start().await;
    server
        .json(
            Method::PUT,
            "/Client/c1",
            &json!({"secret": "s1", "grant_types": ["basic"]}),
        )
        .await;
    server
        .json(
            Method::PUT,
            "/Client/c2",
            &json!({"secret": "s2", "grant_types": ["basic"]}),
        )
        .await;
    server
        .json(Method::PUT, "/Patient/p1", &json!({"active": true}))
        .await;
    let get = |user: &'static str, password: &'static str, path: &'static str| {
        let request = as_client(&server, Method::GET, path, user, password);
        async move { request.send().await.expect("sent").status().as_u16() }
    };
    assert_eq!(
        get("c1", "s1", "/Patient/p1").await,
        403,
        "no policy: denied"
    );

    let put_policy = |id: &'static str, body: Value| {
        let request = server
            .request(Method::PUT, &format!("/AccessPolicy/{id}"))
            .json(&body);
        async move { request.send().await.expect("sent").status().as_u16() }
    };
    // A global json-schema policy (no link: every subject): reads of Patient.
    assert_eq!(
        put_policy("read-patients", json!({"engine": "json-schema", "schema": {
            "type": "object", "required": ["request-method", "params"],
            "properties": {"request-method": {"const": "get"}, "params": {"properties": {"resource/type": {"const": "Patient"}}, "required": ["resource/type"]}}
        }})).await,
        201
    );
    assert_eq!(
        get("c1", "s1", "/Patient/p1").await,
        200,
        "takes effect on the next request"
    );
    assert_eq!(
        get("c2", "s2", "/Patient/p1").await,
        200,
        "a policy without link is for everyone"
    );
    assert_eq!(get("c1", "s1", "/Observation/x").await, 403);

    // allow, linked to c2 only.
    assert_eq!(
        put_policy(
            "c2-all",
            json!({"engine": "allow", "link": [{"reference": "Client/c2"}]})
        )
        .await,
        201
    );
    assert_eq!(
        get("c2", "s2", "/Observation/x").await,
        404,
        "allowed; the resource is missing"
    );
    assert_eq!(get("c1", "s1", "/Observation/x").await, 403);

    // complex and sql: c1 may read its own Client only.
    assert_eq!(
        put_policy("own-client", json!({"engine": "complex", "link": [{"resourceType": "Client", "id": "c1"}], "and": [
            {"engine": "matcho", "matcho": {"request-method": "get", "params": {"resource/type": "Client"}}},
            {"engine": "sql", "sql": {"query": "SELECT {{params.resource/id}} = {{client.id}}"}}
        ]})).await,
        201
    );
    assert_eq!(get("c1", "s1", "/Client/c1").await, 200);
    assert_eq!(get("c1", "s1", "/Client/c2").await, 403);

    // A matcho policy on the body, and a .path reference.
    assert_eq!(
        put_policy("body", json!({"engine": "matcho", "link": [{"resourceType": "Client", "id": "c1"}],
            "matcho": {"request-method": "put", "body": {"id": ".params.resource/id", "active": true}}})).await,
        201
    );
    let put = |body: Value| {
        let request = as_client(&server, Method::PUT, "/Patient/p2", "c1", "s1").json(&body);
        async move { request.send().await.expect("sent").status().as_u16() }
    };
    assert_eq!(
        put(json!({"resourceType": "Patient", "id": "p2", "active": true})).await,
        201
    );
    assert_eq!(
        put(json!({"resourceType": "Patient", "id": "p2", "active": false})).await,
        403
    );
    assert_eq!(
        put(json!({"resourceType": "Patient", "active": true})).await,
        403,
        "a missing id never equals the path"
    );

    // Deleting a policy takes effect at once too.
    server.delete("/AccessPolicy/read-patients").await;
    assert_eq!(get("c1", "s1", "/Patient/p1").await, 403);
    assert_eq!(
        get("c2", "s2", "/Patient/p1").await,
        200,
        "c2 still has its allow policy"
    );
    // Root is always allowed.
    let (status, _) = server.get("/Patient/p1").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn malformed_policies_are_rejected_on_write() {
    let server = TestServer::start().await;
    let mut answers = Vec::new();
    for (body, expression, message) in [
        (
            json!({"engine": "matcho", "matcho": {"uri": "#[unclosed"}}),
            "AccessPolicy.matcho.uri",
            "bad regex",
        ),
        (
            json!({"engine": "teleport"}),
            "AccessPolicy.engine",
            "unknown engine 'teleport'",
        ),
        (
            json!({"engine": "matcho", "matcho": {"uri": {"$startsWith": "/"}}}),
            "AccessPolicy.matcho.uri.$startsWith",
            "unknown matcho operator",
        ),
        (
            json!({"engine": "sql", "sql": {"query": "select {{!x}}"}}),
            "AccessPolicy.sql.query",
            "identifier interpolation",
        ),
    ] {
        let (status, outcome) = server.json(Method::PUT, "/AccessPolicy/bad", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {outcome}");
        assert_eq!(
            outcome["issue"][0]["expression"],
            json!([expression]),
            "{outcome}"
        );
        assert!(diagnostics(&outcome).contains(message), "{outcome}");
        answers.push(common::answer(&body.to_string(), status, &outcome));
    }
    insta::assert_snapshot!(common::pretty(&answers));
    // The same check in a bundle: the whole transaction is refused.
    let (status, _) = server
        .json(
            Method::PUT,
            "/",
            &json!([{"resourceType": "AccessPolicy", "id": "x", "engine": "nope"}]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(server.count("accesspolicy").await, 0);
}

/// A page's script (the console) asks with `X-Requested-With: XMLHttpRequest`: a refusal is
/// the same 401 and OperationOutcome without the `Basic` challenge, which would make the
/// browser pop its own sign-in box over the page. Other clients keep both challenges.
#[tokio::test]
async fn scripted_requests_get_no_basic_challenge() {
    let server = seeded().await;
    let challenges = |response: &reqwest::Response| -> Vec<String> {
        response
            .headers()
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect()
    };
    for request in [
        as_client(
            &server,
            Method::GET,
            "/Patient/$dump",
            "bulk-client",
            "wrong",
        ),
        server.client.get(server.url("/fhir/Patient")),
    ] {
        let response = request
            .header("x-requested-with", "XMLHttpRequest")
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let offered = challenges(&response);
        assert!(
            offered
                .iter()
                .all(|c| !c.to_ascii_lowercase().starts_with("basic")),
            "{offered:?}"
        );
        assert!(
            offered.iter().any(|c| c.starts_with("Bearer ")),
            "{offered:?}"
        );
        let outcome: serde_json::Value = response.json().await.expect("an OperationOutcome");
        assert_eq!(outcome["resourceType"], "OperationOutcome");
    }
    // The right credentials from a script: answered as from anyone.
    let response = as_client(
        &server,
        Method::GET,
        "/Patient/$dump",
        "bulk-client",
        "secret",
    )
    .header("x-requested-with", "XMLHttpRequest")
    .send()
    .await
    .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    // Without the header: both challenges, as before.
    let response = server
        .client
        .get(server.url("/fhir/Patient"))
        .send()
        .await
        .expect("sent");
    assert!(challenges(&response)
        .iter()
        .any(|c| c.starts_with("Basic ")));
}
