//! Request bodies in, response bodies out: JSON and YAML both ways.
//!
//! In: `application/json`, `application/fhir+json` (and `application/json+fhir`),
//! `application/yaml`, `application/x-yaml`, `text/yaml`; without a `Content-Type` the body is
//! read as JSON when it starts with `{` or `[`, else as YAML. Anything else is 415. Bodies over
//! the configured limit are 413; malformed ones are 400 with the line and column.
//!
//! Out: JSON, or YAML when `_format=yaml` or an `Accept` header naming YAML asks for it.

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::Value;

use super::error::ApiError;
use super::AppState;
use crate::bulk::stream::ByteStream;
use crate::format::Api;

/// Bodies larger than this are parsed on a blocking thread, off the async workers.
const PARSE_INLINE_LIMIT: usize = 256 * 1024;

/// The syntax of a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    Json,
    Yaml,
}

impl Syntax {
    /// The syntax a `Content-Type` names; `Ok(None)` when there is no `Content-Type`.
    fn from_headers(headers: &HeaderMap) -> Result<Option<Syntax>, ApiError> {
        let Some(value) = headers.get(header::CONTENT_TYPE) else {
            return Ok(None);
        };
        let media = value
            .to_str()
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            "application/json" | "application/fhir+json" | "application/json+fhir" => {
                Ok(Some(Syntax::Json))
            }
            "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml" => {
                Ok(Some(Syntax::Yaml))
            }
            _ => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                format!(
                    "unsupported Content-Type '{media}': send application/json, \
                     application/fhir+json or application/yaml"
                ),
            )),
        }
    }
}

/// A parsed request body: any JSON value (a resource, a list, a Bundle, operation parameters).
#[derive(Debug)]
pub struct Document(pub Value);

impl FromRequest<AppState> for Document {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let declared = Syntax::from_headers(request.headers())?;
        refuse_declared_excess(&request, state.settings.max_body_bytes)?;
        let bytes = read_limited(request.into_body(), state.settings.max_body_bytes).await?;
        let syntax = declared.unwrap_or_else(|| sniff(&bytes));
        Ok(Document(parse_body(bytes, syntax).await?))
    }
}

/// An optional body (a `GET` has none; a `POST` of operation parameters may): `None` when the
/// body is empty or blank, else parsed as [`Document`] does, with the same size limit.
#[derive(Debug)]
pub struct MaybeDocument(pub Option<Value>);

impl FromRequest<AppState> for MaybeDocument {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let declared = Syntax::from_headers(request.headers())?;
        refuse_declared_excess(&request, state.settings.max_body_bytes)?;
        let bytes = read_limited(request.into_body(), state.settings.max_body_bytes).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(MaybeDocument(None));
        }
        let syntax = declared.unwrap_or_else(|| sniff(&bytes));
        Ok(MaybeDocument(Some(parse_body(bytes, syntax).await?)))
    }
}

/// Parses a body; a large one on a blocking thread, off the async workers.
async fn parse_body(bytes: bytes::Bytes, syntax: Syntax) -> Result<Value, ApiError> {
    if bytes.len() <= PARSE_INLINE_LIMIT {
        return parse(&bytes, syntax);
    }
    tokio::task::spawn_blocking(move || parse(&bytes, syntax))
        .await
        .map_err(|error| ApiError::internal("the body parser failed", error))?
}

/// A body whose `Content-Length` is over `limit` is refused before a byte of it is read: the
/// client that sent `Expect: 100-continue` gets the 413 instead of `100 Continue` (hyper
/// sends that only once the body is read).
fn refuse_declared_excess(request: &Request, limit: usize) -> Result<(), ApiError> {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(length) if length > limit as u64 => Err(too_large(limit)),
        _ => Ok(()),
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-costly",
        format!("the request body is larger than the limit of {limit} bytes"),
    )
}

/// Reads a whole body, refusing more than `limit` bytes.
async fn read_limited(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(too_large(limit)),
        Err(error) => Err(ApiError::bad_request(format!(
            "could not read the request body: {error}"
        ))),
    }
}

fn sniff(bytes: &[u8]) -> Syntax {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | Some(b'[') => Syntax::Json,
        _ => Syntax::Yaml,
    }
}

/// Parses a body; errors say where (line and column) and what.
pub fn parse(bytes: &[u8], syntax: Syntax) -> Result<Value, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    match syntax {
        Syntax::Json => serde_json::from_slice(bytes).map_err(|error| {
            ApiError::bad_request(format!(
                "malformed JSON at line {} column {}: {}",
                error.line(),
                error.column(),
                json_reason(&error)
            ))
        }),
        Syntax::Yaml => {
            let text = std::str::from_utf8(bytes).map_err(|error| {
                ApiError::bad_request(format!("the YAML body is not UTF-8: {error}"))
            })?;
            let options = serde_saphyr::options! {
                strict_booleans: true,
                with_snippet: false,
            };
            serde_saphyr::from_str_with_options::<Value>(text, options).map_err(|error| {
                let position = error
                    .location()
                    .map(|at| format!(" at line {} column {}", at.line(), at.column()))
                    .unwrap_or_default();
                ApiError::bad_request(format!("malformed YAML{position}: {error}"))
            })
        }
    }
}

/// serde_json's message without its trailing " at line L column C" (we say it ourselves).
fn json_reason(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.find(" at line ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// How the client wants the response body.
#[derive(Debug, Clone, Copy)]
pub struct Negotiated {
    pub syntax: Syntax,
    pub pretty: bool,
}

impl<S: Send + Sync> FromRequestParts<S> for Negotiated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let param = |name: &str| {
            form_urlencoded_pairs(query)
                .into_iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value)
        };
        let syntax = match param("_format").as_deref() {
            Some(format) if format.contains("yaml") => Syntax::Yaml,
            Some(format) if format == "json" || format.contains("json") => Syntax::Json,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "unsupported _format '{other}': use json or yaml"
                )))
            }
            None => {
                let accept = parts
                    .headers
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if accept.contains("yaml") {
                    Syntax::Yaml
                } else {
                    Syntax::Json
                }
            }
        };
        let pretty = param("_pretty").as_deref() == Some("true");
        Ok(Negotiated { syntax, pretty })
    }
}

/// Splits a query string into decoded pairs.
pub fn form_urlencoded_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect()
}

/// Whether the client sent `Prefer: <preference>` (`respond-async`, `handling=lenient`),
/// among others, in one or several `Prefer` headers.
pub fn prefers(headers: &HeaderMap, preference: &str) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().replace(' ', "").eq_ignore_ascii_case(preference))
}

/// Sets a header from text; text that cannot be a header value (a control character) leaves
/// the header out rather than failing the response.
pub fn set_header(response: &mut Response, name: impl header::IntoHeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}

/// An instant as an HTTP date (`Last-Modified`, `Expires`).
pub fn http_date(at: &chrono::DateTime<chrono::Utc>) -> String {
    at.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// A response body in the negotiated syntax, with the content type of the route's API.
pub fn reply(negotiated: Negotiated, api: Api, status: StatusCode, value: &Value) -> Response {
    let (content_type, body) = match negotiated.syntax {
        Syntax::Yaml => (
            "text/yaml; charset=utf-8",
            serde_saphyr::to_string(&YamlView(value)).unwrap_or_else(|error| {
                tracing::error!(%error, "YAML serialization failed");
                String::new()
            }),
        ),
        Syntax::Json => {
            let content_type = match api {
                Api::Fhir => "application/fhir+json; charset=utf-8",
                Api::Native => "application/json; charset=utf-8",
            };
            let text = if negotiated.pretty {
                serde_json::to_string_pretty(value)
            } else {
                serde_json::to_string(value)
            };
            (content_type, text.unwrap_or_default())
        }
    };
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

/// A JSON value as YAML sees it. serde_json's exact numbers (`arbitrary_precision`, which keeps
/// FHIR decimals like `1.50` intact) serialize as a private wrapper struct for any serializer but
/// serde_json's own, so numbers are handed to YAML as integers or floats instead.
struct YamlView<'a>(&'a Value);

impl serde::Serialize for YamlView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self.0 {
            Value::Number(number) => {
                if let Some(n) = number.as_u64() {
                    serializer.serialize_u64(n)
                } else if let Some(n) = number.as_i64() {
                    serializer.serialize_i64(n)
                } else {
                    serializer.serialize_f64(number.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&YamlView(item))?;
                }
                seq.end()
            }
            Value::Object(map) => {
                let mut out = serializer.serialize_map(Some(map.len()))?;
                for (key, value) in map {
                    out.serialize_entry(key, &YamlView(value))?;
                }
                out.end()
            }
            other => other.serialize(serializer),
        }
    }
}

/// A 200 whose body is streamed (chunked): every streamed answer goes through here, and so
/// does its compression (`gzip`: one gzip member over the whole body, `Content-Encoding:
/// gzip`).
pub fn streamed(body: ByteStream, content_type: &'static str, gzip: bool) -> Response {
    let body = if gzip {
        crate::bulk::stream::gzip(body)
    } else {
        body
    };
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if gzip {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_json_says_where() {
        let error = parse(b"{\n  \"a\": 1,\n  \"b\": }", Syntax::Json).expect_err("malformed");
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert!(error.message.contains("line 3 column"), "{}", error.message);
    }

    #[test]
    fn malformed_yaml_says_where() {
        let error = parse(b"a: [1, 2\nb: c", Syntax::Yaml).expect_err("malformed");
        assert!(
            error.message.contains("line 2 column 2"),
            "{}",
            error.message
        );
    }

    #[test]
    fn yaml_booleans_are_strict() {
        let value = parse(b"a: yes\nb: true", Syntax::Yaml).expect("valid yaml");
        assert_eq!(value, serde_json::json!({"a": "yes", "b": true}));
    }

    #[test]
    fn yaml_output_shows_numbers_as_numbers() {
        let value = serde_json::json!({"versionId": 8, "value": 1.5, "delta": -3});
        let yaml = serde_saphyr::to_string(&YamlView(&value)).expect("serializes");
        assert_eq!(yaml, "versionId: 8\nvalue: 1.5\ndelta: -3\n");
    }

    #[test]
    fn sniffing_without_content_type() {
        assert_eq!(sniff(b"  {\"a\": 1}"), Syntax::Json);
        assert_eq!(sniff(b"a: 1"), Syntax::Yaml);
    }
}
