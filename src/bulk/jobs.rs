//! Background jobs (`$import`, `$export`): the workers every fhirbox process runs.
//!
//! A job's tasks are rows in PostgreSQL ([`crate::store::jobs`]). Each worker claims one task
//! at a time, hands it to the [`Runner`] of its kind, and keeps the claim alive (recording
//! progress) while the runner works. If a process dies, its claims expire and another worker,
//! here or in another process, runs those tasks again from the start: runners make a task's
//! effect idempotent (an import upserts in one transaction; an export rewrites its files).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use super::load::Progress;
use crate::store::jobs::{self as sql, JobKind, TaskRow};
use crate::store::{Store, StoreError};

/// How often a worker with nothing to do looks for work (a job created in this process
/// wakes its workers at once).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Worker settings.
#[derive(Debug, Clone)]
pub struct JobSettings {
    /// Tasks this process runs at once.
    pub workers: usize,
    /// How long a claim lasts without renewal: after a crash, the time before another worker
    /// takes the task over.
    pub lease: Duration,
    /// Jobs of one subject not yet ended (waiting or running); more are refused (429).
    pub jobs_per_subject: usize,
    /// Tasks of one subject running at once, across processes; more wait their turn.
    pub tasks_per_subject: usize,
    /// How often a running task records its progress (and renews its claim): what the job
    /// list and status routes show is at most this old.
    pub progress_every: Duration,
}

/// A subject has as many unfinished jobs as it may have.
#[derive(Debug, thiserror::Error)]
#[error("{subject} has {jobs} jobs waiting or running, the most one subject may have (--jobs-per-subject); wait for one to end, or cancel one")]
pub struct TooManyJobs {
    pub subject: String,
    pub jobs: i64,
}

/// Why a task did not finish.
#[derive(Debug)]
pub enum TaskFailure {
    /// The claim was lost (cancelled, or taken over after a stall): nothing to record.
    Abandoned,
    /// The task failed; the message is recorded for the status.
    Failed(String),
}

/// Runs the tasks of one job kind.
pub trait Runner: Send + Sync + 'static {
    /// Does the task's work; `progress` is what the worker records at each renewal. Finishing
    /// the task (with [`Jobs::finish`], or inside the runner's own transaction) is the runner's
    /// part, so that the effect and the mark land together.
    fn run<'a>(
        &'a self,
        task: &'a TaskRow,
        worker: &'a str,
        progress: Arc<Progress>,
    ) -> BoxFuture<'a, Result<(), TaskFailure>>;

    /// Called when a task of the job started, made progress or ended (an import rewrites its
    /// status resource).
    fn changed<'a>(&'a self, _job_id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// The job machinery of a process: claims, leases and this process's workers.
#[derive(Clone)]
pub struct Jobs {
    store: Store,
    settings: JobSettings,
    /// Wakes this process's idle workers when a job is created here.
    wake: Arc<Notify>,
    /// This process's worker names start with this (unique per process start).
    prefix: String,
    /// Tells the background tasks to stop (shutdown).
    stop: CancellationToken,
    /// The background tasks started here, awaited at shutdown.
    tasks: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
}

impl Jobs {
    pub fn new(store: Store, settings: JobSettings) -> Jobs {
        Jobs {
            store,
            settings,
            wake: Arc::new(Notify::new()),
            prefix: format!("{}-{:08x}-", std::process::id(), rand::random::<u32>()),
            stop: CancellationToken::new(),
            tasks: Arc::default(),
        }
    }

    /// Runs a background task of this process until it ends or `stop` is called: `task`
    /// receives the stop signal and must end soon after it fires.
    pub fn spawn<F, T>(&self, task: F)
    where
        F: FnOnce(CancellationToken) -> T,
        T: std::future::Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(task(self.stop.clone()));
        self.tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(handle);
    }

    /// Stops this process's background tasks: each abandons what it was doing (a load rolls
    /// back; an export type is run again from the start by whoever claims it next), then the
    /// tasks this process held are given back so that another process, or the next start,
    /// takes them over at once instead of after the lease.
    pub async fn stop(&self) {
        self.stop.cancel();
        let tasks = std::mem::take(
            &mut *self
                .tasks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for task in tasks {
            let _ = task.await;
        }
        self.release_claims().await;
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether `subject` may start one more job (`Ok(Err)`: it has too many unfinished).
    pub async fn admit(&self, subject: &str) -> Result<Result<(), TooManyJobs>, StoreError> {
        let conn = self.store.connection().await?;
        let jobs = sql::unfinished_jobs(&conn, subject).await?;
        if jobs >= self.settings.jobs_per_subject.max(1) as i64 {
            return Ok(Err(TooManyJobs {
                subject: subject.to_string(),
                jobs,
            }));
        }
        Ok(Ok(()))
    }

    /// Tells this process's idle workers that there is new work.
    pub fn wake(&self) {
        self.wake.notify_waiters();
    }

    /// Starts this process's workers, running imports and exports with these runners.
    pub fn spawn_workers(&self, import: Arc<dyn Runner>, export: Arc<dyn Runner>) {
        for n in 0..self.settings.workers {
            let jobs = self.clone();
            let name = format!("{}{n}", self.prefix);
            let (import, export) = (import.clone(), export.clone());
            self.spawn(move |stop| async move {
                tokio::select! {
                    () = jobs.work(name, import, export) => {}
                    () = stop.cancelled() => {}
                }
            });
        }
    }

    /// Gives back the tasks this process's workers hold.
    async fn release_claims(&self) {
        let result = async {
            let conn = self.store.connection().await?;
            sql::release(&conn, &self.prefix).await
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(%error, "could not give back the tasks in progress");
        }
    }

    async fn work(self, name: String, import: Arc<dyn Runner>, export: Arc<dyn Runner>) {
        loop {
            let claimed = async {
                let conn = self.store.connection().await?;
                sql::claim(
                    &conn,
                    &name,
                    self.settings.lease,
                    self.settings.tasks_per_subject,
                )
                .await
            }
            .await;
            match claimed {
                Ok(Some(task)) => {
                    let runner = match task.kind {
                        Some(JobKind::Import) => &import,
                        Some(JobKind::Export) => &export,
                        None => continue,
                    };
                    self.run(runner.as_ref(), &task, &name).await;
                }
                Ok(None) => {
                    let _ = tokio::time::timeout(IDLE_POLL, self.wake.notified()).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "a worker could not look for work");
                    tokio::time::sleep(IDLE_POLL).await;
                }
            }
        }
    }

    /// Runs one claimed task, renewing the claim while it runs.
    async fn run(&self, runner: &dyn Runner, task: &TaskRow, worker: &str) {
        let (job, position, kind) = (
            task.job_id.as_str(),
            task.position,
            task.kind.map_or("?", JobKind::name),
        );
        let resource_type = task.resource_type.as_str();
        tracing::info!(
            job,
            task = position,
            kind,
            resource_type,
            attempt = task.attempts,
            "task started"
        );
        runner.changed(&task.job_id).await;
        let progress = Arc::new(Progress::default());
        let outcome = tokio::select! {
            outcome = runner.run(task, worker, progress.clone()) => outcome,
            // Dropping the runner's future undoes its work (rolls a load back).
            () = self.keep_claim(runner, task, worker, &progress) => Err(TaskFailure::Abandoned),
        };
        match &outcome {
            Ok(()) => tracing::info!(job, task = position, kind, resource_type, "task finished"),
            Err(TaskFailure::Abandoned) => tracing::info!(
                job,
                task = position,
                kind,
                resource_type,
                "task given up: its claim was lost (cancelled, or taken over after a stall)"
            ),
            Err(TaskFailure::Failed(message)) => tracing::warn!(
                job, task = position, kind, resource_type,
                error = %super::report::log_safe(message), "task failed"
            ),
        }
        if let Err(TaskFailure::Failed(message)) = outcome {
            let result = async {
                let conn = self.store.connection().await?;
                sql::fail(&conn, task, worker, &message).await
            }
            .await;
            if let Err(error) = result {
                tracing::warn!(%error, "could not record a task's failure");
            }
        }
        runner.changed(&task.job_id).await;
    }

    /// Renews the claim with the progress so far until it is lost (then returns).
    async fn keep_claim(
        &self,
        runner: &dyn Runner,
        task: &TaskRow,
        worker: &str,
        progress: &Progress,
    ) {
        // Often enough for the claim (a third of the lease) and for people watching progress.
        let every = (self.settings.lease / 3)
            .min(self.settings.progress_every)
            .max(Duration::from_millis(200));
        loop {
            tokio::time::sleep(every).await;
            let rows = progress.rows.load(Ordering::Relaxed) as i64;
            let bytes = progress.bytes.load(Ordering::Relaxed) as i64;
            let size = Some(progress.size.load(Ordering::Relaxed) as i64).filter(|s| *s > 0);
            let renewed = async {
                let conn = self.store.connection().await?;
                sql::renew(&conn, task, worker, self.settings.lease, rows, bytes, size).await
            }
            .await;
            match renewed {
                Ok(true) => runner.changed(&task.job_id).await,
                Ok(false) => return,
                // The database is away for a moment: keep going; the lease says how long.
                Err(error) => tracing::warn!(%error, "could not renew a task's claim"),
            }
        }
    }

    /// How many tasks there are, by job kind and status (the metrics' job queue).
    pub async fn task_counts(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let conn = self.store.connection().await?;
        sql::task_counts(&conn).await
    }

    /// Marks a task finished, if this worker still holds it (`false`: it does not).
    pub async fn finish(
        &self,
        task: &TaskRow,
        worker: &str,
        finished: sql::Finished<'_>,
    ) -> Result<bool, StoreError> {
        let conn = self.store.connection().await?;
        sql::finish(&conn, task, worker, finished).await
    }
}
