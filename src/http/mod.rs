//! HTTP: the route table, shared state and the layers every request passes.
//!
//! A request goes through, in order:
//! 1. [`log::log_requests`]: one log line per request (and its metrics), when its answer ends.
//! 2. [`normalize::normalize_path`]: the path is percent-decoded once and put in one canonical
//!    form before routing, so `/Patient/%24dump` and `/Patient/$dump` are the same request for
//!    the router and for access control, and `.`/`..` tricks are refused.
//! 3. [`access::require_auth`]: credentials and access policies (all routes but the public
//!    ones), after routing, so it knows the route.
//! 4. The router below, whose handlers are thin: they parse, call an operation module
//!    (`crud`, `bundle`, `bulk`, ...), and answer. A handler's file is named after its URL.
//!
//! Routes under `/fhir` are the same handlers with [`Api::Fhir`] in the request extensions:
//! they convert bodies between FHIR and native at the edges (see [`context::ApiContext`]).

pub mod access;
pub mod admission;
pub mod body;
mod bundle;
pub mod challenge;
mod console;
pub mod context;
mod counts;
mod crud;
mod dump;
mod dump_csv;
mod dump_sql;
pub mod error;
mod export;
mod health;
mod import;
mod jobs;
mod load;
pub mod log;
mod metadata;
pub mod normalize;
mod search;
mod search_forms;
mod search_system;
pub mod serve;
mod smart;
mod status;
mod view_export;
mod views;

use std::sync::Arc;

use axum::extract::Request;
use axum::middleware;
use axum::routing::{get, post};
use axum::{Extension, Router};

use crate::auth::Authenticator;
use crate::bulk::source::Sources;
use crate::format::Api;
use crate::formats::Formats;
use crate::store::jobs::JobKind;
use crate::store::Store;
use error::ApiError;

/// Everything a handler may need, cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Connections for interactive requests.
    pub store: Store,
    /// Connections for long-running bulk work (`$dump`, `$dump-csv`, `$load`), each taken
    /// with a permit of [`AppState::bulk`].
    pub bulk_store: Store,
    pub bulk: crate::bulk::allowance::Allowance,
    pub auth: Arc<Authenticator>,
    pub formats: Formats,
    /// Where `$load` and `$import` may read from.
    pub sources: Sources,
    /// Connections as the SQL reader role, for clients' `$dump-sql`.
    pub sql_reader: Store,
    /// Connections as the SQL admin role, for root's `$dump-sql` (it may read fhirbox's own
    /// types too).
    pub sql_admin: Store,
    /// Where bulk reads (`$dump`, `$dump-csv`, `$dump-sql`, view runs) go: a standby that has
    /// replayed up to the request's start, or the primary (`bulk_store`, `sql_reader`,
    /// `sql_admin`).
    pub readers: crate::store::replicas::Readers,
    /// `$import` and `$export` jobs and this process's workers.
    pub background: crate::bulk::Background,
    pub settings: Arc<Settings>,
}

/// HTTP settings from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The flags that bound work and their values, as `serve` runs (for `GET /$status`).
    pub limits: Arc<Vec<(String, String)>>,
    pub max_body_bytes: usize,
    pub sql_limits: crate::bulk::dump_sql::SqlLimits,
    /// Parquet row groups of `$viewdefinition-run`.
    pub parquet: crate::views::parquet::RowGroups,
    /// How big a view may compile (`--view-max-*`).
    pub views: crate::views::sql::ViewLimits,
    /// How much one view may output (`--view-max-rows`, `--view-max-bytes`).
    pub view_output: crate::bulk::bounds::OutputBounds,
    /// What a `$materialize` may take on the database server (`--sql-timeout`,
    /// `--sql-temp-file-bytes`, `--sql-work-mem`).
    pub view_session: crate::store::session::SessionLimits,
    /// What one search may ask for (`--search-*`).
    pub search: crate::search::Limits,
    /// Most jobs `GET /$jobs` lists (`--job-list-max`).
    pub job_list_max: i64,
    /// Tables of at most this many rows are counted exactly by `GET /$counts`
    /// (`--counts-max-exact`).
    pub counts_max_exact: i64,
    /// The search indexes in force (`--search-indexes`).
    pub search_indexes: std::sync::Arc<crate::search::index::Indexes>,
    /// Public base URL for links; `None`: from the request's `Host`.
    pub base_url: Option<String>,
    /// Without `base_url`, the URL of the address fhirbox listens on, when that is one
    /// address (not `0.0.0.0`): what SMART's token endpoint is, since `Host` may not say.
    pub listen_base: Option<String>,
    /// Time limits of connections.
    pub connections: serve::ConnectionSettings,
}

/// The application: router, auth and path normalization, ready to serve.
pub fn app(state: AppState) -> Router {
    let max_body = state.settings.max_body_bytes;
    let router = routes()
        .layer(middleware::from_fn_with_state(
            state.clone(),
            access::require_auth,
        ))
        .with_state(state);
    // A layer on a router runs after that router has routed; the outer router has no routes of
    // its own, so its layer runs first and the inner router routes the normalized path.
    Router::new()
        .fallback_service(router)
        .layer(middleware::from_fn_with_state(
            max_body,
            search_forms::rewrite,
        ))
        .layer(middleware::from_fn(normalize::normalize_path))
        .layer(middleware::from_fn(challenge::suppress_basic))
        .layer(middleware::from_fn(log::log_requests))
}

/// Serves the application on a bound listener until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let connections = state.settings.connections.clone();
    serve::serve_app(listener, app(state), connections, shutdown).await
}

impl Settings {
    /// The public base URL that security decisions use (SMART's `aud`): `--base-url`, else
    /// the one address fhirbox listens on; never `Host`.
    pub fn trusted_base(&self) -> Option<&str> {
        self.base_url
            .as_deref()
            .or(self.listen_base.as_deref())
            .map(|base| base.trim_end_matches('/'))
    }
}

/// The routes that follow a background job: its status (and cancel), and an export's files.
/// The subject that started the job may use them without a policy for them (see
/// [`access`]); `{id}` is the job's id.
const IMPORT_STATUS: &str = "/BulkImportStatus/{id}";
/// Under `/fhir`.
const EXPORT_STATUS: &str = "/$export-status/{id}";
/// Under `/fhir`.
const EXPORT_FILE: &str = "/$export-file/{id}/{name}";

/// The job list: every signed-in subject may ask it; it lists the jobs the job routes'
/// rule lets the asker follow ([`jobs`]).
pub const JOB_LIST: &str = "/$jobs";
/// Resource counts: every signed-in subject may ask; they cover the types it may search.
pub const COUNTS: &str = "/$counts";

/// The kind of job a route (as matched, `/fhir/$export-status/{id}`) follows, if it is a job
/// route.
fn job_route(matched: &str) -> Option<JobKind> {
    if matched == IMPORT_STATUS {
        return Some(JobKind::Import);
    }
    let fhir = matched.strip_prefix("/fhir")?;
    (fhir == EXPORT_STATUS || fhir == EXPORT_FILE).then_some(JobKind::Export)
}

/// The 404 a job route gives for a job that does not exist (or that the caller may not know
/// of: the same answer, so the two cannot be told apart). `name`: an export file's.
fn no_such_job(matched: &str, id: &str, name: &str) -> ApiError {
    match matched.strip_prefix("/fhir") {
        Some(EXPORT_FILE) => export::no_file(id, name),
        Some(_) => export::no_export(id),
        None => import::no_import(id),
    }
}

/// The route table: every endpoint fhirbox serves, in one place.
fn routes() -> Router<AppState> {
    let resources = || {
        Router::new()
            .route(
                "/{type}",
                get(search::search)
                    .post(crud::create)
                    .put(crud::update_where)
                    .delete(crud::delete_where),
            )
            .route(
                "/{type}/{id}",
                get(crud::read).put(crud::update).delete(crud::delete),
            )
            .route("/{type}/$dump", get(dump::dump))
            .route("/{type}/$load", post(load::load_type))
            .route("/{type}/{id}/_history", get(crud::history))
            .route("/{type}/{id}/_history/{vid}", get(crud::vread))
            .route(
                "/{type}/$viewdefinition-run",
                get(views::run_type).post(views::run_type),
            )
            .route("/{type}/$run", post(views::run_type))
            .route(
                "/{type}/{id}/$viewdefinition-run",
                get(views::run_instance).post(views::run_instance),
            )
            .route(
                "/{type}/{id}/$run",
                get(views::run_instance).post(views::run_instance),
            )
            .route("/{type}/{id}/$materialize", post(views::materialize))
    };
    let native = resources()
        .route(
            "/",
            get(search_system::search)
                .post(bundle::post_bundle)
                .put(bundle::put_list),
        )
        .route("/$load", post(load::load_mixed))
        .route("/$dump-sql", post(dump_sql::dump_sql))
        .route("/$import", post(import::start))
        .route(IMPORT_STATUS, get(import::status).delete(import::cancel))
        .route("/{type}/$dump-csv", get(dump_csv::dump_csv))
        .route(JOB_LIST, get(jobs::list))
        .route(COUNTS, get(counts::counts))
        .route("/$status", get(status::status))
        .layer(Extension(Api::Native));
    let fhir = resources()
        .route("/", get(search_system::search).post(bundle::post_bundle))
        .route("/$import", post(import::start))
        .route("/$load", post(load::load_mixed))
        .route("/metadata", get(metadata::capability_statement))
        .route(
            "/.well-known/smart-configuration",
            get(smart::configuration),
        )
        .route("/$export", get(export::system).post(export::system))
        .route(
            "/{type}/$export",
            get(export::patient).post(export::patient),
        )
        .route(
            "/{type}/{id}/$export",
            get(export::group).post(export::group),
        )
        .route("/$viewdefinition-export", post(view_export::export))
        .route("/{type}/$viewdefinition-export", post(view_export::export))
        .route(EXPORT_STATUS, get(export::status).delete(export::cancel))
        .route(EXPORT_FILE, get(export::file))
        .layer(Extension(Api::Fhir));
    Router::new()
        .route("/health", get(health::health))
        .route("/metadata", get(metadata::capability_statement))
        .route(
            "/.well-known/smart-configuration",
            get(smart::configuration),
        )
        .route("/auth/token", post(smart::token))
        .route("/console", get(console::page))
        .route("/console/{name}", get(console::file))
        .nest("/fhir", fhir)
        .merge(native)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    ))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "not-supported",
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}
