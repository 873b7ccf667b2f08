//! Authentication and access control of every request (but `GET /health` and the
//! CapabilityStatement, `GET /metadata`), after routing: credentials first (401 without or
//! with bad ones, with `WWW-Authenticate: Basic`), then the one authorization decision,
//! [`crate::auth::Authenticator::authorize`] (its rules are written there), which Bundle
//! entries go through too ([`super::bundle`]): 403 saying which subject was denied which
//! method and path, and nothing else; on a job route about someone else's job, the 404 of a
//! job that does not exist.
//!
//! The request object the policies see, as the reference product defines it:
//! `request-method` (lower case), `uri` (the normalized path, no query string),
//! `query-string`, `params` (the query parameters, plus the route's `resource/type` and
//! `resource/id`), `headers` (lower-case names; `authorization` left out: a policy has no
//! business with credentials), `body` (parsed, when a policy looks at it and the body is
//! JSON or YAML and not too large), `client` (the Client, never with a secret), `user` (null),
//! `remote-addr`, `scheme`.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::{header, request::Parts, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};

use super::body::{form_urlencoded_pairs, parse, Syntax};
use super::error::ApiError;
use super::log::Seen;
use super::AppState;
use crate::auth::access::{Ask, Denied, JobFacts};
use crate::auth::scope::Scopes;
use crate::auth::{Authenticated, Subject};
use crate::store::jobs::JobKind;

/// Bodies larger than this are not read for policies (they see `body: null`).
const POLICY_BODY_LIMIT: usize = 1024 * 1024;

/// What anyone may call without credentials: the health check, the CapabilityStatement and
/// the SMART configuration (clients read them before they authenticate; they say what fhirbox
/// supports and hold no data), the console's page and files (no data either: it signs in
/// from the browser), and the token endpoint (its caller authenticates with a signed
/// assertion instead).
fn is_public(method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    let page = matches!(
        path,
        "/health"
            | "/metadata"
            | "/fhir/metadata"
            | "/.well-known/smart-configuration"
            | "/fhir/.well-known/smart-configuration"
            | "/console"
    ) || path.starts_with("/console/");
    (method == Method::GET && page) || (method == Method::POST && path == "/auth/token")
}

/// The middleware. The answer carries who asked and which route it was, for the log.
pub async fn require_auth(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = route_of(&request);
    let (mut response, subject) = authorize(state, request, next).await;
    response.extensions_mut().insert(Seen {
        subject: subject.unwrap_or_else(|| "-".to_string()),
        route,
    });
    response
}

/// Authenticates and authorizes the request, and runs it if it may run; the answer, and the
/// subject when it is known.
async fn authorize(state: AppState, request: Request, next: Next) -> (Response, Option<String>) {
    if is_public(request.method(), request.uri().path()) {
        return (next.run(request).await, None);
    }
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|value| value.as_bytes());
    let address = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip());
    let Authenticated { subject, scopes } =
        match state.auth.authenticate(header, address, &state.store).await {
            Ok(authenticated) => authenticated,
            Err(error) => return (ApiError::from(error).into_response(), None),
        };
    let name = subject.name();
    let request = match &subject {
        Subject::Root => request,
        Subject::Client(client) => {
            let uses_body = match state.auth.policies.current(&state.store).await {
                Ok(policies) => policies.uses_body(),
                Err(error) => return (ApiError::from(error).into_response(), Some(name)),
            };
            let (request, object) = match request_object(request, client, uses_body).await {
                Ok(pair) => pair,
                Err(response) => return (response, Some(name)),
            };
            let matched = request
                .extensions()
                .get::<MatchedPath>()
                .map_or(String::new(), |m| m.as_str().to_string());
            let job = match job_facts(&state, &matched, &object).await {
                Ok(job) => job,
                Err(error) => return (error.into_response(), Some(name)),
            };
            let ask = Ask {
                method: request.method().as_str(),
                route: matched.strip_prefix("/fhir").unwrap_or(&matched),
                object: &object,
                job: job.as_ref(),
            };
            let decided = state
                .auth
                .authorize(&state.store, &subject, scopes.as_ref(), &ask)
                .await;
            if let Err(denied) = decided {
                let error = refusal(denied, &matched, &object);
                return (error.into_response(), Some(name));
            }
            let mut request = request;
            if matched == "/"
                || matched == "/fhir"
                || matched == "/fhir/"
                || matched.ends_with("/{type}")
                || matched == super::COUNTS
            {
                // Each entry of a Bundle is authorized on its own, with this request's facts,
                // and so is each type a search chains through.
                let mut object = object;
                object["body"] = Value::Null;
                request.extensions_mut().insert(Asked(object));
            }
            request
        }
    };
    let mut request = request;
    request.extensions_mut().insert(subject);
    if let Some(scopes) = scopes {
        request.extensions_mut().insert(Granted(scopes));
    }
    (next.run(request).await, Some(name))
}

/// The request object of a Client's `POST /` or `PUT /` (without its body), from which each
/// entry's own is made ([`entry_object`]), and of a search, for the types it chains through.
#[derive(Debug, Clone)]
pub struct Asked(pub Value);

/// The scopes of the bearer token a request came with (absent for basic credentials), for the
/// handlers that check them per resource type (`$export`).
#[derive(Debug, Clone)]
pub struct Granted(pub Scopes);

/// A refusal as an answer: 403 naming who was refused what; on a job route about a job this
/// subject did not start, the very 404 that route gives for a job that does not exist.
pub fn refusal(denied: Denied, matched: &str, object: &Value) -> ApiError {
    match denied {
        Denied::Forbidden(message) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", message),
        Denied::NoSuchJob => {
            let param = |name: &str| object["params"][name].as_str().unwrap_or_default();
            super::no_such_job(matched, param("resource/id"), param("name"))
        }
        Denied::Store(error) => error.into(),
    }
}

/// On a job route, what authorization needs to know about the job.
async fn job_facts(
    state: &AppState,
    matched: &str,
    object: &Value,
) -> Result<Option<JobFacts>, ApiError> {
    let Some(kind) = super::job_route(matched) else {
        return Ok(None);
    };
    let id = object["params"]["resource/id"].as_str().unwrap_or_default();
    let facts = match kind {
        JobKind::Import => state.background.imports.facts(id).await?,
        JobKind::Export => state.background.exports.facts(id).await?,
    };
    Ok(Some(facts))
}

/// The matched route's template, for the log and the metrics.
fn route_of(request: &Request) -> String {
    request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unrouted".to_string(), |m| m.as_str().to_string())
}

/// Builds the request object (reading the body when asked) and gives the request back.
async fn request_object(
    request: Request,
    client: &crate::store::clients::ClientRecord,
    with_body: bool,
) -> Result<(Request, Value), Response> {
    let (mut parts, body) = request.into_parts();
    let (body, parsed) = if with_body {
        read_body(&parts, body).await?
    } else {
        (body, Value::Null)
    };
    let object = build(&mut parts, client, parsed).await;
    Ok((Request::from_parts(parts, body), object))
}

/// Reads a small JSON/YAML body for the policies, and a copy of it for the handler.
async fn read_body(parts: &Parts, body: Body) -> Result<(Body, Value), Response> {
    let length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let syntax = match parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        Some(t) if t.contains("json") => Some(Syntax::Json),
        Some(t) if t.contains("yaml") => Some(Syntax::Yaml),
        _ => None,
    };
    let (Some(length), Some(syntax)) = (length, syntax) else {
        return Ok((body, Value::Null));
    };
    if length > POLICY_BODY_LIMIT {
        return Ok((body, Value::Null));
    }
    let bytes = match http_body_util::Limited::new(body, POLICY_BODY_LIMIT)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Err(ApiError::bad_request("could not read the request body").into_response())
        }
    };
    let parsed = parse(&bytes, syntax).unwrap_or(Value::Null);
    Ok((Body::from(bytes), parsed))
}

async fn build(
    parts: &mut Parts,
    client: &crate::store::clients::ClientRecord,
    body: Value,
) -> Value {
    let query = parts.uri.query().unwrap_or_default().to_string();
    let mut params: Map<String, Value> = form_urlencoded_pairs(&query)
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    if let Ok(route) = RawPathParams::from_request_parts(parts, &()).await {
        for (name, value) in route.iter() {
            let key = match name {
                "type" => "resource/type".to_string(),
                "id" => "resource/id".to_string(),
                other => other.to_string(),
            };
            params.insert(key, Value::String(value.to_string()));
        }
    }
    let headers: Map<String, Value> = parts
        .headers
        .iter()
        .filter(|(name, _)| *name != header::AUTHORIZATION)
        .filter_map(|(name, value)| {
            Some((
                name.as_str().to_string(),
                Value::String(value.to_str().ok()?.to_string()),
            ))
        })
        .collect();
    let remote = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip().to_string());
    let mut client_doc = client.resource.clone();
    if let Value::Object(doc) = &mut client_doc {
        doc.insert("id".into(), Value::String(client.id.clone()));
        doc.insert("resourceType".into(), Value::String("Client".into()));
        doc.remove("secret");
    }
    json!({
        "request-method": parts.method.as_str().to_ascii_lowercase(),
        "scheme": "http",
        "uri": parts.uri.path(),
        "query-string": query,
        "params": params,
        "headers": headers,
        "body": body,
        "client": client_doc,
        "user": null,
        "remote-addr": remote,
    })
}

/// The request object of a Bundle entry (or a `PUT /` element): the Bundle request's own
/// (its headers, client, address), as if the entry had been sent on its own: its method, its
/// path, its route parameters and its resource as the body.
pub fn entry_object(
    bundle: &Value,
    method: &str,
    path: &str,
    params: Map<String, Value>,
    body: Value,
) -> Value {
    let mut object = bundle.clone();
    object["request-method"] = Value::String(method.to_ascii_lowercase());
    object["uri"] = Value::String(path.to_string());
    object["query-string"] = Value::String(String::new());
    object["params"] = Value::Object(params);
    object["body"] = body;
    object
}
