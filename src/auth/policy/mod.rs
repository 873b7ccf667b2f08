//! AccessPolicy: which authenticated subjects may make which requests.
//!
//! A policy has an `engine` and, optionally, `link`s to the subjects it is for (a policy
//! without links applies to every authenticated subject). A request passes if any policy
//! that applies to its subject allows it; root always passes; everything else is denied.
//!
//! Engines, as the reference product documents them:
//! - `allow`: allows everything;
//! - `matcho`: a pattern over the request object ([`matcho`]);
//! - `json-schema`: a JSON Schema (draft-07) over the request object, from which empty values
//!   (`[]`, `{}`, `""`, `null`) are removed first;
//! - `complex`: `and` or `or` (not both) of rules, each `{engine, ...}`, nested at will;
//! - `sql`: `sql.query`, one row of one boolean column; each `{{path}}` is a value of the
//!   request object, bound as a parameter (never pasted into the SQL), run read-only with a
//!   short timeout. (`{{!path}}`, which pastes an identifier, is refused.)
//!
//! Policies are compiled when written (a bad regex, an unknown engine or `$` operator is a
//! 400 naming the place) and cached per version of the `accesspolicy` table.

pub mod matcho;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::resource_type::ResourceType;
use crate::store::cached::TableCache;
use crate::store::clients::ClientRecord;
use crate::store::{Store, StoreError};
use matcho::Pattern;

/// How long an `engine: sql` policy's query may run.
const SQL_POLICY_TIMEOUT: Duration = Duration::from_secs(2);

/// A policy that cannot be compiled: where and why.
#[derive(Debug, Clone)]
pub struct PolicyError {
    /// Where in the policy (`matcho.$one-of[1].uri`).
    pub path: String,
    pub message: String,
}

fn error(path: &str, message: impl Into<String>) -> PolicyError {
    PolicyError {
        path: path.to_string(),
        message: message.into(),
    }
}

/// A compiled policy.
#[derive(Debug)]
pub struct Policy {
    /// The subjects it is for, as (resourceType, id); empty: every authenticated subject.
    links: Vec<(String, String)>,
    rule: Rule,
}

#[derive(Debug)]
enum Rule {
    Allow,
    Matcho(Pattern),
    JsonSchema(Box<jsonschema::Validator>),
    Complex { all: bool, rules: Vec<Rule> },
    Sql(SqlRule),
}

/// An `engine: sql` query with its `{{path}}`s replaced by `$1..$n`.
#[derive(Debug)]
struct SqlRule {
    query: String,
    paths: Vec<Vec<String>>,
}

impl Policy {
    /// Compiles an AccessPolicy body.
    pub fn compile(body: &Value) -> Result<Policy, PolicyError> {
        let Value::Object(body) = body else {
            return Err(error("", "an AccessPolicy must be an object"));
        };
        Ok(Policy {
            links: links(body.get("link"))?,
            rule: rule(body, "")?,
        })
    }

    fn applies_to(&self, client_id: &str) -> bool {
        self.links.is_empty()
            || self
                .links
                .iter()
                .any(|(rt, id)| rt == "Client" && id == client_id)
    }

    fn uses_body(&self) -> bool {
        self.rule.uses_body()
    }
}

fn links(link: Option<&Value>) -> Result<Vec<(String, String)>, PolicyError> {
    let Some(link) = link else {
        return Ok(Vec::new());
    };
    let Value::Array(items) = link else {
        return Err(error("link", "link must be a list of references"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let text = |key: &str| item.get(key).and_then(Value::as_str);
            match (text("resourceType"), text("id"), text("reference")) {
                (Some(rt), Some(id), _) => Ok((rt.to_string(), id.to_string())),
                (_, _, Some(reference)) => match reference.split_once('/') {
                    Some((rt, id)) if !rt.is_empty() && !id.is_empty() => {
                        Ok((rt.to_string(), id.to_string()))
                    }
                    _ => Err(error(
                        &format!("link[{i}]"),
                        format!("cannot read the reference '{reference}'"),
                    )),
                },
                _ => Err(error(
                    &format!("link[{i}]"),
                    "a link is {resourceType, id} or {reference: \"Client/id\"}",
                )),
            }
        })
        .collect()
}

/// A rule from an object with an `engine` (a policy, or an element of `and`/`or`).
fn rule(body: &Map<String, Value>, path: &str) -> Result<Rule, PolicyError> {
    let at = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    let engine = body.get("engine").and_then(Value::as_str).ok_or_else(|| {
        error(
            &at("engine"),
            "engine is required (allow, matcho, json-schema, complex, sql)",
        )
    })?;
    match engine {
        "allow" => Ok(Rule::Allow),
        "matcho" => {
            let pattern = body
                .get("matcho")
                .ok_or_else(|| error(&at("matcho"), "engine matcho needs a matcho pattern"))?;
            Ok(Rule::Matcho(Pattern::compile(pattern, &at("matcho"))?))
        }
        "json-schema" => {
            let schema = body
                .get("schema")
                .ok_or_else(|| error(&at("schema"), "engine json-schema needs a schema"))?;
            let validator = jsonschema::draft7::new(schema)
                .map_err(|e| error(&at("schema"), format!("invalid JSON Schema: {e}")))?;
            Ok(Rule::JsonSchema(Box::new(validator)))
        }
        "complex" => match (body.get("and"), body.get("or")) {
            (Some(_), Some(_)) => Err(error(path, "complex takes either and or or, not both")),
            (Some(Value::Array(rules)), None) => complex(rules, true, &at("and")),
            (None, Some(Value::Array(rules))) => complex(rules, false, &at("or")),
            _ => Err(error(
                &at("and"),
                "complex needs and: [rules] or or: [rules]",
            )),
        },
        "sql" => {
            let query = body
                .get("sql")
                .and_then(|sql| sql.get("query"))
                .and_then(Value::as_str)
                .ok_or_else(|| error(&at("sql.query"), "engine sql needs sql.query"))?;
            Ok(Rule::Sql(sql_rule(query, &at("sql.query"))?))
        }
        other => Err(error(
            &at("engine"),
            format!("unknown engine '{other}' (known: allow, matcho, json-schema, complex, sql)"),
        )),
    }
}

fn complex(rules: &[Value], all: bool, path: &str) -> Result<Rule, PolicyError> {
    let rules = rules
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Object(body) => rule(body, &format!("{path}[{i}]")),
            _ => Err(error(
                &format!("{path}[{i}]"),
                "a rule is an object with an engine",
            )),
        })
        .collect::<Result<_, _>>()?;
    Ok(Rule::Complex { all, rules })
}

/// Replaces each `{{path}}` with the next `$n`.
fn sql_rule(template: &str, path: &str) -> Result<SqlRule, PolicyError> {
    let mut query = String::new();
    let mut paths = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let end = rest[start..]
            .find("}}")
            .map(|e| start + e)
            .ok_or_else(|| error(path, "an unclosed {{"))?;
        let inner = rest[start + 2..end].trim();
        if inner.starts_with('!') {
            return Err(error(path, format!("{{{{{inner}}}}}: identifier interpolation is not supported (values only, as parameters)")));
        }
        if inner.is_empty() {
            return Err(error(path, "an empty {{}}"));
        }
        query.push_str(&rest[..start]);
        paths.push(
            inner
                .trim_start_matches('.')
                .split('.')
                .map(str::to_string)
                .collect(),
        );
        query.push_str(&format!("${}", paths.len()));
        rest = &rest[end + 2..];
    }
    query.push_str(rest);
    Ok(SqlRule { query, paths })
}

impl Rule {
    fn uses_body(&self) -> bool {
        match self {
            Rule::Matcho(pattern) => pattern.uses_body(),
            // A schema or a query may look anywhere.
            Rule::JsonSchema(_) | Rule::Sql(_) => true,
            Rule::Complex { rules, .. } => rules.iter().any(Rule::uses_body),
            Rule::Allow => false,
        }
    }

    fn evaluate<'a>(
        &'a self,
        request: &'a Value,
        store: &'a Store,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>> {
        Box::pin(async move {
            match self {
                Rule::Allow => true,
                Rule::Matcho(pattern) => pattern.matches(Some(request), request),
                Rule::JsonSchema(validator) => validator.is_valid(&without_empty(request)),
                Rule::Complex { all: true, rules } => {
                    for rule in rules {
                        if !rule.evaluate(request, store).await {
                            return false;
                        }
                    }
                    true
                }
                Rule::Complex { all: false, rules } => {
                    for rule in rules {
                        if rule.evaluate(request, store).await {
                            return true;
                        }
                    }
                    false
                }
                Rule::Sql(sql) => match run_sql(sql, request, store).await {
                    Ok(allowed) => allowed,
                    Err(error) => {
                        tracing::warn!(%error, "an engine: sql policy failed (denying)");
                        false
                    }
                },
            }
        })
    }
}

/// The request object without empty values, as the json-schema engine sees it.
fn without_empty(value: &Value) -> Value {
    let empty = |v: &Value| match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    };
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), without_empty(v)))
                .filter(|(_, v)| !empty(v))
                .collect(),
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(without_empty)
                .filter(|v| !empty(v))
                .collect(),
        ),
        other => other.clone(),
    }
}

async fn run_sql(sql: &SqlRule, request: &Value, store: &Store) -> Result<bool, StoreError> {
    let params: Vec<Option<String>> = sql
        .paths
        .iter()
        .map(|path| {
            matcho::resolve(request, path).map(|value| match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            })
        })
        .collect();
    crate::store::policy::sql_allows(store, &sql.query, params, SQL_POLICY_TIMEOUT).await
}

/// The compiled policies in force.
#[derive(Default)]
pub struct PolicySet {
    policies: Vec<(String, Policy)>,
    uses_body: bool,
}

impl PolicySet {
    /// Compiles stored policies; one that does not compile (written around the API) is
    /// skipped with a warning: it can allow nothing.
    pub fn compile(stored: Vec<(String, Value)>) -> PolicySet {
        let mut policies = Vec::new();
        for (id, body) in stored {
            match Policy::compile(&body) {
                Ok(policy) => policies.push((id, policy)),
                Err(e) => {
                    tracing::warn!(policy = %id, path = %e.path, message = %e.message, "skipping an invalid AccessPolicy")
                }
            }
        }
        let uses_body = policies.iter().any(|(_, p)| p.uses_body());
        PolicySet {
            policies,
            uses_body,
        }
    }

    /// Whether some policy looks at the request body (then it must be read first).
    pub fn uses_body(&self) -> bool {
        self.uses_body
    }

    /// Whether any policy for this client allows the request.
    pub async fn allows(&self, client: &ClientRecord, request: &Value, store: &Store) -> bool {
        for (_, policy) in &self.policies {
            if policy.applies_to(&client.id) && policy.rule.evaluate(request, store).await {
                return true;
            }
        }
        false
    }
}

/// Policies read from the database, recompiled when the `accesspolicy` table changes.
pub struct PolicyCache {
    cache: TableCache<PolicySet>,
}

impl Default for PolicyCache {
    fn default() -> PolicyCache {
        let rt = ResourceType::parse("AccessPolicy").expect("a fhirbox type");
        PolicyCache {
            cache: TableCache::new(rt),
        }
    }
}

impl PolicyCache {
    /// The policies in force now (one cheap query to check they did not change).
    pub async fn current(&self, store: &Store) -> Result<Arc<PolicySet>, StoreError> {
        self.cache.get(store, PolicySet::compile).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_seeds_policy_compiles() {
        let policy = json!({
            "engine": "matcho",
            "matcho": {"$one-of": [
                {"uri": "/$dump-sql", "request-method": "post"},
                {"uri": "#/.*/\\$dump$", "request-method": "get"},
                {"uri": "#/.*/\\$dump-csv$", "request-method": "get"},
                {"uri": {"$one-of": ["/$import", "/fhir/$import"]}, "request-method": "post"},
                {"uri": {"$one-of": ["/$load", "/fhir/$load", "#/.*/\\$load$"]}}
            ]},
            "link": [{"id": "bulk-client", "resourceType": "Client"}]
        });
        let compiled = Policy::compile(&policy).expect("compiles");
        assert!(compiled.applies_to("bulk-client"));
        assert!(!compiled.applies_to("other"));
        assert!(!compiled.uses_body());
    }

    #[test]
    fn bad_policies_name_the_bad_part() {
        for (policy, path, message) in [
            (
                json!({"engine": "magic"}),
                "engine",
                "unknown engine 'magic'",
            ),
            (json!({}), "engine", "engine is required"),
            (
                json!({"engine": "matcho", "matcho": {"uri": "#["}}),
                "matcho.uri",
                "bad regex",
            ),
            (
                json!({"engine": "matcho", "matcho": {"uri": {"$like": "x"}}}),
                "matcho.uri.$like",
                "unknown matcho operator",
            ),
            (
                json!({"engine": "json-schema", "schema": {"type": "nope"}}),
                "schema",
                "invalid JSON Schema",
            ),
            (
                json!({"engine": "complex", "and": [{"engine": "allow"}], "or": []}),
                "",
                "not both",
            ),
            (
                json!({"engine": "complex", "or": [{"engine": "allow"}, {"engine": "bogus"}]}),
                "or[1].engine",
                "unknown engine",
            ),
            (
                json!({"engine": "sql", "sql": {"query": "select {{!params.resource/type}}"}}),
                "sql.query",
                "identifier interpolation",
            ),
            (
                json!({"engine": "allow", "link": [{"id": "x"}]}),
                "link[0]",
                "a link is",
            ),
        ] {
            let e = Policy::compile(&policy).expect_err("invalid");
            assert_eq!(e.path, path, "{policy}: {e:?}");
            assert!(e.message.contains(message), "{policy}: {e:?}");
        }
    }

    #[test]
    fn sql_templates_become_parameters() {
        let rule = sql_rule(
            "select {{client.id}} = 'x' and {{ params.resource/type }} is not null",
            "q",
        )
        .expect("valid");
        assert_eq!(rule.query, "select $1 = 'x' and $2 is not null");
        assert_eq!(
            rule.paths,
            vec![
                vec!["client".to_string(), "id".into()],
                vec!["params".into(), "resource/type".into()]
            ]
        );
    }

    #[test]
    fn json_schema_sees_no_empty_values() {
        assert_eq!(
            without_empty(&json!({"a": "", "b": [], "c": {}, "d": null, "e": {"f": ""}, "g": 1})),
            json!({"g": 1})
        );
    }
}
