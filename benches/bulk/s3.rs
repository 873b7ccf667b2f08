//! Object storage: `$export` of the largest type into a bucket against the same into the local
//! export directory, and `$import` of every type from a bucket against the same files from an
//! http source, in the same run, on a real S3-compatible server (SeaweedFS, from PyPI, started
//! on loopback by this bench), with the server's resident memory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::server::{Server, PASSWORD};
use super::{best, psql, Measurement, Probe, Row};

const ACCESS_KEY: &str = "bench-access";
const SECRET_KEY: &str = "bench-secret";
const BUCKET: &str = "bench";

/// A SeaweedFS of the bench's own, killed when dropped.
struct Weed {
    child: std::process::Child,
    endpoint: String,
    python: PathBuf,
}

impl Drop for Weed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Weed {
    /// CPU seconds the storage server has used so far.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks: f64 = fields
            .get(11..13)
            .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
            .unwrap_or(0.0);
        ticks / 100.0
    }

    fn start(dir: &Path) -> Weed {
        let output = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/ensure-seaweedfs"
        ))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/ensure-seaweedfs");
        assert!(output.status.success());
        let weed = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        let identity = serde_json::json!({"identities": [{"name": "bench",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]});
        std::fs::create_dir_all(dir.join("data")).expect("dir");
        std::fs::write(dir.join("s3.json"), identity.to_string()).expect("identity");
        let p: Vec<u16> = (0..8).map(|_| free_port()).collect();
        let d = |name: &str| dir.join(name).display().to_string();
        let child = Command::new(&weed)
            .args([
                "server".to_string(),
                format!("-dir={}", d("data")),
                "-ip=127.0.0.1".into(),
                "-ip.bind=127.0.0.1".into(),
                "-master.telemetry=false".into(),
                format!("-master.port={}", p[0]),
                format!("-master.port.grpc={}", p[1]),
                "-master.volumeSizeLimitMB=1024".into(),
                format!("-volume.port={}", p[2]),
                format!("-volume.port.grpc={}", p[3]),
                "-volume.max=32".into(),
                "-volume.minFreeSpace=64MiB".into(),
                "-volume.preStopSeconds=0".into(),
                "-filer".into(),
                format!("-filer.port={}", p[4]),
                format!("-filer.port.grpc={}", p[5]),
                format!("-filer.localSocket={}", d("filer.sock")),
                "-s3".into(),
                format!("-s3.port={}", p[6]),
                format!("-s3.port.grpc={}", p[7]),
                format!("-s3.localSocket={}", d("s3.sock")),
                "-s3.port.iceberg=0".into(),
                "-s3.port.lance=0".into(),
                format!("-s3.config={}", d("s3.json")),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start weed");
        let weed = Weed {
            child,
            endpoint: format!("http://127.0.0.1:{}", p[6]),
            python: weed.with_file_name("python"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while weed.boto(&["create_bucket"]).is_err() {
            assert!(Instant::now() < deadline, "SeaweedFS did not start");
            std::thread::sleep(Duration::from_millis(250));
        }
        weed
    }

    fn boto(&self, args: &[&str]) -> Result<(), String> {
        let script = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id=sys.argv[2],
                  aws_secret_access_key=sys.argv[3], region_name="us-east-1")
if sys.argv[4] == "create_bucket":
    s3.create_bucket(Bucket=sys.argv[5])
else:
    s3.upload_file(sys.argv[6], sys.argv[5], sys.argv[7])
"#;
        let output = Command::new(&self.python)
            .arg("-c")
            .arg(script)
            .args([self.endpoint.as_str(), ACCESS_KEY, SECRET_KEY])
            .arg(args[0])
            .arg(BUCKET)
            .args(&args[1..])
            .output()
            .map_err(|e| e.to_string())?;
        match output.status.success() {
            true => Ok(()),
            false => Err(String::from_utf8_lossy(&output.stderr).to_string()),
        }
    }
}

/// Kick-off to manifest of `path` on `server` (the files deleted after, untimed).
async fn export_round(server: &Server, client: &reqwest::Client, path: &str) -> Measurement {
    let probe = Probe::start(server);
    let response = client
        .get(format!("{}{path}", server.base))
        .basic_auth("root", Some(PASSWORD))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .send()
        .await
        .expect("kick-off");
    assert_eq!(response.status().as_u16(), 202);
    let status_url = response.headers()["content-location"]
        .to_str()
        .expect("ascii")
        .to_string();
    loop {
        let response = client
            .get(&status_url)
            .basic_auth("root", Some(PASSWORD))
            .send()
            .await
            .expect("status");
        match response.status().as_u16() {
            202 => tokio::time::sleep(Duration::from_millis(50)).await,
            200 => break,
            other => panic!("export status {other}"),
        }
    }
    let measurement = probe.finish(server, 0);
    client
        .delete(&status_url)
        .basic_auth("root", Some(PASSWORD))
        .send()
        .await
        .expect("delete");
    measurement
}

/// One `$import` of `inputs`; its measurement.
async fn import_round(
    server: &Server,
    client: &reqwest::Client,
    inputs: &[serde_json::Value],
    truncate: &dyn Fn(),
) -> Measurement {
    truncate();
    let probe = Probe::start(server);
    let id = format!("bench-{}", rand::random::<u32>());
    let response = client
        .post(format!("{}/fhir/$import", server.base))
        .basic_auth("root", Some(PASSWORD))
        .json(&serde_json::json!({"id": id, "inputs": inputs}))
        .send()
        .await
        .expect("import");
    assert_eq!(response.status().as_u16(), 202);
    loop {
        let status: serde_json::Value = client
            .get(format!("{}/BulkImportStatus/{id}", server.base))
            .basic_auth("root", Some(PASSWORD))
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("json");
        if status["status"] != "in-progress" {
            assert_eq!(status["status"], "finished", "{status}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    probe.finish(server, 0)
}

#[allow(clippy::too_many_arguments)]
pub async fn s3_benchmark(
    local: &Server,
    client: &reqwest::Client,
    url: &str,
    largest: &str,
    largest_rows: usize,
    counts: &std::collections::BTreeMap<String, usize>,
    files: &Path,
) -> Vec<Row> {
    let weed = Weed::start(&files.join("weed"));
    let bucket = Server::start_with_env(
        url,
        &[
            "--export-storage",
            &format!("s3://{BUCKET}/exports"),
            "--s3-endpoint",
            &weed.endpoint,
            "--export-polls-per-second",
            "0",
            "--allow-private-sources",
        ],
        &[
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ],
    );
    let path = format!("/fhir/$export?_type={largest}");
    // Alternating, so the machine's moods fall on both alike.
    let mut to_dir: Option<Measurement> = None;
    let mut to_bucket: Option<Measurement> = None;
    let mut weed_cpu = f64::MAX;
    for _ in 0..3 {
        bucket.pause(true);
        let d = best(|| export_round(local, client, &path)).await;
        bucket.pause(false);
        local.pause(true);
        let before = weed.cpu_seconds();
        let b = best(|| export_round(&bucket, client, &path)).await;
        local.pause(false);
        weed_cpu = weed_cpu.min((weed.cpu_seconds() - before) / super::rounds() as f64);
        if to_dir.as_ref().is_none_or(|m| d.seconds < m.seconds) {
            to_dir = Some(d);
        }
        if to_bucket.as_ref().is_none_or(|m| b.seconds < m.seconds) {
            to_bucket = Some(b);
        }
    }
    let (to_dir, to_bucket) = (to_dir.expect("rounds"), to_bucket.expect("rounds"));
    eprintln!(
        "$export of {largest} to a bucket: SeaweedFS used {weed_cpu:.2} CPU seconds an export (on the same 2 cores as PostgreSQL and fhirbox)"
    );
    // Every type's FHIR lines, as files in the bucket and behind an http server.
    let dir = files.join("s3-import");
    std::fs::create_dir_all(&dir).expect("dir");
    let mut inputs_http = Vec::new();
    let mut inputs_s3 = Vec::new();
    let http_port = free_port();
    for name in counts.keys() {
        let file = dir.join(format!("{name}.ndjson"));
        super::save(local, client, &format!("/{name}/$dump?fhir=true"), &file).await;
        weed.boto(&[
            "put",
            &file.display().to_string(),
            &format!("import/{name}.ndjson"),
        ])
        .expect("upload");
        inputs_http.push(serde_json::json!({"resourceType": name, "url": format!("http://127.0.0.1:{http_port}/{name}.ndjson")}));
        inputs_s3.push(serde_json::json!({"resourceType": name, "url": format!("s3://{BUCKET}/import/{name}.ndjson")}));
    }
    let mut http = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &http_port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python http.server");
    std::thread::sleep(Duration::from_secs(1));
    let tables: Vec<String> = counts.keys().map(|n| n.to_ascii_lowercase()).collect();
    let truncate = || {
        psql(
            url,
            &format!(
                "TRUNCATE {}",
                tables
                    .iter()
                    .map(|t| format!("\"{t}\", \"{t}_history\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    };
    local.pause(true);
    let from_http = import_round(&bucket, client, &inputs_http, &truncate).await;
    let from_bucket = import_round(&bucket, client, &inputs_s3, &truncate).await;
    local.pause(false);
    let _ = http.kill();
    let _ = http.wait();
    let total: usize = counts.values().sum();
    let (dir_seconds, http_seconds) = (to_dir.seconds, from_http.seconds);
    vec![
        Row {
            operation: format!("$export {largest} to the export dir"),
            rows: largest_rows,
            measurement: to_dir,
            baseline_seconds: dir_seconds,
        },
        Row {
            operation: format!("$export {largest} to a bucket (vs dir)"),
            rows: largest_rows,
            measurement: to_bucket,
            baseline_seconds: dir_seconds,
        },
        Row {
            operation: "$import every type from http".into(),
            rows: total,
            measurement: from_http,
            baseline_seconds: http_seconds,
        },
        Row {
            operation: "$import every type from a bucket (vs http)".into(),
            rows: total,
            measurement: from_bucket,
            baseline_seconds: http_seconds,
        },
    ]
}
