//! The one error type of the HTTP layer, its rendering as an OperationOutcome, and every
//! mapping of a module's error to it.
//!
//! Error policy: every module below `http` has its own `thiserror` enum; each is converted into
//! an [`ApiError`] exactly once, by a `From` impl in this file, which picks the status and the
//! FHIR issue code. Handlers only use `?`. A server-side failure (5xx) keeps its cause for the
//! log and shows the client a message without internals; the request log ([`super::log`])
//! writes it once, on the request's own line. Nothing else logs a failed request.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::auth::AuthError;
use crate::bulk::allowance::Refused;
use crate::bulk::dump_sql::SqlDumpError;
use crate::bulk::export::ExportError;
use crate::bulk::import::ImportError;
use crate::bulk::load::LoadError;
use crate::bulk::source::SourceError;
use crate::bundle::BundleError;
use crate::crud::CrudError;
use crate::format::FormatError;
use crate::search::{RunError, SearchError};
use crate::store::dump_sql::QueryError;
use crate::store::StoreError;
use crate::views::ViewError;

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
    /// What to ask for (`WWW-Authenticate`, on 401).
    pub challenge: Option<Challenge>,
    /// Seconds the client should wait before trying again (`Retry-After`, on 429 and 503).
    pub retry_after: Option<u32>,
    /// What went wrong inside, for the log only (server errors).
    cause: Option<String>,
}

/// What a 401 asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// Basic credentials.
    Basic,
    /// A valid bearer token (the one sent was not).
    InvalidToken,
}

impl Challenge {
    fn header(self) -> &'static str {
        match self {
            Challenge::Basic => "Basic realm=\"fhirbox\", charset=\"UTF-8\"",
            Challenge::InvalidToken => "Bearer error=\"invalid_token\"",
        }
    }
}

/// The cause of a server error, carried from [`ApiError::into_response`] to the request log
/// ([`super::log`]) in the response's extensions.
#[derive(Debug, Clone)]
pub struct Cause(pub String);

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            expression: None,
            challenge: None,
            retry_after: None,
            cause: None,
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

    /// A failure inside fhirbox: the client sees `message`, the log gets `cause`.
    pub fn internal(message: impl Into<String>, cause: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "exception", message).with_cause(cause)
    }

    /// `Retry-After: seconds`.
    pub fn retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after = Some(seconds.clamp(1, u32::MAX as u64) as u32);
        self
    }

    pub fn with_expression(mut self, expression: impl Into<String>) -> ApiError {
        self.expression = Some(expression.into());
        self
    }

    /// What went wrong inside, for the log.
    pub fn with_cause(mut self, cause: impl std::fmt::Display) -> ApiError {
        self.cause = Some(cause.to_string());
        self
    }

    /// What went wrong inside, if this is a server error with a cause.
    pub fn cause(&self) -> &str {
        self.cause.as_deref().unwrap_or(&self.message)
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
        if let Some(challenge) = self.challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge.header()),
            );
            // Bearer tokens are taken too (RFC 6750): offer them beside basic credentials.
            if challenge == Challenge::Basic {
                response.headers_mut().append(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"fhirbox\""),
                );
            }
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status.is_server_error() {
            let cause = self.cause.unwrap_or(self.message);
            response.extensions_mut().insert(Cause(cause));
        }
        response
    }
}

/// An OAuth 2.0 error of the token endpoint (RFC 6749 5.2): `{"error", "error_description"}`,
/// 400 (429 with `Retry-After` when the address must wait, 500 for fhirbox's own failure).
pub fn oauth_error(code: &str, description: &str) -> Response {
    let status = match code {
        "temporarily_unavailable" => StatusCode::TOO_MANY_REQUESTS,
        "server_error" => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    let mut response = (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        json!({"error": code, "error_description": description}).to_string(),
    )
        .into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(10u64));
    }
    response
}

impl From<Refused> for ApiError {
    fn from(error: Refused) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            error.to_string(),
        )
        .retry_after(5)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        match &error {
            StoreError::AlreadyExists { .. } => {
                ApiError::new(StatusCode::CONFLICT, "duplicate", error.to_string())
            }
            _ if error.refusal().is_some() => ApiError::new(
                StatusCode::BAD_REQUEST,
                "not-supported",
                error.refusal().unwrap_or_default().to_string(),
            ),
            _ if error.is_busy() => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "the server is busy: every database connection is in use; try again",
            )
            .retry_after(1)
            .with_cause(error),
            _ if error.is_unavailable() => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "the database is not available; try again",
            )
            .with_cause(error),
            _ => ApiError::internal("internal database error (logged on the server)", error),
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
            CrudError::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", message),
            CrudError::Invalid { expression, .. } => {
                let error = ApiError::bad_request(message);
                match expression {
                    Some(expression) => error.with_expression(expression),
                    None => error,
                }
            }
            CrudError::Store(store) => store.into(),
            CrudError::Format(format) => format.into(),
            CrudError::Search(search) => search.into(),
            CrudError::PreconditionFailed(_) => {
                ApiError::new(StatusCode::PRECONDITION_FAILED, "multiple-matches", message)
            }
            CrudError::Timeout(_) => ApiError::new(StatusCode::REQUEST_TIMEOUT, "timeout", message),
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

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> ApiError {
        match error {
            AuthError::Store(store) => store.into(),
            AuthError::Hashing(_) => ApiError::internal(
                "authentication failed internally (logged on the server)",
                error,
            ),
            AuthError::Throttled { retry_after } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "throttled",
                error.to_string(),
            )
            .retry_after(retry_after.as_secs()),
            AuthError::Busy => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                error.to_string(),
            )
            .retry_after(1),
            AuthError::Missing | AuthError::Malformed | AuthError::Rejected => {
                let mut api = ApiError::new(StatusCode::UNAUTHORIZED, "login", error.to_string());
                api.challenge = Some(Challenge::Basic);
                api
            }
            AuthError::InvalidToken(_) => {
                let mut api = ApiError::new(StatusCode::UNAUTHORIZED, "login", error.to_string());
                api.challenge = Some(Challenge::InvalidToken);
                api
            }
        }
    }
}

impl From<LoadError> for ApiError {
    fn from(error: LoadError) -> ApiError {
        let message = error.to_string();
        match error {
            LoadError::Source(
                SourceError::Status { .. }
                | SourceError::Bucket(_)
                | SourceError::Http(_)
                | SourceError::Dns { .. }
                | SourceError::Connect { .. }
                | SourceError::Tls { .. }
                | SourceError::Timeout { .. },
            ) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "exception",
                format!("the load failed, nothing was written: {message}"),
            ),
            LoadError::Source(
                SourceError::Forbidden(_)
                | SourceError::BucketForbidden(_)
                | SourceError::OutsideSourceDir(_)
                | SourceError::FilesDisabled,
            ) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", message),
            LoadError::Forbidden { .. } => ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("the load failed, nothing was written: {message}"),
            ),
            LoadError::Source(_)
            | LoadError::Read(_)
            | LoadError::Line { .. }
            | LoadError::Rejected(_) => {
                ApiError::bad_request(format!("the load failed, nothing was written: {message}"))
            }
            LoadError::Conflict(_) | LoadError::Abandoned => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{message}; nothing was written, try again"),
            ),
            LoadError::Store(store) => store.into(),
            LoadError::Statement { error, .. } => {
                let api = ApiError::from(error);
                // The step is for the log; the client's 500 says no more than before.
                ApiError {
                    cause: Some(format!("the load failed {message}")),
                    ..api
                }
            }
        }
    }
}

impl From<ImportError> for ApiError {
    fn from(error: ImportError) -> ApiError {
        match error {
            ImportError::Invalid(message) => ApiError::bad_request(message),
            ImportError::Source { index, error } => {
                let expression = format!("inputs[{index}].url");
                let message = format!("inputs[{index}]: {error}");
                let api = match error {
                    SourceError::Forbidden(_)
                    | SourceError::BucketForbidden(_)
                    | SourceError::OutsideSourceDir(_)
                    | SourceError::FilesDisabled => {
                        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
                    }
                    _ => ApiError::bad_request(message),
                };
                api.with_expression(expression)
            }
            ImportError::Exists(_) => {
                ApiError::new(StatusCode::CONFLICT, "duplicate", error.to_string())
            }
            ImportError::TooMany(_) => too_many_jobs(error.to_string()),
            ImportError::Store(store) => store.into(),
        }
    }
}

impl From<ExportError> for ApiError {
    fn from(error: ExportError) -> ApiError {
        match error {
            ExportError::Invalid(message) => ApiError::bad_request(message),
            ExportError::NoGroup(_) => ApiError::not_found(error.to_string()),
            ExportError::TooMany(_) => too_many_jobs(error.to_string()),
            ExportError::Storage(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                format!("the export cannot start: {error}; try again later"),
            )
            .retry_after(30),
            ExportError::Store(error) => error.into(),
            ExportError::Io(_) => ApiError::internal(
                "could not write the export's files (logged on the server)",
                error,
            ),
        }
    }
}

/// A subject with as many unfinished jobs as it may have: 429, try again later.
fn too_many_jobs(message: String) -> ApiError {
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "throttled", message).retry_after(30)
}

impl From<SqlDumpError> for ApiError {
    fn from(error: SqlDumpError) -> ApiError {
        match error {
            SqlDumpError::Empty | SqlDumpError::Limit(_) => {
                ApiError::bad_request(error.to_string())
            }
            SqlDumpError::Query(query) => query.into(),
        }
    }
}

impl From<ViewError> for ApiError {
    fn from(error: ViewError) -> ApiError {
        match error {
            ViewError::Invalid { .. } => {
                let at = error.expression().map(str::to_string);
                let api = ApiError::bad_request(error.to_string());
                match at {
                    Some(at) => api.with_expression(at),
                    None => api,
                }
            }
            ViewError::NotFound(_) => ApiError::not_found(error.to_string()),
            ViewError::Taken { .. } => {
                ApiError::new(StatusCode::CONFLICT, "conflict", error.to_string())
            }
            ViewError::Limit(_) => ApiError::bad_request(error.to_string()),
            ViewError::Query(query) => query.into(),
            ViewError::Store(store) => store.into(),
        }
    }
}

impl From<RunError> for ApiError {
    fn from(error: RunError) -> ApiError {
        match error {
            RunError::Search(error) => error.into(),
            RunError::Store(error) if error.is_timeout() => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                "the search ran longer than this server allows (--search-timeout-ms): \
                 narrow it with a more selective parameter, or one with an index",
            ),
            RunError::Store(error) => error.into(),
        }
    }
}

impl From<SearchError> for ApiError {
    fn from(error: SearchError) -> ApiError {
        let param = error.param().map(str::to_string);
        let api = match &error {
            SearchError::Invalid { .. } => ApiError::bad_request(error.to_string()),
            SearchError::Unsupported(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "not-supported", error.to_string())
            }
        };
        match param {
            Some(param) => api.with_expression(param),
            None => api,
        }
    }
}

impl From<QueryError> for ApiError {
    fn from(error: QueryError) -> ApiError {
        match error {
            QueryError::Connect(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not-supported",
                format!(
                    "$dump-sql is not available: {error}; give fhirbox a role that may create \
                     roles, or set --sql-reader-url"
                ),
            ),
            QueryError::Params { .. } => ApiError::bad_request(error.to_string()),
            QueryError::Refused {
                code,
                message,
                position,
            } => {
                let (status, issue) = match code.as_str() {
                    // query_canceled: the statement timeout.
                    "57014" => (StatusCode::REQUEST_TIMEOUT, "timeout"),
                    "42501" => (StatusCode::FORBIDDEN, "forbidden"),
                    _ => (StatusCode::BAD_REQUEST, "invalid"),
                };
                let at = position
                    .map(|p| format!(" (at character {p} of the query)"))
                    .unwrap_or_default();
                ApiError::new(
                    status,
                    issue,
                    format!("PostgreSQL: {message}{at} [SQLSTATE {code}]"),
                )
            }
            QueryError::Store(store) => store.into(),
        }
    }
}
