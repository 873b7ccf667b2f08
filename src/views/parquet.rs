//! Parquet output of a view: the rows (as the JSON lines `run` produces) written as typed,
//! nullable columns in row groups of at most [`RowGroups`] rows or bytes (32 Ki rows, 16 MiB
//! by default), each sent as soon as it is written, so memory stays at one
//! row group whatever the size of the result. Snappy-compressed. Types follow the declared
//! FHIR types as materialized tables do: `BOOLEAN`, `INT64` for the integer types, `DOUBLE`
//! for `decimal`, UTF-8 `BYTE_ARRAY` for the rest (a `collection` column holds JSON text).

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use parquet::basic::Compression;
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use serde_json::Value;

use super::definition::View;
use crate::bulk::stream::ByteStream;
use crate::views::sql::Compiled;

/// How large a row group may grow before it is written and sent
/// (`--parquet-row-group-rows`, `--parquet-row-group-bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowGroups {
    pub rows: usize,
    /// Of text values (numbers and booleans count 8 and 1).
    pub bytes: usize,
}

impl Default for RowGroups {
    fn default() -> RowGroups {
        RowGroups {
            rows: 32 * 1024,
            bytes: 16 * 1024 * 1024,
        }
    }
}

/// A column's Parquet type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Physical {
    Boolean,
    Int64,
    Double,
    Text,
}

impl Physical {
    /// As a materialized column's SQL type (`view_sql::sql_type`): `numeric` is `DOUBLE`,
    /// `jsonb` (a collection) JSON text.
    pub fn of(fhir_type: Option<&str>, collection: bool) -> Physical {
        match crate::views::sql::sql_type(fhir_type, collection) {
            "boolean" => Physical::Boolean,
            "bigint" => Physical::Int64,
            "numeric" => Physical::Double,
            _ => Physical::Text,
        }
    }

    /// The Parquet columns of a compiled view, in output order.
    pub fn columns(view: &View, compiled: &Compiled) -> Vec<(String, Physical)> {
        compiled
            .columns
            .iter()
            .zip(view.columns())
            .map(|(name, c)| {
                (
                    name.clone(),
                    Physical::of(c.fhir_type.as_deref(), c.collection),
                )
            })
            .collect()
    }

    fn schema(self) -> &'static str {
        match self {
            Physical::Boolean => "BOOLEAN",
            Physical::Int64 => "INT64",
            Physical::Double => "DOUBLE",
            Physical::Text => "BYTE_ARRAY",
        }
    }
}

/// The bytes the writer has written since they were last taken.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Shared {
    fn take(&self) -> Bytes {
        let mut buffer = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Bytes::from(std::mem::take(&mut *buffer))
    }
}

impl Write for Shared {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut buffer = self.0.lock().unwrap_or_else(|p| p.into_inner());
        buffer.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One column's values of the row group being gathered, with definition levels (0: null).
enum Values {
    Boolean(Vec<bool>),
    Int64(Vec<i64>),
    Double(Vec<f64>),
    Text(Vec<ByteArray>),
}

struct Column {
    name: String,
    values: Values,
    defined: Vec<i16>,
}

impl Column {
    /// Takes a row's value (moved, not copied: a value may be tens of megabytes).
    fn push(&mut self, value: Option<Value>) -> Result<usize, String> {
        let value = match value {
            None | Some(Value::Null) => {
                self.defined.push(0);
                return Ok(0);
            }
            Some(value) => value,
        };
        let wrong = |what: &str| format!("column {}: {value} is not {what}", self.name);
        let size = match &mut self.values {
            Values::Boolean(values) => {
                values.push(value.as_bool().ok_or_else(|| wrong("a boolean"))?);
                1
            }
            Values::Int64(values) => {
                values.push(value.as_i64().ok_or_else(|| wrong("an integer"))?);
                8
            }
            Values::Double(values) => {
                values.push(value.as_f64().ok_or_else(|| wrong("a number"))?);
                8
            }
            Values::Text(values) => {
                let text = match value {
                    Value::String(text) => text.into_bytes(),
                    other => other.to_string().into_bytes(),
                };
                let size = text.len();
                values.push(ByteArray::from(text));
                size
            }
        };
        self.defined.push(1);
        Ok(size)
    }

    fn clear(&mut self) {
        self.defined.clear();
        match &mut self.values {
            Values::Boolean(v) => v.clear(),
            Values::Int64(v) => v.clear(),
            Values::Double(v) => v.clear(),
            Values::Text(v) => v.clear(),
        }
    }
}

struct Writer {
    file: SerializedFileWriter<Shared>,
    out: Shared,
    columns: Vec<Column>,
    rows: usize,
    bytes: usize,
    limits: RowGroups,
}

fn error(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("writing Parquet: {e}"))
}

impl Writer {
    fn new(columns: &[(String, Physical)], limits: RowGroups) -> Result<Writer, io::Error> {
        let fields: Vec<String> = columns
            .iter()
            .map(|(name, physical)| {
                let utf8 = if *physical == Physical::Text {
                    " (UTF8)"
                } else {
                    ""
                };
                format!("  OPTIONAL {} {name}{utf8};", physical.schema())
            })
            .collect();
        let schema = parse_message_type(&format!("message view {{\n{}\n}}", fields.join("\n")))
            .map_err(error)?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let out = Shared::default();
        let file = SerializedFileWriter::new(out.clone(), Arc::new(schema), Arc::new(properties))
            .map_err(error)?;
        let columns = columns
            .iter()
            .map(|(name, physical)| Column {
                name: name.clone(),
                values: match physical {
                    Physical::Boolean => Values::Boolean(Vec::new()),
                    Physical::Int64 => Values::Int64(Vec::new()),
                    Physical::Double => Values::Double(Vec::new()),
                    Physical::Text => Values::Text(Vec::new()),
                },
                defined: Vec::new(),
            })
            .collect();
        Ok(Writer {
            file,
            out,
            columns,
            rows: 0,
            bytes: 0,
            limits,
        })
    }

    /// One JSON object line.
    fn push_line(&mut self, line: &[u8]) -> Result<(), io::Error> {
        let mut row: serde_json::Map<String, Value> =
            serde_json::from_slice(line).map_err(error)?;
        for column in &mut self.columns {
            self.bytes += column
                .push(row.swap_remove(&column.name))
                .map_err(io::Error::other)?;
        }
        self.rows += 1;
        Ok(())
    }

    fn full(&self) -> bool {
        self.rows >= self.limits.rows.max(1) || self.bytes >= self.limits.bytes.max(1)
    }

    /// Whether a line of `len` bytes would take the row group being gathered past its bound:
    /// then that group is written first, and a row larger than the bound is a group of its
    /// own, never added to others.
    fn no_room_for(&self, len: usize) -> bool {
        self.rows > 0 && self.bytes + len > self.limits.bytes.max(1)
    }

    /// Writes the gathered rows as a row group; the bytes written so far.
    fn flush(&mut self) -> Result<Bytes, io::Error> {
        if self.rows > 0 {
            let mut group = self.file.next_row_group().map_err(error)?;
            for column in &mut self.columns {
                let mut writer = group
                    .next_column()
                    .map_err(error)?
                    .ok_or_else(|| error("fewer columns than the schema"))?;
                let defined = Some(column.defined.as_slice());
                match &column.values {
                    Values::Boolean(v) => writer.typed::<BoolType>().write_batch(v, defined, None),
                    Values::Int64(v) => writer.typed::<Int64Type>().write_batch(v, defined, None),
                    Values::Double(v) => writer.typed::<DoubleType>().write_batch(v, defined, None),
                    Values::Text(v) => writer
                        .typed::<ByteArrayType>()
                        .write_batch(v, defined, None),
                }
                .map_err(error)?;
                writer.close().map_err(error)?;
                column.clear();
            }
            group.close().map_err(error)?;
            self.rows = 0;
            self.bytes = 0;
        }
        Ok(self.out.take())
    }

    fn finish(mut self) -> Result<Bytes, io::Error> {
        let mut last = self.flush()?.to_vec();
        self.file.close().map_err(error)?;
        last.extend_from_slice(&self.out.take());
        Ok(last.into())
    }
}

/// The rows of `body` (JSON lines) as one Parquet file, streamed a row group at a time.
pub fn parquet(
    body: ByteStream,
    columns: Vec<(String, Physical)>,
    limits: RowGroups,
) -> Result<ByteStream, io::Error> {
    let writer = Writer::new(&columns, limits)?;
    // What is left of the last chunk: whole lines are read in place (a chunk is never copied
    // unless a line spans two chunks), so a huge row is held once, not twice.
    let state = (body, Some(writer), Bytes::new(), false);
    Ok(Box::pin(futures_util::stream::unfold(
        state,
        |(mut body, writer, mut pending, mut ended)| async move {
            let mut writer = writer?;
            loop {
                // The whole lines already here, until the row group is full.
                let mut used = 0;
                let mut no_room = false;
                while !writer.full() {
                    let Some(end) = pending[used..].iter().position(|b| *b == b'\n') else {
                        break;
                    };
                    if writer.no_room_for(end) {
                        no_room = true;
                        break;
                    }
                    let line = &pending[used..used + end];
                    used += end + 1;
                    if let Err(e) = (!line.is_empty())
                        .then(|| writer.push_line(line))
                        .transpose()
                    {
                        return Some((Err(e), (body, None, pending, ended)));
                    }
                }
                pending = pending.slice(used..);
                if writer.full() || no_room {
                    let bytes = writer.flush();
                    return Some((bytes, (body, Some(writer), pending, ended)));
                }
                if ended {
                    return Some((writer.finish(), (body, None, pending, ended)));
                }
                match body.next().await {
                    Some(Ok(chunk)) if pending.is_empty() => pending = chunk,
                    Some(Ok(chunk)) => {
                        let mut joined = Vec::with_capacity(pending.len() + chunk.len());
                        joined.extend_from_slice(&pending);
                        joined.extend_from_slice(&chunk);
                        pending = joined.into();
                    }
                    Some(Err(e)) => return Some((Err(e), (body, None, pending, ended))),
                    None => ended = true,
                }
            }
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_groups_are_bounded_and_sent_as_they_fill() {
        let columns = vec![
            ("id".to_string(), Physical::Text),
            ("n".to_string(), Physical::Int64),
        ];
        let limits = RowGroups::default();
        let mut writer = Writer::new(&columns, limits).unwrap();
        let mut sent = Vec::new();
        for i in 0..(limits.rows + 10) {
            let line = format!("{{\"id\":\"r{i}\",\"n\":{i}}}");
            writer.push_line(line.as_bytes()).unwrap();
            if writer.full() {
                sent.push(writer.flush().unwrap().len());
            }
        }
        assert_eq!(sent.len(), 1, "one full row group sent before the end");
        assert!(sent[0] > 100_000, "{sent:?}");
        let last = writer.finish().unwrap();
        assert!(last.ends_with(b"PAR1"));
        let mut bad = Writer::new(&columns, limits).unwrap();
        let error = bad.push_line(br#"{"id":"x","n":"seven"}"#).unwrap_err();
        assert_eq!(error.to_string(), "column n: \"seven\" is not an integer");
    }
}
