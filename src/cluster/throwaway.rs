//! A throwaway PostgreSQL cluster for tests and benchmarks: `initdb` into a temporary
//! directory, `postgres` in the foreground as a child of the calling thread, gone with the
//! process that started it.
//!
//! Lifetime: the postmaster gets `PR_SET_PDEATHSIG` (SIGQUIT, PostgreSQL's immediate shutdown)
//! set after its switch to the `postgres` user, so it dies with the thread that spawned it. Keep
//! that thread alive for as long as the cluster is needed (the test harness parks a dedicated
//! thread). Directories of clusters whose owning process is gone are swept by the next start.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::{init_cluster, io_error, write_settings, ClusterError, PgBinaries, RunAs};

/// Directory name prefix of throwaway clusters in the temp directory.
const PREFIX: &str = "fhirbox-pg-";

/// Written into each cluster directory: the pid of the process that owns it.
const OWNER_FILE: &str = "owner.pid";

/// How long the postmaster may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct ThrowawayCluster {
    dir: PathBuf,
    socket_dir: PathBuf,
    postmaster: Child,
}

/// Where throwaway clusters go: memory (`/dev/shm`) when there is one. A cluster has 1,600
/// relations (a table, a history table, their indexes and TOAST tables per type) and on disk
/// `CREATE DATABASE` copying them takes ~1.7 s here, against ~40 ms in memory: that is the
/// difference between a slow and a fast test suite.
pub fn default_parent() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let writable = shm.is_dir()
        && nix::unistd::access(
            shm,
            nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
        )
        .is_ok();
    if writable {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

impl ThrowawayCluster {
    /// Creates and starts a cluster under [`default_parent`] with `settings` on top of
    /// fhirbox's socket-only defaults. Blocks until it accepts connections.
    pub fn start(settings: &[(&str, &str)]) -> Result<ThrowawayCluster, ClusterError> {
        ThrowawayCluster::start_in(&default_parent(), settings)
    }

    /// [`ThrowawayCluster::start`] under a given parent directory (a benchmark that wants disk).
    pub fn start_in(
        parent: &Path,
        settings: &[(&str, &str)],
    ) -> Result<ThrowawayCluster, ClusterError> {
        sweep_abandoned(parent);
        let bins = PgBinaries::find()?;
        let run_as = RunAs::detect()?;
        let (dir, socket_dir) = make_dirs(parent, &run_as)?;
        let pgdata = dir.join("postgres");
        init_cluster(&bins, &run_as, &pgdata)?;
        write_settings(&run_as, &pgdata, &socket_dir, settings)?;
        launch(&bins, &run_as, dir, socket_dir)
    }

    /// A streaming standby of this cluster, in a directory and on a socket of its own beside
    /// it: a base backup taken over this cluster's socket (`pg_basebackup -R -X stream`, which
    /// writes `standby.signal` and `primary_conninfo`), started with `settings`. It follows
    /// this cluster until dropped; hot standby, so it answers read-only queries.
    ///
    /// It streams through the primary's replication slot `slot`, which the caller creates
    /// with its WAL reserved (`pg_create_physical_replication_slot(slot, true)`) before, so
    /// that the primary keeps every segment the backup and the standby have yet to receive,
    /// however busy it is, and drops once the standby is gone.
    pub fn standby(
        &self,
        slot: &str,
        settings: &[(&str, &str)],
    ) -> Result<ThrowawayCluster, ClusterError> {
        let parent = self.dir.parent().unwrap_or(Path::new("/tmp"));
        ThrowawayCluster::standby_of(&self.socket_dir, parent, slot, settings)
    }

    /// [`ThrowawayCluster::standby`] of the cluster listening in `primary_socket_dir`, made
    /// under `parent`.
    pub fn standby_of(
        primary_socket_dir: &Path,
        parent: &Path,
        slot: &str,
        settings: &[(&str, &str)],
    ) -> Result<ThrowawayCluster, ClusterError> {
        let bins = PgBinaries::find()?;
        let run_as = RunAs::detect()?;
        let (dir, socket_dir) = make_dirs(parent, &run_as)?;
        let pgdata = dir.join("postgres");
        std::fs::create_dir(&pgdata).map_err(io_error("creating the standby's data dir"))?;
        std::fs::set_permissions(&pgdata, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error("chmod the standby's data dir"))?;
        run_as.chown(&pgdata)?;
        let mut backup = run_as.command(bins.tool("pg_basebackup"));
        backup
            .arg("-D")
            .arg(&pgdata)
            .args(["-R", "-X", "stream", "-c", "fast", "-S", slot])
            .args(["-U", "postgres", "-h"])
            .arg(primary_socket_dir);
        if let Err(error) = super::run(backup, "pg_basebackup") {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(error);
        }
        write_settings(&run_as, &pgdata, &socket_dir, settings)?;
        launch(&bins, &run_as, dir, socket_dir)
    }

    /// The postmaster's pid (a test that stops or kills it).
    pub fn pid(&self) -> u32 {
        self.postmaster.id()
    }

    fn wait_until_ready(&mut self) -> Result<(), ClusterError> {
        let socket = self.socket_dir.join(super::SOCKET_FILE);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.postmaster.try_wait() {
                return Err(ClusterError::Command {
                    what: "postgres".into(),
                    status: status.to_string(),
                    output: self.log_tail(),
                });
            }
            // The socket appears before recovery ends; connecting is the real test, which
            // the caller's first connection does with retries. The pid file's "ready" line
            // tells us the server accepts connections.
            // (A hot standby's says "standby" once it takes read-only connections.)
            let ready = std::fs::read_to_string(self.dir.join("postgres/postmaster.pid"))
                .is_ok_and(|pid_file| pid_file.contains("ready") || pid_file.contains("standby"));
            if ready && socket.exists() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Command {
                    what: "postgres".into(),
                    status: "not ready in time".into(),
                    output: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgresql.log")).unwrap_or_default()
    }

    /// Connection settings for a database of this cluster (superuser `postgres`).
    pub fn config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.socket_dir)
            .user("postgres")
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// The same as a key-value connection string (for `--database-url` and `psql`).
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "host={} user=postgres dbname={dbname}",
            self.socket_dir.display()
        )
    }

    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.postmaster.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
        let _ = self.postmaster.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A cluster directory (with its owner file) and its socket directory under `parent`.
fn make_dirs(parent: &Path, run_as: &RunAs) -> Result<(PathBuf, PathBuf), ClusterError> {
    let dir = parent.join(format!(
        "{PREFIX}{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))
        .map_err(io_error(format!("chmod {}", dir.display())))?;
    std::fs::write(dir.join(OWNER_FILE), std::process::id().to_string())
        .map_err(io_error("writing the owner file"))?;
    let socket_dir = dir.join("run");
    std::fs::create_dir(&socket_dir).map_err(io_error("creating the socket dir"))?;
    std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_error("chmod the socket dir"))?;
    run_as.chown(&socket_dir)?;
    Ok((dir, socket_dir))
}

/// Starts `postgres` on `dir/postgres` and waits until it accepts connections.
fn launch(
    bins: &PgBinaries,
    run_as: &RunAs,
    dir: PathBuf,
    socket_dir: PathBuf,
) -> Result<ThrowawayCluster, ClusterError> {
    let log = std::fs::File::create(dir.join("postgresql.log"))
        .map_err(io_error("creating the log file"))?;
    let log_err = log.try_clone().map_err(io_error("opening the log file"))?;
    let mut command = run_as.command(bins.tool("postgres"));
    command
        .arg("-D")
        .arg(dir.join("postgres"))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // Runs in the child after the switch to the postgres user (a credential change would
    // clear the parent-death signal), right before exec.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGQUIT)
                .map_err(std::io::Error::from)
        });
    }
    let postmaster = command.spawn().map_err(io_error("starting postgres"))?;
    let mut cluster = ThrowawayCluster {
        dir,
        socket_dir,
        postmaster,
    };
    cluster.wait_until_ready()?;
    Ok(cluster)
}

/// Removes the directories of throwaway clusters whose owning process no longer runs.
fn sweep_abandoned(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let owner = std::fs::read_to_string(entry.path().join(OWNER_FILE))
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok());
        let abandoned = match owner {
            Some(pid) => nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
            // Another process may have just created it and not yet written its owner file.
            None => entry
                .metadata()
                .and_then(|meta| meta.modified())
                .is_ok_and(|at| at.elapsed().unwrap_or_default() > Duration::from_secs(600)),
        };
        if abandoned {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
