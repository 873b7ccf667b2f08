//! `$dump`: every current resource of a type as NDJSON, streamed from a binary COPY.
//!
//! The pipeline, pulled by the HTTP body (so a slow client slows the COPY, see
//! [`crate::store::copy_out`]):
//!
//! 1. COPY chunks -> tuples -> native lines ([`native_line`]), gathered in batches of about
//!    [`BATCH_BYTES`];
//! 2. with `fhir`, each batch is converted on a blocking thread, up to one batch per core at a
//!    time, and the batches leave in their original order;
//! 3. with `gzip`, one gzip member over the whole body ([`super::gzip`]).
//!
//! Memory is bounded by the batches in flight, whatever the table size. An error after the
//! first byte ends the stream with an error, which the HTTP layer turns into an aborted
//! chunked body: the client sees a failed transfer, never a clean but short file.

use std::io;
use std::pin::Pin;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt};

use super::native_line::{write_native_line, Row};
use crate::format::Converter;
use crate::resource_type::ResourceType;
use crate::store::copy::TupleReader;
use crate::store::copy_out::CopyOut;
use crate::store::dump::{current_versions, fields};
use crate::store::{Store, StoreError};

/// Target size of one batch of lines: big enough that per-batch costs vanish, small enough
/// that a few in flight stay a few megabytes.
const BATCH_BYTES: usize = 256 * 1024;

/// A body stream, as the HTTP layer takes it.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + Send>>;

/// What to dump and how.
pub struct DumpOptions {
    /// Only resources created after this instant.
    pub since: Option<DateTime<Utc>>,
    /// Convert to FHIR with these rules.
    pub fhir: Option<Converter>,
    pub gzip: bool,
}

/// Starts a dump. Errors before the first row (the database unreachable) come back here.
pub async fn dump(
    store: &Store,
    rt: ResourceType,
    options: DumpOptions,
) -> Result<ByteStream, StoreError> {
    let copy = current_versions(store, rt, options.since.as_ref()).await?;
    let native = native_batches(copy, rt);
    let body: ByteStream = match options.fhir {
        None => Box::pin(native),
        Some(converter) => Box::pin(to_fhir_in_parallel(native, converter)),
    };
    Ok(if options.gzip {
        super::gzip::gzip(body)
    } else {
        body
    })
}

/// The FHIR NDJSON lines of a COPY of tuples in the dump's shape ([`fields`]), in batches of
/// whole lines: `$export` writes its files from this.
pub fn fhir_lines(copy: CopyOut, rt: ResourceType, converter: Converter) -> ByteStream {
    Box::pin(to_fhir_in_parallel(native_batches(copy, rt), converter))
}

/// Stage 1: native lines, in batches.
fn native_batches(
    copy: CopyOut,
    rt: ResourceType,
) -> impl Stream<Item = Result<Bytes, io::Error>> + Send {
    let state = Batcher {
        copy,
        reader: TupleReader::new(fields::COUNT),
        resource_type: rt.name(),
        ended: false,
        failed: false,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        let batch = state.next_batch().await?;
        Some((batch, state))
    })
}

struct Batcher {
    copy: CopyOut,
    reader: TupleReader,
    resource_type: &'static str,
    /// The COPY stream ended.
    ended: bool,
    /// An error was returned: the stream is over.
    failed: bool,
}

impl Batcher {
    async fn next_batch(&mut self) -> Option<Result<Bytes, io::Error>> {
        if self.failed {
            return None;
        }
        let mut out = Vec::with_capacity(BATCH_BYTES + BATCH_BYTES / 4);
        loop {
            loop {
                match self.reader.next_tuple() {
                    Ok(Some(tuple)) => {
                        let row = (|| {
                            Some(Row {
                                id: tuple.text(fields::ID)?,
                                txid: tuple.i64(fields::TXID)?,
                                cts: tuple.i64(fields::CTS)?,
                                ts: tuple.i64(fields::TS)?,
                                resource: tuple.jsonb(fields::RESOURCE)?,
                            })
                        })();
                        let written = row.is_some_and(|row| {
                            write_native_line(&mut out, self.resource_type, &row)
                        });
                        if !written {
                            return self.fail(
                                "a stored row is not a resource (NULL column or non-object jsonb)",
                            );
                        }
                        if out.len() >= BATCH_BYTES {
                            return Some(Ok(out.into()));
                        }
                    }
                    Ok(None) => break,
                    Err(error) => return self.fail(&error.to_string()),
                }
            }
            if self.ended {
                if !self.reader.finished() || self.reader.has_partial() {
                    return self.fail("the COPY stream ended early");
                }
                return (!out.is_empty()).then(|| Ok(out.into()));
            }
            match self.copy.next().await {
                Some(Ok(chunk)) => self.reader.push(&chunk),
                Some(Err(error)) => return self.fail(&error.to_string()),
                None => self.ended = true,
            }
        }
    }

    fn fail(&mut self, message: &str) -> Option<Result<Bytes, io::Error>> {
        self.failed = true;
        tracing::error!(message, "dump failed mid-stream");
        Some(Err(io::Error::other(format!("dump failed: {message}"))))
    }
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
