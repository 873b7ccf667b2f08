//! `GET /fhir/metadata` (and `/metadata`): the CapabilityStatement. Generic FHIR clients read
//! it first to learn what the server does, so it lists exactly what fhirbox supports.

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use super::context::ApiContext;
use crate::resource_type::ResourceType;

/// Said of every search parameter `$export`'s `_typeFilter` accepts as well.
const TYPE_FILTER_TOO: &str = "also accepted in $export's _typeFilter";

/// The interactions every resource type supports.
const TYPE_INTERACTIONS: &[&str] = &[
    "read",
    "vread",
    "update",
    "delete",
    "history-instance",
    "create",
    "search-type",
];

/// The Bulk Data IG's operation definitions.
const EXPORT: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export";
const PATIENT_EXPORT: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export";
const GROUP_EXPORT: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export";

/// The SQL on FHIR operations (on ViewDefinition, a type of fhirbox's own).
const VIEW_RUN: &str = "http://sql-on-fhir.org/OperationDefinition/$viewdefinition-run";
const VIEW_EXPORT: &str = "http://sql-on-fhir.org/OperationDefinition/$viewdefinition-export";
const MATERIALIZE: &str = "http://sql-on-fhir.org/OperationDefinition/$materialize";

/// The operations a type has besides the interactions.
fn type_operations(type_name: &str) -> Vec<Value> {
    match type_name {
        "Patient" => vec![json!({"name": "export", "definition": PATIENT_EXPORT})],
        "Group" => vec![json!({"name": "export", "definition": GROUP_EXPORT})],
        _ => Vec::new(),
    }
}

/// What a parameter of each type takes besides its values (`:missing`, and OR/AND, always).
fn modifiers(kind: &str) -> &'static str {
    match kind {
        "string" => "modifiers :exact, :contains, :missing; _sort",
        "token" => {
            "forms code, system|code, |code, system|; modifiers :not, :text, :of-type \
             (system|code|value, on Identifiers), :in and :not-in (a stored ValueSet), \
             :below and :above (system|code, in a stored CodeSystem's hierarchy; these four \
             not in _typeFilter), :missing; _sort"
        }
        "date" => "prefixes eq ne gt lt ge le sa eb ap; modifier :missing; _sort",
        "number" | "quantity" => "prefixes eq ne gt lt ge le sa eb ap; modifier :missing; _sort",
        "reference" => {
            "Type/id, id or an absolute URL on this server; modifiers :[type], :identifier \
             (system|value), :missing; chains (param:Type.param) and _has; _sort"
        }
        "uri" => "modifiers :below, :above, :missing; _sort",
        "composite" => "components joined by $",
        _ => "modifier :missing",
    }
}

/// `searchInclude` (`Type:param` for each reference parameter of the type, and `Type:*`)
/// and `searchRevInclude` (every `Source:param` that can refer to the type).
fn includes(type_name: &str) -> (Vec<String>, Vec<String>) {
    let references = || {
        crate::fhir::r4::SEARCH_PARAMS
            .iter()
            .filter(|p| p.kind == "reference" && !p.expression.is_empty())
    };
    let mut includes: Vec<String> = references()
        .filter(|p| p.base == type_name)
        .map(|p| format!("{}:{}", p.base, p.code))
        .collect();
    if !includes.is_empty() {
        includes.push(format!("{type_name}:*"));
    }
    let revincludes = references()
        .filter(|p| p.targets.contains(&type_name) && ResourceType::parse(p.base).is_some())
        .map(|p| format!("{}:{}", p.base, p.code))
        .collect();
    (includes, revincludes)
}

pub async fn capability_statement(ctx: ApiContext) -> Response {
    ctx.reply(StatusCode::OK, &statement(&ctx))
}

fn statement(ctx: &ApiContext) -> Value {
    let interactions: Vec<Value> = TYPE_INTERACTIONS
        .iter()
        .map(|code| json!({"code": code}))
        .collect();
    let resources: Vec<Value> = ResourceType::all()
        .filter(|rt| rt.is_fhir())
        .map(|rt| {
            // What search and `$export`'s `_typeFilter` accept (the IG: list them, so that
            // clients can discover the filters).
            let mut search_params = vec![
                json!({"name": "_id", "type": "token",
                       "definition": "http://hl7.org/fhir/SearchParameter/Resource-id",
                       "documentation": TYPE_FILTER_TOO}),
                json!({"name": "_lastUpdated", "type": "date",
                       "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
                       "documentation": TYPE_FILTER_TOO}),
                json!({"name": "_count", "type": "number",
                       "documentation": "page size (default 100, at most 1000, both flags); also \
                       _sort, _include, _revinclude (:iterate), _total, _summary, _elements, \
                       _compartment=Patient/[id] (what GET /Patient/[id]/[type] searches), \
                       _list=[List id] (the resources a List's entries name; searching List too)"}),
            ];
            search_params.extend(crate::search::searchable(rt.name()).map(|param| {
                json!({"name": param.code, "type": param.kind,
                       "definition": format!("http://hl7.org/fhir/SearchParameter/{}-{}", param.base, param.code),
                       "documentation": format!("{}; {TYPE_FILTER_TOO}", modifiers(param.kind))})
            }));
            let (includes, revincludes) = includes(rt.name());
            let mut resource = json!({
                "type": rt.name(),
                "interaction": interactions,
                "versioning": "versioned",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalUpdate": true,
                "conditionalDelete": "single",
                "searchInclude": includes,
                "searchRevInclude": revincludes,
                "searchParam": search_params,
            });
            let operations = type_operations(rt.name());
            if !operations.is_empty() {
                resource["operation"] = Value::Array(operations);
            }
            resource
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": chrono::Utc::now().format("%Y-%m-%d").to_string(),
        "kind": "instance",
        "software": {"name": "fhirbox", "version": env!("CARGO_PKG_VERSION")},
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "implementation": {"description": "fhirbox", "url": ctx.url("")},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json", "application/yaml"],
        "rest": [{
            "mode": "server",
            "security": {
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{"url": "token", "valueUri": ctx.origin_url("auth/token")}],
                }],
                "service": [
                    {"coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR"
                    }]},
                    {"coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "Basic"
                    }]}
                ],
                "description": "SMART Backend Services (client_credentials with a signed JWT; see /.well-known/smart-configuration) or HTTP basic authentication; AccessPolicy resources decide what each client may call, a token's scopes narrow it"
            },
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "operation": [
                {"name": "export", "definition": EXPORT},
                {"name": "viewdefinition-run", "definition": VIEW_RUN,
                 "documentation": "on ViewDefinition (type and instance level); _format csv, ndjson, json or parquet"},
                {"name": "viewdefinition-export", "definition": VIEW_EXPORT,
                 "documentation": "on ViewDefinition; asynchronous, answered like $export; _format ndjson, csv or parquet; viewReference as ViewDefinition/<id>"},
                {"name": "materialize", "definition": MATERIALIZE,
                 "documentation": "on a ViewDefinition instance, synchronous: type = view, materialized-view or table creates sof.<name>"}
            ],
        }],
    })
}
