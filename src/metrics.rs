//! Prometheus metrics, served at `GET /metrics` on `--metrics-listen` (a separate address:
//! scrapers rarely authenticate, so the main API's access rules do not apply there; keep it
//! private). Without that flag no recorder is installed and every call here does nothing.
//!
//! Families:
//!
//! - `fhirbox_http_requests_total{method, route, status}` and
//!   `fhirbox_http_request_duration_seconds{method, route}` (route: the route template, so
//!   labels stay bounded), `fhirbox_http_response_bytes_total{method, route}`;
//! - `fhirbox_bulk_rows_total{operation, direction}`, `fhirbox_bulk_bytes_total{operation,
//!   direction}` (direction `in`: into the database, `out`: out of it), counted as they go;
//!   `fhirbox_bulk_active{operation}`;
//! - at each scrape: `fhirbox_db_connections{server, pool, state}` (`in_use`, `idle`,
//!   `waiting`; server `primary` or `replica N`) and `fhirbox_job_tasks{kind, status}` (the
//!   job queue: `waiting` is its depth);
//! - read replicas: `fhirbox_bulk_reads_total{operation, server}` (`primary` or `replica`),
//!   `fhirbox_replica_fallbacks_total{reason}`, `fhirbox_replica_up{replica}` and
//!   `fhirbox_replica_lag_bytes{replica}`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Request latency buckets, in seconds: from a cached read to a long dump.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

pub fn request(method: &str, route: &str, status: u16, bytes: u64, elapsed: Duration) {
    let (method, route) = (method.to_string(), route.to_string());
    counter!("fhirbox_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    histogram!("fhirbox_http_request_duration_seconds", "method" => method.clone(), "route" => route.clone())
        .record(elapsed.as_secs_f64());
    counter!("fhirbox_http_response_bytes_total", "method" => method, "route" => route)
        .increment(bytes);
}

pub fn bulk_rows(operation: &'static str, direction: &'static str, rows: u64) {
    counter!("fhirbox_bulk_rows_total", "operation" => operation, "direction" => direction)
        .increment(rows);
}

pub fn bulk_bytes(operation: &'static str, direction: &'static str, bytes: u64) {
    counter!("fhirbox_bulk_bytes_total", "operation" => operation, "direction" => direction)
        .increment(bytes);
}

pub fn bulk_started(operation: &'static str) {
    gauge!("fhirbox_bulk_active", "operation" => operation).increment(1.0);
}

pub fn bulk_ended(operation: &'static str) {
    gauge!("fhirbox_bulk_active", "operation" => operation).decrement(1.0);
}

/// A bulk read started on `server` (`primary` or `replica`).
pub fn bulk_read(operation: &'static str, server: &'static str) {
    counter!("fhirbox_bulk_reads_total", "operation" => operation, "server" => server).increment(1);
}

/// A bulk read went to the primary although there are standbys, and why.
pub fn replica_fallback(reason: &'static str) {
    counter!("fhirbox_replica_fallbacks_total", "reason" => reason).increment(1);
}

pub fn replica_up(replica: &str, up: bool) {
    gauge!("fhirbox_replica_up", "replica" => replica.to_string()).set(if up { 1.0 } else { 0.0 });
}

/// How many bytes of WAL a standby has yet to replay, at its last check.
pub fn replica_lag(replica: &str, bytes: u64) {
    gauge!("fhirbox_replica_lag_bytes", "replica" => replica.to_string()).set(bytes as f64);
}

#[derive(Debug, thiserror::Error)]
#[error("cannot install the metrics recorder: {0}")]
pub struct MetricsError(String);

/// Installs the process's recorder (once).
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(
                "fhirbox_http_request_duration_seconds".into(),
            ),
            LATENCY_BUCKETS,
        )
        .map_err(|e| MetricsError(e.to_string()))?
        .install_recorder()
        .map_err(|e| MetricsError(e.to_string()))
}

/// What a scrape runs first, to set the gauges read at scrape time (the connection pools,
/// the job queue): given by the layer that knows the running parts (`server`), so that this
/// module depends on nothing of fhirbox's.
pub type Refresh = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    refresh: Refresh,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .with_state((handle, refresh));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn scrape(State((handle, refresh)): State<(PrometheusHandle, Refresh)>) -> String {
    refresh().await;
    handle.render()
}

/// A connection pool's state at a scrape (`server`: `primary` or `replica N`).
pub fn db_connections(
    server: &str,
    pool: &'static str,
    in_use: usize,
    idle: usize,
    waiting: usize,
) {
    for (state, value) in [("in_use", in_use), ("idle", idle), ("waiting", waiting)] {
        gauge!("fhirbox_db_connections", "server" => server.to_string(), "pool" => pool, "state" => state)
            .set(value as f64);
    }
}

/// The job queue at a scrape: tasks of `kind` in `status` (`waiting` is its depth).
pub fn job_tasks(kind: String, status: String, count: i64) {
    gauge!("fhirbox_job_tasks", "kind" => kind, "status" => status).set(count as f64);
}
