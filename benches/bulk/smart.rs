//! What SMART Backend Services costs: `$dump` of the largest type as a Client with a bearer
//! token against the same as a Client with basic credentials (both remembered after their
//! first check, as in production), and the token endpoint's latency.

use std::time::Instant;

use base64::Engine as _;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::server::{Server, PASSWORD};
use crate::{http_as, rounds, Measurement, Row};

/// Token requests timed for the latency figures.
const TOKEN_REQUESTS: usize = 200;

/// An ES384 key of the benchmark's Backend Services Client.
struct Key {
    jwk: Value,
    encoding: EncodingKey,
}

impl Key {
    fn new() -> Key {
        use p384::pkcs8::EncodePrivateKey;
        let key = p384::ecdsa::SigningKey::random(&mut rsa::rand_core::OsRng);
        let point = key.verifying_key().to_encoded_point(false);
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let der = key.to_pkcs8_der().expect("der");
        Key {
            jwk: json!({"kty": "EC", "crv": "P-384", "kid": "bench", "alg": "ES384",
                        "x": b64(point.x().expect("x")), "y": b64(point.y().expect("y"))}),
            encoding: EncodingKey::from_ec_der(der.as_bytes()),
        }
    }

    /// A fresh client assertion (new `jti`) for `client` at `token_url`.
    fn assertion(&self, client: &str, token_url: &str) -> String {
        let mut header = Header::new(Algorithm::ES384);
        header.kid = Some("bench".into());
        let claims = json!({
            "iss": client, "sub": client, "aud": token_url,
            "exp": chrono::Utc::now().timestamp() + 240,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        encode(&header, &claims, &self.encoding).expect("signed")
    }
}

/// PUTs a resource as root, failing loudly.
async fn put(server: &Server, client: &reqwest::Client, path: &str, body: Value) {
    let response = client
        .put(format!("{}{path}", server.base))
        .basic_auth("root", Some(PASSWORD))
        .json(&body)
        .send()
        .await
        .expect("put");
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
}

/// Registers a Client and an AccessPolicy that allows it everything.
async fn register(server: &Server, client: &reqwest::Client, id: &str, mut body: Value) {
    body["resourceType"] = json!("Client");
    put(server, client, &format!("/Client/{id}"), body).await;
    let policy = json!({"resourceType": "AccessPolicy", "engine": "allow",
                        "link": [{"resourceType": "Client", "id": id}]});
    put(server, client, &format!("/AccessPolicy/{id}-may"), policy).await;
}

/// One token request: the access token and the seconds the round trip took.
async fn token(server: &Server, client: &reqwest::Client, key: &Key) -> (String, f64) {
    let url = format!("{}/auth/token", server.base);
    let assertion = key.assertion("bench-smart", &url);
    let started = Instant::now();
    let response = client
        .post(&url)
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
        .expect("token request");
    let status = response.status();
    let body: Value = response.json().await.expect("token json");
    let seconds = started.elapsed().as_secs_f64();
    assert!(status.is_success(), "{status}: {body}");
    let token = body["access_token"].as_str().expect("a token").to_string();
    (token, seconds)
}

fn keep_faster(best: &mut Option<Measurement>, m: Measurement) {
    if best.as_ref().is_none_or(|b| m.seconds < b.seconds) {
        *best = Some(m);
    }
}

pub async fn smart_benchmark(
    server: &Server,
    client: &reqwest::Client,
    largest: &str,
    largest_rows: usize,
) -> Vec<Row> {
    let key = Key::new();
    register(
        server,
        client,
        "bench-smart",
        json!({"grant_types": ["client_credentials"], "scope": ["system/*.rs"],
               "jwks": {"keys": [key.jwk]}}),
    )
    .await;
    register(
        server,
        client,
        "bench-basic",
        json!({"grant_types": ["basic"], "secret": "bench-secret"}),
    )
    .await;

    // Token endpoint latency: sequential requests, each with a fresh assertion (signing it is
    // the client's work and not timed).
    let mut latencies = Vec::with_capacity(TOKEN_REQUESTS);
    for _ in 0..TOKEN_REQUESTS {
        latencies.push(token(server, client, &key).await.1 * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    eprintln!(
        "POST /auth/token ({TOKEN_REQUESTS} sequential, ES384 assertions): \
         median {:.2} ms, p95 {:.2} ms, max {:.2} ms",
        at(0.5),
        at(0.95),
        at(1.0)
    );

    // Rounds alternate between the two, so that whatever else the machine does falls on both
    // alike; the fastest of each counts.
    let path = format!("{}/{largest}/$dump", server.base);
    let (mut basic, mut bearer): (Option<Measurement>, Option<Measurement>) = (None, None);
    for _ in 0..2 * rounds() {
        let request = client
            .get(&path)
            .basic_auth("bench-basic", Some("bench-secret"));
        keep_faster(&mut basic, http_as(server, request).await);
        // A fresh token per round: a long run must not outlive one.
        let (token, _) = token(server, client, &key).await;
        keep_faster(
            &mut bearer,
            http_as(server, client.get(&path).bearer_auth(token)).await,
        );
    }
    let (basic, bearer) = (basic.expect("measured"), bearer.expect("measured"));
    let baseline = basic.seconds;
    vec![
        Row {
            operation: "$dump as a Client, basic".into(),
            rows: largest_rows,
            measurement: basic,
            baseline_seconds: baseline,
        },
        Row {
            operation: "$dump as a Client, bearer/basic".into(),
            rows: largest_rows,
            measurement: bearer,
            baseline_seconds: baseline,
        },
    ]
}
