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

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};

/// Redirect hops followed at most.
const MAX_REDIRECTS: usize = 10;

/// A source's bytes.
pub type SourceStream = Pin<Box<dyn Stream<Item = Result<Bytes, SourceError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("'{0}' is not a valid URL")]
    BadUrl(String),
    #[error("unsupported source scheme '{0}': use http, https or file")]
    Scheme(String),
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
}

impl Default for SourcePolicy {
    fn default() -> SourcePolicy {
        SourcePolicy {
            source_dir: None,
            allow_private: false,
            max_line_bytes: 64 * 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// Opens sources under a policy; holds the HTTP client (connection pool, TLS config).
#[derive(Clone)]
pub struct Sources {
    policy: Arc<SourcePolicy>,
    client: reqwest::Client,
}

impl Sources {
    pub fn new(policy: SourcePolicy) -> Result<Sources, SourceError> {
        let policy = Arc::new(policy);
        install_crypto_provider();
        let redirect_policy = policy.clone();
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(CheckedResolver {
                policy: policy.clone(),
            }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error(SourceError::Http(format!(
                        "more than {MAX_REDIRECTS} redirects"
                    )));
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
        Ok(Sources { policy, client })
    }

    /// The longest line a load accepts.
    pub fn max_line_bytes(&self) -> usize {
        self.policy.max_line_bytes
    }

    /// Opens a source for streaming. Errors that can be known before the first byte (a bad
    /// URL, a refused address, an HTTP error status, a missing file) come back here.
    pub async fn open(&self, url: &str) -> Result<SourceStream, SourceError> {
        let parsed = reqwest::Url::parse(url).map_err(|_| SourceError::BadUrl(url.to_string()))?;
        match parsed.scheme() {
            "http" | "https" => self.open_http(parsed).await,
            "file" => self.open_file(&parsed).await,
            other => Err(SourceError::Scheme(other.to_string())),
        }
    }

    async fn open_http(&self, url: reqwest::Url) -> Result<SourceStream, SourceError> {
        check_url_host(&url, &self.policy)?;
        let response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(http_error)?;
        let status = response.status();
        if !status.is_success() {
            return Err(SourceError::Status {
                status: status.as_u16(),
                url: response.url().to_string(),
            });
        }
        Ok(Box::pin(response.bytes_stream().map_err(http_error)))
    }

    async fn open_file(&self, url: &reqwest::Url) -> Result<SourceStream, SourceError> {
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
        let stream =
            tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(move |chunk| {
                chunk.map_err(|e| SourceError::File {
                    path: shown.clone(),
                    reason: e.to_string(),
                })
            });
        Ok(Box::pin(stream))
    }
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

fn http_error(error: reqwest::Error) -> SourceError {
    // Our own refusals travel inside reqwest's error: surface them as they are.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(current) = source {
        if let Some(refused) = current.downcast_ref::<SourceError>() {
            return match refused {
                SourceError::Forbidden(address) => SourceError::Forbidden(address.clone()),
                other => SourceError::Http(other.to_string()),
            };
        }
        source = current.source();
    }
    SourceError::Http(error.to_string())
}

/// Refuses a URL whose host is a literal address that is not allowed (names are checked by
/// the resolver when they are resolved).
fn check_url_host(url: &reqwest::Url, policy: &SourcePolicy) -> Result<(), SourceError> {
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(SourceError::Scheme(other.to_string())),
    }
    let address = match url.host() {
        Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
        Some(url::Host::Domain(_)) => None,
        None => return Err(SourceError::BadUrl(url.to_string())),
    };
    match address {
        Some(address) if !allowed(address, policy) => {
            Err(SourceError::Forbidden(address.to_string()))
        }
        _ => Ok(()),
    }
}

/// Whether fhirbox may connect to `address`.
pub fn allowed(address: IpAddr, policy: &SourcePolicy) -> bool {
    let address = embedded_ipv4(address).map_or(address, IpAddr::V4);
    if is_link_local(address) {
        return false;
    }
    policy.allow_private || is_public(address)
}

/// The IPv4 address an IPv6 address stands for, in the forms that reach it: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`, deprecated but routed by some stacks),
/// NAT64 (`64:ff9b::a.b.c.d` and the local-use `64:ff9b:1::/48`) and 6to4 (`2002:AABB:CCDD::`).
/// Each is judged as the IPv4 address it carries.
fn embedded_ipv4(address: IpAddr) -> Option<std::net::Ipv4Addr> {
    let IpAddr::V6(v6) = address else {
        return None;
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let low = std::net::Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        // IPv4-compatible, but not `::` and `::1` themselves.
        [0, 0, 0, 0, 0, 0, _, _] if !(s[6] == 0 && s[7] <= 1) => Some(low),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] | [0x64, 0xff9b, 1, ..] => Some(low),
        [0x2002, a, b, ..] => Some(std::net::Ipv4Addr::new(
            (a >> 8) as u8,
            a as u8,
            (b >> 8) as u8,
            b as u8,
        )),
        _ => None,
    }
}

fn is_link_local(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// A globally routable unicast address.
fn is_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 192 && b == 0 && v4.octets()[2] == 0) // IETF protocol assignments
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || a >= 240) // reserved
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfec0 // site local (deprecated)
                || first == 0x2001 && v6.segments()[1] == 0x0db8) // documentation
        }
    }
}

/// Resolves names with the system resolver, then keeps only allowed addresses.
struct CheckedResolver {
    policy: Arc<SourcePolicy>,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed_addresses: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| allowed(a.ip(), &policy))
                .collect();
            if allowed_addresses.is_empty() {
                let shown = found
                    .first()
                    .map_or(host, |a| format!("{} ({})", a.ip(), name.as_str()));
                return Err(Box::new(SourceError::Forbidden(shown))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed_addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_rules() {
        let closed = SourcePolicy::default();
        let open = SourcePolicy {
            allow_private: true,
            ..SourcePolicy::default()
        };
        let ip = |s: &str| s.parse::<IpAddr>().expect("address");
        for metadata in [
            "169.254.169.254",
            "fe80::1",
            "::ffff:169.254.169.254",
            "::a9fe:a9fe",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(!allowed(ip(metadata), &closed), "{metadata}");
            assert!(
                !allowed(ip(metadata), &open),
                "{metadata} is refused even when private is allowed"
            );
        }
        for private in [
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "127.0.0.1",
            "::1",
            "fd00::1",
            "100.64.0.1",
            "0.0.0.0",
            "::ffff:127.0.0.1",
            "::7f00:1",
            "::a00:1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::a00:1",
            "2002:7f00:1::1",
            "2002:c0a8:101::",
        ] {
            assert!(!allowed(ip(private), &closed), "{private}");
            assert!(allowed(ip(private), &open), "{private}");
        }
        for public in [
            "8.8.8.8",
            "142.250.74.78",
            "2a00:1450:4001:82b::200e",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(allowed(ip(public), &closed), "{public}");
        }
    }

    #[test]
    fn literal_hosts_are_checked_before_connecting() {
        let closed = SourcePolicy::default();
        let url = |s: &str| reqwest::Url::parse(s).expect("url");
        assert!(matches!(
            check_url_host(&url("http://169.254.169.254/latest/meta-data"), &closed),
            Err(SourceError::Forbidden(_))
        ));
        assert!(matches!(
            check_url_host(&url("http://[::1]:8080/x"), &closed),
            Err(SourceError::Forbidden(_))
        ));
        assert!(
            matches!(
                check_url_host(&url("http://0x7f.1/x"), &closed),
                Err(SourceError::Forbidden(_))
            ),
            "the URL parser normalizes tricky IPv4 forms"
        );
        assert!(
            check_url_host(&url("https://storage.googleapis.com/x.ndjson.gz"), &closed).is_ok()
        );
        assert!(matches!(
            check_url_host(&url("ftp://x/y"), &closed),
            Err(SourceError::Scheme(_))
        ));
    }
}
