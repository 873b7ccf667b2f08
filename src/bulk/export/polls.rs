//! The accounting of status polls the IG asks for: a client polling a job faster than it was
//! told to (`Retry-After`) gets 429 with `Retry-After` instead of a database query.
//!
//! Per job (the status URL is its owner's alone), a token bucket: `burst` polls at once, then
//! `per_second`. A refused poll costs nothing, so a client that waits as told is served at
//! once. Kept in memory per process: a client whose polls reach several processes is limited
//! by each, which is still a limit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Jobs tracked before the oldest are forgotten (bounded memory).
const MAX_JOBS: usize = 10_000;

/// Polls a job may have at once before the rate applies.
const BURST: f64 = 5.0;

/// Status polls allowed per job.
#[derive(Debug)]
pub struct Polls {
    per_second: f64,
    jobs: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Polls {
    /// `per_second` polls per job after a burst of [`BURST`]; 0 turns the limit off.
    pub fn new(per_second: f64) -> Polls {
        Polls {
            per_second,
            jobs: Mutex::new(HashMap::new()),
        }
    }

    /// Admits a poll of `job`, or says how long the client must wait.
    pub fn admit(&self, job: &str) -> Result<(), Duration> {
        if self.per_second <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.len() >= MAX_JOBS && !jobs.contains_key(job) {
            forget_idle(&mut jobs, now, self.per_second);
        }
        let bucket = jobs.entry(job.to_string()).or_insert(Bucket {
            tokens: BURST,
            at: now,
        });
        let refilled =
            bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * self.per_second;
        bucket.tokens = refilled.min(BURST);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }
}

impl Polls {
    /// Forgets a job's polls (it was cancelled: its status is a plain 404 from now on).
    pub fn forget(&self, job: &str) {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(job);
    }
}

/// Drops the buckets that are full again (their jobs are not being polled), or, if none are,
/// the half that was polled longest ago.
fn forget_idle(jobs: &mut HashMap<String, Bucket>, now: Instant, per_second: f64) {
    let full = Duration::from_secs_f64(BURST / per_second);
    jobs.retain(|_, b| now.duration_since(b.at) < full);
    if jobs.len() >= MAX_JOBS {
        let mut times: Vec<Instant> = jobs.values().map(|b| b.at).collect();
        times.sort();
        let cut = times[times.len() / 2];
        jobs.retain(|_, b| b.at > cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let polls = Polls::new(2.0);
        for _ in 0..5 {
            assert!(polls.admit("a").is_ok());
        }
        let wait = polls.admit("a").expect_err("too fast");
        assert!(wait <= Duration::from_millis(500), "{wait:?}");
        assert!(polls.admit("b").is_ok(), "another job has its own bucket");
        assert!(Polls::new(0.0).admit("a").is_ok());
    }
}
