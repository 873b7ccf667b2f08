//! `PUT /` (upsert a list of resources) and `POST /` (transaction and batch Bundles).
//!
//! - `PUT /`: one transaction; every element needs `resourceType` and `id`; all or nothing.
//! - `transaction`: entries run in the order given, in one database transaction; the first
//!   failing entry rolls everything back. Ids are assigned before any entry runs, so a
//!   reference to an entry's `fullUrl` (`urn:uuid:...`) is rewritten to the id it gets, even
//!   when the reference comes before the entry.
//! - `batch`: each entry runs in a transaction of its own; failures are reported per entry.
//!
//! Entries support `POST [type]`, `PUT [type]/[id]`, `DELETE [type]/[id]` and `GET [type]/[id]`.
//! As the reference product does, the Bundle's `resourceType` may be spelled `bundle`, and an
//! entry's resource may leave out `resourceType` (the URL names it).

use std::collections::HashMap;

use axum::http::StatusCode;
use serde_json::{Map, Value};

use crate::crud::{self, Checked, CrudError, Deleted};
use crate::format::FormatError;
use crate::resource::{new_id, StoredResource};
use crate::resource_type::ResourceType;
use crate::store::{Store, StoreError, Tx};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{0}")]
    Invalid(String),
    #[error("entry {index}: {source}")]
    Entry {
        index: usize,
        source: Box<CrudError>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BundleError {
    fn entry(index: usize, source: impl Into<CrudError>) -> BundleError {
        BundleError::Entry {
            index,
            source: Box::new(source.into()),
        }
    }
}

/// `PUT /`: upserts every resource of the list in one transaction.
pub async fn upsert_all(store: &Store, list: Value) -> Result<Vec<StoredResource>, BundleError> {
    let Value::Array(docs) = list else {
        return Err(BundleError::Invalid(
            "PUT / takes a list (array) of resources, each with resourceType and id".into(),
        ));
    };
    let mut checked = Vec::with_capacity(docs.len());
    for (index, doc) in docs.into_iter().enumerate() {
        let doc = crud::check(doc, None, None).map_err(|e| BundleError::entry(index, e))?;
        if doc.id.is_none() {
            return Err(BundleError::entry(
                index,
                CrudError::invalid("the resource has no id"),
            ));
        }
        checked.push(doc);
    }
    let tx = store.begin().await?;
    let mut stored = Vec::with_capacity(checked.len());
    for (index, doc) in checked.into_iter().enumerate() {
        let id = doc.id.clone().unwrap_or_default();
        match crud::update_in(&tx, doc, &id).await {
            Ok((version, _)) => stored.push(version),
            Err(error) => return tx.finish(Err(BundleError::entry(index, error))).await,
        }
    }
    tx.commit().await?;
    Ok(stored)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleKind {
    Transaction,
    Batch,
}

impl BundleKind {
    /// The `type` of the response Bundle.
    pub fn response_type(self) -> &'static str {
        match self {
            BundleKind::Transaction => "transaction-response",
            BundleKind::Batch => "batch-response",
        }
    }
}

/// The result of one entry.
#[derive(Debug)]
pub struct EntryResult {
    pub status: StatusCode,
    /// The version written or read (for a delete: the `deleted` version, if one was made).
    pub resource: Option<StoredResource>,
}

/// How incoming resources are turned into native documents (FHIR conversion or identity),
/// and whether a POSTed body's own id is kept (native API) or replaced (FHIR API).
pub struct Inbound<'a> {
    pub to_native: &'a (dyn Fn(Value) -> Result<Value, FormatError> + Sync),
    pub keep_post_ids: bool,
}

/// A Bundle, read but not run: its kind and its entries.
pub struct Parsed {
    pub kind: BundleKind,
    pub entries: Vec<RawEntry>,
}

/// What an entry would be as a request of its own: its method, type and id (for its
/// authorization). `None`: its URL is not one fhirbox runs (the entry fails when planned).
pub fn entry_request(entry: &RawEntry) -> Option<(&str, ResourceType, Option<String>)> {
    let (rt, id) = parse_entry_url(&entry.url).ok()?;
    Some((entry.method.as_str(), rt, id))
}

/// `POST /`: runs a transaction or batch Bundle. `refused[i]`: why entry `i` may not run, if
/// it may not (its authorization, decided by the caller): a transaction with a refused entry
/// is refused whole before anything runs; in a batch that entry alone fails, with 403.
pub async fn process(
    store: &Store,
    bundle: Parsed,
    inbound: Inbound<'_>,
    refused: Vec<Option<String>>,
) -> Result<(BundleKind, Vec<Result<EntryResult, CrudError>>), BundleError> {
    let Parsed { kind, entries } = bundle;
    let refusal = |index: usize| refused.get(index).cloned().flatten();
    if kind == BundleKind::Transaction {
        if let Some((index, why)) = (0..entries.len()).find_map(|i| refusal(i).map(|r| (i, r))) {
            return Err(BundleError::entry(index, CrudError::Forbidden(why)));
        }
    }
    let mut planned = Vec::with_capacity(entries.len());
    for (index, entry) in entries.into_iter().enumerate() {
        planned.push(match refusal(index) {
            // Not even checked: a refused entry learns nothing about its resource.
            Some(why) => Err(CrudError::Forbidden(why)),
            None => Ok(plan(entry, &inbound).map_err(|e| BundleError::entry(index, e))?),
        });
    }
    match kind {
        BundleKind::Transaction => {
            let mut planned: Vec<Op> = planned.into_iter().flatten().collect();
            resolve_full_urls(&mut planned);
            let tx = store.begin().await?;
            let mut results = Vec::with_capacity(planned.len());
            for (index, op) in planned.into_iter().enumerate() {
                match run(&tx, op).await {
                    Ok(result) => results.push(Ok(result)),
                    Err(error) => return tx.finish(Err(BundleError::entry(index, error))).await,
                }
            }
            tx.commit().await?;
            Ok((kind, results))
        }
        BundleKind::Batch => {
            let mut results = Vec::with_capacity(planned.len());
            for op in planned {
                results.push(match op {
                    Ok(op) => run_alone(store, op).await,
                    Err(refused) => Err(refused),
                });
            }
            Ok((kind, results))
        }
    }
}

/// An entry as found in the Bundle.
pub struct RawEntry {
    full_url: Option<String>,
    method: String,
    url: String,
    /// The entry's resource as sent.
    pub resource: Option<Value>,
}

/// Reads a Bundle's kind and entries (nothing is checked or run yet).
pub fn parse(bundle: Value) -> Result<Parsed, BundleError> {
    let invalid = |message: &str| BundleError::Invalid(message.to_string());
    let Value::Object(mut bundle) = bundle else {
        return Err(invalid("POST / takes a Bundle (a JSON object)"));
    };
    match bundle.get("resourceType") {
        None => {}
        Some(Value::String(name)) if name.eq_ignore_ascii_case("Bundle") => {}
        Some(_) => return Err(invalid("POST / takes a resource of type Bundle")),
    }
    let kind = match bundle.get("type").and_then(Value::as_str) {
        Some("transaction") => BundleKind::Transaction,
        Some("batch") => BundleKind::Batch,
        _ => return Err(invalid("Bundle.type must be 'transaction' or 'batch'")),
    };
    let entries = match bundle.shift_remove("entry") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(entries)) => entries,
        Some(_) => return Err(invalid("Bundle.entry must be a list")),
    };
    let mut raw = Vec::with_capacity(entries.len());
    for (index, entry) in entries.into_iter().enumerate() {
        let Value::Object(mut entry) = entry else {
            return Err(BundleError::Invalid(format!(
                "entry {index}: must be an object"
            )));
        };
        let request = entry.get("request").and_then(Value::as_object);
        let field = |name: &str| {
            request
                .and_then(|r| r.get(name))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let (Some(method), Some(url)) = (field("method"), field("url")) else {
            return Err(BundleError::Invalid(format!(
                "entry {index}: request.method and request.url are required"
            )));
        };
        raw.push(RawEntry {
            full_url: entry
                .get("fullUrl")
                .and_then(Value::as_str)
                .map(str::to_string),
            method: method.to_ascii_uppercase(),
            url,
            resource: entry.shift_remove("resource"),
        });
    }
    Ok(Parsed { kind, entries: raw })
}

/// One entry, checked and with its id decided.
enum Op {
    Create {
        full_url: Option<String>,
        doc: Checked,
    },
    Update {
        full_url: Option<String>,
        id: String,
        doc: Checked,
    },
    Delete {
        rt: ResourceType,
        id: String,
    },
    Read {
        rt: ResourceType,
        id: String,
    },
}

fn plan(entry: RawEntry, inbound: &Inbound<'_>) -> Result<Op, CrudError> {
    let (rt, url_id) = parse_entry_url(&entry.url)?;
    let checked = |resource: Option<Value>, id: Option<&str>| -> Result<Checked, CrudError> {
        let doc = resource
            .ok_or_else(|| CrudError::invalid(format!("{} needs a resource", entry.method)))?;
        crud::check((inbound.to_native)(doc)?, Some(rt), id)
    };
    match (entry.method.as_str(), url_id) {
        ("POST", None) => {
            let mut doc = checked(entry.resource, None)?;
            // Decide the id now, so references to this entry can be rewritten before it runs.
            doc.id = match doc.id.take() {
                Some(id) if inbound.keep_post_ids => Some(id),
                _ => Some(new_id()),
            };
            Ok(Op::Create { full_url: entry.full_url, doc })
        }
        ("PUT", Some(id)) => Ok(Op::Update {
            doc: checked(entry.resource, Some(&id))?,
            full_url: entry.full_url,
            id,
        }),
        ("DELETE", Some(id)) => Ok(Op::Delete { rt, id }),
        ("GET", Some(id)) => Ok(Op::Read { rt, id }),
        (method, _) => Err(CrudError::invalid(format!(
            "unsupported entry request '{method} {}' (supported: POST [type], PUT/DELETE/GET [type]/[id])",
            entry.url
        ))),
    }
}

/// `Patient`, `/Patient`, `Patient/pt-1`, `/Attribute/Patient.citizenship`.
fn parse_entry_url(url: &str) -> Result<(ResourceType, Option<String>), CrudError> {
    if url.contains('?') {
        return Err(CrudError::invalid(format!(
            "'{url}': conditional operations are not supported"
        )));
    }
    let segments: Vec<&str> = url.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        [name] => Ok((crud::resource_type(name)?, None)),
        [name, id] => {
            let rt = crud::resource_type(name)?;
            crud::check_id(rt, id)?;
            Ok((rt, Some((*id).to_string())))
        }
        _ => Err(CrudError::invalid(format!(
            "'{url}' is not a [type] or [type]/[id] URL"
        ))),
    }
}

/// Rewrites references to entries' `fullUrl`s into references to the ids they get: native
/// `{"uri": "urn:uuid:..."}` becomes `{"resourceType": T, "id": I}`, and a FHIR-shaped
/// `{"reference": "urn:uuid:..."}` becomes `{"reference": "T/I"}`.
fn resolve_full_urls(ops: &mut [Op]) {
    let mut targets: HashMap<String, (ResourceType, String)> = HashMap::new();
    for op in ops.iter() {
        match op {
            Op::Create {
                full_url: Some(url),
                doc,
            } => {
                if let Some(id) = &doc.id {
                    targets.insert(url.clone(), (doc.resource_type, id.clone()));
                }
            }
            Op::Update {
                full_url: Some(url),
                id,
                doc,
            } => {
                targets.insert(url.clone(), (doc.resource_type, id.clone()));
            }
            _ => {}
        }
    }
    if targets.is_empty() {
        return;
    }
    for op in ops.iter_mut() {
        if let Op::Create { doc, .. } | Op::Update { doc, .. } = op {
            for value in doc.body.values_mut() {
                rewrite_references(value, &targets);
            }
        }
    }
}

fn rewrite_references(value: &mut Value, targets: &HashMap<String, (ResourceType, String)>) {
    match value {
        Value::Object(map) => {
            rewrite_reference_object(map, targets);
            for child in map.values_mut() {
                rewrite_references(child, targets);
            }
        }
        Value::Array(items) => {
            for item in items {
                rewrite_references(item, targets);
            }
        }
        _ => {}
    }
}

fn rewrite_reference_object(
    map: &mut Map<String, Value>,
    targets: &HashMap<String, (ResourceType, String)>,
) {
    let target = |key: &str| {
        map.get(key)
            .and_then(Value::as_str)
            .and_then(|url| targets.get(url))
            .cloned()
    };
    if let Some((rt, id)) = target("uri") {
        map.shift_remove("uri");
        map.insert("resourceType".into(), rt.name().into());
        map.insert("id".into(), id.into());
    } else if let Some((rt, id)) = target("reference") {
        map.insert("reference".into(), format!("{rt}/{id}").into());
    }
}

async fn run(tx: &Tx, op: Op) -> Result<EntryResult, CrudError> {
    let done = |status, resource| EntryResult { status, resource };
    match op {
        Op::Create { doc, .. } => {
            let created = crud::create_in(tx, doc, true).await?;
            Ok(done(StatusCode::CREATED, Some(created)))
        }
        Op::Update { doc, id, .. } => {
            let (version, created) = crud::update_in(tx, doc, &id).await?;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(done(status, Some(version)))
        }
        Op::Delete { rt, id } => match crud::delete_in(tx, rt, &id).await? {
            Deleted::Now(_) => Ok(done(StatusCode::OK, None)),
            Deleted::Already => Ok(done(StatusCode::NO_CONTENT, None)),
        },
        Op::Read { rt, id } => {
            let found = crud::read_with(&**tx, rt, &id).await?;
            Ok(done(StatusCode::OK, Some(found)))
        }
    }
}

/// A batch entry: its own transaction.
async fn run_alone(store: &Store, op: Op) -> Result<EntryResult, CrudError> {
    let tx = store.begin().await?;
    let result = run(&tx, op).await;
    tx.finish(result).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entry_urls() {
        let (rt, id) = parse_entry_url("/Attribute/Patient.citizenship").expect("valid url");
        assert_eq!(
            (rt.name(), id.as_deref()),
            ("Attribute", Some("Patient.citizenship"))
        );
        let (rt, id) = parse_entry_url("Patient").expect("valid url");
        assert_eq!((rt.name(), id), ("Patient", None));
        assert!(matches!(
            parse_entry_url("/Nope"),
            Err(CrudError::UnknownType(_))
        ));
        assert!(parse_entry_url("/Patient?name=x").is_err());
        assert!(parse_entry_url("/Patient/a/b").is_err());
    }

    #[test]
    fn full_url_references_are_rewritten_in_both_shapes() {
        let rt = ResourceType::parse("Patient").expect("known type");
        let targets = HashMap::from([("urn:uuid:1".to_string(), (rt, "p1".to_string()))]);
        let mut doc = json!({
            "subject": {"uri": "urn:uuid:1", "display": "Alice"},
            "performer": [{"reference": "urn:uuid:1"}, {"uri": "urn:uuid:other"}]
        });
        rewrite_references(&mut doc, &targets);
        assert_eq!(
            doc,
            json!({
                "subject": {"display": "Alice", "resourceType": "Patient", "id": "p1"},
                "performer": [{"reference": "Patient/p1"}, {"uri": "urn:uuid:other"}]
            })
        );
    }
}
