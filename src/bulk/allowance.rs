//! How much long-running bulk work runs at once: `$dump`, `$dump-csv`, `$dump-sql` and
//! `$load` each hold a database connection for as long as they stream, and a slow or stalled
//! client can make that minutes. They take their connections from a pool of their own, and
//! a permit from this allowance first: at most `total` at once on the server, `per_subject`
//! for one subject (root included). Past either, the request is refused at once with 429 and
//! `Retry-After`, so bulk work can neither starve interactive requests (they have the other
//! pool) nor one subject starve the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Limits of concurrent bulk work (`serve --bulk-*`).
#[derive(Debug, Clone)]
pub struct AllowanceSettings {
    pub total: usize,
    pub per_subject: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the server runs its limit of {0} bulk operations at once (--bulk-streams); try again when one ended")]
    Server(usize),
    #[error("{subject} runs its limit of {limit} bulk operations at once (--bulk-streams-per-subject); try again when one of them ended")]
    Subject { subject: String, limit: usize },
}

/// The allowance of one server.
#[derive(Clone)]
pub struct Allowance {
    settings: AllowanceSettings,
    running: Arc<Mutex<Running>>,
}

#[derive(Default)]
struct Running {
    total: usize,
    by_subject: HashMap<String, usize>,
}

/// A running bulk operation's place; dropping it gives the place back.
pub struct Permit {
    running: Arc<Mutex<Running>>,
    subject: String,
}

impl Allowance {
    pub fn new(settings: AllowanceSettings) -> Allowance {
        Allowance {
            settings,
            running: Arc::default(),
        }
    }

    /// The most bulk operations that run at once.
    pub fn total(&self) -> usize {
        self.settings.total
    }

    /// A place for one bulk operation of `subject`, or why there is none.
    pub fn start(&self, subject: &str) -> Result<Permit, Refused> {
        let mut running = lock(&self.running);
        if running.total >= self.settings.total {
            return Err(Refused::Server(self.settings.total));
        }
        let mine = running.by_subject.get(subject).copied().unwrap_or(0);
        if mine >= self.settings.per_subject {
            return Err(Refused::Subject {
                subject: subject.to_string(),
                limit: self.settings.per_subject,
            });
        }
        running.total += 1;
        running.by_subject.insert(subject.to_string(), mine + 1);
        Ok(Permit {
            running: self.running.clone(),
            subject: subject.to_string(),
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut running = lock(&self.running);
        running.total = running.total.saturating_sub(1);
        if let Some(count) = running.by_subject.get_mut(&self.subject) {
            *count -= 1;
            if *count == 0 {
                running.by_subject.remove(&self.subject);
            }
        }
    }
}

fn lock(running: &Mutex<Running>) -> std::sync::MutexGuard<'_, Running> {
    running
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_server_and_per_subject_and_places_come_back() {
        let allowance = Allowance::new(AllowanceSettings {
            total: 3,
            per_subject: 2,
        });
        let a1 = allowance.start("a").expect("a first");
        let _a2 = allowance.start("a").expect("a second");
        assert!(matches!(allowance.start("a"), Err(Refused::Subject { .. })));
        let _b1 = allowance.start("b").expect("b first");
        assert!(matches!(allowance.start("c"), Err(Refused::Server(3))));
        drop(a1);
        assert!(allowance.start("c").is_ok(), "a place came back");
    }
}
