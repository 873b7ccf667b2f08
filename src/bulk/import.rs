//! `$import`: asynchronous bulk import that survives crashes and scales across processes.
//!
//! A job and its inputs are stored in PostgreSQL ([`crate::store::import`]). Every fhirbox
//! process runs [`Imports::spawn_workers`] workers; each claims one input at a time and loads
//! it with the `$load` machinery ([`super::load`]): one transaction per input, in which the
//! input is also marked finished, if the worker still holds it. A worker renews its claim
//! (and records progress) every couple of seconds; if it dies, the claim expires and another
//! worker, here or in another process, loads the input again from the start. Loading is an
//! upsert, so a retried input gives the same rows, never duplicates.
//!
//! The job's status is a `BulkImportStatus` resource in the reference product's shape,
//! rewritten from the job's rows whenever an input starts, makes progress or ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;

use super::load::{load_tracked, BeforeCommit, LoadError, LoadRequest, Progress};
use super::prepare::LineRules;
use super::source::Sources;
use crate::format::Formats;
use crate::resource::format_instant;
use crate::resource_type::ResourceType;
use crate::store::import::{self as sql, InputRow, JobRow};
use crate::store::resources::replace_in_place;
use crate::store::{Store, StoreError};

/// How often a worker with nothing to do looks for work (a job created in this process
/// wakes its workers at once).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Worker settings.
#[derive(Debug, Clone)]
pub struct ImportSettings {
    /// Inputs this process loads at once.
    pub workers: usize,
    /// How long a claim lasts without renewal: after a crash, the time before another worker
    /// takes the input over.
    pub lease: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}")]
    Invalid(String),
    #[error("an import with id '{0}' already exists")]
    Exists(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An import request, as `POST /$import` takes it (checked).
pub struct ImportRequest {
    pub id: Option<String>,
    /// `/fhir/$import`: FHIR lines, converted.
    pub fhir: bool,
    pub keep_history: bool,
    pub inputs: Vec<(ResourceType, String)>,
    /// The request's own fields, kept in the status: `inputFormat`, `contentEncoding`, `mode`.
    pub echo: Map<String, Value>,
}

/// The import service of a process: starts jobs, runs workers, reports status.
#[derive(Clone)]
pub struct Imports {
    store: Store,
    sources: Sources,
    formats: Formats,
    settings: ImportSettings,
    /// Wakes this process's idle workers when a job is created here.
    wake: Arc<Notify>,
    /// This process's worker names start with this (unique per process start).
    prefix: String,
}

impl Imports {
    pub fn new(
        store: Store,
        sources: Sources,
        formats: Formats,
        settings: ImportSettings,
    ) -> Imports {
        Imports {
            store,
            sources,
            formats,
            settings,
            wake: Arc::new(Notify::new()),
            prefix: format!("{}-{:08x}", std::process::id(), rand::random::<u32>()),
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
        let job = JobRow {
            id: id.clone(),
            subject: subject.to_string(),
            fhir: request.fhir,
            keep_history: request.keep_history,
            cancelled: false,
            created_at: Utc::now(),
            document: Value::Object(request.echo),
        };
        let inputs: Vec<(String, String)> = request
            .inputs
            .iter()
            .map(|(rt, url)| (rt.name().to_string(), url.clone()))
            .collect();
        let mut conn = self.store.connection().await?;
        let tx = conn.transaction().await.map_err(StoreError::from)?;
        if !sql::create_job(&tx, &job, &inputs).await? {
            return Err(ImportError::Exists(id));
        }
        let document = self.write_status(&tx, &id).await?;
        tx.commit().await.map_err(StoreError::from)?;
        self.wake.notify_waiters();
        Ok((id, document))
    }

    /// Cancels a job: inputs not finished are stopped and their loads rolled back. Returns the
    /// status, or `None` if there is no such job.
    pub async fn cancel(&self, id: &str) -> Result<Option<Value>, ImportError> {
        let conn = self.store.connection().await?;
        if !sql::cancel(&conn, id).await? {
            return Ok(None);
        }
        Ok(Some(self.write_status(&conn, id).await?))
    }

    /// Who started a job (`root`, `Client/<id>`), if it exists.
    pub async fn subject(&self, id: &str) -> Result<Option<String>, StoreError> {
        let conn = self.store.connection().await?;
        Ok(sql::job(&conn, id).await?.map(|job| job.subject))
    }

    /// Rewrites the job's BulkImportStatus from its rows.
    async fn write_status(
        &self,
        client: &impl crate::store::GenericClient,
        id: &str,
    ) -> Result<Value, StoreError> {
        let job = sql::job(client, id).await?;
        let inputs = sql::inputs(client, id).await?;
        let Some(job) = job else {
            return Ok(Value::Null);
        };
        let document = status_document(&job, &inputs);
        let rt = ResourceType::parse("BulkImportStatus").expect("a fhirbox type");
        replace_in_place(client, rt, id, &document).await?;
        Ok(document)
    }

    async fn refresh_status(&self, id: &str) {
        let result = async {
            let conn = self.store.connection().await?;
            self.write_status(&conn, id).await
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(%error, job = id, "could not update an import's status");
        }
    }

    /// Starts this process's workers.
    pub fn spawn_workers(&self) {
        for n in 0..self.settings.workers {
            let imports = self.clone();
            let name = format!("{}-{n}", self.prefix);
            tokio::spawn(async move { imports.work(name).await });
        }
    }

    /// Gives back the inputs this process's workers hold (a clean shutdown), so another
    /// process, or the next start, takes them over at once instead of after the lease.
    pub async fn release_claims(&self) {
        let result = async {
            let conn = self.store.connection().await?;
            conn.execute(
                "UPDATE fhirbox_import_input SET status = 'waiting', worker = NULL, lease_until = NULL
                  WHERE status = 'in-progress' AND worker LIKE $1",
                &[&format!("{}-%", self.prefix)],
            )
            .await
            .map_err(StoreError::from)
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(%error, "could not give back the imports in progress");
        }
    }

    async fn work(self, name: String) {
        loop {
            let claimed = async {
                let conn = self.store.connection().await?;
                sql::claim(&conn, &name, self.settings.lease).await
            }
            .await;
            match claimed {
                Ok(Some(input)) => self.run(input, &name).await,
                Ok(None) => {
                    let _ = tokio::time::timeout(IDLE_POLL, self.wake.notified()).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "an import worker could not look for work");
                    tokio::time::sleep(IDLE_POLL).await;
                }
            }
        }
    }

    /// Loads one claimed input, renewing the claim while it runs.
    async fn run(&self, input: InputRow, worker: &str) {
        self.refresh_status(&input.job_id).await;
        let outcome = self.load_input(&input, worker).await;
        match outcome {
            Ok(()) | Err(LoadError::Abandoned) => {}
            Err(error) => {
                let message = error.to_string();
                tracing::info!(job = %input.job_id, input = input.position, %message, "an import input failed");
                let result = async {
                    let conn = self.store.connection().await?;
                    sql::fail(&conn, &input, worker, &message).await
                }
                .await;
                if let Err(error) = result {
                    tracing::warn!(%error, "could not record an import input's failure");
                }
            }
        }
        self.refresh_status(&input.job_id).await;
    }

    async fn load_input(&self, input: &InputRow, worker: &str) -> Result<(), LoadError> {
        let job = {
            let conn = self.store.connection().await?;
            sql::job(&conn, &input.job_id).await?
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
            source: input.url.clone(),
            rules: LineRules {
                fhir,
                only_type: Some(rt),
                strip_nulls: false,
                merge: None,
            },
            keep_history: job.keep_history,
        };
        let progress = Arc::new(Progress::default());
        let before_commit: BeforeCommit = {
            let (input, worker, progress) = (input.clone(), worker.to_string(), progress.clone());
            Box::new(move |conn, counts| {
                Box::pin(async move {
                    let total: u64 = counts.values().sum();
                    let bytes = progress.bytes.load(Ordering::Relaxed);
                    sql::finish(conn, &input, &worker, total as i64, bytes as i64).await
                })
            })
        };
        let load = load_tracked(
            &self.store,
            &self.sources,
            request,
            progress.clone(),
            Some(before_commit),
        );
        let renew = self.keep_claim(input, worker, &progress);
        tokio::select! {
            result = load => result.map(|_| ()),
            // The claim was lost (cancelled, or taken over after a stall): drop the load,
            // which rolls it back.
            () = renew => Err(LoadError::Abandoned),
        }
    }

    /// Renews the claim with the progress so far until it is lost (then returns).
    async fn keep_claim(&self, input: &InputRow, worker: &str, progress: &Progress) {
        let every = (self.settings.lease / 3).max(Duration::from_millis(200));
        loop {
            tokio::time::sleep(every).await;
            let rows = progress.rows.load(Ordering::Relaxed) as i64;
            let bytes = progress.bytes.load(Ordering::Relaxed) as i64;
            let renewed = async {
                let conn = self.store.connection().await?;
                sql::renew(&conn, input, worker, self.settings.lease, rows, bytes).await
            }
            .await;
            match renewed {
                Ok(true) => self.refresh_status(&input.job_id).await,
                Ok(false) => return,
                // The database is away for a moment: keep going; the lease says how long.
                Err(error) => tracing::warn!(%error, "could not renew an import claim"),
            }
        }
    }
}

/// The BulkImportStatus document, in the reference product's shape.
pub fn status_document(job: &JobRow, inputs: &[InputRow]) -> Value {
    let ended = |i: &InputRow| matches!(i.status.as_str(), "finished" | "failed" | "cancelled");
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
    document.insert("inputs".into(), Value::Array(inputs));
    Value::Object(document)
}
