//! One task of an export, as the job machinery runs it: a resource type's files (or, with
//! `organizeOutputBy=Patient`, the one task's patient blocks), then, with `_since`, the
//! `deleted` files: Bundles of `DELETE` entries for what was deleted since.
//!
//! Everything streams: rows come from one COPY ([`crate::store::export`],
//! [`crate::store::export_blocks`]) in batches, are converted on blocking threads (one batch
//! per core at a time, order kept) and written to size-limited files ([`Output`]). Only when
//! every file is synced is the task marked finished with its files; a task that dies
//! half-way is run again and rewrites its files from the start.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{Stream, StreamExt};
use serde_json::json;

use super::output::{result_document, Output, Written};
use super::request::{ExportSpec, Level};
use super::Exports;
use crate::bulk::dump::{convert_batch, fhir_lines};
use crate::bulk::jobs::{Progress, Runner, TaskFailure};
use crate::bulk::native_line::{write_native_line, Row};
use crate::bulk::report::{Outcome, Report};
use crate::bulk::stream::{read_ahead, tuple_batches, Tuple};
use crate::format::Converter;
use crate::resource_type::ResourceType;
use crate::store::copy_out::CopyOut;
use crate::store::export::{Criterion, ExportQuery, PatientSource, Patients, Versions};
use crate::store::export_blocks::fields as block;
use crate::store::jobs::{self as sql, Finished, JobKind, TaskRow};

/// Tuple data per batch (as `$dump`'s).
const BATCH_BYTES: usize = 256 * 1024;

/// Deletions per Bundle line of a `deleted` file.
const DELETIONS_PER_BUNDLE: usize = 1000;

/// Converted batches (of about 256 KB) an export's COPY may run ahead of its file writes.
const LINES_AHEAD: usize = 4;

/// The file stem of patient blocks.
pub const BLOCKS_STEM: &str = "patients";

/// What a task wrote.
pub(super) struct TaskOutput {
    pub files: Vec<Written>,
    pub deleted: Vec<Written>,
    pub total: u64,
    pub bytes: u64,
}

impl Exports {
    /// Runs one task of an export.
    async fn export_task(
        &self,
        task: &TaskRow,
        worker: &str,
        progress: &Progress,
        report: &Report,
    ) -> Result<(), TaskFailure> {
        let spec = self.spec_of(task).await?;
        let budget = self.budget(task).await?;
        let written = if !spec.views.is_empty() {
            self.write_views(&spec, task, progress, report, &budget)
                .await?
        } else if spec.by_patient {
            self.write_blocks(&spec, task, progress, report, &budget)
                .await?
        } else {
            self.write_type(&spec, task, progress, report, &budget)
                .await?
        };
        let result = result_document(&written.files, &written.deleted);
        let finished = Finished {
            total: written.total as i64,
            bytes: written.bytes as i64,
            result: Some(&result),
        };
        match self.jobs.finish(task, worker, finished).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(TaskFailure::Abandoned),
            Err(error) => Err(failed(&error)),
        }
    }

    /// Deletes a job's files at once if the job failed, was cancelled or is gone: nobody will
    /// download them, and a full disk must not wait for the expiry to be freed. Run after
    /// every task, since a task of the job still running when it failed writes on.
    async fn clear_if_over(&self, job_id: &str, this_failed: bool) {
        let over = async {
            if this_failed {
                return Ok(true);
            }
            let conn = self.jobs.store().connection().await?;
            let job = sql::job(&conn, JobKind::Export, job_id).await?;
            let Some(job) = job.filter(|job| !job.cancelled) else {
                return Ok::<bool, crate::store::StoreError>(true);
            };
            let tasks = sql::tasks(&conn, &job.id).await?;
            Ok(tasks.iter().any(|t| t.status == "failed"))
        }
        .await;
        match over {
            Ok(true) => {
                self.remove_files(job_id).await;
                tracing::info!(
                    job = job_id,
                    "deleted the files of a failed or cancelled export"
                );
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "could not look at an export's state"),
        }
    }

    /// The specification of a task's job (`Abandoned` if the job is gone).
    pub(super) async fn spec_of(&self, task: &TaskRow) -> Result<ExportSpec, TaskFailure> {
        let conn = self
            .jobs
            .store()
            .connection()
            .await
            .map_err(|e| failed(&e))?;
        let job = sql::job(&conn, JobKind::Export, &task.job_id)
            .await
            .map_err(|e| failed(&e))?
            .ok_or(TaskFailure::Abandoned)?;
        serde_json::from_value(job.document).map_err(|e| failed(&e))
    }

    /// What the job's finished tasks wrote, against the job's bounds.
    async fn budget(&self, task: &TaskRow) -> Result<Budget, TaskFailure> {
        let conn = self
            .jobs
            .store()
            .connection()
            .await
            .map_err(|e| failed(&e))?;
        let (rows, bytes) = sql::job_output(&conn, &task.job_id)
            .await
            .map_err(|e| failed(&e))?;
        Ok(Budget {
            rows,
            bytes,
            bounds: self.settings.output,
        })
    }

    /// A type's files, then its deletions.
    async fn write_type(
        &self,
        spec: &ExportSpec,
        task: &TaskRow,
        progress: &Progress,
        report: &Report,
        budget: &Budget,
    ) -> Result<TaskOutput, TaskFailure> {
        let rt = ResourceType::parse(&task.resource_type)
            .ok_or_else(|| TaskFailure::Failed(format!("unknown type {}", task.resource_type)))?;
        let converter = self.formats.converter().await.map_err(|e| failed(&e))?;
        let filters = filters_of(spec, rt, &converter)?;
        let versions = if spec.include_history {
            Versions::Every
        } else {
            Versions::AtTime
        };
        let query = query_of(spec, rt, &filters, versions);
        let reader = self.reader(spec).await;
        let copy =
            crate::store::export::start(&reader, &query, source_of(spec), &self.settings.session)
                .await
                .map_err(|e| failed(&e))?;
        // The COPY and its conversion go on while a batch is written (8% of the task's
        // time was spent writing with nothing else going on, measured).
        let mut lines = read_ahead(fhir_lines(copy, rt, converter, report), LINES_AHEAD);
        let mut output = self.output(task, rt.name()).await?;
        let (mut total, mut bytes) = (0u64, 0u64);
        while let Some(batch) = lines.recv().await {
            let batch = batch.map_err(|e| failed(&e))?;
            let batch = if spec.elements.is_empty() {
                batch
            } else {
                let elements = spec.elements.clone();
                let name = rt.name();
                tokio::task::spawn_blocking(move || elements.subset_batch(name, &batch))
                    .await
                    .map_err(|e| failed(&e))?
                    .map_err(|e| failed(&e))?
            };
            total += output
                .write(&batch)
                .await
                .map_err(|e| self.write_failed(task, e))?;
            bytes += batch.len() as u64;
            count(progress, report, total, bytes, batch.len());
            budget.check(total, bytes)?;
        }
        let files = output
            .finish()
            .await
            .map_err(|e| self.write_failed(task, e))?;
        let deleted = self
            .write_deletions(spec, task, &format!("{}_deleted", rt.name()), &[rt])
            .await?;
        Ok(TaskOutput {
            files,
            deleted,
            total,
            bytes,
        })
    }

    /// With `_since`, the deletions of `types` since then, as Bundles in files of `stem`;
    /// with `_includeHistory`, every deletion (since `_since` if given).
    async fn write_deletions(
        &self,
        spec: &ExportSpec,
        task: &TaskRow,
        stem: &str,
        types: &[ResourceType],
    ) -> Result<Vec<Written>, TaskFailure> {
        let mut output = self.output(task, stem).await?;
        if spec.since.is_some() || spec.include_history {
            for rt in types {
                self.write_deleted(spec, *rt, &mut output, task).await?;
            }
        }
        output
            .finish()
            .await
            .map_err(|e| self.write_failed(task, e))
    }

    /// Appends a type's deletions since `_since` to `output`, as Bundles.
    async fn write_deleted(
        &self,
        spec: &ExportSpec,
        rt: ResourceType,
        output: &mut Output,
        task: &TaskRow,
    ) -> Result<(), TaskFailure> {
        let converter = self.formats.converter().await.map_err(|e| failed(&e))?;
        let filters = filters_of(spec, rt, &converter)?;
        let versions = if spec.include_history {
            Versions::EveryDeletion
        } else {
            Versions::Deleted
        };
        let query = query_of(spec, rt, &filters, versions);
        let reader = self.reader(spec).await;
        let copy =
            crate::store::export::start(&reader, &query, source_of(spec), &self.settings.session)
                .await
                .map_err(|e| failed(&e))?;
        let mut bundles = std::pin::pin!(deletion_bundles(copy, rt, spec.include_history));
        while let Some(batch) = bundles.next().await {
            let batch = batch.map_err(|e| failed(&e))?;
            output
                .write(&batch)
                .await
                .map_err(|e| self.write_failed(task, e))?;
        }
        Ok(())
    }

    /// The one task of an `organizeOutputBy=Patient` export: every type's rows in patient
    /// blocks, each opened by a `Parameters` header naming its Patient; then the deletions
    /// of every type.
    async fn write_blocks(
        &self,
        spec: &ExportSpec,
        task: &TaskRow,
        progress: &Progress,
        report: &Report,
        budget: &Budget,
    ) -> Result<TaskOutput, TaskFailure> {
        let types: Vec<ResourceType> = spec
            .types
            .iter()
            .filter_map(|name| ResourceType::parse(name))
            .collect();
        let converter = self.formats.converter().await.map_err(|e| failed(&e))?;
        let filters = types
            .iter()
            .map(|rt| filters_of(spec, *rt, &converter))
            .collect::<Result<Vec<_>, _>>()?;
        let queries: Vec<ExportQuery> = types
            .iter()
            .zip(&filters)
            .map(|(rt, filters)| query_of(spec, *rt, filters, Versions::AtTime))
            .collect();
        let reader = self.reader(spec).await;
        let copy = crate::store::export_blocks::start(
            &reader,
            &queries,
            source_of(spec),
            &self.settings.session,
        )
        .await
        .map_err(|e| failed(&e))?;
        let mut batches = std::pin::pin!(block_batches(copy, converter, spec, report.clone()));
        let mut output = self.output(task, BLOCKS_STEM).await?;
        let (mut total, mut bytes) = (0u64, 0u64);
        let mut current: Option<String> = None;
        while let Some(batch) = batches.next().await {
            let BlockBatch { lines, runs } = batch.map_err(|e| failed(&e))?;
            let mut at = 0;
            for (patient, end) in runs {
                if current.as_deref() != Some(patient.as_str()) {
                    output
                        .start_block()
                        .await
                        .map_err(|e| self.write_failed(task, e))?;
                    let header = json!({"resourceType": "Parameters", "parameter": [
                        {"name": "header", "valueReference": {"reference": format!("Patient/{patient}")}}
                    ]});
                    let header = format!("{header}\n");
                    output
                        .append_header(header.as_bytes())
                        .await
                        .map_err(|e| self.write_failed(task, e))?;
                    bytes += header.len() as u64;
                    current = Some(patient);
                }
                let part = &lines[at..end];
                total += output
                    .append(part)
                    .await
                    .map_err(|e| self.write_failed(task, e))?;
                bytes += part.len() as u64;
                at = end;
            }
            count(progress, report, total, bytes, lines.len());
            budget.check(total, bytes)?;
        }
        let files = output
            .finish()
            .await
            .map_err(|e| self.write_failed(task, e))?;
        let deleted = self.write_deletions(spec, task, "deleted", &types).await?;
        Ok(TaskOutput {
            files,
            deleted,
            total,
            bytes,
        })
    }

    async fn output(&self, task: &TaskRow, stem: &str) -> Result<Output, TaskFailure> {
        Output::create(
            &self.storage,
            &task.job_id,
            stem,
            task.attempts,
            self.settings.file_size,
        )
        .await
        .map_err(|e| self.write_failed(task, e))
    }

    /// The operator gets where; the client a message without the server's layout.
    pub(super) fn write_failed(&self, task: &TaskRow, error: io::Error) -> TaskFailure {
        tracing::error!(%error, job = %task.job_id, storage = %self.storage.describe(), "could not write export files");
        TaskFailure::Failed(format!(
            "could not write the export's files ({error}); the server log has the details"
        ))
    }
}

/// What a job's other tasks wrote before this one, and how much the job may write in all
/// (`--export-max-rows`, `--export-max-bytes`; tasks running at once in other workers are
/// not counted, so a job may pass its bound by what they write meanwhile).
pub(super) struct Budget {
    rows: u64,
    bytes: u64,
    bounds: crate::bulk::bounds::OutputBounds,
}

impl Budget {
    /// Fails the task once the job's output passes its bounds.
    pub(super) fn check(&self, rows: u64, bytes: u64) -> Result<(), TaskFailure> {
        match self.bounds.exceeded(self.rows + rows, self.bytes + bytes) {
            Some(why) => Err(TaskFailure::Failed(format!("the export stopped: {why}"))),
            None => Ok(()),
        }
    }
}

pub(super) fn failed(error: &dyn std::fmt::Display) -> TaskFailure {
    TaskFailure::Failed(error.to_string())
}

pub(super) fn count(progress: &Progress, report: &Report, total: u64, bytes: u64, batch: usize) {
    report.bytes(batch as u64);
    progress.rows.store(total, Ordering::Relaxed);
    progress.bytes.store(bytes, Ordering::Relaxed);
}

/// `rt`'s `_typeFilter`s with their search criteria compiled (each filter's into one
/// condition), for the Attributes in force.
fn filters_of(
    spec: &ExportSpec,
    rt: ResourceType,
    converter: &Converter,
) -> Result<Vec<Vec<Criterion>>, TaskFailure> {
    let attributes = converter.rules().for_type(rt.name());
    let base = spec
        .request
        .find("/fhir/")
        .map_or("", |at| &spec.request[..at + "/fhir".len()]);
    let mut compiled = Vec::new();
    for filter in spec.filters.get(rt.name()).into_iter().flatten() {
        let mut criteria = Vec::new();
        let mut pairs = Vec::new();
        for criterion in filter {
            match criterion {
                Criterion::Search { name, value } => pairs.push((name.clone(), value.clone())),
                other => criteria.push(other.clone()),
            }
        }
        if !pairs.is_empty() {
            let condition = crate::search::condition(rt, attributes, &pairs, "resource", base)
                .map_err(|e| TaskFailure::Failed(format!("_typeFilter: {e}")))?;
            criteria.push(Criterion::Compiled(condition));
        }
        compiled.push(criteria);
    }
    Ok(compiled)
}

/// What a task of `spec` reads of `rt`, with its compiled `filters`.
fn query_of<'a>(
    spec: &ExportSpec,
    rt: ResourceType,
    filters: &'a [Vec<Criterion>],
    versions: Versions,
) -> ExportQuery<'a> {
    let patients = match (&spec.level, &spec.patients) {
        (Level::System, _) => Patients::Any,
        (Level::Patient, None) => Patients::Every,
        _ => Patients::Listed,
    };
    ExportQuery {
        rt,
        at: spec.transaction_time,
        since: spec.since,
        until: spec.until,
        patients,
        filters,
        versions,
    }
}

impl Exports {
    /// The pool a task's statement reads from: a standby that has replayed past the kick-off,
    /// unless the statement needs temporary tables (patient lists, `_typeFilter` values),
    /// which a standby cannot create; the primary's otherwise.
    pub(super) async fn reader(&self, spec: &ExportSpec) -> crate::store::Store {
        let session_tables = spec.views.is_empty()
            && (spec.patients.is_some()
                || matches!(spec.level, Level::Group { .. })
                || spec.filters.values().any(|filters| !filters.is_empty()));
        let position = spec.position.filter(|_| !session_tables);
        self.readers.route(position, "$export").await.bulk
    }
}

fn source_of(spec: &ExportSpec) -> PatientSource<'_> {
    PatientSource {
        group: match &spec.level {
            Level::Group { id } => Some(id.as_str()),
            _ => None,
        },
        ids: spec.patients.as_deref(),
    }
}

/// Deletion rows -> Bundle lines of up to [`DELETIONS_PER_BUNDLE`] `DELETE` entries.
fn deletion_bundles(
    copy: CopyOut,
    rt: ResourceType,
    versioned: bool,
) -> impl Stream<Item = Result<Bytes, io::Error>> + Send {
    use crate::store::dump::fields;
    tuple_batches(copy, fields::COUNT, BATCH_BYTES).map(move |batch| {
        let batch = batch?;
        let mut out = Vec::new();
        for chunk in batch.chunks(DELETIONS_PER_BUNDLE) {
            let entries: Vec<serde_json::Value> = chunk
                .iter()
                .filter_map(|tuple| deletion_entry(tuple, rt, versioned))
                .collect();
            let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
            serde_json::to_writer(&mut out, &bundle).map_err(io::Error::other)?;
            out.push(b'\n');
        }
        Ok(out.into())
    })
}

/// A deletion as a transaction Bundle's entry: `DELETE Type/id`; `versioned`
/// (`_includeHistory`): with the deletion's version and time as a history Bundle gives them
/// (`response.etag` `W/"<versionId>"`, `response.lastModified`), so that it can be replayed
/// exactly.
fn deletion_entry(
    tuple: &crate::store::copy::Tuple,
    rt: ResourceType,
    versioned: bool,
) -> Option<serde_json::Value> {
    use crate::store::dump::fields;
    let id = tuple.text(fields::ID)?;
    let url = format!("{}/{}", rt.name(), String::from_utf8_lossy(id));
    let mut entry = json!({"request": {"method": "DELETE", "url": url}});
    if versioned {
        let mut at = Vec::new();
        crate::bulk::native_line::write_instant(&mut at, tuple.i64(fields::TS)?);
        entry["response"] = json!({
            "status": "200 OK",
            "etag": format!("W/\"{}\"", tuple.i64(fields::TXID)?),
            "lastModified": String::from_utf8_lossy(&at),
        });
    }
    Some(entry)
}

/// A batch of patient-block rows as FHIR lines, and where each patient's run of lines ends
/// (byte offsets into `lines`), in order.
struct BlockBatch {
    lines: Bytes,
    runs: Vec<(String, usize)>,
}

/// Block rows -> FHIR lines (one core per batch, order kept), with `_elements` applied.
fn block_batches(
    copy: CopyOut,
    converter: Converter,
    spec: &ExportSpec,
    report: Report,
) -> impl Stream<Item = Result<BlockBatch, io::Error>> + Send {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let elements = Arc::new(spec.elements.clone());
    tuple_batches(copy, block::COUNT, BATCH_BYTES)
        .map(move |batch| {
            let converter = converter.clone();
            let elements = elements.clone();
            let report = report.clone();
            async move {
                let batch = batch?;
                report.rows(batch.len() as u64);
                tokio::task::spawn_blocking(move || convert_blocks(&batch, &converter, &elements))
                    .await
                    .map_err(io::Error::other)?
            }
        })
        .buffered(workers)
}

/// Converts one batch of block rows, noting where each patient's run ends.
fn convert_blocks(
    batch: &[Tuple],
    converter: &Converter,
    elements: &super::elements::Elements,
) -> Result<BlockBatch, io::Error> {
    let bad =
        || io::Error::other("a stored row is not a resource (NULL column or non-object jsonb)");
    // Native lines of the whole batch, and each patient's run as a count of lines.
    let mut native = Vec::with_capacity(batch.len() * 1024);
    let mut runs: Vec<(String, usize)> = Vec::new();
    for tuple in batch {
        let patient = tuple.text(block::PATIENT).ok_or_else(bad)?;
        let type_name = std::str::from_utf8(tuple.text(block::TYPE).ok_or_else(bad)?)
            .map_err(io::Error::other)?;
        let row = Row {
            id: tuple.text(block::ID).ok_or_else(bad)?,
            txid: tuple.i64(block::TXID).ok_or_else(bad)?,
            cts: tuple.i64(block::CTS).ok_or_else(bad)?,
            ts: tuple.i64(block::TS).ok_or_else(bad)?,
            resource: tuple.jsonb(block::RESOURCE).ok_or_else(bad)?,
        };
        if !write_native_line(&mut native, type_name, &row) {
            return Err(bad());
        }
        let patient = String::from_utf8_lossy(patient);
        match runs.last_mut() {
            Some((last, lines)) if *last == patient => *lines += 1,
            _ => runs.push((patient.into_owned(), 1)),
        }
    }
    // One line out for each line in, so the runs carry over by counting lines.
    let mut fhir = convert_batch(&native, converter)?;
    if !elements.is_empty() {
        fhir = subset_mixed(&fhir, elements)?;
    }
    let mut ends = fhir
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(at, _)| at + 1);
    let mut byte_runs = Vec::with_capacity(runs.len());
    for (patient, lines) in runs {
        let end = ends.nth(lines - 1).ok_or_else(bad)?;
        byte_runs.push((patient, end));
    }
    Ok(BlockBatch {
        lines: fhir,
        runs: byte_runs,
    })
}

/// `_elements` on lines of several types, one line at a time (each by its own type).
fn subset_mixed(lines: &[u8], elements: &super::elements::Elements) -> Result<Bytes, io::Error> {
    let mut out = Vec::with_capacity(lines.len());
    for line in lines.split_inclusive(|b| *b == b'\n') {
        let type_name = serde_json::from_slice::<serde_json::Value>(line)
            .map_err(io::Error::other)?["resourceType"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        out.extend_from_slice(&elements.subset_batch(&type_name, line)?);
    }
    Ok(out.into())
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
            let outcome = self.export_task(task, worker, &progress, &report).await;
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
            let failed = matches!(outcome, Err(TaskFailure::Failed(_)));
            self.clear_if_over(&task.job_id, failed).await;
            outcome
        })
    }
}
