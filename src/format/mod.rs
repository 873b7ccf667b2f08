//! Native <-> FHIR R4 conversion: the seam every `/fhir/` route and every `fhir=true` bulk
//! operation goes through. The rules are in [`walk`] (choices, references, meta) and
//! [`attributes`] (first-class extensions from `Attribute` resources).
//!
//! Handlers get a [`Converter`] for the request ([`Formats::converter`]) and call
//! [`Converter::to_native`] on what comes in and [`Converter::to_fhir`] on what goes out.
//! Attributes are read from the database and cached; each request checks a cheap stamp of the
//! `attribute` table (its newest version ids and row count), so a created, changed or deleted
//! Attribute takes effect on the next request, in every fhirbox process, without a restart.

pub mod attributes;
pub mod shape;
pub mod text;
pub mod trail;
pub mod walk;

use std::sync::Arc;

use serde_json::Value;

use crate::resource_type::ResourceType;
use crate::store::cached::TableCache;
use crate::store::{Store, StoreError};
use attributes::Rules;
use trail::Trail;
use walk::{ToFhir, ToNative};

/// Which JSON dialect a route speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// The storage format, on the plain routes.
    Native,
    /// Standard FHIR R4 JSON, on `/fhir/...` routes.
    Fhir,
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl FormatError {
    pub fn invalid(trail: &Trail<'_>, message: impl Into<String>) -> FormatError {
        FormatError::Invalid {
            path: trail.render(),
            message: message.into(),
        }
    }

    /// The element path the error is about.
    pub fn expression(&self) -> Option<&str> {
        match self {
            FormatError::Invalid { path, .. } => Some(path),
        }
    }
}

/// The conversion service, shared by all requests.
#[derive(Clone)]
pub struct Formats {
    store: Store,
    rules: Arc<TableCache<Rules>>,
}

impl Formats {
    pub fn new(store: Store) -> Formats {
        let attribute = ResourceType::parse("Attribute").expect("a fhirbox type");
        Formats {
            store,
            rules: Arc::new(TableCache::new(attribute)),
        }
    }

    /// The conversion rules in force now.
    pub async fn converter(&self) -> Result<Converter, StoreError> {
        let rules = self
            .rules
            .get(&self.store, |attributes| {
                Rules::from_attributes(attributes.iter().map(|(_, body)| body))
            })
            .await?;
        Ok(Converter { rules })
    }
}

/// The rules in force for one request (or one bulk operation). Cheap to clone and `Send`, so
/// bulk operations can convert on several threads.
#[derive(Debug, Clone, Default)]
pub struct Converter {
    rules: Arc<Rules>,
}

impl Converter {
    /// The first-class extension rules in force (views read Attributes' native fields).
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// A converter with the given rules (tests and benchmarks).
    pub fn with_rules(rules: Rules) -> Converter {
        Converter {
            rules: Arc::new(rules),
        }
    }

    /// FHIR JSON -> native document. Fails on a reference that cannot be parsed or a choice
    /// type the definition does not allow, naming the element.
    pub fn to_native(&self, mut doc: Value) -> Result<Value, FormatError> {
        if let Value::Object(map) = &mut doc {
            let name = map
                .get("resourceType")
                .and_then(Value::as_str)
                .unwrap_or("Resource")
                .to_string();
            ToNative { rules: &self.rules }.resource(map, &Trail::root(&name))?;
        }
        Ok(doc)
    }

    /// Native JSON text -> compact FHIR JSON text, appended to `out` (the fast path of the
    /// bulk exports; the same result as [`Converter::to_fhir`] and serializing).
    pub fn to_fhir_text(&self, native: &[u8], out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        let start = out.len();
        if text::native_to_fhir(&self.rules, native, out).is_some() {
            return Ok(());
        }
        // Not a JSON object after all: let the tree path say why (or convert what it can).
        out.truncate(start);
        let doc: Value = serde_json::from_slice(native)?;
        serde_json::to_writer(out, &self.to_fhir(doc))
    }

    /// Native document -> FHIR JSON.
    pub fn to_fhir(&self, mut doc: Value) -> Value {
        if let Value::Object(map) = &mut doc {
            ToFhir { rules: &self.rules }.resource(map);
        }
        doc
    }
}
