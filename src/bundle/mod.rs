//! `PUT /` (upsert a list of resources) and `POST /` (transaction and batch Bundles).
//!
//! - `PUT /`: one transaction; every element needs `resourceType` and `id`; all or nothing.
//! - `transaction`: entries run in the order given, in one database transaction; the first
//!   failing entry rolls everything back. Ids are assigned before any entry runs, so a
//!   reference to an entry's `fullUrl` (`urn:uuid:...`) is rewritten to the id it gets, even
//!   when the reference comes before the entry.
//! - `batch`: each entry runs in a transaction of its own; failures are reported per entry.
//!
//! Entries support `POST [type]` (with `ifNoneExist`), `PUT [type]/[id]`, `DELETE [type]/[id]`,
//! `GET [type]/[id]`, and the conditional `PUT [type]?[search]` and `DELETE [type]?[search]`
//! (see `crud::conditional`; in a transaction they find what they are about before any
//! entry runs, so that references to their `fullUrl` name it).
//! As the reference product does, the Bundle's `resourceType` may be spelled `bundle`, and an
//! entry's resource may leave out `resourceType` (the URL names it).

mod references;

use std::collections::HashMap;

use axum::http::StatusCode;
use serde_json::Value;

use crate::crud::{self, Checked, CrudError, Deleted};
use crate::format::FormatError;
use crate::resource::{new_id, StoredResource};
use crate::resource_type::ResourceType;
use crate::store::search::PageFilter;
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
/// authorization), and a conditional entry's search (`Type?search` or `ifNoneExist`), which
/// is authorized and compiled as a search. `None`: its URL is not one fhirbox runs (the
/// entry fails when planned).
pub fn entry_request(entry: &RawEntry) -> Option<EntryRequest<'_>> {
    let (rt, id, query) = parse_entry_url(&entry.url).ok()?;
    let search = match entry.method.as_str() {
        "POST" => entry
            .if_none_exist
            .as_deref()
            .map(|q| q.split_once('?').map_or(q, |(_, q)| q)),
        _ => query,
    };
    Some(EntryRequest {
        method: entry.method.as_str(),
        rt,
        id,
        search: search.map(str::to_string),
    })
}

/// An entry as the request it stands for.
pub struct EntryRequest<'a> {
    pub method: &'a str,
    pub rt: ResourceType,
    pub id: Option<String>,
    /// A conditional entry's search (the query, without `Type?`).
    pub search: Option<String>,
}

/// What the caller decided about an entry before it runs.
#[derive(Debug, Default)]
pub struct Facts {
    /// Why it may not run, if it may not (its authorization).
    pub refused: Option<String>,
    /// A conditional entry's search, compiled (or why it cannot be).
    pub search: Option<Result<PageFilter, CrudError>>,
}

/// `POST /`: runs a transaction or batch Bundle. `facts[i]`: entry `i`'s authorization and
/// conditional search, decided by the caller: a transaction with a refused entry is refused
/// whole before anything runs; in a batch that entry alone fails, with 403.
pub async fn process(
    store: &Store,
    bundle: Parsed,
    inbound: Inbound<'_>,
    facts: Vec<Facts>,
) -> Result<(BundleKind, Vec<Result<EntryResult, CrudError>>), BundleError> {
    let Parsed { kind, entries } = bundle;
    if kind == BundleKind::Transaction {
        if let Some((index, why)) = facts
            .iter()
            .enumerate()
            .find_map(|(i, f)| f.refused.clone().map(|r| (i, r)))
        {
            return Err(BundleError::entry(index, CrudError::Forbidden(why)));
        }
    }
    let mut facts = facts.into_iter();
    let mut planned = Vec::with_capacity(entries.len());
    for (index, entry) in entries.into_iter().enumerate() {
        let Facts { refused, search } = facts.next().unwrap_or_default();
        planned.push(match refused {
            // Not even checked: a refused entry learns nothing about its resource.
            Some(why) => Err(CrudError::Forbidden(why)),
            None => Ok(plan(entry, &inbound, search).map_err(|e| BundleError::entry(index, e))?),
        });
    }
    match kind {
        BundleKind::Transaction => {
            let planned: Vec<Op> = planned.into_iter().flatten().collect();
            let tx = store.begin().await?;
            // Conditional entries find what they are about first, so that references to
            // their fullUrls name what they found.
            let mut settled = Vec::with_capacity(planned.len());
            for (index, op) in planned.into_iter().enumerate() {
                match settle(&tx, op).await {
                    Ok(op) => settled.push(op),
                    Err(error) => return tx.finish(Err(BundleError::entry(index, error))).await,
                }
            }
            resolve_full_urls(&mut settled);
            let mut results = Vec::with_capacity(settled.len());
            for (index, op) in settled.into_iter().enumerate() {
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
    /// `request.ifNoneExist`: a conditional create's search.
    if_none_exist: Option<String>,
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
            if_none_exist: field("ifNoneExist"),
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
    /// `POST` with `ifNoneExist`.
    CreateUnless {
        full_url: Option<String>,
        doc: Checked,
        filter: PageFilter,
    },
    /// `PUT [type]?search`.
    UpdateWhere {
        full_url: Option<String>,
        doc: Checked,
        filter: PageFilter,
    },
    /// `DELETE [type]?search`.
    DeleteWhere {
        rt: ResourceType,
        filter: PageFilter,
    },
    /// A conditional create that found its resource: nothing to write.
    Found {
        full_url: Option<String>,
        resource: StoredResource,
    },
    /// A conditional delete that found nothing.
    Nothing,
}

fn plan(
    entry: RawEntry,
    inbound: &Inbound<'_>,
    search: Option<Result<PageFilter, CrudError>>,
) -> Result<Op, CrudError> {
    let (rt, url_id, query) = parse_entry_url(&entry.url)?;
    let checked = |resource: Option<Value>, id: Option<&str>| -> Result<Checked, CrudError> {
        let doc = resource
            .ok_or_else(|| CrudError::invalid(format!("{} needs a resource", entry.method)))?;
        crud::check((inbound.to_native)(doc)?, Some(rt), id)
    };
    let filter = || -> Result<PageFilter, CrudError> {
        search.ok_or_else(|| CrudError::invalid("the conditional entry's search was not read"))?
    };
    match (entry.method.as_str(), url_id, query) {
        ("POST", None, None) => {
            let conditional = entry.if_none_exist.is_some();
            let mut doc = checked(entry.resource, None)?;
            // Decide the id now, so references to this entry can be rewritten before it runs.
            doc.id = match doc.id.take() {
                Some(id) if inbound.keep_post_ids => Some(id),
                _ => Some(new_id()),
            };
            let full_url = entry.full_url;
            Ok(match conditional {
                true => Op::CreateUnless {
                    full_url,
                    doc,
                    filter: filter()?,
                },
                false => Op::Create { full_url, doc },
            })
        }
        ("PUT", Some(id), None) => Ok(Op::Update {
            doc: checked(entry.resource, Some(&id))?,
            full_url: entry.full_url,
            id,
        }),
        ("PUT", None, Some(_)) => {
            let resource = entry.resource;
            let id = resource
                .as_ref()
                .and_then(|r| r.get("id"))
                .and_then(Value::as_str)
                .map(str::to_string);
            Ok(Op::UpdateWhere {
                doc: checked(resource, id.as_deref())?,
                full_url: entry.full_url,
                filter: filter()?,
            })
        }
        ("DELETE", Some(id), None) => Ok(Op::Delete { rt, id }),
        ("DELETE", None, Some(_)) => Ok(Op::DeleteWhere {
            rt,
            filter: filter()?,
        }),
        ("GET", Some(id), None) => Ok(Op::Read { rt, id }),
        (method, _, _) => Err(CrudError::invalid(format!(
            "unsupported entry request '{method} {}' (supported: POST [type], PUT/DELETE/GET \
             [type]/[id], PUT/DELETE [type]?[search])",
            entry.url
        ))),
    }
}

/// A conditional entry made plain: what its search found decides what it does.
async fn settle(tx: &Tx, op: Op) -> Result<Op, CrudError> {
    use crud::conditional::find_in;
    Ok(match op {
        Op::CreateUnless {
            full_url,
            doc,
            filter,
        } => match find_in(tx, doc.resource_type, &filter, "ifNoneExist search").await? {
            Some(resource) => Op::Found { full_url, resource },
            None => Op::Create { full_url, doc },
        },
        Op::UpdateWhere {
            full_url,
            doc,
            filter,
        } => {
            let rt = doc.resource_type;
            let found = find_in(tx, rt, &filter, "conditional update's search").await?;
            let id = match (found, doc.id.clone()) {
                (Some(found), Some(id)) if found.id != id => {
                    return Err(CrudError::invalid(format!(
                        "the search found {rt}/{}, but the resource's id is {id}",
                        found.id
                    )))
                }
                (Some(found), _) => found.id,
                (None, Some(id)) => id,
                (None, None) => new_id(),
            };
            Op::Update { full_url, id, doc }
        }
        Op::DeleteWhere { rt, filter } => {
            match find_in(tx, rt, &filter, "conditional delete's search").await? {
                Some(found) => Op::Delete { rt, id: found.id },
                None => Op::Nothing,
            }
        }
        other => other,
    })
}

/// `Patient`, `/Patient`, `Patient/pt-1`, `/Attribute/Patient.citizenship`, and
/// `Patient?identifier=x` (a conditional entry's search, returned apart).
fn parse_entry_url(url: &str) -> Result<(ResourceType, Option<String>, Option<&str>), CrudError> {
    let (path, query) = match url.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (url, None),
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (segments.as_slice(), query) {
        ([name], _) => Ok((crud::resource_type(name)?, None, query)),
        ([name, id], None) => {
            let rt = crud::resource_type(name)?;
            crud::check_id(rt, id)?;
            Ok((rt, Some((*id).to_string()), None))
        }
        _ => Err(CrudError::invalid(format!(
            "'{url}' is not a [type], [type]/[id] or [type]?[search] URL"
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
            Op::Found {
                full_url: Some(url),
                resource,
            } => {
                targets.insert(url.clone(), (resource.resource_type, resource.id.clone()));
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
                references::rewrite(value, &targets);
            }
        }
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
        Op::Found { resource, .. } => Ok(done(StatusCode::OK, Some(resource))),
        Op::Nothing => Ok(done(StatusCode::NO_CONTENT, None)),
        conditional @ (Op::CreateUnless { .. }
        | Op::UpdateWhere { .. }
        | Op::DeleteWhere { .. }) => Box::pin(run(tx, settle(tx, conditional).await?)).await,
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

    #[test]
    fn entry_urls() {
        let (rt, id, _) = parse_entry_url("/Attribute/Patient.citizenship").expect("valid url");
        assert_eq!(
            (rt.name(), id.as_deref()),
            ("Attribute", Some("Patient.citizenship"))
        );
        let (rt, id, query) = parse_entry_url("Patient").expect("valid url");
        assert_eq!((rt.name(), id, query), ("Patient", None, None));
        let (rt, id, query) = parse_entry_url("Patient?name=x").expect("valid url");
        assert_eq!((rt.name(), id, query), ("Patient", None, Some("name=x")));
        assert!(matches!(
            parse_entry_url("/Nope"),
            Err(CrudError::UnknownType(_))
        ));
        assert!(parse_entry_url("/Patient/p1?name=x").is_err());
        assert!(parse_entry_url("/Patient/a/b").is_err());
    }
}
