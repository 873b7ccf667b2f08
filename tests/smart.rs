//! SMART Backend Services over HTTPS, as production bulk clients connect: discovery, the token
//! endpoint with RS384 and ES384 assertions (and everything it must refuse), bearer tokens
//! on the API with scopes narrowing AccessPolicies, `$export` with a token, a `jwks_uri`
//! client. Keys and certificates are made by the tests.

mod common;

use std::time::Duration;

use common::diagnostics;
use common::keys::{jwks, SigningKey, Tls};
use common::smart::{
    access_token, https_server, register, token_request, token_url, token_with, with_token,
};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

#[tokio::test]
async fn discovery_is_public_and_names_the_token_endpoint() {
    let tls = Tls::new();
    let server = https_server(&tls, |_| {}).await;
    for path in [
        "/.well-known/smart-configuration",
        "/fhir/.well-known/smart-configuration",
    ] {
        let response = server
            .client
            .get(server.url(path))
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let config: Value = response.json().await.expect("json");
        assert_eq!(
            config["token_endpoint"],
            json!(token_url(&server)),
            "{config}"
        );
        assert!(config["token_endpoint"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://")));
        assert_eq!(
            config["grant_types_supported"],
            json!(["client_credentials"])
        );
        assert_eq!(
            config["token_endpoint_auth_methods_supported"],
            json!(["private_key_jwt"])
        );
        for alg in ["RS384", "ES384"] {
            assert!(config["token_endpoint_auth_signing_alg_values_supported"]
                .as_array()
                .is_some_and(|a| a.contains(&json!(alg))));
        }
        for capability in ["client-confidential-asymmetric", "permission-v2"] {
            assert!(config["capabilities"]
                .as_array()
                .is_some_and(|a| a.contains(&json!(capability))));
        }
    }
    let statement: Value = server
        .client
        .get(server.url("/fhir/metadata"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let security = &statement["rest"][0]["security"];
    assert_eq!(security["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    assert_eq!(
        security["extension"][0]["extension"][0]["valueUri"],
        json!(token_url(&server))
    );
}

#[tokio::test]
async fn rs384_and_es384_assertions_get_tokens_that_open_the_api() {
    let tls = Tls::new();
    let server = https_server(&tls, |_| {}).await;
    let (ec, rsa) = (SigningKey::es384(), SigningKey::rs384());
    register(
        &server,
        "backend",
        json!({"grant_types": ["client_credentials"], "scope": ["system/*.rs"], "jwks": jwks(&[&ec, &rsa])}),
    )
    .await;
    let (status, _) = server.json(Method::PUT, "/Patient/p1", &json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    for key in [&ec, &rsa] {
        let assertion = key.assertion("backend", &token_url(&server), 240);
        let response = server
            .client
            .post(token_url(&server))
            .form(&[
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", assertion.as_str()),
                ("scope", "system/*.rs"),
            ])
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), StatusCode::OK, "{:?}", key.alg);
        assert_eq!(response.headers()["cache-control"], "no-store");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["token_type"], "bearer");
        assert_eq!(body["expires_in"], 300);
        assert_eq!(body["scope"], "system/*.rs");
        let token = body["access_token"].as_str().expect("token");
        let response = with_token(&server, Method::GET, "/fhir/Patient/p1", token)
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), StatusCode::OK, "{:?}", key.alg);
    }
}

#[tokio::test]
async fn what_the_token_endpoint_refuses_and_how() {
    let tls = Tls::new();
    let server = https_server(&tls, |settings| settings.guard.burst = 100).await;
    let key = SigningKey::es384();
    let stranger = SigningKey::es384();
    register(
        &server,
        "backend",
        json!({"grant_types": ["client_credentials"], "scope": ["system/*.rs"], "jwks": jwks(&[&key])}),
    )
    .await;
    register(
        &server,
        "basic-only",
        json!({"grant_types": ["basic"], "secret": "s", "jwks": jwks(&[&key])}),
    )
    .await;
    let url = token_url(&server);
    let now = chrono::Utc::now().timestamp();
    let claims = |aud: &str, exp: i64| json!({"iss": "backend", "sub": "backend", "aud": aud, "exp": exp, "jti": uuid::Uuid::new_v4().to_string()});
    // The stranger's key, under the registered key's kid: a wrong signature.
    let forged = {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES384);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, &claims(&url, now + 60), &stranger.encoding).expect("signed")
    };
    let replayed = key.assertion("backend", &url, 240);
    let (status, _) = token_with(&server, &replayed, "system/*.rs").await;
    assert_eq!(status, StatusCode::OK, "the first use");
    let cases: Vec<(&str, String, &str)> = vec![
        ("a replayed jti", replayed, "system/*.rs"),
        ("a wrong signature", forged, "system/*.rs"),
        (
            "a wrong aud",
            key.sign(&claims("https://elsewhere/token", now + 60)),
            "system/*.rs",
        ),
        (
            "an expired assertion",
            key.sign(&claims(&url, now - 600)),
            "system/*.rs",
        ),
        (
            "an exp too far ahead",
            key.sign(&claims(&url, now + 3600)),
            "system/*.rs",
        ),
        (
            "an unknown client",
            key.assertion("nobody", &url, 60),
            "system/*.rs",
        ),
        (
            "a client without client_credentials",
            key.assertion("basic-only", &url, 60),
            "system/*.rs",
        ),
        (
            "an over-wide scope",
            key.assertion("backend", &url, 60),
            "system/*.cud",
        ),
    ];
    let mut answers = Vec::new();
    for (case, assertion, scope) in cases {
        let (status, body) = token_with(&server, &assertion, scope).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{case}: {body}");
        answers.push(common::answer(case, status, &body));
    }
    let (status, body) = token_request(
        &server,
        &[
            ("grant_type", "password"),
            ("username", "root"),
            ("password", "x"),
        ],
    )
    .await;
    answers.push(common::answer("grant_type=password", status, &body));
    insta::assert_snapshot!(common::pretty(&answers));
}

#[tokio::test]
async fn scopes_narrow_what_a_token_may_do() {
    let tls = Tls::new();
    let server = https_server(&tls, |_| {}).await;
    let key = SigningKey::es384();
    register(
        &server,
        "narrow",
        json!({"grant_types": ["client_credentials"], "scope": "system/*.rs", "jwks": jwks(&[&key])}),
    )
    .await;
    for path in ["/Patient/p1", "/Observation/o1"] {
        let (status, _) = server
            .json(
                Method::PUT,
                path,
                &json!({"status": "final", "code": {"text": "x"}}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    // Asked for Patient only: granted the intersection.
    let assertion = key.assertion("narrow", &token_url(&server), 240);
    let (status, body) = token_with(&server, &assertion, "system/Patient.rs launch/patient").await;
    assert_eq!(
        (status, &body["scope"]),
        (StatusCode::OK, &json!("system/Patient.rs"))
    );
    let token = body["access_token"].as_str().expect("token").to_string();
    let get = |path: &'static str| with_token(&server, Method::GET, path, &token).send();
    assert_eq!(
        get("/Patient/p1").await.expect("sent").status(),
        StatusCode::OK
    );
    assert_eq!(
        get("/fhir/Patient?_count=1").await.expect("sent").status(),
        StatusCode::OK
    );
    let refused = get("/Observation/o1").await.expect("sent");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let outcome: Value = refused.json().await.expect("json");
    assert!(
        diagnostics(&outcome).contains("system/Patient.rs"),
        "{outcome}"
    );
    let write = with_token(&server, Method::PUT, "/Patient/p1", &token)
        .json(&json!({}))
        .send()
        .await
        .expect("sent");
    assert_eq!(write.status(), StatusCode::FORBIDDEN, "no u in rs");
    let export = with_token(
        &server,
        Method::GET,
        "/fhir/$export?_type=Observation",
        &token,
    )
    .header("accept", "application/fhir+json")
    .header("prefer", "respond-async")
    .send()
    .await
    .expect("sent");
    assert_eq!(export.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn bad_tokens_are_401_with_a_bearer_challenge() {
    let tls = Tls::new();
    let server = https_server(&tls, |settings| {
        settings.token_lifetime = Duration::from_secs(1)
    })
    .await;
    let key = SigningKey::es384();
    register(
        &server,
        "backend",
        json!({"grant_types": ["client_credentials"], "scope": ["system/*.rs"], "jwks": jwks(&[&key])}),
    )
    .await;
    let token = access_token(&server, "backend", &key, "system/*.rs").await;
    let mut tampered = token.clone();
    let at = token.rfind('.').expect("a signature") + 2;
    tampered.replace_range(
        at..at + 1,
        if &token[at..at + 1] == "A" { "B" } else { "A" },
    );
    for bad in [tampered.as_str(), "not-a-token", ""] {
        let response = with_token(&server, Method::GET, "/Patient/x", bad)
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{bad}");
        assert_eq!(
            response.headers()["www-authenticate"],
            "Bearer error=\"invalid_token\""
        );
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = with_token(&server, Method::GET, "/Patient/x", &token)
        .send()
        .await
        .expect("sent");
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED, "expired");
}

#[tokio::test]
async fn a_token_opens_export_its_status_and_its_files_over_https() {
    let tls = Tls::new();
    let server = https_server(&tls, |_| {}).await;
    let key = SigningKey::rs384();
    register(
        &server,
        "exporter",
        json!({"grant_types": ["client_credentials"], "scope": ["system/*.rs"], "jwks": jwks(&[&key])}),
    )
    .await;
    for i in 0..3 {
        let (status, _) = server
            .json(Method::PUT, &format!("/Patient/p{i}"), &json!({}))
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let token = access_token(&server, "exporter", &key, "system/*.rs").await;
    let kicked = with_token(&server, Method::GET, "/fhir/$export?_type=Patient", &token)
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .send()
        .await
        .expect("sent");
    assert_eq!(kicked.status(), StatusCode::ACCEPTED);
    let status_url = kicked.headers()["content-location"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(status_url.starts_with("https://"), "{status_url}");
    let manifest: Value = loop {
        let response = server
            .client
            .get(&status_url)
            .bearer_auth(&token)
            .send()
            .await
            .expect("sent");
        match response.status() {
            StatusCode::ACCEPTED => tokio::time::sleep(Duration::from_millis(500)).await,
            StatusCode::OK => break response.json().await.expect("manifest"),
            other => panic!("{other}"),
        }
    };
    assert_eq!(manifest["requiresAccessToken"], true);
    let url = manifest["output"][0]["url"]
        .as_str()
        .expect("a file")
        .to_string();
    assert!(url.starts_with("https://"), "{url}");
    let file = server
        .client
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await
        .expect("sent");
    assert_eq!(file.status(), StatusCode::OK);
    assert_eq!(file.text().await.expect("text").lines().count(), 3);
    let anonymous = server.client.get(&url).send().await.expect("sent");
    assert_eq!(
        anonymous.status(),
        StatusCode::UNAUTHORIZED,
        "the file needs the token"
    );
}

#[tokio::test]
async fn a_client_with_a_jwks_uri() {
    let tls = Tls::new();
    let key = SigningKey::es384();
    // The client's JWK Set, on an HTTPS server of its own (the same test CA).
    let set = jwks(&[&key]).to_string();
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let set = set.clone();
            async move {
                (
                    [
                        ("content-type", "application/json"),
                        ("cache-control", "max-age=60"),
                    ],
                    set,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let jwks_uri = format!(
        "https://{}/jwks.json",
        listener.local_addr().expect("address")
    );
    let settings = fhirbox::http::serve::ConnectionSettings {
        tls: Some(fhirbox::http::serve::tls_config(&tls.cert_file, &tls.key_file).expect("TLS")),
        ..Default::default()
    };
    tokio::spawn(fhirbox::http::serve::serve_app(
        listener,
        app,
        settings,
        std::future::pending(),
    ));
    let server = https_server(&tls, |_| {}).await;
    register(
        &server,
        "hosted",
        json!({"grant_types": ["client_credentials"], "scope": ["system/*.rs"], "jwks_uri": jwks_uri}),
    )
    .await;
    let (status, _) = server.json(Method::PUT, "/Patient/p1", &json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    let token = access_token(&server, "hosted", &key, "system/*.rs").await;
    let response = with_token(&server, Method::GET, "/Patient/p1", &token)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    // A plain-http jwks_uri is refused when the Client is written.
    let (status, outcome) = server
        .json(
            Method::PUT,
            "/Client/insecure",
            &json!({"resourceType": "Client", "grant_types": ["client_credentials"], "jwks_uri": "http://127.0.0.1/jwks.json"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
}

#[tokio::test]
async fn token_endpoint_failures_are_rate_limited() {
    let tls = Tls::new();
    let server = https_server(&tls, |_| {}).await;
    let key = SigningKey::es384();
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let assertion = key.assertion("nobody", &token_url(&server), 60);
        let (status, body) = token_with(&server, &assertion, "system/*.rs").await;
        statuses.push((
            status.as_u16(),
            body["error"].as_str().unwrap_or_default().to_string(),
        ));
    }
    assert!(
        statuses[..10]
            .iter()
            .all(|(s, e)| *s == 400 && e == "invalid_client"),
        "{statuses:?}"
    );
    assert!(
        statuses[10..]
            .iter()
            .all(|(s, e)| *s == 429 && e == "temporarily_unavailable"),
        "{statuses:?}"
    );
}
