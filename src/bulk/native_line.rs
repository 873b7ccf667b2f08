//! One native NDJSON line per stored row, built by splicing bytes, not by parsing JSON.
//!
//! The line is the stored jsonb text with `id`, `meta` (`createdAt`, `versionId`,
//! `lastUpdated`, plus any stored `meta` keys) and `resourceType` put in. The result is
//! byte for byte what the reference product prints (its native `$dump` is `jsonb::text` of the
//! merged document): keys in jsonb order (shorter keys first, then bytewise), `", "` and
//! `": "` separators, timestamps with microseconds and `Z`, `versionId` a number:
//!
//! `{"id": "pt-1", "meta": {"createdAt": "...", "versionId": 481, "lastUpdated": "..."}, "name": [...], "resourceType": "Patient"}`
//!
//! Splicing costs one pass over the bytes; parsing into a tree and printing it again would
//! cost several times that, and doing the merge with `jsonb ||` in SQL halves the dump's
//! throughput (measured: see `docs/design.md`).

use std::cmp::Ordering;
use std::io::Write as _;

use crate::json_text;
use crate::store::copy::PG_EPOCH_MICROS;

/// A stored row, borrowed from a COPY tuple.
pub struct Row<'a> {
    pub id: &'a [u8],
    pub txid: i64,
    /// Created at, in microseconds since 2000-01-01T00:00:00Z (PostgreSQL's binary form).
    pub cts: i64,
    /// Last updated, the same way.
    pub ts: i64,
    /// The stored jsonb's text.
    pub resource: &'a [u8],
}

/// A top-level member of a JSON object: its key (raw, without quotes) and its whole text
/// (`"key": value`).
type Member<'a> = (&'a [u8], Piece<'a>);

enum Piece<'a> {
    Text(&'a [u8]),
    Id,
    Meta,
    ResourceType,
    CreatedAt,
    VersionId,
    LastUpdated,
}

/// jsonb's key order: shorter first, then bytewise.
fn jsonb_order(a: &[u8], b: &[u8]) -> Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// Appends the row's native line (with its `\n`) to `out`. Returns false (writing nothing)
/// if the stored text is not a JSON object.
pub fn write_native_line(out: &mut Vec<u8>, resource_type: &str, row: &Row<'_>) -> bool {
    let mut members = Vec::with_capacity(16);
    let mut meta_members = Vec::with_capacity(8);
    build(out, resource_type, row, &mut members, &mut meta_members)
}

fn build<'r>(
    out: &mut Vec<u8>,
    resource_type: &str,
    row: &Row<'r>,
    members: &mut Vec<Member<'r>>,
    meta_members: &mut Vec<Member<'r>>,
) -> bool {
    if !scan_members(row.resource, members) {
        return false;
    }
    // A stored `meta` is merged; stored `id`/`resourceType` (written by hand) are replaced.
    let mut stored_meta: Option<&[u8]> = None;
    members.retain(|(key, piece)| match (*key, piece) {
        (b"id", _) | (b"resourceType", _) => false,
        (b"meta", Piece::Text(text)) => {
            stored_meta = member_value(text);
            false
        }
        _ => true,
    });
    if let Some(meta) = stored_meta {
        if !scan_members(meta, meta_members) {
            meta_members.clear();
        }
        meta_members
            .retain(|(key, _)| !matches!(*key, b"createdAt" | b"versionId" | b"lastUpdated"));
    }
    meta_members.extend([
        (&b"createdAt"[..], Piece::CreatedAt),
        (&b"versionId"[..], Piece::VersionId),
        (&b"lastUpdated"[..], Piece::LastUpdated),
    ]);
    meta_members.sort_by(|a, b| jsonb_order(a.0, b.0));
    members.extend([
        (&b"id"[..], Piece::Id),
        (&b"meta"[..], Piece::Meta),
        (&b"resourceType"[..], Piece::ResourceType),
    ]);
    members.sort_by(|a, b| jsonb_order(a.0, b.0));

    out.push(b'{');
    for (index, (_, piece)) in members.iter().enumerate() {
        if index > 0 {
            out.extend_from_slice(b", ");
        }
        match piece {
            Piece::Text(text) => out.extend_from_slice(text),
            Piece::Id => {
                out.extend_from_slice(b"\"id\": ");
                write_json_string(out, row.id);
            }
            Piece::ResourceType => {
                out.extend_from_slice(b"\"resourceType\": ");
                write_json_string(out, resource_type.as_bytes());
            }
            Piece::Meta => {
                out.extend_from_slice(b"\"meta\": {");
                for (index, (_, meta_piece)) in meta_members.iter().enumerate() {
                    if index > 0 {
                        out.extend_from_slice(b", ");
                    }
                    match meta_piece {
                        Piece::Text(text) => out.extend_from_slice(text),
                        Piece::CreatedAt => {
                            out.extend_from_slice(b"\"createdAt\": \"");
                            write_instant(out, row.cts);
                            out.push(b'"');
                        }
                        Piece::VersionId => {
                            let _ = write!(out, "\"versionId\": {}", row.txid);
                        }
                        Piece::LastUpdated => {
                            out.extend_from_slice(b"\"lastUpdated\": \"");
                            write_instant(out, row.ts);
                            out.push(b'"');
                        }
                        _ => {}
                    }
                }
                out.push(b'}');
            }
            _ => {}
        }
    }
    out.extend_from_slice(b"}\n");
    true
}

/// The value part of a member's text (`"key": value` -> `value`).
fn member_value(member: &[u8]) -> Option<&[u8]> {
    let end_of_key = json_text::end_of_string(member, 0)?;
    let colon = end_of_key + member[end_of_key..].iter().position(|b| *b == b':')?;
    let start = json_text::skip_whitespace(member, colon + 1);
    Some(&member[start..])
}

/// The object's members as (key, whole member text) pieces. False if it is not an object.
fn scan_members<'a>(object: &'a [u8], out: &mut Vec<Member<'a>>) -> bool {
    let mut found = Vec::new();
    if json_text::members(object, &mut found).is_none() {
        out.clear();
        return false;
    }
    out.clear();
    out.extend(found.iter().map(|m| (m.key, Piece::Text(m.member))));
    true
}

/// Writes `text` as a JSON string (escaping what JSON requires).
pub fn write_json_string(out: &mut Vec<u8>, text: &[u8]) {
    out.push(b'"');
    for &b in text {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => {
                let _ = write!(out, "\\u{b:04x}");
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// Writes a PostgreSQL timestamp (microseconds since 2000-01-01 UTC) as
/// `2021-06-10T08:26:10.707454Z`.
pub fn write_instant(out: &mut Vec<u8>, pg_micros: i64) {
    let unix = pg_micros + PG_EPOCH_MICROS;
    let days = unix.div_euclid(86_400_000_000);
    let micros_of_day = unix.rem_euclid(86_400_000_000);
    let (year, month, day) = civil_from_days(days);
    let seconds = micros_of_day / 1_000_000;
    let micros = micros_of_day % 1_000_000;
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    );
}

/// Days since 1970-01-01 -> (year, month, day), proleptic Gregorian (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, TimeZone, Utc};

    fn pg_micros(rfc3339: &str) -> i64 {
        let at = DateTime::parse_from_rfc3339(rfc3339)
            .expect("valid")
            .with_timezone(&Utc);
        at.timestamp_micros() - PG_EPOCH_MICROS
    }

    fn line(resource_type: &str, id: &str, txid: i64, at: &str, resource: &str) -> String {
        let micros = pg_micros(at);
        let mut out = Vec::new();
        let row = Row {
            id: id.as_bytes(),
            txid,
            cts: micros,
            ts: micros,
            resource: resource.as_bytes(),
        };
        assert!(write_native_line(&mut out, resource_type, &row));
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn the_seeds_native_lines_byte_for_byte() {
        // Stored bodies as jsonb::text prints them.
        assert_eq!(
            line("Patient", "pt-1", 481, "2021-06-10T08:26:10.707454Z", r#"{"name": [{"given": ["Alice"]}]}"#),
            "{\"id\": \"pt-1\", \"meta\": {\"createdAt\": \"2021-06-10T08:26:10.707454Z\", \"versionId\": 481, \"lastUpdated\": \"2021-06-10T08:26:10.707454Z\"}, \"name\": [{\"given\": [\"Alice\"]}], \"resourceType\": \"Patient\"}\n"
        );
        assert_eq!(
            line("Patient", "pt-3", 483, "2021-06-10T08:26:10.707454Z",
                 r#"{"name": [{"given": ["Charles"]}], "citizenship": [{"code": {"text": "ru"}}]}"#),
            "{\"id\": \"pt-3\", \"meta\": {\"createdAt\": \"2021-06-10T08:26:10.707454Z\", \"versionId\": 483, \"lastUpdated\": \"2021-06-10T08:26:10.707454Z\"}, \"name\": [{\"given\": [\"Charles\"]}], \"citizenship\": [{\"code\": {\"text\": \"ru\"}}], \"resourceType\": \"Patient\"}\n"
        );
        assert_eq!(
            line("Appointment", "ap-1", 484, "2021-06-10T08:26:10.707454Z",
                 r#"{"status": "fulfilled", "participant": [{"actor": {"id": "pt-1", "resourceType": "Patient"}, "status": "accepted"}]}"#),
            "{\"id\": \"ap-1\", \"meta\": {\"createdAt\": \"2021-06-10T08:26:10.707454Z\", \"versionId\": 484, \"lastUpdated\": \"2021-06-10T08:26:10.707454Z\"}, \"status\": \"fulfilled\", \"participant\": [{\"actor\": {\"id\": \"pt-1\", \"resourceType\": \"Patient\"}, \"status\": \"accepted\"}], \"resourceType\": \"Appointment\"}\n"
        );
    }

    #[test]
    fn stored_meta_is_merged_in_jsonb_order_and_hand_written_keys_replaced() {
        let text = line(
            "Patient",
            "a\"b",
            7,
            "2000-01-01T00:00:00Z",
            r#"{"id": "wrong", "meta": {"tag": [{"code": "x"}], "versionId": 1, "security": []}, "active": true}"#,
        );
        let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(value["id"], "a\"b");
        assert_eq!(value["meta"]["versionId"], 7);
        assert_eq!(value["meta"]["tag"][0]["code"], "x");
        assert!(text.starts_with("{\"id\": \"a\\\"b\", \"meta\": {\"tag\": [{\"code\": \"x\"}], \"security\": [], \"createdAt\": \"2000-01-01T00:00:00.000000Z\", \"versionId\": 7,"), "{text}");
        assert_eq!(line("Patient", "e", 1, "2000-01-01T00:00:00Z", "{}"),
            "{\"id\": \"e\", \"meta\": {\"createdAt\": \"2000-01-01T00:00:00.000000Z\", \"versionId\": 1, \"lastUpdated\": \"2000-01-01T00:00:00.000000Z\"}, \"resourceType\": \"Patient\"}\n");
    }

    #[test]
    fn instants_match_chrono() {
        let samples = [
            "1969-12-31T23:59:59.999999Z",
            "2000-01-01T00:00:00Z",
            "2000-02-29T12:00:00.000001Z",
            "2021-06-10T08:26:10.707454Z",
            "2100-03-01T00:00:00Z",
            "1900-01-01T00:00:00Z",
        ];
        for sample in samples {
            let mut out = Vec::new();
            write_instant(&mut out, pg_micros(sample));
            let at = DateTime::parse_from_rfc3339(sample)
                .expect("valid")
                .with_timezone(&Utc);
            assert_eq!(
                String::from_utf8(out).expect("utf-8"),
                at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
            );
        }
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..10_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let micros = (state % 8_000_000_000_000_000) as i64 - 2_000_000_000_000_000;
            let mut out = Vec::new();
            write_instant(&mut out, micros);
            let expected = Utc
                .timestamp_micros(micros + PG_EPOCH_MICROS)
                .single()
                .expect("in range");
            assert_eq!(
                String::from_utf8(out).expect("utf-8"),
                expected.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
            );
        }
    }
}
