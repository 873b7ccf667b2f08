//! `$load`: NDJSON(.gz) from a URL into the database, atomically, at COPY speed, in bounded
//! memory.
//!
//! Pipeline: source ([`super::source`]) -> gunzip and line batches ([`super::lines`]) ->
//! each batch prepared on a blocking thread, one per core, order kept ([`super::prepare`]) ->
//! the [`Writer`], which routes each row:
//!
//! - every row goes straight into its table by binary COPY. For tables that had rows when the
//!   load began, each batch first deletes the current versions of its ids (moving them to
//!   history with `update: true`) in the load's own transaction, keeping their creation time
//!   for the new versions: replacing costs a delete, not a staging table and an upsert;
//! - an id that repeats within the load (a fixed-size Bloom filter; a false positive just
//!   takes the slow path) goes to a staging table, applied at the end by an upsert in which
//!   the last line wins.
//!
//! Rows are buffered per type and sent as one COPY statement per buffer, so a file that mixes
//! types needs no connection per type, and the buffers bound the memory. Everything happens in
//! one transaction: any error (a bad line, a broken download, a truncated gzip, a client that
//! goes away) leaves the database as it was, because the connection is discarded and
//! PostgreSQL rolls the transaction back.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;

use super::lines::{LineBatch, LineReader, LinesError};
use super::prepare::{LineRules, Prepared};
use super::report::{Outcome, Report};
use super::source::{SourceError, Sources};
use crate::resource_type::ResourceType;
use crate::store::copy::{TupleWriter, PG_EPOCH_MICROS};
use crate::store::load::LoadTx;
pub use crate::store::load::{BeforeCommit, LoadCounts};
use crate::store::{Store, StoreError};

/// Bytes of NDJSON per prepared batch.
const BATCH_BYTES: usize = 1 << 20;

/// Buffered COPY data, all types together, before it is sent: enough to make each COPY
/// statement's overhead vanish, small enough to keep the server's memory flat.
const FLUSH_BYTES: usize = 4 << 20;

/// Rows buffered before they are sent, whatever their size: small resources into a table with
/// slow index upkeep (Patient's birthdate ranges: 10,000 rows/s) would otherwise make one
/// COPY of 4 MB last seconds, and a job's progress, counted as COPYs end, move in steps that
/// long.
const FLUSH_ROWS: usize = 8192;

/// Prepared batches that may wait for the writer (each about [`BATCH_BYTES`] of input).
const PREPARED_AHEAD: usize = 8;

/// Ids per delete of replaced versions.
const DELETE_CHUNK: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{0}")]
    Read(String),
    #[error("line {line}: {message}")]
    Line { line: u64, message: String },
    /// A line the subject may not load.
    #[error("line {line}: {message}")]
    Forbidden { line: u64, message: String },
    #[error("resources were written by someone else during the load: {0}")]
    Conflict(String),
    #[error("PostgreSQL refused the data: {0}")]
    Rejected(String),
    #[error("the load was abandoned (its job was cancelled or taken over)")]
    Abandoned,
    #[error(transparent)]
    Store(StoreError),
    /// A statement of the load failed: what it was doing, and PostgreSQL's reason.
    #[error("while {doing}: {error}")]
    Statement { doing: String, error: StoreError },
}

impl LoadError {
    /// A database error of one step of the load, said with the step (`copying rows into
    /// Observation`) unless it is about the data (a conflict, a value PostgreSQL refused).
    pub(super) fn during(doing: impl Into<String>) -> impl FnOnce(StoreError) -> LoadError {
        let doing = doing.into();
        move |error| match LoadError::from(error) {
            LoadError::Store(error) if !error.is_unavailable() => {
                LoadError::Statement { doing, error }
            }
            other => other,
        }
    }
}

impl From<LinesError> for LoadError {
    fn from(error: LinesError) -> LoadError {
        match error {
            LinesError::Source(source) => LoadError::Source(source),
            other => LoadError::Read(other.to_string()),
        }
    }
}

impl From<StoreError> for LoadError {
    fn from(error: StoreError) -> LoadError {
        let db = match &error {
            StoreError::Db(db) => db.as_db_error(),
            _ => None,
        };
        match db {
            Some(db) if db.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION => {
                LoadError::Conflict(db.detail().unwrap_or(db.message()).to_string())
            }
            Some(db) if db.code().code().starts_with("22") => {
                LoadError::Rejected(db.message().to_string())
            }
            _ => LoadError::Store(error),
        }
    }
}

/// A load: where from, how to read the lines, whether to keep replaced versions.
pub struct LoadRequest {
    pub source: String,
    /// Who reads the source (which buckets it may read).
    pub reader: super::source::Reader,
    pub rules: LineRules,
    /// Keep each replaced version in history (`update: true`); off by default, for speed.
    pub keep_history: bool,
}

/// Runs a load to the end. Nothing is written unless everything is.
pub async fn load(
    store: &Store,
    sources: &Sources,
    request: LoadRequest,
) -> Result<LoadCounts, LoadError> {
    load_tracked(store, sources, request, Arc::default(), None).await
}

/// Writes a load's outcome into its report: the bytes read, the rows loaded, how it ended.
pub fn account(report: &Report, progress: &Progress, loaded: &Result<LoadCounts, LoadError>) {
    report.bytes(progress.bytes.load(Ordering::Relaxed));
    match loaded {
        Ok(counts) => {
            report.rows(counts.values().sum());
            report.finish(Outcome::Finished, None);
        }
        Err(LoadError::Abandoned) => report.finish(Outcome::Abandoned, None),
        Err(error) => report.finish(Outcome::Failed, Some(&error.to_string())),
    }
}

/// How far a load got: rows written so far, bytes read from the source so far, and the
/// source's length (0: unknown).
#[derive(Debug, Default)]
pub struct Progress {
    pub rows: AtomicU64,
    pub bytes: AtomicU64,
    pub size: AtomicU64,
}

/// [`load`], counting into `progress` as it goes, and running `before_commit` last.
pub async fn load_tracked(
    store: &Store,
    sources: &Sources,
    request: LoadRequest,
    progress: Arc<Progress>,
    before_commit: Option<BeforeCommit>,
) -> Result<LoadCounts, LoadError> {
    let counted = progress.clone();
    let opened = sources.open(&request.source, request.reader).await?;
    progress
        .size
        .store(opened.size.unwrap_or(0), Ordering::Relaxed);
    let source = opened.stream.inspect(move |chunk| {
        if let Ok(bytes) = chunk {
            counted
                .bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
    });
    let source: super::source::SourceStream = Box::pin(source);
    let reader = LineReader::new(source, BATCH_BYTES, sources.max_line_bytes()).await?;
    let single_type = request.rules.only_type.is_some();
    let mut writer =
        Writer::begin(store, request.keep_history, single_type, progress.clone()).await?;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rules = request.rules;
    let batches = futures_util::StreamExt::map(reader.into_batches(), |batch| {
        batch.map_err(LoadError::from)
    });
    let prepared = batches
        .map(move |batch: Result<LineBatch, LoadError>| {
            let rules = rules.clone();
            async move {
                let batch = batch?;
                tokio::task::spawn_blocking(move || prepare_batch(&batch, &rules))
                    .await
                    .map_err(|e| LoadError::Read(e.to_string()))?
            }
        })
        .buffered(workers);
    // Reading and preparing run in a task of their own, so they go on while the writer waits
    // for PostgreSQL to take a COPY; the channel bounds how far ahead they get. The task ends
    // when the stream does, or as soon as the writer is gone (the load failed, or its request
    // went away): then it stops reading the source at once, even in the middle of a line.
    let mut receiver = super::stream::read_ahead(prepared, PREPARED_AHEAD);
    while let Some(batch) = receiver.recv().await {
        writer.add(batch?).await?;
    }
    writer.finish(before_commit).await
}

fn prepare_batch(batch: &LineBatch, rules: &LineRules) -> Result<Vec<(u64, Prepared)>, LoadError> {
    batch
        .lines()
        .map(|(line, text)| {
            rules
                .check_format(line, text)
                .and_then(|()| rules.prepare(text))
                .map(|prepared| (line, prepared))
                .map_err(|e| match e.forbidden {
                    true => LoadError::Forbidden {
                        line,
                        message: e.message,
                    },
                    false => LoadError::Line {
                        line,
                        message: e.message,
                    },
                })
        })
        .collect()
}

/// The COPY data waiting for one type.
struct TypeBuffers {
    direct: TupleWriter,
    direct_rows: u64,
    stage: TupleWriter,
    stage_rows: u64,
    /// The table had rows when the load began: the versions a batch replaces must go first.
    had_rows: bool,
    /// A staging table exists for it in this transaction.
    staging: bool,
}

/// Buffers prepared rows and writes them in the load's one transaction (rolled back unless
/// the load commits: dropping the writer drops the transaction).
struct Writer {
    tx: LoadTx,
    keep_history: bool,
    /// Rows count here once their COPY is sent.
    progress: Arc<Progress>,
    buffered_rows: usize,
    buffers: HashMap<ResourceType, TypeBuffers>,
    buffered: usize,
    seen: IdFilter,
    counts: LoadCounts,
    /// Types whose compartment index is dropped until the end of the load (they were empty).
    suspended_indexes: Vec<ResourceType>,
    /// The load writes one type only (an `$import` input, `/[type]/$load`).
    single_type: bool,
}

impl Writer {
    async fn begin(
        store: &Store,
        keep_history: bool,
        single_type: bool,
        progress: Arc<Progress>,
    ) -> Result<Writer, LoadError> {
        Ok(Writer {
            tx: LoadTx::begin(store).await?,
            keep_history,
            progress,
            buffered_rows: 0,
            single_type,
            buffers: HashMap::new(),
            buffered: 0,
            seen: IdFilter::new(),
            counts: LoadCounts::new(),
            suspended_indexes: Vec::new(),
        })
    }

    async fn add(&mut self, rows: Vec<(u64, Prepared)>) -> Result<(), LoadError> {
        // Repeats within the load go to staging; the others are copied. Decide first, so the
        // versions the copied rows replace can be deleted before they are sent.
        let mut repeated = Vec::with_capacity(rows.len());
        let mut by_type: HashMap<ResourceType, Vec<&str>> = HashMap::new();
        for (_, row) in &rows {
            let repeat = self
                .seen
                .check_and_insert(row.resource_type.name(), &row.id);
            repeated.push(repeat);
            if !repeat {
                by_type.entry(row.resource_type).or_default().push(&row.id);
            }
        }
        let mut replaced: HashMap<ResourceType, HashMap<String, chrono::DateTime<chrono::Utc>>> =
            HashMap::new();
        for (rt, ids) in by_type {
            if !self.buffers.contains_key(&rt) {
                let mut had_rows = !self
                    .tx
                    .is_empty(rt)
                    .await
                    .map_err(LoadError::during(format!("reading whether {rt} is empty")))?;
                let suspended = !had_rows
                    && self.tx.suspend_index(rt, self.single_type).await.map_err(
                        LoadError::during(format!("dropping {rt}'s compartment index")),
                    )?;
                if suspended {
                    self.suspended_indexes.push(rt);
                    // Rows committed before the drop got its lock are visible now.
                    had_rows = !self
                        .tx
                        .is_empty(rt)
                        .await
                        .map_err(LoadError::during(format!("reading whether {rt} is empty")))?;
                }
                let buffers = TypeBuffers {
                    direct: TupleWriter::new(),
                    direct_rows: 0,
                    stage: TupleWriter::new(),
                    stage_rows: 0,
                    had_rows,
                    staging: false,
                };
                self.buffers.insert(rt, buffers);
            }
            if self.buffers[&rt].had_rows {
                let mut found = HashMap::new();
                for chunk in ids.chunks(DELETE_CHUNK) {
                    found.extend(
                        self.tx
                            .take_existing(rt, chunk, self.keep_history)
                            .await
                            .map_err(LoadError::during(format!(
                                "replacing existing {rt} resources"
                            )))?,
                    );
                }
                replaced.insert(rt, found);
            }
        }
        for ((line, row), repeat) in rows.into_iter().zip(repeated) {
            let rt = row.resource_type;
            let created_at = replaced.get(&rt).and_then(|found| found.get(&row.id));
            let buffers = self.buffers.get_mut(&rt).expect("created above");
            let before = buffers.direct.len() + buffers.stage.len();
            if repeat {
                buffers.stage.start_tuple(3);
                buffers.stage.text(row.id.as_bytes());
                buffers.stage.i64(line as i64);
                buffers.stage.jsonb(&row.body);
                buffers.stage_rows += 1;
            } else {
                let (cts, status): (i64, &[u8]) = match created_at {
                    Some(at) => (at.timestamp_micros() - PG_EPOCH_MICROS, b"updated"),
                    None => (self.tx.now(), b"created"),
                };
                buffers.direct.start_tuple(6);
                buffers.direct.text(row.id.as_bytes());
                buffers.direct.i64(cts);
                buffers.direct.i64(self.tx.now());
                buffers.direct.text(rt.name().as_bytes());
                buffers.direct.text(status);
                buffers.direct.jsonb(&row.body);
                buffers.direct_rows += 1;
            }
            self.buffered += buffers.direct.len() + buffers.stage.len() - before;
            self.buffered_rows += 1;
            *self.counts.entry(rt.name()).or_default() += 1;
            if self.buffered >= FLUSH_BYTES || self.buffered_rows >= FLUSH_ROWS {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// Sends every buffer as COPY statements.
    async fn flush(&mut self) -> Result<(), LoadError> {
        let types: Vec<ResourceType> = self.buffers.keys().copied().collect();
        for rt in types {
            let (direct, stage, needs_stage) = {
                let buffers = self.buffers.get_mut(&rt).expect("present");
                let direct = (buffers.direct_rows > 0).then(|| buffers.direct.finish_and_restart());
                let stage = (buffers.stage_rows > 0).then(|| buffers.stage.finish_and_restart());
                buffers.direct_rows = 0;
                buffers.stage_rows = 0;
                let needs_stage = stage.is_some() && !buffers.staging;
                if needs_stage {
                    buffers.staging = true;
                }
                (direct, stage, needs_stage)
            };
            if let Some(data) = direct {
                self.tx
                    .copy_rows(rt, data)
                    .await
                    .map_err(LoadError::during(format!("copying rows into {rt}")))?;
            }
            if let Some(data) = stage {
                self.tx
                    .copy_staged(rt, data, needs_stage)
                    .await
                    .map_err(LoadError::during(format!("staging repeated {rt} ids")))?;
            }
        }
        self.buffered = 0;
        let sent = std::mem::take(&mut self.buffered_rows) as u64;
        self.progress.rows.fetch_add(sent, Ordering::Relaxed);
        Ok(())
    }

    /// Sends what is left, applies the staged rows and commits.
    async fn finish(
        mut self,
        before_commit: Option<BeforeCommit>,
    ) -> Result<LoadCounts, LoadError> {
        self.flush().await?;
        let staged: Vec<ResourceType> = self
            .buffers
            .iter()
            .filter(|(_, b)| b.staging)
            .map(|(rt, _)| *rt)
            .collect();
        for rt in staged {
            self.tx
                .apply_stage(rt, self.keep_history)
                .await
                .map_err(LoadError::during(format!("writing repeated {rt} ids")))?;
        }
        for rt in std::mem::take(&mut self.suspended_indexes) {
            self.tx
                .restore_index(rt)
                .await
                .map_err(LoadError::during(format!(
                    "building {rt}'s compartment index"
                )))?;
        }
        let counts = std::mem::take(&mut self.counts);
        let committed = self
            .tx
            .commit(&counts, before_commit)
            .await
            .map_err(LoadError::during("committing"))?;
        if !committed {
            return Err(LoadError::Abandoned);
        }
        Ok(counts)
    }
}

/// A Bloom filter over (type, id): has this id been loaded before in this load? Fixed size,
/// so memory stays bounded whatever the file size; a false "yes" only sends a row the slow
/// (staging) way, never loses it. 2^26 bits (8 MiB), three hashes: about 1 false positive in
/// 10,000 rows at a million ids.
struct IdFilter {
    bits: Vec<u64>,
    hasher: std::collections::hash_map::RandomState,
}

impl IdFilter {
    const BITS: u64 = 1 << 26;

    fn new() -> IdFilter {
        IdFilter {
            bits: vec![0; (Self::BITS / 64) as usize],
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Whether (type, id) may have been inserted before; inserts it.
    fn check_and_insert(&mut self, resource_type: &str, id: &str) -> bool {
        let hash = self.hasher.hash_one((resource_type, id));
        let (h1, h2) = (hash & 0xffff_ffff, hash >> 32);
        let mut present = true;
        for i in 0..3u64 {
            let bit = h1.wrapping_add(i.wrapping_mul(h2)) % Self::BITS;
            let (word, mask) = ((bit / 64) as usize, 1u64 << (bit % 64));
            present &= self.bits[word] & mask != 0;
            self.bits[word] |= mask;
        }
        present
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_never_forgets_and_rarely_imagines() {
        let mut filter = IdFilter::new();
        let mut false_positives = 0;
        for i in 0..200_000 {
            if filter.check_and_insert("Patient", &format!("id-{i}")) {
                false_positives += 1;
            }
        }
        assert!(false_positives < 20, "{false_positives}");
        for i in (0..200_000).step_by(997) {
            assert!(filter.check_and_insert("Patient", &format!("id-{i}")));
        }
        assert!(!filter.check_and_insert("Observation", "id-0") || false_positives > 0);
    }
}
