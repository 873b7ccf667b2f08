//! `$dump`: every current resource of a type as NDJSON, streamed from a binary COPY.
//!
//! The pipeline, pulled by the HTTP body (so a slow client slows the COPY, see
//! [`crate::store::copy_out`]):
//!
//! 1. COPY -> batches of tuples of about [`BATCH_BYTES`] ([`super::stream::tuple_batches`])
//!    -> native lines ([`native_line`]);
//! 2. with `fhir`, each batch is converted on a blocking thread, up to one batch per core at a
//!    time, and the batches leave in their original order.
//!
//! (gzip, when asked for, is the HTTP layer's.) Memory is bounded by the batches in flight,
//! whatever the table size. An error after the first byte ends the stream with an error,
//! which the HTTP layer turns into an aborted chunked body: the client sees a failed
//! transfer, never a clean but short file.

use std::io;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt};

use super::native_line::{write_native_line, Row};
use super::report::Report;
use super::stream::{tuple_batches, ByteStream, Tuple};
use crate::format::Converter;
use crate::resource_type::ResourceType;
use crate::store::copy_out::CopyOut;
use crate::store::dump::{current_versions, fields};
use crate::store::{Store, StoreError};

/// Target size of one batch: big enough that per-batch costs vanish, small enough that a few
/// in flight stay a few megabytes.
const BATCH_BYTES: usize = 256 * 1024;

/// What to dump and how.
pub struct DumpOptions {
    /// Only resources created after this instant.
    pub since: Option<DateTime<Utc>>,
    /// Convert to FHIR with these rules.
    pub fhir: Option<Converter>,
}

/// Starts a dump, counting its rows into `report`. Errors before the first row (the database
/// unreachable) come back here.
pub async fn dump(
    store: &Store,
    rt: ResourceType,
    options: DumpOptions,
    report: &Report,
) -> Result<ByteStream, StoreError> {
    let copy = current_versions(store, rt, options.since.as_ref()).await?;
    Ok(match options.fhir {
        None => Box::pin(native_lines(copy, rt, report.clone())),
        Some(converter) => fhir_lines(copy, rt, converter, report),
    })
}

/// The FHIR NDJSON lines of a COPY of tuples in the dump's shape ([`fields`]), in batches of
/// whole lines: `$export` writes its files from this.
pub fn fhir_lines(
    copy: CopyOut,
    rt: ResourceType,
    converter: Converter,
    report: &Report,
) -> ByteStream {
    Box::pin(to_fhir_in_parallel(
        native_lines(copy, rt, report.clone()),
        converter,
    ))
}

/// Stage 1: native lines, in batches.
fn native_lines(
    copy: CopyOut,
    rt: ResourceType,
    report: Report,
) -> impl Stream<Item = Result<Bytes, io::Error>> + Send {
    let resource_type = rt.name();
    tuple_batches(copy, fields::COUNT, BATCH_BYTES).map(move |batch| {
        let batch = batch?;
        report.rows(batch.len() as u64);
        let mut out = Vec::with_capacity(BATCH_BYTES + BATCH_BYTES / 4);
        for tuple in &batch {
            let written =
                row(tuple).is_some_and(|row| write_native_line(&mut out, resource_type, &row));
            if !written {
                return Err(io::Error::other(
                    "a stored row is not a resource (NULL column or non-object jsonb)",
                ));
            }
        }
        Ok(out.into())
    })
}

/// A tuple's fields; `None` if one is NULL.
fn row(tuple: &Tuple) -> Option<Row<'_>> {
    Some(Row {
        id: tuple.text(fields::ID)?,
        txid: tuple.i64(fields::TXID)?,
        cts: tuple.i64(fields::CTS)?,
        ts: tuple.i64(fields::TS)?,
        resource: tuple.jsonb(fields::RESOURCE)?,
    })
}

/// Stage 2: native batches -> FHIR batches, one core each, order kept.
fn to_fhir_in_parallel(
    native: impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static,
    converter: Converter,
) -> impl Stream<Item = Result<Bytes, io::Error>> + Send {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    native
        .map(move |batch| {
            let converter = converter.clone();
            async move {
                let batch = batch?;
                tokio::task::spawn_blocking(move || convert_batch(&batch, &converter))
                    .await
                    .map_err(io::Error::other)?
            }
        })
        .buffered(workers)
}

/// Converts a batch of native lines to FHIR lines.
pub fn convert_batch(batch: &[u8], converter: &Converter) -> Result<Bytes, io::Error> {
    let mut out = Vec::with_capacity(batch.len());
    for line in batch.split(|b| *b == b'\n').filter(|line| !line.is_empty()) {
        converter
            .to_fhir_text(line, &mut out)
            .map_err(io::Error::other)?;
        out.push(b'\n');
    }
    Ok(out.into())
}
