//! Parquet output of a view: the rows (as the JSON lines `run` produces) written as typed,
//! nullable columns in row groups of at most [`RowGroups`] rows or bytes (32 Ki rows, 16 MiB
//! by default), each sent as soon as it is written, so memory stays at one
//! row group whatever the size of the result. Snappy-compressed. Types follow the declared
//! FHIR types as materialized tables do: `BOOLEAN`, `INT64` for the integer types, `DOUBLE`
//! for `decimal`, UTF-8 `BYTE_ARRAY` for the rest (a `collection` column holds JSON text).

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use parquet::basic::Compression;
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use serde_json::Value;

use super::definition::View;
use crate::bulk::dump_sql::TupleStream;
use crate::bulk::stream::{read_ahead, ByteStream};
use crate::store::copy::Tuple;
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

    /// Takes a field of a binary COPY tuple: the text of a string (`string`), else the text
    /// of a JSON value. The common cases need no JSON: a string into a text column is the
    /// field's own bytes (not even copied), a number or boolean is parsed from its text. The
    /// rest goes through [`Column::push`], so values and errors are the same either way.
    fn push_field(&mut self, field: Option<Bytes>, string: bool) -> Result<usize, String> {
        let Some(field) = field else {
            self.defined.push(0);
            return Ok(0);
        };
        if let (Values::Text(values), true) = (&mut self.values, string) {
            let size = field.len();
            values.push(ByteArray::from(field));
            self.defined.push(1);
            return Ok(size);
        }
        let fast = match (&mut self.values, string) {
            // A JSON string without escapes: its characters, between the quotes.
            (Values::Text(values), false)
                if field.len() >= 2
                    && field[0] == b'"'
                    && field[field.len() - 1] == b'"'
                    && !field.contains(&b'\\') =>
            {
                let inner = field.slice(1..field.len() - 1);
                let size = inner.len();
                values.push(ByteArray::from(inner));
                Some(size)
            }
            (Values::Int64(values), false) => std::str::from_utf8(&field)
                .ok()
                .filter(|text| text.bytes().all(|b| b.is_ascii_digit() || b == b'-'))
                .and_then(|text| text.parse().ok())
                .map(|n| {
                    values.push(n);
                    8
                }),
            (Values::Double(values), false) => std::str::from_utf8(&field)
                .ok()
                .filter(|text| {
                    text.bytes()
                        .all(|b| b.is_ascii_digit() || b"-+.eE".contains(&b))
                })
                .and_then(|text| text.parse::<f64>().ok())
                .filter(|n| n.is_finite())
                .map(|n| {
                    values.push(n);
                    8
                }),
            (Values::Boolean(values), false) if matches!(&field[..], b"true" | b"false") => {
                values.push(&field[..] == b"true");
                Some(1)
            }
            _ => None,
        };
        if let Some(size) = fast {
            self.defined.push(1);
            return Ok(size);
        }
        let value = if string {
            Value::String(String::from_utf8_lossy(&field).into_owned())
        } else {
            serde_json::from_slice(&field)
                .map_err(|e| format!("column {}: not JSON: {e}", self.name))?
        };
        self.push(Some(value))
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

    /// One tuple of a binary COPY, its fields in the columns' order (`strings`: which are
    /// strings, see [`Compiled::json_fields`]).
    fn push_tuple(&mut self, tuple: &Tuple, strings: &[bool]) -> Result<(), io::Error> {
        for (index, (column, string)) in self.columns.iter_mut().zip(strings).enumerate() {
            self.bytes += column
                .push_field(tuple.field_bytes(index), *string)
                .map_err(io::Error::other)?;
        }
        self.rows += 1;
        Ok(())
    }

    /// Takes a batch of tuples; the bytes of the row groups it filled (often none).
    fn write_batch(&mut self, batch: &[Tuple], strings: &[bool]) -> Result<Vec<u8>, io::Error> {
        let mut out = Vec::new();
        for tuple in batch {
            if self.no_room_for(tuple.size()) {
                out.extend_from_slice(&self.flush()?);
            }
            self.push_tuple(tuple, strings)?;
            if self.full() {
                out.extend_from_slice(&self.flush()?);
            }
        }
        Ok(out)
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

/// The tuples of a binary COPY of the view's fields (`fields`: name, and whether a string;
/// see [`Compiled::json_fields`]) as one Parquet file, streamed a row group at a time. Each
/// field goes into its column as it is (see [`Column::push_field`]): no JSON of the row is
/// made and parsed back, which was most of a Parquet output's time on the one core PostgreSQL
/// leaves.
pub fn parquet_tuples(
    batches: TupleStream,
    fields: Vec<(String, bool)>,
    columns: Vec<(String, Physical)>,
    limits: RowGroups,
) -> Result<ByteStream, io::Error> {
    let writer = Writer::new(&columns, limits)?;
    let strings: Arc<[bool]> = fields.iter().map(|(_, string)| *string).collect();
    // The COPY goes on while a batch is encoded (on a blocking thread: encoding a row group
    // takes tens of milliseconds, too long for an async worker).
    let batches = read_ahead(batches, BATCHES_AHEAD);
    let state = (batches, Some(writer), strings);
    Ok(Box::pin(futures_util::stream::unfold(
        state,
        |(mut batches, writer, strings)| async move {
            let mut writer = writer?;
            loop {
                let Some(batch) = batches.recv().await else {
                    let finished = blocking(move || writer.finish()).await;
                    return Some((finished, (batches, None, strings)));
                };
                let batch = match batch {
                    Ok(batch) => batch,
                    Err(e) => return Some((Err(e), (batches, None, strings))),
                };
                let shared = strings.clone();
                let written = blocking(move || {
                    let out = writer.write_batch(&batch, &shared);
                    out.map(|out| (writer, out))
                })
                .await;
                match written {
                    Ok((back, out)) if out.is_empty() => writer = back,
                    Ok((back, out)) => {
                        return Some((Ok(out.into()), (batches, Some(back), strings)))
                    }
                    Err(e) => return Some((Err(e), (batches, None, strings))),
                }
            }
        },
    )))
}

/// Batches of tuples read ahead of the encoding: 32 of about 256 KB, some 8 MB, what
/// PostgreSQL produces while a row group of 32 Ki rows is encoded.
const BATCHES_AHEAD: usize = 32;

/// Runs `work` on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, io::Error> + Send + 'static,
) -> Result<T, io::Error> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("writing Parquet: {e}"))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::copy::{TupleReader, TupleWriter};

    /// Tuples of (id text, n as JSON text), as a binary COPY would send them.
    fn tuples(rows: &[(&str, &str)]) -> Vec<Tuple> {
        let mut writer = TupleWriter::new();
        for (id, n) in rows {
            writer.start_tuple(2);
            writer.text(id.as_bytes());
            writer.text(n.as_bytes());
        }
        let mut reader = TupleReader::new(2);
        reader.push(&writer.finish());
        std::iter::from_fn(|| reader.next_tuple().unwrap()).collect()
    }

    #[test]
    fn row_groups_are_bounded_and_sent_as_they_fill() {
        let columns = vec![
            ("id".to_string(), Physical::Text),
            ("n".to_string(), Physical::Int64),
        ];
        let strings = [true, false];
        let limits = RowGroups::default();
        let mut writer = Writer::new(&columns, limits).unwrap();
        let mut sent = Vec::new();
        let rows: Vec<(String, String)> = (0..(limits.rows + 10))
            .map(|i| (format!("r{i}"), i.to_string()))
            .collect();
        let borrowed: Vec<(&str, &str)> =
            rows.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        for tuple in tuples(&borrowed) {
            writer.push_tuple(&tuple, &strings).unwrap();
            if writer.full() {
                sent.push(writer.flush().unwrap().len());
            }
        }
        assert_eq!(sent.len(), 1, "one full row group sent before the end");
        assert!(sent[0] > 100_000, "{sent:?}");
        let last = writer.finish().unwrap();
        assert!(last.ends_with(b"PAR1"));
        let mut bad = Writer::new(&columns, limits).unwrap();
        let error = bad
            .push_tuple(&tuples(&[("x", "\"seven\"")])[0], &strings)
            .unwrap_err();
        assert_eq!(error.to_string(), "column n: \"seven\" is not an integer");
    }

    #[test]
    fn fields_go_in_as_they_are_or_through_json() {
        let mut text = Column {
            name: "t".into(),
            values: Values::Text(Vec::new()),
            defined: Vec::new(),
        };
        let mut number = Column {
            name: "d".into(),
            values: Values::Double(Vec::new()),
            defined: Vec::new(),
        };
        let field = |s: &str| Some(Bytes::from(s.to_string()));
        text.push_field(field("plain"), true).unwrap();
        text.push_field(field("\"quoted\""), false).unwrap();
        text.push_field(field("\"esc\\\"aped\""), false).unwrap();
        text.push_field(field("[1, 2]"), false).unwrap();
        text.push_field(None, true).unwrap();
        let Values::Text(values) = &text.values else {
            unreachable!()
        };
        let texts: Vec<&str> = values.iter().map(|v| v.as_utf8().unwrap()).collect();
        assert_eq!(texts, ["plain", "quoted", "esc\"aped", "[1,2]"]);
        assert_eq!(text.defined, [1, 1, 1, 1, 0]);
        number.push_field(field("1.5e2"), false).unwrap();
        number.push_field(field("-3"), false).unwrap();
        let error = number.push_field(field("\"x\""), false).unwrap_err();
        assert_eq!(error, "column d: \"x\" is not a number");
        let Values::Double(values) = &number.values else {
            unreachable!()
        };
        assert_eq!(values, &[150.0, -3.0]);
    }
}
