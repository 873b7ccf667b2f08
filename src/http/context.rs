//! [`ApiContext`]: the edges of a request in one extractor. The route's API (native or FHIR),
//! the negotiated response syntax, the conversion rules, and the base URL for links. Handlers
//! call [`ApiContext::inbound`] on what comes in and [`ApiContext::outbound`] on what goes out,
//! so the operations below only ever see native documents.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::Response;
use serde_json::Value;

use super::body::{http_date, set_header};
use super::body::{reply, Negotiated};
use super::error::ApiError;
use super::AppState;
use crate::format::{Api, Converter};
use crate::resource::StoredResource;

pub struct ApiContext {
    pub api: Api,
    pub negotiated: Negotiated,
    /// The conversion rules of this request (FHIR routes only).
    converter: Option<Converter>,
    /// `http://host[:port]`, plus `/fhir` on FHIR routes: the base of every link.
    base: String,
}

impl FromRequestParts<AppState> for ApiContext {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let api = parts
            .extensions
            .get::<Api>()
            .copied()
            .unwrap_or(Api::Native);
        let negotiated = Negotiated::from_request_parts(parts, state).await?;
        let converter = match api {
            Api::Fhir => Some(state.formats.converter().await?),
            Api::Native => None,
        };
        let origin = origin(parts, &state.settings);
        let base = match api {
            Api::Fhir => format!("{origin}/fhir"),
            Api::Native => origin,
        };
        Ok(ApiContext {
            api,
            negotiated,
            converter,
            base,
        })
    }
}

impl ApiContext {
    /// A request document as a native document.
    pub fn inbound(&self, doc: Value) -> Result<Value, ApiError> {
        match &self.converter {
            Some(converter) => Ok(converter.to_native(doc)?),
            None => Ok(doc),
        }
    }

    /// A native document in this route's format.
    pub fn outbound_value(&self, doc: Value) -> Value {
        match &self.converter {
            Some(converter) => converter.to_fhir(doc),
            None => doc,
        }
    }

    /// A stored version in this route's format.
    pub fn outbound(&self, stored: &StoredResource) -> Value {
        self.outbound_value(stored.to_native())
    }

    /// The converter, for operations that convert many documents (bundles).
    pub fn converter(&self) -> Option<&Converter> {
        self.converter.as_ref()
    }

    /// An absolute URL for a path relative to the server's origin (`auth/token`).
    pub fn origin_url(&self, relative: &str) -> String {
        self.native_url(relative)
    }

    /// An absolute URL for a path relative to the native API's base, whatever this route's.
    pub fn native_url(&self, relative: &str) -> String {
        let base = self.base.strip_suffix("/fhir").unwrap_or(&self.base);
        format!("{base}/{}", relative.trim_start_matches('/'))
    }

    /// An absolute URL for a path relative to this API's base (`Patient/pt-1`).
    pub fn url(&self, relative: &str) -> String {
        format!("{}/{}", self.base, relative.trim_start_matches('/'))
    }

    pub fn reply(&self, status: StatusCode, value: &Value) -> Response {
        reply(self.negotiated, self.api, status, value)
    }

    /// A single resource, with its `ETag` and `Last-Modified`.
    pub fn resource_reply(&self, status: StatusCode, stored: &StoredResource) -> Response {
        let mut response = self.reply(status, &self.outbound(stored));
        set_header(&mut response, header::ETAG, &etag(stored));
        set_header(&mut response, header::LAST_MODIFIED, &http_date(&stored.ts));
        response
    }
}

/// `https://host[:port]`: the configured base URL, else the request's `Host` with the scheme
/// of the connection.
pub fn origin(parts: &Parts, settings: &super::Settings) -> String {
    if let Some(base) = &settings.base_url {
        return base.trim_end_matches('/').to_string();
    }
    // HTTP/1.1 names the host in `Host`, HTTP/2 in the `:authority` (the URI's).
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("localhost");
    let secure = parts
        .extensions
        .get::<super::serve::Secure>()
        .is_some_and(|s| s.0);
    let scheme = if secure { "https" } else { "http" };
    format!("{scheme}://{host}")
}

/// `W/"481"`: FHIR's weak ETag of a version.
pub fn etag(stored: &StoredResource) -> String {
    format!("W/\"{}\"", stored.txid)
}

/// The relative URL of a version: `Patient/pt-1/_history/481`.
pub fn version_path(stored: &StoredResource) -> String {
    format!(
        "{}/{}/_history/{}",
        stored.resource_type, stored.id, stored.txid
    )
}

/// `201 Created`: the status line FHIR puts in `Bundle.entry.response.status`.
pub fn status_line(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or_default()
    )
}
