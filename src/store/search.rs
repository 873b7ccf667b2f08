//! The statements a FHIR search runs: a page of a type's current resources that match a
//! filter, in the order the search asks for, after the last row of the previous page (keyset
//! paging); how many match; and the references a few resources hold (`_include`).
//!
//! Keyset paging: a page starts after the previous page's last row, compared on the sort
//! keys and then the id (unique), so a page never repeats or skips a resource because others
//! were written meanwhile, and page 10 costs what page 1 does. The keys are SQL that `search`
//! compiled from the R4 definitions; every value a client sent is a bind parameter.

use tokio_postgres::types::ToSql;

use super::condition::Condition;
use super::resources::{from_row, COLUMNS};
use super::{GenericClient, StoreError};
use crate::resource::StoredResource;
use crate::resource_type::ResourceType;

/// What a search page is filtered by: the table's own columns (`_id`, `_lastUpdated`) and
/// the search's other criteria, compiled by `search` to one condition on `r.resource`.
#[derive(Debug, Default, Clone)]
pub struct PageFilter {
    pub ids: Option<Vec<String>>,
    pub updated_from: Option<chrono::DateTime<chrono::Utc>>,
    pub updated_before: Option<chrono::DateTime<chrono::Utc>>,
    pub condition: Option<Condition>,
    /// The longest the page's statement may run, where the transaction does not bound it
    /// already (a conditional write's search, inside the write's transaction).
    pub timeout: Option<std::time::Duration>,
}

/// The SQL type of a sort key, which says how a cursor's text is read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Text,
    Number,
    Instant,
}

/// One key a page is ordered by (missing values last, in both directions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    /// An expression on the row `r` (its `id`, `ts` or `resource`), with no values in it.
    pub sql: String,
    pub ty: KeyType,
    pub descending: bool,
}

/// Where a page starts: after the row whose keys were these (as text; `None`: missing) and
/// whose id was this.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct After {
    pub keys: Vec<Option<String>>,
    pub id: String,
}

/// A row of a page and its sort keys as text (for the next page's [`After`]).
pub type Ranked = (StoredResource, Vec<Option<String>>);

type Param<'a> = &'a (dyn ToSql + Sync);

/// The filter as SQL on `r`, its values appended to `params` (numbered after what is there
/// already): bind parameters only.
fn filter_sql<'a>(filter: &'a PageFilter, params: &mut Vec<Param<'a>>) -> String {
    let n = params.len();
    let mut sql = format!(
        "(${a}::text[] IS NULL OR r.id = ANY(${a}))
            AND (${b}::timestamptz IS NULL OR r.ts >= ${b})
            AND (${c}::timestamptz IS NULL OR r.ts < ${c})",
        a = n + 1,
        b = n + 2,
        c = n + 3
    );
    params.extend([
        &filter.ids as Param<'a>,
        &filter.updated_from,
        &filter.updated_before,
    ]);
    if let Some(condition) = &filter.condition {
        sql.push_str(&format!(" AND ({})", condition_sql(condition, params)));
    }
    sql
}

/// A condition's SQL with its values appended to `params`.
fn condition_sql<'a>(condition: &'a Condition, params: &mut Vec<Param<'a>>) -> String {
    let first = params.len() + 1;
    let rendered = condition.render(|i| format!("${}", first + i));
    params.extend(condition.binds.iter().map(|b| b as Param<'a>));
    rendered
}

/// Prepares a statement; those with search conditions or keys vary with the request: not
/// worth caching (and the cache must not grow with what clients send).
async fn prepare(
    client: &impl GenericClient,
    cached: bool,
    sql: &str,
) -> Result<tokio_postgres::Statement, StoreError> {
    Ok(if cached {
        client.prepare_cached(sql).await?
    } else {
        client.prepare(sql).await?
    })
}

/// A key as text that reads back as the same value (instants in UTC, ISO 8601).
fn key_text(key: &SortKey, column: &str) -> String {
    match key.ty {
        KeyType::Instant => format!(
            "CASE WHEN isfinite({column}) THEN to_char({column} AT TIME ZONE 'UTC', \
             'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') ELSE {column}::text END"
        ),
        _ => format!("{column}::text"),
    }
}

fn cast(ty: KeyType) -> &'static str {
    match ty {
        KeyType::Text => "text",
        KeyType::Number => "numeric",
        KeyType::Instant => "timestamptz",
    }
}

/// The condition "this row comes after `after`" in the order `keys` then id: for each key,
/// a missing value comes after every present one, and an equal one defers to the next key.
fn after_sql<'a>(keys: &[SortKey], after: &'a After, params: &mut Vec<Param<'a>>) -> String {
    params.push(&after.id);
    let mut sql = format!("s.id > ${}", params.len());
    for (i, key) in keys.iter().enumerate().rev() {
        let k = format!("s.k{i}");
        sql = match after.keys.get(i).and_then(Option::as_ref) {
            None => format!("({k} IS NULL AND {sql})"),
            Some(value) => {
                params.push(value);
                // Bound as text (PostgreSQL would take `$n::numeric` to be a numeric parameter).
                let v = format!("${}::text::{}", params.len(), cast(key.ty));
                let beyond = if key.descending { "<" } else { ">" };
                format!("({k} IS NULL OR {k} {beyond} {v} OR ({k} = {v} AND {sql}))")
            }
        };
    }
    sql
}

/// A page of current resources matching `filter`, ordered by `keys` then id, starting after
/// `after`: at most `limit` rows, each with its keys.
pub async fn page(
    client: &impl GenericClient,
    rt: ResourceType,
    filter: &PageFilter,
    keys: &[SortKey],
    after: Option<&After>,
    limit: i64,
) -> Result<Vec<Ranked>, StoreError> {
    let mut params: Vec<Param<'_>> = vec![&limit];
    let condition = filter_sql(filter, &mut params);
    let start = match after {
        Some(after) => after_sql(keys, after, &mut params),
        None => "true".into(),
    };
    let computed: String = keys
        .iter()
        .enumerate()
        .map(|(i, key)| format!(", ({}) AS k{i}", key.sql))
        .collect();
    let texts: String = (0..keys.len())
        .map(|i| format!(", {}", key_text(&keys[i], &format!("s.k{i}"))))
        .collect();
    let order: String = keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let direction = if key.descending { " DESC" } else { "" };
            format!("s.k{i} IS NULL, s.k{i}{direction}, ")
        })
        .collect();
    // With keys, `OFFSET 0` keeps the inner query apart, so each key is computed once per
    // row (pulled up, it would be computed again in the WHERE, the ORDER BY and the output).
    let fence = if keys.is_empty() { "" } else { " OFFSET 0" };
    let sql = format!(
        "SELECT {COLUMNS}{texts} FROM (SELECT r.*{computed} FROM {} AS r WHERE {condition}{fence}) \
         AS s WHERE {start} ORDER BY {order}s.id LIMIT $1",
        rt.table()
    );
    let statement = prepare(client, filter.condition.is_none() && keys.is_empty(), &sql).await?;
    let rows = client.query(&statement, &params).await?;
    Ok(rows
        .iter()
        .map(|row| {
            let keys = (0..keys.len()).map(|i| row.get(6 + i)).collect();
            (from_row(rt, row), keys)
        })
        .collect())
}

/// How many current resources match the filter (a search's `_total`).
pub async fn count(
    client: &impl GenericClient,
    rt: ResourceType,
    filter: &PageFilter,
) -> Result<i64, StoreError> {
    let mut params: Vec<Param<'_>> = Vec::new();
    let condition = filter_sql(filter, &mut params);
    let sql = format!("SELECT count(*) FROM {} AS r WHERE {condition}", rt.table());
    let statement = prepare(client, filter.condition.is_none(), &sql).await?;
    Ok(client.query_one(&statement, &params).await?.get(0))
}

/// The `(type, id)` references that the resources `ids` of `rt` hold in `values` (an
/// expression on `r.resource` giving a jsonb array of references, from `search`), at most
/// `limit`.
pub async fn references(
    client: &impl GenericClient,
    rt: ResourceType,
    ids: &[String],
    values: &str,
    limit: i64,
) -> Result<Vec<(String, String)>, StoreError> {
    let sql = format!(
        "SELECT DISTINCT v ->> 'resourceType', v ->> 'id' FROM {} AS r,
                jsonb_array_elements(coalesce({values}, '[]'::jsonb)) AS v
          WHERE r.id = ANY($1) AND jsonb_typeof(v) = 'object'
            AND v ->> 'resourceType' IS NOT NULL AND v ->> 'id' IS NOT NULL
          ORDER BY 1, 2 LIMIT $2",
        rt.table()
    );
    let statement = client.prepare(&sql).await?;
    let rows = client.query(&statement, &[&ids, &limit]).await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// The transaction one search reads in: its statements together may run `timeout`, and
/// are planned
/// - without JIT compilation, which costs a search over many rows more than it saves (25-55
///   ms of a 45 ms chain, measured at 1M resources);
/// - with random reads priced as on an SSD or in memory (`random_page_cost` 1.1, not the 4
///   of spinning disks): search answers from index probes, and at 4 PostgreSQL scanned 23k
///   Patients for a chain instead (146 ms against 36 ms, measured).
pub async fn read_transaction(
    conn: &mut super::Connection,
    timeout: std::time::Duration,
) -> Result<deadpool_postgres::Transaction<'_>, StoreError> {
    let tx = conn.build_transaction().read_only(true).start().await?;
    // A number fhirbox prints, never request text.
    tx.batch_execute(&format!(
        "SET LOCAL jit = off; SET LOCAL random_page_cost = 1.1; \
         SET LOCAL statement_timeout = {}",
        timeout.as_millis().max(1)
    ))
    .await?;
    Ok(tx)
}

/// [`page`] with the filter's `timeout` as the statement's (the rest of the transaction
/// keeps the server's default).
pub async fn bounded_page(
    client: &impl GenericClient,
    rt: ResourceType,
    filter: &PageFilter,
    limit: i64,
) -> Result<Vec<Ranked>, StoreError> {
    let Some(timeout) = filter.timeout else {
        return page(client, rt, filter, &[], None, limit).await;
    };
    // A number fhirbox prints, never request text.
    client
        .batch_execute(&format!(
            "SET LOCAL statement_timeout = {}",
            timeout.as_millis().max(1)
        ))
        .await?;
    let found = page(client, rt, filter, &[], None, limit).await?;
    client
        .batch_execute("SET LOCAL statement_timeout TO DEFAULT")
        .await?;
    Ok(found)
}

/// Serializes the conditional writes of one type until the transaction ends (an advisory
/// lock keyed by the table): two conditional creates of the same identifier cannot both
/// find nothing and both create. Writes that are not conditional do not wait for it.
pub async fn lock_conditional(
    client: &impl GenericClient,
    rt: ResourceType,
) -> Result<(), StoreError> {
    let statement = client
        .prepare_cached("SELECT pg_advisory_xact_lock(hashtext($1))")
        .await?;
    let key = format!("fhirbox conditional write {}", rt.table());
    client.execute(&statement, &[&key]).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(descending: bool) -> SortKey {
        SortKey {
            sql: "x".into(),
            ty: KeyType::Text,
            descending,
        }
    }

    #[test]
    fn a_page_starts_after_the_last_row_key_by_key() {
        let after = After {
            keys: vec![Some("b".into()), None],
            id: "7".into(),
        };
        let mut params: Vec<Param<'_>> = Vec::new();
        let sql = after_sql(&[key(false), key(true)], &after, &mut params);
        assert_eq!(
            sql,
            "(s.k0 IS NULL OR s.k0 > $2::text::text OR (s.k0 = $2::text::text AND (s.k1 IS NULL AND s.id > $1)))"
        );
        assert_eq!(params.len(), 2);
    }
}
