//! The one authorization decision: may this subject make this request?
//!
//! Every way in asks it the same way: a request as the router matched it
//! ([`crate::http::access`]), and each entry of a batch or transaction Bundle and each
//! element of a `PUT /` list, as the request it would be if it were sent on its own
//! ([`crate::http::bundle`]). So a Bundle can never do what its entries could not do one by
//! one. The rules, in order:
//!
//! 1. Root may do anything.
//! 2. A route that follows a job (its status, manifest, files, cancel) is open to the
//!    subject that started the job and to root, nobody else, whatever the policies say: to
//!    anyone else the job does not exist (404). A token must also cover every type the job
//!    touches.
//!    The job list (`GET /$jobs`) and the resource counts (`GET /$counts`) are open to every
//!    subject too: they decide item by item with this very function (a job as its status
//!    route would, a type as `GET /{type}` would) and leave out what is refused.
//! 3. `BulkImportStatus` is fhirbox's record of imports: a Client reaches its own through the
//!    import's status route, never through CRUD, search or a Bundle entry.
//! 4. A bearer token's scopes must cover the route's interaction on its type (fhirbox's own
//!    types only by scopes that name them: `*` never covers `Client`, `AccessPolicy`,
//!    `Attribute` or `BulkImportStatus`).
//! 5. An AccessPolicy must allow the request (deny by default).

use serde_json::Value;

use super::scope::{Interaction, Scopes};
use super::{Authenticator, Subject};
use crate::resource_type::ResourceType;
use crate::store::{Store, StoreError};

/// What a route does, as far as authorization cares: its template (`/{type}/{id}`, with or
/// without `/fhir`), method and request object, and the job it follows when it follows one.
pub struct Ask<'a> {
    /// The method, upper case.
    pub method: &'a str,
    /// The matched route's template, without the `/fhir` prefix; empty when nothing matched.
    pub route: &'a str,
    /// The request object the AccessPolicies see (see `http::access`).
    pub object: &'a Value,
    /// The job a job route follows (`None` on other routes).
    pub job: Option<&'a JobFacts>,
}

/// What a job route needs to know about its job.
#[derive(Debug, Clone, Default)]
pub struct JobFacts {
    /// Who started it; `None`: there is no such job.
    pub owner: Option<String>,
    /// The resource types it reads or writes.
    pub types: Vec<ResourceType>,
    /// What the job does to them: read (`$export`) or write (`$import`).
    pub writes: bool,
}

/// Why a request may not run.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    /// Not allowed; the message says which subject was refused what.
    #[error("{0}")]
    Forbidden(String),
    /// A job route about a job this subject did not start: answered as if there were none.
    #[error("no such job")]
    NoSuchJob,
    /// The policies could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Authenticator {
    /// Decides whether `subject` (with a bearer token's `scopes`) may make the request.
    pub async fn authorize(
        &self,
        store: &Store,
        subject: &Subject,
        scopes: Option<&Scopes>,
        ask: &Ask<'_>,
    ) -> Result<(), Denied> {
        let client = match subject {
            Subject::Root => return Ok(()),
            Subject::Client(client) => client,
        };
        let name = subject.name();
        if let Some(job) = ask.job {
            return job_rule(&name, scopes, job);
        }
        if ask.method == "GET" && SELF_FILTERING.contains(&ask.route) {
            return Ok(());
        }
        let rt = ask.object["params"]["resource/type"]
            .as_str()
            .and_then(ResourceType::parse);
        if is_crud(ask.route) && rt.is_some_and(|rt| rt.name() == "BulkImportStatus") {
            return Err(Denied::Forbidden(format!(
                "{name} may not {} {}: BulkImportStatus is fhirbox's record of imports; \
                 follow an import you started at /BulkImportStatus/<id>",
                ask.method,
                path_of(ask.object)
            )));
        }
        if let Some(scopes) = scopes {
            if let Some(refusal) = scope_refusal(ask.route, ask.method, rt, scopes) {
                return Err(Denied::Forbidden(refusal));
            }
        }
        let policies = self.policies.current(store).await?;
        if policies.allows(client, ask.object, store).await {
            return Ok(());
        }
        Err(Denied::Forbidden(format!(
            "{name} is not allowed to {} {}",
            ask.method,
            path_of(ask.object)
        )))
    }
}

/// The routes that filter what they answer through [`Authenticator::authorize`] item by item.
const SELF_FILTERING: &[&str] = &["/$jobs", "/$counts"];

/// Rule 2: a job's routes are its owner's (and root's), with scopes covering its types.
fn job_rule(name: &str, scopes: Option<&Scopes>, job: &JobFacts) -> Result<(), Denied> {
    if job.owner.as_deref() != Some(name) {
        return Err(Denied::NoSuchJob);
    }
    let needs: &[Interaction] = if job.writes {
        &Interaction::WRITE_ALL
    } else {
        &Interaction::READ_ALL
    };
    if let Some(scopes) = scopes {
        if let Some(rt) = job
            .types
            .iter()
            .find(|rt| !scopes.allow_all(Some(**rt), needs))
        {
            return Err(Denied::Forbidden(format!(
                "the access token's scope ({scopes}) does not cover {rt}, which this job {}",
                if job.writes { "writes" } else { "reads" }
            )));
        }
    }
    Ok(())
}

fn path_of(object: &Value) -> &str {
    object["uri"].as_str().unwrap_or_default()
}

/// The CRUD routes, the ones a Bundle entry can stand for.
fn is_crud(route: &str) -> bool {
    matches!(
        route,
        "/{type}" | "/{type}/{id}" | "/{type}/{id}/_history" | "/{type}/{id}/_history/{vid}"
    )
}

/// Why a token's scopes do not cover a request, if they do not: what each route needs, by its
/// template. `$export` kick-offs are checked per type by their handler; `POST /` and `PUT /`
/// need nothing themselves, since each of their entries is authorized on its own.
fn scope_refusal(
    route: &str,
    method: &str,
    rt: Option<ResourceType>,
    scopes: &Scopes,
) -> Option<String> {
    use Interaction::{Create, Delete, Read, Search, Update};
    let (on, needs): (Option<ResourceType>, &[Interaction]) = match (route, method) {
        ("/{type}", "GET") => (rt, &[Search]),
        ("/{type}", "POST") => (rt, &[Create]),
        // Conditional writes; their search is authorized by their handler, as a search.
        ("/{type}", "PUT") => (rt, &[Create, Update]),
        ("/{type}", "DELETE") => (rt, &[Delete]),
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
        ("/", "POST" | "PUT") => return None,
        _ => (None, &[Create, Read, Update, Delete, Search]),
    };
    if scopes.allow_all(on, needs) {
        return None;
    }
    let what = on.map_or("every resource type".to_string(), |rt| rt.to_string());
    Some(format!(
        "the access token's scope ({scopes}) does not allow {method} {what}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(name: &str) -> Option<ResourceType> {
        ResourceType::parse(name)
    }

    #[test]
    fn a_job_is_its_owners_and_a_token_must_cover_its_types() {
        let job = JobFacts {
            owner: Some("Client/a".into()),
            types: vec![rt("Observation").expect("a type")],
            writes: false,
        };
        assert!(job_rule("Client/a", None, &job).is_ok());
        assert!(matches!(
            job_rule("Client/b", None, &job),
            Err(Denied::NoSuchJob)
        ));
        let narrow = Scopes::parse("system/Patient.rs");
        assert!(matches!(
            job_rule("Client/a", Some(&narrow), &job),
            Err(Denied::Forbidden(_))
        ));
        let wide = Scopes::parse("system/*.rs");
        assert!(job_rule("Client/a", Some(&wide), &job).is_ok());
        let missing = JobFacts::default();
        assert!(matches!(
            job_rule("Client/a", None, &missing),
            Err(Denied::NoSuchJob)
        ));
    }

    #[test]
    fn bundles_need_no_scope_themselves_their_entries_do() {
        let read = Scopes::parse("system/Patient.rs");
        assert_eq!(scope_refusal("/", "POST", None, &read), None);
        assert!(scope_refusal("/{type}/{id}", "PUT", rt("Patient"), &read).is_some());
        assert_eq!(
            scope_refusal("/{type}/{id}", "GET", rt("Patient"), &read),
            None
        );
    }
}
