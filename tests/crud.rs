//! Single-resource REST over real HTTP: create, read, update, delete, history, search, the
//! `/fhir/` twin routes, YAML both ways, every error status, concurrent writers.

mod common;

use common::TestServer;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

#[tokio::test]
async fn health_needs_no_credentials() {
    let server = TestServer::start().await;
    let response = common::http_client()
        .get(server.url("/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn health_is_503_while_the_database_is_unreachable() {
    let mut config = tokio_postgres::Config::new();
    config
        .host_path("/nonexistent-fhirbox-socket-dir")
        .user("postgres")
        .connect_timeout(std::time::Duration::from_millis(200));
    let store = fhirbox::store::Store::new(config, 1).expect("pool");
    let server = TestServer::start_with(store, "none".into()).await;
    let response = common::http_client()
        .get(server.url("/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (status, outcome) = server.get("/Patient/x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{outcome}");
    assert_eq!(outcome["issue"][0]["code"], "transient");
}

#[tokio::test]
async fn every_other_request_needs_root_credentials() {
    let server = TestServer::start().await;
    for (path, user, password) in [
        ("/Patient/x", None, None),
        ("/Patient/x", Some("root"), Some("wrong")),
        ("/Patient/x", Some("nobody"), Some("test-root-password")),
        ("/no/such/route", None, None),
    ] {
        let mut request = server.client.get(server.url(path));
        if let Some(user) = user {
            request = request.basic_auth(user, password);
        }
        let response = request.send().await.expect("sent");
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{path} {user:?}"
        );
        let challenge = response
            .headers()
            .get("www-authenticate")
            .expect("challenge");
        assert!(challenge.to_str().unwrap_or_default().starts_with("Basic"));
        let outcome: Value = response.json().await.expect("outcome");
        assert_eq!(outcome["resourceType"], "OperationOutcome");
    }
    let (status, _) = server.get("/Patient/x").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "root gets past authentication"
    );
    // The CapabilityStatement is public: clients read it before they authenticate.
    for path in ["/fhir/metadata", "/metadata"] {
        let response = server
            .client
            .get(server.url(path))
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let response = server
        .client
        .post(server.url("/fhir/metadata"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn resource_lifecycle_keeps_every_version() {
    let server = TestServer::start().await;
    let patient = json!({"resourceType": "Patient", "id": "pt-1", "name": [{"given": ["Alice"]}]});
    let response = server
        .request(Method::POST, "/Patient")
        .json(&patient)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"]
        .to_str()
        .unwrap_or_default()
        .to_string();
    let etag = response.headers()["etag"]
        .to_str()
        .unwrap_or_default()
        .to_string();
    let created: Value = response.json().await.expect("json");
    let v1 = created["meta"]["versionId"]
        .as_i64()
        .expect("native versionId is a number");
    assert_eq!(created["id"], "pt-1", "the native API keeps the body's id");
    assert_eq!(created["name"], json!([{"given": ["Alice"]}]));
    assert!(
        location.ends_with(&format!("/Patient/pt-1/_history/{v1}")),
        "{location}"
    );
    assert_eq!(etag, format!("W/\"{v1}\""));
    let last_updated = created["meta"]["lastUpdated"].as_str().unwrap_or_default();
    assert_eq!(
        last_updated.len(),
        "2021-06-10T08:26:10.707454Z".len(),
        "{last_updated}"
    );
    assert_eq!(created["meta"]["createdAt"], created["meta"]["lastUpdated"]);

    let (status, read) = server.get("/Patient/pt-1").await;
    assert_eq!((status, &read), (StatusCode::OK, &created));

    let (status, again) = server.json(Method::POST, "/Patient", &patient).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");

    let updated_body = json!({"resourceType": "Patient", "id": "pt-1", "active": true,
                              "meta": {"versionId": "999", "tag": [{"code": "t"}]}});
    let (status, updated) = server
        .json(Method::PUT, "/Patient/pt-1", &updated_body)
        .await;
    assert_eq!(status, StatusCode::OK);
    let v2 = updated["meta"]["versionId"].as_i64().expect("versionId");
    assert!(v2 > v1);
    assert_eq!(
        updated["meta"]["tag"],
        json!([{"code": "t"}]),
        "other meta keys are kept"
    );
    assert_eq!(updated["meta"]["createdAt"], created["meta"]["createdAt"]);
    assert!(
        updated.get("name").is_none(),
        "an update replaces the whole resource"
    );

    let (status, old) = server.get(&format!("/Patient/pt-1/_history/{v1}")).await;
    assert_eq!((status, &old), (StatusCode::OK, &created));

    let (status, deleted) = server.delete("/Patient/pt-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(deleted["active"], true);
    let (status, gone) = server.get("/Patient/pt-1").await;
    assert_eq!(status, StatusCode::GONE, "{gone}");
    assert_eq!(gone["resourceType"], "OperationOutcome");
    let (status, _) = server.delete("/Patient/pt-1").await;
    assert_eq!(status, StatusCode::NO_CONTENT, "deleting again");

    let (status, history) = server.get("/Patient/pt-1/_history").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(history["type"], "history");
    let methods: Vec<&str> = history["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["request"]["method"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(methods, ["DELETE", "PUT", "POST"], "newest first");
    let deletion_version = history["entry"][0]["response"]["etag"].clone();
    assert!(history["entry"][0].get("resource").is_none());
    let deletion_vid = deletion_version
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("W/\"")
        .trim_end_matches('"')
        .to_string();
    let (status, _) = server
        .get(&format!("/Patient/pt-1/_history/{deletion_vid}"))
        .await;
    assert_eq!(status, StatusCode::GONE);

    let (status, recreated) = server.json(Method::PUT, "/Patient/pt-1", &patient).await;
    assert_eq!(status, StatusCode::CREATED, "{recreated}");
    let db = server.db().await;
    let row = db
        .query_one("SELECT status FROM patient WHERE id = 'pt-1'", &[])
        .await
        .expect("row");
    assert_eq!(row.get::<_, String>(0), "recreated");
    let row = db
        .query_one("SELECT resource FROM patient WHERE id = 'pt-1'", &[])
        .await
        .expect("row");
    assert_eq!(
        row.get::<_, Value>(0),
        json!({"name": [{"given": ["Alice"]}]}),
        "stored without id, resourceType and server meta"
    );
}

#[tokio::test]
async fn post_without_id_gets_one_and_fhir_post_ignores_the_body_id() {
    let server = TestServer::start().await;
    let (status, created) = server
        .json(Method::POST, "/Patient", &json!({"active": true}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(created["resourceType"], "Patient");
    let id = created["id"].as_str().expect("id").to_string();
    assert_eq!(id.len(), 36, "a UUID");

    let (status, fhir) = server
        .json(
            Method::POST,
            "/fhir/Patient",
            &json!({"resourceType": "Patient", "id": "mine"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_ne!(fhir["id"], "mine", "FHIR create assigns the id");
    let (status, _) = server
        .get(&format!(
            "/fhir/Patient/{}",
            fhir["id"].as_str().unwrap_or_default()
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn errors_are_operation_outcomes_with_the_right_status() {
    let server = TestServer::start().await;
    let patient = json!({"resourceType": "Patient"});
    let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (server.request(Method::GET, "/Foo/1"), StatusCode::NOT_FOUND, "unknown resource type 'Foo'"),
        (server.request(Method::POST, "/Foo").json(&patient), StatusCode::NOT_FOUND, "unknown resource type"),
        (server.request(Method::GET, "/Patient/nope"), StatusCode::NOT_FOUND, "Patient/nope not found"),
        (server.request(Method::GET, "/Patient/nope/_history"), StatusCode::NOT_FOUND, "not found"),
        (server.request(Method::GET, "/Patient/nope/_history/abc"), StatusCode::NOT_FOUND, "not found"),
        (
            server.request(Method::PUT, "/Patient/a").json(&json!({"resourceType": "Observation"})),
            StatusCode::BAD_REQUEST,
            "does not match the URL",
        ),
        (
            server.request(Method::PUT, "/Patient/a").json(&json!({"resourceType": "Patient", "id": "b"})),
            StatusCode::BAD_REQUEST,
            "the body's id 'b' does not match the URL's 'a'",
        ),
        (
            server.request(Method::PUT, "/Patient/a%20b").json(&patient),
            StatusCode::BAD_REQUEST,
            "is not a valid id",
        ),
        (
            server.request(Method::POST, "/Patient").json(&json!(["not", "an", "object"])),
            StatusCode::BAD_REQUEST,
            "must be a JSON object",
        ),
        (
            server
                .request(Method::POST, "/Patient")
                .header("content-type", "application/json")
                .body("{\n  \"resourceType\": \"Patient\",\n  \"active\": tru,\n  \"gender\": \"other\"\n}"),
            StatusCode::BAD_REQUEST,
            "malformed JSON at line 3 column",
        ),
        (
            server
                .request(Method::POST, "/Patient")
                .header("content-type", "application/yaml")
                .body("resourceType: Patient\nname: [unclosed\nactive: true\n"),
            StatusCode::BAD_REQUEST,
            "malformed YAML at line",
        ),
        (
            server
                .request(Method::POST, "/Patient")
                .header("content-type", "application/json")
                .body(""),
            StatusCode::BAD_REQUEST,
            "empty",
        ),
        (
            server
                .request(Method::POST, "/Patient")
                .header("content-type", "text/plain")
                .body("hello"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported Content-Type 'text/plain'",
        ),
        (
            server
                .request(Method::POST, "/Patient")
                .header("content-type", "application/json")
                .body(format!("{{\"resourceType\": \"Patient\", \"text\": \"{}\"}}", "x".repeat(2 * 1024 * 1024))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "larger than the limit",
        ),
        (server.request(Method::PATCH, "/Patient/a").json(&patient), StatusCode::METHOD_NOT_ALLOWED, "PATCH is not allowed"),
        (server.request(Method::DELETE, "/Patient"), StatusCode::BAD_REQUEST, "a conditional delete without a search"),
        (server.request(Method::GET, "/a/b/c/d/e"), StatusCode::NOT_FOUND, "no route"),
        (server.request(Method::GET, "/Patient?_count=-1"), StatusCode::BAD_REQUEST, "_count must be"),
        (server.request(Method::GET, "/Patient?shoe-size=x").header("prefer", "handling=strict"), StatusCode::BAD_REQUEST, "no search parameter 'shoe-size'"),
        (server.request(Method::GET, "/Patient?name:in=x"), StatusCode::BAD_REQUEST, "a modifier not searched yet"),
        (server.request(Method::GET, "/Patient?birthdate=yesterday"), StatusCode::BAD_REQUEST, "not a date"),
        (server.request(Method::GET, "/Patient/a?_format=xml"), StatusCode::BAD_REQUEST, "unsupported _format"),
    ];
    let mut answers = Vec::new();
    for (request, expected, message) in cases {
        let built = request.build().expect("a request");
        let label = format!("{} {}", built.method(), built.url().path());
        let (status, outcome) = server
            .send(reqwest::RequestBuilder::from_parts(
                server.client.clone(),
                built,
            ))
            .await;
        assert_eq!(status, expected, "{message}: {outcome}");
        answers.push(common::answer(&label, status, &outcome));
    }
    insta::assert_snapshot!(common::pretty(&answers));
    assert_eq!(server.count("patient").await, 0, "no error wrote anything");
}

#[tokio::test]
async fn yaml_in_and_out() {
    let server = TestServer::start().await;
    let (status, created) = server
        .yaml(
            Method::PUT,
            "/Patient/y1",
            "resourceType: Patient\nid: y1\nactive: yes\nname:\n  - given: [Ann]\nmultipleBirthInteger: 2\n",
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        created["active"], "yes",
        "YAML 1.2 booleans: 'yes' is a string"
    );
    assert_eq!(created["multipleBirthInteger"], 2);

    for request in [
        server
            .request(Method::GET, "/Patient/y1")
            .header("accept", "text/yaml"),
        server.request(Method::GET, "/Patient/y1?_format=yaml"),
    ] {
        let response = request.send().await.expect("sent");
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .starts_with("text/yaml"));
        let text = response.text().await.expect("text");
        assert!(text.contains("resourceType: Patient\nid: y1\n"), "{text}");
        let parsed: Value = serde_saphyr::from_str(&text).expect("valid YAML");
        assert_eq!(parsed["name"][0]["given"][0], "Ann");
        assert_eq!(parsed["meta"]["versionId"], created["meta"]["versionId"]);
    }
}

#[tokio::test]
async fn search_pages_by_id_with_next_links() {
    let server = TestServer::start().await;
    for i in 0..7 {
        let (status, _) = server
            .json(
                Method::PUT,
                &format!("/Patient/p{i}"),
                &json!({"active": true}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let mut url = server.url("/Patient?_count=3");
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let (status, bundle) = server
            .send(
                server
                    .client
                    .get(&url)
                    .basic_auth("root", Some(common::ROOT_PASSWORD)),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(bundle["type"], "searchset");
        pages += 1;
        for entry in bundle["entry"].as_array().expect("entries") {
            seen.push(
                entry["resource"]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
        // A write between pages must not shift the paging.
        server
            .json(Method::PUT, "/Patient/a-first", &json!({}))
            .await;
        let next = bundle["link"]
            .as_array()
            .and_then(|links| links.iter().find(|l| l["relation"] == "next"))
            .and_then(|l| l["url"].as_str())
            .map(str::to_string);
        match next {
            Some(next) => url = next,
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ["p0", "p1", "p2", "p3", "p4", "p5", "p6"]);

    // Unknown parameters are ignored by default (and with `handling=lenient`), and the
    // Bundle says so in an OperationOutcome entry; `handling=strict` refuses them.
    for prefer in [None, Some("handling=lenient")] {
        let mut request = server.request(Method::GET, "/Patient?shoe-size=x&_count=1");
        if let Some(prefer) = prefer {
            request = request.header("prefer", prefer);
        }
        let (status, lenient) = server.send(request).await;
        assert_eq!(status, StatusCode::OK);
        let entries = lenient["entry"].as_array().cloned().unwrap_or_default();
        let modes: Vec<&str> = entries
            .iter()
            .filter_map(|e| e["search"]["mode"].as_str())
            .collect();
        assert_eq!(modes, ["match", "outcome"], "{lenient}");
        let issue = &entries[1]["resource"]["issue"][0];
        assert_eq!(issue["expression"][0], "shoe-size", "{lenient}");
        assert_eq!(issue["severity"], "warning", "{lenient}");
        let next = lenient["link"][1]["url"].as_str().unwrap_or_default();
        assert!(
            !next.contains("shoe-size"),
            "ignored, so not in the links: {next}"
        );
    }
    let (status, strict) = server
        .send(
            server
                .request(Method::GET, "/Patient?shoe-size=x")
                .header("prefer", "handling=strict"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{strict}");
}

#[tokio::test]
async fn search_by_id_and_last_updated() {
    let server = TestServer::start().await;
    for id in ["a", "b", "c"] {
        server
            .json(Method::PUT, &format!("/Patient/{id}"), &json!({}))
            .await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let between = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    server
        .json(Method::PUT, "/Patient/b", &json!({"active": true}))
        .await;
    let ids = |bundle: &serde_json::Value| -> Vec<String> {
        bundle["entry"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|e| e["resource"]["id"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let (status, bundle) = server.get("/fhir/Patient?_id=a,c,zz").await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(ids(&bundle), ["a", "c"]);
    let query = |prefix: &str| {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("_lastUpdated", &format!("{prefix}{between}"))
            .finish()
    };
    let (_, bundle) = server.get(&format!("/Patient?{}", query("gt"))).await;
    assert_eq!(ids(&bundle), ["b"]);
    let (_, bundle) = server
        .get(&format!("/Patient?{}&_id=a,b", query("lt")))
        .await;
    assert_eq!(ids(&bundle), ["a"]);
    // The filter stays on the next page's link.
    let (_, bundle) = server.get("/Patient?_id=a,b,c&_count=1").await;
    let next = bundle["link"][1]["url"].as_str().expect("next").to_string();
    assert!(next.contains("_id=a%2Cb%2Cc"), "{next}");
    let (status, outcome) = server.get("/Patient?_lastUpdated=yesterday").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
}

#[tokio::test]
async fn fhir_routes_and_capability_statement() {
    let server = TestServer::start().await;
    let response = server
        .request(Method::PUT, "/fhir/Patient/f1")
        .header("content-type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient","id":"f1","birthDate":"1970-01-01"}"#)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::CREATED);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap_or_default()
        .starts_with("application/fhir+json"));
    assert!(response.headers()["location"]
        .to_str()
        .unwrap_or_default()
        .contains("/fhir/Patient/f1/_history/"));
    let (status, read) = server.get("/Patient/f1").await;
    assert_eq!(
        (status, &read["birthDate"]),
        (StatusCode::OK, &json!("1970-01-01"))
    );

    let (status, capability) = server.get("/fhir/metadata").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(capability["resourceType"], "CapabilityStatement");
    assert_eq!(capability["fhirVersion"], "4.0.1");
    let resources = capability["rest"][0]["resource"]
        .as_array()
        .expect("resources");
    let patient = resources
        .iter()
        .find(|r| r["type"] == "Patient")
        .expect("Patient listed");
    // What bulk clients look for: the export operations, and _lastUpdated search.
    assert_eq!(patient["operation"][0]["name"], "export");
    assert_eq!(capability["rest"][0]["operation"][0]["name"], "export");
    assert!(patient["searchParam"]
        .as_array()
        .expect("searchParam")
        .iter()
        .any(|p| p["name"] == "_lastUpdated"));
    let codes: Vec<&str> = patient["interaction"]
        .as_array()
        .expect("interactions")
        .iter()
        .filter_map(|i| i["code"].as_str())
        .collect();
    for code in [
        "read",
        "vread",
        "update",
        "delete",
        "history-instance",
        "create",
        "search-type",
    ] {
        assert!(codes.contains(&code), "{code}");
    }
    assert!(resources.len() > 140);
    assert!(
        !resources.iter().any(|r| r["type"] == "Client"),
        "fhirbox's own types are not FHIR"
    );
}

#[tokio::test]
async fn percent_encoded_paths_are_the_same_request() {
    let server = TestServer::start().await;
    server.json(Method::PUT, "/Patient/pt-1", &json!({})).await;
    let (status, found) = server.get("/%50atient/pt%2D1").await;
    assert_eq!((status, &found["id"]), (StatusCode::OK, &json!("pt-1")));
    assert_eq!(
        server.raw_get("/%50atient/%24everything").await,
        404,
        "decoded before routing"
    );
    for tricky in [
        "/Patient%2Fpt-1",
        "/Patient/../Client/x",
        "/Patient/%2e%2e/Client/x",
        "/Patient/./pt-1",
        "//Patient/pt-1",
    ] {
        assert_eq!(server.raw_get(tricky).await, 400, "{tricky}");
    }
}

#[tokio::test]
async fn concurrent_updates_of_one_resource_keep_every_version() {
    let server = TestServer::start().await;
    const WRITERS: usize = 24;
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let client = server.client.clone();
        let url = server.url("/Patient/hot");
        tasks.push(tokio::spawn(async move {
            let response = client
                .put(url)
                .basic_auth("root", Some(common::ROOT_PASSWORD))
                .json(&json!({"resourceType": "Patient", "id": "hot", "multipleBirthInteger": writer}))
                .send()
                .await
                .expect("sent");
            response.status()
        }));
    }
    let mut created = 0;
    for task in tasks {
        let status = task.await.expect("task");
        assert!(
            status == StatusCode::OK || status == StatusCode::CREATED,
            "{status}"
        );
        created += usize::from(status == StatusCode::CREATED);
    }
    assert_eq!(created, 1, "exactly one writer created it");
    let db = server.db().await;
    let rows = db
        .query(
            "SELECT txid, resource->>'multipleBirthInteger' FROM patient WHERE id = 'hot'
             UNION ALL SELECT txid, resource->>'multipleBirthInteger' FROM patient_history WHERE id = 'hot'",
            &[],
        )
        .await
        .expect("versions");
    assert_eq!(rows.len(), WRITERS, "every version is kept");
    let mut writers: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
    writers.sort();
    writers.dedup();
    assert_eq!(
        writers.len(),
        WRITERS,
        "each writer's version is there once"
    );
    let mut txids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    txids.sort();
    txids.dedup();
    assert_eq!(txids.len(), WRITERS, "distinct version ids");
    let (_, history) = server.get("/Patient/hot/_history").await;
    assert_eq!(history["total"], WRITERS);
}
