//! A ViewDefinition compiled to one PostgreSQL query over the type's table.
//!
//! Each `select` becomes a subquery joined `LATERAL` to its parent: `forEach` is
//! `jsonb_array_elements(..) WITH ORDINALITY` (the ordinality is `%rowIndex`), `forEachOrNull`
//! the same behind a `LEFT JOIN`, `repeat` a recursive CTE, nested `select`s are cross joins
//! and `unionAll` a `UNION ALL` of its branches. Columns are jsonb inside and come out as
//! jsonb (for JSON output) or text (for CSV). The statement reads only the type's table
//! (`r`), so it runs under `$dump-sql`'s reader role, limits and timeout unchanged.

mod limits;

pub use limits::ViewLimits;

use std::cell::{Cell, RefCell};
use std::collections::HashSet;

use crate::fhirpath::{
    self, as_bool, as_many, as_one, operators, Budget, Expr, Focus, Scope, Shape, Ty, Val,
};
use crate::format::attributes::TypeAttributes;
use crate::resource_type::ResourceType;
use crate::views::definition::{Iterate, Select, View};
use crate::views::ViewError;

/// How column values leave the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Columns {
    /// jsonb: numbers, booleans and arrays keep their JSON types.
    Json,
    /// text: a string's characters, a number's digits, `true`/`false`.
    Text,
    /// SQL types from the declared FHIR types (for materializing): `boolean`, `bigint` for
    /// the integer types, `numeric` for `decimal`, `jsonb` for collections, `text` for the
    /// rest (dates and times as written: no time zone shift).
    Typed,
}

/// A column's SQL type when materialized (Parquet's types follow it).
pub fn sql_type(fhir_type: Option<&str>, collection: bool) -> &'static str {
    if collection {
        return "jsonb";
    }
    match fhir_type {
        Some("boolean") => "boolean",
        Some("integer" | "positiveInt" | "unsignedInt" | "integer64") => "bigint",
        Some("decimal") => "numeric",
        _ => "text",
    }
}

/// Which rows of the table a run reads.
#[derive(Debug, Clone, Default)]
pub struct Rows {
    /// Only these patients' compartment (ids), when given.
    pub patients: Option<Vec<String>>,
    /// Only resources changed after this instant (RFC 3339, checked by the caller).
    pub since: Option<String>,
    pub limit: Option<u64>,
}

#[derive(Debug)]
pub struct Compiled {
    pub sql: String,
    pub columns: Vec<String>,
    /// With [`Columns::Json`], per column: a text to write as a JSON string (else the text
    /// of a JSON value).
    pub json_strings: Vec<bool>,
}

impl Compiled {
    /// The columns with their JSON kind, as `bulk::dump_sql::json_rows` writes them.
    pub fn json_fields(&self) -> Vec<(String, bool)> {
        self.columns
            .iter()
            .cloned()
            .zip(self.json_strings.iter().copied())
            .collect()
    }
}

/// Views with more `select`s than this (nested, `forEach`, `unionAll` branches, counted over
/// the whole view) plan each as a subquery of its own (see `select_sql`).
const FLAT_SELECTS: usize = 8;

/// Compiles one expression of the view (a column, a `forEach`, a `where`), counting its SQL
/// against the statement's budget.
fn compile_expr<'a>(
    scope: &Scope<'a, '_>,
    focus: &Focus<'a>,
    expr: &Expr,
) -> Result<Val<'a>, String> {
    let val = fhirpath::to_sql(scope, focus, expr).map_err(|e| e.to_string())?;
    if !scope.budget.spend(val.sql.len()) {
        return Err(format!(
            "the view compiles to more than {} bytes of SQL (--view-max-sql-bytes); simplify it",
            scope.budget.limit
        ));
    }
    Ok(val)
}

fn invalid(at: &str, message: impl Into<String>) -> ViewError {
    ViewError::Invalid {
        at: at.to_string(),
        message: message.into(),
    }
}

/// Compiles the view, within `limits`. `attributes`: the type's first-class extensions now in
/// force.
pub fn compile(
    view: &View,
    attributes: Option<&TypeAttributes>,
    rows: &Rows,
    output: Columns,
    limits: &ViewLimits,
) -> Result<Compiled, ViewError> {
    let rt = ResourceType::parse(&view.resource)
        .ok_or_else(|| invalid("resource", format!("'{}' is not stored", view.resource)))?;
    let selects = limits.check_shape(view)?;
    let budget = Budget::new(limits.sql_bytes, "--view-max-sql-bytes");
    let resource: &'static str = rt.name();
    let counter = Cell::new(0);
    let text_columns = RefCell::new(HashSet::new());
    let scope = Scope {
        row: "r",
        resource,
        constants: &view.constants,
        attributes,
        counter: &counter,
        text_columns: &text_columns,
        budget: &budget,
        fence: selects > FLAT_SELECTS,
    };
    let mut root = Val::new("r.resource", Shape::One, Ty::Complex(resource));
    root.root = true;
    let focus = Focus {
        this: root,
        row_index: "0".into(),
    };
    let top = Select {
        at: "ViewDefinition".into(),
        columns: Vec::new(),
        select: view.select.clone(),
        iterate: None,
        union_all: Vec::new(),
    };
    let body = select_sql(&scope, &focus, &top, output, false)?;
    let columns: Vec<String> = top
        .column_names()?
        .into_iter()
        .map(|(_, name)| name)
        .collect();
    // JSON output: every column as text (binary COPY hands text over as it is), each marked
    // as a string to quote or JSON to copy.
    let text_columns = text_columns.borrow().clone();
    let json_strings: Vec<bool> = columns.iter().map(|c| text_columns.contains(c)).collect();
    let outer: Vec<String> = columns
        .iter()
        .zip(&json_strings)
        .map(|(c, string)| match output {
            Columns::Json if !string => format!("v.\"{c}\"::text AS \"{c}\""),
            _ => format!("v.\"{c}\""),
        })
        .collect();
    let mut conditions = Vec::new();
    for (at, path) in &view.filters {
        let val = compile_expr(&scope, &focus, path).map_err(|m| invalid(at, m))?;
        let boolean =
            val.shape == Shape::Bool || matches!(val.ty, Ty::Primitive("boolean") | Ty::Unknown);
        if !boolean {
            return Err(invalid(at, "a where path must give a boolean"));
        }
        conditions.push(as_bool(&val));
    }
    conditions.extend(row_conditions(rt, rows)?);
    let table = rt.table();
    let mut sql = format!(
        "SELECT {} FROM {table} AS r CROSS JOIN LATERAL (\n{body}\n) AS v",
        if outer.is_empty() {
            "NULL".into()
        } else {
            outer.join(", ")
        }
    );
    if !conditions.is_empty() {
        sql.push_str(&format!("\nWHERE {}", conditions.join(" AND ")));
    }
    if let Some(limit) = rows.limit {
        sql.push_str(&format!("\nLIMIT {limit}"));
    }
    if sql.len() > limits.sql_bytes {
        return Err(limits.too_much_sql("select"));
    }
    Ok(Compiled {
        sql,
        columns,
        json_strings,
    })
}

/// The run's row filters: a patient compartment, `_since`.
fn row_conditions(rt: ResourceType, rows: &Rows) -> Result<Vec<String>, ViewError> {
    let mut conditions = Vec::new();
    if let Some(patients) = &rows.patients {
        let ids: Vec<String> = patients.iter().map(|id| fhirpath::literal(id)).collect();
        let ids = format!("ARRAY[{}]::text[]", ids.join(", "));
        if rt.name() == "Patient" {
            conditions.push(format!("r.id = ANY({ids})"));
        } else if crate::store::export::compartment_paths(rt.name()).is_some() {
            let function = crate::store::export::patients_function(rt);
            conditions.push(format!("{function}(r.resource) ?| {ids}"));
        } else {
            return Err(invalid(
                "patient",
                format!("{} is not in the Patient compartment: a view of it cannot be limited to patients", rt.name()),
            ));
        }
    }
    if let Some(since) = &rows.since {
        conditions.push(format!(
            "r.ts > ({})::timestamptz",
            fhirpath::literal(since)
        ));
    }
    Ok(conditions)
}

/// One `select` node as a subquery producing its columns (its own, its nested selects',
/// then its `unionAll`'s), evaluated for one `focus`.
fn select_sql<'a>(
    scope: &Scope<'a, '_>,
    focus: &Focus<'a>,
    node: &Select,
    output: Columns,
    in_union: bool,
) -> Result<String, ViewError> {
    let s = scope.fresh("s");
    let (mut from, inner) = match &node.iterate {
        None => (format!("(SELECT 1) AS {s}"), focus.clone()),
        Some(Iterate::ForEach(path)) | Some(Iterate::ForEachOrNull(path)) => {
            let at = format!(
                "{}.{}",
                node.at,
                if matches!(node.iterate, Some(Iterate::ForEach(_))) {
                    "forEach"
                } else {
                    "forEachOrNull"
                }
            );
            let items =
                fhirpath::resolve(compile_expr(scope, focus, path).map_err(|m| invalid(&at, m))?);
            let elements = format!(
                "jsonb_array_elements({}) WITH ORDINALITY AS {s}(v, i)",
                as_many(&items)
            );
            let from = match node.iterate {
                Some(Iterate::ForEach(_)) => elements,
                _ => format!("(SELECT 1) AS {s}_d LEFT JOIN LATERAL {elements} ON true"),
            };
            let item = Val::new(format!("{s}.v"), Shape::One, items.ty);
            (
                from,
                Focus {
                    this: item,
                    row_index: format!("coalesce({s}.i - 1, 0)"),
                },
            )
        }
        Some(Iterate::Repeat(paths)) => repeat(scope, focus, node, &s, paths)?,
    };
    let mut columns = Vec::new();
    for column in &node.columns {
        let at = format!("{}.path", column.at);
        let val = fhirpath::resolve(
            compile_expr(scope, &inner, &column.path).map_err(|m| invalid(&at, m))?,
        );
        let sql = if column.collection {
            let many = format!("coalesce({}, '[]'::jsonb)", as_many(&val));
            match output {
                Columns::Text => format!("({many})::text"),
                _ => many,
            }
        } else {
            let one = match val.shape {
                Shape::Many => Val::new(
                    format!(
                        "fhirbox_view_one({}, {})",
                        val.sql,
                        fhirpath::literal(&format!("{} ({})", at, column.name))
                    ),
                    Shape::One,
                    val.ty.clone(),
                ),
                _ => val,
            };
            match (output, sql_type(column.fhir_type.as_deref(), false)) {
                // A string-typed value as text (row_to_json quotes it): cheaper than a jsonb
                // subtree turned back into JSON text.
                // (Not inside a unionAll, whose branches must agree on the SQL type.)
                (Columns::Json, _)
                    if !in_union && one.text.is_some() && operators::is_text(&one) =>
                {
                    scope.text_columns.borrow_mut().insert(column.name.clone());
                    fhirpath::as_text(&one)
                }
                (Columns::Json, _) => as_one(&one),
                (Columns::Text, _) | (Columns::Typed, "text") => fhirpath::as_text(&one),
                (Columns::Typed, "boolean") => format!("({})::boolean", fhirpath::as_bool(&one)),
                (Columns::Typed, ty) => format!("({})::{ty}", as_one(&one)),
            }
        };
        columns.push(format!("{sql} AS \"{}\"", column.name));
    }
    for nested in &node.select {
        let c = scope.fresh("c");
        from.push_str(&format!(
            " CROSS JOIN LATERAL (\n{}\n) AS {c}",
            select_sql(scope, &inner, nested, output, in_union)?
        ));
        for (_, name) in nested.column_names()? {
            columns.push(format!("{c}.\"{name}\""));
        }
    }
    if let Some(first) = node.union_all.first() {
        let u = scope.fresh("u");
        let branches = node
            .union_all
            .iter()
            .map(|branch| select_sql(scope, &inner, branch, output, true))
            .collect::<Result<Vec<_>, _>>()?;
        from.push_str(&format!(
            " CROSS JOIN LATERAL (\n{}\n) AS {u}",
            branches
                .iter()
                .map(|b| format!("({b})"))
                .collect::<Vec<_>>()
                .join("\nUNION ALL\n")
        ));
        for (_, name) in first.column_names()? {
            columns.push(format!("{u}.\"{name}\""));
        }
    }
    let list = if columns.is_empty() {
        String::new()
    } else {
        columns.join(", ")
    };
    // A fenced subquery is planned on its own, never pulled up into its parent: PostgreSQL's
    // planner copies a pulled-up subquery's expressions into every branch and join it
    // considers, which grows with the square of a large view (500 unionAll branches: 614 MB
    // for one backend; fenced, 47 MB). Small views keep the flat plan, which runs faster.
    let fence = if in_union || scope.fence {
        " OFFSET 0"
    } else {
        ""
    };
    Ok(format!("SELECT {list} FROM {from}{fence}"))
}

/// `repeat`: every item reached by the paths, at any depth, each level's items in order
/// (depth first is not promised; `%rowIndex` counts them as they come).
fn repeat<'a>(
    scope: &Scope<'a, '_>,
    focus: &Focus<'a>,
    node: &Select,
    s: &str,
    paths: &[Expr],
) -> Result<(String, Focus<'a>), ViewError> {
    let at = |i: usize| format!("{}.repeat[{i}]", node.at);
    let first_level = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            compile_expr(scope, focus, p)
                .map(fhirpath::resolve)
                .map_err(|m| invalid(&at(i), m))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ty = first_level
        .first()
        .map(|v| v.ty.clone())
        .unwrap_or(Ty::Unknown);
    let x = format!("{s}_x");
    let item = Focus {
        this: Val::new(format!("{x}.v"), Shape::One, ty.clone()),
        row_index: focus.row_index.clone(),
    };
    let deeper = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            compile_expr(scope, &item, p)
                .map(fhirpath::resolve)
                .map_err(|m| invalid(&at(i), m))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Each item carries its path of (expression, position) pairs from the focus: ordering
    // by it gives the items depth first, each node before its children (`%rowIndex`).
    let level = |vals: &[Val<'a>]| -> String {
        vals.iter()
            .enumerate()
            .map(|(p, v)| {
                format!(
                    "SELECT {}::bigint AS p, t.v, t.i FROM jsonb_array_elements({}) WITH ORDINALITY AS t(v, i)",
                    p + 1,
                    as_many(v)
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
    };
    let from = format!(
        "(WITH RECURSIVE {s}_r(v, o) AS (\
         SELECT n.v, ARRAY[n.p, n.i] FROM ({}) AS n \
         UNION ALL \
         SELECT n.v, {x}.o || ARRAY[n.p, n.i] FROM {s}_r AS {x} CROSS JOIN LATERAL ({}) AS n\
         ) SELECT v, row_number() OVER (ORDER BY o) AS i FROM {s}_r) AS {s}",
        level(&first_level),
        level(&deeper)
    );
    let this = Val::new(format!("{s}.v"), Shape::One, ty);
    Ok((
        from,
        Focus {
            this,
            row_index: format!("({s}.i - 1)"),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_nesting_is_refused_before_it_grows() {
        // Each where on one item repeats its base three times: 3^n copies of the first.
        let mut path = "gender".to_string();
        for _ in 0..25 {
            path = format!("({path}).where($this = $this)");
        }
        let view = serde_json::json!({"resourceType": "ViewDefinition", "resource": "Patient",
            "select": [{"column": [{"name": "g", "path": path}]}]});
        let view = View::parse(&view).unwrap();
        let error = compile(
            &view,
            None,
            &Rows::default(),
            Columns::Json,
            &ViewLimits::default(),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("compiles to more than 256 KB"),
            "{error}"
        );
    }

    #[test]
    fn single_values_are_key_chains_and_arrays_are_unnested_directly() {
        let view = serde_json::json!({"resourceType": "ViewDefinition", "resource": "Observation", "select": [
            {"column": [
                {"name": "id", "path": "getResourceKey()"},
                {"name": "status", "path": "status"},
                {"name": "patient", "path": "subject.getReferenceKey(Patient)"},
                {"name": "effective", "path": "effective.ofType(dateTime)"},
                {"name": "value", "path": "value.ofType(Quantity).value"}
            ]},
            {"forEach": "code.coding", "column": [
                {"name": "system", "path": "system"},
                {"name": "code", "path": "code"}
            ]}
        ]});
        let view = View::parse(&view).unwrap();
        let compiled = compile(
            &view,
            None,
            &Rows::default(),
            Columns::Text,
            &ViewLimits::default(),
        )
        .unwrap();
        // What a hand-written projection would say (the benchmark's view is this shape).
        let sql = compiled.sql;
        for part in [
            "r.id AS \"id\"",
            "(r.resource ->> 'status')",
            "(r.resource #>> '{effective,dateTime}')",
            "(r.resource #>> '{value,Quantity,value}')",
            "r.resource #>> '{subject,resourceType}' = 'Patient'",
            "jsonb_array_elements((r.resource #> '{code,coding}'))",
            "(s5.v ->> 'code')",
        ] {
            assert!(sql.contains(part), "{part} in {sql}");
        }
        assert!(!sql.contains("jsonb_path_query"), "{sql}");
    }
}
#[cfg(test)]
mod size_probe {
    use super::*;
    #[test]
    fn probe() {
        for depth in 4..=9 {
            let mut path = "gender".to_string();
            for _ in 0..depth {
                path = format!("({path}).where($this = $this)");
            }
            let view = serde_json::json!({"resourceType": "ViewDefinition", "resource": "Patient",
                "select": [{"column": [{"name": "g", "path": path}]}]});
            let view = View::parse(&view).unwrap();
            let limits = ViewLimits {
                sql_bytes: 1 << 30,
                ..ViewLimits::default()
            };
            match compile(&view, None, &Rows::default(), Columns::Text, &limits) {
                Ok(c) => eprintln!("depth {depth}: {} bytes", c.sql.len()),
                Err(e) => eprintln!("depth {depth}: {e}"),
            }
            if depth == 3 {}
        }
        let mut path = "gender".to_string();
        for _ in 0..2 {
            path = format!("({path}).where($this = $this)");
        }
        let view = serde_json::json!({"resourceType": "ViewDefinition", "resource": "Patient",
                "select": [{"column": [{"name": "g", "path": path}]}]});
        let view = View::parse(&view).unwrap();
        eprintln!(
            "{}",
            compile(
                &view,
                None,
                &Rows::default(),
                Columns::Text,
                &ViewLimits::default()
            )
            .unwrap()
            .sql
        );
    }
}
