//! Watching PostgreSQL backends during a test: their peak memory (`VmHWM` from /proc), and a
//! watchdog that kills a backend of the test's own database growing past a bound, so a test
//! of a memory attack cannot take the machine down when the fix regresses (it fails instead).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A running watch over the backends of one database.
pub struct BackendWatch {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<Watched>,
}

/// What a watch saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct Watched {
    /// The largest peak resident memory of a backend of the database, in bytes.
    pub peak: u64,
    /// Whether the watchdog had to kill a backend.
    pub killed: bool,
    /// How many distinct backends were seen.
    pub backends: usize,
}

/// `VmHWM` and `VmRSS` of a process, in bytes.
fn memory(pid: i32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// Watches the client backends of `database` (every 20 ms) until [`BackendWatch::finish`];
/// kills (SIGKILL) any whose resident memory passes `kill_above` bytes.
pub async fn watch(database: &str, kill_above: u64) -> BackendWatch {
    let admin = super::connect(super::cluster().config("postgres")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let database = database.to_string();
    let handle = tokio::spawn(async move {
        let mut watched = Watched::default();
        let mut seen = std::collections::HashSet::new();
        while !stopped.load(Ordering::SeqCst) {
            let rows = admin
                .query(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                    &[&database],
                )
                .await
                .unwrap_or_default();
            for row in rows {
                let pid: i32 = row.get(0);
                seen.insert(pid);
                if let Some((peak, rss)) = memory(pid) {
                    watched.peak = watched.peak.max(peak);
                    if rss > kill_above {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                        watched.killed = true;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        watched.backends = seen.len();
        watched
    });
    BackendWatch { stop, handle }
}

impl BackendWatch {
    pub async fn finish(self) -> Watched {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.await.expect("the watch")
    }
}
