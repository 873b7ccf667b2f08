//! Object storage: S3-compatible buckets, where `$export` writes its files
//! (`--export-storage s3://BUCKET[/PREFIX]`) and where `$load` and `$import` read sources
//! (`s3://BUCKET/KEY`).
//!
//! One client per bucket, built from the configuration (`--s3-endpoint`, path-style addressing
//! then; `--s3-region`) and the credentials every S3 tool reads: `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, else the web-identity and instance-metadata
//! chain of the `object_store` crate (the Apache Arrow project's, which the `parquet` writer
//! already pairs with). Credentials are never logged; errors say what failed in words.

mod describe;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};

pub use describe::describe;

/// How buckets are reached.
#[derive(Debug, Clone, Default)]
pub struct S3Settings {
    /// An S3-compatible server's URL (SeaweedFS, MinIO, ...); `None`: AWS.
    pub endpoint: Option<String>,
    pub region: String,
    /// An access key and its secret given here (an embedding program's, the tests'); `None`:
    /// from the environment, as every S3 tool reads them.
    pub credentials: Option<(String, String)>,
}

/// A bucket and a key (or a prefix) in it: `s3://BUCKET/KEY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub bucket: String,
    pub key: String,
}

impl Location {
    /// `s3://bucket/key...`; `None` for anything else (an empty bucket name too).
    pub fn parse(url: &str) -> Option<Location> {
        let rest = url.strip_prefix("s3://")?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let valid = !bucket.is_empty()
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        valid.then(|| Location {
            bucket: bucket.to_string(),
            key: key.trim_start_matches('/').to_string(),
        })
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The configuration cannot make a client (a bad endpoint URL, say).
    #[error("object storage: {0}")]
    Config(String),
    /// The storage refused or failed a request: what was asked, and why in words.
    #[error("{what}: {why}")]
    Storage { what: String, why: String },
}

impl ObjectError {
    pub fn storage(what: impl Into<String>, error: &object_store::Error) -> ObjectError {
        ObjectError::Storage {
            what: what.into(),
            why: describe(error),
        }
    }
}

/// The clients of the buckets fhirbox uses, made on first use.
#[derive(Clone, Default)]
pub struct Buckets {
    settings: Arc<S3Settings>,
    clients: Arc<Mutex<HashMap<String, Arc<AmazonS3>>>>,
}

impl Buckets {
    pub fn new(settings: S3Settings) -> Buckets {
        Buckets {
            settings: Arc::new(settings),
            clients: Arc::default(),
        }
    }

    /// The client of `bucket`.
    pub fn client(&self, bucket: &str) -> Result<Arc<AmazonS3>, ObjectError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get(bucket) {
            return Ok(client.clone());
        }
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region(&self.settings.region)
            .with_retry(RetryConfig {
                // A storage server that went away is retried for a while, with backoff, then
                // the request fails saying so.
                backoff: BackoffConfig::default(),
                max_retries: 4,
                retry_timeout: Duration::from_secs(30),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(10))
                    .with_timeout(Duration::from_secs(300)),
            );
        if let Some((key, secret)) = &self.settings.credentials {
            builder = builder
                .with_access_key_id(key)
                .with_secret_access_key(secret);
        }
        if let Some(endpoint) = &self.settings.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let client = Arc::new(
            builder
                .build()
                .map_err(|e| ObjectError::Config(describe(&e)))?,
        );
        clients.insert(bucket.to_string(), client.clone());
        Ok(client)
    }
}

impl Buckets {
    /// How long a presigned URL may live at most: temporary credentials
    /// (`AWS_SESSION_TOKEN`) die before a URL they signed would, so then no more than their
    /// `AWS_CREDENTIAL_EXPIRATION` (or an hour, when that is not said).
    pub fn credential_lifetime() -> Option<Duration> {
        let expiration = std::env::var("AWS_CREDENTIAL_EXPIRATION")
            .ok()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok());
        match (expiration, std::env::var_os("AWS_SESSION_TOKEN")) {
            (Some(at), _) => Some(
                (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
                    .to_std()
                    .unwrap_or(Duration::ZERO),
            ),
            (None, Some(_)) => Some(Duration::from_secs(3600)),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(
            Location::parse("s3://exports/nightly/Patient.ndjson"),
            Some(Location {
                bucket: "exports".into(),
                key: "nightly/Patient.ndjson".into()
            })
        );
        assert_eq!(
            Location::parse("s3://exports"),
            Some(Location {
                bucket: "exports".into(),
                key: String::new()
            })
        );
        assert_eq!(Location::parse("s3:///key"), None);
        assert_eq!(Location::parse("s3://Bad_Bucket/key"), None);
        assert_eq!(Location::parse("https://exports/key"), None);
    }
}
