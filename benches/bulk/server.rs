//! The fhirbox server under test, as its own process (so its resident memory is its own), and
//! a sampler of that memory.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const PASSWORD: &str = "bench";

/// The server's log file, in its data directory.
fn log_file(data_dir: &tempfile::TempDir) -> Stdio {
    std::fs::File::create(data_dir.path().join("fhirbox.log"))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::inherit())
}

pub struct Server {
    child: Child,
    pub base: String,
    _data_dir: tempfile::TempDir,
}

impl Server {
    pub fn start(database_url: &str, extra_args: &[&str]) -> Server {
        Server::start_with_env(database_url, extra_args, &[])
    }

    /// [`Server::start`] with these environment variables (storage credentials).
    pub fn start_with_env(database_url: &str, extra_args: &[&str], env: &[(&str, &str)]) -> Server {
        let data_dir = tempfile::tempdir().expect("temp dir");
        // A port chosen here, so the public base URL (which SMART needs) is known up front.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let listen = format!("127.0.0.1:{port}");
        let base_url = format!("http://{listen}");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fhirbox"))
            .arg("serve")
            .args([
                "--listen",
                &listen,
                "--base-url",
                &base_url,
                "--database-url",
                database_url,
                "--admin-password",
                PASSWORD,
            ])
            .arg("--data-dir")
            .arg(data_dir.path())
            // Measured as it runs in production: the log at info (to a file) and metrics on.
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(extra_args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log_file(&data_dir))
            .spawn()
            .expect("start fhirbox (build it with cargo build --release)");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let base = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.strip_prefix("fhirbox listening on ") {
                        break url.to_string();
                    }
                }
                _ => panic!("fhirbox did not start"),
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Server {
            child,
            base,
            _data_dir: data_dir,
        }
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) the process: servers on one database share
    /// its job queue, so a bench that times one of two stops the other, lest it claim tasks.
    pub fn pause(&self, paused: bool) {
        let signal = if paused { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal}");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time the server has used so far (user + system), in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command name (which may contain spaces) start after the last ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |index: usize| {
            fields
                .get(index)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15 of the stat line: 11 and 12 after the name.
        (ticks(11) + ticks(12)) / 100.0
    }

    /// Resident memory now, in bytes.
    pub fn rss(&self) -> u64 {
        rss_of(self.pid())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Samples a process's resident memory every 10 ms until stopped; reports the peak.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_of(pid)));
        let thread = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_of(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        RssSampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    /// Stops sampling and returns the peak, in bytes.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}
