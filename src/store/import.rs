//! The SQL of `$import`: jobs, their inputs, and the claims workers hold on inputs.
//!
//! Any number of fhirbox processes share the work: a worker claims one waiting input (or one
//! whose claim has expired: its worker died) with `FOR UPDATE SKIP LOCKED`, holds it with a
//! lease it renews while loading, and marks it finished in the same transaction that commits
//! the input's rows, if it still holds the claim. So an input is loaded exactly once, however
//! processes crash.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{GenericClient, StoreError};

/// A job's input, as a worker or a status view sees it.
#[derive(Debug, Clone)]
pub struct InputRow {
    pub job_id: String,
    pub position: i32,
    pub resource_type: String,
    pub url: String,
    pub status: String,
    pub worker: Option<String>,
    pub total: Option<i64>,
    pub bytes: Option<i64>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

const INPUT_COLUMNS: &str =
    "job_id, position, resource_type, url, status, worker, total, bytes, started_at, finished_at, error";

fn input_row(row: &tokio_postgres::Row) -> InputRow {
    InputRow {
        job_id: row.get(0),
        position: row.get(1),
        resource_type: row.get(2),
        url: row.get(3),
        status: row.get(4),
        worker: row.get(5),
        total: row.get(6),
        bytes: row.get(7),
        started_at: row.get(8),
        finished_at: row.get(9),
        error: row.get(10),
    }
}

/// A job as stored.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: String,
    pub subject: String,
    pub fhir: bool,
    pub keep_history: bool,
    pub cancelled: bool,
    pub created_at: DateTime<Utc>,
    /// The request's own fields (`inputFormat`, `contentEncoding`, `mode`, ...).
    pub document: Value,
}

/// Creates a job and its inputs; `false` if the id is taken.
pub async fn create_job(
    client: &impl GenericClient,
    job: &JobRow,
    inputs: &[(String, String)],
) -> Result<bool, StoreError> {
    let inserted = client
        .execute(
            "INSERT INTO fhirbox_import_job (id, subject, fhir, keep_history, document)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
            &[
                &job.id,
                &job.subject,
                &job.fhir,
                &job.keep_history,
                &job.document,
            ],
        )
        .await?;
    if inserted == 0 {
        return Ok(false);
    }
    for (position, (resource_type, url)) in inputs.iter().enumerate() {
        client
            .execute(
                "INSERT INTO fhirbox_import_input (job_id, position, resource_type, url) VALUES ($1, $2, $3, $4)",
                &[&job.id, &(position as i32), resource_type, url],
            )
            .await?;
    }
    Ok(true)
}

pub async fn job(client: &impl GenericClient, id: &str) -> Result<Option<JobRow>, StoreError> {
    let row = client
        .query_opt(
            "SELECT id, subject, fhir, keep_history, cancelled, created_at, document FROM fhirbox_import_job WHERE id = $1",
            &[&id],
        )
        .await?;
    Ok(row.map(|row| JobRow {
        id: row.get(0),
        subject: row.get(1),
        fhir: row.get(2),
        keep_history: row.get(3),
        cancelled: row.get(4),
        created_at: row.get(5),
        document: row.get(6),
    }))
}

pub async fn inputs(
    client: &impl GenericClient,
    job_id: &str,
) -> Result<Vec<InputRow>, StoreError> {
    let rows = client
        .query(
            &format!("SELECT {INPUT_COLUMNS} FROM fhirbox_import_input WHERE job_id = $1 ORDER BY position"),
            &[&job_id],
        )
        .await?;
    Ok(rows.iter().map(input_row).collect())
}

/// Claims the next input to load: a waiting one, or one whose worker's lease ran out.
pub async fn claim(
    client: &impl GenericClient,
    worker: &str,
    lease: Duration,
) -> Result<Option<InputRow>, StoreError> {
    let lease_ms = lease.as_millis() as i64;
    let row = client
        .query_opt(
            &format!(
                "UPDATE fhirbox_import_input i
                    SET status = 'in-progress', worker = $1,
                        lease_until = now() + $2::bigint * interval '1 millisecond',
                        attempts = attempts + 1, started_at = coalesce(started_at, now()),
                        total = 0, bytes = 0, error = NULL
                  WHERE (job_id, position) = (
                        SELECT c.job_id, c.position FROM fhirbox_import_input c
                          JOIN fhirbox_import_job j ON j.id = c.job_id
                         WHERE NOT j.cancelled
                           AND (c.status = 'waiting' OR (c.status = 'in-progress' AND c.lease_until < now()))
                         ORDER BY j.created_at, c.position
                         LIMIT 1
                           FOR UPDATE OF c SKIP LOCKED)
                 RETURNING {INPUT_COLUMNS}"
            ),
            &[&worker, &lease_ms],
        )
        .await?;
    Ok(row.as_ref().map(input_row))
}

/// Renews a claim and records progress. `false`: the claim is lost (expired and taken, or the
/// job was cancelled): the worker must give the input up.
pub async fn renew(
    client: &impl GenericClient,
    input: &InputRow,
    worker: &str,
    lease: Duration,
    total: i64,
    bytes: i64,
) -> Result<bool, StoreError> {
    let lease_ms = lease.as_millis() as i64;
    let updated = client
        .execute(
            "UPDATE fhirbox_import_input i
                SET lease_until = now() + $4::bigint * interval '1 millisecond', total = $5, bytes = $6
               FROM fhirbox_import_job j
              WHERE j.id = i.job_id AND NOT j.cancelled
                AND i.job_id = $1 AND i.position = $2 AND i.worker = $3 AND i.status = 'in-progress'",
            &[&input.job_id, &input.position, &worker, &lease_ms, &total, &bytes],
        )
        .await?;
    Ok(updated == 1)
}

/// Marks an input finished, in the transaction that loaded it. `false` if this worker no
/// longer holds it (then the caller must roll back).
pub async fn finish(
    client: &impl GenericClient,
    input: &InputRow,
    worker: &str,
    total: i64,
    bytes: i64,
) -> Result<bool, StoreError> {
    let updated = client
        .execute(
            "UPDATE fhirbox_import_input i
                SET status = 'finished', total = $4, bytes = $5, finished_at = now(), lease_until = NULL
               FROM fhirbox_import_job j
              WHERE j.id = i.job_id AND NOT j.cancelled
                AND i.job_id = $1 AND i.position = $2 AND i.worker = $3 AND i.status = 'in-progress'",
            &[&input.job_id, &input.position, &worker, &total, &bytes],
        )
        .await?;
    Ok(updated == 1)
}

/// Marks an input failed, with the reason.
pub async fn fail(
    client: &impl GenericClient,
    input: &InputRow,
    worker: &str,
    error: &str,
) -> Result<(), StoreError> {
    client
        .execute(
            "UPDATE fhirbox_import_input
                SET status = 'failed', error = $4, finished_at = now(), lease_until = NULL
              WHERE job_id = $1 AND position = $2 AND worker = $3 AND status = 'in-progress'",
            &[&input.job_id, &input.position, &worker, &error],
        )
        .await?;
    Ok(())
}

/// Cancels a job: inputs not yet finished become `cancelled` (a worker loading one notices at
/// its next renewal and rolls its load back).
pub async fn cancel(client: &impl GenericClient, job_id: &str) -> Result<bool, StoreError> {
    let updated = client
        .execute(
            "UPDATE fhirbox_import_job SET cancelled = true WHERE id = $1",
            &[&job_id],
        )
        .await?;
    client
        .execute(
            "UPDATE fhirbox_import_input SET status = 'cancelled', finished_at = now(), lease_until = NULL
              WHERE job_id = $1 AND status IN ('waiting', 'in-progress')",
            &[&job_id],
        )
        .await?;
    Ok(updated == 1)
}
