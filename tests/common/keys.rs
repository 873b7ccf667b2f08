//! Keys and certificates made by the tests themselves: RSA and EC P-384 key pairs for SMART
//! client assertions (with their public JWKs), and a CA with a server certificate for HTTPS.

use std::path::PathBuf;

use base64::Engine as _;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A client's signing key.
pub struct SigningKey {
    pub alg: Algorithm,
    pub kid: String,
    /// The public JWK (with `kid`).
    pub jwk: Value,
    /// The private key, PKCS#8 PEM.
    pub pem: String,
    pub encoding: EncodingKey,
}

/// The RFC 7638 thumbprint of a public JWK's required members (what jwcrypto, and so
/// smart-fetch, uses as the `kid` of a PEM key).
fn thumbprint(members: &Value) -> String {
    b64(&Sha256::digest(members.to_string().as_bytes()))
}

impl SigningKey {
    /// An EC P-384 key (ES384); its `kid` is its thumbprint.
    pub fn es384() -> SigningKey {
        use p384::ecdsa::SigningKey as EcKey;
        use p384::pkcs8::{EncodePrivateKey, LineEnding};
        let key = EcKey::random(&mut rsa::rand_core::OsRng);
        let point = key.verifying_key().to_encoded_point(false);
        let (x, y) = (b64(point.x().expect("x")), b64(point.y().expect("y")));
        // The thumbprint's members, in its required (lexical) order.
        let members = json!({"crv": "P-384", "kty": "EC", "x": x, "y": y});
        let kid = thumbprint(&members);
        let pem = key.to_pkcs8_pem(LineEnding::LF).expect("pem").to_string();
        let der = key.to_pkcs8_der().expect("der");
        SigningKey {
            alg: Algorithm::ES384,
            jwk: json!({"kty": "EC", "crv": "P-384", "x": x, "y": y, "kid": kid, "alg": "ES384", "use": "sig"}),
            encoding: EncodingKey::from_ec_der(der.as_bytes()),
            kid,
            pem,
        }
    }

    /// An RSA 2048 key (RS384); its `kid` is its thumbprint.
    pub fn rs384() -> SigningKey {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::{EncodePrivateKey, LineEnding};
        use rsa::traits::PublicKeyParts;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key");
        let (n, e) = (b64(&key.n().to_bytes_be()), b64(&key.e().to_bytes_be()));
        let members = json!({"e": e, "kty": "RSA", "n": n});
        let kid = thumbprint(&members);
        let pem = key.to_pkcs8_pem(LineEnding::LF).expect("pem").to_string();
        SigningKey {
            alg: Algorithm::RS384,
            jwk: json!({"kty": "RSA", "n": n, "e": e, "kid": kid, "alg": "RS384", "use": "sig"}),
            encoding: EncodingKey::from_rsa_der(key.to_pkcs1_der().expect("der").as_bytes()),
            kid,
            pem,
        }
    }

    /// A signed client assertion with these claims (header: this key's `alg`, `kid`, JWT).
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        encode(&header, claims, &self.encoding).expect("signed")
    }

    /// A well-formed assertion for `client_id` at `token_url`, expiring in `seconds`.
    pub fn assertion(&self, client_id: &str, token_url: &str, seconds: i64) -> String {
        self.sign(&json!({
            "iss": client_id,
            "sub": client_id,
            "aud": token_url,
            "exp": chrono::Utc::now().timestamp() + seconds,
            "jti": uuid::Uuid::new_v4().to_string(),
        }))
    }
}

/// A JWK Set of these keys' public halves.
pub fn jwks(keys: &[&SigningKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
}

/// A CA and a server certificate it signed, for `localhost` and `127.0.0.1`, as PEM files in
/// a directory of their own.
pub struct Tls {
    pub ca_pem: String,
    pub ca_der: Vec<u8>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tls {
    pub fn new() -> Tls {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fhirbox test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .expect("server certificate");
        let dir = tempfile::tempdir().expect("dir");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        Tls {
            cert_file: write("cert.pem", &cert.pem()),
            key_file: write("key.pem", &key.serialize_pem()),
            ca_file: write("ca.pem", &ca.pem()),
            ca_pem: ca.pem(),
            ca_der: ca.der().to_vec(),
            _dir: dir,
        }
    }

    /// An HTTP client that trusts this CA.
    pub fn client(&self) -> reqwest::Client {
        super::http_client();
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_der(&self.ca_der).expect("CA"))
            .build()
            .expect("client")
    }
}
