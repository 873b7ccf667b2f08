//! The job list (`GET /$jobs`): every `$import`, `$export` and `$viewdefinition-export` job,
//! newest first, each summed up from its tasks (status, resources and bytes done of what is
//! known, when it started and ended) with what authorization needs to decide whether the
//! asker may follow it. Details (errors, the manifest) stay on each job's own status route.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::auth::access::JobFacts;
use crate::resource::format_instant;
use crate::store::job_list;
use crate::store::jobs::{JobKind, JobRow, TaskRow};
use crate::store::{Store, StoreError};

/// One job of the list.
pub struct Listed {
    pub id: String,
    pub kind: JobKind,
    /// Who may follow it, as the job routes' authorization sees it.
    pub facts: JobFacts,
    /// The job as the list shows it (without its status URL, which depends on the request).
    pub summary: Value,
}

/// The newest `limit` jobs, of `owner` only when given.
pub async fn newest(
    store: &Store,
    owner: Option<&str>,
    limit: i64,
) -> Result<Vec<Listed>, StoreError> {
    let conn = store.connection().await?;
    let jobs = job_list::newest(&conn, owner, limit).await?;
    Ok(jobs
        .into_iter()
        .map(|(job, tasks)| {
            let summary = summary(&job, &tasks);
            let (id, kind) = (job.id.clone(), job.kind);
            let facts = match kind {
                JobKind::Import => super::import::facts_of(job, &tasks),
                JobKind::Export => super::export::facts_of(job),
            };
            Listed {
                id,
                kind,
                facts,
                summary,
            }
        })
        .collect())
}

/// A job's line in the list.
fn summary(job: &JobRow, tasks: &[TaskRow]) -> Value {
    let sum = |f: fn(&TaskRow) -> Option<i64>| tasks.iter().filter_map(f).sum::<i64>();
    // A total is known when every task knows its own.
    let known =
        |f: fn(&TaskRow) -> Option<i64>| tasks.iter().all(|t| f(t).is_some()).then(|| sum(f));
    let (resources_total, bytes_total) = match job.kind {
        // An import input's size is its length in bytes; an export task's, the rows expected.
        JobKind::Import => (None, known(|t| t.size)),
        JobKind::Export => (known(|t| t.size), None),
    };
    let started = tasks.iter().filter_map(|t| t.started_at).min();
    let running = tasks
        .iter()
        .any(|t| matches!(t.status.as_str(), "waiting" | "in-progress"));
    let finished = (!running)
        .then(|| tasks.iter().filter_map(|t| t.finished_at).max())
        .flatten();
    let instant = |at: Option<DateTime<Utc>>| at.map(|at| Value::String(format_instant(&at)));
    json!({
        "id": job.id,
        "kind": job.kind.name(),
        "subject": job.subject,
        "status": status(job, tasks),
        "createdAt": format_instant(&job.created_at),
        "startedAt": instant(started),
        "finishedAt": instant(finished),
        "resources": {"done": sum(|t| t.total), "total": resources_total},
        "bytes": {"done": sum(|t| t.bytes), "total": bytes_total},
        "tasks": tasks.iter().map(task).collect::<Vec<_>>(),
    })
}

/// The job's status from its tasks': cancelled, else running while any task waits or runs
/// (`waiting` when none has started), else failed when any failed, else completed.
fn status(job: &JobRow, tasks: &[TaskRow]) -> &'static str {
    let any = |status: &str| tasks.iter().any(|t| t.status == status);
    if job.cancelled || any("cancelled") {
        "cancelled"
    } else if any("in-progress") || (any("waiting") && any("finished")) {
        "in-progress"
    } else if any("waiting") {
        "waiting"
    } else if any("failed") {
        "failed"
    } else {
        "completed"
    }
}

fn task(task: &TaskRow) -> Value {
    json!({
        "type": task.resource_type,
        "status": if task.status == "finished" { "completed" } else { task.status.as_str() },
        "resources": task.total,
        "bytes": task.bytes,
        "size": task.size,
        "error": task.error,
    })
}
