//! The one error type of the HTTP layer and its rendering as an OperationOutcome.
//!
//! Error policy: every module below `http` has its own `thiserror` enum; each is converted into
//! an [`ApiError`] exactly once, by a `From` impl in this file, which picks the status and the
//! FHIR issue code. Handlers only use `?`. Server-side failures (5xx) are logged here with their
//! cause and shown to the client without internals.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::bundle::BundleError;
use crate::crud::CrudError;
use crate::format::FormatError;
use crate::store::StoreError;

/// An error answered with an OperationOutcome.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// The FHIR IssueType code (`not-found`, `invalid`, `processing`, ...).
    pub code: &'static str,
    /// What a person needs to act on it.
    pub message: String,
    /// The element the issue is about, as a FHIRPath-like expression, when there is one.
    pub expression: Option<String>,
    /// Whether to ask for basic credentials (`WWW-Authenticate`, on 401).
    pub challenge: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            expression: None,
            challenge: false,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not-found", message)
    }

    pub fn unknown_type(name: &str) -> ApiError {
        ApiError::not_found(format!("unknown resource type '{name}'"))
    }

    pub fn with_expression(mut self, expression: impl Into<String>) -> ApiError {
        self.expression = Some(expression.into());
        self
    }

    /// The OperationOutcome body.
    pub fn outcome(&self) -> Value {
        let mut issue = json!({
            "severity": if self.status.is_server_error() { "fatal" } else { "error" },
            "code": self.code,
            "diagnostics": self.message,
        });
        if let Some(expression) = &self.expression {
            issue["expression"] = json!([expression]);
        }
        json!({"resourceType": "OperationOutcome", "issue": [issue]})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, message = %self.message, "request failed");
        }
        let body = self.outcome().to_string();
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/fhir+json"),
            )],
            body,
        )
            .into_response();
        if self.challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"fhirbox\", charset=\"UTF-8\""),
            );
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        match &error {
            StoreError::AlreadyExists { .. } => {
                ApiError::new(StatusCode::CONFLICT, "duplicate", error.to_string())
            }
            _ if error.is_unavailable() => {
                tracing::error!(%error, "database unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "transient",
                    "the database is not available; try again",
                )
            }
            _ => {
                tracing::error!(%error, "database error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "exception",
                    "internal database error (logged on the server)",
                )
            }
        }
    }
}

impl From<CrudError> for ApiError {
    fn from(error: CrudError) -> ApiError {
        let message = error.to_string();
        match error {
            CrudError::UnknownType(name) => ApiError::unknown_type(&name),
            CrudError::NotFound { .. } => ApiError::not_found(message),
            CrudError::Gone { .. } => ApiError::new(StatusCode::GONE, "deleted", message),
            CrudError::Invalid { expression, .. } => {
                let error = ApiError::bad_request(message);
                match expression {
                    Some(expression) => error.with_expression(expression),
                    None => error,
                }
            }
            CrudError::Store(store) => store.into(),
            CrudError::Format(format) => format.into(),
        }
    }
}

impl From<FormatError> for ApiError {
    fn from(error: FormatError) -> ApiError {
        let expression = error.expression().map(str::to_string);
        let api = ApiError::bad_request(error.to_string());
        match expression {
            Some(expression) => api.with_expression(expression),
            None => api,
        }
    }
}

impl From<BundleError> for ApiError {
    fn from(error: BundleError) -> ApiError {
        match error {
            BundleError::Invalid(message) => ApiError::bad_request(message),
            BundleError::Entry { index, source } => {
                let mut api = ApiError::from(*source);
                api.message = format!("entry {index}: {}", api.message);
                api
            }
            BundleError::Store(store) => store.into(),
        }
    }
}
