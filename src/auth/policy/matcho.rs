//! Matcho: the pattern language of `engine: matcho` policies, compiled once per policy
//! version and matched against the request object.
//!
//! | pattern | matches |
//! | --- | --- |
//! | `{k: p, ...}` | an object whose `k` matches `p` (a missing key is matched as null) |
//! | `[p0, p1]` | an array whose first items match `p0`, `p1`, in order (more may follow) |
//! | `"#regex"` | a string (or number) the regex finds a match in: an unanchored search, as documented; use `^...$` for whole values |
//! | `".a.b"` | the value at that path of the request object; a missing or null value there never matches (closing the documented nil = nil pitfall) |
//! | `present?`, `nil?`, `not-blank?` | non-null; null or missing; a string with a non-space character |
//! | other scalars | equal values (numbers by value: `1` matches `1.0`) |
//! | `{$enum: [..]}` | a value equal to one of the list |
//! | `{$one-of: [p, ..]}` or `{$one-of: ".path"}` | a value matching one of the patterns (or equal to one of the values at that path); alone in its map |
//! | `{$contains: p}` | an array with an item matching `p`, or a string containing the string `p` |
//! | `{$every: p}` | an array whose items all match `p` |
//! | `{$not: p}` | anything `p` does not match |
//! | `{$reference: p}` | a Reference (`"Patient/1"`, `{reference: ..}`, `{resourceType, id}`) whose `{resourceType, id}` matches `p` |
//! | `{$present-all: [p, ..]}` | an array with, for each `p`, an item matching it (any order) |
//! | `{$length: n}` | an array (or string) of length `n` |
//!
//! Operators combine with each other and with plain keys in one map (all must match), but
//! `$one-of`, which must stand alone. Regexes are Rust's `regex` (linear time, no
//! backreferences): a policy cannot make matching slow.

use regex::Regex;
use serde_json::Value;

use super::PolicyError;

#[derive(Debug)]
pub enum Pattern {
    /// Plain keys of a map.
    Map(Vec<(String, Pattern)>),
    Array(Vec<Pattern>),
    Regex(Regex),
    PathRef(Vec<String>),
    Present,
    Nil,
    NotBlank,
    Literal(Value),
    OneOf(Vec<Pattern>),
    OneOfPath(Vec<String>),
    Enum(Vec<Value>),
    Contains(Box<Pattern>),
    Every(Box<Pattern>),
    Not(Box<Pattern>),
    Reference(Box<Pattern>),
    PresentAll(Vec<Pattern>),
    Length(u64),
    /// Several patterns that must all match (a map with plain keys and operators).
    All(Vec<Pattern>),
}

fn error(path: &str, message: impl Into<String>) -> PolicyError {
    PolicyError {
        path: path.to_string(),
        message: message.into(),
    }
}

impl Pattern {
    /// Compiles a pattern; `path` names where it is in the policy, for errors.
    pub fn compile(value: &Value, path: &str) -> Result<Pattern, PolicyError> {
        match value {
            Value::Object(map) => {
                let mut plain = Vec::new();
                let mut operators = Vec::new();
                for (key, inner) in map {
                    let here = format!("{path}.{key}");
                    match key.as_str() {
                        "$one-of" if map.len() > 1 => {
                            return Err(error(&here, "$one-of cannot be used with other keys in the same map"))
                        }
                        "$one-of" => match inner {
                            Value::Array(items) => operators.push(Pattern::OneOf(
                                items
                                    .iter()
                                    .enumerate()
                                    .map(|(i, item)| Pattern::compile(item, &format!("{here}[{i}]")))
                                    .collect::<Result<_, _>>()?,
                            )),
                            Value::String(text) if text.starts_with('.') => {
                                operators.push(Pattern::OneOfPath(path_of(text)))
                            }
                            _ => return Err(error(&here, "$one-of takes a list of patterns or a \".path\"")),
                        },
                        "$enum" => match inner {
                            Value::Array(items) => operators.push(Pattern::Enum(items.clone())),
                            _ => return Err(error(&here, "$enum takes a list of values")),
                        },
                        "$contains" => operators.push(Pattern::Contains(Box::new(Pattern::compile(inner, &here)?))),
                        "$every" => operators.push(Pattern::Every(Box::new(Pattern::compile(inner, &here)?))),
                        "$not" => operators.push(Pattern::Not(Box::new(Pattern::compile(inner, &here)?))),
                        "$reference" => operators.push(Pattern::Reference(Box::new(Pattern::compile(inner, &here)?))),
                        "$present-all" => match inner {
                            Value::Array(items) => operators.push(Pattern::PresentAll(
                                items
                                    .iter()
                                    .enumerate()
                                    .map(|(i, item)| Pattern::compile(item, &format!("{here}[{i}]")))
                                    .collect::<Result<_, _>>()?,
                            )),
                            _ => return Err(error(&here, "$present-all takes a list of patterns")),
                        },
                        "$length" => match inner.as_u64() {
                            Some(n) => operators.push(Pattern::Length(n)),
                            None => return Err(error(&here, "$length takes a whole number")),
                        },
                        other if other.starts_with('$') => {
                            return Err(error(
                                &here,
                                format!("unknown matcho operator '{other}' (known: $one-of, $enum, $contains, $every, $not, $reference, $present-all, $length)"),
                            ))
                        }
                        _ => plain.push((key.clone(), Pattern::compile(inner, &here)?)),
                    }
                }
                Ok(match (plain.is_empty(), operators.len()) {
                    (_, 0) => Pattern::Map(plain),
                    (true, 1) => operators.pop().expect("one operator"),
                    (true, _) => Pattern::All(operators),
                    (false, _) => {
                        operators.insert(0, Pattern::Map(plain));
                        Pattern::All(operators)
                    }
                })
            }
            Value::Array(items) => Ok(Pattern::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| Pattern::compile(item, &format!("{path}[{i}]")))
                    .collect::<Result<_, _>>()?,
            )),
            Value::String(text) => Ok(match text.as_str() {
                "present?" => Pattern::Present,
                "nil?" => Pattern::Nil,
                "not-blank?" => Pattern::NotBlank,
                _ if text.starts_with('#') => Pattern::Regex(
                    Regex::new(&text[1..])
                        .map_err(|e| error(path, format!("bad regex '{}': {e}", &text[1..])))?,
                ),
                _ if text.starts_with('.') && text.len() > 1 => Pattern::PathRef(path_of(text)),
                _ => Pattern::Literal(value.clone()),
            }),
            other => Ok(Pattern::Literal(other.clone())),
        }
    }

    /// Whether `subject` (a value of the request object `root`; `None`: missing) matches.
    pub fn matches(&self, subject: Option<&Value>, root: &Value) -> bool {
        let subject = subject.filter(|v| !v.is_null());
        match self {
            Pattern::Map(entries) => match subject {
                Some(Value::Object(map)) => {
                    entries.iter().all(|(k, p)| p.matches(map.get(k), root))
                }
                _ => false,
            },
            Pattern::Array(items) => match subject {
                Some(Value::Array(values)) => {
                    values.len() >= items.len()
                        && items
                            .iter()
                            .zip(values)
                            .all(|(p, v)| p.matches(Some(v), root))
                }
                _ => false,
            },
            Pattern::Regex(regex) => match subject {
                Some(Value::String(text)) => regex.is_match(text),
                Some(Value::Number(number)) => regex.is_match(&number.to_string()),
                _ => false,
            },
            Pattern::PathRef(path) => match (resolve(root, path), subject) {
                (Some(target), Some(value)) => equal(target, value),
                _ => false,
            },
            Pattern::Present => subject.is_some(),
            Pattern::Nil => subject.is_none(),
            Pattern::NotBlank => subject
                .and_then(Value::as_str)
                .is_some_and(|s| !s.trim().is_empty()),
            Pattern::Literal(Value::Null) => subject.is_none(),
            Pattern::Literal(expected) => subject.is_some_and(|value| equal(expected, value)),
            Pattern::OneOf(patterns) => patterns.iter().any(|p| p.matches(subject, root)),
            Pattern::OneOfPath(path) => match (resolve(root, path), subject) {
                (Some(Value::Array(values)), Some(value)) => values.iter().any(|v| equal(v, value)),
                _ => false,
            },
            Pattern::Enum(values) => {
                subject.is_some_and(|value| values.iter().any(|v| equal(v, value)))
            }
            Pattern::Contains(pattern) => match (subject, pattern.as_ref()) {
                (Some(Value::Array(items)), _) => {
                    items.iter().any(|item| pattern.matches(Some(item), root))
                }
                (Some(Value::String(text)), Pattern::Literal(Value::String(needle))) => {
                    text.contains(needle.as_str())
                }
                _ => false,
            },
            Pattern::Every(pattern) => match subject {
                Some(Value::Array(items)) => {
                    items.iter().all(|item| pattern.matches(Some(item), root))
                }
                _ => false,
            },
            Pattern::Not(pattern) => !pattern.matches(subject, root),
            Pattern::Reference(pattern) => match subject.and_then(as_reference) {
                Some(reference) => pattern.matches(Some(&reference), root),
                None => false,
            },
            Pattern::PresentAll(patterns) => match subject {
                Some(Value::Array(items)) => patterns
                    .iter()
                    .all(|p| items.iter().any(|item| p.matches(Some(item), root))),
                _ => false,
            },
            Pattern::Length(n) => match subject {
                Some(Value::Array(items)) => items.len() as u64 == *n,
                Some(Value::String(text)) => text.chars().count() as u64 == *n,
                _ => false,
            },
            Pattern::All(patterns) => patterns.iter().all(|p| p.matches(subject, root)),
        }
    }

    /// Whether the pattern looks at the request's `body` (then the body must be read first).
    pub fn uses_body(&self) -> bool {
        match self {
            Pattern::Map(entries) => entries.iter().any(|(k, _)| k == "body"),
            Pattern::PathRef(path) | Pattern::OneOfPath(path) => {
                path.first().is_some_and(|k| k == "body")
            }
            Pattern::All(patterns) | Pattern::OneOf(patterns) => {
                patterns.iter().any(Pattern::uses_body)
            }
            Pattern::Not(p) => p.uses_body(),
            _ => false,
        }
    }
}

/// `.a.b` -> `["a", "b"]`.
fn path_of(text: &str) -> Vec<String> {
    text.trim_start_matches('.')
        .split('.')
        .map(str::to_string)
        .collect()
}

/// The value at a path of the request object (array items by index).
pub fn resolve<'a>(root: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut current = root;
    for key in path {
        current = match current {
            Value::Object(map) => map.get(key)?,
            Value::Array(items) => items.get(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    (!current.is_null()).then_some(current)
}

/// Equality, numbers compared by value.
fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => x == y,
        },
        _ => a == b,
    }
}

/// `{resourceType, id}` of a Reference in any of its shapes.
fn as_reference(value: &Value) -> Option<Value> {
    let split = |text: &str| {
        let (resource_type, id) = text
            .rsplit_once('/')
            .map(|(t, id)| (t.rsplit('/').next().unwrap_or(t), id))?;
        Some(serde_json::json!({"resourceType": resource_type, "id": id}))
    };
    match value {
        Value::String(text) => split(text),
        Value::Object(map) => {
            match (map.get("reference"), map.get("resourceType"), map.get("id")) {
                (Some(Value::String(reference)), _, _) => split(reference),
                (_, Some(resource_type), Some(id)) => {
                    Some(serde_json::json!({"resourceType": resource_type, "id": id}))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(pattern: Value, subject: Value) -> bool {
        Pattern::compile(&pattern, "matcho")
            .expect("compiles")
            .matches(Some(&subject), &subject)
    }

    #[test]
    fn maps_arrays_scalars_and_regexes() {
        assert!(check(json!({"x": 1}), json!({"x": 1, "y": 2})));
        assert!(!check(json!({"x": 1}), json!({"y": 2})));
        assert!(
            check(json!({"x": 1}), json!({"x": 1.0})),
            "numbers by value"
        );
        assert!(check(json!([1, 2]), json!([1, 2, 3])));
        assert!(!check(json!([1, 2]), json!([2, 1])));
        assert!(
            check(json!({"a": "#\\d+"}), json!({"a": "x2345"})),
            "an unanchored search"
        );
        assert!(!check(json!({"a": "#^\\d+$"}), json!({"a": "x2345"})));
        assert!(check(
            json!({"uri": "#/.*/\\$dump$"}),
            json!({"uri": "/Patient/$dump"})
        ));
        assert!(!check(
            json!({"uri": "#/.*/\\$dump$"}),
            json!({"uri": "/Patient/$dump/x"})
        ));
        assert!(check(
            json!({"a": "present?", "b": "nil?", "c": "not-blank?"}),
            json!({"a": 0, "c": " x"})
        ));
        assert!(!check(json!({"c": "not-blank?"}), json!({"c": "  "})));
    }

    #[test]
    fn operators() {
        assert!(check(
            json!({"m": {"$enum": ["get", "post"]}}),
            json!({"m": "post"})
        ));
        assert!(check(
            json!({"$one-of": [{"a": 1}, {"b": 2}]}),
            json!({"b": 2})
        ));
        assert!(check(
            json!({"t": {"$contains": {"system": "loinc"}}}),
            json!({"t": [{"system": "x"}, {"system": "loinc"}]})
        ));
        assert!(check(
            json!({"d": {"$contains": "patient"}}),
            json!({"d": "inpatient"})
        ));
        assert!(check(
            json!({"t": {"$every": {"ok": true}}}),
            json!({"t": [{"ok": true}, {"ok": true}]})
        ));
        assert!(!check(
            json!({"t": {"$every": {"ok": true}}}),
            json!({"t": [{"ok": true}, {"ok": false}]})
        ));
        assert!(check(json!({"a": {"$not": 1}}), json!({"a": 2})));
        assert!(check(
            json!({"s": {"$reference": {"resourceType": "Patient", "id": "p1"}}}),
            json!({"s": "Patient/p1"})
        ));
        assert!(check(
            json!({"s": {"$reference": {"id": "p1"}}}),
            json!({"s": {"reference": "Patient/p1"}})
        ));
        assert!(check(
            json!({"t": {"$present-all": ["b", "a"], "$length": 2}}),
            json!({"t": ["a", "b"]})
        ));
        assert!(!check(
            json!({"t": {"$present-all": ["b", "a"], "$length": 2}}),
            json!({"t": ["a", "b", "c"]})
        ));
    }

    #[test]
    fn paths_never_match_missing_values() {
        let request =
            json!({"user": {"id": "u1"}, "params": {"user_id": "u1"}, "roles": ["a", "b"]});
        let pattern = |p: Value| Pattern::compile(&p, "matcho").expect("compiles");
        assert!(
            pattern(json!({"params": {"user_id": ".user.id"}})).matches(Some(&request), &request)
        );
        let anonymous = json!({"params": {}});
        assert!(
            !pattern(json!({"params": {"user_id": ".user.id"}}))
                .matches(Some(&anonymous), &anonymous),
            "missing = missing is not a match"
        );
        assert!(pattern(json!({"r": {"$one-of": ".roles"}}))
            .matches(Some(&json!({"r": "b"})), &request));
    }

    #[test]
    fn bad_patterns_name_the_place() {
        for (pattern, message) in [
            (json!({"a": "#(unclosed"}), "matcho.a: bad regex"),
            (
                json!({"a": {"$nope": 1}}),
                "matcho.a.$nope: unknown matcho operator '$nope'",
            ),
            (
                json!({"$one-of": [1], "b": 2}),
                "cannot be used with other keys",
            ),
            (
                json!({"a": {"$length": "x"}}),
                "$length takes a whole number",
            ),
        ] {
            let error = Pattern::compile(&pattern, "matcho").expect_err("invalid");
            assert!(
                format!("{}: {}", error.path, error.message).contains(message),
                "{pattern}: {error:?}"
            );
        }
    }
}
