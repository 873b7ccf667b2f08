//! One FHIRPath expression -> one PostgreSQL expression over native jsonb.
//!
//! Every value is typed twice: by its SQL [`Shape`] (a `boolean`, at most one jsonb item,
//! or a jsonb array: FHIRPath's collection) and by its FHIR type from the generated R4
//! element table, which is what maps FHIR paths onto the native format: a choice element
//! `value` is native `{"Quantity": ..}` so `.ofType(Quantity)` reads that key; a Reference is
//! native `{resourceType, id}` so `.reference` is rebuilt; an `extension(url)` that an
//! Attribute made first-class reads its native field. SQL NULL is the empty collection, so
//! FHIRPath's three-valued `and`/`or` are SQL's own. User literals reach the SQL text only
//! through [`literal`] (escaped constants: COPY, which streams the result, takes no bind
//! parameters); names are identifiers the parser limited to `[A-Za-z0-9_]`.

use super::{Budget, Constant, Expr};
use crate::fhir::meta::{type_def, Element, Kind};
use crate::format::attributes::{Attribute, TypeAttributes};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// An SQL boolean (NULL: empty).
    Bool,
    /// One jsonb item or NULL.
    One,
    /// A jsonb array (or NULL: empty).
    Many,
}

#[derive(Debug, Clone)]
pub enum Ty<'a> {
    Unknown,
    /// A resource, datatype or backbone element of the table.
    Complex(&'static str),
    Primitive(&'static str),
    Reference,
    /// A choice element as stored: `{code: value}`.
    Choice(&'static [&'static str]),
    /// A datatype stored FHIR-shaped (inside an `extension` no Attribute describes).
    Fhir(&'static str),
    /// A choice element of a FHIR-shaped value: the value holding it (`valueCode` is a key
    /// of the item itself), with the element's name and its allowed type codes.
    FhirChoice(&'static str, &'static [&'static str]),
    /// A first-class extension (an Attribute's native field).
    Attr(&'a Attribute),
    /// An Attribute's value, read by `.value`: `ofType` keeps it.
    AttrValue(&'a Attribute),
}

#[derive(Debug, Clone)]
pub struct Val<'a> {
    pub sql: String,
    pub shape: Shape,
    pub ty: Ty<'a>,
    /// Whether this is the resource itself (whose `id` is the row's column).
    pub root: bool,
    /// A path of member steps from an item or array not yet turned into SQL: more steps are
    /// appended, so `name.given` is one `jsonb_path_query_array`.
    pub path: Option<(String, String)>,
    /// A chain of object keys from a jsonb expression (`r.resource`, `value`, `Quantity`):
    /// rendered as one `#>` (each `->` would copy the subtree it returns).
    pub keys: Option<(String, Vec<String>)>,
    /// The same value as SQL text, when it is cheaper than `#>> '{}'` of `sql`.
    pub text: Option<String>,
}

impl<'a> Val<'a> {
    pub fn new(sql: impl Into<String>, shape: Shape, ty: Ty<'a>) -> Val<'a> {
        Val {
            sql: sql.into(),
            shape,
            ty,
            root: false,
            path: None,
            keys: None,
            text: None,
        }
    }

    /// `source #> '{keys}'`. Keys are element names: letters, digits and `_` only.
    fn chain(source: String, keys: Vec<String>, ty: Ty<'a>, shape: Shape) -> Val<'a> {
        let (sql, text) = match keys.as_slice() {
            [key] => (
                format!("({source} -> '{key}')"),
                format!("({source} ->> '{key}')"),
            ),
            _ => {
                let list = keys.join(",");
                (
                    format!("({source} #> '{{{list}}}')"),
                    format!("({source} #>> '{{{list}}}')"),
                )
            }
        };
        let path = (shape == Shape::Many).then(|| (sql.clone(), "$[*]".to_string()));
        Val {
            sql,
            shape,
            ty,
            root: false,
            path,
            text: (shape == Shape::One).then_some(text),
            keys: Some((source, keys)),
        }
    }

    fn from_path(source: String, path: String, ty: Ty<'a>) -> Val<'a> {
        Val {
            sql: format!("jsonb_path_query_array({source}, {})", literal(&path)),
            shape: Shape::Many,
            ty,
            root: false,
            path: Some((source, path)),
            keys: None,
            text: None,
        }
    }
}

/// An SQL string constant for any text: an `E''` string with `\` and `'` escaped, so it
/// means the same whatever `standard_conforming_strings` says.
pub fn literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// A JSON value as a jsonb constant.
pub fn json_literal(value: &serde_json::Value) -> String {
    format!("{}::jsonb", literal(&value.to_string()))
}

/// What an expression is compiled against.
pub struct Scope<'a, 'v> {
    /// The row's alias (`r`): `getResourceKey()` is `r.id` anywhere.
    pub row: &'v str,
    pub resource: &'static str,
    pub constants: &'v [Constant],
    pub attributes: Option<&'a TypeAttributes>,
    pub counter: &'v std::cell::Cell<usize>,
    /// Columns whose SQL value is text to be written as a JSON string (the others are jsonb).
    pub text_columns: &'v std::cell::RefCell<std::collections::HashSet<String>>,
    /// The SQL the whole statement may still take.
    pub budget: &'v Budget,
    /// Whether each select is planned on its own (a large view).
    pub fence: bool,
}

impl Scope<'_, '_> {
    pub fn fresh(&self, prefix: &str) -> String {
        let n = self.counter.get() + 1;
        self.counter.set(n);
        format!("{prefix}{n}")
    }
}

/// The focus an expression starts from, and `%rowIndex` there.
#[derive(Clone)]
pub struct Focus<'a> {
    pub this: Val<'a>,
    pub row_index: String,
}

type Res<T> = Result<T, String>;

/// The most SQL one expression may compile to: some functions repeat their operand, so a
/// hostile nesting could otherwise grow the statement exponentially.
pub const MAX_EXPRESSION_SQL: usize = 256 * 1024;

pub fn compile<'a>(scope: &Scope<'a, '_>, focus: &Focus<'a>, expr: &Expr) -> Res<Val<'a>> {
    let val = compile_node(scope, focus, expr)?;
    if val.sql.len() > MAX_EXPRESSION_SQL {
        return Err(format!(
            "the expression compiles to more than {} KB of SQL; simplify it",
            MAX_EXPRESSION_SQL / 1024
        ));
    }
    if val.sql.len() > scope.budget.limit {
        return Err(format!(
            "the expression compiles to more than {} bytes of SQL ({}); simplify it",
            scope.budget.limit, scope.budget.flag
        ));
    }
    Ok(val)
}

fn compile_node<'a>(scope: &Scope<'a, '_>, focus: &Focus<'a>, expr: &Expr) -> Res<Val<'a>> {
    match expr {
        Expr::This => Ok(focus.this.clone()),
        Expr::Var(name) => variable(scope, focus, name),
        Expr::Str(text) => Ok(Val::new(
            json_literal(&serde_json::Value::String(text.clone())),
            Shape::One,
            Ty::Primitive("string"),
        )),
        Expr::Num(n) => Ok(Val::new(
            format!("'{n}'::jsonb"),
            Shape::One,
            Ty::Primitive(if n.contains('.') {
                "decimal"
            } else {
                "integer"
            }),
        )),
        Expr::Bool(b) => Ok(Val::new(
            b.to_string(),
            Shape::Bool,
            Ty::Primitive("boolean"),
        )),
        Expr::DateTime(text) => Ok(Val::new(
            json_literal(&serde_json::Value::String(
                text.trim_start_matches('T').into(),
            )),
            Shape::One,
            Ty::Primitive(if text.starts_with('T') {
                "time"
            } else {
                "dateTime"
            }),
        )),
        Expr::Empty => Ok(Val::new("NULL::jsonb", Shape::Many, Ty::Unknown)),
        Expr::Member(base, name) => {
            let base = compile(scope, focus, base)?;
            member(scope, base, name)
        }
        Expr::Index(base, index) => {
            let base = compile(scope, focus, base)?;
            let index = compile(scope, focus, index)?;
            let ty = base.ty.clone();
            let many = as_many(&resolve(base));
            Ok(Val::new(
                format!("({many} -> (({})#>>'{{}}')::int)", as_one(&index)),
                Shape::One,
                ty,
            ))
        }
        Expr::Call(base, name, args) => super::functions::call(scope, focus, base, name, args),
        Expr::Binary(op, left, right) => {
            let left = resolve(compile(scope, focus, left)?);
            let right = resolve(compile(scope, focus, right)?);
            Ok(super::operators::binary(*op, left, right))
        }
        Expr::Neg(inner) => {
            let inner = resolve(compile(scope, focus, inner)?);
            let ty = inner.ty.clone();
            Ok(Val::new(
                format!("to_jsonb(-(({})::numeric))", as_one(&inner)),
                Shape::One,
                ty,
            ))
        }
    }
}

fn variable<'a>(scope: &Scope<'a, '_>, focus: &Focus<'a>, name: &str) -> Res<Val<'a>> {
    if name == "rowIndex" {
        return Ok(Val::new(
            format!("to_jsonb({})", focus.row_index),
            Shape::One,
            Ty::Primitive("integer"),
        ));
    }
    let constant = scope.constants.iter().find(|c| c.name == name);
    let constant = match constant {
        Some(constant) => constant,
        // FHIRPath's `%resource`: the row's resource, wherever the focus is (R4's
        // `MolecularSequence` coordinates read it from inside each `variant`).
        None if name == "resource" => {
            let mut root = Val::new(
                format!("{}.resource", scope.row),
                Shape::One,
                Ty::Complex(scope.resource),
            );
            root.root = true;
            return Ok(root);
        }
        None => {
            return Err(format!(
                "unknown constant %{name} (the view's constant list does not name it)"
            ))
        }
    };
    let ty = match constant.fhir_type.as_str() {
        "boolean" => {
            return Ok(Val::new(
                (constant.value.as_bool() == Some(true)).to_string(),
                Shape::Bool,
                Ty::Primitive("boolean"),
            ))
        }
        "integer" | "positiveInt" | "unsignedInt" | "integer64" => Ty::Primitive("integer"),
        "decimal" => Ty::Primitive("decimal"),
        _ => Ty::Primitive("string"),
    };
    Ok(Val::new(json_literal(&constant.value), Shape::One, ty))
}

/// A choice element used without `ofType`: its value, whatever its type.
pub fn resolve(val: Val<'_>) -> Val<'_> {
    match val.ty {
        Ty::Choice(_) => step(val, ".*", Ty::Unknown, false),
        Ty::FhirChoice(name, _) => step(
            val,
            &format!(".keyvalue() ? (@.key like_regex \"^{name}[A-Z]\").value"),
            Ty::Unknown,
            false,
        ),
        _ => val,
    }
}

/// A member step as a jsonpath accessor (`."name"`), with `[*]` when it may be an array.
fn step<'a>(base: Val<'a>, accessor: &str, ty: Ty<'a>, array: bool) -> Val<'a> {
    let tail = if array { "[*]" } else { "" };
    match (base.shape, base.path) {
        (Shape::Many, Some((source, path))) => {
            Val::from_path(source, format!("{path}{accessor}{tail}"), ty)
        }
        (Shape::Many, None) => Val::from_path(base.sql, format!("$[*]{accessor}{tail}"), ty),
        (Shape::One, _) if accessor.starts_with(".\"") => {
            // An object key: extend the chain; an array element ends it as a collection.
            let key = accessor
                .trim_start_matches('.')
                .trim_matches('"')
                .to_string();
            let (source, mut keys) = base.keys.unwrap_or((base.sql, Vec::new()));
            keys.push(key);
            let shape = if array { Shape::Many } else { Shape::One };
            Val::chain(source, keys, ty, shape)
        }
        _ => Val::from_path(
            as_one_sql(&base.sql, base.shape),
            format!("${accessor}{tail}"),
            ty,
        ),
    }
}

fn ty_of(element: &Element) -> Ty<'static> {
    match element.kind {
        Kind::Primitive(p) => Ty::Primitive(p),
        Kind::Complex(name) | Kind::ContentRef(name) => Ty::Complex(name),
        Kind::Reference(_) => Ty::Reference,
        Kind::Choice(codes) => Ty::Choice(codes),
        Kind::Resource => Ty::Unknown,
    }
}

/// `base.name`.
pub fn member<'a>(scope: &Scope<'a, '_>, base: Val<'a>, name: &str) -> Res<Val<'a>> {
    // A path may start with its type (`Observation.code`, `Resource.id`), as search
    // parameters' expressions do: on the resource itself that is the resource.
    if base.root && [scope.resource, "Resource", "DomainResource"].contains(&name) {
        return Ok(base);
    }
    if base.root && name == "id" {
        return Ok(row_id(scope));
    }
    if base.root && name == "resourceType" {
        return Ok(Val::new(
            format!("'\"{}\"'::jsonb", scope.resource),
            Shape::One,
            Ty::Primitive("string"),
        ));
    }
    let base = resolve(base);
    match (&base.ty, name) {
        (Ty::Reference, "reference") => {
            return Ok(map_items(
                scope,
                base,
                reference_sql,
                Ty::Primitive("string"),
            ))
        }
        (Ty::Reference, "type") => {
            return Ok(map_items(
                scope,
                base,
                reference_type_sql,
                Ty::Primitive("uri"),
            ))
        }
        (Ty::Attr(attribute), "value") => {
            let attribute: &Attribute = attribute;
            return Ok(Val {
                ty: Ty::AttrValue(attribute),
                ..base
            });
        }
        _ => {}
    }
    if let Ty::Fhir(type_name) = base.ty {
        let Some(element) = type_def(type_name).and_then(|def| def.element(name)) else {
            return Ok(step(base, &format!(".\"{name}\""), Ty::Unknown, true));
        };
        let ty = match element.kind {
            Kind::Primitive(p) => Ty::Primitive(p),
            Kind::Complex(n) | Kind::ContentRef(n) => Ty::Fhir(n),
            Kind::Reference(_) => Ty::Fhir("Reference"),
            Kind::Choice(codes) => {
                return Ok(Val {
                    ty: Ty::FhirChoice(element.name, codes),
                    ..base
                })
            }
            Kind::Resource => Ty::Unknown,
        };
        return Ok(step(base, &format!(".\"{name}\""), ty, element.array));
    }
    let type_name = match base.ty {
        Ty::Complex(name) => Some(name),
        Ty::Reference => Some("Reference"),
        _ => None,
    };
    let element = type_name
        .and_then(type_def)
        .and_then(|def| def.element(name));
    if let Some(element) = element {
        let accessor = format!(".\"{name}\"");
        return Ok(step(base, &accessor, ty_of(element), element.array));
    }
    // A FHIR JSON choice name (`valueQuantity`): native `value.Quantity`.
    if let Some(def) = type_name.and_then(type_def) {
        for element in def.elements {
            if let Kind::Choice(codes) = element.kind {
                if let Some(code) = name
                    .strip_prefix(element.name)
                    .and_then(|rest| codes.iter().find(|c| c.eq_ignore_ascii_case(rest)))
                {
                    let value = step(
                        base,
                        &format!(".\"{}\"", element.name),
                        ty_of(element),
                        false,
                    );
                    return Ok(of_type(value, code));
                }
            }
        }
    }
    // Unknown to the table: navigate the data as it is.
    Ok(step(base, &format!(".\"{name}\""), Ty::Unknown, true))
}

/// The resource's id (the row's column).
pub fn row_id<'a>(scope: &Scope<'a, '_>) -> Val<'a> {
    let mut id = Val::new(
        format!("to_jsonb({}.id)", scope.row),
        Shape::One,
        Ty::Primitive("id"),
    );
    id.text = Some(format!("{}.id", scope.row));
    id
}

/// The value as SQL text (strings unquoted, numbers as written), NULL when empty.
pub fn as_text(val: &Val<'_>) -> String {
    match (&val.text, val.shape) {
        (Some(text), _) => text.clone(),
        (None, Shape::Bool) => format!("({})::text", val.sql),
        (None, _) => format!("({} #>> '{{}}')", as_one(val)),
    }
}

/// `ofType(T)`: on a choice, its `T` key; on a typed value, itself or nothing.
pub fn of_type<'a>(base: Val<'a>, code: &str) -> Val<'a> {
    let code = code
        .trim_start_matches("FHIR.")
        .trim_start_matches("System.");
    match &base.ty {
        Ty::Choice(codes) => {
            let Some(code) = codes.iter().find(|c| c.eq_ignore_ascii_case(code)) else {
                return Val::new("NULL::jsonb", Shape::One, Ty::Unknown);
            };
            // Primitive types (lower case) have table entries too: they stay primitive.
            let ty = match type_def(code) {
                Some(def) if !code.starts_with(char::is_lowercase) => Ty::Complex(def.name),
                _ => Ty::Primitive(code),
            };
            step(base, &format!(".\"{code}\""), ty, false)
        }
        Ty::FhirChoice(name, codes) => {
            let Some(code) = codes.iter().find(|c| c.eq_ignore_ascii_case(code)) else {
                return Val::new("NULL::jsonb", Shape::One, Ty::Unknown);
            };
            let ty = match type_def(code) {
                Some(def) if !code.starts_with(char::is_lowercase) => Ty::Fhir(def.name),
                _ => Ty::Primitive(code),
            };
            let key = format!("{name}{}", crate::format::walk::capitalize(code));
            step(
                Val {
                    ty: Ty::Unknown,
                    ..base
                },
                &format!(".\"{key}\""),
                ty,
                false,
            )
        }
        Ty::AttrValue(attribute) => {
            let ty = match attribute.value_type().and_then(type_def) {
                Some(def) if !def.name.starts_with(char::is_lowercase) => Ty::Complex(def.name),
                _ => Ty::Primitive(static_primitive(attribute.value_type())),
            };
            Val { ty, ..base }
        }
        _ => base,
    }
}

fn static_primitive(name: Option<&str>) -> &'static str {
    const KNOWN: &[&str] = &[
        "boolean", "code", "date", "dateTime", "decimal", "id", "instant", "integer", "string",
        "time", "uri", "url",
    ];
    name.and_then(|n| KNOWN.iter().find(|k| **k == n).copied())
        .unwrap_or("string")
}

/// A native Reference's FHIR `reference`.
fn reference_sql(x: &str) -> String {
    format!(
        "(CASE WHEN {x} ? 'localRef' THEN to_jsonb('#' || ({x}->>'localRef')) \
         WHEN {x} ? 'id' AND {x} ? 'resourceType' THEN to_jsonb(({x}->>'resourceType') || '/' || ({x}->>'id')) \
         ELSE {x} -> 'uri' END)"
    )
}

/// A native Reference's FHIR `type`.
fn reference_type_sql(x: &str) -> String {
    format!("coalesce({x} -> 'type', CASE WHEN NOT {x} ? 'id' THEN {x} -> 'resourceType' END)")
}

/// Applies an item -> item SQL function to each item of `base`.
pub fn map_items<'a>(
    scope: &Scope<'a, '_>,
    base: Val<'a>,
    f: impl Fn(&str) -> String,
    ty: Ty<'a>,
) -> Val<'a> {
    match base.shape {
        Shape::Many => {
            let e = scope.fresh("e");
            Val::new(
                format!(
                    "(SELECT jsonb_agg({e}.m ORDER BY {e}.i) FROM (SELECT {} AS m, {e}.i FROM jsonb_array_elements({}) WITH ORDINALITY AS {e}(v, i)) AS {e} WHERE {e}.m IS NOT NULL)",
                    f(&format!("{e}.v")),
                    base.sql
                ),
                Shape::Many,
                ty,
            )
        }
        _ => Val::new(f(&as_one(&base)), Shape::One, ty),
    }
}

/// The value as a jsonb array (NULL when empty).
pub fn as_many(val: &Val<'_>) -> String {
    match val.shape {
        Shape::Many => val.sql.clone(),
        Shape::One => format!("jsonb_path_query_array({}, '$')", val.sql),
        Shape::Bool => format!("jsonb_path_query_array(to_jsonb({}), '$')", val.sql),
    }
}

/// The value as one jsonb item (the first of a collection), NULL when empty.
pub fn as_one(val: &Val<'_>) -> String {
    as_one_sql(&val.sql, val.shape)
}

fn as_one_sql(sql: &str, shape: Shape) -> String {
    match shape {
        Shape::Many => format!("({sql} -> 0)"),
        Shape::One => sql.to_string(),
        Shape::Bool => format!("to_jsonb({sql})"),
    }
}

/// The value as an SQL boolean: a boolean, or (FHIRPath's singleton rule) any other single
/// item is true; NULL when empty.
pub fn as_bool(val: &Val<'_>) -> String {
    match val.shape {
        Shape::Bool => val.sql.clone(),
        _ => format!("({} <> 'false'::jsonb)", as_one(val)),
    }
}
