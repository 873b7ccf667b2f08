//! `fhirbox serve` as a child process, for tests of the binary itself (start-up, signals,
//! crashes, several processes on one database).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// A running `fhirbox serve` and the lines it printed.
pub struct ServerProcess {
    child: Child,
    lines: Receiver<String>,
    pub printed: Vec<String>,
    pub base: String,
    /// What it wrote to stderr (the log), also passed on to the test's own stderr.
    logged: Arc<Mutex<Vec<String>>>,
}

impl ServerProcess {
    /// Starts `fhirbox serve --listen 127.0.0.1:0 ARGS` and waits until it listens.
    pub fn start(args: &[&str]) -> ServerProcess {
        ServerProcess::start_with_env(args, &[])
    }

    /// [`ServerProcess::start`] with these environment variables set.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> ServerProcess {
        let mut command = ServerProcess::command(args, env);
        let child = command.spawn().expect("start fhirbox");
        ServerProcess::wait_listening(child)
    }

    /// [`ServerProcess::start`] with the soft limit of open files lowered to `soft` (the hard
    /// limit unchanged), as many systems start services.
    pub fn start_with_soft_fd_limit(args: &[&str], soft: u64) -> ServerProcess {
        use std::os::unix::process::CommandExt;
        let mut command = ServerProcess::command(args, &[]);
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(move || {
                use nix::sys::resource::{getrlimit, setrlimit, Resource};
                let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
                setrlimit(Resource::RLIMIT_NOFILE, soft.min(hard), hard)?;
                Ok(())
            });
        }
        let child = command.spawn().expect("start fhirbox");
        ServerProcess::wait_listening(child)
    }

    /// Runs `fhirbox serve ... ARGS` expecting it to exit at once; returns how, and its log.
    pub fn run_to_exit(args: &[&str], limit: Duration) -> (std::process::ExitStatus, String) {
        let mut command = ServerProcess::command(args, &[]);
        let mut child = command.spawn().expect("start fhirbox");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                let mut log = String::new();
                if let Some(mut stderr) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut stderr, &mut log);
                }
                return (status, log);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("fhirbox did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its peak resident memory so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .expect("VmHWM")
    }

    /// Its resident memory now (`VmRSS`), in bytes.
    pub fn rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .expect("VmRSS")
    }

    /// Starts counting its peak resident memory afresh, from now (`clear_refs` 5).
    pub fn reset_peak_rss(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5").expect("clear_refs");
    }

    fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fhirbox"));
        command.arg("serve");
        if !args.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in [
            "FHIRBOX_ADMIN_PASSWORD",
            "DATABASE_URL",
            "FHIRBOX_DATA_DIR",
            "FHIRBOX_LISTEN",
        ] {
            command.env_remove(var);
        }
        for (name, value) in env {
            command.env(name, value);
        }
        command
    }

    fn wait_listening(mut child: Child) -> ServerProcess {
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = child.stderr.take().expect("stderr");
        let logged = Arc::new(Mutex::new(Vec::new()));
        let log = logged.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let mut server = ServerProcess {
            child,
            lines,
            printed: Vec::new(),
            base: String::new(),
            logged,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while server.base.is_empty() {
            let wait = deadline.saturating_duration_since(Instant::now());
            match server.lines.recv_timeout(wait) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("fhirbox listening on ") {
                        server.base = url.to_string();
                    }
                    server.printed.push(line);
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("fhirbox did not start: {:?}", server.printed)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "fhirbox exited during start-up: {:?} {:?}",
                        server.printed,
                        server.child.wait()
                    )
                }
            }
        }
        server
    }

    /// The generated root password, if this start printed one.
    pub fn generated_password(&self) -> Option<String> {
        let announced = self
            .printed
            .iter()
            .position(|l| l.starts_with("Generated a password"))?;
        self.printed[announced + 1..]
            .iter()
            .find(|l| l.starts_with("    "))
            .map(|l| l.trim().to_string())
    }

    /// The lines of its log so far (all of them, once it exited and its pipe was read).
    pub fn log(&self) -> Vec<String> {
        self.logged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends a signal and waits for the process to exit.
    pub fn signal(&mut self, signal: Signal) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "fhirbox did not exit after {signal}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
