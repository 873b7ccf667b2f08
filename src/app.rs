//! A running fhirbox's parts, built from its settings in one place: the connection pools
//! (interactive, bulk, and the two `$dump-sql` roles), the schema, the sources, the
//! conversion rules, the background workers and the authenticator. [`crate::server`] builds
//! them from the command line; the tests build them from their own settings.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::guard::GuardSettings;
use crate::auth::{AuthError, Authenticator, RootPassword};
use crate::bulk::allowance::{Allowance, AllowanceSettings};
use crate::bulk::export::ExportSettings;
use crate::bulk::jobs::JobSettings;
use crate::bulk::source::{SourceError, SourcePolicy, Sources};
use crate::bulk::Background;
use crate::formats::Formats;
use crate::http::{AppState, Settings};
use crate::store::replicas::{ReadPools, Readers, ReplicaPools, ReplicaSettings};
use crate::store::roles::{self, RoleLimits, SQL_ADMIN_ROLE, SQL_READER_ROLE};
use crate::store::{schema, tokens, PoolSettings, Store, StoreError};

/// What a fhirbox is built from.
#[derive(Debug, Clone)]
pub struct AppSettings {
    /// Connections for interactive requests.
    pub pool_size: usize,
    /// How long a request waits for a free connection before it is answered "busy".
    pub pool_wait: Duration,
    /// Where the `$dump-sql` roles connect (default: fhirbox's server and database, as the
    /// role, without a password).
    pub sql_reader: Option<tokio_postgres::Config>,
    pub sql_admin: Option<tokio_postgres::Config>,
    /// The largest row a `$dump-sql` result may have.
    pub sql_max_row_bytes: usize,
    pub roles: RoleLimits,
    /// Run the migrations (the tests migrate a template database once).
    pub migrate: bool,
    pub sources: SourcePolicy,
    pub jobs: JobSettings,
    pub exports: ExportSettings,
    pub guard: GuardSettings,
    /// How long SMART access tokens live.
    pub token_lifetime: Duration,
    pub allowance: AllowanceSettings,
    pub http: Settings,
    /// How buckets are reached (exports, sources).
    pub s3: crate::objects::S3Settings,
    /// Read-only standbys for the bulk reads.
    pub replicas: ReplicaSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot reach the database: {0}")]
    Unreachable(StoreError),
    #[error("database set-up failed: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("the sources: {0}")]
    Sources(#[from] SourceError),
    #[error(transparent)]
    Storage(#[from] crate::objects::ObjectError),
    #[error("configuration: {0}")]
    Config(String),
}

/// Builds a fhirbox on the database of `config`, and starts its background work.
pub async fn build(
    config: tokio_postgres::Config,
    root: RootPassword,
    settings: AppSettings,
) -> Result<AppState, AppError> {
    let token_key;
    let store = Store::with_settings(
        config.clone(),
        PoolSettings {
            size: settings.pool_size,
            wait: settings.pool_wait,
            max_message: None,
        },
    )?;
    {
        let mut conn = store.connection().await.map_err(AppError::Unreachable)?;
        if settings.migrate {
            schema::migrate(&mut conn).await?;
        }
        let indexes = settings
            .http
            .search_indexes
            .definitions()
            .map_err(|e| AppError::Config(e.to_string()))?;
        let (created, dropped) = crate::store::search_indexes::apply(&mut conn, &indexes).await?;
        if !created.is_empty() || !dropped.is_empty() {
            tracing::info!(?created, ?dropped, "search indexes");
        }
        roles::limit(&conn, &settings.roles).await?;
        token_key = tokens::signing_key(&conn).await?;
    }
    // Bulk work and the job workers: the allowance, plus a running task's COPY and its
    // claim renewals, plus a little room.
    let bulk_size = settings.allowance.total + 2 * settings.jobs.workers + 2;
    let bulk_pool = PoolSettings {
        size: bulk_size,
        wait: settings.pool_wait,
        max_message: None,
    };
    let bulk_store = Store::with_settings(config.clone(), bulk_pool.clone())?;
    let role_config = |role: &str, given: &Option<tokio_postgres::Config>| {
        given
            .clone()
            .unwrap_or_else(|| Store::config_as(&config, role))
    };
    let reader_config = role_config(SQL_READER_ROLE, &settings.sql_reader);
    let admin_config = role_config(SQL_ADMIN_ROLE, &settings.sql_admin);
    let sql_pool_settings = PoolSettings {
        size: settings.allowance.total.max(1),
        wait: settings.pool_wait,
        max_message: Some(settings.sql_max_row_bytes),
    };
    let sql_reader = Store::with_settings(reader_config.clone(), sql_pool_settings.clone())?;
    let sql_admin = Store::with_settings(admin_config.clone(), sql_pool_settings.clone())?;
    // Standbys get the same pools, as the same roles, on their own servers.
    let readers = Readers::start(
        ReadPools::primary(bulk_store.clone(), sql_reader.clone(), sql_admin.clone()),
        &settings.replicas,
        ReplicaPools {
            bulk: bulk_pool,
            sql_reader: (&reader_config, sql_pool_settings.clone()),
            sql_admin: (&admin_config, sql_pool_settings),
        },
    )?;
    let buckets = crate::objects::Buckets::new(settings.s3.clone());
    let sources = Sources::new(settings.sources, buckets.clone())?;
    let formats = Formats::new(store.clone());
    let storage = settings.exports.storage(&buckets).await?;
    let background = Background::start(
        bulk_store.clone(),
        sources.clone(),
        formats.clone(),
        settings.jobs,
        settings.exports,
        storage,
        readers.clone(),
    );
    Ok(AppState {
        auth: Arc::new(Authenticator::new(
            root,
            settings.guard,
            &token_key,
            settings.token_lifetime,
        )?),
        bulk: Allowance::new(settings.allowance),
        store,
        bulk_store,
        sql_reader,
        sql_admin,
        sources,
        formats,
        readers,
        background,
        settings: Arc::new(settings.http),
    })
}

impl AppState {
    /// Stops the background work and closes the pools (shutdown).
    pub async fn stop(&self) {
        self.background.stop().await;
        self.readers.stop();
        for store in [
            &self.store,
            &self.bulk_store,
            &self.sql_reader,
            &self.sql_admin,
        ] {
            store.close();
        }
    }
}
