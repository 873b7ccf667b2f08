//! What stands between a stranger and argon2: password checks are slow and take 19 MiB each on
//! purpose, so an unlimited stream of wrong passwords would exhaust memory and CPU, and
//! would let anyone guess without limit.
//!
//! - **A bounded pool.** At most `concurrency` checks run at once (default: one per core), and
//!   at most `queue` more wait for a place; past that an attempt is refused at once with
//!   503 and `Retry-After` (nothing allocated for it).
//! - **Per client address**, a token bucket of failed attempts: `burst` of them, refilled at
//!   `per_minute`. An attempt takes a token before its check and gives it back if the password
//!   was right, so only failures count; with the bucket empty, attempts from that address are
//!   refused at once with 429 and `Retry-After`. IPv6 addresses count by their /64 (one host
//!   owns a whole /64).
//! - **Per user name**, an exponential back-off: after [`QUIET_FAILURES`] failures of a name
//!   within a minute, each attempt for it waits `50 ms * 2^(failures - 10)` before its check,
//!   never more than [`MAX_DELAY`]. It is a delay and not a refusal on purpose: a refusal per
//!   name would let anyone lock any account (root included) out for as long as they keep
//!   failing; the delay slows guessing at one name from many addresses, and the right
//!   password still gets through within about a second.
//!
//! Credentials verified before are remembered ([`super::cache`]) and never reach this guard:
//! a client that was working when an attack began keeps working.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::AuthError;

/// Failures of one user name in a minute before its attempts are delayed.
pub const QUIET_FAILURES: u32 = 10;

/// The longest delay of an attempt for a user name under attack.
pub const MAX_DELAY: Duration = Duration::from_secs(1);

/// How long a waiting check may wait for a place before it is refused as busy.
const MAX_WAIT: Duration = Duration::from_secs(5);

/// Entries kept per table before old ones are dropped (bounded memory whatever the number of
/// addresses and names tried).
const MAX_ENTRIES: usize = 100_000;

/// Limits of the guard (`serve --auth-*`).
#[derive(Debug, Clone)]
pub struct GuardSettings {
    /// Password checks running at once.
    pub concurrency: usize,
    /// Password checks waiting for a place; more are refused (503).
    pub queue: usize,
    /// Failed attempts an address may make at once before it must wait.
    pub burst: u32,
    /// Failed attempts an address may make per minute, after its burst.
    pub per_minute: u32,
}

impl Default for GuardSettings {
    fn default() -> GuardSettings {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        GuardSettings {
            concurrency: cores,
            queue: 8 * cores,
            burst: 10,
            per_minute: 30,
        }
    }
}

/// The guard shared by all requests.
pub struct Guard {
    settings: GuardSettings,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    addresses: Mutex<HashMap<IpAddr, Bucket>>,
    names: Mutex<HashMap<String, Failures>>,
}

/// A token bucket of failed attempts.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Recent failures of a user name (the count decays by half every 30 seconds).
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: f64,
    at: Instant,
}

/// An admitted attempt: report how it went with [`Attempt::finish`].
pub struct Attempt<'g> {
    guard: &'g Guard,
    address: Option<IpAddr>,
    user: String,
}

impl Guard {
    pub fn new(settings: GuardSettings) -> Guard {
        Guard {
            slots: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            settings,
            waiting: AtomicUsize::new(0),
            addresses: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
        }
    }

    /// Admits a password attempt for `user` from `address`, or refuses it (429) because the
    /// address failed too often; waits the user name's back-off, if any.
    pub async fn admit(
        &self,
        user: &str,
        address: Option<IpAddr>,
    ) -> Result<Attempt<'_>, AuthError> {
        let address = address.map(group);
        if let Some(address) = address {
            self.take_token(address)?;
        }
        let attempt = Attempt {
            guard: self,
            address,
            user: user.to_string(),
        };
        let delay = self.delay_for(user);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(attempt)
    }

    /// Runs a password check on the bounded pool (on a blocking thread), or refuses it as busy.
    pub async fn check<F>(&self, check: F) -> Result<bool, AuthError>
    where
        F: FnOnce() -> bool + Send + 'static,
    {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.settings.queue {
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    return Err(AuthError::Busy);
                }
                let acquired =
                    tokio::time::timeout(MAX_WAIT, self.slots.clone().acquire_owned()).await;
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                match acquired {
                    Ok(Ok(permit)) => permit,
                    _ => return Err(AuthError::Busy),
                }
            }
        };
        let verified = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            check()
        })
        .await
        .map_err(|e| AuthError::Hashing(e.to_string()))?;
        Ok(verified)
    }

    fn take_token(&self, address: IpAddr) -> Result<(), AuthError> {
        let (burst, rate) = (
            f64::from(self.settings.burst.max(1)),
            f64::from(self.settings.per_minute.max(1)) / 60.0,
        );
        let now = Instant::now();
        let mut addresses = lock(&self.addresses);
        if addresses.len() >= MAX_ENTRIES {
            // Forget the addresses whose buckets are full again: they owe nothing.
            addresses.retain(|_, b| refilled(*b, now, burst, rate) < burst);
        }
        let bucket = addresses.entry(address).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let tokens = refilled(*bucket, now, burst, rate);
        if tokens < 1.0 {
            let retry_after = Duration::from_secs_f64(((1.0 - tokens) / rate).ceil().max(1.0));
            *bucket = Bucket { tokens, at: now };
            return Err(AuthError::Throttled { retry_after });
        }
        *bucket = Bucket {
            tokens: tokens - 1.0,
            at: now,
        };
        Ok(())
    }

    /// The back-off of a user name: none until [`QUIET_FAILURES`] recent failures.
    fn delay_for(&self, user: &str) -> Duration {
        let now = Instant::now();
        let failures = lock(&self.names)
            .get(user)
            .map_or(0.0, |f| decayed(*f, now));
        if failures < f64::from(QUIET_FAILURES) {
            return Duration::ZERO;
        }
        let exponent = (failures - f64::from(QUIET_FAILURES)).min(10.0);
        Duration::from_millis(50)
            .mul_f64(2f64.powf(exponent))
            .min(MAX_DELAY)
    }
}

impl Attempt<'_> {
    /// Records how the check went: a right password gives the address its token back; a
    /// wrong one counts against the user name.
    pub fn finish(self, verified: bool) {
        let now = Instant::now();
        if verified {
            if let Some(address) = self.address {
                let burst = f64::from(self.guard.settings.burst.max(1));
                if let Some(bucket) = lock(&self.guard.addresses).get_mut(&address) {
                    bucket.tokens = (bucket.tokens + 1.0).min(burst);
                }
            }
            return;
        }
        let mut names = lock(&self.guard.names);
        if names.len() >= MAX_ENTRIES {
            names.retain(|_, f| decayed(*f, now) >= 1.0);
        }
        let entry = names.entry(self.user).or_insert(Failures {
            count: 0.0,
            at: now,
        });
        *entry = Failures {
            count: decayed(*entry, now) + 1.0,
            at: now,
        };
    }
}

fn refilled(bucket: Bucket, now: Instant, burst: f64, rate: f64) -> f64 {
    (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(burst)
}

fn decayed(failures: Failures, now: Instant) -> f64 {
    let halves = now.duration_since(failures.at).as_secs_f64() / 30.0;
    failures.count * 0.5f64.powf(halves)
}

/// The address an attempt counts against: IPv4 as is, IPv6 by its /64.
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard::new(GuardSettings {
            concurrency: 1,
            queue: 1,
            burst: 3,
            per_minute: 60,
        })
    }

    #[tokio::test]
    async fn an_address_has_a_budget_of_failures_and_successes_cost_nothing() {
        let guard = guard();
        let here = Some("10.0.0.1".parse().expect("ip"));
        for _ in 0..10 {
            guard
                .admit("root", here)
                .await
                .expect("admitted")
                .finish(true);
        }
        for _ in 0..3 {
            guard
                .admit("root", here)
                .await
                .expect("admitted")
                .finish(false);
        }
        match guard.admit("root", here).await {
            Err(AuthError::Throttled { retry_after }) => {
                assert!(retry_after <= Duration::from_secs(1))
            }
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
        let elsewhere = Some("10.0.0.2".parse().expect("ip"));
        assert!(
            guard.admit("root", elsewhere).await.is_ok(),
            "another address is not blocked"
        );
    }

    #[test]
    fn a_name_under_attack_is_delayed_never_more_than_the_cap() {
        let guard = guard();
        assert_eq!(guard.delay_for("root"), Duration::ZERO);
        for _ in 0..50 {
            Attempt {
                guard: &guard,
                address: None,
                user: "root".into(),
            }
            .finish(false);
        }
        assert_eq!(guard.delay_for("root"), MAX_DELAY);
        assert_eq!(guard.delay_for("other"), Duration::ZERO);
    }

    #[test]
    fn ipv6_counts_by_its_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().expect("ip");
        assert_eq!(group(a), group(b));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("ip");
        assert_eq!(group(mapped), "10.1.2.3".parse::<IpAddr>().expect("ip"));
    }
}
