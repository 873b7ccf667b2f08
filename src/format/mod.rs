//! Native <-> FHIR R4 conversion: the seam every `/fhir/` route and every `fhir=true` bulk
//! operation goes through. The rules are in [`walk`] (choices, references, meta) and
//! [`attributes`] (first-class extensions from `Attribute` resources).
//!
//! A [`Converter`] holds the rules in force (from the Attribute resources) as a value, handed
//! in by the layer above (`crate::formats` reads and caches them), and converts with them:
//! [`Converter::to_native`] on what comes in, [`Converter::to_fhir`] on what goes out. This
//! module reads no database: it depends on `fhir` (the element table) and nothing above.

pub mod attributes;
pub mod shape;
pub mod text;
pub mod trail;
pub mod walk;

use std::sync::Arc;

use serde_json::Value;

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
        Converter::with_shared(Arc::new(rules))
    }

    /// A converter with rules shared with others (`crate::formats`' cache).
    pub fn with_shared(rules: Arc<Rules>) -> Converter {
        Converter { rules }
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
