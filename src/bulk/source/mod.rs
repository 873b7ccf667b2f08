//! Where `$load` and `$import` read from, and which places they may read.
//!
//! - `http`/`https` URLs, streamed (never downloaded whole). The addresses a host name
//!   resolves to are checked before connecting, by a DNS resolver of our own, so a name that
//!   resolves to a forbidden address (DNS rebinding included) is refused, and so is every
//!   redirect hop: link-local addresses (cloud metadata services at 169.254.169.254) always;
//!   private, loopback and other non-public addresses unless `--allow-private-sources`.
//!   No system proxy is used (a proxy would connect on our behalf, past these checks).
//! - `file://` URLs, only under the directory named by `--source-dir` (none by default),
//!   after resolving symlinks and `..`.
//! - `s3://BUCKET/KEY` objects, with fhirbox's credentials: any for root, for a Client only
//!   under `--source-buckets` ([`bucket`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};

mod address;
mod bucket;

pub use address::allowed;
use address::{check_url_host, CheckedResolver};

/// Redirect hops followed at most.
const MAX_REDIRECTS: usize = 10;

/// Who reads a source: root may read any bucket with the server's credentials, a Client only
/// what `--source-buckets` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    Root,
    Client,
}

/// A source's bytes.
pub type SourceStream = Pin<Box<dyn Stream<Item = Result<Bytes, SourceError>> + Send>>;

/// An opened source: its bytes, and its length when known (HTTP `Content-Length`, a file's
/// size), for progress.
pub struct Opened {
    pub stream: SourceStream,
    pub size: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("'{0}' is not a valid URL")]
    BadUrl(String),
    #[error("unsupported source scheme '{0}': use http, https, s3 or file")]
    Scheme(String),
    /// A bucket a Client may not read (only root may read any; `--source-buckets`).
    #[error("{0} is not readable by clients: an operator allows buckets and prefixes with --source-buckets")]
    BucketForbidden(String),
    /// The storage refused or failed: which object, and why in words.
    #[error("{0}")]
    Bucket(String),
    #[error("file:// sources are disabled: start fhirbox with --source-dir to allow files under a directory")]
    FilesDisabled,
    #[error("the file {0} is not under the source directory")]
    OutsideSourceDir(String),
    #[error("cannot read {path}: {reason}")]
    File { path: String, reason: String },
    #[error("the source address {0} is not allowed (link-local addresses never are; private and loopback ones only with --allow-private-sources)")]
    Forbidden(String),
    #[error("the source answered HTTP {status} for {url}")]
    Status { status: u16, url: String },
    #[error("cannot resolve the host name '{host}' (DNS: {reason})")]
    Dns { host: String, reason: String },
    #[error("cannot connect to {host}: {reason}")]
    Connect { host: String, reason: String },
    #[error("the TLS handshake with {host} failed: {reason}")]
    Tls { host: String, reason: String },
    #[error("{host} {what}")]
    Timeout { host: String, what: String },
    #[error("downloading the source failed: {0}")]
    Http(String),
}

/// What sources are allowed and how they are read: configuration.
#[derive(Debug, Clone)]
pub struct SourcePolicy {
    /// `file://` sources must be under this directory (canonical); `None`: none allowed.
    pub source_dir: Option<PathBuf>,
    /// Allow private, loopback and other non-public addresses (never link-local).
    pub allow_private: bool,
    /// The longest NDJSON line a load accepts.
    pub max_line_bytes: usize,
    /// How long connecting to an `http(s)` source may take.
    pub connect_timeout: Duration,
    /// How long an `http(s)` source may send nothing before the load fails.
    pub read_timeout: Duration,
    /// Certificates (DER) trusted besides the system's, for sources and JWK Set URLs on a
    /// private CA.
    pub extra_roots: Vec<Vec<u8>>,
    /// The buckets (and prefixes) Clients may read `s3://` sources from.
    pub client_buckets: Vec<crate::objects::Location>,
}

impl Default for SourcePolicy {
    fn default() -> SourcePolicy {
        SourcePolicy {
            source_dir: None,
            allow_private: false,
            max_line_bytes: 64 * 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            extra_roots: Vec::new(),
            client_buckets: Vec::new(),
        }
    }
}

/// Opens sources under a policy; holds the HTTP client (connection pool, TLS config).
#[derive(Clone)]
pub struct Sources {
    policy: Arc<SourcePolicy>,
    client: reqwest::Client,
    buckets: crate::objects::Buckets,
}

impl Sources {
    pub fn new(
        policy: SourcePolicy,
        buckets: crate::objects::Buckets,
    ) -> Result<Sources, SourceError> {
        let policy = Arc::new(policy);
        install_crypto_provider();
        let redirect_policy = policy.clone();
        let mut builder = reqwest::Client::builder();
        for der in &policy.extra_roots {
            let root = reqwest::Certificate::from_der(der)
                .map_err(|e| SourceError::Http(format!("a --source-ca-file certificate: {e}")))?;
            builder = builder.add_root_certificate(root);
        }
        let client = builder
            .dns_resolver(Arc::new(CheckedResolver {
                policy: policy.clone(),
            }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error(SourceError::Http(format!(
                        "more than {MAX_REDIRECTS} redirects"
                    )));
                }
                // What started over TLS stays over TLS (a JWK Set, a source): no hop may
                // take it to plain http.
                let secure_before = attempt.previous().iter().any(|u| u.scheme() == "https");
                if secure_before && attempt.url().scheme() != "https" {
                    let refused = format!(
                        "{} (a redirect from https to {} is refused)",
                        attempt.url().scheme(),
                        attempt.url()
                    );
                    return attempt.error(SourceError::Scheme(refused));
                }
                match check_url_host(attempt.url(), &redirect_policy) {
                    Ok(()) => attempt.follow(),
                    Err(error) => attempt.error(error),
                }
            }))
            .connect_timeout(policy.connect_timeout)
            .read_timeout(policy.read_timeout)
            // An environment proxy (HTTP_PROXY, ...) would connect on our behalf, to names it
            // resolves itself, past the address checks above: never use one.
            .no_proxy()
            .build()
            .map_err(|e| SourceError::Http(e.to_string()))?;
        Ok(Sources {
            policy,
            client,
            buckets,
        })
    }

    /// The longest line a load accepts.
    pub fn max_line_bytes(&self) -> usize {
        self.policy.max_line_bytes
    }

    /// Fetches a small document (a Client's JWK Set) from an `https` URL under the source
    /// rules: at most `limit` bytes; with the `max-age` its `Cache-Control` allows (zero for
    /// `no-store`/`no-cache`).
    pub async fn fetch_small(
        &self,
        url: &str,
        limit: usize,
    ) -> Result<(Vec<u8>, Option<Duration>), SourceError> {
        let parsed = reqwest::Url::parse(url).map_err(|_| SourceError::BadUrl(url.to_string()))?;
        if parsed.scheme() != "https" {
            return Err(SourceError::Scheme(format!(
                "{} (a JWK Set URL must be https)",
                parsed.scheme()
            )));
        }
        check_url_host(&parsed, &self.policy)?;
        let response = self
            .client
            .get(parsed)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| http_error(e, &self.policy))?;
        if !response.status().is_success() {
            return Err(SourceError::Status {
                status: response.status().as_u16(),
                url: response.url().to_string(),
            });
        }
        let max_age = response
            .headers()
            .get(reqwest::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(cache_max_age);
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk.map_err(|e| http_error(e, &self.policy))?);
            if body.len() > limit {
                return Err(SourceError::Http(format!(
                    "{url} is larger than {limit} bytes"
                )));
            }
        }
        Ok((body, max_age))
    }

    /// Checks what can be checked about a source without reading it (for `$import`'s kick-off):
    /// the URL and its scheme, a literal address, the addresses a host name resolves to (a
    /// name that does not resolve now is left to the load, which says so), and for `file://`
    /// that it names a regular file under the source directory.
    pub async fn check(&self, url: &str, reader: Reader) -> Result<(), SourceError> {
        if url.starts_with("s3:") {
            let location = crate::objects::Location::parse(url)
                .ok_or_else(|| SourceError::BadUrl(url.to_string()))?;
            return self.check_s3(&location, reader).await;
        }
        let parsed = reqwest::Url::parse(url).map_err(|_| SourceError::BadUrl(url.to_string()))?;
        match parsed.scheme() {
            "http" | "https" => {
                check_url_host(&parsed, &self.policy)?;
                let Some(url::Host::Domain(name)) = parsed.host() else {
                    return Ok(());
                };
                let port = parsed.port_or_known_default().unwrap_or(80);
                let Ok(found) = tokio::net::lookup_host((name, port)).await else {
                    return Ok(());
                };
                let found: Vec<SocketAddr> = found.collect();
                match found.iter().find(|a| !allowed(a.ip(), &self.policy)) {
                    Some(refused) if found.iter().all(|a| !allowed(a.ip(), &self.policy)) => {
                        Err(SourceError::Forbidden(format!("{} ({name})", refused.ip())))
                    }
                    _ => Ok(()),
                }
            }
            "file" => self.open_file(&parsed).await.map(drop),
            other => Err(SourceError::Scheme(other.to_string())),
        }
    }

    /// Opens a source for streaming. Errors that can be known before the first byte (a bad
    /// URL, a refused address, an HTTP error status, a missing file) come back here.
    pub async fn open(&self, url: &str, reader: Reader) -> Result<Opened, SourceError> {
        if url.starts_with("s3:") {
            let location = crate::objects::Location::parse(url)
                .ok_or_else(|| SourceError::BadUrl(url.to_string()))?;
            return self.open_s3(&location, reader).await;
        }
        let parsed = reqwest::Url::parse(url).map_err(|_| SourceError::BadUrl(url.to_string()))?;
        match parsed.scheme() {
            "http" | "https" => self.open_http(parsed).await,
            "file" => self.open_file(&parsed).await,
            other => Err(SourceError::Scheme(other.to_string())),
        }
    }

    async fn open_http(&self, url: reqwest::Url) -> Result<Opened, SourceError> {
        check_url_host(&url, &self.policy)?;
        let response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| http_error(e, &self.policy))?;
        let status = response.status();
        if !status.is_success() {
            return Err(SourceError::Status {
                status: status.as_u16(),
                url: response.url().to_string(),
            });
        }
        let policy = self.policy.clone();
        let size = response.content_length();
        Ok(Opened {
            stream: Box::pin(
                response
                    .bytes_stream()
                    .map_err(move |e| http_error(e, &policy)),
            ),
            size,
        })
    }

    async fn open_file(&self, url: &reqwest::Url) -> Result<Opened, SourceError> {
        let root = self
            .policy
            .source_dir
            .as_ref()
            .ok_or(SourceError::FilesDisabled)?;
        let path = url
            .to_file_path()
            .map_err(|_| SourceError::BadUrl(url.to_string()))?;
        let shown = path.display().to_string();
        // Outside the directory by its text: refused without looking at the file system, so
        // the answer says nothing about what exists out there.
        if !lexically_normal(&path).starts_with(root) {
            return Err(SourceError::OutsideSourceDir(shown));
        }
        let file_error = |reason: std::io::Error| SourceError::File {
            path: shown.clone(),
            reason: reason.to_string(),
        };
        let resolved = tokio::fs::canonicalize(&path).await.map_err(file_error)?;
        if !resolved.starts_with(root) {
            // A link inside that points outside.
            return Err(SourceError::OutsideSourceDir(shown));
        }
        let file = open_regular(&resolved).await.map_err(file_error)?;
        let size = file.metadata().await.ok().map(|m| m.len());
        let stream =
            tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(move |chunk| {
                chunk.map_err(|e| SourceError::File {
                    path: shown.clone(),
                    reason: e.to_string(),
                })
            });
        Ok(Opened {
            stream: Box::pin(stream),
            size,
        })
    }
}

/// What a `Cache-Control` header allows: `no-store`/`no-cache` nothing, else its `max-age`.
fn cache_max_age(value: &str) -> Option<Duration> {
    let mut max_age = None;
    for directive in value.split(',').map(str::trim) {
        if directive.eq_ignore_ascii_case("no-store") || directive.eq_ignore_ascii_case("no-cache")
        {
            return Some(Duration::ZERO);
        }
        if let Some(seconds) = directive.strip_prefix("max-age=") {
            max_age = seconds
                .trim_matches('"')
                .parse()
                .ok()
                .map(Duration::from_secs);
        }
    }
    max_age
}

/// `path` with `.` and `..` resolved by its text alone.
fn lexically_normal(path: &Path) -> PathBuf {
    let mut normal = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                normal.pop();
            }
            std::path::Component::CurDir => {}
            other => normal.push(other),
        }
    }
    normal
}

/// Opens a regular file for reading. A FIFO, a device or a directory is refused: opening a
/// FIFO would wait for a writer forever (`O_NONBLOCK` makes the open itself return).
async fn open_regular(path: &Path) -> std::io::Result<tokio::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = path.to_path_buf();
    let file = tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&path)?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        Ok(file)
    })
    .await
    .map_err(std::io::Error::other)??;
    // O_NONBLOCK means nothing to a regular file's reads.
    Ok(tokio::fs::File::from_std(file))
}

/// What went wrong with an http(s) source, in words: our own refusals as they are, then DNS,
/// TLS, timeouts and refused connections, each naming the host.
fn http_error(error: reqwest::Error, policy: &SourcePolicy) -> SourceError {
    let host = error
        .url()
        .and_then(|url| {
            url.host_str().map(|h| match url.port() {
                Some(port) => format!("{h}:{port}"),
                None => h.to_string(),
            })
        })
        .unwrap_or_else(|| "the source".to_string());
    let mut tls = None;
    let mut io_kind = None;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(current) = source {
        if let Some(ours) = current.downcast_ref::<SourceError>() {
            return match ours {
                SourceError::Forbidden(address) => SourceError::Forbidden(address.clone()),
                SourceError::Dns { host, reason } => SourceError::Dns {
                    host: host.clone(),
                    reason: reason.clone(),
                },
                other => SourceError::Http(other.to_string()),
            };
        }
        if let Some(rustls) = current.downcast_ref::<rustls::Error>() {
            tls = Some(rustls.to_string());
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            io_kind = Some((io.kind(), io.to_string()));
        }
        source = current.source();
    }
    if let Some(reason) = tls {
        return SourceError::Tls { host, reason };
    }
    if error.is_timeout() {
        let what = match error.is_connect() {
            true => format!(
                "did not accept the connection within {} s (--source-connect-timeout)",
                policy.connect_timeout.as_secs()
            ),
            false => format!(
                "sent nothing for {} s (--source-read-timeout)",
                policy.read_timeout.as_secs()
            ),
        };
        return SourceError::Timeout { host, what };
    }
    if error.is_connect() {
        let reason = match io_kind {
            Some((std::io::ErrorKind::ConnectionRefused, _)) => {
                "the connection was refused".to_string()
            }
            Some((_, text)) => text,
            None => error.to_string(),
        };
        return SourceError::Connect { host, reason };
    }
    SourceError::Http(error.to_string())
}

/// reqwest is built without a TLS crypto provider of its own: this installs ring's for the
/// process (once; later calls do nothing). Any code that builds an HTTP client calls it first.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The canonical form of a configured source directory.
pub fn canonical_source_dir(dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::canonicalize(dir)
}
