//! The root admin's password: configured, or generated once and kept only as a hash.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use argon2::password_hash::PasswordHashString;
use rand::distr::{Alphanumeric, SampleString};

use super::secret::{hash_secret, verify_secret};
use super::AuthError;

/// The file, inside the data directory, holding the generated password's argon2 hash.
pub const HASH_FILE: &str = "root-password.argon2";

/// Length of a generated password: 24 alphanumerics, about 143 bits.
const GENERATED_LENGTH: usize = 24;

/// Root's password, as an argon2 hash.
pub struct RootPassword {
    hash: PasswordHashString,
}

/// What [`RootPassword::load_or_create`] did, so the caller can tell the user.
pub enum Origin {
    /// From `FHIRBOX_ADMIN_PASSWORD` / `--admin-password`.
    Configured,
    /// The hash in the data directory, generated on an earlier start.
    Stored(PathBuf),
    /// Generated now: the password, to be printed once, and where its hash went.
    Generated {
        password: String,
        hash_file: PathBuf,
    },
}

impl RootPassword {
    /// The configured password, else the stored hash, else a new generated password.
    pub fn load_or_create(
        configured: Option<&str>,
        data_dir: &Path,
    ) -> Result<(RootPassword, Origin), AuthError> {
        if let Some(password) = configured {
            return Ok((RootPassword::from_password(password)?, Origin::Configured));
        }
        let hash_file = data_dir.join(HASH_FILE);
        if let Ok(text) = std::fs::read_to_string(&hash_file) {
            let hash = PasswordHashString::new(text.trim())
                .map_err(|e| AuthError::Hashing(format!("{}: {e}", hash_file.display())))?;
            return Ok((RootPassword { hash }, Origin::Stored(hash_file)));
        }
        let password = Alphanumeric.sample_string(&mut rand::rng(), GENERATED_LENGTH);
        let root = RootPassword::from_password(&password)?;
        std::fs::create_dir_all(data_dir)
            .map_err(|e| AuthError::Hashing(format!("creating {}: {e}", data_dir.display())))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&hash_file)
            .map_err(|e| AuthError::Hashing(format!("creating {}: {e}", hash_file.display())))?;
        writeln!(file, "{}", root.hash.as_str())
            .map_err(|e| AuthError::Hashing(format!("writing {}: {e}", hash_file.display())))?;
        Ok((
            root,
            Origin::Generated {
                password,
                hash_file,
            },
        ))
    }

    pub fn from_password(password: &str) -> Result<RootPassword, AuthError> {
        Ok(RootPassword {
            hash: hash_secret(password)?,
        })
    }

    /// The argon2 hash (PHC string) to verify a password against.
    pub fn hash(&self) -> &str {
        self.hash.as_str()
    }

    /// Verifies a password against the hash (slow on purpose: see [`super::guard`]).
    pub fn verify(&self, password: &str) -> bool {
        verify_secret(self.hash.as_str(), password)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn generated_password_is_printed_once_and_only_its_hash_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (root, origin) = RootPassword::load_or_create(None, dir.path()).expect("created");
        let Origin::Generated {
            password,
            hash_file,
        } = origin
        else {
            panic!("expected a generated password")
        };
        let stored = std::fs::read_to_string(&hash_file).expect("hash file");
        assert!(stored.starts_with("$argon2id$"), "{stored}");
        assert!(!stored.contains(&password));
        let mode = std::fs::metadata(&hash_file)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(root.verify(&password));
        assert!(!root.verify("wrong"));

        let (again, origin) = RootPassword::load_or_create(None, dir.path()).expect("loaded");
        assert!(matches!(origin, Origin::Stored(_)));
        assert!(again.verify(&password));
    }
}
