//! SMART Backend Services helpers: an HTTPS server, registered Backend Services Clients,
//! token requests and access tokens.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::keys::{SigningKey, Tls};
use super::TestServer;

/// A fhirbox over HTTPS (its client trusts the test CA), with `tune` applied.
pub async fn https_server(tls: &Tls, tune: impl FnOnce(&mut super::AppSettings)) -> TestServer {
    let config = fhirbox::http::serve::tls_config(&tls.cert_file, &tls.key_file).expect("TLS");
    let mut server = TestServer::start_custom(super::fresh_database().await, |settings| {
        settings.http.connections.tls = Some(config);
        settings.sources.extra_roots = vec![tls.ca_der.clone()];
        tune(settings);
    })
    .await;
    server.client = tls.client();
    server
}

/// Registers a Backend Services Client (and an AccessPolicy that allows it everything: the
/// scopes do the narrowing) as root.
pub async fn register(server: &TestServer, id: &str, client: Value) {
    let mut body = client;
    body["resourceType"] = json!("Client");
    let (status, outcome) = server
        .json(Method::PUT, &format!("/Client/{id}"), &body)
        .await;
    assert!(status.is_success(), "{outcome}");
    let policy = json!({"resourceType": "AccessPolicy", "engine": "allow", "link": [{"resourceType": "Client", "id": id}]});
    let (status, outcome) = server
        .json(Method::PUT, &format!("/AccessPolicy/{id}-may"), &policy)
        .await;
    assert!(status.is_success(), "{outcome}");
}

pub fn token_url(server: &TestServer) -> String {
    server.url("/auth/token")
}

/// POSTs a token request (form-encoded) without credentials; status and JSON body.
pub async fn token_request(server: &TestServer, form: &[(&str, &str)]) -> (StatusCode, Value) {
    let response = server
        .client
        .post(token_url(server))
        .form(form)
        .send()
        .await
        .expect("sent");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

pub async fn token_with(server: &TestServer, assertion: &str, scope: &str) -> (StatusCode, Value) {
    token_request(
        server,
        &[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
            ("scope", scope),
        ],
    )
    .await
}

/// An access token for `client` signed by `key`.
pub async fn access_token(
    server: &TestServer,
    client: &str,
    key: &SigningKey,
    scope: &str,
) -> String {
    let assertion = key.assertion(client, &token_url(server), 240);
    let (status, body) = token_with(server, &assertion, scope).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["access_token"].as_str().expect("a token").to_string()
}

pub fn with_token(
    server: &TestServer,
    method: Method,
    path: &str,
    token: &str,
) -> reqwest::RequestBuilder {
    server
        .client
        .request(method, server.url(path))
        .bearer_auth(token)
}

/// Serves `app` over HTTPS with the test CA's certificate (a client's JWK Set server); its
/// base URL.
pub async fn https_app(tls: &Tls, app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("https://{}", listener.local_addr().expect("address"));
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
    base
}

/// A client whose requests come from `address` (any of 127.0.0.0/8 is this machine) and
/// that trusts the test CA.
pub fn client_from(tls: &Tls, address: &str) -> reqwest::Client {
    super::http_client();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_der(&tls.ca_der).expect("CA"))
        .local_address(address.parse::<std::net::IpAddr>().expect("address"))
        .build()
        .expect("client")
}
