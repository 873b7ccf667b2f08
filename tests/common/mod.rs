//! The test harness: one throwaway PostgreSQL per test binary, a migrated template database,
//! a fresh database per test (`CREATE DATABASE ... TEMPLATE`, so tests run in parallel), and the
//! real HTTP server on `127.0.0.1:0` in front of it.
#![allow(dead_code)] // each test binary uses its own subset of these helpers

pub mod backends;
pub mod browser;
pub mod export;
pub mod fixtures;
pub mod keys;
pub mod process;
pub mod s3;
pub mod search;
pub mod smart;
pub mod standby;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

pub use fhirbox::app::AppSettings;
use fhirbox::auth::RootPassword;
pub use fhirbox::bulk::source::SourcePolicy;
use fhirbox::cluster::throwaway::ThrowawayCluster;
use fhirbox::http::{AppState, Settings};
use fhirbox::store::{schema, Store};
use reqwest::{Method, StatusCode};
use serde_json::Value;

pub const ROOT_PASSWORD: &str = "test-root-password";
const TEMPLATE: &str = "fhirbox_template";

/// Durability is not the point of a throwaway cluster: trade it for speed.
pub const TEST_SETTINGS: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "300"),
    ("shared_buffers", "128MB"),
];

/// What tests need to know about the binary's cluster.
pub struct Cluster {
    /// Connection settings to the `postgres` database; change `dbname` for others.
    base: tokio_postgres::Config,
    /// `host=... user=postgres` without a database name.
    url_prefix: String,
}

impl Cluster {
    pub fn config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut config = self.base.clone();
        config.dbname(dbname);
        config
    }

    /// Where the cluster's socket is (a standby's base backup connects there).
    pub fn socket_dir(&self) -> std::path::PathBuf {
        std::path::PathBuf::from(
            self.url_prefix
                .trim_start_matches("host=")
                .trim_end_matches(" user=postgres"),
        )
    }

    /// A key-value connection string for `--database-url`.
    pub fn url(&self, dbname: &str) -> String {
        format!("{} dbname={dbname}", self.url_prefix)
    }
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The binary's cluster, started on first use by a thread that lives as long as the process:
/// the postmaster dies with the thread that spawned it.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("postgres-keeper".into())
            .spawn(move || {
                let started = ThrowawayCluster::start(TEST_SETTINGS)
                    .map_err(|e| e.to_string())
                    .and_then(|cluster| make_template(&cluster).map(|()| cluster));
                match started {
                    Ok(cluster) => {
                        let socket = cluster.socket_dir().display().to_string();
                        let _ = sender.send(Ok(Cluster {
                            base: cluster.config("postgres"),
                            url_prefix: format!("host={socket} user=postgres"),
                        }));
                        loop {
                            std::thread::park();
                        }
                    }
                    Err(error) => {
                        let _ = sender.send(Err(error));
                    }
                }
            })
            .expect("spawn the postgres keeper thread");
        match receiver.recv() {
            Ok(Ok(cluster)) => cluster,
            Ok(Err(error)) => panic!("test PostgreSQL failed to start: {error}"),
            Err(_) => panic!("test PostgreSQL keeper thread died"),
        }
    })
}

/// Creates the template database and migrates it, once per test binary.
fn make_template(cluster: &ThrowawayCluster) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let admin = connect(cluster.config("postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {TEMPLATE}"))
            .await
            .map_err(|e| e.to_string())?;
        let store = Store::new(cluster.config(TEMPLATE), 1).map_err(|e| e.to_string())?;
        let mut conn = store.connection().await.map_err(|e| e.to_string())?;
        schema::migrate(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        drop(conn);
        store.close();
        Ok(())
    })
}

/// A plain connection whose driver runs on the current runtime.
pub async fn connect(config: tokio_postgres::Config) -> tokio_postgres::Client {
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect to the test cluster");
    tokio::spawn(connection);
    client
}

static DATABASES: AtomicUsize = AtomicUsize::new(0);

/// A fresh database, a copy of the migrated template. Returns its name.
pub async fn fresh_database() -> String {
    let name = format!("test_{}", DATABASES.fetch_add(1, Ordering::SeqCst));
    let admin = connect(cluster().config("postgres")).await;
    let sql = format!("CREATE DATABASE {name} TEMPLATE {TEMPLATE} STRATEGY FILE_COPY");
    // Two copies of one template at the same instant can collide ("source database is being
    // accessed by other users"): retry briefly.
    for attempt in 0.. {
        match admin.batch_execute(&sql).await {
            Ok(()) => break,
            Err(error)
                if attempt < 50
                    && error.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) =>
            {
                tokio::time::sleep(Duration::from_millis(20 + attempt * 10)).await;
            }
            Err(error) => panic!("CREATE DATABASE {name}: {error}"),
        }
    }
    name
}

/// A running fhirbox on its own database.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub database: String,
    pub store: Store,
    /// Where this server's `$export` files go.
    pub export_dir: PathBuf,
}

/// Test servers split `$export` output at this size unless a test says otherwise.
pub const EXPORT_FILE_SIZE: u64 = 64 * 1024 * 1024;

/// Background job settings of a test server.
pub struct JobOptions {
    /// Job workers (0: jobs wait).
    pub workers: usize,
    /// `$export` files; made up from the database name when `None`.
    pub export_dir: Option<PathBuf>,
    pub file_size: u64,
    pub expiry: Duration,
}

impl Default for JobOptions {
    fn default() -> JobOptions {
        JobOptions {
            workers: 2,
            export_dir: None,
            file_size: EXPORT_FILE_SIZE,
            expiry: Duration::from_secs(3600),
        }
    }
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_custom(fresh_database().await, |_| {}).await
    }

    /// A server whose interactive requests use `store` (one that cannot reach its database,
    /// say); the rest runs on a fresh database.
    pub async fn start_with(store: Store, _database: String) -> TestServer {
        let database = fresh_database().await;
        let mut server = TestServer::build(database, |_| {}).await;
        server.1.store = store.clone();
        server.0.store = store;
        server.serve().await
    }

    /// A fresh server with these background job settings.
    pub async fn start_with_jobs(options: JobOptions) -> TestServer {
        let database = fresh_database().await;
        TestServer::start_on(database, options).await
    }

    /// Another server on an existing database (a restart, or a second process).
    pub async fn start_on(database: String, options: JobOptions) -> TestServer {
        TestServer::start_custom(database, |settings| {
            settings.jobs.workers = options.workers;
            if let Some(dir) = options.export_dir {
                settings.exports.dir = dir;
            }
            settings.exports.file_size = options.file_size;
            settings.exports.expiry = options.expiry;
        })
        .await
    }

    /// A fresh server whose `$load` sources follow `policy` (tests otherwise allow loopback
    /// sources and files under tests/fixtures/).
    pub async fn start_with_sources(policy: SourcePolicy) -> TestServer {
        TestServer::start_custom(fresh_database().await, |settings| {
            settings.sources = policy;
        })
        .await
    }

    /// A fresh server with other `$dump-sql` limits.
    pub async fn start_with_sql_limits(limits: fhirbox::bulk::dump_sql::SqlLimits) -> TestServer {
        TestServer::start_custom(fresh_database().await, |settings| {
            settings.http.sql_limits = limits;
        })
        .await
    }

    /// A server on `database` with the test settings, changed by `tune`.
    pub async fn start_custom(database: String, tune: impl FnOnce(&mut AppSettings)) -> TestServer {
        TestServer::build(database, tune).await.serve().await
    }

    async fn build(database: String, tune: impl FnOnce(&mut AppSettings)) -> Built {
        let root = RootPassword::from_password(ROOT_PASSWORD).expect("hash");
        let mut settings = test_settings(&database);
        tune(&mut settings);
        let export_dir = settings.exports.dir.clone();
        let state = fhirbox::app::build(cluster().config(&database), root, settings)
            .await
            .expect("a test server");
        let server = TestServer {
            base: String::new(),
            client: http_client(),
            database,
            store: state.store.clone(),
            export_dir,
        };
        Built(server, state)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request as root.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .basic_auth("root", Some(ROOT_PASSWORD))
    }

    /// Sends a request and returns the status and the body parsed as JSON (Null if empty).
    pub async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let response = request.send().await.expect("request sent");
        let status = response.status();
        let text = response.text().await.expect("body read");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, body)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.request(Method::GET, path)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.request(Method::DELETE, path)).await
    }

    /// `PUT /fhir/[type]/[id]` of a FHIR resource, which must succeed.
    pub async fn put_fhir(&self, resource: &Value) {
        let path = format!(
            "/fhir/{}/{}",
            resource["resourceType"].as_str().unwrap_or_default(),
            resource["id"].as_str().unwrap_or_default()
        );
        let (status, body) = self.json(Method::PUT, &path, resource).await;
        assert!(status.is_success(), "{path}: {body}");
    }

    pub async fn json(&self, method: Method, path: &str, body: &Value) -> (StatusCode, Value) {
        self.send(self.request(method, path).json(body)).await
    }

    pub async fn yaml(&self, method: Method, path: &str, body: &str) -> (StatusCode, Value) {
        let request = self
            .request(method, path)
            .header("content-type", "application/yaml")
            .body(body.to_string());
        self.send(request).await
    }

    /// Sends `GET <path>` as root over a raw socket, byte for byte (HTTP clients resolve `..`
    /// and `%2e` themselves, so they cannot test the server's own path handling). Returns the
    /// status code.
    pub async fn raw_get(&self, path: &str) -> u16 {
        use base64::Engine as _;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = self.base.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("root:{ROOT_PASSWORD}"));
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Basic {credentials}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        let text = String::from_utf8_lossy(&response);
        text.split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0)
    }

    /// A direct database connection, for checking what was (not) written.
    pub async fn db(&self) -> tokio_postgres::Client {
        connect(cluster().config(&self.database)).await
    }

    /// Fills `patient` with `rows` rows of about `size` bytes each, straight in SQL (many,
    /// fast: for streams larger than any buffer).
    pub async fn fill_patients(&self, rows: i64, size: i32) {
        self.db()
            .await
            .execute(
                "INSERT INTO patient (id, txid, cts, ts, resource_type, status, resource)
                 SELECT 'p' || lpad(g::text, 7, '0'), nextval('transaction_id_seq'), now(), now(),
                        'Patient', 'created',
                        jsonb_build_object('text', jsonb_build_object('div', repeat('x', $2)), 'n', g)
                   FROM generate_series(1, $1::bigint) g",
                &[&rows, &size],
            )
            .await
            .expect("fill");
    }

    /// A GET of `path` that must answer 200 (its body not read yet: streamed reads check
    /// their headers).
    pub async fn get_ok(&self, path: &str) -> reqwest::Response {
        let response = self.request(Method::GET, path).send().await.expect("sent");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        response
    }

    /// Starts a streamed GET of `path`, runs `interrupt` once the first chunk arrived, and
    /// reads on: the bytes received, and whether the body ended in an error (as a stream cut
    /// short must) rather than cleanly.
    pub async fn read_interrupted<F, Fut>(&self, path: &str, interrupt: F) -> (usize, bool)
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        use futures_util::StreamExt;
        let response = self.request(Method::GET, path).send().await.expect("sent");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let mut body = response.bytes_stream();
        let first = body.next().await.expect("first chunk").expect("bytes");
        let mut received = first.len();
        interrupt().await;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(bytes) => received += bytes.len(),
                Err(_) => return (received, true),
            }
        }
        (received, false)
    }

    /// `SELECT count(*) FROM <table>`.
    pub async fn count(&self, table: &str) -> i64 {
        self.db()
            .await
            .query_one(&format!("SELECT count(*) FROM \"{table}\""), &[])
            .await
            .expect("count")
            .get(0)
    }
}

/// A server built but not yet listening.
struct Built(TestServer, AppState);

impl Built {
    async fn serve(self) -> TestServer {
        let Built(mut server, state) = self;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let scheme = match state.settings.connections.tls {
            Some(_) => "https",
            None => "http",
        };
        server.base = format!("{scheme}://{}", listener.local_addr().expect("local addr"));
        // As a deployment must for SMART (the token endpoint checks aud against it).
        let mut state = state;
        if state.settings.base_url.is_none() {
            std::sync::Arc::make_mut(&mut state.settings).base_url = Some(server.base.clone());
        }
        tokio::spawn(fhirbox::http::serve(
            listener,
            state,
            std::future::pending(),
        ));
        server
    }
}

/// The settings of test servers: small pools, loopback sources allowed, no migration (the
/// template database is migrated once).
pub fn test_settings(database: &str) -> AppSettings {
    let defaults = JobOptions::default();
    AppSettings {
        pool_size: 8,
        pool_wait: Duration::from_secs(10),
        sql_reader: None,
        sql_admin: None,
        sql_max_row_bytes: 64 * 1024 * 1024,
        roles: fhirbox::store::roles::RoleLimits {
            temp_file_kb: 1024 * 1024,
            work_mem_kb: 64 * 1024,
            idle_in_transaction_ms: 60_000,
        },
        migrate: false,
        sources: test_policy(),
        jobs: fhirbox::bulk::jobs::JobSettings {
            workers: defaults.workers,
            lease: Duration::from_secs(5),
            jobs_per_subject: 8,
            tasks_per_subject: 2,
            progress_every: Duration::from_secs(1),
        },
        exports: fhirbox::bulk::export::ExportSettings {
            dir: std::env::temp_dir().join(format!(
                "fhirbox-test-exports-{}-{database}",
                std::process::id()
            )),
            file_size: defaults.file_size,
            expiry: defaults.expiry,
            // The production default: the tests poll as clients must.
            polls_per_second: 2.0,
            session: fhirbox::store::session::SessionLimits {
                temp_file_bytes: 64 << 30,
                work_mem_bytes: 64 << 20,
                timeout: None,
            },
            view_session: view_session(),
            parquet: Default::default(),
            views: Default::default(),
            view_output: Default::default(),
            output: fhirbox::bulk::bounds::OutputBounds::exports(u64::MAX, u64::MAX),
            bucket: None,
            part_size: 5 << 20,
            links: None,
            link_lifetime: Duration::from_secs(3600),
        },
        guard: fhirbox::auth::guard::GuardSettings::default(),
        token_lifetime: Duration::from_secs(300),
        allowance: fhirbox::bulk::allowance::AllowanceSettings {
            total: 8,
            per_subject: 8,
        },
        s3: Default::default(),
        replicas: Default::default(),
        http: Settings {
            limits: std::sync::Arc::new(vec![("--max-body-bytes".into(), "1048576".into())]),
            max_body_bytes: 1024 * 1024,
            job_list_max: 100,
            counts_max_exact: 100_000,
            sql_limits: default_sql_limits(),
            parquet: Default::default(),
            views: Default::default(),
            view_session: view_session(),
            view_output: Default::default(),
            search: Default::default(),
            search_indexes: std::sync::Arc::new(
                fhirbox::search::index::Indexes::parse("common").expect("the common indexes"),
            ),
            base_url: None,
            listen_base: None,
            connections: fhirbox::http::serve::ConnectionSettings::default(),
        },
    }
}

/// What a view's statement may take in tests: the production defaults, a minute.
pub fn view_session() -> fhirbox::store::session::SessionLimits {
    fhirbox::store::session::SessionLimits {
        temp_file_bytes: 1 << 30,
        work_mem_bytes: 64 << 20,
        timeout: Some(Duration::from_secs(60)),
    }
}

/// Tests allow loopback sources and files under tests/fixtures/.
fn test_policy() -> SourcePolicy {
    SourcePolicy {
        source_dir: Some(std::fs::canonicalize(fixtures_dir()).expect("fixtures dir")),
        allow_private: true,
        ..SourcePolicy::default()
    }
}

/// `$dump-sql` limits of test servers: the default (none).
pub fn default_sql_limits() -> fhirbox::bulk::dump_sql::SqlLimits {
    fhirbox::bulk::dump_sql::SqlLimits {
        timeout: Duration::from_secs(600),
        max_rows: None,
        max_bytes: None,
    }
}

/// An HTTP client for tests (with the TLS provider reqwest needs installed).
pub fn http_client() -> reqwest::Client {
    fhirbox::bulk::source::install_crypto_provider();
    reqwest::Client::new()
}

/// tests/fixtures/: the one directory `file://` sources may read in tests.
pub fn fixtures_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The first issue's diagnostics of an OperationOutcome.
pub fn diagnostics(outcome: &Value) -> &str {
    outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
}

/// A seed fixture (tests/fixtures/seeds/), byte for byte as in the seed document.
pub fn seed(name: &str) -> String {
    let path = format!("{}/tests/fixtures/seeds/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Loads the Synthea sample (13 types, 7,160 resources) through `/fhir/<type>/$load`.
pub async fn load_synthea(server: &TestServer) -> std::collections::BTreeMap<String, usize> {
    load_testdata(server, "synthea-10").await
}

/// Loads one dataset of testdata/ (one gzipped NDJSON file per type) through
/// `/fhir/<type>/$load`: the number of resources of each type.
pub async fn load_testdata(
    server: &TestServer,
    dataset: &str,
) -> std::collections::BTreeMap<String, usize> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(dataset);
    let mut files = Vec::new();
    let mut types = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("testdata") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        let type_name = name.split('.').next().expect("type").to_string();
        let bytes = std::fs::read(&path).expect("read");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text)
            .expect("gunzip");
        types.insert(type_name.clone(), text.lines().count());
        files.push((format!("/{type_name}.ndjson.gz"), bytes));
    }
    let fixtures = fixtures::FixtureServer::start(
        files
            .iter()
            .map(|(path, bytes)| (path.as_str(), fixtures::Fixture::Bytes(bytes.clone())))
            .collect(),
    )
    .await;
    for type_name in types.keys() {
        let (status, body) = server
            .json(
                reqwest::Method::POST,
                &format!("/fhir/{type_name}/$load"),
                &serde_json::json!({"source": fixtures.url(&format!("/{type_name}.ndjson.gz"))}),
            )
            .await;
        assert_eq!(status, reqwest::StatusCode::OK, "{type_name}: {body}");
    }
    types
}

/// One answer's status and body, as a snapshot records it: ports of loopback servers and the
/// repository's path are replaced by placeholders, so a snapshot does not depend on the run.
pub fn answer(request: &str, status: StatusCode, body: &Value) -> Value {
    let text = serde_json::json!({
        "request": request,
        "status": status.as_u16(),
        "body": body,
    })
    .to_string();
    let root = env!("CARGO_MANIFEST_DIR");
    let ports = regex::Regex::new(r"(127\.0\.0\.1|localhost):\d+").expect("regex");
    let text = text.replace(root, "[repo]");
    let text = ports.replace_all(&text, "$1:[port]");
    serde_json::from_str(&text).expect("still JSON")
}

/// Waits (a few seconds at most) until every connection of the server's database is idle and
/// outside any transaction, and every connection of its pool is back: no request that failed
/// or went away left one mid-transaction, mid-COPY or checked out.
pub async fn assert_no_connection_left(server: &TestServer) {
    let db = server.db().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let busy: Vec<String> = db
            .query(
                "SELECT state || ': ' || query FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()
                    AND state IS DISTINCT FROM 'idle'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .iter()
            .map(|row| row.get(0))
            .collect();
        let pool = server.store.status();
        if busy.is_empty() && pool.available == pool.size {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connections left behind: {busy:?}; pool {pool:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// JSON as a snapshot shows it: pretty-printed, numbers exactly as they are.
pub fn pretty(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).expect("serializable")
}
