//! A bounded memory of credentials that passed argon2 verification, so that only the first
//! request of a client pays for the slow hash.
//!
//! Safety: the key is SHA-256 over a random per-process key, the user name and the password,
//! so the cache never holds a password or anything that can be checked offline without the
//! process's memory. Each entry records the generation of the credential it was verified
//! against (root: 0; a Client: its version id), so a changed or deleted credential stops
//! matching at once. The cache holds at most [`CAPACITY`] entries and is emptied when full:
//! the cost is one more argon2 verification per client, never a wrong answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use sha2::{Digest, Sha256};

use super::BasicCredentials;

/// Enough for every client of a busy server; small enough to ignore in memory (~100 KiB).
const CAPACITY: usize = 2048;

pub struct VerifiedCache {
    key: [u8; 32],
    entries: Mutex<HashMap<[u8; 32], i64>>,
    /// Checks in progress, by credentials: the same credentials sent by many requests at once
    /// (a client opening its connections) are checked once, the others wait for that check.
    checking: Mutex<HashMap<[u8; 32], Weak<tokio::sync::Mutex<()>>>>,
}

impl VerifiedCache {
    pub fn new() -> VerifiedCache {
        VerifiedCache {
            key: rand::random(),
            entries: Mutex::new(HashMap::new()),
            checking: Mutex::new(HashMap::new()),
        }
    }

    /// The turn of these credentials' check: hold the returned lock while checking; a
    /// request with the same credentials waits for it, then finds them in the cache.
    pub fn turn(&self, credentials: &BasicCredentials) -> Arc<tokio::sync::Mutex<()>> {
        let digest = self.digest(credentials);
        let mut checking = self
            .checking
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(turn) = checking.get(&digest).and_then(Weak::upgrade) {
            return turn;
        }
        if checking.len() >= CAPACITY {
            checking.retain(|_, turn| turn.strong_count() > 0);
        }
        let turn = Arc::new(tokio::sync::Mutex::new(()));
        checking.insert(digest, Arc::downgrade(&turn));
        turn
    }

    fn digest(&self, credentials: &BasicCredentials) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.key);
        hasher.update((credentials.user.len() as u64).to_le_bytes());
        hasher.update(credentials.user.as_bytes());
        hasher.update(credentials.password.as_bytes());
        hasher.finalize().into()
    }

    /// Whether these credentials were verified against this generation of the credential.
    pub fn contains(&self, credentials: &BasicCredentials, generation: i64) -> bool {
        let digest = self.digest(credentials);
        let entries = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.get(&digest) == Some(&generation)
    }

    pub fn insert(&self, credentials: &BasicCredentials, generation: i64) {
        let digest = self.digest(credentials);
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if entries.len() >= CAPACITY {
            entries.clear();
        }
        entries.insert(digest, generation);
    }
}

impl Default for VerifiedCache {
    fn default() -> Self {
        VerifiedCache::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(user: &str, password: &str) -> BasicCredentials {
        BasicCredentials {
            user: user.into(),
            password: password.into(),
        }
    }

    #[test]
    fn remembers_per_generation_and_stays_bounded() {
        let cache = VerifiedCache::new();
        cache.insert(&creds("c", "s"), 7);
        assert!(cache.contains(&creds("c", "s"), 7));
        assert!(
            !cache.contains(&creds("c", "s"), 8),
            "a changed credential must not match"
        );
        assert!(!cache.contains(&creds("c", "other"), 7));
        assert!(
            !cache.contains(&creds("cs", ""), 7),
            "user/password split is part of the key"
        );
        for i in 0..(CAPACITY * 2) {
            cache.insert(&creds(&format!("u{i}"), "p"), 1);
        }
        let len = cache.entries.lock().map(|e| e.len()).unwrap_or(usize::MAX);
        assert!(len <= CAPACITY);
    }
}
