//! From a source's bytes to batches of NDJSON lines with their line numbers.
//!
//! gzip is detected from the content (the magic bytes `1f 8b`), not from the name, and may
//! have several members (concatenated `.gz` files are valid gzip). A truncated gzip stream
//! is an error, never a silently short load.
//!
//! Each byte is looked at once: the search for the last newline of a batch starts where the
//! previous search stopped, so a source of one endless line costs linear time, and it ends
//! with an error naming the line as soon as the line passes `max_line` bytes, so it costs
//! bounded memory.

use std::io;

use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};

use super::source::{SourceError, SourceStream};

/// A batch of whole lines (each ending in `\n`, the last perhaps not).
#[derive(Debug)]
pub struct LineBatch {
    /// The number of the batch's first line (1-based).
    pub first_line: u64,
    pub bytes: Bytes,
}

impl LineBatch {
    /// The lines with their numbers; blank lines are skipped.
    pub fn lines(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.bytes
            .split(|b| *b == b'\n')
            .enumerate()
            .map(|(index, line)| (self.first_line + index as u64, line))
            .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinesError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("the gzip data is damaged or truncated: {0}")]
    Gzip(String),
    #[error("reading the source failed: {0}")]
    Read(String),
    #[error("line {line} is longer than the limit of {limit} bytes (--max-line-bytes)")]
    LineTooLong { line: u64, limit: usize },
}

/// Reads batches of about `batch_bytes` of whole lines from a source.
pub struct LineReader {
    reader: Box<dyn AsyncRead + Send + Unpin>,
    gzip: bool,
    pending: BytesMut,
    /// `pending[..scanned]` holds no newline after `last_newline`.
    scanned: usize,
    /// One past the last newline in `pending[..scanned]`, if any.
    last_newline: Option<usize>,
    next_line: u64,
    batch_bytes: usize,
    max_line: usize,
    done: bool,
}

impl LineReader {
    /// The batches as a stream, ending after the last one or the first error.
    pub fn into_batches(
        self,
    ) -> impl futures_util::Stream<Item = Result<LineBatch, LinesError>> + Send {
        futures_util::stream::unfold(Some(self), |reader| async move {
            let mut reader = reader?;
            match reader.next_batch().await {
                Ok(Some(batch)) => Some((Ok(batch), Some(reader))),
                Ok(None) => None,
                Err(error) => Some((Err(error), None)),
            }
        })
    }

    /// Starts reading; looks at the first bytes to tell gzip from plain text. Batches are about
    /// `batch_bytes`; a line may be at most `max_line` bytes.
    pub async fn new(
        source: SourceStream,
        batch_bytes: usize,
        max_line: usize,
    ) -> Result<LineReader, LinesError> {
        // Errors of the source travel through the reader as io errors carrying them.
        let raw = tokio_util::io::StreamReader::new(source.map_err(io::Error::other));
        let mut raw = BufReader::with_capacity(256 * 1024, raw);
        let head = tokio::io::AsyncBufReadExt::fill_buf(&mut raw)
            .await
            .map_err(read_error)?;
        let gzip = head.starts_with(&[0x1f, 0x8b]);
        let reader: Box<dyn AsyncRead + Send + Unpin> = if gzip {
            let mut decoder = async_compression::tokio::bufread::GzipDecoder::new(raw);
            decoder.multiple_members(true);
            Box::new(decoder)
        } else {
            Box::new(raw)
        };
        Ok(LineReader {
            reader,
            gzip,
            pending: BytesMut::new(),
            scanned: 0,
            last_newline: None,
            next_line: 1,
            batch_bytes,
            max_line,
            done: false,
        })
    }

    /// Whether the source is gzip.
    pub fn is_gzip(&self) -> bool {
        self.gzip
    }

    /// The next batch, or `None` at the end.
    pub async fn next_batch(&mut self) -> Result<Option<LineBatch>, LinesError> {
        loop {
            self.scan()?;
            if self.pending.len() >= self.batch_bytes || self.done {
                if let Some(batch) = self.cut() {
                    return Ok(Some(batch));
                }
                if self.done {
                    return Ok(None);
                }
            }
            self.pending.reserve(self.batch_bytes.max(64 * 1024));
            let read = self.reader.read_buf(&mut self.pending).await.map_err(|e| {
                if self.gzip {
                    gzip_or_source_error(e)
                } else {
                    read_error(e)
                }
            })?;
            if read == 0 {
                self.done = true;
            }
        }
    }

    /// Looks for newlines in the bytes not scanned yet, and fails if the line in progress
    /// (since the last newline) is over the limit.
    fn scan(&mut self) -> Result<(), LinesError> {
        if let Some(at) = self.pending[self.scanned..]
            .iter()
            .rposition(|b| *b == b'\n')
        {
            self.last_newline = Some(self.scanned + at + 1);
        }
        self.scanned = self.pending.len();
        let open_line = self.pending.len() - self.last_newline.unwrap_or(0);
        if open_line > self.max_line {
            // The line in progress is the one after the newlines before it.
            let before = self.last_newline.unwrap_or(0);
            let newlines = self.pending[..before]
                .iter()
                .filter(|b| **b == b'\n')
                .count();
            return Err(LinesError::LineTooLong {
                line: self.next_line + newlines as u64,
                limit: self.max_line,
            });
        }
        Ok(())
    }

    /// Cuts the pending bytes after their last newline (everything, at the end).
    fn cut(&mut self) -> Option<LineBatch> {
        let end = if self.done {
            self.pending.len()
        } else {
            self.last_newline?
        };
        if end == 0 {
            return None;
        }
        let bytes = self.pending.split_to(end).freeze();
        self.scanned -= end;
        self.last_newline = None;
        let first_line = self.next_line;
        self.next_line += bytes.iter().filter(|b| **b == b'\n').count() as u64;
        Some(LineBatch { first_line, bytes })
    }
}

/// An io error from the reader: the source's own error if it carries one.
fn read_error(error: io::Error) -> LinesError {
    match error.into_inner() {
        Some(inner) => match inner.downcast::<SourceError>() {
            Ok(source) => LinesError::Source(*source),
            Err(other) => LinesError::Read(other.to_string()),
        },
        None => LinesError::Read("unexpected end of data".into()),
    }
}

fn gzip_or_source_error(error: io::Error) -> LinesError {
    let kind = error.kind();
    match read_error(error) {
        LinesError::Source(source) => LinesError::Source(source),
        LinesError::Read(message) if kind == io::ErrorKind::UnexpectedEof => {
            LinesError::Gzip(format!("the stream ended early ({message})"))
        }
        LinesError::Read(message) => LinesError::Gzip(message),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn stream(chunks: Vec<Vec<u8>>) -> SourceStream {
        Box::pin(futures_util::stream::iter(
            chunks.into_iter().map(|c| Ok(Bytes::from(c))),
        ))
    }

    fn gzip(text: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(text).expect("write");
        encoder.finish().expect("finish")
    }

    async fn all_lines(
        source: SourceStream,
        batch: usize,
    ) -> Result<Vec<(u64, String)>, LinesError> {
        let mut reader = LineReader::new(source, batch, 1 << 20).await?;
        let mut lines = Vec::new();
        while let Some(batch) = reader.next_batch().await? {
            lines.extend(
                batch
                    .lines()
                    .map(|(n, l)| (n, String::from_utf8_lossy(l).into_owned())),
            );
        }
        Ok(lines)
    }

    #[tokio::test]
    async fn plain_and_multi_member_gzip_with_line_numbers() {
        let text = b"{\"a\":1}\n\n{\"b\":2}\n{\"c\":3}".to_vec();
        let expected = vec![
            (1, "{\"a\":1}".to_string()),
            (3, "{\"b\":2}".into()),
            (4, "{\"c\":3}".into()),
        ];
        for batch in [1, 5, 1 << 20] {
            let chunks: Vec<Vec<u8>> = text.chunks(3).map(<[u8]>::to_vec).collect();
            assert_eq!(
                all_lines(stream(chunks), batch).await.expect("plain"),
                expected
            );
        }
        // Two gzip members, split mid-line across them.
        let mut two = gzip(b"{\"a\":1}\n\n{\"b\"");
        two.extend(gzip(b":2}\n{\"c\":3}"));
        let chunks: Vec<Vec<u8>> = two.chunks(7).map(<[u8]>::to_vec).collect();
        assert_eq!(all_lines(stream(chunks), 4).await.expect("gzip"), expected);
    }

    #[tokio::test]
    async fn a_line_over_the_limit_is_an_error_naming_it() {
        let mut text = b"{\"a\":1}\n{\"b\":2}\n".to_vec();
        text.extend(std::iter::repeat_n(b'x', 5000));
        let chunks: Vec<Vec<u8>> = text.chunks(100).map(<[u8]>::to_vec).collect();
        let mut reader = LineReader::new(stream(chunks), 64, 1000)
            .await
            .expect("reader");
        let mut result = Ok(None);
        for _ in 0..100 {
            result = reader.next_batch().await;
            if !matches!(result, Ok(Some(_))) {
                break;
            }
        }
        assert!(
            matches!(
                result,
                Err(LinesError::LineTooLong {
                    line: 3,
                    limit: 1000
                })
            ),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn truncated_gzip_is_an_error() {
        let whole = gzip(&b"{\"resourceType\":\"Patient\",\"id\":\"x\"}\n".repeat(1000));
        let cut = whole[..whole.len() / 2].to_vec();
        let result = all_lines(stream(vec![cut]), 1024).await;
        assert!(matches!(result, Err(LinesError::Gzip(_))), "{result:?}");
    }
}
