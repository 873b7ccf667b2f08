//! A migration-mode import input or load (`mode: migration` in the `$import` or `$load`
//! body): each line is a version that keeps its `meta.versionId` and `meta.lastUpdated`, in
//! any order and split across inputs as an `_includeHistory` export writes them; an input of
//! type `Bundle` (or a mixed `$load`) holds the export's `deleted` Bundles, whose DELETE
//! entries (with `response.etag` and `response.lastModified`) are tombstones at their
//! versions and times. The versions go to a staging table by binary COPY and are merged at
//! the end of the input, in its transaction (`store::migrate`): nothing is written unless
//! everything is.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::lines::{LineBatch, LineReader};
use super::load::{BeforeCommit, LoadCounts, LoadError, LoadRequest, Progress};
use super::prepare::LineRules;
use super::source::Sources;
use crate::resource_type::ResourceType;
use crate::store::copy::TupleWriter;
use crate::store::load::LoadTx;
use crate::store::migrate::{self, pg_micros};
use crate::store::Store;

/// Bytes of NDJSON read per batch.
const BATCH_BYTES: usize = 1 << 20;

/// Batches turned into versions that may wait for the COPY into the staging table.
const PREPARED_AHEAD: usize = 8;

/// One version to store.
struct Version {
    line: u64,
    resource_type: ResourceType,
    id: String,
    txid: i64,
    ts: DateTime<Utc>,
    deleted: bool,
    /// The body to store (a deletion's is taken from the version before it).
    body: Vec<u8>,
}

/// Runs one input in migration mode, counting into `progress`, running `before_commit` last.
pub async fn migrate_tracked(
    store: &Store,
    sources: &Sources,
    request: LoadRequest,
    progress: Arc<Progress>,
    before_commit: Option<BeforeCommit>,
) -> Result<LoadCounts, LoadError> {
    let opened = sources.open(&request.source, request.reader).await?;
    progress
        .size
        .store(opened.size.unwrap_or(0), Ordering::Relaxed);
    let counted = progress.clone();
    let source: super::source::SourceStream = Box::pin(futures_util::StreamExt::inspect(
        opened.stream,
        move |chunk| {
            if let Ok(bytes) = chunk {
                counted
                    .bytes
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
        },
    ));
    let reader = LineReader::new(source, BATCH_BYTES, sources.max_line_bytes()).await?;
    let tx = LoadTx::begin(store).await?;
    migrate::create_stage(&tx)
        .await
        .map_err(LoadError::during("creating the staging table"))?;
    // As a load does: batches read and turned into versions on blocking threads, one per
    // core, order kept, ahead of the COPY into the staging table.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rules = request.rules;
    let batches = futures_util::StreamExt::map(reader.into_batches(), |batch| {
        batch.map_err(LoadError::from)
    });
    let staged = futures_util::StreamExt::buffered(
        futures_util::StreamExt::map(batches, move |batch: Result<LineBatch, LoadError>| {
            let rules = rules.clone();
            async move {
                let batch = batch?;
                tokio::task::spawn_blocking(move || {
                    let versions = versions_of(&batch, &rules)?;
                    let mut writer = TupleWriter::new();
                    let mut types = Vec::new();
                    for version in &versions {
                        if !types.contains(&version.resource_type) {
                            types.push(version.resource_type);
                        }
                        write_version(&mut writer, version);
                    }
                    Ok::<_, LoadError>((writer.finish(), versions.len(), types))
                })
                .await
                .map_err(|e| LoadError::Read(e.to_string()))?
            }
        }),
        workers,
    );
    let mut receiver = super::stream::read_ahead(staged, PREPARED_AHEAD);
    let mut types: Vec<ResourceType> = Vec::new();
    while let Some(batch) = receiver.recv().await {
        let (data, rows, batch_types) = batch?;
        for rt in batch_types {
            if !types.contains(&rt) {
                types.push(rt);
            }
        }
        migrate::copy_stage(&tx, data)
            .await
            .map_err(LoadError::during("staging versions"))?;
        progress.rows.fetch_add(rows as u64, Ordering::Relaxed);
    }
    let mut counts = LoadCounts::new();
    for rt in types {
        match migrate::merge(&tx, rt)
            .await
            .map_err(LoadError::during(format!("merging {rt}'s versions")))?
        {
            Ok(written) => {
                counts.insert(rt.name(), written);
            }
            Err(conflict) => {
                return Err(LoadError::Line {
                    line: conflict.line as u64,
                    message: format!(
                        "{rt}/{} version {} is stored already with other content \
                         (a version is never changed; the same content again is skipped)",
                        conflict.id, conflict.version
                    ),
                })
            }
        }
    }
    if !tx
        .commit(&counts, before_commit)
        .await
        .map_err(LoadError::during("committing"))?
    {
        return Err(LoadError::Abandoned);
    }
    Ok(counts)
}

fn write_version(writer: &mut TupleWriter, version: &Version) {
    writer.start_tuple(7);
    writer.i64(version.line as i64);
    writer.text(version.resource_type.name().as_bytes());
    writer.text(version.id.as_bytes());
    writer.i64(version.txid);
    writer.i64(pg_micros(&version.ts));
    writer.text(if version.deleted {
        b"deleted"
    } else {
        b"updated"
    });
    writer.jsonb(&version.body);
}

/// The versions of a batch's lines.
fn versions_of(batch: &LineBatch, rules: &LineRules) -> Result<Vec<Version>, LoadError> {
    let mut versions = Vec::new();
    for (line, text) in batch.lines() {
        let fail = |message: String| LoadError::Line { line, message };
        let doc: Value = serde_json::from_slice(text)
            .map_err(|e| fail(format!("malformed JSON at column {}: {e}", e.column())))?;
        // An `$import` input of type Bundle, or any line of a mixed `$load`: an export's
        // deletions file may be among them (a transaction Bundle of DELETE entries only is
        // read so, never stored, in migration mode).
        if rules.only_type.is_none_or(|rt| rt.name() == "Bundle") && is_tombstones(&doc) {
            tombstones(&doc, line, &mut versions).map_err(fail)?;
            continue;
        }
        let prepared = rules.prepare(text).map_err(|e| fail(e.message))?;
        let (txid, ts) = stamp(&doc["meta"]).map_err(fail)?;
        versions.push(Version {
            line,
            resource_type: prepared.resource_type,
            id: prepared.id,
            txid,
            ts,
            deleted: false,
            body: prepared.body,
        });
    }
    Ok(versions)
}

/// A version's `meta.versionId` (a number: fhirbox's versions are) and `meta.lastUpdated`.
fn stamp(meta: &Value) -> Result<(i64, DateTime<Utc>), String> {
    let txid = match &meta["versionId"] {
        Value::String(text) => text.parse::<i64>().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
    .filter(|v| *v > 0)
    .ok_or_else(|| {
        format!(
            "meta.versionId is {}: migration mode keeps each version's number, so every line \
             needs a positive whole number there",
            meta["versionId"]
        )
    })?;
    let ts = meta["lastUpdated"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .ok_or_else(|| {
            format!(
                "meta.lastUpdated is {}: migration mode keeps each version's time, so every \
                 line needs an instant there",
                meta["lastUpdated"]
            )
        })?;
    Ok((txid, ts))
}

/// Whether a Bundle line is an export's deletions: a transaction of DELETE entries only.
fn is_tombstones(doc: &Value) -> bool {
    doc["resourceType"] == "Bundle"
        && doc["type"] == "transaction"
        && doc["entry"]
            .as_array()
            .is_some_and(|entries| entries.iter().all(|e| e["request"]["method"] == "DELETE"))
}

/// The tombstones of a deletions Bundle: each entry's `Type/id`, and its deletion's version
/// (`response.etag`, `W/"<versionId>"`) and time (`response.lastModified`).
fn tombstones(doc: &Value, line: u64, versions: &mut Vec<Version>) -> Result<(), String> {
    for (index, entry) in doc["entry"].as_array().into_iter().flatten().enumerate() {
        let at = |what: &str| format!("entry[{index}]: {what}");
        let url = entry["request"]["url"].as_str().unwrap_or_default();
        let (type_name, id) = url
            .split_once('/')
            .ok_or_else(|| at(&format!("request.url '{url}' is not Type/id")))?;
        let resource_type = ResourceType::parse(type_name)
            .filter(|rt| rt.is_fhir())
            .ok_or_else(|| at(&format!("'{type_name}' is not a FHIR R4 resource type")))?;
        if !crate::resource::is_valid_id(id) {
            return Err(at(&format!("'{id}' is not a valid id")));
        }
        let version = entry["response"]["etag"].as_str().and_then(|etag| {
            etag.trim_start_matches("W/")
                .trim_matches('"')
                .parse::<i64>()
                .ok()
        });
        let mut meta = serde_json::Map::new();
        meta.insert("versionId".into(), version.map_or(Value::Null, Value::from));
        meta.insert(
            "lastUpdated".into(),
            entry["response"]["lastModified"].clone(),
        );
        let (txid, ts) = stamp(&Value::Object(meta)).map_err(|e| {
            at(&format!(
                "a deletion needs response.etag W/\"<versionId>\" and response.lastModified ({e})"
            ))
        })?;
        versions.push(Version {
            line,
            resource_type,
            id: id.to_string(),
            txid,
            ts,
            deleted: true,
            body: b"{}".to_vec(),
        });
    }
    Ok(())
}
