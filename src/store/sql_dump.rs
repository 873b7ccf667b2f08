//! The SQL of `$dump-sql`: a client's query, run as the reader role
//! ([`super::schema::SQL_READER_ROLE`]) on a connection of its own, in a read-only transaction
//! with a statement timeout.
//!
//! The query is described first (parsed, not run): that refuses more than one statement
//! (`select 1; drop table patient`), finds syntax errors and unknown tables or columns with
//! their position, and gives the columns and the parameter types. Without parameters it is
//! streamed by COPY (which takes no parameters); with them, from a portal of a wrapper query.
//! Either way the client's text is only ever placed inside one statement of ours, after the
//! describe step showed it is one query.

use std::time::Duration;

use bytes::BytesMut;
use tokio_postgres::types::{to_sql_checked, Format, IsNull, ToSql, Type};
use tokio_postgres::Statement;

use super::{Connection, StoreError};

/// Opens the read-only transaction (one snapshot) with its timeout.
pub async fn begin(conn: &Connection, timeout: Duration) -> Result<(), StoreError> {
    // The timeout is a number fhirbox prints; SET takes no bind parameters.
    conn.batch_execute(&format!(
        "BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ; SET LOCAL statement_timeout = {}",
        timeout.as_millis()
    ))
    .await?;
    Ok(())
}

/// Parses and describes the query without running it.
pub async fn describe(conn: &Connection, query: &str) -> Result<Statement, StoreError> {
    Ok(conn.prepare(query).await?)
}

/// Where the client's query starts inside one of the wrapping statements below (to map an
/// error position, which PostgreSQL gives in characters, back into the client's text).
pub fn query_offset(wrapped: &str, query: &str) -> usize {
    wrapped
        .find(query)
        .map_or(0, |bytes| wrapped[..bytes].chars().count())
}

/// TSV: PostgreSQL's text COPY, with NULL as an empty field.
pub fn copy_tsv_sql(query: &str) -> String {
    format!("COPY (\n{query}\n) TO STDOUT (FORMAT text, NULL '')")
}

/// NDJSON: one `row_to_json` per row, as binary COPY (so the JSON is not escaped again).
pub fn copy_ndjson_sql(query: &str) -> String {
    format!("COPY (SELECT row_to_json(fhirbox_q)::text FROM (\n{query}\n) fhirbox_q) TO STDOUT (FORMAT binary)")
}

/// Rows as arrays of their columns' text (with parameters: no COPY).
pub fn tsv_rows_sql(query: &str, columns: usize) -> String {
    let names: Vec<String> = (1..=columns).map(|i| format!("c{i}")).collect();
    let texts: Vec<String> = names.iter().map(|c| format!("{c}::text")).collect();
    format!(
        "SELECT ARRAY[{}]::text[] FROM (\n{query}\n) AS fhirbox_q({})",
        texts.join(", "),
        names.join(", ")
    )
}

/// Rows as `row_to_json` text (with parameters: no COPY).
pub fn ndjson_rows_sql(query: &str) -> String {
    format!("SELECT row_to_json(fhirbox_q)::text FROM (\n{query}\n) fhirbox_q")
}

/// A parameter sent in text format: PostgreSQL parses it with the input function of whatever
/// type it inferred for `$n`, so `'42'` binds to a bigint and `'2021-06-10'` to a date.
#[derive(Debug)]
pub struct TextParam(pub Option<String>);

impl ToSql for TextParam {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            Some(text) => {
                out.extend_from_slice(text.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrappers_keep_the_query_on_its_own_lines() {
        assert_eq!(
            copy_ndjson_sql("select 1 -- a comment"),
            "COPY (SELECT row_to_json(fhirbox_q)::text FROM (\nselect 1 -- a comment\n) fhirbox_q) TO STDOUT (FORMAT binary)"
        );
        assert_eq!(
            tsv_rows_sql("select a, b from t", 2),
            "SELECT ARRAY[c1::text, c2::text]::text[] FROM (\nselect a, b from t\n) AS fhirbox_q(c1, c2)"
        );
        assert!(copy_tsv_sql("select 1").starts_with("COPY (\nselect 1\n)"));
    }
}
