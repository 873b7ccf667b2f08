//! The command line: one clap struct per subcommand. Each field's doc comment is the
//! documentation of its flag and environment variable (`fhirbox serve --help` prints them).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
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

    /// Database connections in the pool.
    #[arg(long, env = "FHIRBOX_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,

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

    /// `$dump-sql` statement timeout, in seconds.
    #[arg(long, env = "FHIRBOX_SQL_TIMEOUT", default_value_t = 600)]
    pub sql_timeout: u64,

    /// Most rows a `$dump-sql` result may have (none by default); more ends the transfer
    /// with an error.
    #[arg(long, env = "FHIRBOX_SQL_MAX_ROWS")]
    pub sql_max_rows: Option<u64>,

    /// Most bytes a `$dump-sql` result may have (none by default).
    #[arg(long, env = "FHIRBOX_SQL_MAX_BYTES")]
    pub sql_max_bytes: Option<u64>,

    /// Background tasks (`$import` inputs, `$export` resource types) this process runs at once.
    #[arg(long, env = "FHIRBOX_IMPORT_WORKERS", default_value_t = 2)]
    pub import_workers: usize,

    /// Seconds an `$import` worker's claim on an input lasts without renewal: after a crash,
    /// how long until another worker (here or in another process) takes the input over.
    #[arg(long, env = "FHIRBOX_IMPORT_LEASE", default_value_t = 30)]
    pub import_lease: u64,

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

    /// Public base URL used in links (`next` pages, `Location` headers); by default built from
    /// the request's `Host` header.
    #[arg(long, env = "FHIRBOX_BASE_URL")]
    pub base_url: Option<String>,
}
