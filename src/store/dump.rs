//! The SQL of `$dump`: the current versions of one type, as a binary COPY.

use chrono::{DateTime, Utc};

use super::copy_out::{copy_out, CopyOut};
use super::{Store, StoreError};
use crate::resource_type::ResourceType;

/// The fields of each dumped tuple, in order.
pub mod fields {
    pub const ID: usize = 0;
    pub const TXID: usize = 1;
    pub const CTS: usize = 2;
    pub const TS: usize = 3;
    pub const RESOURCE: usize = 4;
    pub const COUNT: usize = 5;
}

/// The SQL of a dump of `rt`'s current versions created after `since`.
///
/// COPY takes no bind parameters, so `since` is written into the statement, but as a literal
/// fhirbox prints itself from a parsed timestamp (digits, `-`, `:`, `.` and a space), never
/// as text from the request.
pub fn dump_sql(rt: ResourceType, since: Option<&DateTime<Utc>>) -> String {
    let filter = since
        .map(|at| format!(" WHERE cts > {}", super::timestamp_literal(at)))
        .unwrap_or_default();
    format!(
        "COPY (SELECT id, txid, cts, ts, resource FROM {}{filter}) TO STDOUT (FORMAT binary)",
        rt.table()
    )
}

/// Starts the dump. One statement, so one snapshot: rows committed while it runs are either
/// all in or all out, never a mix of one resource's versions.
pub async fn current_versions(
    store: &Store,
    rt: ResourceType,
    since: Option<&DateTime<Utc>>,
) -> Result<CopyOut, StoreError> {
    copy_out(store, &dump_sql(rt, since)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_a_literal_printed_from_a_timestamp() {
        let rt = ResourceType::parse("Patient").expect("known");
        let at = DateTime::parse_from_rfc3339("2021-06-10T08:26:10.5+02:00")
            .map(|t| t.with_timezone(&Utc))
            .expect("valid");
        assert_eq!(
            dump_sql(rt, Some(&at)),
            "COPY (SELECT id, txid, cts, ts, resource FROM \"patient\" \
             WHERE cts > '2021-06-10 06:26:10.500000+00'::timestamptz) TO STDOUT (FORMAT binary)"
        );
    }
}
