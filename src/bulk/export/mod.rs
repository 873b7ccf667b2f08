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

pub mod elements;
pub mod manifest;
pub mod output;
pub mod polls;
pub mod request;
pub mod storage;
pub mod task;
pub mod views;

use std::path::{Path, PathBuf};

use self::storage::ExportStorage;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use self::manifest::{manifest, progress, warnings_ndjson, WARNINGS_FILE};
use self::output::{result_deleted, result_files};
use self::request::{ExportSpec, Level};
use super::jobs::Jobs;
use crate::auth::access::JobFacts;
use crate::formats::Formats;
use crate::resource_type::ResourceType;
use crate::store::jobs::{self as sql, JobKind, JobRow, NewTask, TaskRow};
use crate::store::replicas::Readers;
use crate::store::StoreError;

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
    /// Status polls a job may have per second (after a burst of 5); 0: no limit.
    pub polls_per_second: f64,
    /// What the COPY of an export's type may take on the database server (temp files
    /// `--export-temp-file-bytes`, work memory `--sql-work-mem`).
    pub session: crate::store::session::SessionLimits,
    /// What each view of a `$viewdefinition-export` may take (`--sql-timeout`,
    /// `--sql-temp-file-bytes`, `--sql-work-mem`).
    pub view_session: crate::store::session::SessionLimits,
    /// Parquet row groups of view exports (`--parquet-row-group-rows`/`-bytes`).
    pub parquet: crate::views::parquet::RowGroups,
    /// How big a view of a `$viewdefinition-export` may compile (`--view-max-*`).
    pub views: crate::views::sql::ViewLimits,
    /// How much each view of a `$viewdefinition-export` may write (`--view-max-rows`,
    /// `--view-max-bytes`).
    pub view_output: crate::bulk::bounds::OutputBounds,
    /// How much one export job may write (`--export-max-rows`, `--export-max-bytes`).
    pub output: crate::bulk::bounds::OutputBounds,
    /// `--export-storage s3://BUCKET[/PREFIX]`: files go to the bucket instead of `dir`.
    pub bucket: Option<crate::objects::Location>,
    /// The part size of uploads to the bucket (`--s3-part-size`).
    pub part_size: usize,
    /// How manifests link their files (`--export-links`; `None`: signed with a bucket).
    pub links: Option<Links>,
    /// How long a signed link lives at most (`--export-link-lifetime`).
    pub link_lifetime: Duration,
}

impl ExportSettings {
    /// Where the files go, checked: a bucket must answer (a clear error at start-up, not a
    /// hang at the first export).
    pub async fn storage(
        &self,
        buckets: &crate::objects::Buckets,
    ) -> Result<ExportStorage, crate::objects::ObjectError> {
        let Some(location) = &self.bucket else {
            return Ok(ExportStorage::Local {
                dir: self.dir.clone(),
            });
        };
        let storage = ExportStorage::Bucket {
            client: buckets.client(&location.bucket)?,
            name: location.to_string(),
            prefix: location.key.trim_matches('/').to_string(),
            part_size: self.part_size.max(5 << 20),
        };
        storage.reachable().await?;
        Ok(storage)
    }

    /// How manifests link their files.
    pub fn links(&self) -> Links {
        match (self.links, &self.bucket) {
            (Some(links), _) => links,
            (None, Some(_)) => Links::Signed,
            (None, None) => Links::Proxy,
        }
    }
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
    TooMany(#[from] super::jobs::TooManyJobs),
    /// The export storage does not answer (at kick-off: better now than in every task).
    #[error(transparent)]
    Storage(#[from] crate::objects::ObjectError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the status URL says.
pub enum ExportStatus {
    /// Running; with `allowPartialManifests`, the manifest page asked for once it exists.
    InProgress {
        progress: String,
        page: Option<Value>,
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
    polls: Arc<polls::Polls>,
    /// Where the files go.
    storage: Arc<ExportStorage>,
    /// Where the tasks read (a standby when there are any).
    readers: Readers,
}

/// How a manifest's files are downloaded (`--export-links`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Through fhirbox (`$export-file/...`), with the client's credentials.
    Proxy,
    /// Straight from the bucket, with URLs signed at each poll (bucket storage only).
    Signed,
}

impl Exports {
    /// Where the files go: `local` or `s3`, and the directory or bucket.
    pub fn storage_place(&self) -> (&'static str, String) {
        let kind = match &*self.storage {
            ExportStorage::Local { .. } => "local",
            ExportStorage::Bucket { .. } => "s3",
        };
        (kind, self.storage.describe())
    }

    pub fn new(
        jobs: Jobs,
        formats: Formats,
        settings: ExportSettings,
        storage: ExportStorage,
        readers: Readers,
    ) -> Exports {
        Exports {
            jobs,
            formats,
            readers,
            polls: Arc::new(polls::Polls::new(settings.polls_per_second)),
            settings: Arc::new(settings),
            storage: Arc::new(storage),
        }
    }

    /// Where the files go.
    pub fn storage(&self) -> &ExportStorage {
        &self.storage
    }

    /// Admits a status poll of a job, or says how long its client must wait first.
    pub fn admit_poll(&self, id: &str) -> Result<(), Duration> {
        self.polls.admit(id)
    }

    /// Creates a job and wakes the workers; returns its id.
    pub async fn start(&self, mut spec: ExportSpec, subject: &str) -> Result<String, ExportError> {
        self.jobs.admit(subject).await??;
        self.storage.reachable().await?;
        // Taken after transactionTime: whatever was committed by then is before it.
        spec.position = self.readers.position().await?;
        let conn = self.jobs.store().connection().await?;
        if let Level::Group { id } = &spec.level {
            let group = ResourceType::parse("Group").expect("an R4 type");
            let found = crate::store::resources::read(&conn, group, id).await?;
            if !matches!(found, crate::store::resources::Lookup::Found(_)) {
                return Err(ExportError::NoGroup(id.clone()));
            }
        }
        if let Some(ids) = &spec.patients {
            let group = match &spec.level {
                Level::Group { id } => Some(id.as_str()),
                _ => None,
            };
            let unknown = crate::store::export::unknown_patients(&conn, ids, group).await?;
            if !unknown.is_empty() {
                let whose = group.map_or_else(
                    || "no such Patient".to_string(),
                    |g| format!("no such Patient, or not an active member of Group/{g}"),
                );
                return Err(ExportError::Invalid(format!(
                    "patient {}: {whose}",
                    unknown
                        .iter()
                        .map(|id| format!("Patient/{id}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
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
        if !spec.views.is_empty() {
            // Every view of a request reads one snapshot: one task writes them all.
            tasks = vec![NewTask {
                resource_type: views::TASK.to_string(),
                url: None,
                size: None,
            }];
        }
        if spec.by_patient {
            // Patient blocks mix every type: one task writes them all.
            let size = tasks.iter().filter_map(|t| t.size).sum();
            tasks = vec![NewTask {
                resource_type: "Patient".to_string(),
                url: None,
                size: Some(size),
            }];
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
            let warnings = warnings_ndjson(&spec.warnings).into_bytes().into();
            self.storage.put(&id, WARNINGS_FILE, warnings).await?;
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
        Ok(self.facts(id).await?.owner)
    }

    /// Who started a job and which types it reads, for its routes' authorization (`owner:
    /// None`: no such job, or cancelled).
    pub async fn facts(&self, id: &str) -> Result<JobFacts, StoreError> {
        let conn = self.jobs.store().connection().await?;
        let job = sql::job(&conn, JobKind::Export, id).await?;
        Ok(job.map(facts_of).unwrap_or_default())
    }

    /// The status of a job (`None`: no such job, or cancelled, or expired, or no such manifest
    /// page). File URLs start with `base` (`http://host/fhir`); `page` (from 1) is the
    /// manifest page asked for.
    pub async fn status(
        &self,
        id: &str,
        base: &str,
        page: Option<usize>,
    ) -> Result<Option<ExportStatus>, ExportError> {
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
        let files_base = format!("{base}/$export-file/{id}");
        let done = tasks.iter().all(|t| t.status == "finished");
        let paged = if spec.partial_manifests {
            let tx = self.jobs.store().begin().await?;
            let pages = sql::manifest_pages(&tx, id).await;
            let pages = tx.finish(pages).await?;
            let status_url = format!("{base}/$export-status/{id}");
            let number = page.unwrap_or(1);
            match manifest::page(&spec, &tasks, &pages, number, &files_base, &status_url) {
                Some(manifest) => Some(manifest),
                // Page 1 before anything finished: in progress, no manifest yet.
                None if number == 1 && !done => None,
                None => return Ok(None),
            }
        } else if page.is_some_and(|n| n != 1) {
            return Ok(None);
        } else {
            None
        };
        let ended = tasks
            .iter()
            .filter_map(|t| t.finished_at)
            .max()
            .unwrap_or(job.created_at);
        let expires = ended
            + chrono::Duration::from_std(self.settings.expiry).unwrap_or(chrono::Duration::MAX);
        if !done {
            let page = match paged {
                Some(mut page) => {
                    self.link(id, &mut page, None).await?;
                    Some(page)
                }
                None => None,
            };
            return Ok(Some(ExportStatus::InProgress {
                progress: progress(&tasks),
                page,
            }));
        }
        let mut manifest = match paged {
            Some(page) => page,
            None => manifest(&spec, &tasks.iter().collect::<Vec<_>>(), &files_base),
        };
        self.link(id, &mut manifest, Some(expires)).await?;
        Ok(Some(ExportStatus::Complete { manifest, expires }))
    }

    /// With signed links, points every file of `manifest` straight at the storage: URLs
    /// signed now (a client that polls again gets fresh ones), living `--export-link-lifetime`
    /// at most, and no longer than the files (`expires`) or the credentials that signed them.
    async fn link(
        &self,
        id: &str,
        manifest: &mut Value,
        expires: Option<DateTime<Utc>>,
    ) -> Result<(), ExportError> {
        if self.settings.links() != Links::Signed || !self.storage.signs() {
            return Ok(());
        }
        let mut lifetime = self.settings.link_lifetime;
        if let Some(expires) = expires {
            let left = (expires - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            lifetime = lifetime.min(left);
        }
        if let Some(credentials) = crate::objects::Buckets::credential_lifetime() {
            lifetime = lifetime.min(credentials);
        }
        let lifetime = lifetime.max(Duration::from_secs(1));
        for list in ["output", "deleted", "error"] {
            let Some(entries) = manifest[list].as_array_mut() else {
                continue;
            };
            for entry in entries {
                let name = entry["url"]
                    .as_str()
                    .and_then(|url| url.rsplit('/').next())
                    .unwrap_or_default()
                    .to_string();
                if let Some(url) = self.storage.signed_url(id, &name, lifetime).await? {
                    entry["url"] = Value::String(url);
                }
            }
        }
        manifest["requiresAccessToken"] = Value::Bool(false);
        Ok(())
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
        self.polls.forget(id);
        self.remove_files(id).await;
        Ok(true)
    }

    /// Whether `name` is a file of job `id`'s manifest (a file of a finished task, or the
    /// warnings).
    pub async fn lists(&self, id: &str, name: &str) -> Result<bool, StoreError> {
        let Some((job, tasks)) = self.live_job(id).await? else {
            return Ok(false);
        };
        let listed = tasks
            .iter()
            .filter(|t| t.status == "finished")
            .flat_map(|t| {
                let result = t.result.as_ref();
                result_files(result)
                    .into_iter()
                    .chain(result_deleted(result))
            })
            .any(|f| f.name == name);
        let warnings = name == WARNINGS_FILE
            && serde_json::from_value::<ExportSpec>(job.document)
                .is_ok_and(|spec| !spec.warnings.is_empty());
        Ok(listed || warnings)
    }

    /// A file of a job's manifest, the bytes `range` only if asked (`None`: no such file).
    pub async fn open(
        &self,
        id: &str,
        name: &str,
        range: Option<(u64, u64)>,
    ) -> Result<Option<storage::Opened>, ExportError> {
        if !self.lists(id, name).await? {
            return Ok(None);
        }
        Ok(self.storage.open(id, name, range).await?)
    }

    /// The length of a file of a job's manifest (`None`: no such file).
    pub async fn file_size(&self, id: &str, name: &str) -> Result<Option<u64>, ExportError> {
        if !self.lists(id, name).await? {
            return Ok(None);
        }
        Ok(self.storage.size(id, name).await?)
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
        self.abort_stale_uploads(&conn).await;
        let present = match self.storage.jobs().await {
            Ok(present) => present,
            Err(error) => {
                tracing::warn!(%error, "could not list the export storage");
                return Ok(());
            }
        };
        let live = sql::ids(&conn, JobKind::Export).await?;
        for (name, changed) in present {
            let idle = changed
                .and_then(|at| at.elapsed().ok())
                .is_some_and(|idle| idle > STRAY_AFTER);
            if idle && crate::resource::is_valid_id(&name) && !live.contains(&name) {
                self.remove_files(&name).await;
                tracing::info!(dir = %name, "deleted export files no job owns");
            }
        }
        Ok(())
    }

    /// Aborts the uploads no running task will finish: of a job that is over or gone, or of an
    /// earlier run of a task (a process killed while it uploaded, whose task another took over).
    async fn abort_stale_uploads(&self, conn: &crate::store::Connection) {
        let uploads = match self.storage.uploads().await {
            Ok(uploads) => uploads,
            Err(error) => {
                tracing::warn!(%error, "could not list the uploads in progress");
                return;
            }
        };
        for (job, name, upload) in uploads {
            let tasks = match sql::tasks(conn, &job).await {
                Ok(tasks) => tasks,
                Err(error) => {
                    tracing::warn!(%error, "could not read an export's tasks");
                    return;
                }
            };
            let run = output::run_of(&name);
            let live = tasks
                .iter()
                .any(|t| t.status == "in-progress" && Some(t.attempts) == run);
            if live {
                continue;
            }
            match self.storage.abort(&job, &name, &upload).await {
                Ok(()) => tracing::info!(job, file = name, "aborted an upload nobody will finish"),
                Err(error) => tracing::warn!(%error, "could not abort a stale upload"),
            }
        }
    }

    pub(super) async fn remove_files(&self, id: &str) {
        if let Err(error) = self.storage.remove_job(id).await {
            tracing::warn!(%error, job = id, storage = %self.storage.describe(), "could not delete export files");
        }
    }
}

/// Whether `name` could be an export file's name, `<stem>-<run>-<n>.ndjson` with a stem of
/// letters and `_` (`Patient`, `Patient_deleted`, `messages`), checked before any path is
/// built from it.
pub fn is_file_name(name: &str) -> bool {
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = [".ndjson", ".csv", ".parquet"]
        .iter()
        .find_map(|ext| name.strip_suffix(ext))
        .map(|stem| stem.split('-').collect())
        .unwrap_or_default();
    match parts.as_slice() {
        [stem, run, n] => {
            !stem.is_empty()
                && stem.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
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

/// What authorization needs to know about an export job (see [`Exports::facts`]): nothing
/// for a cancelled one, which no longer exists for its owner.
pub fn facts_of(job: JobRow) -> JobFacts {
    if job.cancelled {
        return JobFacts::default();
    }
    // A spec this version cannot read names no types: only root and the owner's scope
    // for every type would do, and the owner rule still holds.
    let spec = serde_json::from_value::<ExportSpec>(job.document).ok();
    let mut types: Vec<ResourceType> = spec
        .iter()
        .flat_map(|spec| {
            let views = spec
                .views
                .iter()
                .filter_map(|v| v.view["resource"].as_str());
            spec.types.iter().map(String::as_str).chain(views)
        })
        .filter_map(ResourceType::parse)
        .collect();
    types.sort_by_key(|rt| rt.name());
    types.dedup();
    JobFacts {
        owner: Some(job.subject),
        types,
        writes: false,
    }
}
