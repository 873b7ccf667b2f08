//! `$import`: asynchronous bulk import that survives crashes and scales across processes.
//!
//! A job and its inputs (its tasks) are stored in PostgreSQL and run by the workers of the
//! job machinery ([`super::jobs`]); each input is loaded with the `$load` machinery
//! ([`super::load`]): one transaction per input, in which the input is also marked finished,
//! if the worker still holds it. If a worker dies, its claim expires and another worker, here
//! or in another process, loads the input again from the start. Loading is an upsert, so a
//! retried input gives the same rows, never duplicates.
//!
//! The job's status is a `BulkImportStatus` resource in the reference product's shape,
//! rewritten from the job's rows whenever an input starts, makes progress or ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use serde_json::{json, Map, Value};

use super::jobs::{Jobs, Progress, Runner, TaskFailure};
use super::load::{account, load_tracked, BeforeCommit, LoadError, LoadRequest};
use super::prepare::{own_type_refusal, LineRules};
use super::report::Report;
use super::source::{Reader, SourceError, Sources};
use crate::auth::access::JobFacts;
use crate::formats::Formats;
use crate::resource::format_instant;
use crate::resource_type::ResourceType;
use crate::store::jobs::{self as sql, Finished, JobKind, JobRow, NewTask, TaskRow};
use crate::store::resources::{remove, replace_in_place};
use crate::store::{StoreError, Tx};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}")]
    Invalid(String),
    /// An input the source rules refuse (checked at kick-off).
    #[error("inputs[{index}]: {error}")]
    Source { index: usize, error: SourceError },
    #[error("an import with id '{0}' already exists")]
    Exists(String),
    #[error(transparent)]
    TooMany(#[from] super::jobs::TooManyJobs),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `DELETE /BulkImportStatus/<id>` did.
pub enum Deleted {
    /// The job was running: now cancelled; its status.
    Cancelled(Value),
    /// The job had ended: removed, its id free.
    Removed,
    Missing,
}

fn status_type() -> ResourceType {
    ResourceType::parse("BulkImportStatus").expect("a fhirbox type")
}

/// An import request, as `POST /$import` takes it (checked).
pub struct ImportRequest {
    pub id: Option<String>,
    /// `/fhir/$import`: FHIR lines, converted.
    pub fhir: bool,
    pub keep_history: bool,
    /// Each input's type and URL; no type: a bucket prefix (`s3://BUCKET/PREFIX/`) whose
    /// objects named after a type (`Patient.ndjson.gz`, `Observation.000.ndjson`) are the
    /// inputs.
    pub inputs: Vec<(Option<ResourceType>, String)>,
    /// The request's own fields, kept in the status: `inputFormat`, `contentEncoding`, `mode`.
    pub echo: Map<String, Value>,
}

/// The import service: starts jobs, runs their inputs (as the job machinery's import
/// [`Runner`]), reports status.
#[derive(Clone)]
pub struct Imports {
    jobs: Jobs,
    sources: Sources,
    formats: Formats,
}

impl Imports {
    pub fn new(jobs: Jobs, sources: Sources, formats: Formats) -> Imports {
        Imports {
            jobs,
            sources,
            formats,
        }
    }

    /// Creates a job (and its status) and wakes the workers. Returns its id and status.
    pub async fn start(
        &self,
        request: ImportRequest,
        subject: &str,
    ) -> Result<(String, Value), ImportError> {
        let id = request.id.unwrap_or_else(crate::resource::new_id);
        if !crate::resource::is_valid_id(&id) {
            return Err(ImportError::Invalid(format!("'{id}' is not a valid id")));
        }
        self.jobs.admit(subject).await??;
        let reader = match subject {
            "root" => Reader::Root,
            _ => Reader::Client,
        };
        let mut echo = request.echo;
        let inputs = self.expand(request.inputs, reader, &mut echo).await?;
        let job = JobRow {
            id: id.clone(),
            kind: JobKind::Import,
            subject: subject.to_string(),
            fhir: request.fhir,
            keep_history: request.keep_history,
            cancelled: false,
            created_at: Utc::now(),
            document: Value::Object(echo),
        };
        for (index, (rt, url)) in inputs.iter().enumerate() {
            if let Some(first) = inputs[..index]
                .iter()
                .position(|(t, u)| t == rt && u == url)
            {
                return Err(ImportError::Invalid(format!(
                    "inputs[{index}] repeats inputs[{first}] ({rt} from {url})"
                )));
            }
            self.sources
                .check(url, reader)
                .await
                .map_err(|error| ImportError::Source { index, error })?;
        }
        let tasks: Vec<NewTask> = inputs
            .iter()
            .map(|(rt, url)| NewTask {
                resource_type: rt.name().to_string(),
                url: Some(url.clone()),
                size: None,
            })
            .collect();
        let tx = self.jobs.store().begin().await?;
        let started = async {
            if !sql::create_job(&*tx, &job, &tasks).await? {
                return Ok(None);
            }
            self.write_status(&tx, &id).await.map(Some)
        }
        .await;
        let Some(document) = tx.finish(started).await? else {
            return Err(ImportError::Exists(id));
        };
        tracing::info!(job = %id, kind = "import", subject, inputs = tasks.len(), "job created");
        self.jobs.wake();
        Ok((id, document))
    }

    /// `DELETE` of a job: one still running is cancelled (inputs not finished are stopped and
    /// their loads rolled back) and its status returned; one that ended (finished, failed or
    /// cancelled) is removed with its status, and its id may be used again.
    pub async fn delete(&self, id: &str) -> Result<Deleted, ImportError> {
        let tx = self.jobs.store().begin().await?;
        let deleted = async {
            sql::lock_job(&*tx, id).await?;
            let Some(job) = sql::job(&*tx, JobKind::Import, id).await? else {
                return Ok(Deleted::Missing);
            };
            let tasks = sql::tasks(&*tx, id).await?;
            let running = !job.cancelled
                && tasks
                    .iter()
                    .any(|t| matches!(t.status.as_str(), "waiting" | "in-progress"));
            if running {
                sql::cancel(&*tx, JobKind::Import, id).await?;
                return self.write_status(&tx, id).await.map(Deleted::Cancelled);
            }
            sql::delete(&*tx, id).await?;
            remove(&*tx, status_type(), id).await?;
            Ok(Deleted::Removed)
        }
        .await;
        let deleted = tx.finish(deleted).await?;
        if let Deleted::Removed = deleted {
            tracing::info!(job = id, kind = "import", "job removed");
        }
        Ok(deleted)
    }

    /// The inputs with every bucket prefix replaced by the objects under it named after a
    /// resource type; the other objects are skipped and named in the status's `warnings`.
    async fn expand(
        &self,
        inputs: Vec<(Option<ResourceType>, String)>,
        reader: Reader,
        echo: &mut Map<String, Value>,
    ) -> Result<Vec<(ResourceType, String)>, ImportError> {
        let mut expanded = Vec::new();
        let mut warnings = Vec::new();
        for (index, (rt, url)) in inputs.into_iter().enumerate() {
            if let Some(rt) = rt {
                expanded.push((rt, url));
                continue;
            }
            let objects = self
                .sources
                .list(&url, reader)
                .await
                .map_err(|error| ImportError::Source { index, error })?;
            let before = expanded.len();
            for (object, name) in objects {
                let type_name = name.split('.').next().unwrap_or_default();
                match ResourceType::parse(type_name) {
                    Some(rt) if own_type_refusal(rt, reader == Reader::Root).is_none() => {
                        expanded.push((rt, object))
                    }
                    _ => warnings.push(Value::String(format!(
                        "{object} was skipped: its name does not start with a resource type fhirbox may import"
                    ))),
                }
            }
            if expanded.len() == before {
                return Err(ImportError::Invalid(format!(
                    "inputs[{index}]: no object under {url} is named after a resource type (Patient.ndjson.gz, Observation.000.ndjson, ...)"
                )));
            }
        }
        if !warnings.is_empty() {
            echo.insert("warnings".into(), Value::Array(warnings));
        }
        Ok(expanded)
    }

    /// Who started a job and which types it writes, for its routes' authorization
    /// (`owner: None`: no such job).
    pub async fn facts(&self, id: &str) -> Result<JobFacts, StoreError> {
        let conn = self.jobs.store().connection().await?;
        let Some(job) = sql::job(&conn, JobKind::Import, id).await? else {
            return Ok(JobFacts::default());
        };
        let tasks = sql::tasks(&conn, id).await?;
        Ok(facts_of(job, &tasks))
    }

    /// Rewrites the job's BulkImportStatus from its rows. Must run in a transaction: it locks
    /// the job's row first, so that status writers take turns and each reads the rows as the
    /// one before it left them (without the lock, a writer that read early and wrote late
    /// could leave the status showing a finished input as still running, for good).
    async fn write_status(&self, tx: &Tx, id: &str) -> Result<Value, StoreError> {
        let client = &**tx;
        sql::lock_job(client, id).await?;
        let job = sql::job(client, JobKind::Import, id).await?;
        let inputs = sql::tasks(client, id).await?;
        let Some(job) = job else {
            return Ok(Value::Null);
        };
        let document = status_document(&job, &inputs);
        replace_in_place(client, status_type(), id, &document).await?;
        Ok(document)
    }

    async fn refresh_status(&self, id: &str) {
        let result = async {
            let tx = self.jobs.store().begin().await?;
            let written = self.write_status(&tx, id).await;
            tx.finish(written).await
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(%error, job = id, "could not update an import's status");
        }
    }

    /// Loads one claimed input: one transaction, in which the input is also marked finished.
    async fn load_input(
        &self,
        input: &TaskRow,
        worker: &str,
        progress: Arc<Progress>,
    ) -> Result<(), LoadError> {
        let job = {
            let conn = self.jobs.store().connection().await?;
            sql::job(&conn, JobKind::Import, &input.job_id).await?
        };
        let Some(job) = job else {
            return Err(LoadError::Abandoned);
        };
        let rt = ResourceType::parse(&input.resource_type).ok_or_else(|| {
            LoadError::Read(format!("unknown resourceType '{}'", input.resource_type))
        })?;
        let fhir = match job.fhir {
            true => Some(self.formats.converter().await?),
            false => None,
        };
        let request = LoadRequest {
            source: input.url.clone().unwrap_or_default(),
            reader: match job.subject.as_str() {
                "root" => super::source::Reader::Root,
                _ => super::source::Reader::Client,
            },
            rules: LineRules {
                fhir,
                only_type: Some(rt),
                strip_nulls: false,
                merge: None,
                own_types: job.subject == "root",
                format_check: true,
            },
            keep_history: job.keep_history,
        };
        let before_commit: BeforeCommit = {
            let (input, worker, progress) = (input.clone(), worker.to_string(), progress.clone());
            Box::new(move |conn, counts| {
                Box::pin(async move {
                    let total: u64 = counts.values().sum();
                    let bytes = progress.bytes.load(Ordering::Relaxed);
                    let finished = Finished {
                        total: total as i64,
                        bytes: bytes as i64,
                        result: None,
                    };
                    sql::finish(conn, &input, &worker, finished).await
                })
            })
        };
        let report = Report::start("$import", rt.name(), job.subject.clone(), "in");
        let loaded = if job.document["mode"] == "migration" {
            super::migrate::migrate_tracked(
                self.jobs.store(),
                &self.sources,
                request,
                progress.clone(),
                Some(before_commit),
            )
            .await
        } else {
            load_tracked(
                self.jobs.store(),
                &self.sources,
                request,
                progress.clone(),
                Some(before_commit),
            )
            .await
        };
        account(&report, &progress, &loaded);
        loaded.map(|_| ())
    }
}

impl Runner for Imports {
    fn run<'a>(
        &'a self,
        task: &'a TaskRow,
        worker: &'a str,
        progress: Arc<Progress>,
    ) -> BoxFuture<'a, Result<(), TaskFailure>> {
        Box::pin(async move {
            match self.load_input(task, worker, progress).await {
                Ok(()) => Ok(()),
                Err(LoadError::Abandoned) => Err(TaskFailure::Abandoned),
                Err(error) => Err(TaskFailure::Failed(error.to_string())),
            }
        })
    }

    fn changed<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.refresh_status(job_id))
    }
}

/// The BulkImportStatus document, in the reference product's shape.
pub fn status_document(job: &JobRow, inputs: &[TaskRow]) -> Value {
    let inputs_rows = inputs;
    let ended = |i: &TaskRow| matches!(i.status.as_str(), "finished" | "failed" | "cancelled");
    let status = if job.cancelled {
        "cancelled"
    } else if inputs.iter().all(|i| i.status == "finished") {
        "finished"
    } else if inputs.iter().all(ended) {
        "failed"
    } else {
        "in-progress"
    };
    let instant = |at: &DateTime<Utc>| format_instant(at);
    let mut time = json!({"start": instant(&job.created_at)});
    if status != "in-progress" {
        let end = inputs
            .iter()
            .filter_map(|i| i.finished_at)
            .max()
            .unwrap_or_else(Utc::now);
        time["end"] = instant(&end).into();
    }
    let inputs: Vec<Value> = inputs
        .iter()
        .map(|input| {
            let mut entry = json!({
                "url": input.url,
                "resourceType": input.resource_type,
                "status": input.status,
            });
            if let Some(total) = input.total {
                entry["total"] = total.into();
            }
            if let Some(bytes) = input.bytes {
                entry["bytes"] = bytes.into();
            }
            if let Some(size) = input.size {
                entry["size"] = size.into();
            }
            if let Some(speed) = input_progress(input) {
                entry["percent"] = speed.percent.into();
                entry["resourcesPerSecond"] = speed.per_second.into();
                if let Some(left) = speed.seconds_left {
                    entry["secondsLeft"] = left.into();
                }
            }
            if let (Some(start), Some(end)) = (input.started_at, input.finished_at) {
                if input.status == "finished" {
                    entry["duration"] = (end - start).num_milliseconds().into();
                }
            }
            if let Some(ts) = input.finished_at.or(input.started_at) {
                entry["ts"] = instant(&ts).into();
            }
            if let Some(error) = &input.error {
                entry["error"] = error.clone().into();
            }
            entry
        })
        .collect();
    let mut document = match &job.document {
        Value::Object(echo) => echo.clone(),
        _ => Map::new(),
    };
    document.insert(
        "type".into(),
        if job.fhir { "fhir" } else { "aidbox" }.into(),
    );
    document.insert("status".into(), status.into());
    document.insert("update".into(), job.keep_history.into());
    document.insert("time".into(), time);
    document.insert("progress".into(), job_progress(inputs_rows));
    document.insert("inputs".into(), Value::Array(inputs));
    Value::Object(document)
}

/// How far an input got, while it runs or when it ended.
struct InputProgress {
    /// Of its bytes read (100 once finished; unknown length: by inputs done, 0 or 100).
    percent: f64,
    per_second: f64,
    /// Estimated from the bytes left at the speed so far (while running, length known).
    seconds_left: Option<i64>,
}

fn input_progress(input: &TaskRow) -> Option<InputProgress> {
    let started = input.started_at?;
    let end = input.finished_at.unwrap_or_else(Utc::now);
    let seconds = ((end - started).num_milliseconds() as f64 / 1000.0).max(0.001);
    let total = input.total.unwrap_or(0) as f64;
    let bytes = input.bytes.unwrap_or(0) as f64;
    let finished = input.status == "finished";
    let (percent, seconds_left) = match input.size.filter(|s| *s > 0) {
        _ if finished => (100.0, None),
        Some(size) => {
            let size = size as f64;
            let left = (bytes > 0.0).then(|| ((size - bytes).max(0.0) / (bytes / seconds)) as i64);
            ((bytes / size * 100.0).min(100.0), left)
        }
        None => (0.0, None),
    };
    Some(InputProgress {
        percent: round1(percent),
        per_second: round1(total / seconds),
        seconds_left: seconds_left.filter(|_| input.status == "in-progress"),
    })
}

/// The job's progress: resources and bytes so far, and a percentage by bytes when every
/// input's length is known (else by inputs done).
fn job_progress(inputs: &[TaskRow]) -> Value {
    let total: i64 = inputs.iter().filter_map(|i| i.total).sum();
    let bytes: i64 = inputs.iter().filter_map(|i| i.bytes).sum();
    let done = |i: &TaskRow| matches!(i.status.as_str(), "finished" | "failed" | "cancelled");
    let percent = if inputs
        .iter()
        .all(|i| i.size.is_some_and(|s| s > 0) || done(i))
    {
        let (read, size) = inputs.iter().fold((0.0, 0.0), |(read, size), i| {
            let whole = i.size.unwrap_or(0).max(i.bytes.unwrap_or(0)) as f64;
            let got = if done(i) {
                whole
            } else {
                i.bytes.unwrap_or(0) as f64
            };
            (read + got, size + whole)
        });
        if size > 0.0 {
            read / size * 100.0
        } else {
            100.0
        }
    } else {
        inputs.iter().filter(|i| done(i)).count() as f64 / inputs.len().max(1) as f64 * 100.0
    };
    json!({"total": total, "bytes": bytes, "percent": round1(percent.min(100.0))})
}

fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

/// What authorization needs to know about an import job (see [`Imports::facts`]).
pub fn facts_of(job: JobRow, tasks: &[TaskRow]) -> JobFacts {
    let mut types: Vec<ResourceType> = tasks
        .iter()
        .filter_map(|task| ResourceType::parse(&task.resource_type))
        .collect();
    types.sort_by_key(|rt| rt.name());
    types.dedup();
    JobFacts {
        owner: Some(job.subject),
        types,
        writes: true,
    }
}
