//! The command line: one clap struct per subcommand. Each field's doc comment is the
//! documentation of its flag and environment variable (`fhirbox serve --help` prints them).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "fhirbox",
    version,
    about = "A FHIR server on PostgreSQL with a fast bulk API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the HTTP server (and, without a database URL, its own local PostgreSQL).
    Serve(ServeArgs),
}

/// How manifests link their files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportLinks {
    Signed,
    Proxy,
}

/// How the log is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Lines for people (colored on a terminal only).
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// How the log (stderr) is written: `text`, or `json` for log shippers.
    #[arg(long, env = "FHIRBOX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Serve Prometheus metrics at `GET /metrics` on this address (off by default; it needs
    /// no credentials, so keep it on a private address).
    #[arg(long, env = "FHIRBOX_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Address and port to listen on (port 0 picks a free port; the chosen one is printed).
    #[arg(long, env = "FHIRBOX_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Directory for fhirbox's state: the managed PostgreSQL cluster (when no database URL is
    /// given) and the root password hash.
    #[arg(long, env = "FHIRBOX_DATA_DIR", default_value = "./fhirbox-data")]
    pub data_dir: PathBuf,

    /// PostgreSQL to use instead of the managed local cluster, as a URL
    /// (`postgresql://user:pass@host/db`) or key-value string (`host=/run/pg dbname=fhirbox`).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// The root admin's password. Without it, one is generated on first start, printed once,
    /// and only its argon2 hash is kept (in DATA_DIR/root-password.argon2).
    #[arg(long, env = "FHIRBOX_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,

    /// Largest request body accepted, in bytes (larger -> 413).
    #[arg(long, env = "FHIRBOX_MAX_BODY_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Database connections for interactive requests (bulk work has its own, see
    /// --bulk-streams).
    #[arg(long, env = "FHIRBOX_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,

    /// Seconds a request waits for a free database connection before it is answered 503
    /// "busy" with Retry-After.
    #[arg(long, env = "FHIRBOX_DB_WAIT", default_value_t = 5)]
    pub db_wait: u64,

    /// Bulk operations (`$dump`, `$dump-csv`, `$dump-sql`, `$load`) running at once on this
    /// server, each on a connection of the bulk pool; more are refused (429).
    #[arg(long, env = "FHIRBOX_BULK_STREAMS", default_value_t = 8)]
    pub bulk_streams: usize,

    /// Bulk operations one subject (a Client, or root) may run at once; more are refused (429).
    #[arg(long, env = "FHIRBOX_BULK_STREAMS_PER_SUBJECT", default_value_t = 4)]
    pub bulk_streams_per_subject: usize,

    /// `$load`/`$import` may read `file://` sources under this directory (and nowhere else);
    /// without it, `file://` sources are refused.
    #[arg(long, env = "FHIRBOX_SOURCE_DIR")]
    pub source_dir: Option<PathBuf>,

    /// Let `$load`/`$import` fetch from private, loopback and other non-public addresses
    /// (link-local addresses, such as cloud metadata services, are refused regardless).
    #[arg(long, env = "FHIRBOX_ALLOW_PRIVATE_SOURCES", default_value_t = false)]
    pub allow_private_sources: bool,

    /// How `$dump-sql` connects: by default the server and database of fhirbox's own
    /// connection, as the role fhirbox creates for it (`fhirbox_sql_reader`, which may only read
    /// resource tables; no password: for socket trust or peer authentication). Give a full URL
    /// when that role needs a password or another route.
    #[arg(long, env = "FHIRBOX_SQL_READER_URL", hide_env_values = true)]
    pub sql_reader_url: Option<String>,

    /// How root's `$dump-sql` connects (the role `fhirbox_sql_admin`, which may also read
    /// fhirbox's own types); like --sql-reader-url.
    #[arg(long, env = "FHIRBOX_SQL_ADMIN_URL", hide_env_values = true)]
    pub sql_admin_url: Option<String>,

    /// A read-only streaming standby of the database, as a URL like --database-url
    /// (repeatable; env: comma-separated). Bulk reads (`$dump`, `$dump-csv`, `$dump-sql`, view
    /// runs, `$export` and view exports) go there, round robin among the healthy ones; the
    /// `$dump-sql` roles connect to it as they do to the primary.
    #[arg(
        long = "replica-url",
        env = "FHIRBOX_REPLICA_URLS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub replica_urls: Vec<String>,

    /// Milliseconds a bulk read waits for a standby to replay up to the read's start (an
    /// export's: its kick-off) before it reads on the primary; a standby further behind than
    /// this is skipped until it catches up.
    #[arg(long, env = "FHIRBOX_REPLICA_MAX_WAIT", default_value_t = 5000)]
    pub replica_max_wait: u64,

    /// Milliseconds between two health checks of every standby.
    #[arg(long, env = "FHIRBOX_REPLICA_CHECK_INTERVAL", default_value_t = 1000)]
    pub replica_check_interval: u64,

    /// The largest row a `$dump-sql` result may have, in bytes: a larger one ends the query
    /// with an error before fhirbox reads it.
    #[arg(long, env = "FHIRBOX_SQL_MAX_ROW_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub sql_max_row_bytes: usize,

    /// Rows in one Parquet row group of a view (`_format=parquet`): a group is gathered in
    /// memory, then written and sent.
    #[arg(long, env = "FHIRBOX_PARQUET_ROW_GROUP_ROWS", default_value_t = 32 * 1024)]
    pub parquet_row_group_rows: usize,

    /// Bytes of values in one Parquet row group of a view, at most (about).
    #[arg(long, env = "FHIRBOX_PARQUET_ROW_GROUP_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub parquet_row_group_bytes: usize,

    /// Temp-file space one `$dump-sql` query may use on the database server, in bytes
    /// (PostgreSQL's temp_file_limit for the $dump-sql roles; needs a superuser to set).
    #[arg(long, env = "FHIRBOX_SQL_TEMP_FILE_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub sql_temp_file_bytes: u64,

    /// Memory of each sort or hash of a `$dump-sql` query, a view's statement or an export's
    /// COPY before it spills to temp files, in bytes (PostgreSQL's work_mem for them).
    #[arg(long, env = "FHIRBOX_SQL_WORK_MEM", default_value_t = 64 * 1024 * 1024)]
    pub sql_work_mem: u64,

    /// Temp-file space the COPY of one `$export` type may use on the database server, in
    /// bytes (patient blocks sort every row by patient; needs a superuser to set).
    #[arg(long, env = "FHIRBOX_EXPORT_TEMP_FILE_BYTES", default_value_t = 64 * 1024 * 1024 * 1024)]
    pub export_temp_file_bytes: u64,

    /// `$dump-sql` statement timeout, in seconds (also each view of a run, an export or a
    /// materialization).
    #[arg(long, env = "FHIRBOX_SQL_TIMEOUT", default_value_t = 600)]
    pub sql_timeout: u64,

    /// Most rows a `$dump-sql` result may have (none by default); more ends the transfer
    /// with an error.
    #[arg(long, env = "FHIRBOX_SQL_MAX_ROWS")]
    pub sql_max_rows: Option<u64>,

    /// Most bytes a `$dump-sql` result may have (none by default).
    #[arg(long, env = "FHIRBOX_SQL_MAX_BYTES")]
    pub sql_max_bytes: Option<u64>,

    /// Most bytes of SQL one view (a run, an export's view, a materialization) may compile
    /// to; a larger view is refused (400) before anything reaches PostgreSQL.
    #[arg(long, env = "FHIRBOX_VIEW_MAX_SQL_BYTES", default_value_t = 1024 * 1024)]
    pub view_max_sql_bytes: usize,

    /// Most columns one view may define (every select and unionAll branch counted).
    #[arg(long, env = "FHIRBOX_VIEW_MAX_COLUMNS", default_value_t = 1000)]
    pub view_max_columns: usize,

    /// Most unionAll branches one view may have (counted over the whole view).
    #[arg(long, env = "FHIRBOX_VIEW_MAX_UNION_BRANCHES", default_value_t = 100)]
    pub view_max_union_branches: usize,

    /// How deep the selects and unionAlls of one view may nest.
    #[arg(long, env = "FHIRBOX_VIEW_MAX_DEPTH", default_value_t = 16)]
    pub view_max_depth: usize,

    /// Entries a search page carries when `_count` does not say.
    #[arg(long, env = "FHIRBOX_SEARCH_DEFAULT_COUNT", default_value_t = 100)]
    pub search_default_count: i64,

    /// Most entries a search page carries: a larger `_count` is capped to it.
    #[arg(long, env = "FHIRBOX_SEARCH_MAX_COUNT", default_value_t = 1000)]
    pub search_max_count: i64,

    /// Most values (ORed with commas) one search parameter may list.
    #[arg(long, env = "FHIRBOX_SEARCH_MAX_VALUES", default_value_t = 100)]
    pub search_max_values: usize,

    /// Most parameters one search may have.
    #[arg(long, env = "FHIRBOX_SEARCH_MAX_PARAMETERS", default_value_t = 50)]
    pub search_max_parameters: usize,

    /// The search indexes: `common` (references to patients, subjects and encounters, codes
    /// and identifiers of the common types, a patient's name and birth date: fast searches,
    /// a load into Observation about a third slower; see docs/search.md), `none` (for a
    /// server that is only loaded and dumped), and `Type.parameter` entries (token,
    /// reference, string and date parameters), comma-separated. Made so at start-up:
    /// configured ones created, others that fhirbox made dropped.
    #[arg(long, env = "FHIRBOX_SEARCH_INDEXES", default_value = "common")]
    pub search_indexes: String,

    /// Most resources `_include` and `_revinclude` may add to one search page.
    #[arg(long, env = "FHIRBOX_SEARCH_MAX_INCLUDED", default_value_t = 1000)]
    pub search_max_included: usize,

    /// Longest one search's statements may run, in milliseconds (the page, its total and its
    /// includes, together): past it, a 408 that says so.
    #[arg(long, env = "FHIRBOX_SEARCH_TIMEOUT_MS", default_value_t = 30_000)]
    pub search_timeout_ms: u64,

    /// Most rows one view may output: a run, each view of an export, a materialization.
    #[arg(long, env = "FHIRBOX_VIEW_MAX_ROWS", default_value_t = 100_000_000)]
    pub view_max_rows: u64,

    /// Most bytes one view may output (a materialization: bytes of its rows as PostgreSQL
    /// stores them).
    #[arg(long, env = "FHIRBOX_VIEW_MAX_BYTES", default_value_t = 10 * 1024 * 1024 * 1024)]
    pub view_max_bytes: u64,

    /// Most resources one `$export` job may write.
    #[arg(
        long,
        env = "FHIRBOX_EXPORT_MAX_ROWS",
        default_value_t = 10_000_000_000
    )]
    pub export_max_rows: u64,

    /// Most bytes one `$export` job (or view export) may write.
    #[arg(long, env = "FHIRBOX_EXPORT_MAX_BYTES", default_value_t = 1024 * 1024 * 1024 * 1024)]
    pub export_max_bytes: u64,

    /// Jobs (`$import`, `$export`, view exports) one subject may have waiting or running;
    /// more kick-offs get 429 with Retry-After.
    #[arg(long, env = "FHIRBOX_JOBS_PER_SUBJECT", default_value_t = 8)]
    pub jobs_per_subject: usize,

    /// Tasks of one subject's jobs running at once, across every fhirbox process on the
    /// database; the others wait, and a free worker takes the task of the subject running the
    /// fewest.
    #[arg(long, env = "FHIRBOX_JOB_TASKS_PER_SUBJECT", default_value_t = 2)]
    pub job_tasks_per_subject: usize,

    /// Write `$export` and view-export files to this bucket, `s3://BUCKET[/PREFIX]`, instead
    /// of the export directory (credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_SESSION_TOKEN, or the instance/web-identity chain).
    #[arg(long, env = "FHIRBOX_EXPORT_STORAGE")]
    pub export_storage: Option<String>,

    /// The URL of an S3-compatible server (SeaweedFS, MinIO, ...); path-style addressing is
    /// used then. Without it: AWS S3.
    #[arg(long, env = "FHIRBOX_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// The S3 region.
    #[arg(long, env = "FHIRBOX_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,

    /// Bytes of one part of an upload to the bucket (at least 5 MiB); two parts go up while
    /// the next fills.
    #[arg(long, env = "FHIRBOX_S3_PART_SIZE", default_value_t = 8 * 1024 * 1024)]
    pub s3_part_size: usize,

    /// How manifests link files: `signed` (URLs straight to the bucket, signed at each poll,
    /// `requiresAccessToken: false`; the default with --export-storage) or `proxy` (through
    /// fhirbox, with the client's credentials; the only choice with a local directory).
    #[arg(long, env = "FHIRBOX_EXPORT_LINKS", value_enum)]
    pub export_links: Option<ExportLinks>,

    /// Seconds a signed link lives at most (also never past the files' expiry, nor past
    /// temporary credentials' end).
    #[arg(long, env = "FHIRBOX_EXPORT_LINK_LIFETIME", default_value_t = 3600)]
    pub export_link_lifetime: u64,

    /// Buckets (and prefixes) Clients may read `s3://` sources from, comma-separated
    /// (`s3://imports,s3://shared/hospital-a`); root may read any. None by default.
    #[arg(long, env = "FHIRBOX_SOURCE_BUCKETS", value_delimiter = ',')]
    pub source_buckets: Vec<String>,

    /// Background tasks (`$import` inputs, `$export` resource types) this process runs at once.
    #[arg(long, env = "FHIRBOX_IMPORT_WORKERS", default_value_t = 2)]
    pub import_workers: usize,

    /// Seconds an `$import` worker's claim on an input lasts without renewal: after a crash,
    /// how long until another worker (here or in another process) takes the input over.
    #[arg(long, env = "FHIRBOX_IMPORT_LEASE", default_value_t = 30)]
    pub import_lease: u64,

    /// Milliseconds between two records of a running job task's progress (resources and
    /// bytes done), which the job list, the status routes and the console show. At least 200.
    #[arg(long, env = "FHIRBOX_JOB_PROGRESS_INTERVAL_MS", default_value_t = 1000)]
    pub job_progress_interval_ms: u64,

    /// Most jobs `GET /$jobs` (the console's job list) shows: the newest.
    #[arg(long, env = "FHIRBOX_JOB_LIST_MAX", default_value_t = 100)]
    pub job_list_max: i64,

    /// `GET /$counts` counts a table exactly when the statistics say it holds at most this
    /// many rows; a larger one gets the statistics' live-row count, marked as an estimate
    /// (a `count(*)` of millions of rows takes seconds).
    #[arg(long, env = "FHIRBOX_COUNTS_MAX_EXACT", default_value_t = 100_000)]
    pub counts_max_exact: i64,

    /// Where `$export` writes its files (default: `exports` in the data directory). Every
    /// fhirbox process serving the same database must see the same directory.
    #[arg(long, env = "FHIRBOX_EXPORT_DIR")]
    pub export_dir: Option<PathBuf>,

    /// `$export` splits a type's output into files of about this many bytes.
    #[arg(long, env = "FHIRBOX_EXPORT_FILE_SIZE", default_value_t = 256 * 1024 * 1024)]
    pub export_file_size: u64,

    /// Seconds the files of a finished `$export` are kept before they are deleted.
    #[arg(long, env = "FHIRBOX_EXPORT_EXPIRY", default_value_t = 24 * 60 * 60)]
    pub export_expiry: u64,

    /// Status polls one `$export` job may have per second (after a burst of 5); faster polls
    /// get 429 with `Retry-After`, as the IG asks. 0: no limit.
    #[arg(long, env = "FHIRBOX_EXPORT_POLLS_PER_SECOND", default_value_t = 2.0)]
    pub export_polls_per_second: f64,

    /// Public base URL used in links (`next` pages, `Location` headers); by default built from
    /// the request's `Host` header.
    #[arg(long, env = "FHIRBOX_BASE_URL")]
    pub base_url: Option<String>,

    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key. Without it fhirbox speaks
    /// plain HTTP (for loopback, or behind a TLS-terminating proxy).
    #[arg(long, env = "FHIRBOX_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "FHIRBOX_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Seconds a SMART Backend Services access token lives (the spec recommends 300 at most).
    #[arg(long, env = "FHIRBOX_ACCESS_TOKEN_LIFETIME", default_value_t = 300)]
    pub access_token_lifetime: u64,

    /// Certificates (PEM) to trust besides the system's when fetching sources and Clients'
    /// JWK Sets (a private CA).
    #[arg(long, env = "FHIRBOX_SOURCE_CA_FILE")]
    pub source_ca_file: Option<PathBuf>,

    /// Seconds a connection may take to send a request's headers, or stay idle between
    /// requests, before it is closed.
    #[arg(long, env = "FHIRBOX_HTTP_HEADER_TIMEOUT", default_value_t = 30)]
    pub http_header_timeout: u64,

    /// Connections held at once; more are closed as soon as they are accepted. At most the
    /// process's open-file limit (raised to its hard limit at start) less a reserve of 512
    /// for the database, files and /health.
    #[arg(long, env = "FHIRBOX_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Connections held at once from one client address (IPv6: one /64).
    #[arg(
        long,
        env = "FHIRBOX_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 256
    )]
    pub max_connections_per_address: usize,

    /// Password checks (argon2, 19 MiB each) running at once; default: one per core.
    #[arg(long, env = "FHIRBOX_AUTH_CONCURRENCY")]
    pub auth_concurrency: Option<usize>,

    /// Password checks that may wait for a place; more are refused at once (503).
    /// Default: 8 per core.
    #[arg(long, env = "FHIRBOX_AUTH_QUEUE")]
    pub auth_queue: Option<usize>,

    /// Failed logins a client address may make in a row before it must wait (429).
    #[arg(long, env = "FHIRBOX_AUTH_BURST", default_value_t = 10)]
    pub auth_burst: u32,

    /// Failed logins a client address may make per minute after its burst.
    #[arg(long, env = "FHIRBOX_AUTH_PER_MINUTE", default_value_t = 30)]
    pub auth_per_minute: u32,

    /// The longest NDJSON line `$load`/`$import` accept, in bytes (longer: the load fails
    /// naming the line).
    #[arg(long, env = "FHIRBOX_MAX_LINE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_line_bytes: usize,

    /// Seconds connecting to an http(s) source may take.
    #[arg(long, env = "FHIRBOX_SOURCE_CONNECT_TIMEOUT", default_value_t = 10)]
    pub source_connect_timeout: u64,

    /// Seconds an http(s) source may send nothing before the load fails.
    #[arg(long, env = "FHIRBOX_SOURCE_READ_TIMEOUT", default_value_t = 60)]
    pub source_read_timeout: u64,
}

/// Words of the flags that bound work (sizes, times, counts, concurrency): the settings the
/// console's health page lists as "the limits in force". An allow-list, so that a new flag
/// holding a secret or an address is never shown by accident.
const LIMIT_WORDS: &[&str] = &[
    "max",
    "timeout",
    "per-",
    "burst",
    "queue",
    "concurrency",
    "workers",
    "lease",
    "size",
    "bytes",
    "rows",
    "count",
    "wait",
    "interval",
    "expiry",
    "lifetime",
    "polls",
    "streams",
    "depth",
    "columns",
    "branches",
    "parameters",
    "values",
    "included",
    "indexes",
    "work-mem",
];

/// The limits `serve` runs with, from its parsed command line (defaults included): each flag
/// (`--search-max-count`) with its value(s) as given.
pub fn limits_in_force(matches: &clap::ArgMatches) -> Vec<(String, String)> {
    use clap::Args;
    let Some(("serve", serve)) = matches.subcommand() else {
        return Vec::new();
    };
    let command = ServeArgs::augment_args(clap::Command::new("serve"));
    command
        .get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            if !LIMIT_WORDS.iter().any(|word| long.contains(word)) {
                return None;
            }
            let values = serve.get_raw(arg.get_id().as_str())?;
            let shown: Vec<String> = values.map(|v| v.to_string_lossy().into_owned()).collect();
            Some((format!("--{long}"), shown.join(",")))
        })
        .collect()
}
