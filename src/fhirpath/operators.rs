//! FHIRPath's operators as SQL: boolean logic on SQL booleans (NULL is the empty collection,
//! so three-valued logic is SQL's own), comparisons on single jsonb items, arithmetic on
//! `numeric`, string concatenation, collection union and membership.

use super::expr::{as_bool, as_many, as_one, Shape, Ty, Val};
use super::Op;

/// Whether a value is typed as text (strings, codes, dates...), not a number or a boolean.
pub fn is_text(val: &Val<'_>) -> bool {
    matches!(val.ty, Ty::Primitive(p) if !matches!(p, "integer" | "decimal" | "positiveInt" | "unsignedInt" | "boolean"))
}

pub fn binary<'a>(op: Op, left: Val<'a>, right: Val<'a>) -> Val<'a> {
    let bool_op = |sql: String| Val::new(sql, Shape::Bool, Ty::Primitive("boolean"));
    let (l, r) = (as_one(&left), as_one(&right));
    let num = |sql: String| {
        Val::new(
            format!("to_jsonb({sql})"),
            Shape::One,
            Ty::Primitive("decimal"),
        )
    };
    match op {
        Op::And => bool_op(format!("({} AND {})", as_bool(&left), as_bool(&right))),
        Op::Or => bool_op(format!("({} OR {})", as_bool(&left), as_bool(&right))),
        Op::Xor => bool_op(format!("({} <> {})", as_bool(&left), as_bool(&right))),
        Op::Implies => bool_op(format!("(NOT {} OR {})", as_bool(&left), as_bool(&right))),
        Op::Eq => bool_op(format!("({l} = {r})")),
        Op::Ne => bool_op(format!("({l} <> {r})")),
        Op::Lt => bool_op(format!("({l} < {r})")),
        Op::Gt => bool_op(format!("({l} > {r})")),
        Op::Le => bool_op(format!("({l} <= {r})")),
        Op::Ge => bool_op(format!("({l} >= {r})")),
        Op::In => bool_op(format!(
            "CASE WHEN {l} IS NOT NULL THEN coalesce({} @> jsonb_build_array({l}), false) END",
            as_many(&right)
        )),
        Op::Contains => bool_op(format!(
            "CASE WHEN {r} IS NOT NULL THEN coalesce({} @> jsonb_build_array({r}), false) END",
            as_many(&left)
        )),
        Op::Union => Val::new(
            format!(
                "(coalesce({}, '[]') || coalesce({}, '[]'))",
                as_many(&left),
                as_many(&right)
            ),
            Shape::Many,
            Ty::Unknown,
        ),
        Op::Concat => Val::new(
            format!("to_jsonb(coalesce({l}#>>'{{}}', '') || coalesce({r}#>>'{{}}', ''))"),
            Shape::One,
            Ty::Primitive("string"),
        ),
        Op::Add if is_text(&left) || is_text(&right) => Val::new(
            format!("to_jsonb(({l}#>>'{{}}') || ({r}#>>'{{}}'))"),
            Shape::One,
            Ty::Primitive("string"),
        ),
        Op::Add => num(format!("({l})::numeric + ({r})::numeric")),
        Op::Sub => num(format!("({l})::numeric - ({r})::numeric")),
        Op::Mul => num(format!("({l})::numeric * ({r})::numeric")),
        Op::Div => num(format!("({l})::numeric / nullif(({r})::numeric, 0)")),
        Op::IntDiv => num(format!("div(({l})::numeric, nullif(({r})::numeric, 0))")),
        Op::Mod => num(format!("mod(({l})::numeric, nullif(({r})::numeric, 0))")),
    }
}
