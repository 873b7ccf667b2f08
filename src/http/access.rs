//! Authentication and access control of every request (but `GET /health` and the
//! CapabilityStatement, `GET /metadata`), after routing:
//! root passes; a Client passes if an AccessPolicy allows the request (or if it asks for the
//! status of an import or export it started, and an export's files); anything else is 401
//! (no or bad credentials, with `WWW-Authenticate: Basic`) or 403 (saying which subject was
//! denied which method and path, and nothing else).
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
use axum::http::{header, request::Parts, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};

use super::body::{form_urlencoded_pairs, parse, Syntax};
use super::error::ApiError;
use super::log::Seen;
use super::AppState;
use crate::auth::scope::{Interaction, Scopes};
use crate::auth::{Authenticated, Subject};
use crate::resource_type::ResourceType;
use crate::store::jobs::JobKind;

/// Bodies larger than this are not read for policies (they see `body: null`).
const POLICY_BODY_LIMIT: usize = 1024 * 1024;

/// What anyone may call without credentials: the health check, the CapabilityStatement and
/// the SMART configuration (clients read them before they authenticate; they say what fhirbox
/// supports and hold no data), and the token endpoint (its caller authenticates with a signed
/// assertion instead).
fn is_public(method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    (method == Method::GET
        && matches!(
            path,
            "/health"
                | "/metadata"
                | "/fhir/metadata"
                | "/.well-known/smart-configuration"
                | "/fhir/.well-known/smart-configuration"
        ))
        || (method == Method::POST && path == "/auth/token")
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
            let policies = match state.auth.policies.current(&state.store).await {
                Ok(policies) => policies,
                Err(error) => return (ApiError::from(error).into_response(), Some(name)),
            };
            let (request, object) =
                match request_object(request, client, policies.uses_body()).await {
                    Ok(pair) => pair,
                    Err(response) => return (response, Some(name)),
                };
            let route = request.extensions().get::<MatchedPath>().cloned();
            let owner = match owns_job(&state, route.as_ref(), &object, &subject).await {
                Ok(owner) => owner,
                Err(response) => return (response, Some(name)),
            };
            if let Some(scopes) = &scopes {
                let route = route.as_ref().map_or("", |m| m.as_str());
                if let Some(refusal) = scope_refusal(route, request.method(), &object, scopes) {
                    let denied = ApiError::new(StatusCode::FORBIDDEN, "forbidden", refusal);
                    return (denied.into_response(), Some(name));
                }
            }
            if !owner && !policies.allows(client, &object, &state.store).await {
                let denied = ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!(
                        "{name} is not allowed to {} {}",
                        request.method(),
                        request.uri().path()
                    ),
                );
                return (denied.into_response(), Some(name));
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

/// The scopes of the bearer token a request came with (absent for basic credentials), for the
/// handlers that check them per resource type (`$export`).
#[derive(Debug, Clone)]
pub struct Granted(pub Scopes);

/// Why a token's scopes do not cover a request, if they do not: what each route needs, by its
/// template (`/fhir` routes as the native ones). The job routes need nothing more (their owner
/// rule applies); `$export` kick-offs are checked per type by their handler.
fn scope_refusal(route: &str, method: &Method, object: &Value, scopes: &Scopes) -> Option<String> {
    use crate::auth::scope::Interaction::{Create, Delete, Read, Search, Update};
    let route = route.strip_prefix("/fhir").unwrap_or(route);
    let rt = object["params"]["resource/type"]
        .as_str()
        .and_then(ResourceType::parse);
    let (on, needs): (Option<ResourceType>, &[Interaction]) = match (route, method.as_str()) {
        ("/{type}", "GET") => (rt, &[Search]),
        ("/{type}", "POST") => (rt, &[Create]),
        ("/{type}/{id}", "GET") | ("/{type}/{id}/_history" | "/{type}/{id}/_history/{vid}", _) => {
            (rt, &[Read])
        }
        ("/{type}/{id}", "PUT") => (rt, &[Update]),
        ("/{type}/{id}", "DELETE") => (rt, &[Delete]),
        ("/{type}/$dump" | "/{type}/$dump-csv", _) => (rt, &Interaction::READ_ALL),
        ("/{type}/$load", _) => (rt, &Interaction::WRITE_ALL),
        ("/$dump-sql", _) => (None, &Interaction::READ_ALL),
        // A view reads its resource type; which one is known only once the view is read.
        (
            "/{type}/$viewdefinition-run"
            | "/{type}/$run"
            | "/{type}/{id}/$viewdefinition-run"
            | "/{type}/{id}/$run",
            _,
        ) => (None, &Interaction::READ_ALL),
        ("/$load" | "/$import", _) => (None, &Interaction::WRITE_ALL),
        ("/$export" | "/{type}/$export" | "/{type}/{id}/$export", _) => return None,
        (route, _)
            if super::job_route(&format!("/fhir{route}")).is_some()
                || super::job_route(route).is_some() =>
        {
            return None
        }
        _ => (None, &[Create, Read, Update, Delete, Search]),
    };
    if scopes.allow_all(on, needs) {
        return None;
    }
    let what = on.map_or("every resource type".to_string(), |rt| rt.to_string());
    Some(format!(
        "the access token's scope ({scopes}) does not allow {} {what}",
        method.as_str()
    ))
}

/// The matched route's template, for the log and the metrics.
fn route_of(request: &Request) -> String {
    request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unrouted".to_string(), |m| m.as_str().to_string())
}

/// Whether the subject started the job a job route ([`super::job_route`]) is about: it may
/// follow its own job without a policy for it. Nobody else may, unless a policy allows it.
/// The job's id is the route's `{id}`, as the request object has it.
async fn owns_job(
    state: &AppState,
    route: Option<&MatchedPath>,
    object: &Value,
    subject: &Subject,
) -> Result<bool, Response> {
    let kind = route.and_then(|matched| super::job_route(matched.as_str()));
    let id = object["params"]["resource/id"].as_str();
    let (Some(kind), Some(id)) = (kind, id) else {
        return Ok(false);
    };
    let owner = match kind {
        JobKind::Import => state.background.imports.subject(id).await,
        JobKind::Export => state.background.exports.subject(id).await,
    };
    match owner {
        Ok(owner) => Ok(owner.as_deref() == Some(subject.name().as_str())),
        Err(error) => Err(ApiError::from(error).into_response()),
    }
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
