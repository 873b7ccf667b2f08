//! `$materialize`: a stored ViewDefinition as `sof.<name>` in PostgreSQL (a view, a
//! materialized view or a table, with SQL column types from the declared FHIR types), so
//! `$dump-sql` can join views with each other and with resource tables. The name is the
//! view's `name`. Running it again rebuilds; writing the ViewDefinition rebuilds every
//! materialization of it in the same transaction; deleting it drops them.

use serde_json::Value;

use super::definition::View;
use super::ViewError;
use crate::bulk::bounds::OutputBounds;
use crate::format::attributes::Rules;
use crate::resource_type::ResourceType;
use crate::store::conn::Tx;
use crate::store::dump_sql::QueryError;
use crate::store::materialized::{self, Bounded, Created, Kind};
use crate::store::session::SessionLimits;
use crate::store::{GenericClient, Store};
use crate::views::sql::{self as view_sql, Columns, Rows, ViewLimits};

/// What a materialization may take: its session on the server, how big it may compile, how
/// much it may write.
pub struct Limits {
    pub session: SessionLimits,
    pub compile: ViewLimits,
    pub output: OutputBounds,
}

pub struct Materialized {
    /// `sof.<name>`.
    pub relation: String,
    pub kind: Kind,
    pub columns: Vec<String>,
}

/// The compiled statement and the view's name.
fn compile(
    doc: &Value,
    rules: &Rules,
    limits: &ViewLimits,
) -> Result<(String, view_sql::Compiled), ViewError> {
    let view = View::parse(doc)?;
    let name = view
        .name
        .clone()
        .filter(|name| super::definition::is_column_name(name))
        .ok_or_else(|| ViewError::Invalid {
            at: "name".into(),
            message:
                "materializing needs the view's name: letters, digits and _ (it becomes sof.<name>)"
                    .into(),
        })?;
    let compiled = view_sql::compile(
        &view,
        rules.for_type(&view.resource),
        &Rows::default(),
        Columns::Typed,
        limits,
    )?;
    Ok((name, compiled))
}

/// Creates `sof.<name>` in a transaction of its own, within `timeout`.
pub async fn materialize(
    store: &Store,
    rules: &Rules,
    view_id: &str,
    doc: &Value,
    kind: Kind,
    limits: &Limits,
) -> Result<Materialized, ViewError> {
    let Limits {
        session,
        compile: limits,
        output: bounds,
    } = limits;
    let (name, compiled) = compile(doc, rules, limits)?;
    let tx = store.begin().await?;
    let result = async {
        session.apply(&*tx).await?;
        let query = bounded(&compiled, bounds);
        let created = materialized::create(&*tx, &name, kind, &query, view_id)
            .await
            .map_err(|e| ViewError::Query(QueryError::from_store(e, 0)))?;
        match created {
            Created::Done => Ok(()),
            Created::OwnedBy(owner) => Err(ViewError::Taken {
                relation: format!("sof.{name}"),
                owner,
            }),
        }
    }
    .await;
    tx.finish(result).await?;
    Ok(Materialized {
        relation: format!("sof.{name}"),
        kind,
        columns: compiled.columns,
    })
}

/// A ViewDefinition was written: its materializations are rebuilt from the new body.
pub async fn rebuild(tx: &Tx, view_id: &str, doc: &Value) -> Result<(), ViewError> {
    let existing = materialized::of_view(&**tx, view_id).await?;
    if existing.is_empty() {
        return Ok(());
    }
    let attribute = ResourceType::parse("Attribute").expect("a fhirbox type");
    let attributes = crate::store::cached::all_of(&**tx, attribute).await?;
    let rules = Rules::from_attributes(attributes.iter().map(|(_, body)| body));
    let (_, compiled) = compile(doc, &rules, &ViewLimits::ceiling())?;
    SessionLimits::view_defaults().apply(&**tx).await?;
    for (name, kind) in existing {
        let query = bounded(&compiled, &OutputBounds::default());
        materialized::create(&**tx, &name, kind, &query, view_id)
            .await
            .map_err(|e| ViewError::Query(QueryError::from_store(e, 0)))?;
    }
    Ok(())
}

fn bounded<'a>(compiled: &'a view_sql::Compiled, bounds: &OutputBounds) -> Bounded<'a> {
    Bounded {
        sql: &compiled.sql,
        columns: &compiled.columns,
        max_rows: bounds.rows,
        max_bytes: bounds.bytes,
    }
}

/// A ViewDefinition was deleted: its materializations go too.
pub async fn drop_all(client: &impl GenericClient, view_id: &str) -> Result<(), ViewError> {
    Ok(materialized::drop_all(client, view_id).await?)
}
