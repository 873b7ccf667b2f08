//! What a SQL on FHIR view costs: a flat view of the largest type (10 columns, one
//! `forEach` over `code.coding`) run as CSV and NDJSON through `$viewdefinition-run`, against
//! raw `COPY` (CSV, through psql) of a hand-written SQL projection of the same rows and
//! columns in the same run. The ratio is of times for the same rows (NDJSON carries the
//! column names in every row, Parquet is compressed, so their bytes differ).

use serde_json::json;

use crate::server::Server;
use crate::{best, http, psql_copy, psql_lines, Row};

pub async fn views_benchmark(
    server: &Server,
    client: &reqwest::Client,
    url: &str,
    largest: &str,
    table: &str,
) -> Vec<Row> {
    // Observation's elements; another largest type still runs, with emptier columns.
    let projection = format!(
        "SELECT r.id, r.resource->>'status', \
                CASE WHEN r.resource#>>'{{subject,resourceType}}' = 'Patient' THEN r.resource#>>'{{subject,id}}' END, \
                CASE WHEN r.resource#>>'{{encounter,resourceType}}' = 'Encounter' THEN r.resource#>>'{{encounter,id}}' END, \
                r.resource#>>'{{effective,dateTime}}', r.resource->>'issued', \
                r.resource#>>'{{value,Quantity,value}}', r.resource#>>'{{value,Quantity,unit}}', \
                c->>'system', c->>'code' \
           FROM {table} r CROSS JOIN LATERAL jsonb_array_elements(r.resource#>'{{code,coding}}') c"
    );
    let count: usize = psql_lines(url, &format!("SELECT count(*) FROM ({projection}) q"))[0]
        .parse()
        .expect("a count");
    let copy =
        best(|| async { psql_copy(url, &format!("COPY ({projection}) TO STDOUT (FORMAT csv)")) })
            .await;
    let baseline = copy.seconds;
    let mut rows = vec![Row {
        operation: format!("raw psql COPY projection ({largest}, CSV)"),
        rows: count,
        measurement: copy,
        baseline_seconds: baseline,
    }];
    let view = json!({"resourceType": "ViewDefinition", "resource": largest, "select": [
        {"column": [
            {"name": "id", "path": "getResourceKey()"},
            {"name": "status", "path": "status"},
            {"name": "patient", "path": "subject.getReferenceKey(Patient)"},
            {"name": "encounter", "path": "encounter.getReferenceKey(Encounter)"},
            {"name": "effective", "path": "effective.ofType(dateTime)"},
            {"name": "issued", "path": "issued"},
            {"name": "value", "path": "value.ofType(Quantity).value"},
            {"name": "unit", "path": "value.ofType(Quantity).unit"}
        ]},
        {"forEach": "code.coding", "column": [
            {"name": "system", "path": "system"},
            {"name": "code", "path": "code"}
        ]}
    ]});
    for format in ["csv", "ndjson", "parquet"] {
        let path = format!("{}/fhir/ViewDefinition/$viewdefinition-run", server.base);
        let body = json!({"resourceType": "Parameters", "parameter": [
            {"name": "viewResource", "resource": view},
            {"name": "_format", "valueCode": format}
        ]});
        let m = best(|| http(server, client, client.post(&path).json(&body))).await;
        rows.push(Row {
            operation: format!("view {largest} ({format})"),
            rows: count,
            measurement: m,
            baseline_seconds: baseline,
        });
    }
    rows
}
