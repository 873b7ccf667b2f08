//! The official SQL on FHIR v2 test suite (tests/sql-on-fhir/, MIT, its LICENSE.md beside
//! it), run against a real fhirbox and PostgreSQL: each file gets a fresh database, its
//! `resources` are written through `/fhir/` (so they are stored in the native format the
//! compiler reads), each view is run with `$viewdefinition-run` (which compiles it), and
//! rows are compared as the reference runner does (order-insensitive; `expectError` must be
//! an error; `expectColumns` in order; `expectCount`).
//!
//! Every `shareable` test must pass; `experimental` ones are reported, not required. The
//! report in the format of the spec's implementation list is written to
//! `tests/sql-on-fhir/test_report.json` when `FHIRBOX_WRITE_SOF_REPORT=1`:
//!
//! ```sh
//! FHIRBOX_WRITE_SOF_REPORT=1 cargo test --test views_suite
//! ```

mod common;

use std::collections::BTreeMap;

use common::TestServer;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Numbers compare by value (`1.0` = `1`), objects by their members in any order.
fn normalize(value: &Value) -> Value {
    match value {
        Value::Number(n) => json!(n.to_string().parse::<f64>().unwrap_or(f64::NAN)),
        Value::Array(items) => Value::Array(items.iter().map(normalize).collect()),
        Value::Object(map) => {
            let sorted: BTreeMap<&String, Value> =
                map.iter().map(|(k, v)| (k, normalize(v))).collect();
            json!(sorted)
        }
        other => other.clone(),
    }
}

fn sorted_rows(rows: &[Value]) -> Vec<String> {
    let mut rows: Vec<String> = rows.iter().map(|r| normalize(r).to_string()).collect();
    rows.sort();
    rows
}

/// Runs one test; `Err` says why it failed.
async fn run_test(server: &TestServer, test: &Value) -> Result<(), String> {
    let mut view = test["view"].clone();
    if let Value::Object(map) = &mut view {
        map.insert("resourceType".into(), json!("ViewDefinition"));
    }
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "viewResource", "resource": view},
        {"name": "_format", "valueCode": "json"},
    ]});
    let response = server
        .request(Method::POST, "/fhir/ViewDefinition/$viewdefinition-run")
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let text = response.text().await.map_err(|e| e.to_string())?;
    if test.get("expectError") == Some(&json!(true)) {
        return match status {
            s if s.is_client_error() => Ok(()),
            s => Err(format!("expected an error, got {s}: {text}")),
        };
    }
    if status != StatusCode::OK {
        return Err(format!("{status}: {text}"));
    }
    let rows: Vec<Value> = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    if let Some(columns) = test.get("expectColumns").and_then(Value::as_array) {
        // Column order: the keys of a row, in order (or none when there are no rows).
        if let Some(Value::Object(first)) = rows.first() {
            let got: Vec<Value> = first.keys().map(|k| json!(k)).collect();
            if &got != columns {
                return Err(format!("columns {got:?}, expected {columns:?}"));
            }
        }
    }
    if let Some(count) = test.get("expectCount").and_then(Value::as_u64) {
        if rows.len() as u64 != count {
            return Err(format!("{} rows, expected {count}", rows.len()));
        }
    }
    if let Some(expect) = test.get("expect").and_then(Value::as_array) {
        let (got, want) = (sorted_rows(&rows), sorted_rows(expect));
        if got != want {
            return Err(format!("rows\n  got  {got:?}\n  want {want:?}"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sql_on_fhir_suite() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sql-on-fhir");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("the suite")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && p.file_name().is_some_and(|n| n != "test_report.json")
        })
        .collect();
    files.sort();
    assert_eq!(files.len(), 22, "the suite's 22 files");
    let mut report = serde_json::Map::new();
    let mut failed_shareable = Vec::new();
    let (mut passed, mut total, mut experimental) = (0, 0, Vec::new());
    for file in &files {
        let suite: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
        let server = TestServer::start().await;
        for resource in suite["resources"].as_array().unwrap() {
            let ty = resource["resourceType"].as_str().unwrap();
            let (status, body) = match resource["id"].as_str() {
                Some(id) => {
                    server
                        .json(Method::PUT, &format!("/fhir/{ty}/{id}"), resource)
                        .await
                }
                None => {
                    server
                        .json(Method::POST, &format!("/fhir/{ty}"), resource)
                        .await
                }
            };
            assert!(status.is_success(), "{}: {status} {body}", file.display());
        }
        let mut results = Vec::new();
        for test in suite["tests"].as_array().unwrap() {
            let name = test["title"].as_str().unwrap_or_default().to_string();
            let shareable = test["tags"]
                .as_array()
                .is_none_or(|tags| tags.contains(&json!("shareable")));
            let outcome = run_test(&server, test).await;
            total += 1;
            let file_name = file.file_name().unwrap().to_string_lossy().to_string();
            match (&outcome, shareable) {
                (Ok(()), _) => passed += 1,
                (Err(why), true) => failed_shareable.push(format!("{file_name} / {name}: {why}")),
                (Err(why), false) => experimental.push(format!("{file_name} / {name}: {why}")),
            }
            results.push(json!({"name": name, "result": {"passed": outcome.is_ok()}}));
        }
        let stem = file.file_stem().unwrap().to_string_lossy().to_string();
        report.insert(stem, json!({"tests": results}));
    }
    eprintln!("SQL on FHIR suite: {passed} of {total} passed");
    for failure in &experimental {
        eprintln!("experimental, failed: {failure}");
    }
    if std::env::var("FHIRBOX_WRITE_SOF_REPORT").as_deref() == Ok("1") {
        let text = serde_json::to_string_pretty(&Value::Object(report)).unwrap();
        std::fs::write(dir.join("test_report.json"), text + "\n").unwrap();
    }
    assert!(
        failed_shareable.is_empty(),
        "{} shareable test(s) failed:\n{}",
        failed_shareable.len(),
        failed_shareable.join("\n")
    );
}
