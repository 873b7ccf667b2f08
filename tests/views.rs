//! SQL on FHIR views over HTTP, on the Synthea sample in testdata/: rows checked against
//! values read from the source files (a choice element, a reference key, a first-class
//! extension through an Attribute, a FHIR-shaped nested extension, `forEachOrNull` over an
//! absent array, `%rowIndex`), the three formats, stored views, validation errors, the
//! patient restriction.

mod common;

use std::collections::BTreeSet;

use common::{answer, load_synthea, pretty, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const BIRTHSEX: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex";
const RACE: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race";

/// The source file's resources.
fn source(type_name: &str) -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("testdata/synthea-10/{type_name}.000.ndjson.gz"));
    let bytes = std::fs::read(path).expect("testdata");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text)
        .expect("gunzip");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

/// Runs an inline view; the status and the body's text.
async fn run(server: &TestServer, view: &Value, extra: &[(&str, Value)]) -> (StatusCode, String) {
    let mut parameters = vec![json!({"name": "viewResource", "resource": view})];
    for (name, value) in extra {
        let mut parameter = json!({"name": name});
        let key = match value {
            Value::Bool(_) => "valueBoolean",
            Value::Number(_) => "valueInteger",
            _ => "valueString",
        };
        parameter[key] = value.clone();
        parameters.push(parameter);
    }
    let response = server
        .request(Method::POST, "/fhir/ViewDefinition/$viewdefinition-run")
        .json(&json!({"resourceType": "Parameters", "parameter": parameters}))
        .send()
        .await
        .expect("send");
    (response.status(), response.text().await.expect("body"))
}

fn rows(text: &str) -> BTreeSet<String> {
    let rows: Vec<Value> = serde_json::from_str(text).expect("a JSON array");
    rows.iter().map(Value::to_string).collect()
}

fn condition_view() -> Value {
    json!({"resourceType": "ViewDefinition", "name": "conditions", "resource": "Condition",
    "select": [{"column": [
        {"name": "id", "path": "getResourceKey()"},
        {"name": "patient", "path": "subject.getReferenceKey(Patient)"},
        {"name": "subject", "path": "subject.reference"},
        {"name": "onset", "path": "onset.ofType(dateTime)", "type": "dateTime"},
        {"name": "code", "path": "code.coding.where(system = 'http://snomed.info/sct').code.first()"}
    ]}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_over_synthea_match_the_source_files() {
    let server = TestServer::start().await;
    // birthsex becomes a first-class field of Patient before the data is loaded.
    let attribute = json!({"resourceType": "Attribute", "resource": {"id": "Patient", "resourceType": "Entity"},
        "path": ["birthsex"], "type": {"id": "code", "resourceType": "Entity"}, "extensionUrl": BIRTHSEX});
    let (status, body) = server
        .json(Method::PUT, "/Attribute/Patient.birthsex", &attribute)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    load_synthea(&server).await;
    let (_, native) = server
        .get(&format!(
            "/Patient/{}",
            source("Patient")[0]["id"].as_str().unwrap()
        ))
        .await;
    assert!(
        native.get("birthsex").is_some(),
        "stored first-class: {native}"
    );

    // A choice element, a reference key and a reference rebuilt from the native form.
    let (status, text) = run(&server, &condition_view(), &[]).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let expected: BTreeSet<String> = source("Condition")
        .iter()
        .map(|c| {
            let subject = c["subject"]["reference"].as_str().unwrap();
            let code = c["code"]["coding"]
                .as_array()
                .unwrap()
                .iter()
                .find(|coding| coding["system"] == "http://snomed.info/sct")
                .map(|coding| coding["code"].clone())
                .unwrap_or(Value::Null);
            json!({"id": c["id"], "patient": subject.strip_prefix("Patient/").unwrap(),
                "subject": subject, "onset": c["onsetDateTime"], "code": code})
            .to_string()
        })
        .collect();
    assert!(expected.len() > 100);
    assert_eq!(rows(&text), expected);

    // A first-class extension, a FHIR-shaped nested one, forEachOrNull over an absent
    // array (Synthea patients have no contact), forEach over names with %rowIndex.
    let patient_view = json!({"resourceType": "ViewDefinition", "resource": "Patient", "select": [
        {"column": [
            {"name": "id", "path": "id"},
            {"name": "birthsex", "path": format!("extension('{BIRTHSEX}').value.ofType(code)")},
            {"name": "race", "path": format!("extension('{RACE}').extension('ombCategory').value.ofType(Coding).code.first()")}
        ]},
        {"forEachOrNull": "contact", "column": [{"name": "contact_family", "path": "name.family"}]},
        {"forEach": "name", "column": [
            {"name": "name_index", "path": "%rowIndex", "type": "integer"},
            {"name": "family", "path": "family"}
        ]}
    ]});
    let (status, text) = run(&server, &patient_view, &[]).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let mut expected = BTreeSet::new();
    for p in source("Patient") {
        let extension = |url: &str| {
            p["extension"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["url"] == url)
                .cloned()
                .unwrap_or(Value::Null)
        };
        let race = extension(RACE)["extension"]
            .as_array()
            .and_then(|x| x.iter().find(|e| e["url"] == "ombCategory"))
            .map(|e| e["valueCoding"]["code"].clone())
            .unwrap_or(Value::Null);
        for (index, name) in p["name"].as_array().unwrap().iter().enumerate() {
            expected.insert(
                json!({"id": p["id"], "birthsex": extension(BIRTHSEX)["valueCode"], "race": race,
                    "contact_family": null, "name_index": index, "family": name["family"]})
                .to_string(),
            );
        }
    }
    assert_eq!(rows(&text), expected);

    // CSV (header, text values) and NDJSON carry the same rows; _limit stops early.
    let (status, csv) = run(&server, &condition_view(), &[("_format", json!("csv"))]).await;
    assert_eq!(status, StatusCode::OK);
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("id,patient,subject,onset,code"));
    assert_eq!(lines.count(), expected_conditions());
    let (_, ndjson) = run(
        &server,
        &condition_view(),
        &[("_format", json!("ndjson")), ("_limit", json!(3))],
    )
    .await;
    assert_eq!(ndjson.lines().count(), 3);
    let (_, no_header) = run(
        &server,
        &condition_view(),
        &[("_format", json!("csv")), ("header", json!(false))],
    )
    .await;
    assert_eq!(no_header.lines().count(), expected_conditions());

    // patient=: only that patient's compartment.
    let one = source("Patient")[0]["id"].as_str().unwrap().to_string();
    let (status, text) = run(
        &server,
        &condition_view(),
        &[("patient", json!(format!("Patient/{one}")))],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let got = rows(&text);
    let theirs = source("Condition")
        .iter()
        .filter(|c| c["subject"]["reference"] == format!("Patient/{one}"))
        .count();
    assert_eq!(got.len(), theirs);
    assert!(theirs > 0);
    // group=: its members' compartments.
    let group = json!({"resourceType": "Group", "id": "cohort", "type": "person", "actual": true,
        "member": [{"entity": {"reference": format!("Patient/{one}")}}]});
    let (status, _) = server.json(Method::PUT, "/fhir/Group/cohort", &group).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, text) = run(
        &server,
        &condition_view(),
        &[("group", json!("Group/cohort"))],
    )
    .await;
    assert_eq!((status, rows(&text)), (StatusCode::OK, got));
    let (status, _) = run(
        &server,
        &condition_view(),
        &[("group", json!("Group/nobody"))],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // _since: changed after an instant.
    let (_, text) = run(
        &server,
        &condition_view(),
        &[("_since", json!("2000-01-01T00:00:00Z"))],
    )
    .await;
    assert_eq!(rows(&text).len(), expected_conditions());
    let (_, text) = run(
        &server,
        &condition_view(),
        &[("_since", json!("2999-01-01T00:00:00Z"))],
    )
    .await;
    assert_eq!(text, "[]\n");
}

fn expected_conditions() -> usize {
    source("Condition").len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_views_run_by_id_and_bad_views_are_refused_with_the_element_named() {
    let server = TestServer::start().await;
    let (status, _) = server
        .json(Method::PUT, "/fhir/Patient/p1", &json!({"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1970-03-04"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let view = json!({"resourceType": "ViewDefinition", "id": "patients", "resource": "Patient",
        "select": [{"column": [{"name": "id", "path": "id"}, {"name": "born", "path": "birthDate", "type": "date"}]}]});
    let (status, body) = server
        .json(Method::PUT, "/fhir/ViewDefinition/patients", &view)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    for path in [
        "/fhir/ViewDefinition/patients/$viewdefinition-run?_format=csv",
        "/fhir/ViewDefinition/patients/$run?_format=csv",
        "/ViewDefinition/patients/$viewdefinition-run?_format=csv",
    ] {
        let response = server.request(Method::GET, path).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(response.headers()["content-type"], "text/csv");
        assert_eq!(
            response.text().await.unwrap(),
            "id,born\np1,1970-03-04\n",
            "{path}"
        );
    }
    let (status, text) = {
        let body = json!({"resourceType": "Parameters", "parameter": [
            {"name": "viewReference", "valueReference": {"reference": "ViewDefinition/patients"}},
            {"name": "_format", "valueCode": "ndjson"}]});
        let response = server
            .request(Method::POST, "/fhir/ViewDefinition/$run")
            .json(&body)
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    };
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text, "{\"id\":\"p1\",\"born\":\"1970-03-04\"}\n");

    // The CapabilityStatement says so.
    let (_, statement) = server.get("/fhir/metadata").await;
    let operations: Vec<&str> = statement["rest"][0]["operation"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["name"].as_str())
        .collect();
    assert_eq!(
        operations,
        [
            "export",
            "viewdefinition-run",
            "viewdefinition-export",
            "materialize"
        ]
    );

    // Refused on write and on run, naming the element.
    let mut answers = Vec::new();
    let bad = [
        json!({"resourceType": "ViewDefinition", "resource": "Patient",
            "select": [{"column": [{"name": "id", "path": "id"}, {"name": "x", "path": "name.foo()"}]}]}),
        json!({"resourceType": "ViewDefinition", "resource": "Patient",
            "select": [{"column": [{"name": "id", "path": "id"}, {"name": "id", "path": "gender"}]}]}),
        json!({"resourceType": "ViewDefinition", "resource": "Patient",
            "select": [{"column": [{"name": "drop table", "path": "id"}]}]}),
        json!({"resourceType": "ViewDefinition", "resource": "Patiente",
            "select": [{"column": [{"name": "id", "path": "id"}]}]}),
        json!({"resourceType": "ViewDefinition", "resource": "Patient",
            "select": [{"forEach": "name.where(", "column": [{"name": "id", "path": "id"}]}]}),
        json!({"resourceType": "ViewDefinition", "resource": "Patient",
            "select": [{"column": [{"name": "id", "path": "id"}]}], "where": [{"path": "gender"}]}),
    ];
    for view in &bad {
        let (status, body) = server
            .json(Method::POST, "/fhir/ViewDefinition", view)
            .await;
        answers.push(answer("POST /fhir/ViewDefinition", status, &body));
    }
    let (status, text) = run(&server, &bad[0], &[]).await;
    answers.push(answer(
        "POST /fhir/ViewDefinition/$viewdefinition-run",
        status,
        &serde_json::from_str(&text).unwrap(),
    ));
    // A column that is not a collection but gets two values in a row fails the run.
    let two =
        json!({"resourceType": "Patient", "id": "p2", "name": [{"family": "A"}, {"family": "B"}]});
    server.json(Method::PUT, "/fhir/Patient/p2", &two).await;
    let families = json!({"resourceType": "ViewDefinition", "resource": "Patient",
        "select": [{"column": [{"name": "family", "path": "name.family"}]}]});
    let (status, text) = run(&server, &families, &[]).await;
    answers.push(answer(
        "POST /fhir/ViewDefinition/$viewdefinition-run (two families)",
        status,
        &serde_json::from_str(&text).unwrap(),
    ));
    // A string constant with quotes reaches SQL as data only.
    let sneaky = json!({"resourceType": "ViewDefinition", "resource": "Patient",
        "constant": [{"name": "g", "valueString": "female' OR true --\\"}],
        "select": [{"column": [{"name": "id", "path": "id"}]}], "where": [{"path": "gender = %g"}]});
    let (status, text) = run(&server, &sneaky, &[]).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "[]\n"));
    insta::assert_snapshot!(pretty(&answers));
}

/// `$dump-sql` as root (the SQL admin role, not fhirbox's own): NDJSON rows.
async fn sql(server: &TestServer, query: &str) -> (StatusCode, String) {
    let response = server
        .request(Method::POST, "/$dump-sql?_format=ndjson")
        .json(&json!({"query": query}))
        .send()
        .await
        .unwrap();
    (response.status(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materialized_views_are_read_by_dump_sql_and_follow_their_definition() {
    let server = TestServer::start().await;
    for (id, gender, active) in [("p1", "female", true), ("p2", "male", false)] {
        let patient = json!({"resourceType": "Patient", "id": id, "gender": gender, "active": active,
            "birthDate": "1970-03-04", "name": [{"family": "F"}, {"family": "G"}]});
        server
            .json(Method::PUT, &format!("/fhir/Patient/{id}"), &patient)
            .await;
    }
    let mut view = json!({"resourceType": "ViewDefinition", "name": "patient_demo", "resource": "Patient",
    "select": [{"column": [
        {"name": "id", "path": "id", "type": "id"},
        {"name": "gender", "path": "gender", "type": "code"},
        {"name": "active", "path": "active", "type": "boolean"},
        {"name": "names", "path": "name.count()", "type": "integer"},
        {"name": "born", "path": "birthDate", "type": "date"}
    ]}]});
    let (status, body) = server
        .json(Method::PUT, "/fhir/ViewDefinition/demo", &view)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    for kind in ["table", "materialized-view", "view"] {
        // A `view` parameter at instance level is ignored, as the spec says.
        let parameters = json!({"resourceType": "Parameters", "parameter": [
            {"name": "view", "part": [{"name": "viewReference",
                "valueReference": {"reference": "ViewDefinition/other"}}]}]});
        let (status, body) = server
            .json(
                Method::POST,
                &format!("/fhir/ViewDefinition/demo/$materialize?type={kind}"),
                &parameters,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{kind}: {body}");
        assert_eq!(body["parameter"][0]["valueString"], "sof.patient_demo");
        let (status, text) = sql(&server, "select * from sof.patient_demo order by id").await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert_eq!(
            text,
            "{\"id\":\"p1\",\"gender\":\"female\",\"active\":true,\"names\":2,\"born\":\"1970-03-04\"}\n\
             {\"id\":\"p2\",\"gender\":\"male\",\"active\":false,\"names\":2,\"born\":\"1970-03-04\"}\n",
            "{kind}: typed columns"
        );
    }
    // Joined with a resource table.
    let (status, text) = sql(
        &server,
        "select v.gender, p.resource->>'birthDate' as b from sof.patient_demo v join patient p using (id) where v.active",
    )
    .await;
    assert_eq!(
        (status, text.as_str()),
        (
            StatusCode::OK,
            "{\"gender\":\"female\",\"b\":\"1970-03-04\"}\n"
        )
    );

    // A changed definition rebuilds it; a deleted one drops it.
    view["select"][0]["column"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "first_family", "path": "name.family.first()", "type": "string"}));
    let (status, body) = server
        .json(Method::PUT, "/fhir/ViewDefinition/demo", &view)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, text) = sql(
        &server,
        "select first_family from sof.patient_demo where id = 'p1'",
    )
    .await;
    assert_eq!(text, "{\"first_family\":\"F\"}\n");
    let (status, _) = server.delete("/fhir/ViewDefinition/demo").await;
    assert_eq!(status, StatusCode::OK);
    let (status, text) = sql(&server, "select * from sof.patient_demo").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("does not exist"), "{text}");

    // Without a name there is nothing to call it.
    let nameless = json!({"resourceType": "ViewDefinition", "resource": "Patient",
        "select": [{"column": [{"name": "id", "path": "id"}]}]});
    server
        .json(Method::PUT, "/fhir/ViewDefinition/nameless", &nameless)
        .await;
    let (status, body) = server
        .json(
            Method::POST,
            "/fhir/ViewDefinition/nameless/$materialize",
            &json!(null),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        common::diagnostics(&body).starts_with("name: materializing needs"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_holds_the_same_rows_typed() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    // Small row groups (--parquet-row-group-rows): the file holds several.
    let server = TestServer::start_custom(common::fresh_database().await, |settings| {
        settings.http.parquet = fhirbox::views::parquet::RowGroups {
            rows: 100,
            bytes: 1024 * 1024,
        }
    })
    .await;
    load_synthea(&server).await;
    let mut view = condition_view();
    view["select"][0]["column"].as_array_mut().unwrap().extend([
        json!({"name": "abated", "path": "abatement.exists()", "type": "boolean"}),
        json!({"name": "codings", "path": "code.coding.count()", "type": "integer"}),
    ]);
    let (status, text) = run(&server, &view, &[]).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let expected = rows(&text);
    let response = server
        .request(Method::POST, "/fhir/ViewDefinition/$viewdefinition-run")
        .json(&json!({"resourceType": "Parameters", "parameter": [
            {"name": "viewResource", "resource": view},
            {"name": "_format", "valueCode": "parquet"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "application/vnd.apache.parquet"
    );
    let bytes = response.bytes().await.unwrap();
    let reader = SerializedFileReader::new(bytes).expect("a Parquet file");
    let groups: Vec<i64> = reader
        .metadata()
        .row_groups()
        .iter()
        .map(|g| g.num_rows())
        .collect();
    assert!(
        groups.len() > 1 && groups.iter().all(|rows| *rows <= 100),
        "{groups:?}"
    );
    let schema = reader.metadata().file_metadata().schema_descr();
    let types: Vec<String> = schema
        .columns()
        .iter()
        .map(|c| format!("{} {}", c.name(), c.physical_type()))
        .collect();
    assert_eq!(
        types,
        [
            "id BYTE_ARRAY",
            "patient BYTE_ARRAY",
            "subject BYTE_ARRAY",
            "onset BYTE_ARRAY",
            "code BYTE_ARRAY",
            "abated BOOLEAN",
            "codings INT64"
        ]
    );
    let got: BTreeSet<String> = reader
        .get_row_iter(None)
        .unwrap()
        .map(|row| {
            use parquet::record::Field;
            let mut map = serde_json::Map::new();
            for (name, field) in row.unwrap().get_column_iter() {
                let value = match field {
                    Field::Null => Value::Null,
                    Field::Bool(b) => json!(b),
                    Field::Long(n) => json!(n),
                    Field::Str(s) => json!(s),
                    other => panic!("unexpected {other:?}"),
                };
                map.insert(name.clone(), value);
            }
            Value::Object(map).to_string()
        })
        .collect();
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_export_asynchronously_in_one_snapshot() {
    let server = TestServer::start().await;
    load_synthea(&server).await;
    let patients = json!({"resourceType": "ViewDefinition", "name": "patients", "resource": "Patient",
        "select": [{"column": [{"name": "id", "path": "id"}, {"name": "gender", "path": "gender"}]}]});
    let (status, _) = server
        .json(Method::PUT, "/fhir/ViewDefinition/patients", &patients)
        .await;
    assert_eq!(status, StatusCode::CREATED);
    for format in ["csv", "ndjson", "parquet"] {
        let body = json!({"resourceType": "Parameters", "parameter": [
            {"name": "view", "part": [{"name": "viewReference", "valueReference": {"reference": "ViewDefinition/patients"}}]},
            {"name": "view", "part": [{"name": "name", "valueString": "conditions"},
                                      {"name": "viewResource", "resource": condition_view()}]},
            {"name": "_format", "valueCode": format}]});
        let response = server
            .request(Method::POST, "/fhir/ViewDefinition/$viewdefinition-export")
            .header("prefer", "respond-async")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED, "{format}");
        let status_url = response.headers()["content-location"]
            .to_str()
            .unwrap()
            .to_string();
        let manifest = common::export::manifest(&server, &status_url).await;
        let output = manifest["output"].as_array().unwrap();
        let listed: Vec<(&str, u64)> = output
            .iter()
            .map(|o| (o["type"].as_str().unwrap(), o["count"].as_u64().unwrap()))
            .collect();
        assert_eq!(
            listed,
            [
                ("patients", source("Patient").len() as u64),
                ("conditions", expected_conditions() as u64)
            ],
            "{format}"
        );
        let url = output[1]["url"].as_str().unwrap();
        assert!(url.ends_with(&format!(".{format}")), "{url}");
        let file = common::export::as_root(&server, Method::GET, url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        match format {
            "csv" => {
                let text = String::from_utf8(file.to_vec()).unwrap();
                assert!(text.starts_with("id,patient,subject,onset,code\n"));
                assert_eq!(text.lines().count(), expected_conditions() + 1);
            }
            "ndjson" => {
                let (_, text) = run(&server, &condition_view(), &[]).await;
                let exported: BTreeSet<String> = String::from_utf8(file.to_vec())
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap().to_string())
                    .collect();
                assert_eq!(exported, rows(&text));
            }
            _ => assert!(file.ends_with(b"PAR1")),
        }
    }
    // Asynchronous only, and every view is checked at kick-off.
    let bad = json!({"resourceType": "Parameters", "parameter": [
        {"name": "view", "part": [{"name": "viewResource", "resource":
            {"resourceType": "ViewDefinition", "resource": "Patient", "select": [{"column": [{"name": "x", "path": "foo()"}]}]}}]}]});
    let response = server
        .request(Method::POST, "/fhir/ViewDefinition/$viewdefinition-export")
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = server
        .request(Method::POST, "/fhir/ViewDefinition/$viewdefinition-export")
        .header("prefer", "respond-async")
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let outcome: Value = response.json().await.unwrap();
    assert!(
        common::diagnostics(&outcome)
            .starts_with("parameter[0]: select[0].column[0].path: unknown function 'foo'"),
        "{outcome}"
    );
}
