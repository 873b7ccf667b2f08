//! The FHIRPath functions views may call, each as SQL. [`SUPPORTED`] is the list the
//! validator checks against and the README prints.

use super::expr::{
    as_bool, as_many, as_one, compile, json_literal, map_items, of_type, resolve, Focus, Scope,
    Shape, Ty, Val,
};
use super::Expr;
use crate::fhir::meta::is_r4_resource_type;

/// Every function a view may call.
pub const SUPPORTED: &[&str] = &[
    "as",
    "count",
    "empty",
    "exists",
    "extension",
    "first",
    "getReferenceKey",
    "getResourceKey",
    "hasValue",
    "highBoundary",
    "iif",
    "is",
    "join",
    "last",
    "lowBoundary",
    "not",
    "ofType",
    "resolve",
    "single",
    "toString",
    "where",
];

type Res<T> = Result<T, String>;

fn arity(name: &str, args: &[Expr], min: usize, max: usize) -> Res<()> {
    if args.len() < min || args.len() > max {
        let wanted = if min == max {
            format!("{min}")
        } else {
            format!("{min} to {max}")
        };
        return Err(format!(
            "{name}() takes {wanted} argument(s), {} given",
            args.len()
        ));
    }
    Ok(())
}

/// A type name argument (`Quantity`, `FHIR.Quantity`).
fn type_name(name: &str, arg: &Expr) -> Res<String> {
    match arg {
        Expr::Member(base, ty) if **base == Expr::This => Ok(ty.clone()),
        Expr::Member(base, ty) if matches!(&**base, Expr::Member(b, ns) if **b == Expr::This && (ns == "FHIR" || ns == "System")) => {
            Ok(ty.clone())
        }
        _ => Err(format!("{name}() takes a type name, like {name}(Quantity)")),
    }
}

/// A string argument: a literal or a string constant.
fn text_arg(scope: &Scope<'_, '_>, name: &str, arg: &Expr) -> Res<String> {
    match arg {
        Expr::Str(text) => Ok(text.clone()),
        Expr::Var(var) => scope
            .constants
            .iter()
            .find(|c| &c.name == var)
            .and_then(|c| c.value.as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("{name}() takes a string; %{var} is not a string constant")),
        _ => Err(format!("{name}() takes a string literal")),
    }
}

/// `resolve() is T` (how search parameters keep the references to one type): whether the
/// reference points at a `T`, which the native reference says without reading it. Other
/// uses of `is` are not supported.
fn is_type<'a>(scope: &Scope<'a, '_>, focus: &Focus<'a>, base: &Expr, ty: &str) -> Res<Val<'a>> {
    let Expr::Call(reference, function, args) = base else {
        return Err("'is' is only supported as 'resolve() is Type'".into());
    };
    if function != "resolve" || !args.is_empty() {
        return Err("'is' is only supported as 'resolve() is Type'".into());
    }
    let reference = resolve(compile(scope, focus, reference)?);
    if !matches!(reference.ty, Ty::Reference) {
        return Err("resolve() applies to a Reference".into());
    }
    let x = as_one(&reference);
    Ok(boolean(format!(
        "coalesce(({x} ? 'id') AND ({x} ->> 'resourceType') = {}, false)",
        super::expr::literal(ty)
    )))
}

fn boolean<'a>(sql: String) -> Val<'a> {
    Val::new(sql, Shape::Bool, Ty::Primitive("boolean"))
}

pub fn call<'a>(
    scope: &Scope<'a, '_>,
    focus: &Focus<'a>,
    base: &Expr,
    name: &str,
    args: &[Expr],
) -> Res<Val<'a>> {
    if !SUPPORTED.contains(&name) {
        return Err(format!(
            "unknown function '{name}' (supported: {})",
            SUPPORTED.join(", ")
        ));
    }
    if name == "getResourceKey" {
        arity(name, args, 0, 0)?;
        return Ok(super::expr::row_id(scope));
    }
    if name == "is" {
        arity(name, args, 1, 1)?;
        return is_type(scope, focus, base, &type_name(name, &args[0])?);
    }
    if name == "resolve" {
        return Err(
            "resolve() is only supported as 'resolve() is Type' (there is no other \
                    resource to read in SQL)"
                .into(),
        );
    }
    let base = compile(scope, focus, base)?;
    match name {
        "ofType" | "as" => {
            arity(name, args, 1, 1)?;
            Ok(of_type(base, &type_name(name, &args[0])?))
        }
        "extension" => {
            arity(name, args, 1, 1)?;
            extension(scope, base, &text_arg(scope, name, &args[0])?)
        }
        "where" => {
            arity(name, args, 1, 1)?;
            filter(scope, focus, resolve(base), &args[0])
        }
        "exists" | "empty" | "hasValue" => {
            arity(name, args, 0, if name == "exists" { 1 } else { 0 })?;
            let base = match args.first() {
                Some(criteria) => filter(scope, focus, resolve(base), criteria)?,
                None => resolve(base),
            };
            let exists = match base.shape {
                Shape::Many => format!("coalesce(jsonb_array_length({}) > 0, false)", base.sql),
                _ => format!("({} IS NOT NULL)", base.sql),
            };
            Ok(boolean(if name == "empty" {
                format!("(NOT {exists})")
            } else {
                exists
            }))
        }
        "first" | "single" => {
            arity(name, args, 0, 0)?;
            let base = resolve(base);
            let sql = match &base.path {
                Some((source, path)) => format!(
                    "jsonb_path_query_first({source}, {})",
                    super::expr::literal(path)
                ),
                None => as_one(&base),
            };
            Ok(Val::new(sql, Shape::One, base.ty))
        }
        "last" => {
            arity(name, args, 0, 0)?;
            let base = resolve(base);
            Ok(Val::new(
                format!("({} -> -1)", as_many(&base)),
                Shape::One,
                base.ty,
            ))
        }
        "count" => {
            arity(name, args, 0, 0)?;
            let many = as_many(&resolve(base));
            Ok(Val::new(
                format!("to_jsonb(coalesce(jsonb_array_length({many}), 0))"),
                Shape::One,
                Ty::Primitive("integer"),
            ))
        }
        "not" => {
            arity(name, args, 0, 0)?;
            Ok(boolean(format!("(NOT {})", as_bool(&resolve(base)))))
        }
        "toString" => {
            arity(name, args, 0, 0)?;
            Ok(Val::new(
                format!("to_jsonb({}#>>'{{}}')", as_one(&resolve(base))),
                Shape::One,
                Ty::Primitive("string"),
            ))
        }
        "join" => {
            arity(name, args, 0, 1)?;
            let separator = match args.first() {
                Some(arg) => text_arg(scope, name, arg)?,
                None => String::new(),
            };
            let e = scope.fresh("e");
            Ok(Val::new(
                format!(
                    "(SELECT to_jsonb(coalesce(string_agg({e}.v #>> '{{}}', {} ORDER BY {e}.i), '')) FROM jsonb_array_elements({}) WITH ORDINALITY AS {e}(v, i))",
                    super::expr::literal(&separator),
                    as_many(&resolve(base))
                ),
                Shape::One,
                Ty::Primitive("string"),
            ))
        }
        "getReferenceKey" => {
            arity(name, args, 0, 1)?;
            let target = match args.first() {
                Some(arg) => {
                    let target = type_name(name, arg)?;
                    if !is_r4_resource_type(&target) {
                        return Err(format!(
                            "getReferenceKey(): '{target}' is not a resource type"
                        ));
                    }
                    Some(target)
                }
                None => None,
            };
            let key_target = target.clone();
            let key = move |x: &str| match &key_target {
                Some(t) => format!("CASE WHEN {x}->>'resourceType' = '{t}' THEN {x} -> 'id' END"),
                None => format!("CASE WHEN {x} ? 'resourceType' THEN {x} -> 'id' END"),
            };
            let base = resolve(base);
            if let (Shape::One, Some((source, keys))) = (base.shape, &base.keys) {
                // One reference reached by object keys: two cheap key lookups.
                let at = |last: &str| format!("'{{{},{last}}}'", keys.join(","));
                let matches = match &target {
                    Some(t) => format!("{source} #>> {} = '{t}'", at("resourceType")),
                    None => format!("{source} #> {} IS NOT NULL", at("resourceType")),
                };
                let mut val = Val::new(
                    format!("CASE WHEN {matches} THEN {source} #> {} END", at("id")),
                    Shape::One,
                    Ty::Primitive("id"),
                );
                val.text = Some(format!(
                    "CASE WHEN {matches} THEN {source} #>> {} END",
                    at("id")
                ));
                return Ok(val);
            }
            Ok(map_items(scope, base, key, Ty::Primitive("id")))
        }
        "lowBoundary" | "highBoundary" => {
            arity(name, args, 0, 1)?;
            let base = resolve(base);
            let low = name == "lowBoundary";
            let text = super::expr::as_text(&base);
            let (sql, ty) = match &base.ty {
                Ty::Primitive("decimal") => {
                    let sign = if low { "-" } else { "+" };
                    let x = format!("({text})::numeric");
                    (
                        format!("to_jsonb(trim_scale({x} {sign} 0.5 * power(10::numeric, -scale({x}))))"),
                        "decimal",
                    )
                }
                Ty::Primitive("date") => (format!("to_jsonb({})", date_boundary(&text, low)), "date"),
                Ty::Primitive("dateTime" | "instant") => {
                    (format!("to_jsonb({})", date_time_boundary(&text, low)), "dateTime")
                }
                Ty::Primitive("time") => (format!("to_jsonb({})", time_boundary(&text, low)), "time"),
                _ => {
                    return Err(format!(
                        "{name}() applies to a decimal, date, dateTime or time (use ofType(...) on a choice)"
                    ))
                }
            };
            Ok(Val::new(
                format!("CASE WHEN {text} IS NOT NULL THEN {sql} END"),
                Shape::One,
                Ty::Primitive(ty),
            ))
        }
        "iif" => {
            arity(name, args, 2, 3)?;
            let condition = compile(scope, focus, &args[0])?;
            let then = resolve(compile(scope, focus, &args[1])?);
            let otherwise = match args.get(2) {
                Some(arg) => resolve(compile(scope, focus, arg)?),
                None => Val::new("NULL::jsonb", Shape::One, Ty::Unknown),
            };
            let _ = base;
            Ok(Val::new(
                format!(
                    "CASE WHEN {} THEN {} ELSE {} END",
                    as_bool(&condition),
                    as_one(&then),
                    as_one(&otherwise)
                ),
                Shape::One,
                then.ty,
            ))
        }
        _ => Err(format!("unknown function '{name}'")),
    }
}

/// The first or last day a partial date (`1970`, `1970-06`, `1970-06-15`) can mean.
fn date_boundary(t: &str, low: bool) -> String {
    if low {
        format!("CASE length({t}) WHEN 4 THEN {t} || '-01-01' WHEN 7 THEN {t} || '-01' ELSE left({t}, 10) END")
    } else {
        format!(
            "CASE length({t}) WHEN 4 THEN {t} || '-12-31' \
             WHEN 7 THEN to_char(({t} || '-01')::date + interval '1 month' - interval '1 day', 'YYYY-MM-DD') \
             ELSE left({t}, 10) END"
        )
    }
}

/// The first or last instant a partial time (`12`, `12:34`, `12:34:56`) can mean.
fn time_boundary(t: &str, low: bool) -> String {
    let (hh, mm, ss) = if low {
        (":00:00.000", ":00.000", ".000")
    } else {
        (":59:59.999", ":59.999", ".999")
    };
    format!("CASE length({t}) WHEN 2 THEN {t} || '{hh}' WHEN 5 THEN {t} || '{mm}' WHEN 8 THEN {t} || '{ss}' ELSE {t} END")
}

/// The earliest or latest instant a partial dateTime can mean; without a time zone, the
/// earliest zone (+14:00) or the latest (-12:00).
fn date_time_boundary(t: &str, low: bool) -> String {
    let (midnight, zone) = if low {
        ("T00:00:00.000", "+14:00")
    } else {
        ("T23:59:59.999", "-12:00")
    };
    let tz = format!("substring({t} from '(Z|[+-][0-9][0-9]:[0-9][0-9])$')");
    let time = format!("regexp_replace(substr({t}, 12), '(Z|[+-][0-9][0-9]:[0-9][0-9])$', '')");
    format!(
        "CASE WHEN strpos({t}, 'T') = 0 THEN {} || '{midnight}{zone}' \
         ELSE left({t}, 10) || 'T' || {} || coalesce({tz}, '{zone}') END",
        date_boundary(t, low),
        time_boundary(&time, low)
    )
}

/// `base.where(criteria)`.
fn filter<'a>(
    scope: &Scope<'a, '_>,
    focus: &Focus<'a>,
    base: Val<'a>,
    criteria: &Expr,
) -> Res<Val<'a>> {
    match base.shape {
        Shape::Many => {
            let e = scope.fresh("e");
            let item = Focus {
                this: Val::new(format!("{e}.v"), Shape::One, base.ty.clone()),
                row_index: focus.row_index.clone(),
            };
            let test = as_bool(&compile(scope, &item, criteria)?);
            Ok(Val::new(
                format!(
                    "(SELECT jsonb_agg({e}.v ORDER BY {e}.i) FROM jsonb_array_elements({}) WITH ORDINALITY AS {e}(v, i) WHERE {test})",
                    base.sql
                ),
                Shape::Many,
                base.ty,
            ))
        }
        _ => {
            let one = as_one(&base);
            let item = Focus {
                this: Val::new(one.clone(), Shape::One, base.ty.clone()),
                row_index: focus.row_index.clone(),
            };
            let test = as_bool(&compile(scope, &item, criteria)?);
            Ok(Val::new(
                format!("CASE WHEN {test} THEN {one} END"),
                Shape::One,
                base.ty,
            ))
        }
    }
}

/// `base.extension(url)`: the native field of an Attribute for that url when there is one
/// (on the resource, or inside a complex first-class extension), else FHIR-shaped extensions.
fn extension<'a>(scope: &Scope<'a, '_>, base: Val<'a>, url: &str) -> Res<Val<'a>> {
    let attribute = match &base.ty {
        Ty::Attr(parent) => parent.child_by_url(url),
        _ if base.root => scope.attributes.and_then(|a| a.by_url(url)),
        _ => None,
    };
    if let Some(attribute) = attribute {
        // The key comes from a stored Attribute: quoted like any literal.
        let key = attribute.key();
        if base.shape == Shape::Many {
            // Each first-class extension of a collection: the key of each item.
            let quoted = key.replace('\\', "\\\\").replace('"', "\\\"");
            let path = format!("$[*].\"{quoted}\"[*]");
            return Ok(Val::new(
                format!(
                    "jsonb_path_query_array({}, {})",
                    base.sql,
                    super::expr::literal(&path)
                ),
                Shape::Many,
                Ty::Attr(attribute),
            ));
        }
        let shape = if attribute.is_collection() {
            Shape::Many
        } else {
            Shape::One
        };
        let sql = format!("({} -> {})", base.sql, super::expr::literal(key));
        return Ok(Val::new(sql, shape, Ty::Attr(attribute)));
    }
    let vars = format!(
        "jsonb_build_object('u', {})",
        json_literal(&serde_json::Value::String(url.into()))
    );
    let (source, path) = match base.shape {
        Shape::Many => (base.sql, "$[*].extension[*] ? (@.url == $u)"),
        _ => (as_one(&base), "$.extension[*] ? (@.url == $u)"),
    };
    Ok(Val::new(
        format!("jsonb_path_query_array({source}, '{path}', {vars})"),
        Shape::Many,
        Ty::Fhir("Extension"),
    ))
}
