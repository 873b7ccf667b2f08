//! FHIRPath to PostgreSQL: the one front end for everything that evaluates FHIRPath over
//! the stored resources.
//!
//! [`parse`] reads an expression into an [`Expr`] tree (the grammar's precedence, names
//! limited to what can be a JSON key). [`to_sql`] turns a tree into one typed SQL expression
//! over a resource's native jsonb, guided by the generated R4 element table: every value
//! knows its [`Shape`] (a boolean, one item, or a collection) and its FHIR type, which is
//! what maps FHIR paths onto the native format. SQL on FHIR views (`views::sql`) assemble
//! whole statements from these expressions; nothing here runs SQL (`store` executes what
//! the callers build), and nothing here knows about views.
//!
//! Errors are [`FhirPathError`]s, in words a person can act on; callers add where in their
//! document the expression was.

mod expr;
mod functions;
pub mod operators;
mod parse;

use std::cell::Cell;

pub use expr::{
    as_bool, as_many, as_one, as_text, json_literal, literal, resolve, Focus, Scope, Shape, Ty,
    Val, MAX_EXPRESSION_SQL,
};
pub use functions::SUPPORTED as SUPPORTED_FUNCTIONS;
pub use parse::{Expr, Op};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FhirPathError {
    /// The text is not a FHIRPath expression this parser reads.
    #[error("{0}")]
    Syntax(String),
    /// It parses, but cannot be compiled: an unknown function or constant, a type that has
    /// no such element, an expression over its SQL bound.
    #[error("{0}")]
    Compile(String),
}

/// Parses one expression.
pub fn parse(text: &str) -> Result<Expr, FhirPathError> {
    parse::parse(text).map_err(FhirPathError::Syntax)
}

/// Compiles `expr`, evaluated on `focus`, to SQL (its SQL counted against the scope's
/// budget only by the caller, which knows what the statement holds).
pub fn to_sql<'a>(
    scope: &Scope<'a, '_>,
    focus: &Focus<'a>,
    expr: &Expr,
) -> Result<Val<'a>, FhirPathError> {
    expr::compile(scope, focus, expr).map_err(FhirPathError::Compile)
}

/// A named value an expression refers to as `%name` (a view's `constant`, a search's
/// parameter value).
#[derive(Debug, Clone)]
pub struct Constant {
    pub name: String,
    /// The value, with the FHIR type named by its `value[x]` key (`string`, `integer`).
    pub value: serde_json::Value,
    pub fhir_type: String,
}

/// The SQL written so far for one statement, against its bound: some functions repeat
/// their operand, and PostgreSQL's parser and planner take memory in proportion to the
/// statement, so whoever builds a statement bounds all of it.
pub struct Budget {
    spent: Cell<usize>,
    pub limit: usize,
    /// The flag that sets the bound, for the message.
    pub flag: &'static str,
}

impl Budget {
    pub fn new(limit: usize, flag: &'static str) -> Budget {
        Budget {
            spent: Cell::new(0),
            limit,
            flag,
        }
    }

    /// Counts `bytes` more; `false` once the total is over the bound.
    pub fn spend(&self, bytes: usize) -> bool {
        let total = self.spent.get().saturating_add(bytes);
        self.spent.set(total);
        total <= self.limit
    }
}
