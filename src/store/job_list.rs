//! The SQL of the job list (`GET /$jobs`): the newest jobs, with their tasks, in two queries.

use super::jobs::{JobKind, JobRow, TaskRow};
use super::{GenericClient, StoreError};

/// The newest `limit` jobs (of `owner` only, when given), newest first, each with its tasks
/// in order.
pub async fn newest(
    client: &impl GenericClient,
    owner: Option<&str>,
    limit: i64,
) -> Result<Vec<(JobRow, Vec<TaskRow>)>, StoreError> {
    let rows = client
        .query(
            "SELECT id, kind, subject, fhir, keep_history, cancelled, created_at, document
               FROM fhirbox_job
              WHERE $1::text IS NULL OR subject = $1
              ORDER BY created_at DESC, id
              LIMIT $2",
            &[&owner, &limit],
        )
        .await?;
    let mut jobs = Vec::with_capacity(rows.len());
    for row in &rows {
        let kind: String = row.get(1);
        // A kind this version does not know (written by a newer fhirbox) is left out.
        let Some(kind) = JobKind::parse(&kind) else {
            continue;
        };
        jobs.push(JobRow {
            id: row.get(0),
            kind,
            subject: row.get(2),
            fhir: row.get(3),
            keep_history: row.get(4),
            cancelled: row.get(5),
            created_at: row.get(6),
            document: row.get(7),
        });
    }
    let ids: Vec<&str> = jobs.iter().map(|job| job.id.as_str()).collect();
    let mut tasks = super::jobs::tasks_of(client, &ids).await?;
    Ok(jobs
        .into_iter()
        .map(|job| {
            let (mine, rest): (Vec<TaskRow>, Vec<TaskRow>) =
                tasks.drain(..).partition(|task| task.job_id == job.id);
            tasks = rest;
            (job, mine)
        })
        .collect())
}
