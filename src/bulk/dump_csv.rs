//! `$dump-csv`: a type's resources (native format) as CSV (RFC 4180: comma-separated, fields
//! quoted when they hold a comma, quote or line break, CRLF line ends), with a header row.
//!
//! Columns are the paths of the JSON leaf values of `resource` + `id` + `resourceType`, array
//! indexes included, joined by dots (`name.0.given.0`), sorted; a resource without a value at
//! a path has an empty field there. The header needs every path before the first row, so
//! PostgreSQL computes the set in one aggregate pass, and the rows follow in the same
//! snapshot. Memory stays flat in the number of rows (the header grows with the number of
//! distinct paths). Rows are flattened on blocking threads, one batch per core, order kept.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde_json::{Map, Value};

use super::report::Report;
use super::stream::{tuple_batches, ByteStream, Tuple};
use crate::resource_type::ResourceType;
use crate::store::dump_csv::{self, fields};
use crate::store::{Store, StoreError};

/// Bytes of input per batch flattened on a blocking thread.
const BATCH_BYTES: usize = 256 * 1024;

/// The columns: their order and, for each path, its position.
struct Columns {
    index: HashMap<String, usize>,
    count: usize,
}

/// Starts the dump (everything that can fail before the first row fails here).
pub async fn dump_csv(
    store: &Store,
    rt: ResourceType,
    since: Option<DateTime<Utc>>,
    report: &Report,
) -> Result<ByteStream, StoreError> {
    let (snapshot, paths) = dump_csv::paths(store, rt, since.as_ref()).await?;
    if paths.is_empty() {
        snapshot.close();
        return Ok(Box::pin(futures_util::stream::empty()));
    }
    let mut header = Vec::new();
    for (index, path) in paths.iter().enumerate() {
        if index > 0 {
            header.push(b',');
        }
        write_csv_field(&mut header, path.as_bytes());
    }
    header.extend_from_slice(b"\r\n");
    let columns = Arc::new(Columns {
        count: paths.len(),
        index: paths.into_iter().enumerate().map(|(i, p)| (p, i)).collect(),
    });
    let copy = dump_csv::rows(snapshot, rt, since.as_ref()).await?;
    let resource_type = rt.name();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let report = report.clone();
    let body = tuple_batches(copy, fields::COUNT, BATCH_BYTES)
        .map(move |batch| {
            let columns = columns.clone();
            let report = report.clone();
            async move {
                let batch = batch?;
                report.rows(batch.len() as u64);
                tokio::task::spawn_blocking(move || csv_rows(&batch, resource_type, &columns))
                    .await
                    .map_err(io::Error::other)?
            }
        })
        .buffered(workers);
    let header = futures_util::stream::once(async move { Ok::<_, io::Error>(Bytes::from(header)) });
    Ok(Box::pin(header.chain(body)))
}

/// CSV lines for a batch of (id, resource) tuples. A NULL is an empty field: a NULL id leaves
/// the `id` column empty, a NULL resource every column but `id` and `resourceType`.
fn csv_rows(batch: &[Tuple], resource_type: &str, columns: &Columns) -> Result<Bytes, io::Error> {
    let mut out = Vec::with_capacity(batch.iter().map(Tuple::size).sum());
    let mut fields: Vec<Option<String>> = vec![None; columns.count];
    let mut path = String::new();
    for tuple in batch {
        fields.iter_mut().for_each(|f| *f = None);
        let mut doc = match tuple.jsonb(fields::RESOURCE) {
            None => Map::new(),
            Some(text) => match serde_json::from_slice(text).map_err(io::Error::other)? {
                Value::Object(doc) => doc,
                _ => return Err(io::Error::other("a stored resource is not a JSON object")),
            },
        };
        if let Some(id) = tuple.text(fields::ID) {
            doc.insert(
                "id".into(),
                Value::String(String::from_utf8_lossy(id).into_owned()),
            );
        }
        doc.insert(
            "resourceType".into(),
            Value::String(resource_type.to_string()),
        );
        for (key, value) in &doc {
            path.clear();
            path.push_str(key);
            collect(value, &mut path, columns, &mut fields);
        }
        for (index, field) in fields.iter().enumerate() {
            if index > 0 {
                out.push(b',');
            }
            if let Some(text) = field {
                write_csv_field(&mut out, text.as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
    }
    Ok(out.into())
}

/// Puts the leaves under `value` (at `path`) into their columns.
fn collect(value: &Value, path: &mut String, columns: &Columns, fields: &mut [Option<String>]) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let len = path.len();
                path.push('.');
                path.push_str(key);
                collect(child, path, columns, fields);
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                let len = path.len();
                path.push('.');
                path.push_str(&index.to_string());
                collect(child, path, columns, fields);
                path.truncate(len);
            }
        }
        leaf => {
            if let Some(&column) = columns.index.get(path.as_str()) {
                fields[column] = match leaf {
                    Value::Null => None,
                    Value::String(text) => Some(text.clone()),
                    other => Some(other.to_string()),
                };
            }
        }
    }
}

/// One field, quoted (RFC 4180) when it holds a comma, a quote or a line break.
fn write_csv_field(out: &mut Vec<u8>, text: &[u8]) {
    if text
        .iter()
        .any(|b| matches!(b, b',' | b'"' | b'\r' | b'\n'))
    {
        out.push(b'"');
        for &b in text {
            if b == b'"' {
                out.push(b'"');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_quoted_only_when_needed() {
        let mut out = Vec::new();
        write_csv_field(&mut out, b"plain");
        out.push(b',');
        write_csv_field(&mut out, b"a,b \"c\"\nd");
        assert_eq!(out, b"plain,\"a,b \"\"c\"\"\nd\"");
    }

    #[test]
    fn rows_follow_the_columns() {
        let paths = [
            "citizenship.0.code.text",
            "id",
            "name.0.given.0",
            "resourceType",
        ];
        let columns = Columns {
            count: paths.len(),
            index: paths
                .iter()
                .enumerate()
                .map(|(i, p)| (p.to_string(), i))
                .collect(),
        };
        let batch = tuples(&[
            (Some("pt-1"), Some(r#"{"name": [{"given": ["Alice"]}]}"#)),
            (
                Some("pt-3"),
                Some(
                    r#"{"name": [{"given": ["Charles"]}], "citizenship": [{"code": {"text": "ru"}}]}"#,
                ),
            ),
            (None, Some(r#"{"name": [{"given": ["Nobody"]}]}"#)),
            (Some("pt-4"), None),
        ]);
        let csv = csv_rows(&batch, "Patient", &columns).expect("rows");
        assert_eq!(
            csv,
            Bytes::from(
                ",pt-1,Alice,Patient\r\nru,pt-3,Charles,Patient\r\n,,Nobody,Patient\r\n,pt-4,,Patient\r\n"
            ),
            "a NULL is an empty field"
        );
    }

    /// (id, resource) tuples as a binary COPY would carry them.
    fn tuples(rows: &[(Option<&str>, Option<&str>)]) -> Vec<Tuple> {
        let mut writer = crate::store::copy::TupleWriter::new();
        for (id, resource) in rows {
            writer.start_tuple(2);
            match id {
                Some(id) => writer.text(id.as_bytes()),
                None => writer.null(),
            }
            match resource {
                Some(resource) => writer.jsonb(resource.as_bytes()),
                None => writer.null(),
            }
        }
        let mut reader = crate::store::copy::TupleReader::new(2);
        reader.push(&writer.finish());
        std::iter::from_fn(|| reader.next_tuple().expect("valid")).collect()
    }
}
