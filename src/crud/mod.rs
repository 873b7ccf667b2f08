//! Create, read, update, delete and history of single resources, in the native format.
//!
//! Callers (the HTTP handlers and bundle processing) hand in native documents; the checks a
//! document must pass against its URL live here, once, for both. Each `*_in` function runs in a
//! caller's transaction; the others open one of their own.

pub mod conditional;

use serde_json::{Map, Value};

use crate::format::FormatError;
use crate::resource::{body_for_storage, is_valid_id, new_id, StoredResource};
use crate::resource_type::ResourceType;
use crate::store::clients as resources_clients;
use crate::store::resources::{self, Lookup};
use crate::store::{Store, StoreError, Tx};

#[derive(Debug, thiserror::Error)]
pub enum CrudError {
    #[error("unknown resource type '{0}'")]
    UnknownType(String),
    #[error("{resource_type}/{id} not found")]
    NotFound { resource_type: String, id: String },
    #[error("{resource_type}/{id} was deleted")]
    Gone { resource_type: String, id: String },
    #[error("{message}")]
    Invalid {
        message: String,
        /// The offending element, e.g. `Patient.id`.
        expression: Option<String>,
    },
    /// The subject may not do this (a Bundle entry its authorization refused).
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A conditional write's search (its parameters are wrong).
    #[error(transparent)]
    Search(#[from] crate::search::SearchError),
    /// A conditional write's search found more than one resource.
    #[error("{0}")]
    PreconditionFailed(String),
    /// A statement ran past its time (a conditional write's search).
    #[error("{0}")]
    Timeout(String),
}

impl CrudError {
    pub fn invalid(message: impl Into<String>) -> CrudError {
        CrudError::Invalid {
            message: message.into(),
            expression: None,
        }
    }

    fn invalid_at(expression: impl Into<String>, message: impl Into<String>) -> CrudError {
        CrudError::Invalid {
            message: message.into(),
            expression: Some(expression.into()),
        }
    }

    fn not_found(rt: ResourceType, id: &str) -> CrudError {
        CrudError::NotFound {
            resource_type: rt.name().to_string(),
            id: id.to_string(),
        }
    }
}

/// Resolves a type name from a URL.
pub fn resource_type(name: &str) -> Result<ResourceType, CrudError> {
    ResourceType::parse(name).ok_or_else(|| CrudError::UnknownType(name.to_string()))
}

/// A native document checked against where it is being written.
#[derive(Debug)]
pub struct Checked {
    pub resource_type: ResourceType,
    /// The id in the body, if any (already checked against the URL's).
    pub id: Option<String>,
    /// The body to store.
    pub body: Map<String, Value>,
    /// A Client's new secret, taken out of the body: only its hash is stored, elsewhere.
    pub secret: Option<String>,
}

/// Checks a document written to `url_type` (and `url_id` for PUT): it must be an object, its
/// `resourceType` (optional when the URL names the type) and `id` must agree with the URL,
/// and the id must be a valid FHIR id.
pub fn check(
    doc: Value,
    url_type: Option<ResourceType>,
    url_id: Option<&str>,
) -> Result<Checked, CrudError> {
    let Value::Object(doc) = doc else {
        return Err(CrudError::invalid(
            "the body must be a JSON object (a resource)",
        ));
    };
    let resource_type = match (doc.get("resourceType"), url_type) {
        (None, Some(rt)) => rt,
        (None, None) => {
            return Err(CrudError::invalid_at(
                "resourceType",
                "the resource has no resourceType",
            ))
        }
        (Some(Value::String(name)), url_type) => {
            let named = ResourceType::parse(name).ok_or_else(|| {
                CrudError::invalid_at("resourceType", format!("unknown resourceType '{name}'"))
            })?;
            match url_type {
                Some(rt) if rt != named => {
                    return Err(CrudError::invalid_at(
                        "resourceType",
                        format!("the body's resourceType '{name}' does not match the URL's '{rt}'"),
                    ))
                }
                _ => named,
            }
        }
        (Some(_), _) => {
            return Err(CrudError::invalid_at(
                "resourceType",
                "resourceType must be a string",
            ))
        }
    };
    let id = match doc.get("id") {
        None => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(_) => {
            return Err(CrudError::invalid_at(
                format!("{resource_type}.id"),
                "id must be a string",
            ))
        }
    };
    if let (Some(body_id), Some(url_id)) = (&id, url_id) {
        if body_id != url_id {
            return Err(CrudError::invalid_at(
                format!("{resource_type}.id"),
                format!("the body's id '{body_id}' does not match the URL's '{url_id}'"),
            ));
        }
    }
    if let Some(id) = id.as_deref().or(url_id) {
        check_id(resource_type, id)?;
    }
    if let Some(path) = nul_at(&doc, resource_type.name()) {
        return Err(CrudError::invalid_at(
            path,
            "a string contains \\u0000, which PostgreSQL's jsonb cannot store",
        ));
    }
    let mut body = body_for_storage(doc);
    let secret = match resource_type.name() {
        "Client" => {
            crate::auth::assertion::check_registration(&body).map_err(|(element, message)| {
                CrudError::invalid_at(format!("Client.{element}"), message)
            })?;
            take_secret(&mut body)?
        }
        _ => None,
    };
    if resource_type.name() == "ViewDefinition" {
        crate::views::check(&Value::Object(body.clone())).map_err(|error| match error {
            crate::views::ViewError::Invalid { at, message } => {
                CrudError::invalid_at(format!("ViewDefinition.{at}"), format!("{at}: {message}"))
            }
            other => CrudError::invalid(other.to_string()),
        })?;
    }
    if resource_type.name() == "AccessPolicy" {
        crate::auth::policy::Policy::compile(&Value::Object(body.clone())).map_err(|error| {
            CrudError::invalid_at(format!("AccessPolicy.{}", error.path), error.message)
        })?;
    }
    Ok(Checked {
        resource_type,
        id,
        body,
        secret,
    })
}

/// The path of the first key or string holding a NUL character, if any.
fn nul_at(doc: &Map<String, Value>, root: &str) -> Option<String> {
    fn members(map: &Map<String, Value>, path: &mut String) -> bool {
        map.iter().any(|(key, item)| {
            let len = path.len();
            path.push('.');
            path.push_str(key);
            let found = key.contains('\0') || value(item, path);
            if !found {
                path.truncate(len);
            }
            found
        })
    }
    fn value(item: &Value, path: &mut String) -> bool {
        match item {
            Value::String(text) => text.contains('\0'),
            Value::Object(map) => members(map, path),
            Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = value(item, path);
                if !found {
                    path.truncate(len);
                }
                found
            }),
            _ => false,
        }
    }
    let mut path = root.to_string();
    members(doc, &mut path).then_some(path)
}

/// A Client's `secret`, taken out of its body (a string, or absent).
fn take_secret(body: &mut Map<String, Value>) -> Result<Option<String>, CrudError> {
    match body.shift_remove("secret") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(secret)) if !secret.is_empty() => Ok(Some(secret)),
        Some(_) => Err(CrudError::invalid_at(
            "Client.secret",
            "secret must be a non-empty string",
        )),
    }
}

/// Stores the hash of a Client's new secret (a Client written without one keeps its old one,
/// so reading a Client and writing it back does not lose its secret).
async fn store_secret(tx: &Tx, id: &str, secret: Option<String>) -> Result<(), CrudError> {
    let Some(secret) = secret else {
        return Ok(());
    };
    let hash = crate::auth::secret::hash_secret_blocking(secret)
        .await
        .map_err(|e| CrudError::invalid(e.to_string()))?;
    resources_clients::set_secret(&**tx, id, &hash).await?;
    Ok(())
}

/// Checks an id from a URL or a body.
pub fn check_id(rt: ResourceType, id: &str) -> Result<(), CrudError> {
    if is_valid_id(id) {
        return Ok(());
    }
    Err(CrudError::invalid_at(
        format!("{rt}.id"),
        format!("'{id}' is not a valid id (1-64 of A-Z, a-z, 0-9, '-', '.')"),
    ))
}

/// Creates a resource. `keep_id`: use the body's id if it has one (native API) instead of
/// assigning a new one (FHIR API, which ignores ids in POST bodies).
pub async fn create_in(
    tx: &Tx,
    checked: Checked,
    keep_id: bool,
) -> Result<StoredResource, CrudError> {
    let id = match checked.id {
        Some(id) if keep_id => id,
        _ => new_id(),
    };
    let created = resources::create(tx, checked.resource_type, &id, &checked.body).await?;
    store_secret(tx, &id, checked.secret).await?;
    Ok(created)
}

/// Creates or replaces the resource at `id`. Returns the version and whether it was created.
pub async fn update_in(
    tx: &Tx,
    checked: Checked,
    id: &str,
) -> Result<(StoredResource, bool), CrudError> {
    let written = resources::upsert(tx, checked.resource_type, id, &checked.body).await?;
    store_secret(tx, id, checked.secret).await?;
    if checked.resource_type.name() == "ViewDefinition" {
        crate::views::materialize::rebuild(tx, id, &Value::Object(checked.body.clone()))
            .await
            .map_err(|e| {
                CrudError::invalid(format!("its materializations cannot be rebuilt: {e}"))
            })?;
    }
    Ok(written)
}

/// What a delete did.
#[derive(Debug)]
pub enum Deleted {
    /// The current version was deleted; this is the `deleted` version.
    Now(StoredResource),
    /// It was already deleted.
    Already,
}

pub async fn delete_in(tx: &Tx, rt: ResourceType, id: &str) -> Result<Deleted, CrudError> {
    if let Some(version) = resources::delete(tx, rt, id).await? {
        if rt.name() == "Client" {
            resources_clients::delete_secret(&**tx, id).await?;
        }
        if rt.name() == "ViewDefinition" {
            crate::views::materialize::drop_all(&**tx, id)
                .await
                .map_err(|e| CrudError::invalid(e.to_string()))?;
        }
        return Ok(Deleted::Now(version));
    }
    match resources::read(&**tx, rt, id).await? {
        Lookup::Deleted => Ok(Deleted::Already),
        _ => Err(CrudError::not_found(rt, id)),
    }
}

pub async fn create(
    store: &Store,
    checked: Checked,
    keep_id: bool,
) -> Result<StoredResource, CrudError> {
    let tx = store.begin().await?;
    let created = create_in(&tx, checked, keep_id).await;
    tx.finish(created).await
}

pub async fn update(
    store: &Store,
    checked: Checked,
    id: &str,
) -> Result<(StoredResource, bool), CrudError> {
    let tx = store.begin().await?;
    let result = update_in(&tx, checked, id).await;
    tx.finish(result).await
}

pub async fn delete(store: &Store, rt: ResourceType, id: &str) -> Result<Deleted, CrudError> {
    let tx = store.begin().await?;
    let result = delete_in(&tx, rt, id).await;
    tx.finish(result).await
}

/// The current version; 404 if it never existed, 410 if it was deleted.
pub async fn read(store: &Store, rt: ResourceType, id: &str) -> Result<StoredResource, CrudError> {
    let conn = store.connection().await?;
    read_with(&conn, rt, id).await
}

/// [`read`] on a given client (a bundle's transaction).
pub async fn read_with(
    client: &impl crate::store::GenericClient,
    rt: ResourceType,
    id: &str,
) -> Result<StoredResource, CrudError> {
    match resources::read(client, rt, id).await? {
        Lookup::Found(found) => Ok(found),
        Lookup::Deleted => Err(CrudError::Gone {
            resource_type: rt.name().to_string(),
            id: id.to_string(),
        }),
        Lookup::Missing => Err(CrudError::not_found(rt, id)),
    }
}

/// Every version, newest first (at most `limit`); 404 if the resource never existed.
pub async fn history(
    store: &Store,
    rt: ResourceType,
    id: &str,
    limit: i64,
) -> Result<Vec<StoredResource>, CrudError> {
    let conn = store.connection().await?;
    let versions = resources::history(&conn, rt, id, limit).await?;
    if versions.is_empty() {
        return Err(CrudError::not_found(rt, id));
    }
    Ok(versions)
}

/// One version; 404 if there is no such version, 410 if that version is a deletion.
pub async fn vread(
    store: &Store,
    rt: ResourceType,
    id: &str,
    version_id: &str,
) -> Result<StoredResource, CrudError> {
    let not_found = || CrudError::NotFound {
        resource_type: rt.name().to_string(),
        id: format!("{id}/_history/{version_id}"),
    };
    let txid: i64 = version_id.parse().map_err(|_| not_found())?;
    let conn = store.connection().await?;
    match resources::version(&conn, rt, id, txid).await? {
        Some(version) if version.is_deleted() => Err(CrudError::Gone {
            resource_type: rt.name().to_string(),
            id: format!("{id}/_history/{version_id}"),
        }),
        Some(version) => Ok(version),
        None => Err(not_found()),
    }
}
