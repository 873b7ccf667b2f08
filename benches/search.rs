//! The search benchmark (not a test: it prints numbers).
//!
//! `cargo bench --bench search` fills a throwaway PostgreSQL from testdata/ replicated with
//! fresh ids up to `FHIRBOX_BENCH_RESOURCES` resources (default 1,000,000; the same set-up as
//! `--bench bulk`), starts the fhirbox server as its own process with `--search-indexes common`
//! (`FHIRBOX_SEARCH_INDEXES` overrides it; the time the server takes to build them is
//! printed), and times representative searches through real HTTP: each query
//! `FHIRBOX_BENCH_SEARCH_ROUNDS` times (default 20), p50 and p95 of the latency to the last
//! byte, with the number of entries the first page had. With `FHIRBOX_BENCH_HOLD` set, the
//! server and its database stay up after the table (their URLs printed) until interrupted,
//! for `EXPLAIN ANALYZE` by hand.

#[allow(dead_code)] // the bulk bench uses more of it
#[path = "bulk/server.rs"]
mod server;
#[allow(dead_code)]
#[path = "bulk/setup.rs"]
mod setup;

use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use server::{Server, PASSWORD};

/// What the queries look for: values of the first replica of the dataset.
struct Picks {
    patient: String,
    identifier: String,
    family: String,
    birth_date: String,
    encounter: String,
}

fn text<'a>(doc: &'a Map<String, Value>, path: &[&str]) -> Option<&'a str> {
    let mut at = doc.get(path[0])?;
    for step in &path[1..] {
        at = match at {
            Value::Array(items) => items.first()?.get(step)?,
            other => other.get(step)?,
        };
    }
    match at {
        Value::Array(items) => items.first()?.as_str(),
        other => other.as_str(),
    }
}

fn picks(dataset: &setup::Dataset) -> Picks {
    let patients = &dataset.by_type["Patient"];
    let patient = patients
        .iter()
        .find(|p| {
            text(p, &["identifier", "system"]).is_some() && text(p, &["name", "family"]).is_some()
        })
        .expect("a patient with an identifier and a name");
    let id = text(patient, &["id"]).unwrap_or_default().to_string();
    let encounter = dataset.by_type["Encounter"]
        .iter()
        .find(|e| {
            e.get("subject")
                .and_then(|s| s.get("id"))
                .and_then(Value::as_str)
                == Some(&id)
        })
        .and_then(|e| text(e, &["id"]))
        .unwrap_or_default()
        .to_string();
    Picks {
        identifier: format!(
            "{}|{}",
            text(patient, &["identifier", "system"]).unwrap_or_default(),
            text(patient, &["identifier", "value"]).unwrap_or_default()
        ),
        family: text(patient, &["name", "family"])
            .unwrap_or_default()
            .to_string(),
        birth_date: text(patient, &["birthDate"])
            .unwrap_or_default()
            .to_string(),
        patient: id,
        encounter,
    }
}

/// The queries: (what it shows, `Type?query`).
fn queries(p: &Picks) -> Vec<(&'static str, String)> {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    vec![
        (
            "token, identifier",
            format!("Patient?identifier={}", enc(&p.identifier)),
        ),
        (
            "reference, subject",
            format!("Observation?subject=Patient/{}", p.patient),
        ),
        (
            "reference, bare id",
            format!("Condition?patient={}", p.patient),
        ),
        (
            "reference + token",
            format!(
                "Observation?patient={}&code=http://loinc.org%7C8302-2",
                p.patient
            ),
        ),
        (
            "reference, encounter",
            format!("Observation?encounter=Encounter/{}", p.encounter),
        ),
        (
            "reference + date",
            format!(
                "Observation?subject=Patient/{}&date=ge2015-01-01",
                p.patient
            ),
        ),
        (
            "reference + quantity",
            format!("Observation?patient={}&value-quantity=gt100", p.patient),
        ),
        (
            "string, family",
            format!("Patient?family={}", enc(&p.family)),
        ),
        (
            "date, birthdate",
            format!("Patient?birthdate={}", p.birth_date),
        ),
        (
            "token, gender + string",
            format!("Patient?gender=female&name={}", enc(&p.family)),
        ),
        ("_id", format!("Patient?_id={}", p.patient)),
        (
            "_include",
            format!(
                "Observation?patient={}&code=8302-2&_include=Observation:subject",
                p.patient
            ),
        ),
        (
            "_revinclude",
            format!("Patient?_id={}&_revinclude=Encounter:patient", p.patient),
        ),
        (
            "_sort -date",
            format!("Observation?patient={}&_sort=-date&_count=20", p.patient),
        ),
        ("compartment", format!("Patient/{}/Condition", p.patient)),
        (
            "chain",
            format!(
                "Encounter?subject:Patient.identifier={}",
                enc(&p.identifier)
            ),
        ),
        (
            "_has",
            format!("Patient?_has:Encounter:patient:_id={}", p.encounter),
        ),
        (
            "token, 1 page of many",
            "Observation?code=http://loinc.org%7C8302-2&_count=100".to_string(),
        ),
        (
            "_sort, page 10",
            "Observation?code=8302-2&_sort=-date&_count=10".to_string(),
        ),
        (
            "_total=accurate, many",
            "Observation?status=final&_total=accurate&_count=1".to_string(),
        ),
    ]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let target: usize = std::env::var("FHIRBOX_BENCH_RESOURCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rounds: usize = std::env::var("FHIRBOX_BENCH_SEARCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let cluster = setup::start_cluster();
    let dataset = setup::Dataset::load();
    let replicas = target.div_ceil(dataset.len()).max(1);
    let counts = setup::fill(&cluster, &dataset, replicas).await;
    let picks = picks(&dataset);
    let started = Instant::now();
    let indexes = std::env::var("FHIRBOX_SEARCH_INDEXES").unwrap_or_else(|_| "common".into());
    let server = Server::start(
        &cluster.url(setup::DATABASE),
        &["--search-indexes", &indexes],
    );
    eprintln!(
        "{} resources ({} Observations); server up with --search-indexes {indexes} in {:.1} s",
        counts.values().sum::<usize>(),
        counts.get("Observation").copied().unwrap_or(0),
        started.elapsed().as_secs_f64()
    );
    fhirbox::bulk::source::install_crypto_provider();
    let client = reqwest::Client::new();
    println!("| query | what | entries | p50 ms | p95 ms |");
    println!("| --- | --- | ---: | ---: | ---: |");
    for (what, query) in queries(&picks) {
        let url = format!("{}/fhir/{query}", server.base);
        let mut times = Vec::with_capacity(rounds);
        let mut entries = 0;
        // `_sort, page 10`: follow next links to the tenth page, and time that one.
        let tenth = what == "_sort, page 10";
        for _ in 0..rounds {
            let mut url = url.clone();
            if tenth {
                for _ in 0..9 {
                    let page: Value = get(&client, &url).await.1;
                    url = next_link(&page).unwrap_or(url);
                }
            }
            let (took, page) = get(&client, &url).await;
            entries = page["entry"].as_array().map_or(0, Vec::len);
            times.push(took);
        }
        times.sort();
        println!(
            "| `{query}` | {what} | {entries} | {:.1} | {:.1} |",
            percentile(&times, 0.5).as_secs_f64() * 1000.0,
            percentile(&times, 0.95).as_secs_f64() * 1000.0
        );
    }
    if std::env::var_os("FHIRBOX_BENCH_HOLD").is_some() {
        eprintln!(
            "holding: server {} database {}",
            server.base,
            cluster.url(setup::DATABASE)
        );
        tokio::signal::ctrl_c().await.expect("wait for ctrl-c");
    }
}

async fn get(client: &reqwest::Client, url: &str) -> (Duration, Value) {
    let started = Instant::now();
    let response = client
        .get(url)
        .basic_auth("root", Some(PASSWORD))
        .send()
        .await
        .expect("sent");
    let status = response.status();
    let bytes = response.bytes().await.expect("body");
    let took = started.elapsed();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    assert!(status.is_success(), "{url}: {status} {body}");
    (took, body)
}

fn next_link(page: &Value) -> Option<String> {
    page["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == "next")?["url"]
        .as_str()
        .map(str::to_string)
}
