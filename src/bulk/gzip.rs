//! gzip for streamed bodies: one gzip member over the whole stream, compressed on a blocking
//! thread chunk by chunk, at level 1.
//!
//! Level 1 because the bulk API's point is speed: zlib-rs does about 320 MiB/s per core at
//! level 1 but about 120 at level 6, which would make compression, not the database, the
//! limit of `$dump?gzip=true`. Level 1 still shrinks FHIR NDJSON 6-10x.

use std::io::{self, Write as _};

use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::Compression;
use futures_util::StreamExt;

use super::dump::ByteStream;

/// The compression level of every gzip fhirbox writes.
pub const LEVEL: u32 = 1;

/// Compresses a body stream.
pub fn gzip(body: ByteStream) -> ByteStream {
    let state = Some((body, GzEncoder::new(Vec::new(), Compression::new(LEVEL))));
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
