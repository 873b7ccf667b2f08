//! `fhirbox serve` itself, as a user runs it: the managed PostgreSQL is created on first start,
//! stopped on SIGTERM, reused on the next start, and recovered after fhirbox was SIGKILLed;
//! with `--database-url` fhirbox manages nothing.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::process::ServerProcess;

use fhirbox::cluster::ManagedCluster;
use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::json;

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
    let mut first = ServerProcess::start(&["--data-dir", data_arg, "--import-workers", "32"]);
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

    // SIGTERM: a clean stop, PostgreSQL included, and no complaint on the way out (background
    // workers stop before the pool closes).
    let status = first.signal(Signal::SIGTERM);
    assert!(status.success(), "{status}");
    std::thread::sleep(Duration::from_millis(200)); // the last lines of the pipe
    let complaints: Vec<String> = first
        .log()
        .into_iter()
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        .collect();
    assert!(complaints.is_empty(), "{complaints:?}");
    assert!(
        !data.join("postgres/postmaster.pid").exists(),
        "PostgreSQL was stopped"
    );

    // Second start: the same cluster and password, no new password printed.
    let mut second = ServerProcess::start(&["--data-dir", data_arg]);
    assert_eq!(second.generated_password(), None);
    let (status, patient) = get_patient(&second.base, &password).await;
    assert_eq!((status, &patient["id"]), (StatusCode::OK, &json!("kept")));

    // SIGKILL leaves PostgreSQL running; the next start adopts it.
    second.signal(Signal::SIGKILL);
    assert!(
        cluster_running(&data),
        "PostgreSQL outlives a killed fhirbox"
    );
    let mut third = ServerProcess::start(&["--data-dir", data_arg]);
    let (status, _) = get_patient(&third.base, &password).await;
    assert_eq!(status, StatusCode::OK, "no data lost, no manual clean-up");
    let status = third.signal(Signal::SIGTERM);
    assert!(status.success());
    assert!(!cluster_running(&data));

    // PostgreSQL itself killed (stale postmaster.pid): the next start recovers.
    let mut fourth = ServerProcess::start(&["--data-dir", data_arg]);
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
    let mut fifth = ServerProcess::start(&["--data-dir", data_arg]);
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
    let mut serve = ServerProcess::start(&[
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
