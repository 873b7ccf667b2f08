//! A `ViewDefinition` read from its JSON into a checked tree: every FHIRPath parsed, every
//! column named once with a name SQL can use. Errors name the element they are about
//! (`select[1].column[2].path: unknown function 'foo'`), indexes counted from 0.

use serde_json::{Map, Value};

use super::ViewError;
use crate::fhir::meta::is_r4_resource_type;
pub use crate::fhirpath::Constant;
use crate::fhirpath::{self, Expr};

#[derive(Debug, Clone)]
pub struct View {
    /// The resource type the view reads.
    pub resource: String,
    pub name: Option<String>,
    pub constants: Vec<Constant>,
    pub select: Vec<Select>,
    /// `where[i].path`, each with its element path for messages.
    pub filters: Vec<(String, Expr)>,
}

#[derive(Debug, Clone)]
pub struct Select {
    pub at: String,
    pub columns: Vec<Column>,
    pub select: Vec<Select>,
    pub iterate: Option<Iterate>,
    pub union_all: Vec<Select>,
}

#[derive(Debug, Clone)]
pub enum Iterate {
    ForEach(Expr),
    ForEachOrNull(Expr),
    Repeat(Vec<Expr>),
}

#[derive(Debug, Clone)]
pub struct Column {
    pub at: String,
    pub name: String,
    pub path: Expr,
    pub collection: bool,
    /// The declared FHIR type (`string`, `integer`, `dateTime`), if any.
    pub fhir_type: Option<String>,
}

fn err(at: impl Into<String>, message: impl Into<String>) -> ViewError {
    ViewError::Invalid {
        at: at.into(),
        message: message.into(),
    }
}

fn parse_path(at: &str, value: &Value) -> Result<Expr, ViewError> {
    let text = value
        .as_str()
        .ok_or_else(|| err(at, "must be a FHIRPath string"))?;
    fhirpath::parse(text).map_err(|e| err(at, e.to_string()))
}

impl View {
    /// Reads a ViewDefinition (FHIR JSON; the native form is the same for this type).
    pub fn parse(doc: &Value) -> Result<View, ViewError> {
        let Value::Object(doc) = doc else {
            return Err(err("ViewDefinition", "must be a JSON object"));
        };
        let resource = match doc.get("resource") {
            Some(Value::String(name)) if is_r4_resource_type(name) => name.clone(),
            Some(Value::String(name)) => {
                return Err(err(
                    "resource",
                    format!("'{name}' is not a FHIR R4 resource type"),
                ))
            }
            Some(_) => return Err(err("resource", "must be a resource type name")),
            None => {
                return Err(err(
                    "resource",
                    "is required: the resource type the view reads",
                ))
            }
        };
        let name = doc.get("name").and_then(Value::as_str).map(str::to_string);
        let constants = constants(doc)?;
        let select = list(doc, "select", "")?
            .iter()
            .enumerate()
            .map(|(i, s)| Select::parse(&format!("select[{i}]"), s))
            .collect::<Result<Vec<_>, _>>()?;
        if select.is_empty() {
            return Err(err("select", "a view needs at least one select"));
        }
        let filters = list(doc, "where", "")?
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let at = format!("where[{i}].path");
                let path = w.get("path").ok_or_else(|| err(&at, "is required"))?;
                Ok((at.clone(), parse_path(&at, path)?))
            })
            .collect::<Result<Vec<_>, ViewError>>()?;
        let view = View {
            resource,
            name,
            constants,
            select,
            filters,
        };
        view.check_names()?;
        Ok(view)
    }

    /// Every column definition, in output order (a `unionAll`'s from its first branch).
    pub fn columns(&self) -> Vec<&Column> {
        fn walk<'v>(select: &'v Select, out: &mut Vec<&'v Column>) {
            out.extend(&select.columns);
            for nested in &select.select {
                walk(nested, out);
            }
            if let Some(first) = select.union_all.first() {
                walk(first, out);
            }
        }
        let mut out = Vec::new();
        for select in &self.select {
            walk(select, &mut out);
        }
        out
    }

    /// Column names: unique across the view, usable as SQL identifiers; every branch of a
    /// `unionAll` has the same columns in the same order.
    fn check_names(&self) -> Result<(), ViewError> {
        let mut seen = std::collections::HashSet::new();
        for select in &self.select {
            for (at, name) in select.column_names()? {
                if !is_column_name(&name) {
                    return Err(err(
                        at,
                        format!("column name '{name}' must start with a letter or _ and hold only letters, digits and _ (at most 63)"),
                    ));
                }
                if !seen.insert(name.clone()) {
                    return Err(err(at, format!("column name '{name}' is used twice")));
                }
            }
        }
        Ok(())
    }
}

pub fn is_column_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

fn list<'a>(doc: &'a Map<String, Value>, key: &str, at: &str) -> Result<&'a [Value], ViewError> {
    match doc.get(key) {
        None => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(err(format!("{at}{key}"), "must be a list")),
    }
}

fn constants(doc: &Map<String, Value>) -> Result<Vec<Constant>, ViewError> {
    list(doc, "constant", "")?
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let at = format!("constant[{i}]");
            let name = c
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| is_column_name(n))
                .ok_or_else(|| {
                    err(
                        format!("{at}.name"),
                        "must be a name of letters, digits and _",
                    )
                })?;
            let value = c
                .as_object()
                .into_iter()
                .flatten()
                .find_map(|(key, value)| {
                    let ty = key.strip_prefix("value")?;
                    let mut chars = ty.chars();
                    let first = chars.next()?;
                    let fhir_type = if first.is_ascii_uppercase() && ty.len() > 1 {
                        // valueString -> string, valueDateTime -> dateTime; complex types keep case.
                        let lower = format!("{}{}", first.to_ascii_lowercase(), chars.as_str());
                        if crate::fhir::meta::type_def(ty).is_some() {
                            ty.to_string()
                        } else {
                            lower
                        }
                    } else {
                        return None;
                    };
                    Some((fhir_type, value.clone()))
                });
            let (fhir_type, value) = value
                .ok_or_else(|| err(&at, "needs a value[x] (valueString, valueInteger, ...)"))?;
            if matches!(value, Value::Object(_) | Value::Array(_) | Value::Null) {
                return Err(err(&at, "only primitive constants are supported"));
            }
            Ok(Constant {
                name: name.to_string(),
                value,
                fhir_type,
            })
        })
        .collect()
}

impl Select {
    fn parse(at: &str, value: &Value) -> Result<Select, ViewError> {
        let Value::Object(doc) = value else {
            return Err(err(at, "must be an object"));
        };
        let columns = list(doc, "column", &format!("{at}."))?
            .iter()
            .enumerate()
            .map(|(i, c)| Column::parse(&format!("{at}.column[{i}]"), c))
            .collect::<Result<Vec<_>, _>>()?;
        let nested = |key: &str| -> Result<Vec<Select>, ViewError> {
            list(doc, key, &format!("{at}."))?
                .iter()
                .enumerate()
                .map(|(i, s)| Select::parse(&format!("{at}.{key}[{i}]"), s))
                .collect()
        };
        let select = nested("select")?;
        let union_all = nested("unionAll")?;
        let mut iterate = None;
        for key in ["forEach", "forEachOrNull", "repeat"] {
            let Some(value) = doc.get(key) else { continue };
            if iterate.is_some() {
                return Err(err(
                    format!("{at}.{key}"),
                    "only one of forEach, forEachOrNull and repeat may be given",
                ));
            }
            let here = format!("{at}.{key}");
            iterate = Some(match key {
                "forEach" => Iterate::ForEach(parse_path(&here, value)?),
                "forEachOrNull" => Iterate::ForEachOrNull(parse_path(&here, value)?),
                _ => {
                    let paths = value
                        .as_array()
                        .filter(|paths| !paths.is_empty())
                        .ok_or_else(|| err(&here, "must be a list of FHIRPath strings"))?;
                    Iterate::Repeat(
                        paths
                            .iter()
                            .enumerate()
                            .map(|(i, p)| parse_path(&format!("{here}[{i}]"), p))
                            .collect::<Result<_, _>>()?,
                    )
                }
            });
        }
        if columns.is_empty() && select.is_empty() && union_all.is_empty() {
            return Err(err(at, "needs a column, a select or a unionAll"));
        }
        Ok(Select {
            at: at.to_string(),
            columns,
            select,
            iterate,
            union_all,
        })
    }

    /// The columns this select produces, in output order: its own, its nested selects',
    /// then its `unionAll`'s (whose branches must agree).
    pub fn column_names(&self) -> Result<Vec<(String, String)>, ViewError> {
        let mut names: Vec<(String, String)> = self
            .columns
            .iter()
            .map(|c| (format!("{}.name", c.at), c.name.clone()))
            .collect();
        for nested in &self.select {
            names.extend(nested.column_names()?);
        }
        if let Some((first, rest)) = self.union_all.split_first() {
            let expected = first.column_names()?;
            for branch in rest {
                let got = branch.column_names()?;
                let same = got.len() == expected.len()
                    && got.iter().zip(&expected).all(|(a, b)| a.1 == b.1);
                if !same {
                    let list = |n: &[(String, String)]| {
                        n.iter()
                            .map(|(_, n)| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    return Err(err(
                        &branch.at,
                        format!(
                            "every unionAll branch must have the same columns in the same order: [{}] here, [{}] in the first",
                            list(&got),
                            list(&expected)
                        ),
                    ));
                }
            }
            names.extend(expected);
        }
        Ok(names)
    }
}

impl Column {
    fn parse(at: &str, value: &Value) -> Result<Column, ViewError> {
        let Value::Object(doc) = value else {
            return Err(err(at, "must be an object"));
        };
        let name = doc
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| err(format!("{at}.name"), "is required"))?
            .to_string();
        let path = doc
            .get("path")
            .ok_or_else(|| err(format!("{at}.path"), "is required"))?;
        let collection = match doc.get("collection") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(err(format!("{at}.collection"), "must be true or false")),
        };
        Ok(Column {
            at: at.to_string(),
            name,
            path: parse_path(&format!("{at}.path"), path)?,
            collection,
            fhir_type: doc.get("type").and_then(Value::as_str).map(str::to_string),
        })
    }
}
