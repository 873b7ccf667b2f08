//! How many connections fhirbox holds: at most `max` in all and `per_address` from one client
//! address (IPv6 by its /64), each a file descriptor. A connection past either bound is
//! closed at once, before a byte is read, so a flood of silent connections from one place
//! cannot take the descriptors everyone else needs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The connections held now.
pub struct Admission {
    max: usize,
    per_address: usize,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One admitted connection; its place is given back when this is dropped.
pub struct Ticket {
    admission: Arc<Admission>,
    address: IpAddr,
}

impl Admission {
    pub fn new(max: usize, per_address: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max: max.max(1),
            per_address: per_address.max(1),
            held: Mutex::new(Held::default()),
        })
    }

    /// A place for a connection from `address`, if there is one.
    pub fn admit(self: &Arc<Admission>, address: IpAddr) -> Option<Ticket> {
        let address = group(address);
        let mut held = self.lock();
        let mine = held.by_address.get(&address).copied().unwrap_or(0);
        if held.total >= self.max || mine >= self.per_address {
            return None;
        }
        held.total += 1;
        held.by_address.insert(address, mine + 1);
        Some(Ticket {
            admission: self.clone(),
            address,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut held = self.admission.lock();
        held.total = held.total.saturating_sub(1);
        if let Some(count) = held.by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                held.by_address.remove(&self.address);
            }
        }
    }
}

/// The address a connection counts against: IPv4 as is (an IPv4-mapped IPv6 address as its
/// IPv4), IPv6 by its /64 (one host owns a whole /64).
fn group(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Raises this process's soft limit of open files to its hard limit (a server holding many
/// connections needs them; the default soft limit is often 1024), and returns the limit in
/// force.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_per_address_and_in_all_are_given_back() {
        let admission = Admission::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = admission.admit(a).expect("a place");
        let second = admission.admit(a).expect("a place");
        assert!(admission.admit(a).is_none(), "two per address");
        let third = admission.admit(b).expect("another address");
        assert!(admission.admit(b).is_none(), "three in all");
        drop(first);
        assert!(admission.admit(b).is_some(), "a place given back");
        drop((second, third));
        let v6: IpAddr = "2001:db8::1".parse().expect("ip");
        let same: IpAddr = "2001:db8::2".parse().expect("ip");
        let _one = admission.admit(v6).expect("a place");
        let _two = admission.admit(same).expect("a place");
        assert!(admission.admit(v6).is_none(), "one /64 is one address");
    }
}
