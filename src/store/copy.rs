//! PostgreSQL's binary COPY format, both ways, without per-row allocation.
//!
//! Binary COPY carries a jsonb field as a version byte (1) followed by the jsonb's text,
//! exactly as `jsonb::text` prints it. Text-format COPY would double every backslash of the
//! JSON, which is why the bulk paths use the binary format.
//!
//! Layout: the 11-byte signature `PGCOPY\n\xff\r\n\0`, a 32-bit flags word, a 32-bit header
//! extension length and that many bytes; then tuples, each a 16-bit field count followed by
//! fields of a 32-bit length (-1 for NULL) and that many bytes; then the trailer, a field count
//! of -1. All integers are big-endian.

use bytes::{Buf, BufMut, Bytes, BytesMut};

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// The version byte in front of a jsonb field's text.
pub const JSONB_VERSION: u8 = 1;

/// Microseconds from the Unix epoch to PostgreSQL's epoch (2000-01-01T00:00:00Z).
pub const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

#[derive(Debug, thiserror::Error)]
pub enum CopyFormatError {
    #[error("the COPY stream does not start with the binary COPY signature")]
    Signature,
    #[error("a COPY tuple has {found} fields where {expected} were expected")]
    FieldCount { expected: usize, found: i16 },
    #[error("the COPY stream ended in the middle of a tuple")]
    Truncated,
}

/// Splits a binary COPY OUT stream into tuples, whatever the chunk boundaries.
pub struct TupleReader {
    buffer: BytesMut,
    header_done: bool,
    finished: bool,
    fields: usize,
}

/// One tuple: `fields` ranges into `data` (`None` for NULL).
pub struct Tuple {
    data: Bytes,
    fields: Vec<Option<(usize, usize)>>,
}

impl Tuple {
    /// The bytes the tuple takes in the stream.
    pub fn size(&self) -> usize {
        self.data.len()
    }

    /// The raw bytes of field `index`, or `None` for NULL (or no such field).
    pub fn field(&self, index: usize) -> Option<&[u8]> {
        let (start, end) = (*self.fields.get(index)?)?;
        Some(&self.data[start..end])
    }

    /// Field `index` as a big-endian i64 (bigint, timestamptz).
    pub fn i64(&self, index: usize) -> Option<i64> {
        let bytes: [u8; 8] = self.field(index)?.try_into().ok()?;
        Some(i64::from_be_bytes(bytes))
    }

    /// Field `index` as text (text columns; jsonb after its version byte).
    pub fn text(&self, index: usize) -> Option<&[u8]> {
        self.field(index)
    }

    /// Field `index` as a jsonb's text (without the version byte).
    pub fn jsonb(&self, index: usize) -> Option<&[u8]> {
        match self.field(index)? {
            [JSONB_VERSION, text @ ..] => Some(text),
            _ => None,
        }
    }
}

impl TupleReader {
    /// A reader for tuples of `fields` fields.
    pub fn new(fields: usize) -> TupleReader {
        TupleReader {
            buffer: BytesMut::new(),
            header_done: false,
            finished: false,
            fields,
        }
    }

    /// Appends a chunk of the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// Whether the trailer was seen.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Whether bytes are left that do not make a whole tuple (checked at the end).
    pub fn has_partial(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// The next complete tuple, if the buffer holds one.
    pub fn next_tuple(&mut self) -> Result<Option<Tuple>, CopyFormatError> {
        if !self.header_done {
            if self.buffer.len() < SIGNATURE.len() + 8 {
                return Ok(None);
            }
            if &self.buffer[..SIGNATURE.len()] != SIGNATURE {
                return Err(CopyFormatError::Signature);
            }
            let extension = u32::from_be_bytes(
                self.buffer[15..19]
                    .try_into()
                    .map_err(|_| CopyFormatError::Signature)?,
            ) as usize;
            let header = SIGNATURE.len() + 8 + extension;
            if self.buffer.len() < header {
                return Ok(None);
            }
            self.buffer.advance(header);
            self.header_done = true;
        }
        if self.finished || self.buffer.len() < 2 {
            return Ok(None);
        }
        let count = i16::from_be_bytes([self.buffer[0], self.buffer[1]]);
        if count == -1 {
            self.buffer.advance(2);
            self.finished = true;
            return Ok(None);
        }
        if count as usize != self.fields {
            return Err(CopyFormatError::FieldCount {
                expected: self.fields,
                found: count,
            });
        }
        // Find the tuple's end without consuming, so a partial tuple waits for more bytes.
        let mut offset = 2;
        let mut fields = Vec::with_capacity(self.fields);
        for _ in 0..self.fields {
            if self.buffer.len() < offset + 4 {
                return Ok(None);
            }
            let length = i32::from_be_bytes(
                self.buffer[offset..offset + 4]
                    .try_into()
                    .map_err(|_| CopyFormatError::Truncated)?,
            );
            offset += 4;
            if length < 0 {
                fields.push(None);
                continue;
            }
            let end = offset + length as usize;
            if self.buffer.len() < end {
                return Ok(None);
            }
            fields.push(Some((offset, end)));
            offset = end;
        }
        let data = self.buffer.split_to(offset).freeze();
        Ok(Some(Tuple { data, fields }))
    }
}

/// Builds a binary COPY IN stream.
pub struct TupleWriter {
    buffer: BytesMut,
}

impl TupleWriter {
    /// A writer whose first bytes are the header.
    pub fn new() -> TupleWriter {
        let mut buffer = BytesMut::with_capacity(64 * 1024);
        buffer.put_slice(SIGNATURE);
        buffer.put_u32(0); // flags
        buffer.put_u32(0); // header extension length
        TupleWriter { buffer }
    }

    pub fn start_tuple(&mut self, fields: i16) {
        self.buffer.put_i16(fields);
    }

    pub fn text(&mut self, value: &[u8]) {
        self.buffer.put_i32(value.len() as i32);
        self.buffer.put_slice(value);
    }

    pub fn i64(&mut self, value: i64) {
        self.buffer.put_i32(8);
        self.buffer.put_i64(value);
    }

    /// A jsonb field from JSON text (PostgreSQL parses and normalizes it).
    pub fn jsonb(&mut self, json: &[u8]) {
        self.buffer.put_i32(json.len() as i32 + 1);
        self.buffer.put_u8(JSONB_VERSION);
        self.buffer.put_slice(json);
    }

    /// A jsonb field written piecewise: call [`TupleWriter::jsonb_end`] with the returned mark.
    pub fn jsonb_begin(&mut self) -> usize {
        let mark = self.buffer.len();
        self.buffer.put_i32(0);
        self.buffer.put_u8(JSONB_VERSION);
        mark
    }

    /// Appends raw bytes to a field begun with [`TupleWriter::jsonb_begin`].
    pub fn raw(&mut self, bytes: &[u8]) {
        self.buffer.put_slice(bytes);
    }

    pub fn jsonb_end(&mut self, mark: usize) {
        let length = (self.buffer.len() - mark - 4) as i32;
        self.buffer[mark..mark + 4].copy_from_slice(&length.to_be_bytes());
    }

    pub fn null(&mut self) {
        self.buffer.put_i32(-1);
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buffer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }

    /// Takes what was written so far (to send it), keeping the writer usable.
    pub fn take(&mut self) -> Bytes {
        self.buffer.split().freeze()
    }

    /// Appends the trailer and takes the rest.
    pub fn finish(mut self) -> Bytes {
        self.buffer.put_i16(-1);
        self.buffer.freeze()
    }

    /// Appends the trailer, takes everything written, and starts a new stream (header again)
    /// in the same allocation once the taken bytes are dropped.
    pub fn finish_and_restart(&mut self) -> Bytes {
        self.buffer.put_i16(-1);
        let done = self.buffer.split().freeze();
        self.buffer.put_slice(SIGNATURE);
        self.buffer.put_u32(0);
        self.buffer.put_u32(0);
        done
    }
}

impl Default for TupleWriter {
    fn default() -> Self {
        TupleWriter::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_reads_back_across_any_chunking() {
        let mut writer = TupleWriter::new();
        for i in 0..50 {
            writer.start_tuple(3);
            writer.text(format!("id-{i}").as_bytes());
            writer.i64(i);
            if i % 7 == 0 {
                writer.null();
            } else {
                writer.jsonb(format!("{{\"n\": {i}}}").as_bytes());
            }
        }
        let stream = writer.finish();
        for chunk_size in [1, 2, 3, 7, 64, 100_000] {
            let mut reader = TupleReader::new(3);
            let mut seen = 0;
            for chunk in stream.chunks(chunk_size) {
                reader.push(chunk);
                while let Some(tuple) = reader.next_tuple().expect("valid stream") {
                    assert_eq!(tuple.text(0), Some(format!("id-{seen}").as_bytes()));
                    assert_eq!(tuple.i64(1), Some(seen));
                    if seen % 7 == 0 {
                        assert_eq!(tuple.jsonb(2), None);
                    } else {
                        assert_eq!(
                            tuple.jsonb(2),
                            Some(format!("{{\"n\": {seen}}}").as_bytes())
                        );
                    }
                    seen += 1;
                }
            }
            assert_eq!(seen, 50, "chunks of {chunk_size}");
            assert!(reader.finished() && !reader.has_partial());
        }
    }

    #[test]
    fn rejects_other_streams() {
        let mut reader = TupleReader::new(1);
        reader.push(b"id\tname\nnot binary copy at all");
        assert!(matches!(
            reader.next_tuple(),
            Err(CopyFormatError::Signature)
        ));
    }
}
