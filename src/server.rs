//! `fhirbox serve`: start-up and shutdown.
//!
//! 1. The database: the one named by `--database-url`, or the managed local cluster in the
//!    data directory (created the first time, adopted if a previous fhirbox left it running).
//! 2. Migrations, then the root password (printed once if generated).
//! 3. Listen, print `fhirbox listening on http://ADDR:PORT`, serve.
//! 4. On SIGINT/SIGTERM: stop accepting, let requests in flight finish (at most
//!    [`DRAIN_TIMEOUT`]), close the pool, stop the managed cluster.

use std::io::Write as _;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::auth::root::Origin;
use crate::auth::{AuthError, Authenticator, RootPassword};
use crate::bulk::dump_sql::SqlLimits;
use crate::bulk::export::ExportSettings;
use crate::bulk::jobs::JobSettings;
use crate::bulk::source::{SourcePolicy, Sources};
use crate::bulk::Background;
use crate::cluster::{ClusterError, ManagedCluster, StartOutcome};
use crate::config::ServeArgs;
use crate::format::Formats;
use crate::http::{self, AppState, Settings};
use crate::store::{schema, Store, StoreError};

/// How long requests in flight (a long `$dump`) may run on after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Concurrent `$dump-sql` queries (each holds a reader connection while it streams).
const SQL_READER_POOL: usize = 8;

/// The database the managed cluster keeps fhirbox's tables in.
const MANAGED_DATABASE: &str = "fhirbox";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("invalid --database-url: {0}")]
    DatabaseUrl(tokio_postgres::Error),
    #[error("cannot reach the database: {0}")]
    Unreachable(StoreError),
    #[error("database set-up failed: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("--source-dir {dir}: {reason}")]
    SourceDir { dir: String, reason: String },
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

/// Runs the server until a shutdown signal.
pub async fn run(args: ServeArgs) -> Result<(), ServeError> {
    let cluster = match &args.database_url {
        Some(_) => None,
        None => Some(start_managed_cluster(&args).await?),
    };
    let result = serve_with_database(&args, cluster.as_ref()).await;
    if let Some(cluster) = cluster {
        tracing::info!("stopping the managed PostgreSQL");
        let stopped = tokio::task::spawn_blocking(move || cluster.stop()).await;
        match stopped {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "could not stop the managed PostgreSQL"),
            Err(error) => tracing::error!(%error, "could not stop the managed PostgreSQL"),
        }
    }
    result
}

async fn start_managed_cluster(args: &ServeArgs) -> Result<ManagedCluster, ServeError> {
    let data_dir = args.data_dir.clone();
    let cluster = tokio::task::spawn_blocking(move || -> Result<ManagedCluster, ClusterError> {
        let cluster = ManagedCluster::prepare(&data_dir)?;
        match cluster.start()? {
            StartOutcome::Started => tracing::info!(pgdata = %cluster.pgdata().display(), "started the managed PostgreSQL"),
            StartOutcome::AlreadyRunning => tracing::info!(
                pgdata = %cluster.pgdata().display(),
                "the managed PostgreSQL was still running (fhirbox did not stop cleanly last time); reusing it"
            ),
        }
        Ok(cluster)
    })
    .await
    .map_err(|error| ClusterError::Io {
        context: "managed PostgreSQL start-up".into(),
        source: std::io::Error::other(error),
    })??;
    Ok(cluster)
}

async fn serve_with_database(
    args: &ServeArgs,
    cluster: Option<&ManagedCluster>,
) -> Result<(), ServeError> {
    let config = match (cluster, &args.database_url) {
        (Some(cluster), _) => {
            schema::ensure_database(cluster.connection_config(), MANAGED_DATABASE)
                .await
                .map_err(|e| match e.is_unavailable() {
                    true => ServeError::Unreachable(e),
                    false => ServeError::Store(e),
                })?;
            let mut config = cluster.connection_config();
            config.dbname(MANAGED_DATABASE);
            config
        }
        (None, Some(url)) => {
            tokio_postgres::Config::from_str(url).map_err(ServeError::DatabaseUrl)?
        }
        (None, None) => unreachable!("run() starts a cluster when there is no URL"),
    };
    let reader_config = match &args.sql_reader_url {
        Some(url) => tokio_postgres::Config::from_str(url).map_err(ServeError::DatabaseUrl)?,
        None => Store::config_as(&config, crate::store::schema::SQL_READER_ROLE),
    };
    let store = Store::new(config, args.db_pool_size)?;
    let sql_reader = Store::new(reader_config, SQL_READER_POOL)?;
    let mut conn = store.connection().await.map_err(ServeError::Unreachable)?;
    schema::migrate(&mut conn).await?;
    drop(conn);

    let root = load_root_password(args)?;
    let source_dir = match &args.source_dir {
        Some(dir) => Some(crate::bulk::source::canonical_source_dir(dir).map_err(|e| {
            ServeError::SourceDir {
                dir: dir.display().to_string(),
                reason: e.to_string(),
            }
        })?),
        None => None,
    };
    let sources = Sources::new(SourcePolicy {
        source_dir,
        allow_private: args.allow_private_sources,
    })
    .map_err(|e| ServeError::SourceDir {
        dir: String::new(),
        reason: e.to_string(),
    })?;
    let formats = Formats::new(store.clone());
    let background = Background::start(
        store.clone(),
        sources.clone(),
        formats.clone(),
        JobSettings {
            workers: args.import_workers,
            lease: Duration::from_secs(args.import_lease.max(1)),
        },
        ExportSettings {
            dir: args
                .export_dir
                .clone()
                .unwrap_or_else(|| crate::bulk::export::default_dir(&args.data_dir)),
            file_size: args.export_file_size,
            expiry: Duration::from_secs(args.export_expiry),
        },
    );
    let state = AppState {
        formats,
        background: background.clone(),
        sources,
        sql_reader,
        store: store.clone(),
        auth: Arc::new(Authenticator::new(root)),
        settings: Arc::new(Settings {
            max_body_bytes: args.max_body_bytes,
            sql_limits: SqlLimits {
                timeout: Duration::from_secs(args.sql_timeout),
                max_rows: args.sql_max_rows,
                max_bytes: args.sql_max_bytes,
            },
            base_url: args.base_url.clone(),
        }),
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: args.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(ServeError::Serve)?;
    println!("fhirbox listening on http://{local}");
    let _ = std::io::stdout().flush();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(listener, state, async {
        let _ = stop_rx.await;
    }));
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(());
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => return Err(ServeError::Serve(error)),
        Ok(Err(join)) => return Err(ServeError::Serve(std::io::Error::other(join))),
        Err(_) => tracing::warn!("requests still running after {DRAIN_TIMEOUT:?}; closing them"),
    }
    background.stop().await;
    store.close();
    Ok(())
}

fn load_root_password(args: &ServeArgs) -> Result<RootPassword, ServeError> {
    let (root, origin) =
        RootPassword::load_or_create(args.admin_password.as_deref(), &args.data_dir)?;
    match origin {
        Origin::Configured => tracing::info!("root password from configuration"),
        Origin::Stored(path) => {
            tracing::info!(hash = %path.display(), "root password: the one generated on first start")
        }
        Origin::Generated {
            password,
            hash_file,
        } => {
            println!(
                "Generated a password for the root admin (user 'root'); it is shown only now:\n\n    {password}\n\n\
                 Only its hash is kept ({}). To choose your own, set FHIRBOX_ADMIN_PASSWORD.",
                hash_file.display()
            );
        }
    }
    Ok(root)
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
