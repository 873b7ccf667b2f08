//! `$export` (FHIR Bulk Data Access IG 2.0.0): asynchronous exports to NDJSON files.
//!
//! A kick-off ([`request`]) becomes a job of the job machinery ([`super::jobs`]) with one task
//! per resource type. A task reads its type with one COPY ([`crate::store::export`]: the
//! export's `transactionTime`, `_since`, patient compartment and `_typeFilter`s in SQL), turns
//! the rows into FHIR lines with `$dump`'s pipeline ([`super::dump::fhir_lines`]), and writes
//! them into size-limited files ([`output`]) in the job's directory under the export
//! directory. Only then is the task marked finished, with its files and counts: a task that
//! dies half-way is run again and rewrites its files from the start.
//!
//! The status URL answers from the job's rows: in progress, failed, or the manifest. Files of
//! a job live until `expiry` after it ended; a cancelled job's files go at once. The export
//! directory must be shared by every fhirbox process that serves the same database.

pub mod output;
pub mod request;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use serde_json::{json, Value};

use self::output::{result_document, result_files, Output};
use self::request::{ExportSpec, Level};
use super::jobs::{Jobs, Progress, Runner, TaskFailure};
use super::report::{Outcome, Report};
use crate::format::Formats;
use crate::resource::format_instant;
use crate::resource_type::ResourceType;
use crate::store::export::{ExportQuery, PatientSource, Patients};
use crate::store::jobs::{self as sql, Finished, JobKind, JobRow, NewTask, TaskRow};
use crate::store::StoreError;

/// The file that carries an export's warnings (OperationOutcomes, one per line).
const WARNINGS_FILE: &str = "OperationOutcome-0-1.ndjson";

/// A directory in the export directory that no job owns is deleted once it has not changed
/// for this long (long enough that no kick-off or worker is still writing it).
const STRAY_AFTER: Duration = Duration::from_secs(10 * 60);

/// Export settings.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    /// Where jobs' files are written, one directory per job.
    pub dir: PathBuf,
    /// A type's output is split into files of about this many bytes.
    pub file_size: u64,
    /// How long the files of an ended job are kept.
    pub expiry: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Invalid(String),
    #[error("Group/{0} not found")]
    NoGroup(String),
    #[error("could not write the export's files: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the status URL says.
pub enum ExportStatus {
    InProgress {
        progress: String,
    },
    /// The whole job failed: why.
    Failed(Vec<String>),
    /// The manifest, and when its files expire.
    Complete {
        manifest: Value,
        expires: DateTime<Utc>,
    },
}

/// The export service: starts jobs, runs their tasks (as the job machinery's export
/// [`Runner`]), answers status and file requests, and deletes expired files.
#[derive(Clone)]
pub struct Exports {
    jobs: Jobs,
    formats: Formats,
    settings: Arc<ExportSettings>,
}

impl Exports {
    pub fn new(jobs: Jobs, formats: Formats, settings: ExportSettings) -> Exports {
        Exports {
            jobs,
            formats,
            settings: Arc::new(settings),
        }
    }

    /// Creates a job and wakes the workers; returns its id.
    pub async fn start(&self, spec: ExportSpec, subject: &str) -> Result<String, ExportError> {
        let conn = self.jobs.store().connection().await?;
        if let Level::Group { id } = &spec.level {
            let group = ResourceType::parse("Group").expect("an R4 type");
            let found = crate::store::resources::read(&conn, group, id).await?;
            if !matches!(found, crate::store::resources::Lookup::Found(_)) {
                return Err(ExportError::NoGroup(id.clone()));
            }
        }
        let id = crate::resource::new_id();
        let mut tasks = Vec::with_capacity(spec.types.len());
        for name in &spec.types {
            // The rows a type is expected to give, for the progress (a system export's: the
            // table's estimate; a compartment's are fewer, which only makes it jump ahead).
            let size = match ResourceType::parse(name) {
                Some(rt) => Some(sql::estimated_rows(&conn, rt).await?),
                None => None,
            };
            tasks.push(NewTask {
                resource_type: name.clone(),
                url: None,
                size,
            });
        }
        let job = JobRow {
            id: id.clone(),
            kind: JobKind::Export,
            subject: subject.to_string(),
            fhir: true,
            keep_history: false,
            cancelled: false,
            created_at: spec.transaction_time,
            document: serde_json::to_value(&spec)
                .map_err(|e| ExportError::Invalid(e.to_string()))?,
        };
        if !spec.warnings.is_empty() {
            let dir = self.job_dir(&id);
            tokio::fs::create_dir_all(&dir).await?;
            tokio::fs::write(dir.join(WARNINGS_FILE), warnings_ndjson(&spec.warnings)).await?;
        }
        if !sql::create_job(&conn, &job, &tasks).await? {
            return Err(ExportError::Invalid(format!("export id {id} is taken")));
        }
        tracing::info!(job = %id, kind = "export", subject, types = tasks.len(), "job created");
        self.jobs.wake();
        Ok(id)
    }

    /// Who started a task's job, for the log (`?` if that cannot be read).
    async fn subject_of(&self, task: &TaskRow) -> String {
        self.subject(&task.job_id)
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| "?".to_string())
    }

    /// Who started a job (`root`, `Client/<id>`), if it exists.
    pub async fn subject(&self, id: &str) -> Result<Option<String>, StoreError> {
        let conn = self.jobs.store().connection().await?;
        Ok(sql::job(&conn, JobKind::Export, id)
            .await?
            .filter(|job| !job.cancelled)
            .map(|job| job.subject))
    }

    /// The status of a job (`None`: no such job, or cancelled, or expired). File URLs start
    /// with `base` (`http://host/fhir`).
    pub async fn status(&self, id: &str, base: &str) -> Result<Option<ExportStatus>, StoreError> {
        let Some((job, tasks)) = self.live_job(id).await? else {
            return Ok(None);
        };
        let Ok(spec) = serde_json::from_value::<ExportSpec>(job.document.clone()) else {
            return Ok(Some(ExportStatus::Failed(vec![
                "this export was started by another fhirbox version".into(),
            ])));
        };
        let failed: Vec<String> = tasks
            .iter()
            .filter(|t| t.status == "failed")
            .map(|t| {
                format!(
                    "{}: {}",
                    t.resource_type,
                    t.error.as_deref().unwrap_or("failed")
                )
            })
            .collect();
        if !failed.is_empty() {
            return Ok(Some(ExportStatus::Failed(failed)));
        }
        let done = tasks.iter().filter(|t| t.status == "finished").count();
        if done < tasks.len() {
            return Ok(Some(ExportStatus::InProgress {
                progress: progress(&tasks),
            }));
        }
        let ended = tasks
            .iter()
            .filter_map(|t| t.finished_at)
            .max()
            .unwrap_or(job.created_at);
        let expires = ended
            + chrono::Duration::from_std(self.settings.expiry).unwrap_or(chrono::Duration::MAX);
        Ok(Some(ExportStatus::Complete {
            manifest: manifest(&spec, &tasks, &format!("{base}/$export-file/{id}")),
            expires,
        }))
    }

    /// A job that is not cancelled, with its tasks.
    async fn live_job(&self, id: &str) -> Result<Option<(JobRow, Vec<TaskRow>)>, StoreError> {
        let conn = self.jobs.store().connection().await?;
        match sql::job(&conn, JobKind::Export, id).await? {
            Some(job) if !job.cancelled => {
                let tasks = sql::tasks(&conn, id).await?;
                Ok(Some((job, tasks)))
            }
            _ => Ok(None),
        }
    }

    /// Cancels a job and deletes its files; `false` if there is no such job.
    pub async fn cancel(&self, id: &str) -> Result<bool, ExportError> {
        let conn = self.jobs.store().connection().await?;
        let live = sql::job(&conn, JobKind::Export, id)
            .await?
            .is_some_and(|job| !job.cancelled);
        if !live || !sql::cancel(&conn, JobKind::Export, id).await? {
            return Ok(false);
        }
        self.remove_files(id).await;
        Ok(true)
    }

    /// The path of a file of a completed job, if `name` is one of its files.
    pub async fn file(&self, id: &str, name: &str) -> Result<Option<PathBuf>, StoreError> {
        let Some((job, tasks)) = self.live_job(id).await? else {
            return Ok(None);
        };
        let listed = tasks
            .iter()
            .filter(|t| t.status == "finished")
            .flat_map(|t| result_files(t.result.as_ref()))
            .any(|f| f.name == name);
        let warnings = name == WARNINGS_FILE
            && serde_json::from_value::<ExportSpec>(job.document)
                .is_ok_and(|spec| !spec.warnings.is_empty());
        Ok((listed || warnings).then(|| self.job_dir(id).join(name)))
    }

    /// Deletes, now and then, the jobs and files that are over: expired or cancelled.
    pub fn spawn_janitor(&self) {
        let exports = self.clone();
        let every =
            (self.settings.expiry / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        self.jobs.spawn(move |stop| async move {
            loop {
                tokio::select! {
                    swept = exports.sweep() => if let Err(error) = swept {
                        tracing::warn!(%error, "could not delete expired exports");
                    },
                    () = stop.cancelled() => return,
                }
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = stop.cancelled() => return,
                }
            }
        });
    }

    /// One janitor pass: expired and cancelled jobs, then directories no job owns (a worker
    /// that wrote on for a moment after its job was cancelled, a kick-off that failed).
    pub async fn sweep(&self) -> Result<(), StoreError> {
        let conn = self.jobs.store().connection().await?;
        for id in sql::ended_before(&conn, JobKind::Export, self.settings.expiry).await? {
            self.remove_files(&id).await;
            sql::delete(&conn, &id).await?;
            tracing::info!(job = %id, "deleted an expired or cancelled export");
        }
        let Ok(mut entries) = tokio::fs::read_dir(&self.settings.dir).await else {
            return Ok(());
        };
        let live = sql::ids(&conn, JobKind::Export).await?;
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name().to_string_lossy().to_string();
            let idle = entry
                .metadata()
                .await
                .and_then(|m| m.modified())
                .ok()
                .and_then(|at| at.elapsed().ok())
                .is_some_and(|idle| idle > STRAY_AFTER);
            if idle && crate::resource::is_valid_id(&name) && !live.contains(&name) {
                self.remove_files(&name).await;
                tracing::info!(dir = %name, "deleted export files no job owns");
            }
        }
        Ok(())
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.settings.dir.join(id)
    }

    async fn remove_files(&self, id: &str) {
        let dir = self.job_dir(id);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(%error, dir = %dir.display(), "could not delete export files")
            }
        }
    }

    /// Runs one type of an export.
    async fn export_type(
        &self,
        task: &TaskRow,
        worker: &str,
        progress: &Progress,
        report: &Report,
    ) -> Result<(), TaskFailure> {
        let failed = |e: &dyn std::fmt::Display| TaskFailure::Failed(e.to_string());
        let job = {
            let conn = self
                .jobs
                .store()
                .connection()
                .await
                .map_err(|e| failed(&e))?;
            sql::job(&conn, JobKind::Export, &task.job_id)
                .await
                .map_err(|e| failed(&e))?
        };
        let Some(job) = job else {
            return Err(TaskFailure::Abandoned);
        };
        let spec: ExportSpec = serde_json::from_value(job.document).map_err(|e| failed(&e))?;
        let rt = ResourceType::parse(&task.resource_type)
            .ok_or_else(|| TaskFailure::Failed(format!("unknown type {}", task.resource_type)))?;
        let patients = match (&spec.level, &spec.patients) {
            (Level::System, _) => Patients::Any,
            (Level::Patient, None) => Patients::Every,
            _ => Patients::Listed,
        };
        let group = match &spec.level {
            Level::Group { id } => Some(id.as_str()),
            _ => None,
        };
        let filters = spec
            .filters
            .get(rt.name())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let query = ExportQuery {
            rt,
            until: spec.transaction_time,
            since: spec.since,
            patients,
            filters,
        };
        let source = PatientSource {
            group,
            ids: spec.patients.as_deref(),
        };
        let converter = self.formats.converter().await.map_err(|e| failed(&e))?;
        let copy = crate::store::export::start(self.jobs.store(), &query, source)
            .await
            .map_err(|e| failed(&e))?;
        let mut lines = super::dump::fhir_lines(copy, rt, converter, report);
        let dir = self.job_dir(&task.job_id);
        // The operator gets the path; the client a message without the server's layout.
        let write_failed = |error: std::io::Error| {
            tracing::error!(%error, dir = %dir.display(), "could not write export files");
            TaskFailure::Failed(format!(
                "could not write the export's files ({error}); the server log has the details"
            ))
        };
        let mut output = Output::create(&dir, rt.name(), task.attempts, self.settings.file_size)
            .await
            .map_err(write_failed)?;
        let (mut total, mut bytes) = (0u64, 0u64);
        while let Some(batch) = lines.next().await {
            let batch = batch.map_err(|e| failed(&e))?;
            total += output.write(&batch).await.map_err(write_failed)?;
            bytes += batch.len() as u64;
            report.bytes(batch.len() as u64);
            progress
                .rows
                .store(total, std::sync::atomic::Ordering::Relaxed);
            progress
                .bytes
                .store(bytes, std::sync::atomic::Ordering::Relaxed);
        }
        let files = output.finish().await.map_err(write_failed)?;
        let result = result_document(&files);
        let finished = Finished {
            total: total as i64,
            bytes: bytes as i64,
            result: Some(&result),
        };
        match self.jobs.finish(task, worker, finished).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(TaskFailure::Abandoned),
            Err(error) => Err(failed(&error)),
        }
    }
}

impl Runner for Exports {
    fn run<'a>(
        &'a self,
        task: &'a TaskRow,
        worker: &'a str,
        progress: Arc<Progress>,
    ) -> BoxFuture<'a, Result<(), TaskFailure>> {
        Box::pin(async move {
            let report = Report::start(
                "$export",
                task.resource_type.clone(),
                self.subject_of(task).await,
                "out",
            );
            let outcome = self.export_type(task, worker, &progress, &report).await;
            match &outcome {
                Ok(()) => report.finish(Outcome::Finished, None),
                Err(TaskFailure::Failed(message)) => report.finish(Outcome::Failed, Some(message)),
                Err(TaskFailure::Abandoned) => report.finish(Outcome::Abandoned, None),
            }
            if let Err(TaskFailure::Failed(_)) = &outcome {
                // The job has failed: the types not started yet are not worth exporting.
                let reason = format!("not exported: {} failed first", task.resource_type);
                let skipped = async {
                    let conn = self.jobs.store().connection().await?;
                    sql::fail_waiting(&conn, &task.job_id, &reason).await
                }
                .await;
                if let Err(error) = skipped {
                    tracing::warn!(%error, "could not skip the rest of a failed export");
                }
            }
            outcome
        })
    }
}

/// `X-Progress` while an export runs: a percentage by rows (of each type's expected rows; a
/// finished type counts whole), then the types done and the resources written.
fn progress(tasks: &[TaskRow]) -> String {
    let finished = |t: &TaskRow| t.status == "finished";
    let (written, expected) = tasks.iter().fold((0i64, 0i64), |(written, expected), t| {
        let total = t.total.unwrap_or(0);
        let whole = t.size.unwrap_or(0).max(total).max(1);
        let got = if finished(t) { whole } else { total.min(whole) };
        (written + got, expected + whole)
    });
    let percent = (written as f64 / expected.max(1) as f64 * 100.0)
        .floor()
        .min(99.0);
    let done = tasks.iter().filter(|t| finished(t)).count();
    let resources: i64 = tasks.iter().filter_map(|t| t.total).sum();
    format!(
        "{percent}% ({done} of {} types, {resources} resources written)",
        tasks.len()
    )
}

/// The completion manifest (IG 2.0.0): every non-empty file, in type order.
fn manifest(spec: &ExportSpec, tasks: &[TaskRow], files_base: &str) -> Value {
    let output: Vec<Value> = tasks
        .iter()
        .flat_map(|task| {
            result_files(task.result.as_ref())
                .into_iter()
                .filter(|f| f.count > 0)
                .map(|f| {
                    json!({
                        "type": task.resource_type,
                        "url": format!("{files_base}/{}", f.name),
                        "count": f.count,
                    })
                })
        })
        .collect();
    let error: Vec<Value> = if spec.warnings.is_empty() {
        Vec::new()
    } else {
        vec![json!({
            "type": "OperationOutcome",
            "url": format!("{files_base}/{WARNINGS_FILE}"),
            "count": spec.warnings.len(),
        })]
    };
    json!({
        "transactionTime": format_instant(&spec.transaction_time),
        "request": spec.request,
        "requiresAccessToken": true,
        "output": output,
        "error": error,
    })
}

fn warnings_ndjson(warnings: &[String]) -> String {
    warnings
        .iter()
        .map(|message| {
            let outcome = json!({
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "warning", "code": "not-supported", "diagnostics": message}],
            });
            format!("{outcome}\n")
        })
        .collect()
}

/// Whether `name` could be an export file's name, `<Type>-<run>-<n>.ndjson` (checked before
/// any path is built from it).
pub fn is_file_name(name: &str) -> bool {
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = name
        .strip_suffix(".ndjson")
        .map(|stem| stem.split('-').collect())
        .unwrap_or_default();
    match parts.as_slice() {
        [type_name, run, n] => {
            !type_name.is_empty()
                && type_name.bytes().all(|b| b.is_ascii_alphabetic())
                && number(run)
                && number(n)
        }
        _ => false,
    }
}

/// The default export directory for a data directory.
pub fn default_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("exports")
}
