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
use tokio_util::sync::CancellationToken;

use crate::app::{self, AppError, AppSettings};
use crate::auth::guard::GuardSettings;
use crate::auth::root::Origin;
use crate::auth::{AuthError, RootPassword};
use crate::bulk::allowance::AllowanceSettings;
use crate::bulk::bounds::OutputBounds;
use crate::bulk::dump_sql::SqlLimits;
use crate::bulk::export::ExportSettings;
use crate::bulk::jobs::JobSettings;
use crate::bulk::source::SourcePolicy;
use crate::cluster::{ClusterError, ManagedCluster, StartOutcome};
use crate::config::ServeArgs;
use crate::http::{self, Settings};
use crate::store::replicas::ReplicaSettings;
use crate::store::roles::RoleLimits;
use crate::store::session::SessionLimits;
use crate::store::{schema, StoreError};

/// How long requests in flight (a long `$dump`) may run on after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The lock file in the data directory.
const LOCK_FILE: &str = "fhirbox.lock";

/// How often the managed PostgreSQL is looked at.
const SUPERVISE_EVERY: Duration = Duration::from_secs(1);

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
    #[error(transparent)]
    App(#[from] AppError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("--source-dir {dir}: {reason}")]
    SourceDir { dir: String, reason: String },
    /// A flag of object storage that cannot be used.
    #[error("{0}")]
    Storage(String),
    /// A flag that cannot be used (the message names it).
    #[error("{0}")]
    Config(String),
    #[error("server error: {0}")]
    Serve(std::io::Error),
    #[error("the data directory {dir}: {source}")]
    DataDir { dir: String, source: std::io::Error },
    #[error("another fhirbox is running on the data directory {0}: stop it first, or give this one another --data-dir")]
    Busy(String),
}

/// Runs the server until a shutdown signal. `limits`: the flags that bound work, with their
/// values (see [`crate::config::limits_in_force`]), for the console's health page.
pub async fn run(args: ServeArgs, limits: Vec<(String, String)>) -> Result<(), ServeError> {
    // The managed cluster's data directory is locked for the life of the process: a second
    // fhirbox on it would adopt, and on exit stop, this one's PostgreSQL. (With a database
    // URL, processes may share a data directory: its export files must be shared anyway.)
    let (_lock, cluster) = match &args.database_url {
        Some(_) => (None, None),
        None => (
            Some(lock_data_dir(&args.data_dir)?),
            Some(Arc::new(start_managed_cluster(&args).await?)),
        ),
    };
    let stop_supervisor = CancellationToken::new();
    let supervisor = cluster
        .clone()
        .map(|cluster| tokio::spawn(supervise(cluster, stop_supervisor.clone())));
    let result = serve_with_database(&args, cluster.as_deref(), limits).await;
    stop_supervisor.cancel();
    if let Some(supervisor) = supervisor {
        let _ = supervisor.await;
    }
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

/// Takes the data directory's lock file (`fhirbox.lock`), or fails at once if another
/// process holds it. The lock goes with the process, however it ends.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, ServeError> {
    let locked = |source: std::io::Error| ServeError::DataDir {
        dir: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(locked)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(locked)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(ServeError::Busy(dir.display().to_string())),
        Err(std::fs::TryLockError::Error(error)) => Err(locked(error)),
    }
}

/// Watches the managed PostgreSQL until `stop`: if it died, starts it again (it recovers
/// from its WAL, losing nothing committed) and says so in the log.
async fn supervise(cluster: Arc<ManagedCluster>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(SUPERVISE_EVERY) => {}
            () = stop.cancelled() => return,
        }
        let watched = cluster.clone();
        if tokio::task::spawn_blocking(move || watched.seems_alive())
            .await
            .unwrap_or(true)
        {
            continue;
        }
        tracing::error!("the managed PostgreSQL is gone; starting it again");
        let restarted = cluster.clone();
        match tokio::task::spawn_blocking(move || restarted.start()).await {
            Ok(Ok(_)) => tracing::info!("the managed PostgreSQL is running again"),
            Ok(Err(error)) => tracing::error!(%error, "could not restart the managed PostgreSQL"),
            Err(error) => tracing::error!(%error, "could not restart the managed PostgreSQL"),
        }
    }
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
    limits: Vec<(String, String)>,
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
    let parse = |url: &Option<String>| -> Result<Option<tokio_postgres::Config>, ServeError> {
        url.as_deref()
            .map(tokio_postgres::Config::from_str)
            .transpose()
            .map_err(ServeError::DatabaseUrl)
    };
    // Bound first: the address it got (port 0 picks one) is the public base SMART falls back
    // on without --base-url.
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: args.listen,
            source,
        })?;
    let bound = listener.local_addr().map_err(ServeError::Serve)?;
    let (export_bucket, export_links) = export_storage(args)?;
    let settings = AppSettings {
        pool_size: args.db_pool_size,
        pool_wait: Duration::from_secs(args.db_wait.max(1)),
        sql_reader: parse(&args.sql_reader_url)?,
        sql_admin: parse(&args.sql_admin_url)?,
        sql_max_row_bytes: args.sql_max_row_bytes,
        roles: RoleLimits {
            temp_file_kb: args.sql_temp_file_bytes.div_ceil(1024),
            work_mem_kb: args.sql_work_mem.div_ceil(1024),
            idle_in_transaction_ms: 60_000,
        },
        migrate: true,
        sources: source_policy(args)?,
        jobs: JobSettings {
            workers: args.import_workers,
            lease: Duration::from_secs(args.import_lease.max(1)),
            jobs_per_subject: args.jobs_per_subject.max(1),
            tasks_per_subject: args.job_tasks_per_subject.max(1),
            progress_every: Duration::from_millis(args.job_progress_interval_ms.max(200)),
        },
        exports: ExportSettings {
            dir: args
                .export_dir
                .clone()
                .unwrap_or_else(|| crate::bulk::export::default_dir(&args.data_dir)),
            file_size: args.export_file_size,
            expiry: Duration::from_secs(args.export_expiry),
            polls_per_second: args.export_polls_per_second,
            session: SessionLimits {
                temp_file_bytes: args.export_temp_file_bytes,
                work_mem_bytes: args.sql_work_mem,
                timeout: None,
            },
            view_session: view_session(args),
            parquet: parquet_row_groups(args),
            views: view_limits(args),
            view_output: OutputBounds::views(args.view_max_rows, args.view_max_bytes),
            output: OutputBounds::exports(args.export_max_rows, args.export_max_bytes),
            bucket: export_bucket,
            part_size: args.s3_part_size,
            links: export_links,
            link_lifetime: Duration::from_secs(args.export_link_lifetime.max(1)),
        },
        s3: crate::objects::S3Settings {
            endpoint: args.s3_endpoint.clone(),
            region: args.s3_region.clone(),
            credentials: None,
        },
        replicas: ReplicaSettings {
            servers: args
                .replica_urls
                .iter()
                .map(|url| tokio_postgres::Config::from_str(url).map_err(ServeError::DatabaseUrl))
                .collect::<Result<_, _>>()?,
            max_wait: Duration::from_millis(args.replica_max_wait),
            check_interval: Duration::from_millis(args.replica_check_interval.max(10)),
        },
        guard: guard_settings(args),
        token_lifetime: Duration::from_secs(args.access_token_lifetime.max(1)),
        allowance: AllowanceSettings {
            total: args.bulk_streams.max(1),
            per_subject: args.bulk_streams_per_subject.max(1),
        },
        http: Settings {
            limits: std::sync::Arc::new(limits),
            max_body_bytes: args.max_body_bytes,
            job_list_max: args.job_list_max.max(1),
            counts_max_exact: args.counts_max_exact.max(0),
            sql_limits: SqlLimits {
                timeout: Duration::from_secs(args.sql_timeout),
                max_rows: args.sql_max_rows,
                max_bytes: args.sql_max_bytes,
            },
            parquet: parquet_row_groups(args),
            views: view_limits(args),
            view_session: view_session(args),
            view_output: OutputBounds::views(args.view_max_rows, args.view_max_bytes),
            search_indexes: std::sync::Arc::new(
                crate::search::index::Indexes::parse(&args.search_indexes)
                    .map_err(|e| ServeError::Config(e.to_string()))?,
            ),
            search: crate::search::Limits {
                default_count: args
                    .search_default_count
                    .clamp(0, args.search_max_count.max(1)),
                max_count: args.search_max_count.max(1),
                max_values: args.search_max_values.max(1),
                max_parameters: args.search_max_parameters.max(1),
                max_included: args.search_max_included,
                timeout: std::time::Duration::from_millis(args.search_timeout_ms.max(1)),
            },
            base_url: args.base_url.clone(),
            listen_base: (!bound.ip().is_unspecified()).then(|| {
                let scheme = if args.tls_cert.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{bound}")
            }),
            connections: http::serve::ConnectionSettings {
                header_timeout: Duration::from_secs(args.http_header_timeout.max(1)),
                tls: tls_config(args)?,
                max_connections: connection_bound(args.max_connections),
                max_per_address: args.max_connections_per_address.max(1),
            },
        },
    };
    log_configuration(args, &config, &settings);
    let root = load_root_password(args)?;
    let state = app::build(config, root, settings).await?;

    let stopping = state.clone();
    let stop = CancellationToken::new();
    if let Some(address) = args.metrics_listen {
        let handle = crate::metrics::install()?;
        let metrics = TcpListener::bind(address)
            .await
            .map_err(|source| ServeError::Listen {
                addr: address,
                source,
            })?;
        let local = metrics.local_addr().map_err(ServeError::Serve)?;
        println!("fhirbox metrics on http://{local}/metrics");
        let stopped = stop.clone();
        let scraped = state.clone();
        let refresh: crate::metrics::Refresh = Arc::new(move || {
            let state = scraped.clone();
            Box::pin(async move { record_gauges(&state).await })
        });
        tokio::spawn(crate::metrics::serve(
            metrics,
            handle,
            refresh,
            async move { stopped.cancelled().await },
        ));
    }
    // Last: tests and scripts wait for this line to know that everything is up.
    let local = listener.local_addr().map_err(ServeError::Serve)?;
    let scheme = if args.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    println!("fhirbox listening on {scheme}://{local}");
    let stopped = stop.clone();
    let server = tokio::spawn(http::serve(listener, state, async move {
        stopped.cancelled().await
    }));
    let _ = std::io::stdout().flush();
    shutdown_signal().await;
    tracing::info!("shutting down");
    stop.cancel();
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => return Err(ServeError::Serve(error)),
        Ok(Err(join)) => return Err(ServeError::Serve(std::io::Error::other(join))),
        Err(_) => tracing::warn!("requests still running after {DRAIN_TIMEOUT:?}; closing them"),
    }
    stopping.stop().await;
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

/// The start-up configuration, in the log (no secrets: the database's password and the root
/// password are never written).
fn log_configuration(args: &ServeArgs, config: &tokio_postgres::Config, settings: &AppSettings) {
    tracing::info!(
        listen = %args.listen,
        data_dir = %args.data_dir.display(),
        database = format!(
            "{} db={} user={}",
            crate::store::replicas::describe(config),
            config.get_dbname().unwrap_or("-"),
            config.get_user().unwrap_or("-")
        ),
        managed = args.database_url.is_none(),
        pool = settings.pool_size,
        bulk_streams = settings.allowance.total,
        bulk_streams_per_subject = settings.allowance.per_subject,
        workers = settings.jobs.workers,
        export_dir = %settings.exports.dir.display(),
        source_dir = ?settings.sources.source_dir,
        allow_private_sources = settings.sources.allow_private,
        metrics = ?args.metrics_listen,
        "configuration"
    );
    if args.base_url.is_none() && args.listen.ip().is_unspecified() {
        tracing::warn!(
            "no --base-url and no one listen address: the SMART token endpoint refuses every request (it checks an assertion's aud against the public base URL, never against Host)"
        );
    }
}

/// Where loads may read from and how, from the command line.
fn source_policy(args: &ServeArgs) -> Result<SourcePolicy, ServeError> {
    let source_dir = match &args.source_dir {
        Some(dir) => Some(crate::bulk::source::canonical_source_dir(dir).map_err(|e| {
            ServeError::SourceDir {
                dir: dir.display().to_string(),
                reason: e.to_string(),
            }
        })?),
        None => None,
    };
    Ok(SourcePolicy {
        source_dir,
        allow_private: args.allow_private_sources,
        max_line_bytes: args.max_line_bytes,
        connect_timeout: Duration::from_secs(args.source_connect_timeout.max(1)),
        read_timeout: Duration::from_secs(args.source_read_timeout.max(1)),
        extra_roots: match &args.source_ca_file {
            Some(file) => {
                use rustls::pki_types::pem::PemObject;
                rustls::pki_types::CertificateDer::pem_file_iter(file)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| ServeError::Tls(format!("{}: {e}", file.display())))?
                    .into_iter()
                    .map(|cert| cert.to_vec())
                    .collect()
            }
            None => Vec::new(),
        },
        client_buckets: args
            .source_buckets
            .iter()
            .filter(|b| !b.trim().is_empty())
            .map(|b| {
                crate::objects::Location::parse(b.trim()).ok_or_else(|| {
                    ServeError::Storage(format!(
                        "--source-buckets: '{b}' is not s3://BUCKET or s3://BUCKET/PREFIX"
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
    })
}

/// `--export-storage`, `--export-links`: where export files go and how manifests link them.
fn export_storage(
    args: &ServeArgs,
) -> Result<
    (
        Option<crate::objects::Location>,
        Option<crate::bulk::export::Links>,
    ),
    ServeError,
> {
    use crate::bulk::export::Links;
    use crate::config::ExportLinks;
    let bucket = match &args.export_storage {
        Some(url) => Some(crate::objects::Location::parse(url).ok_or_else(|| {
            ServeError::Storage(format!(
                "--export-storage: '{url}' is not s3://BUCKET or s3://BUCKET/PREFIX"
            ))
        })?),
        None => None,
    };
    let links = match (args.export_links, &bucket) {
        (Some(ExportLinks::Signed), None) => {
            return Err(ServeError::Storage(
                "--export-links signed needs --export-storage s3://...: a local directory has no signed URLs".into(),
            ))
        }
        (Some(ExportLinks::Signed), Some(_)) => Some(Links::Signed),
        (Some(ExportLinks::Proxy), _) => Some(Links::Proxy),
        (None, _) => None,
    };
    Ok((bucket, links))
}

/// The TLS configuration of --tls-cert and --tls-key, if given.
fn tls_config(args: &ServeArgs) -> Result<Option<Arc<rustls::ServerConfig>>, ServeError> {
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => http::serve::tls_config(cert, key)
            .map(Some)
            .map_err(ServeError::Tls),
        _ => Ok(None),
    }
}

/// The limits of password checks, from the command line.
fn guard_settings(args: &ServeArgs) -> GuardSettings {
    let defaults = GuardSettings::default();
    GuardSettings {
        concurrency: args.auth_concurrency.unwrap_or(defaults.concurrency),
        queue: args.auth_queue.unwrap_or(defaults.queue),
        burst: args.auth_burst,
        per_minute: args.auth_per_minute,
    }
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

/// Descriptors kept for everything but client connections: database connections, export
/// files, sources, and room to accept (and close) one more connection.
const FD_RESERVE: u64 = 512;

/// The connection bound in force: the flag, within the open-file limit (raised to the hard
/// limit first) less [`FD_RESERVE`].
fn connection_bound(asked: usize) -> usize {
    let files = http::admission::raise_fd_limit();
    let room = files.saturating_sub(FD_RESERVE).max(16) as usize;
    if asked > room {
        tracing::warn!(
            asked,
            open_files = files,
            "--max-connections is over the open-file limit less a reserve: {room} connections at most"
        );
    }
    asked.min(room).max(1)
}

/// What a view's statement may take on the database server.
fn view_session(args: &ServeArgs) -> SessionLimits {
    SessionLimits {
        temp_file_bytes: args.sql_temp_file_bytes,
        work_mem_bytes: args.sql_work_mem,
        timeout: Some(Duration::from_secs(args.sql_timeout.max(1))),
    }
}

fn view_limits(args: &ServeArgs) -> crate::views::sql::ViewLimits {
    crate::views::sql::ViewLimits {
        sql_bytes: args.view_max_sql_bytes.max(1),
        columns: args.view_max_columns.max(1),
        union_branches: args.view_max_union_branches,
        depth: args.view_max_depth.max(1),
    }
}

fn parquet_row_groups(args: &ServeArgs) -> crate::views::parquet::RowGroups {
    crate::views::parquet::RowGroups {
        rows: args.parquet_row_group_rows.max(1),
        bytes: args.parquet_row_group_bytes.max(1),
    }
}

/// The gauges a metrics scrape reads now: every connection pool's state, the job queue.
async fn record_gauges(state: &http::AppState) {
    let mut pools = vec![
        ("primary".to_string(), "interactive", state.store.clone()),
        ("primary".to_string(), "bulk", state.bulk_store.clone()),
        (
            "primary".to_string(),
            "sql_reader",
            state.sql_reader.clone(),
        ),
        ("primary".to_string(), "sql_admin", state.sql_admin.clone()),
    ];
    for (replica, read) in state.readers.replica_pools() {
        pools.push((replica.clone(), "bulk", read.bulk));
        pools.push((replica.clone(), "sql_reader", read.sql_reader));
        pools.push((replica, "sql_admin", read.sql_admin));
    }
    for (server, pool, store) in pools {
        let status = store.status();
        let in_use = status.size.saturating_sub(status.available);
        crate::metrics::db_connections(&server, pool, in_use, status.available, status.waiting);
    }
    match state.background.jobs.task_counts().await {
        Ok(counts) => {
            for (kind, status, count) in counts {
                crate::metrics::job_tasks(kind, status, count);
            }
        }
        Err(error) => tracing::warn!(%error, "could not count the job tasks for the metrics"),
    }
}
