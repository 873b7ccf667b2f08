//! The managed local PostgreSQL: `fhirbox serve` without a database URL creates (first time),
//! starts and stops a private cluster inside its data directory.
//!
//! Guarantees:
//! - The cluster listens on a Unix socket in a 0700 directory inside the data directory and on
//!   no TCP port, so only fhirbox's own OS user (and root) can reach it.
//! - When fhirbox runs as root, PostgreSQL (which refuses to run as root) runs as `postgres`.
//! - The server is started with `pg_ctl` as a daemon, so a fhirbox killed with SIGKILL leaves it
//!   running; the next start finds it (`pg_ctl status`) and reuses it. A stale `postmaster.pid`
//!   (PostgreSQL itself was killed) is handled by PostgreSQL's own start-up, which recovers from
//!   its WAL: no manual clean-up, no committed data lost.
//! - `initdb` runs into a temporary directory that is renamed into place only when complete, so
//!   an interrupted first start never leaves a half-made cluster behind.
//!
//! The same pieces ([`PgBinaries`], [`RunAs`], [`init_cluster`]) serve the test and benchmark
//! harnesses, which run a [`throwaway::ThrowawayCluster`] in the foreground instead.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use sha2::{Digest, Sha256};

pub mod throwaway;

/// Where PostgreSQL binaries are searched after `PATH`.
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";

/// A Unix socket path must fit `sockaddr_un.sun_path` (108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The socket file name PostgreSQL creates for its default port.
const SOCKET_FILE: &str = ".s.PGSQL.5432";

/// Where a cluster goes when the data directory is not reachable by the `postgres` user (root
/// running fhirbox from a 0700 home directory).
const RELOCATED_ROOT: &str = "/var/lib/fhirbox/clusters";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or under \
         {DEBIAN_PG_ROOT}/*/bin: install them (Debian/Ubuntu: `apt-get install postgresql`) \
         or pass --database-url"
    )]
    NoBinaries,
    #[error("fhirbox runs as root but there is no `postgres` OS user to run PostgreSQL as: create one (`useradd --system postgres`) or run fhirbox as another user")]
    NoPostgresUser,
    #[error("the socket path {0} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket allows: use a shorter --data-dir")]
    SocketPathTooLong(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{what} failed ({status}): {output}")]
    Command {
        what: String,
        status: String,
        output: String,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

/// The directory holding one PostgreSQL installation's server binaries.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    bindir: PathBuf,
}

impl PgBinaries {
    /// Finds `initdb`, `pg_ctl` and `postgres` side by side: first on `PATH`, then the newest
    /// version under `/usr/lib/postgresql/*/bin`.
    pub fn find() -> Result<PgBinaries, ClusterError> {
        PgBinaries::find_in(std::env::var_os("PATH"), Path::new(DEBIAN_PG_ROOT))
    }

    fn find_in(
        path_var: Option<std::ffi::OsString>,
        versions_root: &Path,
    ) -> Result<PgBinaries, ClusterError> {
        let complete = |dir: &Path| {
            ["initdb", "pg_ctl", "postgres"]
                .iter()
                .all(|tool| dir.join(tool).is_file())
        };
        let on_path = path_var
            .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
            .unwrap_or_default();
        if let Some(dir) = on_path.into_iter().find(|dir| complete(dir)) {
            return Ok(PgBinaries { bindir: dir });
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(versions_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = entry.path().join("bin");
                complete(&bin).then_some((version, bin))
            })
            .collect();
        versions.sort();
        versions
            .pop()
            .map(|(_, bindir)| PgBinaries { bindir })
            .ok_or(ClusterError::NoBinaries)
    }

    /// A tool of the same installation: beside `initdb`, or beside what `initdb` links to (a
    /// directory on `PATH` may link the three server binaries alone, not `pg_basebackup`).
    pub fn tool(&self, name: &str) -> PathBuf {
        let beside = self.bindir.join(name);
        if beside.is_file() {
            return beside;
        }
        std::fs::canonicalize(self.bindir.join("initdb"))
            .ok()
            .and_then(|initdb| initdb.parent().map(|dir| dir.join(name)))
            .filter(|linked| linked.is_file())
            .unwrap_or(beside)
    }
}

/// The OS user PostgreSQL runs as: fhirbox's own user, or `postgres` when fhirbox is root.
#[derive(Debug, Clone, Copy)]
pub struct RunAs {
    /// `Some` when fhirbox is root and must switch user for every PostgreSQL command.
    switch_to: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
}

impl RunAs {
    pub fn detect() -> Result<RunAs, ClusterError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(RunAs { switch_to: None });
        }
        let user = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .ok_or(ClusterError::NoPostgresUser)?;
        Ok(RunAs {
            switch_to: Some((user.uid, user.gid)),
        })
    }

    /// A command that will run as this user.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        if let Some((uid, gid)) = self.switch_to {
            // std sets the gid, drops supplementary groups and then sets the uid before exec.
            command.uid(uid.as_raw()).gid(gid.as_raw());
        }
        // PostgreSQL reads these; a caller's environment must not redirect it elsewhere.
        for var in ["PGDATA", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE"] {
            command.env_remove(var);
        }
        command.env("LC_ALL", "C");
        command
    }

    /// Makes `path` owned by this user (a no-op unless switching user).
    pub fn chown(&self, path: &Path) -> Result<(), ClusterError> {
        if let Some((uid, gid)) = self.switch_to {
            nix::unistd::chown(path, Some(uid), Some(gid)).map_err(|errno| ClusterError::Io {
                context: format!("chown {}", path.display()),
                source: errno.into(),
            })?;
        }
        Ok(())
    }

    /// Whether this user can search (traverse) every directory on the way to `path`.
    fn can_reach(&self, path: &Path) -> bool {
        let Some((uid, gid)) = self.switch_to else {
            return true;
        };
        path.ancestors().skip(1).all(|dir| {
            let Ok(meta) = std::fs::metadata(dir) else {
                return true; // not created yet: we will create it with the right mode
            };
            let mode = meta.permissions().mode();
            if meta.uid() == uid.as_raw() {
                mode & 0o100 != 0
            } else if meta.gid() == gid.as_raw() {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            }
        })
    }
}

/// Runs a command to completion, turning a failure into an error that carries its output.
pub fn run(mut command: Command, what: &str) -> Result<Output, ClusterError> {
    let output = command
        .output()
        .map_err(io_error(format!("starting {what}")))?;
    if output.status.success() {
        return Ok(output);
    }
    let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stdout));
    Err(ClusterError::Command {
        what: what.to_string(),
        status: output.status.to_string(),
        output: text.trim().to_string(),
    })
}

/// Creates a fresh cluster at `pgdata` (superuser `postgres`, UTF8, C locale, trust on the local
/// socket, which only the owner can reach) unless one is already there.
pub fn init_cluster(bins: &PgBinaries, run_as: &RunAs, pgdata: &Path) -> Result<(), ClusterError> {
    if pgdata.join("PG_VERSION").is_file() {
        return Ok(());
    }
    let staging = pgdata.with_extension("initdb-tmp");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_error(format!(
            "removing the leftover {}",
            staging.display()
        )))?;
    }
    let parent = staging.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_error(format!("creating {}", parent.display())))?;
    std::fs::create_dir(&staging).map_err(io_error(format!("creating {}", staging.display())))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700))
        .map_err(io_error(format!("chmod {}", staging.display())))?;
    run_as.chown(&staging)?;
    let mut initdb = run_as.command(bins.tool("initdb"));
    initdb.arg("-D").arg(&staging).args([
        "-U",
        "postgres",
        "-E",
        "UTF8",
        "--locale=C",
        "--auth=trust",
        "--no-instructions",
    ]);
    run(initdb, "initdb")?;
    // Our settings live in a file of their own, rewritten at every start.
    let conf = staging.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).map_err(io_error("reading postgresql.conf"))?;
    text.push_str("\ninclude_if_exists = 'fhirbox.conf'\n");
    std::fs::write(&conf, text).map_err(io_error("writing postgresql.conf"))?;
    std::fs::rename(&staging, pgdata).map_err(io_error(format!(
        "renaming {} to {}",
        staging.display(),
        pgdata.display()
    )))
}

/// Writes `fhirbox.conf` into a cluster: socket only, in `socket_dir`, plus `extra` settings.
pub fn write_settings(
    run_as: &RunAs,
    pgdata: &Path,
    socket_dir: &Path,
    extra: &[(&str, &str)],
) -> Result<(), ClusterError> {
    let socket = socket_dir.join(SOCKET_FILE);
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(ClusterError::SocketPathTooLong(
            socket.display().to_string(),
        ));
    }
    let quote = |value: &str| format!("'{}'", value.replace('\'', "''"));
    let mut text =
        String::from("# Written by fhirbox at every start; edit postgresql.conf instead.\n");
    text.push_str("listen_addresses = ''\n");
    text.push_str(&format!(
        "unix_socket_directories = {}\n",
        quote(&socket_dir.to_string_lossy())
    ));
    text.push_str("unix_socket_permissions = 0700\n");
    for (name, value) in extra {
        text.push_str(&format!("{name} = {}\n", quote(value)));
    }
    let path = pgdata.join("fhirbox.conf");
    std::fs::write(&path, text).map_err(io_error(format!("writing {}", path.display())))?;
    run_as.chown(&path)
}

/// Settings for the managed cluster: durable (fsync stays on), with room for bulk loads.
///
/// Its log never keeps a failing statement's text (`log_min_error_statement = panic`: a
/// client's 16 MB query failing three times wrote 47 MB before), and stays bounded: one file
/// for each minute of the hour (`log/postgresql-MM.log`, 60 at most), each emptied when its
/// minute comes round an hour later (PostgreSQL reopens the same name, appending, when a size
/// limit is reached within the minute, so there is none). The `$dump-sql` roles log none of
/// their errors at all (`roles.rs`).
const MANAGED_SETTINGS: &[(&str, &str)] = &[
    ("max_connections", "200"),
    ("shared_buffers", "256MB"),
    ("max_wal_size", "4GB"),
    ("checkpoint_timeout", "15min"),
    ("log_min_error_statement", "panic"),
    ("logging_collector", "on"),
    ("log_directory", "log"),
    ("log_filename", "postgresql-%M.log"),
    ("log_rotation_age", "1min"),
    ("log_rotation_size", "0"),
    ("log_truncate_on_rotation", "on"),
];

/// The managed cluster of one data directory.
#[derive(Debug)]
pub struct ManagedCluster {
    bins: PgBinaries,
    run_as: RunAs,
    pgdata: PathBuf,
    socket_dir: PathBuf,
    log_file: PathBuf,
}

impl ManagedCluster {
    /// Finds the binaries and lays out the directories (creating the cluster the first time).
    pub fn prepare(data_dir: &Path) -> Result<ManagedCluster, ClusterError> {
        let bins = PgBinaries::find()?;
        let run_as = RunAs::detect()?;
        std::fs::create_dir_all(data_dir)
            .map_err(io_error(format!("creating {}", data_dir.display())))?;
        let data_dir = std::fs::canonicalize(data_dir)
            .map_err(io_error(format!("resolving {}", data_dir.display())))?;
        let root = cluster_root(&run_as, &data_dir)?;
        let socket_dir = root.join("run");
        for dir in [&root, &socket_dir] {
            std::fs::create_dir_all(dir)
                .map_err(io_error(format!("creating {}", dir.display())))?;
        }
        // The data directory only needs to be traversable by PostgreSQL's user; the socket
        // directory is private to it.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))
            .map_err(io_error(format!("chmod {}", root.display())))?;
        std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error(format!("chmod {}", socket_dir.display())))?;
        run_as.chown(&socket_dir)?;
        let pgdata = root.join("postgres");
        init_cluster(&bins, &run_as, &pgdata)?;
        write_settings(&run_as, &pgdata, &socket_dir, MANAGED_SETTINGS)?;
        Ok(ManagedCluster {
            bins,
            run_as,
            log_file: socket_dir.join("postgresql.log"),
            pgdata,
            socket_dir,
        })
    }

    /// Whether a live postmaster runs this cluster. Its pid file must name a process that is
    /// alive (not a zombie) and is a postgres, and `pg_ctl status` must agree.
    pub fn is_running(&self) -> bool {
        if self.postmaster().is_none_or(|pid| !is_live_postgres(pid)) {
            return false;
        }
        let mut status = self.run_as.command(self.bins.tool("pg_ctl"));
        status.arg("status").arg("-D").arg(&self.pgdata);
        status.output().is_ok_and(|out| out.status.success())
    }

    /// A cheap look (no subprocess): whether the pid file names a live postgres process.
    pub fn seems_alive(&self) -> bool {
        self.postmaster().is_some_and(is_live_postgres)
    }

    /// The pid in `postmaster.pid`, if there is one.
    fn postmaster(&self) -> Option<i32> {
        std::fs::read_to_string(self.pgdata.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Starts the cluster, or adopts the one a previous fhirbox left running.
    pub fn start(&self) -> Result<StartOutcome, ClusterError> {
        if self.is_running() {
            return Ok(StartOutcome::AlreadyRunning);
        }
        self.remove_stale_pid_file()?;
        let mut attempt = 0;
        loop {
            match self.pg_ctl_start() {
                Ok(()) => return Ok(StartOutcome::Started),
                // After a crash, the dead postmaster's children may still hold its shared
                // memory for a moment; PostgreSQL refuses to start until they are gone.
                Err(error) if attempt < 20 && error.to_string().contains("still in use") => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// A pid file whose process is gone is normally cleaned up by PostgreSQL itself. But it
    /// treats any pid that `kill(pid, 0)` finds as a live postmaster, and that includes a
    /// zombie (the killed postmaster, when nothing reaps orphans: a container without an
    /// init) and an unrelated process that reused the pid. Neither can be ours: remove the
    /// data directory's and the socket's lock files (and the dead socket).
    fn remove_stale_pid_file(&self) -> Result<(), ClusterError> {
        let Some(pid) = self.postmaster() else {
            return Ok(());
        };
        if is_live_postgres(pid) {
            return Ok(());
        }
        tracing::warn!(pid, "removing the lock files of a PostgreSQL that is gone");
        let socket = self.socket_dir.join(SOCKET_FILE);
        let socket_lock = self.socket_dir.join(format!("{SOCKET_FILE}.lock"));
        for file in [self.pgdata.join("postmaster.pid"), socket_lock, socket] {
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(io_error(format!("removing {}", file.display()))(error)),
            }
        }
        Ok(())
    }

    fn pg_ctl_start(&self) -> Result<(), ClusterError> {
        let mut start = self.run_as.command(self.bins.tool("pg_ctl"));
        start
            .arg("start")
            .arg("-D")
            .arg(&self.pgdata)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-w", "-t", "300"]);
        // The daemon must not die with fhirbox's terminal session (Ctrl-C goes to the whole
        // foreground process group): give pg_ctl, and so the postmaster, a session of its own.
        unsafe {
            start.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        run(start, "pg_ctl start").map_err(|error| self.with_log_tail(error))?;
        Ok(())
    }

    /// Stops the cluster with a fast shutdown (open transactions roll back, data is flushed).
    pub fn stop(&self) -> Result<(), ClusterError> {
        let mut stop = self.run_as.command(self.bins.tool("pg_ctl"));
        stop.arg("stop")
            .arg("-D")
            .arg(&self.pgdata)
            .args(["-m", "fast", "-w", "-t", "120"]);
        run(stop, "pg_ctl stop").map(|_| ())
    }

    /// How fhirbox connects: over the socket, as the `postgres` superuser, database `postgres`.
    pub fn connection_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.socket_dir)
            .user("postgres")
            .dbname("postgres")
            .application_name("fhirbox")
            .connect_timeout(Duration::from_secs(10));
        config
    }

    pub fn pgdata(&self) -> &Path {
        &self.pgdata
    }

    fn with_log_tail(&self, error: ClusterError) -> ClusterError {
        let tail = std::fs::read_to_string(&self.log_file)
            .map(|log| {
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(10)..].join("\n")
            })
            .unwrap_or_default();
        match error {
            ClusterError::Command {
                what,
                status,
                output,
            } => ClusterError::Command {
                what,
                status,
                output: format!(
                    "{output}\nlast lines of {}:\n{tail}",
                    self.log_file.display()
                ),
            },
            other => other,
        }
    }
}

/// Whether `pid` is a running (not zombie) postgres process, from `/proc`.
fn is_live_postgres(pid: i32) -> bool {
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // `pid (comm) state ...`: the state follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    if matches!(state, None | Some('Z') | Some('X')) {
        return false;
    }
    std::fs::read(proc_dir.join("cmdline"))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains("postgres"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOutcome {
    Started,
    AlreadyRunning,
}

/// The directory that holds the cluster: the data directory itself, unless PostgreSQL's user
/// cannot traverse to it (root in a 0700 home); then a directory under /var/lib named after
/// the data directory, which is recorded in the data directory so the choice is visible.
fn cluster_root(run_as: &RunAs, data_dir: &Path) -> Result<PathBuf, ClusterError> {
    if run_as.can_reach(&data_dir.join("postgres")) {
        return Ok(data_dir.to_path_buf());
    }
    let digest = Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let root = Path::new(RELOCATED_ROOT).join(name);
    std::fs::create_dir_all(&root).map_err(io_error(format!("creating {}", root.display())))?;
    let note = data_dir.join("postgres-location");
    let text = format!(
        "The PostgreSQL user cannot reach {}, so this data directory's cluster lives in {}.\n",
        data_dir.display(),
        root.display()
    );
    std::fs::write(&note, text).map_err(io_error(format!("writing {}", note.display())))?;
    tracing::warn!(
        cluster = %root.display(),
        "the postgres user cannot reach the data directory; the cluster lives elsewhere"
    );
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_give_a_one_line_error_that_says_how_to_install() {
        let empty = tempfile::tempdir().expect("temp dir");
        let error = PgBinaries::find_in(Some(empty.path().into()), empty.path())
            .expect_err("nothing to find");
        let message = error.to_string();
        assert!(!message.contains('\n'), "{message}");
        assert!(message.contains("apt-get install postgresql"), "{message}");
    }

    #[test]
    fn the_newest_installed_version_wins() {
        let root = tempfile::tempdir().expect("temp dir");
        for version in ["9", "15", "13"] {
            let bin = root.path().join(version).join("bin");
            std::fs::create_dir_all(&bin).expect("mkdir");
            for tool in ["initdb", "pg_ctl", "postgres"] {
                std::fs::write(bin.join(tool), "").expect("touch");
            }
        }
        let found = PgBinaries::find_in(None, root.path()).expect("found");
        assert_eq!(found.tool("initdb"), root.path().join("15/bin/initdb"));
    }
}
