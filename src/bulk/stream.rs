//! Byte streams of the bulk API: the body type every export produces ([`ByteStream`]), gzip
//! over a whole stream ([`gzip`]), and the one decoder of binary COPY results into batches of
//! tuples ([`tuple_batches`]), used by `$dump`, `$dump-csv`, `$dump-sql` and `$export`.
//!
//! **Truncation.** A COPY that ends before its trailer, or in the middle of a tuple, ends the
//! stream with an error: the HTTP layer then aborts the chunked body, so a client never
//! mistakes a broken export for a complete one. This check lives only here.
//!
//! **NULL.** The decoder never invents a value for a NULL field: a [`Tuple`] answers `None`
//! and each output says what that is. `$dump` and `$export` fail (a row without an id or a
//! resource is not a resource; the tables forbid it), `$dump-csv` writes an empty field, and
//! `$dump-sql` writes JSON `null` (NDJSON) or an empty field (TSV).

use std::io::{self, Write as _};
use std::pin::Pin;

use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::Compression;
use futures_util::{Stream, StreamExt};

pub use crate::store::copy::Tuple;
use crate::store::copy::TupleReader;
use crate::store::copy_out::CopyOut;

/// A body stream, as the HTTP layer takes it.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + Send>>;

/// Runs `stream` in a task of its own, at most `depth` items ahead of whoever reads the
/// receiver: producing (a COPY, its conversion) goes on while the reader waits on something
/// else (PostgreSQL taking a COPY, a file being written), and memory stays bounded by
/// `depth` items. The task ends after the last item or the first error, or as soon as the
/// receiver is dropped (the work failed or its request went away), without reading further.
pub fn read_ahead<T, E>(
    stream: impl Stream<Item = Result<T, E>> + Send + 'static,
    depth: usize,
) -> tokio::sync::mpsc::Receiver<Result<T, E>>
where
    T: Send + 'static,
    E: Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(depth.max(1));
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            let item = tokio::select! {
                item = stream.next() => item,
                () = sender.closed() => break,
            };
            let Some(item) = item else { break };
            let failed = item.is_err();
            if sender.send(item).await.is_err() || failed {
                break;
            }
        }
    });
    receiver
}

/// The compression level of every gzip fhirbox writes.
///
/// Level 1 because the bulk API's point is speed: zlib-rs does about 320 MiB/s per core at
/// level 1 but about 120 at level 6, which would make compression, not the database, the
/// limit of `$dump?gzip=true`. Level 1 still shrinks FHIR NDJSON 6-10x.
pub const GZIP_LEVEL: u32 = 1;

/// Compresses a body stream: one gzip member over the whole stream, compressed on a blocking
/// thread chunk by chunk.
pub fn gzip(body: ByteStream) -> ByteStream {
    let state = Some((
        body,
        GzEncoder::new(Vec::new(), Compression::new(GZIP_LEVEL)),
    ));
    Box::pin(futures_util::stream::unfold(state, |state| async move {
        let (mut body, mut encoder) = state?;
        loop {
            match body.next().await {
                Some(Ok(chunk)) => {
                    let compressed = tokio::task::spawn_blocking(move || {
                        encoder.write_all(&chunk)?;
                        let out = std::mem::take(encoder.get_mut());
                        Ok::<_, io::Error>((encoder, out))
                    })
                    .await
                    .map_err(io::Error::other)
                    .and_then(|result| result);
                    match compressed {
                        Ok((back, out)) => {
                            encoder = back;
                            if !out.is_empty() {
                                return Some((Ok(Bytes::from(out)), Some((body, encoder))));
                            }
                        }
                        Err(error) => return Some((Err(error), None)),
                    }
                }
                Some(Err(error)) => return Some((Err(error), None)),
                None => {
                    return match encoder.finish() {
                        Ok(tail) => Some((Ok(Bytes::from(tail)), None)),
                        Err(error) => Some((Err(error), None)),
                    }
                }
            }
        }
    }))
}

/// `body`, keeping `guard` (a bulk permit) alive for as long as the body is.
pub fn holding<G: Send + 'static>(body: ByteStream, guard: G) -> ByteStream {
    Box::pin(body.map(move |chunk| {
        let _held = &guard;
        chunk
    }))
}

/// Decodes a binary COPY of tuples of `fields` fields into batches of whole tuples, each
/// about `batch_bytes` of tuple data (the last may be smaller). An error of the database
/// travels inside the `io::Error` as the [`crate::store::StoreError`] it is.
pub fn tuple_batches(
    copy: CopyOut,
    fields: usize,
    batch_bytes: usize,
) -> impl Stream<Item = Result<Vec<Tuple>, io::Error>> + Send {
    let state = Decoder {
        copy,
        reader: TupleReader::new(fields),
        batch_bytes,
        ended: false,
        failed: false,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        let batch = state.next_batch().await?;
        Some((batch, state))
    })
}

struct Decoder {
    copy: CopyOut,
    reader: TupleReader,
    batch_bytes: usize,
    /// The COPY stream ended.
    ended: bool,
    /// An error was returned: the stream is over.
    failed: bool,
}

impl Decoder {
    async fn next_batch(&mut self) -> Option<Result<Vec<Tuple>, io::Error>> {
        if self.failed {
            return None;
        }
        let mut batch = Vec::new();
        let mut bytes = 0;
        loop {
            loop {
                match self.reader.next_tuple() {
                    Ok(Some(tuple)) => {
                        bytes += tuple.size();
                        batch.push(tuple);
                        if bytes >= self.batch_bytes {
                            return Some(Ok(batch));
                        }
                    }
                    Ok(None) => break,
                    Err(error) => return self.fail(io::Error::other(error)),
                }
            }
            if self.ended {
                if !self.reader.finished() || self.reader.has_partial() {
                    return self.fail(io::Error::other("the COPY stream ended early"));
                }
                return (!batch.is_empty()).then_some(Ok(batch));
            }
            match self.copy.next().await {
                Some(Ok(chunk)) => self.reader.push(&chunk),
                Some(Err(error)) => return self.fail(io::Error::other(error)),
                None => self.ended = true,
            }
        }
    }

    fn fail(&mut self, error: io::Error) -> Option<Result<Vec<Tuple>, io::Error>> {
        self.failed = true;
        Some(Err(error))
    }
}
