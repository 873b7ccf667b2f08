//! The SQL of background jobs (`$import`, `$export`): jobs, their tasks, and the claims
//! workers hold on tasks.
//!
//! A job is split into tasks (an import's inputs, an export's resource types). Any number of
//! fhirbox processes share the work: a worker claims one waiting task (or one whose claim has
//! expired: its worker died) with `FOR UPDATE SKIP LOCKED`, holds it with a lease it renews
//! while working, and marks it finished only if it still holds the claim (an import does so in
//! the transaction that commits the input's rows). So a task's effect lands exactly once,
//! however processes crash.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{GenericClient, StoreError, Tx};

/// What a job does; stored in `fhirbox_job.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Import,
    Export,
}

impl JobKind {
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Import => "import",
            JobKind::Export => "export",
        }
    }

    /// The kind stored under `name`, if this version knows it.
    pub fn parse(name: &str) -> Option<JobKind> {
        match name {
            "import" => Some(JobKind::Import),
            "export" => Some(JobKind::Export),
            _ => None,
        }
    }
}

/// A job's task, as a worker or a status view sees it.
#[derive(Debug, Clone)]
pub struct TaskRow {
    pub job_id: String,
    pub position: i32,
    /// The job's kind (`None`: written by a newer fhirbox; such tasks are never claimed here).
    pub kind: Option<JobKind>,
    pub resource_type: String,
    /// An import input's source.
    pub url: Option<String>,
    pub status: String,
    pub worker: Option<String>,
    pub total: Option<i64>,
    pub bytes: Option<i64>,
    /// What `total`/`bytes` grow towards, when known: an import input's length in bytes, an
    /// export type's expected rows.
    pub size: Option<i64>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    /// What a finished task produced (an export's files).
    pub result: Option<Value>,
    /// How many times the task was claimed (this run's number, for a worker).
    pub attempts: i32,
}

const TASK_COLUMNS: &str = "t.job_id, t.position, (SELECT kind FROM fhirbox_job WHERE id = t.job_id), \
     t.resource_type, t.url, t.status, t.worker, t.total, t.bytes, t.started_at, t.finished_at, t.error, t.result, t.attempts, t.size";

fn task_row(row: &tokio_postgres::Row) -> TaskRow {
    let kind: Option<String> = row.get(2);
    TaskRow {
        job_id: row.get(0),
        position: row.get(1),
        kind: kind.as_deref().and_then(JobKind::parse),
        resource_type: row.get(3),
        url: row.get(4),
        status: row.get(5),
        worker: row.get(6),
        total: row.get(7),
        bytes: row.get(8),
        started_at: row.get(9),
        finished_at: row.get(10),
        error: row.get(11),
        result: row.get(12),
        attempts: row.get(13),
        size: row.get(14),
    }
}

/// A job as stored.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: String,
    pub kind: JobKind,
    pub subject: String,
    pub fhir: bool,
    pub keep_history: bool,
    pub cancelled: bool,
    pub created_at: DateTime<Utc>,
    /// The job's request: an import's own fields, an export's specification.
    pub document: Value,
}

/// A task to create: its resource type and, for an import, its source; for an export, the
/// rows it is expected to write.
pub struct NewTask {
    pub resource_type: String,
    pub url: Option<String>,
    pub size: Option<i64>,
}

/// Creates a job and its tasks; `false` if the id is taken.
pub async fn create_job(
    client: &impl GenericClient,
    job: &JobRow,
    tasks: &[NewTask],
) -> Result<bool, StoreError> {
    let inserted = client
        .execute(
            "INSERT INTO fhirbox_job (id, kind, subject, fhir, keep_history, document, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
            &[
                &job.id,
                &job.kind.name(),
                &job.subject,
                &job.fhir,
                &job.keep_history,
                &job.document,
                &job.created_at,
            ],
        )
        .await?;
    if inserted == 0 {
        return Ok(false);
    }
    let types: Vec<&str> = tasks.iter().map(|t| t.resource_type.as_str()).collect();
    let urls: Vec<Option<&str>> = tasks.iter().map(|t| t.url.as_deref()).collect();
    let sizes: Vec<Option<i64>> = tasks.iter().map(|t| t.size).collect();
    client
        .execute(
            "INSERT INTO fhirbox_task (job_id, position, resource_type, url, size)
             SELECT $1, (n - 1)::integer, rt, url, size
               FROM unnest($2::text[], $3::text[], $4::bigint[]) WITH ORDINALITY AS t(rt, url, size, n)",
            &[&job.id, &types, &urls, &sizes],
        )
        .await?;
    Ok(true)
}

/// A job of that kind.
pub async fn job(
    client: &impl GenericClient,
    kind: JobKind,
    id: &str,
) -> Result<Option<JobRow>, StoreError> {
    let row = client
        .query_opt(
            "SELECT id, subject, fhir, keep_history, cancelled, created_at, document
               FROM fhirbox_job WHERE id = $1 AND kind = $2",
            &[&id, &kind.name()],
        )
        .await?;
    Ok(row.map(|row| JobRow {
        id: row.get(0),
        kind,
        subject: row.get(1),
        fhir: row.get(2),
        keep_history: row.get(3),
        cancelled: row.get(4),
        created_at: row.get(5),
        document: row.get(6),
    }))
}

/// The manifest pages of a job (`allowPartialManifests`), each the positions of the tasks it
/// lists, after putting the finished tasks no page lists yet on a new page. A page, once
/// made, never changes (the IG: a manifest returned is never altered). In `tx`, with the
/// job's row locked, so that two polls at once cannot make two pages of the same tasks.
pub async fn manifest_pages(tx: &Tx, job_id: &str) -> Result<Vec<Vec<i32>>, StoreError> {
    let row = tx
        .query_opt(
            "SELECT coalesce(pages, '[]'::jsonb) FROM fhirbox_job WHERE id = $1 FOR NO KEY UPDATE",
            &[&job_id],
        )
        .await?;
    let Some(row) = row else {
        return Ok(Vec::new());
    };
    let mut pages: Vec<Vec<i32>> = serde_json::from_value(row.get(0)).unwrap_or_default();
    let paged: std::collections::HashSet<i32> = pages.iter().flatten().copied().collect();
    let finished: Vec<i32> = tx
        .query(
            "SELECT position FROM fhirbox_task WHERE job_id = $1 AND status = 'finished'
              ORDER BY position",
            &[&job_id],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .filter(|position| !paged.contains(position))
        .collect();
    if !finished.is_empty() {
        pages.push(finished);
        let stored =
            serde_json::to_value(&pages).map_err(|e| StoreError::Invalid(e.to_string()))?;
        tx.execute(
            "UPDATE fhirbox_job SET pages = $2 WHERE id = $1",
            &[&job_id, &stored],
        )
        .await?;
    }
    Ok(pages)
}

/// Whether an `$export` that may read `type_name` has tasks still to run (waiting or in
/// progress): a patient-block export reads every type from its one task.
pub async fn export_running(
    client: &impl GenericClient,
    type_name: &str,
) -> Result<bool, StoreError> {
    let row = client
        .query_one(
            "SELECT EXISTS (
                 SELECT 1 FROM fhirbox_job j JOIN fhirbox_task t ON t.job_id = j.id
                  WHERE j.kind = 'export' AND NOT j.cancelled
                    AND t.status IN ('waiting', 'in-progress')
                    AND (t.resource_type = $1 OR j.document ->> 'byPatient' = 'true'))",
            &[&type_name],
        )
        .await?;
    Ok(row.get(0))
}

/// Locks a job's row until the end of the transaction (writers of its status take turns).
pub async fn lock_job(client: &impl GenericClient, id: &str) -> Result<(), StoreError> {
    client
        .execute(
            "SELECT 1 FROM fhirbox_job WHERE id = $1 FOR NO KEY UPDATE",
            &[&id],
        )
        .await?;
    Ok(())
}

pub async fn tasks(client: &impl GenericClient, job_id: &str) -> Result<Vec<TaskRow>, StoreError> {
    let rows = client
        .query(
            &format!(
                "SELECT {TASK_COLUMNS} FROM fhirbox_task t WHERE t.job_id = $1 ORDER BY t.position"
            ),
            &[&job_id],
        )
        .await?;
    Ok(rows.iter().map(task_row).collect())
}

/// The tasks of several jobs, by job and position.
pub async fn tasks_of(
    client: &impl GenericClient,
    job_ids: &[&str],
) -> Result<Vec<TaskRow>, StoreError> {
    let rows = client
        .query(
            &format!(
                "SELECT {TASK_COLUMNS} FROM fhirbox_task t WHERE t.job_id = ANY($1)
                  ORDER BY t.job_id, t.position"
            ),
            &[&job_ids],
        )
        .await?;
    Ok(rows.iter().map(task_row).collect())
}

/// Claims the next task: a waiting one, or one whose worker's lease ran out. Fair across
/// subjects, round robin: the subject with the fewest tasks running (in every process) goes
/// first, then the one whose last task started longest ago (or never), then the oldest job;
/// a subject already running `per_subject` tasks waits. So a hundred jobs of one client
/// cannot keep another's from starting next.
pub async fn claim(
    client: &impl GenericClient,
    worker: &str,
    lease: Duration,
    per_subject: usize,
) -> Result<Option<TaskRow>, StoreError> {
    let lease_ms = lease.as_millis() as i64;
    let per_subject = per_subject.max(1) as i64;
    let row = client
        .query_opt(
            &format!(
                "WITH running AS (
                      SELECT j.subject, count(*) AS n FROM fhirbox_task r
                        JOIN fhirbox_job j ON j.id = r.job_id
                       WHERE r.status = 'in-progress' AND r.lease_until >= now() AND NOT j.cancelled
                       GROUP BY j.subject),
                      served AS (
                      SELECT j.subject, max(r.started_at) AS last FROM fhirbox_task r
                        JOIN fhirbox_job j ON j.id = r.job_id
                       WHERE r.started_at > now() - interval '1 day'
                       GROUP BY j.subject)
                 UPDATE fhirbox_task t
                    SET status = 'in-progress', worker = $1,
                        lease_until = now() + $2::bigint * interval '1 millisecond',
                        attempts = attempts + 1, started_at = coalesce(started_at, now()),
                        total = 0, bytes = 0, error = NULL, result = NULL
                  WHERE (job_id, position) = (
                        SELECT c.job_id, c.position FROM fhirbox_task c
                          JOIN fhirbox_job j ON j.id = c.job_id
                          LEFT JOIN running ON running.subject = j.subject
                          LEFT JOIN served ON served.subject = j.subject
                         WHERE NOT j.cancelled AND j.kind IN ('import', 'export')
                           AND (c.status = 'waiting' OR (c.status = 'in-progress' AND c.lease_until < now()))
                           AND coalesce(running.n, 0) < $3
                         ORDER BY coalesce(running.n, 0), coalesce(served.last, '-infinity'),
                                  j.created_at, c.position
                         LIMIT 1
                           FOR UPDATE OF c SKIP LOCKED)
                 RETURNING {TASK_COLUMNS}"
            ),
            &[&worker, &lease_ms, &per_subject],
        )
        .await?;
    Ok(row.as_ref().map(task_row))
}

/// What a job's finished tasks wrote: rows and bytes.
pub async fn job_output(
    client: &impl GenericClient,
    job_id: &str,
) -> Result<(u64, u64), StoreError> {
    let row = client
        .query_one(
            "SELECT coalesce(sum(total), 0)::bigint, coalesce(sum(bytes), 0)::bigint
               FROM fhirbox_task WHERE job_id = $1 AND status = 'finished'",
            &[&job_id],
        )
        .await?;
    Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
}

/// How many jobs of `subject` have not ended (a task waiting or running, not cancelled).
pub async fn unfinished_jobs(
    client: &impl GenericClient,
    subject: &str,
) -> Result<i64, StoreError> {
    let row = client
        .query_one(
            "SELECT count(*) FROM fhirbox_job j
              WHERE j.subject = $1 AND NOT j.cancelled
                AND EXISTS (SELECT 1 FROM fhirbox_task t
                             WHERE t.job_id = j.id AND t.status IN ('waiting', 'in-progress'))",
            &[&subject],
        )
        .await?;
    Ok(row.get(0))
}

/// Renews a claim and records progress (`size`: a size learned while working, like a source's
/// length). `false`: the claim is lost (expired and taken, or the job was cancelled): the
/// worker must give the task up.
pub async fn renew(
    client: &impl GenericClient,
    task: &TaskRow,
    worker: &str,
    lease: Duration,
    total: i64,
    bytes: i64,
    size: Option<i64>,
) -> Result<bool, StoreError> {
    let lease_ms = lease.as_millis() as i64;
    let updated = client
        .execute(
            "UPDATE fhirbox_task t
                SET lease_until = now() + $4::bigint * interval '1 millisecond', total = $5, bytes = $6,
                    size = coalesce($7, t.size)
               FROM fhirbox_job j
              WHERE j.id = t.job_id AND NOT j.cancelled
                AND t.job_id = $1 AND t.position = $2 AND t.worker = $3 AND t.status = 'in-progress'",
            &[&task.job_id, &task.position, &worker, &lease_ms, &total, &bytes, &size],
        )
        .await?;
    Ok(updated == 1)
}

/// What a finished task reports.
pub struct Finished<'a> {
    pub total: i64,
    pub bytes: i64,
    pub result: Option<&'a Value>,
}

/// Marks a task finished (for an import, in the transaction that loaded it). `false` if this
/// worker no longer holds it (then the caller must roll back).
pub async fn finish(
    client: &impl GenericClient,
    task: &TaskRow,
    worker: &str,
    finished: Finished<'_>,
) -> Result<bool, StoreError> {
    let updated = client
        .execute(
            "UPDATE fhirbox_task t
                SET status = 'finished', total = $4, bytes = $5, result = $6, finished_at = now(), lease_until = NULL
               FROM fhirbox_job j
              WHERE j.id = t.job_id AND NOT j.cancelled
                AND t.job_id = $1 AND t.position = $2 AND t.worker = $3 AND t.status = 'in-progress'",
            &[
                &task.job_id,
                &task.position,
                &worker,
                &finished.total,
                &finished.bytes,
                &finished.result,
            ],
        )
        .await?;
    Ok(updated == 1)
}

/// Marks a task failed, with the reason.
pub async fn fail(
    client: &impl GenericClient,
    task: &TaskRow,
    worker: &str,
    error: &str,
) -> Result<(), StoreError> {
    client
        .execute(
            "UPDATE fhirbox_task
                SET status = 'failed', error = $4, finished_at = now(), lease_until = NULL
              WHERE job_id = $1 AND position = $2 AND worker = $3 AND status = 'in-progress'",
            &[&task.job_id, &task.position, &worker, &error],
        )
        .await?;
    Ok(())
}

/// Fails a job's tasks that have not started, with the reason (a job that failed already
/// should not spend more work).
pub async fn fail_waiting(
    client: &impl GenericClient,
    job_id: &str,
    error: &str,
) -> Result<(), StoreError> {
    client
        .execute(
            "UPDATE fhirbox_task SET status = 'failed', error = $2, finished_at = now()
              WHERE job_id = $1 AND status = 'waiting'",
            &[&job_id, &error],
        )
        .await?;
    Ok(())
}

/// Gives back the tasks held by workers whose names start with `prefix` (a clean shutdown).
pub async fn release(client: &impl GenericClient, prefix: &str) -> Result<(), StoreError> {
    client
        .execute(
            "UPDATE fhirbox_task SET status = 'waiting', worker = NULL, lease_until = NULL
              WHERE status = 'in-progress' AND starts_with(worker, $1)",
            &[&prefix],
        )
        .await?;
    Ok(())
}

/// Cancels a job: tasks not yet finished become `cancelled` (a worker running one notices at
/// its next renewal and gives it up). `false` if there is no such job.
pub async fn cancel(
    client: &impl GenericClient,
    kind: JobKind,
    job_id: &str,
) -> Result<bool, StoreError> {
    let updated = client
        .execute(
            "UPDATE fhirbox_job SET cancelled = true WHERE id = $1 AND kind = $2",
            &[&job_id, &kind.name()],
        )
        .await?;
    client
        .execute(
            "UPDATE fhirbox_task SET status = 'cancelled', finished_at = now(), lease_until = NULL
              WHERE job_id = $1 AND status IN ('waiting', 'in-progress')",
            &[&job_id],
        )
        .await?;
    Ok(updated == 1)
}

/// Jobs of a kind that are over and may go: cancelled ones, and those whose every task ended
/// more than `keep` ago.
pub async fn ended_before(
    client: &impl GenericClient,
    kind: JobKind,
    keep: Duration,
) -> Result<Vec<String>, StoreError> {
    let keep_ms = keep.as_millis() as i64;
    let rows = client
        .query(
            "SELECT j.id FROM fhirbox_job j
              WHERE j.kind = $1
                AND (j.cancelled OR (
                     NOT EXISTS (SELECT 1 FROM fhirbox_task t
                                  WHERE t.job_id = j.id AND t.status IN ('waiting', 'in-progress'))
                 AND coalesce((SELECT max(t.finished_at) FROM fhirbox_task t WHERE t.job_id = j.id), j.created_at)
                     < now() - $2::bigint * interval '1 millisecond'))",
            &[&kind.name(), &keep_ms],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Every job id of a kind (to tell live output directories from stray ones).
pub async fn ids(client: &impl GenericClient, kind: JobKind) -> Result<Vec<String>, StoreError> {
    let rows = client
        .query(
            "SELECT id FROM fhirbox_job WHERE kind = $1",
            &[&kind.name()],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Deletes a job and its tasks.
pub async fn delete(client: &impl GenericClient, job_id: &str) -> Result<(), StoreError> {
    client
        .execute("DELETE FROM fhirbox_job WHERE id = $1", &[&job_id])
        .await?;
    Ok(())
}

/// How many tasks there are, by job kind and task status (for the metrics).
pub async fn task_counts(
    client: &impl GenericClient,
) -> Result<Vec<(String, String, i64)>, StoreError> {
    let rows = client
        .query(
            "SELECT j.kind, t.status, count(*) FROM fhirbox_task t JOIN fhirbox_job j ON j.id = t.job_id
              GROUP BY j.kind, t.status",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect())
}

/// The rows a type's table holds, as the planner estimates them (cheap; for progress).
pub async fn estimated_rows(
    client: &impl GenericClient,
    rt: crate::resource_type::ResourceType,
) -> Result<i64, StoreError> {
    let row = client
        .query_one(
            "SELECT greatest(c.reltuples, 0)::bigint FROM pg_class c
              WHERE c.relname = $1 AND c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())",
            &[&rt.table_name()],
        )
        .await?;
    Ok(row.get(0))
}
