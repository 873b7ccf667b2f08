//! `fhirbox serve` itself, as a user runs it: the managed PostgreSQL is created on first start,
//! stopped on SIGTERM, reused on the next start, and recovered after fhirbox was SIGKILLed;
//! with `--database-url` fhirbox manages nothing.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use fhirbox::cluster::ManagedCluster;
use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::json;

/// A `fhirbox serve` child process and the lines it printed.
struct Serve {
    child: Child,
    lines: Receiver<String>,
    printed: Vec<String>,
    base: String,
}

impl Serve {
    fn start(args: &[&str]) -> Serve {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fhirbox"));
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for var in [
            "FHIRBOX_ADMIN_PASSWORD",
            "DATABASE_URL",
            "FHIRBOX_DATA_DIR",
            "FHIRBOX_LISTEN",
        ] {
            command.env_remove(var);
        }
        let mut child = command.spawn().expect("start fhirbox");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut serve = Serve {
            child,
            lines,
            printed: Vec::new(),
            base: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while serve.base.is_empty() {
            let wait = deadline.saturating_duration_since(Instant::now());
            match serve.lines.recv_timeout(wait) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("fhirbox listening on ") {
                        serve.base = url.to_string();
                    }
                    serve.printed.push(line);
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("fhirbox did not start: {:?}", serve.printed)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "fhirbox exited during start-up: {:?} {:?}",
                        serve.printed,
                        serve.child.wait()
                    )
                }
            }
        }
        serve
    }

    /// The generated root password, if this start printed one.
    fn generated_password(&self) -> Option<String> {
        let announced = self
            .printed
            .iter()
            .position(|l| l.starts_with("Generated a password"))?;
        self.printed[announced + 1..]
            .iter()
            .find(|l| l.starts_with("    "))
            .map(|l| l.trim().to_string())
    }

    fn signal(&mut self, signal: Signal) -> std::process::ExitStatus {
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

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get_patient(base: &str, password: &str) -> (StatusCode, serde_json::Value) {
    let response = common::http_client()
        .get(format!("{base}/Patient/kept"))
        .basic_auth("root", Some(password))
        .send()
        .await
        .expect("request");
    (response.status(), response.json().await.unwrap_or_default())
}

/// A data directory that the `postgres` user can reach (temp dirs are 0700).
fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("fhirbox-serve-test-")
        .tempdir()
        .expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

fn cluster_running(data: &Path) -> bool {
    ManagedCluster::prepare(data)
        .expect("cluster layout")
        .is_running()
}

#[tokio::test(flavor = "multi_thread")]
async fn managed_cluster_starts_stops_restarts_and_recovers_from_sigkill() {
    let dir = data_dir();
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf-8 path");

    // First start: creates the cluster and a root password, printed once.
    let mut first = Serve::start(&["--data-dir", data_arg]);
    let password = first
        .generated_password()
        .expect("a generated password is printed");
    assert!(data.join("postgres/PG_VERSION").is_file());
    let health = common::http_client()
        .get(format!("{}/health", first.base))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), StatusCode::OK);
    let created = common::http_client()
        .put(format!("{}/Patient/kept", first.base))
        .basic_auth("root", Some(&password))
        .json(&json!({"resourceType": "Patient", "id": "kept"}))
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), StatusCode::CREATED);

    // SIGTERM: a clean stop, PostgreSQL included.
    let status = first.signal(Signal::SIGTERM);
    assert!(status.success(), "{status}");
    assert!(
        !data.join("postgres/postmaster.pid").exists(),
        "PostgreSQL was stopped"
    );

    // Second start: the same cluster and password, no new password printed.
    let mut second = Serve::start(&["--data-dir", data_arg]);
    assert_eq!(second.generated_password(), None);
    let (status, patient) = get_patient(&second.base, &password).await;
    assert_eq!((status, &patient["id"]), (StatusCode::OK, &json!("kept")));

    // SIGKILL leaves PostgreSQL running; the next start adopts it.
    second.signal(Signal::SIGKILL);
    assert!(
        cluster_running(&data),
        "PostgreSQL outlives a killed fhirbox"
    );
    let mut third = Serve::start(&["--data-dir", data_arg]);
    let (status, _) = get_patient(&third.base, &password).await;
    assert_eq!(status, StatusCode::OK, "no data lost, no manual clean-up");
    let status = third.signal(Signal::SIGTERM);
    assert!(status.success());
    assert!(!cluster_running(&data));

    // PostgreSQL itself killed (stale postmaster.pid): the next start recovers.
    let mut fourth = Serve::start(&["--data-dir", data_arg]);
    fourth.signal(Signal::SIGKILL);
    let pid_file = std::fs::read_to_string(data.join("postgres/postmaster.pid")).expect("pid file");
    let postmaster: i32 = pid_file
        .lines()
        .next()
        .and_then(|l| l.parse().ok())
        .expect("pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(postmaster), Signal::SIGKILL)
        .expect("kill postgres");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        data.join("postgres/postmaster.pid").exists(),
        "a stale pid file is left behind"
    );
    let mut fifth = Serve::start(&["--data-dir", data_arg]);
    let (status, _) = get_patient(&fifth.base, &password).await;
    assert_eq!(status, StatusCode::OK);
    assert!(fifth.signal(Signal::SIGTERM).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_database_url_nothing_is_managed() {
    let database = common::fresh_database().await;
    let url = common::cluster().url(&database);
    let dir = data_dir();
    let data = dir.path().join("data");
    let mut serve = Serve::start(&[
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--database-url",
        &url,
        "--admin-password",
        "configured",
    ]);
    assert_eq!(serve.generated_password(), None);
    let (status, _) = get_patient(&serve.base, "configured").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "authenticated with the configured password"
    );
    assert!(!data.join("postgres").exists(), "no cluster was created");
    assert!(
        !data.join(fhirbox::auth::root::HASH_FILE).exists(),
        "a configured password is not stored"
    );
    assert!(serve.signal(Signal::SIGTERM).success());
}
