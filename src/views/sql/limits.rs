//! How big a compiled view may be, checked before anything reaches PostgreSQL.
//!
//! PostgreSQL's parser and planner take memory in proportion to the statement, and more:
//! 150 columns each nesting `where` eight deep (33 KB of ViewDefinition, 30 MB of SQL) took
//! one backend to 4 GB, and 2,000 one-column `unionAll` branches to 3 GB, in places where
//! neither the statement timeout nor a cancel reaches it. So the whole statement is bounded
//! (its bytes, its columns, its `unionAll` branches, the nesting of its selects), each bound a
//! flag (`serve --view-max-*`), and a view over any of them is a 400 naming the bound.

use super::invalid;
use crate::views::definition::{Select, View};
use crate::views::ViewError;

/// The bounds of one compiled view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewLimits {
    /// SQL bytes of the whole statement (`--view-max-sql-bytes`).
    pub sql_bytes: usize,
    /// Column definitions, counted in every `select` and every `unionAll` branch
    /// (`--view-max-columns`).
    pub columns: usize,
    /// `unionAll` branches, counted over the whole view (`--view-max-union-branches`).
    pub union_branches: usize,
    /// How deep `select`s and `unionAll`s nest in one another (`--view-max-depth`).
    pub depth: usize,
}

impl Default for ViewLimits {
    /// Far above any view seen in practice (the SQL on FHIR suite's largest compiles to a few
    /// kilobytes; a 100-column extract to about 20 KB), far below what hurts PostgreSQL.
    fn default() -> ViewLimits {
        ViewLimits {
            sql_bytes: 1024 * 1024,
            columns: 1000,
            union_branches: 100,
            depth: 16,
        }
    }
}

impl ViewLimits {
    /// What a stored ViewDefinition is checked against when it is written: generous (a run is
    /// checked again against the limits in force), but bounded, since checking compiles it.
    pub fn ceiling() -> ViewLimits {
        ViewLimits {
            sql_bytes: 16 * 1024 * 1024,
            columns: 10_000,
            union_branches: 1_000,
            depth: 32,
        }
    }

    /// Checks the view's shape: columns, branches, depth. Returns how many `select`s it has.
    pub fn check_shape(&self, view: &View) -> Result<usize, ViewError> {
        let mut shape = Shape::default();
        for select in &view.select {
            shape.walk(select, 1);
        }
        if shape.branches > self.union_branches {
            return Err(invalid(
                "select",
                format!(
                    "the view has {} unionAll branches; at most {} are accepted (--view-max-union-branches)",
                    shape.branches, self.union_branches
                ),
            ));
        }
        if shape.columns > self.columns {
            return Err(invalid(
                "select",
                format!(
                    "the view has {} columns; at most {} are accepted (--view-max-columns)",
                    shape.columns, self.columns
                ),
            ));
        }
        if shape.depth > self.depth {
            return Err(invalid(
                &shape.deepest,
                format!(
                    "selects nest {} deep here; at most {} are accepted (--view-max-depth)",
                    shape.depth, self.depth
                ),
            ));
        }
        Ok(shape.selects)
    }

    /// The error of a statement over [`ViewLimits::sql_bytes`].
    pub fn too_much_sql(&self, at: &str) -> ViewError {
        invalid(
            at,
            format!(
                "the view compiles to more than {} bytes of SQL (--view-max-sql-bytes); simplify it",
                self.sql_bytes
            ),
        )
    }
}

/// The size of a view's select tree.
#[derive(Default)]
struct Shape {
    selects: usize,
    columns: usize,
    branches: usize,
    depth: usize,
    deepest: String,
}

impl Shape {
    fn walk(&mut self, select: &Select, depth: usize) {
        self.selects += 1;
        self.columns += select.columns.len();
        self.branches += select.union_all.len();
        if depth > self.depth {
            self.depth = depth;
            self.deepest = select.at.clone();
        }
        for child in select.select.iter().chain(&select.union_all) {
            self.walk(child, depth + 1);
        }
    }
}
