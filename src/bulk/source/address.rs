//! Which addresses a source may be fetched from: literal addresses in URLs are checked
//! before connecting, host names by a resolver of our own when they are resolved (so DNS
//! rebinding and every redirect hop are checked too). Link-local addresses (cloud metadata
//! services) never; private, loopback and other non-public ones only with
//! `--allow-private-sources`; IPv6 forms that carry an IPv4 address are judged by it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::{SourceError, SourcePolicy};

/// Refuses a URL whose host is a literal address that is not allowed (names are checked by
/// the resolver when they are resolved).
pub(super) fn check_url_host(url: &reqwest::Url, policy: &SourcePolicy) -> Result<(), SourceError> {
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
pub(super) struct CheckedResolver {
    pub(super) policy: Arc<SourcePolicy>,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let looked_up = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map(|found| found.collect::<Vec<SocketAddr>>());
            let found = match looked_up {
                Ok(found) => found,
                Err(error) => {
                    return Err(Box::new(SourceError::Dns {
                        host,
                        reason: error.to_string(),
                    })
                        as Box<dyn std::error::Error + Send + Sync>)
                }
            };
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
