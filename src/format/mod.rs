//! Native <-> FHIR R4 conversion: the seam every `/fhir/` route and every `fhir=true` bulk
//! operation goes through.
//!
//! Handlers get a [`Converter`] for the request ([`Formats::converter`]) and call
//! [`Converter::to_native`] on what comes in and [`Converter::to_fhir`] on what goes out.

use serde_json::Value;

use crate::store::Store;

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
    _store: Store,
}

impl Formats {
    pub fn new(store: Store) -> Formats {
        Formats { _store: store }
    }

    /// The conversion rules in force for one request.
    pub async fn converter(&self) -> Result<Converter, crate::store::StoreError> {
        Ok(Converter {})
    }
}

/// The rules in force for one request.
#[derive(Debug, Clone)]
pub struct Converter {}

impl Converter {
    /// FHIR JSON -> native document.
    pub fn to_native(&self, doc: Value) -> Result<Value, FormatError> {
        Ok(doc)
    }

    /// Native document -> FHIR JSON.
    pub fn to_fhir(&self, doc: Value) -> Value {
        doc
    }
}
