//! Views materialized in PostgreSQL: `sof.<name>` as a view, a materialized view or a table,
//! readable by `$dump-sql`'s roles (the schema's default privileges grant them `SELECT`), and
//! recorded in `fhirbox_materialized` with the ViewDefinition they come from, so a change of
//! that ViewDefinition rebuilds them and its deletion drops them.
//!
//! The statement inside is a compiled view (`views::sql`), whose user literals are
//! escaped constants; `name` was checked to be an identifier and is quoted besides.

use super::{GenericClient, StoreError};

/// Run at every start-up. A database where fhirbox may not create a schema still starts
/// (materializing then fails with PostgreSQL's reason).
pub const SCHEMA_DDL: &str = "
DO $$ BEGIN
  CREATE SCHEMA IF NOT EXISTS sof;
EXCEPTION WHEN insufficient_privilege THEN
  RAISE WARNING 'fhirbox cannot create the schema sof: views cannot be materialized';
END $$;
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    View,
    MaterializedView,
    Table,
}

impl Kind {
    pub fn parse(text: &str) -> Option<Kind> {
        match text {
            "view" => Some(Kind::View),
            "materialized-view" => Some(Kind::MaterializedView),
            "table" => Some(Kind::Table),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::MaterializedView => "materialized-view",
            Kind::Table => "table",
        }
    }

    fn sql(self) -> &'static str {
        match self {
            Kind::View => "VIEW",
            Kind::MaterializedView => "MATERIALIZED VIEW",
            Kind::Table => "TABLE",
        }
    }
}

/// Drops `sof.<name>` whatever kind of relation it is.
async fn drop_relation(client: &impl GenericClient, name: &str) -> Result<(), StoreError> {
    let kind: Option<String> = client
        .query_opt(
            "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'sof' AND c.relname = $1",
            &[&name],
        )
        .await?
        .map(|row| row.get(0));
    let what = match kind.as_deref() {
        Some("v") => "VIEW",
        Some("m") => "MATERIALIZED VIEW",
        Some("r") => "TABLE",
        _ => return Ok(()),
    };
    client
        .batch_execute(&format!("DROP {what} sof.\"{name}\""))
        .await?;
    Ok(())
}

/// A compiled view's query, with its columns and the rows and bytes it may write.
pub struct Bounded<'a> {
    pub sql: &'a str,
    pub columns: &'a [String],
    pub max_rows: u64,
    pub max_bytes: u64,
}

impl Bounded<'_> {
    /// The query, each row counted by `fhirbox_view_guard`, which stops it past its bounds.
    /// Column names are checked identifiers; the bounds are numbers.
    fn guarded(&self) -> String {
        let columns: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("fhirbox_m.\"{c}\""))
            .collect();
        format!(
            "SELECT {} FROM (\n{}\n) AS fhirbox_m WHERE fhirbox_view_guard(pg_column_size(fhirbox_m.*), {}, {})",
            columns.join(", "),
            self.sql,
            self.max_rows.min(i64::MAX as u64),
            self.max_bytes.min(i64::MAX as u64)
        )
    }
}

/// What [`create`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Created {
    Done,
    /// Nothing: the name belongs to this other ViewDefinition.
    OwnedBy(String),
}

/// Creates (or replaces) `sof.<name>` from a compiled query, in the caller's transaction,
/// and records it; a name another ViewDefinition materialized stays that one's.
pub async fn create(
    client: &impl GenericClient,
    name: &str,
    kind: Kind,
    query: &Bounded<'_>,
    view_id: &str,
) -> Result<Created, StoreError> {
    // One materialization of a name at a time, across processes.
    client
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext('fhirbox_materialized'), hashtext($1))",
            &[&name],
        )
        .await?;
    let owner: Option<String> = client
        .query_opt(
            "SELECT view_id FROM fhirbox_materialized WHERE name = $1",
            &[&name],
        )
        .await?
        .map(|row| row.get(0));
    if let Some(owner) = owner.filter(|owner| owner != view_id) {
        return Ok(Created::OwnedBy(owner));
    }
    drop_relation(client, name).await?;
    let statement = match kind {
        // A view holds no rows: what reads it is bounded by its own limits.
        Kind::View => query.sql.to_string(),
        Kind::MaterializedView | Kind::Table => {
            client
                .batch_execute(
                    "SELECT set_config('fhirbox.guard_rows', '0', true), set_config('fhirbox.guard_bytes', '0', true)",
                )
                .await?;
            query.guarded()
        }
    };
    client
        .batch_execute(&format!(
            "CREATE {} sof.\"{name}\" AS\n{statement}",
            kind.sql()
        ))
        .await?;
    client
        .execute(
            "INSERT INTO fhirbox_materialized (name, view_id, kind) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET view_id = $2, kind = $3, created_at = now()",
            &[&name, &view_id, &kind.as_str()],
        )
        .await?;
    Ok(Created::Done)
}

/// The materializations of one ViewDefinition: (name, kind).
pub async fn of_view(
    client: &impl GenericClient,
    view_id: &str,
) -> Result<Vec<(String, Kind)>, StoreError> {
    let rows = client
        .query(
            "SELECT name, kind FROM fhirbox_materialized WHERE view_id = $1 ORDER BY name",
            &[&view_id],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| Some((row.get(0), Kind::parse(row.get(1))?)))
        .collect())
}

/// Drops every materialization of a ViewDefinition (it was deleted).
pub async fn drop_all(client: &impl GenericClient, view_id: &str) -> Result<(), StoreError> {
    for (name, _) in of_view(client, view_id).await? {
        drop_relation(client, &name).await?;
        client
            .execute("DELETE FROM fhirbox_materialized WHERE name = $1", &[&name])
            .await?;
    }
    Ok(())
}
