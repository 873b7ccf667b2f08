//! SQL on FHIR v2 views: `ViewDefinition` resources ([`definition`], with the FHIRPath
//! subset in [`crate::fhirpath`]) compiled to one PostgreSQL query ([`sql`]) and run
//! ([`run`]) as CSV, NDJSON or JSON, streamed from COPY like `$dump-sql`, under the same
//! reader role, timeout and limits.

pub mod definition;
pub mod materialize;
pub mod parquet;
pub mod run;
pub mod sql;

use crate::store::dump_sql::QueryError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// The view (or a run parameter) is not valid; `at` names the element.
    #[error("{at}: {message}")]
    Invalid { at: String, message: String },
    #[error("ViewDefinition/{0} is not known")]
    NotFound(String),
    /// A materialized relation's name belongs to another ViewDefinition.
    #[error("{relation} belongs to ViewDefinition/{owner}, which materialized it: give this view another name, or delete that one")]
    Taken { relation: String, owner: String },
    /// The result broke a limit before its first row.
    #[error("{0}")]
    Limit(String),
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ViewError {
    /// The element the error is about, for the OperationOutcome's `expression`.
    pub fn expression(&self) -> Option<&str> {
        match self {
            ViewError::Invalid { at, .. } => Some(at),
            _ => None,
        }
    }
}

/// Checks a ViewDefinition before it is stored: it parses, and it compiles (functions known,
/// column names unique, single-valued columns single-valued) within the generous
/// [`ViewLimits::ceiling`](crate::views::sql::ViewLimits::ceiling); each run is checked
/// against the limits in force.
pub fn check(doc: &serde_json::Value) -> Result<(), ViewError> {
    let view = definition::View::parse(doc)?;
    crate::views::sql::compile(
        &view,
        None,
        &Default::default(),
        crate::views::sql::Columns::Json,
        &crate::views::sql::ViewLimits::ceiling(),
    )?;
    Ok(())
}
