//! Storage: every SQL statement fhirbox runs lives under this module, and every connection's
//! life is decided here ([`conn`]: the pool, dedicated connections, transactions).
//!
//! Layout (compatible with the reference product): one table per resource
//! type named after the type in lower case, with `id, txid, cts, ts, resource_type, status,
//! resource`, a `<table>_history` twin for replaced and deleted versions, and one global
//! version sequence `transaction_id_seq`.

pub mod cached;
pub mod clients;
pub mod condition;
pub mod conn;
pub mod copy;
pub mod copy_out;
pub mod counts;
pub mod dump;
pub mod dump_csv;
pub mod dump_sql;
pub mod export;
pub mod export_blocks;
pub mod job_list;
pub mod jobs;
pub mod load;
pub mod materialized;
pub mod migrate;
pub mod policy;
pub mod replicas;
pub mod resources;
pub mod roles;
pub mod schema;
pub mod search;
pub mod search_functions;
pub mod search_indexes;
pub mod search_terminology;
pub mod session;
pub mod socket;
pub mod token;
pub mod tokens;
pub mod view_export;
pub mod view_functions;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use socket::Connector;

pub use conn::Tx;
pub use deadpool_postgres::{GenericClient, Object as Connection};

/// A timestamp as a SQL literal (`'2021-06-10 06:26:10.500000+00'::timestamptz`), for the
/// statements that take no bind parameters (COPY). fhirbox prints it itself from a parsed
/// timestamp: digits, `-`, `:`, `.` and a space, never text from a request.
pub fn timestamp_literal(at: &chrono::DateTime<chrono::Utc>) -> String {
    format!("'{}'::timestamptz", at.format("%Y-%m-%d %H:%M:%S%.6f+00"))
}

/// Errors from the database layer. Domain outcomes (not found, deleted) are return values,
/// not errors; these are the failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no database connection available: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("could not set up the connection pool: {0}")]
    PoolBuild(#[from] deadpool_postgres::BuildError),
    #[error("{}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("{resource_type}/{id} already exists")]
    AlreadyExists { resource_type: String, id: String },
    /// A request fhirbox should have refused earlier reached the database layer.
    #[error("{0}")]
    Invalid(String),
}

/// A database error in words: PostgreSQL's message and SQLSTATE when the server refused a
/// statement (tokio-postgres alone says only "db error"), else what broke.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!(
            "PostgreSQL: {} [SQLSTATE {}]",
            db.message(),
            db.code().code()
        ),
        None => match std::error::Error::source(error) {
            Some(source) => format!("database connection: {error}: {source}"),
            None => format!("database connection: {error}"),
        },
    }
}

impl StoreError {
    /// Whether every connection of the pool stayed in use for the whole wait.
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            StoreError::Pool(deadpool_postgres::PoolError::Timeout(
                deadpool_postgres::TimeoutType::Wait
            ))
        )
    }

    /// Whether PostgreSQL cancelled the statement (its `statement_timeout` ran out).
    pub fn is_timeout(&self) -> bool {
        matches!(self, StoreError::Db(error)
            if error.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED))
    }

    /// What a search function refused, for the client: a ValueSet or CodeSystem a
    /// terminology modifier needs that is not stored, or cannot be read exactly (SQLSTATE
    /// [`search_terminology::REFUSAL`]).
    pub fn refusal(&self) -> Option<&str> {
        let StoreError::Db(error) = self else {
            return None;
        };
        let db = error.as_db_error()?;
        (db.code().code() == search_terminology::REFUSAL).then(|| db.message())
    }

    /// Whether the database is unreachable (as opposed to having rejected a statement).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Pool(_) | StoreError::PoolBuild(_) => true,
            // The connection closed or its socket failed. Other client-side errors (a value
            // that does not convert to its column's type, a statement fhirbox got wrong) are
            // fhirbox's own: a 500, not a "try again".
            StoreError::Db(error) => {
                error.is_closed()
                    || std::error::Error::source(error)
                        .is_some_and(|source| source.is::<std::io::Error>())
            }
            StoreError::AlreadyExists { .. } | StoreError::Invalid(_) => false,
        }
    }
}

/// The connection pool and the entry point to every store operation.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// How connections (and cancel requests) reach the server.
    connector: Arc<Connector>,
}

/// How a pool connects and how long a request waits for one of its connections.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub size: usize,
    /// How long a request waits for a free connection before it is told the server is busy.
    pub wait: Duration,
    /// The largest message (a row) a connection may receive (see [`socket`]).
    pub max_message: Option<usize>,
}

impl PoolSettings {
    /// `size` connections, a 30-second wait, no message limit.
    pub fn sized(size: usize) -> PoolSettings {
        PoolSettings {
            size,
            wait: Duration::from_secs(30),
            max_message: None,
        }
    }
}

impl Store {
    /// A pool of `size` connections; connections are opened lazily.
    pub fn new(config: tokio_postgres::Config, size: usize) -> Result<Store, StoreError> {
        Store::with_settings(config, PoolSettings::sized(size))
    }

    /// A pool with these settings.
    pub fn with_settings(
        config: tokio_postgres::Config,
        settings: PoolSettings,
    ) -> Result<Store, StoreError> {
        let connector = Arc::new(Connector::new(config.clone(), settings.max_message));
        let manager = Manager::from_connect(
            config,
            Connector::clone(&connector),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.size)
            .wait_timeout(Some(settings.wait))
            .create_timeout(Some(Duration::from_secs(10)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()?;
        Ok(Store { pool, connector })
    }

    /// How this store reaches its server (for cancel requests).
    pub(crate) fn connector(&self) -> Arc<Connector> {
        self.connector.clone()
    }

    /// A connection from the pool.
    pub async fn connection(&self) -> Result<Connection, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// Whether the database answers a trivial query.
    pub async fn ping(&self) -> bool {
        match self.pool.get().await {
            Ok(conn) => conn.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    }

    /// Closes the pool: idle connections are dropped, waiters get an error.
    pub fn close(&self) {
        self.pool.close();
    }

    /// The connection settings for another role on the same server and database (no
    /// password: for trust or peer authentication on a local socket).
    pub fn config_as(config: &tokio_postgres::Config, user: &str) -> tokio_postgres::Config {
        let mut other = tokio_postgres::Config::new();
        for host in config.get_hosts() {
            match host {
                tokio_postgres::config::Host::Tcp(name) => other.host(name),
                tokio_postgres::config::Host::Unix(path) => other.host_path(path),
            };
        }
        for port in config.get_ports() {
            other.port(*port);
        }
        if let Some(dbname) = config.get_dbname() {
            other.dbname(dbname);
        }
        if let Some(timeout) = config.get_connect_timeout() {
            other.connect_timeout(*timeout);
        }
        other.user(user).application_name("fhirbox $dump-sql");
        other
    }

    /// Pool occupancy, for tests that check a connection came back.
    pub fn status(&self) -> deadpool_postgres::Status {
        self.pool.status()
    }
}
