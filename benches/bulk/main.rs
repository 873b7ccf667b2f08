//! The bulk API benchmark (not a test: it prints numbers).
//!
//! `cargo bench --bench bulk [-- OPERATION...]` starts a throwaway PostgreSQL (in /dev/shm,
//! or under `FHIRBOX_BENCH_DIR`), fills it from testdata/ replicated with fresh ids up to
//! `FHIRBOX_BENCH_RESOURCES` resources (default 1,000,000), starts the fhirbox server as its
//! own process, and times each bulk operation through real HTTP to a client that discards the
//! bytes, beside raw PostgreSQL `COPY` of the same rows through `psql` in the same run. It
//! samples the server's resident memory during each operation and prints one table.
//! Each measurement is the best of `FHIRBOX_BENCH_ROUNDS` runs (default 5). The 10M run:
//! `FHIRBOX_BENCH_RESOURCES=10000000 FHIRBOX_BENCH_ROUNDS=1 FHIRBOX_BENCH_DIR=/some/disk
//! cargo bench --bench bulk -- dump export import load` (about 45 GB of disk; docs/performance.md).
//!
//! Operations: `dump`, `dump-sql`, `views` (SQL on FHIR), `export`, `smart` (bearer tokens against basic
//! credentials, and the token endpoint's latency), `replicas` (`$dump` through a fhirbox
//! reading on a streaming standby it starts), `s3` (exports to and imports from a bucket,
//! on a SeaweedFS it starts; `export` runs it too), `import`, `load` (default: all; `s3`,
//! `import` and `load` run last, as they empty tables).

mod replicas;
mod s3;
mod server;
mod setup;
mod smart;
mod views;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use server::{RssSampler, Server, PASSWORD};

/// Runs per measurement; the fastest counts (the least disturbed by the rest of the machine).
/// `FHIRBOX_BENCH_ROUNDS` overrides it (1 for the 10M run, where a round takes minutes).
fn rounds() -> usize {
    std::env::var("FHIRBOX_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1)
}

struct Measurement {
    bytes: u64,
    seconds: f64,
    /// Peak resident memory of the server during the run, and its growth over the start.
    peak_rss: Option<(u64, u64)>,
    /// CPU seconds the server used during the run.
    server_cpu: Option<f64>,
}

struct Row {
    operation: String,
    rows: usize,
    measurement: Measurement,
    baseline_seconds: f64,
}

/// What the server spends during one operation: time, peak memory over its start, CPU.
struct Probe {
    rss_before: u64,
    cpu_before: f64,
    sampler: RssSampler,
    started: Instant,
}

impl Probe {
    fn start(server: &Server) -> Probe {
        Probe {
            rss_before: server.rss(),
            cpu_before: server.cpu_seconds(),
            sampler: RssSampler::start(server.pid()),
            started: Instant::now(),
        }
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn finish(self, server: &Server, bytes: u64) -> Measurement {
        let seconds = self.started.elapsed().as_secs_f64();
        let peak = self.sampler.finish();
        Measurement {
            bytes,
            seconds,
            peak_rss: Some((peak, peak.saturating_sub(self.rss_before))),
            server_cpu: Some(server.cpu_seconds() - self.cpu_before),
        }
    }
}

/// Best of [`rounds`].
async fn best<F, Fut>(mut run: F) -> Measurement
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Measurement>,
{
    let mut best: Option<Measurement> = None;
    for _ in 0..rounds() {
        let m = run().await;
        let peak = match (&best, m.peak_rss) {
            (Some(b), Some(p)) => b
                .peak_rss
                .map(|q| if q.1 > p.1 { q } else { p })
                .or(Some(p)),
            (_, p) => p,
        };
        if best.as_ref().is_none_or(|b| m.seconds < b.seconds) {
            best = Some(Measurement {
                peak_rss: peak,
                ..m
            });
        } else if let Some(b) = best.as_mut() {
            b.peak_rss = peak;
        }
    }
    best.expect("at least one round")
}

/// Where big temporary files go: beside the cluster (memory when /dev/shm is used).
fn cluster_parent() -> std::path::PathBuf {
    std::env::var_os("FHIRBOX_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(fhirbox::cluster::throwaway::default_parent)
}

/// Runs one psql command, failing loudly.
fn psql(url: &str, command: &str) {
    let status = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            command,
        ])
        .status()
        .expect("psql");
    assert!(status.success(), "psql failed: {command}");
}

/// Saves a response body to a file.
async fn save(server: &Server, client: &reqwest::Client, path: &str, file: &std::path::Path) {
    let response = client
        .get(format!("{}{path}", server.base))
        .basic_auth("root", Some(PASSWORD))
        .send()
        .await
        .expect("request");
    let bytes = response.bytes().await.expect("body");
    std::fs::write(file, &bytes).expect("write");
}

/// `$load` of the largest type: native into an empty table, the same again (every id
/// replaced), FHIR with conversion; against `psql \copy` of the same rows into an empty table
/// of the same shape.
async fn load_benchmarks(
    server: &Server,
    client: &reqwest::Client,
    url: &str,
    largest: &str,
    rows: usize,
    dir: &std::path::Path,
) -> Vec<Row> {
    let table = largest.to_ascii_lowercase();
    let native = dir.join("native.ndjson");
    let fhir = dir.join("fhir.ndjson");
    let copy_file = dir.join("rows.copy");
    save(server, client, &format!("/{largest}/$dump"), &native).await;
    save(
        server,
        client,
        &format!("/{largest}/$dump?fhir=true"),
        &fhir,
    )
    .await;
    psql(url, &format!("\\copy (SELECT id, txid, cts, ts, resource_type, status, resource FROM {table}) TO '{}'", copy_file.display()));
    psql(
        url,
        &format!(
            "DROP TABLE IF EXISTS bench_copy; CREATE TABLE bench_copy (LIKE {table} INCLUDING ALL)"
        ),
    );

    let raw = best(|| async {
        psql(url, "TRUNCATE bench_copy");
        let started = Instant::now();
        psql(
            url,
            &format!("\\copy bench_copy FROM '{}'", copy_file.display()),
        );
        let seconds = started.elapsed().as_secs_f64();
        let bytes = std::fs::metadata(&copy_file).map(|m| m.len()).unwrap_or(0);
        Measurement {
            bytes,
            seconds,
            peak_rss: None,
            server_cpu: None,
        }
    })
    .await;
    let baseline = raw.seconds;
    let mut out = vec![Row {
        operation: format!("raw psql \\copy into empty {table}"),
        rows,
        measurement: raw,
        baseline_seconds: baseline,
    }];

    let load = |path: String, file: std::path::PathBuf, truncate: bool| {
        let url = url.to_string();
        let table = table.clone();
        async move {
            if truncate {
                psql(&url, &format!("TRUNCATE {table}, {table}_history"));
            }
            let source = format!("file://{}", file.display());
            let mut m = http(
                server,
                client,
                client
                    .post(format!("{}{path}", server.base))
                    .json(&serde_json::json!({"source": source})),
            )
            .await;
            m.bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
            m
        }
    };
    let empty = best(|| load(format!("/{largest}/$load"), native.clone(), true)).await;
    out.push(Row {
        operation: format!("POST /{largest}/$load (empty)"),
        rows,
        measurement: empty,
        baseline_seconds: baseline,
    });
    let again = best(|| load(format!("/{largest}/$load"), native.clone(), false)).await;
    out.push(Row {
        operation: format!("POST /{largest}/$load (replace all)"),
        rows,
        measurement: again,
        baseline_seconds: baseline,
    });
    let converted = best(|| load("/fhir/$load".to_string(), fhir.clone(), true)).await;
    out.push(Row {
        operation: "POST /fhir/$load (empty, FHIR)".to_string(),
        rows,
        measurement: converted,
        baseline_seconds: baseline,
    });
    out
}

/// `$import` of every type (FHIR NDJSON files of the whole database) against the same files
/// loaded one by one with `$load`, each into empty tables. Prints how the status progressed.
async fn import_benchmark(
    server: &Server,
    client: &reqwest::Client,
    url: &str,
    counts: &std::collections::BTreeMap<String, usize>,
    dir: &std::path::Path,
) -> Vec<Row> {
    let total_rows: usize = counts.values().sum();
    let mut files = Vec::new();
    for name in counts.keys() {
        let file = dir.join(format!("{name}.ndjson"));
        save(server, client, &format!("/{name}/$dump?fhir=true"), &file).await;
        files.push((name.clone(), file));
    }
    let bytes: u64 = files
        .iter()
        .map(|(_, f)| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let tables: Vec<String> = counts.keys().map(|n| n.to_ascii_lowercase()).collect();
    let truncate = || {
        psql(
            url,
            &format!(
                "TRUNCATE {}",
                tables
                    .iter()
                    .map(|t| format!("\"{t}\", \"{t}_history\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    };

    truncate();
    let started = Instant::now();
    for (name, file) in &files {
        let source = format!("file://{}", file.display());
        let response = client
            .post(format!("{}/fhir/{name}/$load", server.base))
            .basic_auth("root", Some(PASSWORD))
            .json(&serde_json::json!({"source": source}))
            .send()
            .await
            .expect("load");
        assert!(
            response.status().is_success(),
            "{name}: {}",
            response.status()
        );
    }
    let sequential = started.elapsed().as_secs_f64();

    truncate();
    let inputs: Vec<serde_json::Value> = files
        .iter()
        .map(|(name, file)| serde_json::json!({"resourceType": name, "url": format!("file://{}", file.display())}))
        .collect();
    let body = serde_json::json!({"id": "bench", "inputs": inputs});
    let imported = import_round(server, client, &body, bytes).await;
    // The same files in migration mode (each line keeps its versionId and lastUpdated, as
    // $dump?fhir=true wrote them), into the same empty tables.
    truncate();
    let body = serde_json::json!({"id": "bench-migration", "mode": "migration", "inputs": inputs});
    let migrated = import_round(server, client, &body, bytes).await;
    let imported_seconds = imported.seconds;
    vec![
        Row {
            operation: "sum of POST /fhir/[type]/$load".into(),
            rows: total_rows,
            measurement: Measurement {
                bytes,
                seconds: sequential,
                peak_rss: None,
                server_cpu: None,
            },
            baseline_seconds: sequential,
        },
        Row {
            operation: "POST /fhir/$import (vs the sum)".into(),
            rows: total_rows,
            measurement: imported,
            baseline_seconds: sequential,
        },
        Row {
            operation: "... mode migration (vs $import)".into(),
            rows: total_rows,
            measurement: migrated,
            baseline_seconds: imported_seconds,
        },
    ]
}

/// One `$import` of `body` (its `id` names the job), followed to its end; its progress as
/// the status showed it is printed.
async fn import_round(
    server: &Server,
    client: &reqwest::Client,
    body: &serde_json::Value,
    bytes: u64,
) -> Measurement {
    let id = body["id"].as_str().expect("an id");
    let probe = Probe::start(server);
    let response = client
        .post(format!("{}/fhir/$import", server.base))
        .basic_auth("root", Some(PASSWORD))
        .json(body)
        .send()
        .await
        .expect("import");
    assert_eq!(response.status().as_u16(), 202);
    let mut progress = Vec::new();
    loop {
        let status: serde_json::Value = client
            .get(format!("{}/BulkImportStatus/{id}", server.base))
            .basic_auth("root", Some(PASSWORD))
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("json");
        let loaded: i64 = status["inputs"]
            .as_array()
            .map(|i| i.iter().filter_map(|i| i["total"].as_i64()).sum())
            .unwrap_or(0);
        if status["status"] != "in-progress" {
            assert_eq!(status["status"], "finished", "{status}");
            break;
        }
        progress.push((probe.elapsed(), loaded));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let measured = probe.finish(server, bytes);
    let shown: Vec<String> = progress
        .iter()
        .step_by((progress.len() / 8).max(1))
        .map(|(t, n)| format!("{t:.0}s:{n}"))
        .collect();
    eprintln!(
        "$import {id} progress (seconds: resources loaded, as the status showed it): {}",
        shown.join(" ")
    );
    measured
}

/// A system-level `$export` of the largest type, from kick-off to the manifest (the files
/// written, FHIR format), beside `$dump?fhir=true` of the same type in the same run.
async fn export_benchmark(
    server: &Server,
    client: &reqwest::Client,
    url: &str,
    largest: &str,
    largest_rows: usize,
    export_dir: &str,
) -> Vec<Row> {
    let dump_path = format!("{}/{largest}/$dump?fhir=true", server.base);
    let dump = best(|| http(server, client, client.get(&dump_path))).await;
    let dump_seconds = dump.seconds;
    let system_path = format!("/fhir/$export?_type={largest}");
    let export =
        best(|| export_round(server, client, &system_path, Some(largest_rows), export_dir)).await;
    eprintln!(
        "$export of {largest}: {:.2} s to the manifest, {:.2}x the time of $dump?fhir=true ({:.2} s)",
        export.seconds,
        export.seconds / dump_seconds,
        dump_seconds
    );
    // _includeHistory: one in ten resources of the type given an older version (a day
    // earlier, the version number before), then every version exported.
    let table = largest.to_ascii_lowercase();
    psql(
        url,
        &format!(
            "INSERT INTO \"{table}_history\" (id, txid, cts, ts, resource_type, status, resource)
             SELECT id, txid - 1, cts, ts - interval '1 day', resource_type, 'created', resource
               FROM \"{table}\" WHERE txid % 10 = 0
             ON CONFLICT DO NOTHING"
        ),
    );
    let versions = largest_rows
        + psql_lines(url, &format!("SELECT count(*) FROM \"{table}_history\""))
            .first()
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap_or(0);
    let history_path = format!("/fhir/$export?_type={largest}&_includeHistory=true");
    let history =
        best(|| export_round(server, client, &history_path, Some(versions), export_dir)).await;
    psql(url, &format!("TRUNCATE \"{table}_history\""));
    // A Group of 10 patients, every type of the Patient compartment: what the compartment
    // indexes are for.
    psql(
        url,
        "INSERT INTO \"group\" (id, txid, status, resource)
         SELECT 'bench-group', nextval('transaction_id_seq'), 'created',
                jsonb_build_object('type', 'person', 'actual', true, 'member',
                  jsonb_agg(jsonb_build_object('entity', jsonb_build_object('resourceType', 'Patient', 'id', id))))
           FROM (SELECT id FROM patient ORDER BY id LIMIT 10) p
         ON CONFLICT (id) DO NOTHING",
    );
    let group = best(|| {
        export_round(
            server,
            client,
            "/fhir/Group/bench-group/$export",
            None,
            export_dir,
        )
    })
    .await;
    // The same without the compartment indexes (then put back as they were).
    let indexes = psql_lines(
        url,
        "SELECT indexname || ' ' || indexdef FROM pg_indexes WHERE indexname LIKE '%fhirbox_patients'",
    );
    for line in &indexes {
        let name = line.split(' ').next().expect("name");
        psql(url, &format!("DROP INDEX {name}"));
    }
    let unindexed = best(|| {
        export_round(
            server,
            client,
            "/fhir/Group/bench-group/$export",
            None,
            export_dir,
        )
    })
    .await;
    for line in &indexes {
        let (_, definition) = line.split_once(' ').expect("definition");
        psql(url, definition);
    }
    eprintln!(
        "$export of a Group of 10 patients (every compartment type): {:.2} s to the manifest; \
         {:.2} s without the {} compartment indexes",
        group.seconds,
        unindexed.seconds,
        indexes.len()
    );
    // Every patient's compartment, by type and in patient blocks (organizeOutputBy): the same
    // resources, one COPY per type against one COPY sorted by patient. Best of two: each is
    // the whole database.
    let mut by_type: Option<Measurement> = None;
    let mut by_patient: Option<Measurement> = None;
    for _ in 0..2 {
        let m = export_round(server, client, "/fhir/Patient/$export", None, export_dir).await;
        if by_type.as_ref().is_none_or(|b| m.seconds < b.seconds) {
            by_type = Some(m);
        }
        let m = export_round(
            server,
            client,
            "/fhir/Patient/$export?organizeOutputBy=Patient",
            None,
            export_dir,
        )
        .await;
        if by_patient.as_ref().is_none_or(|b| m.seconds < b.seconds) {
            by_patient = Some(m);
        }
    }
    let (by_type, by_patient) = (by_type.expect("measured"), by_patient.expect("measured"));
    eprintln!(
        "Patient/$export of everything: {:.2} s by type, {:.2} s in patient blocks ({:.2}x)",
        by_type.seconds,
        by_patient.seconds,
        by_patient.seconds / by_type.seconds
    );
    let by_type_seconds = by_type.seconds;
    vec![
        Row {
            operation: format!("GET /{largest}/$dump?fhir=true"),
            rows: largest_rows,
            measurement: dump,
            baseline_seconds: dump_seconds,
        },
        Row {
            operation: "$export to manifest (vs $dump fhir)".into(),
            rows: largest_rows,
            measurement: export,
            baseline_seconds: dump_seconds,
        },
        Row {
            operation: "... _includeHistory (vs $dump fhir)".into(),
            rows: versions,
            measurement: history,
            baseline_seconds: dump_seconds,
        },
        Row {
            operation: "Group/$export, 10 patients".into(),
            rows: 0,
            measurement: group,
            baseline_seconds: dump_seconds,
        },
        Row {
            operation: "Patient/$export, all, by type".into(),
            rows: 0,
            measurement: by_type,
            baseline_seconds: by_type_seconds,
        },
        Row {
            operation: "... organizeOutputBy=Patient".into(),
            rows: 0,
            measurement: by_patient,
            baseline_seconds: by_type_seconds,
        },
    ]
}

/// One `$export`: kick-off, polling, then the files deleted the IG's way. `expected`: the
/// number of resources the manifest must count.
async fn export_round(
    server: &Server,
    client: &reqwest::Client,
    path: &str,
    expected: Option<usize>,
    export_dir: &str,
) -> Measurement {
    let probe = Probe::start(server);
    let response = client
        .get(format!("{}{path}", server.base))
        .basic_auth("root", Some(PASSWORD))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .send()
        .await
        .expect("kick-off");
    assert_eq!(response.status().as_u16(), 202);
    let status_url = response.headers()["content-location"]
        .to_str()
        .expect("ascii")
        .to_string();
    let manifest: serde_json::Value = loop {
        let response = client
            .get(&status_url)
            .basic_auth("root", Some(PASSWORD))
            .send()
            .await
            .expect("status");
        match response.status().as_u16() {
            202 => tokio::time::sleep(Duration::from_millis(50)).await,
            200 => break response.json().await.expect("manifest"),
            other => panic!("export status {other}"),
        }
    };
    // Kick-off to manifest; reading the sizes and deleting the files are not timed.
    let mut measurement = probe.finish(server, 0);
    let output = manifest["output"].as_array().expect("output");
    let count: u64 = output.iter().filter_map(|o| o["count"].as_u64()).sum();
    if let Some(expected) = expected {
        assert_eq!(count as usize, expected, "every resource exported");
    }
    let job = status_url.rsplit('/').next().expect("id");
    measurement.bytes = std::fs::read_dir(std::path::Path::new(export_dir).join(job))
        .expect("export files")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    client
        .delete(&status_url)
        .basic_auth("root", Some(PASSWORD))
        .send()
        .await
        .expect("delete");
    measurement
}

/// The rows of a one-column query, through psql.
fn psql_lines(url: &str, query: &str) -> Vec<String> {
    let output = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            query,
        ])
        .output()
        .expect("psql");
    assert!(output.status.success(), "psql failed: {query}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Raw `COPY (...) TO STDOUT` through psql, every byte read (and dropped) by this process.
fn psql_copy(url: &str, sql: &str) -> Measurement {
    let started = Instant::now();
    let mut child = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
        .stdout(Stdio::piped())
        .spawn()
        .expect("psql");
    let mut stdout = child.stdout.take().expect("stdout");
    let bytes = std::io::copy(&mut stdout, &mut std::io::sink()).expect("read psql");
    assert!(child.wait().expect("psql").success(), "psql failed: {sql}");
    Measurement {
        bytes,
        seconds: started.elapsed().as_secs_f64(),
        peak_rss: None,
        server_cpu: None,
    }
}

/// An HTTP request as root whose response body is read and dropped.
async fn http(
    server: &Server,
    client: &reqwest::Client,
    request: reqwest::RequestBuilder,
) -> Measurement {
    let _ = client;
    http_as(server, request.basic_auth("root", Some(PASSWORD))).await
}

/// An HTTP request with its own credentials whose response body is read and dropped.
async fn http_as(server: &Server, request: reqwest::RequestBuilder) -> Measurement {
    let probe = Probe::start(server);
    let response = request.send().await.expect("request");
    assert!(response.status().is_success(), "{}", response.status());
    let mut body = response.bytes_stream();
    let mut bytes = 0u64;
    while let Some(chunk) = body.next().await {
        bytes += chunk.expect("body").len() as u64;
    }
    probe.finish(server, bytes)
}

/// The table of `rows`, on stdout, or on stderr as the rows so far (a 10M run takes an hour).
fn print(rows: &[Row]) {
    write_table(&mut std::io::stdout(), rows);
}

fn write_table(out: &mut dyn std::io::Write, rows: &[Row]) {
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<34} {:>9} {:>9} {:>8} {:>9} {:>8} {:>12} {:>9} {:>10} {:>10}",
        "operation",
        "rows",
        "MB",
        "seconds",
        "rows/s",
        "MB/s",
        "ratio/COPY",
        "peak RSS",
        "RSS growth",
        "server CPU"
    );
    for row in rows {
        let m = &row.measurement;
        let mb = m.bytes as f64 / 1e6;
        let (peak, growth) = m
            .peak_rss
            .map(|(peak, growth)| {
                (
                    format!("{:.0} MB", peak as f64 / 1e6),
                    format!("{:.0} MB", growth as f64 / 1e6),
                )
            })
            .unwrap_or(("-".into(), "-".into()));
        let cpu = m
            .server_cpu
            .map(|s| format!("{s:.2} s"))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<34} {:>9} {:>9.1} {:>8.2} {:>9.0} {:>8.1} {:>12.2} {:>9} {:>10} {:>10}",
            row.operation,
            row.rows,
            mb,
            m.seconds,
            row.rows as f64 / m.seconds,
            mb / m.seconds,
            row.baseline_seconds / m.seconds,
            peak,
            growth,
            cpu
        );
    }
}

#[tokio::main]
async fn main() {
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let selected = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    let target: usize = std::env::var("FHIRBOX_BENCH_RESOURCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);

    let cluster = setup::start_cluster();
    let dataset = setup::Dataset::load();
    let replicas = target.div_ceil(dataset.len()).max(1);
    let counts = setup::fill(&cluster, &dataset, replicas).await;
    let url = cluster.url(setup::DATABASE);
    // Files for the loads (and the raw COPY baseline) live here; the server may read them.
    let files = tempfile::Builder::new()
        .prefix("fhirbox-bench-")
        .tempdir_in(cluster_parent())
        .expect("files dir");
    let files_dir = files.path().to_str().expect("utf-8 path").to_string();
    let export_dir = format!("{files_dir}/exports");
    // The export rounds poll every 50 ms to time exports finely: the per-job poll limit (a
    // rule for clients, not a cost) is off here.
    let server = Server::start(
        &url,
        &[
            "--source-dir",
            &files_dir,
            "--export-dir",
            &export_dir,
            "--export-polls-per-second",
            "0",
        ],
    );
    fhirbox::bulk::source::install_crypto_provider();
    let client = reqwest::Client::new();
    let (largest, largest_rows) = counts
        .iter()
        .max_by_key(|(_, rows)| **rows)
        .map(|(name, rows)| (name.clone(), *rows))
        .expect("some data");
    let table = largest.to_ascii_lowercase();
    eprintln!(
        "largest type: {largest} ({largest_rows} rows); server at {}",
        server.base
    );
    let mut rows = Vec::new();

    if selected("dump") {
        // Two baselines, the same rows and columns the dump reads: text COPY (what psql users
        // run) and binary COPY (what $dump itself reads). Ratios are against the faster.
        let select = format!("SELECT id, txid, cts, ts, resource FROM {table}");
        let text = best(|| async { psql_copy(&url, &format!("COPY ({select}) TO STDOUT")) }).await;
        let binary = best(|| async {
            psql_copy(&url, &format!("COPY ({select}) TO STDOUT (FORMAT binary)"))
        })
        .await;
        let baseline = text.seconds.min(binary.seconds);
        for (name, measurement) in [("text", text), ("binary", binary)] {
            rows.push(Row {
                operation: format!("raw psql COPY {table} ({name})"),
                rows: largest_rows,
                measurement,
                baseline_seconds: baseline,
            });
        }
        for (name, query) in [
            ("$dump", ""),
            ("$dump?fhir=true", "?fhir=true"),
            ("$dump?gzip=true", "?gzip=true"),
        ] {
            let path = format!("{}/{largest}/$dump{query}", server.base);
            let m = best(|| http(&server, &client, client.get(&path))).await;
            rows.push(Row {
                operation: format!("GET /{largest}/{name}"),
                rows: largest_rows,
                measurement: m,
                baseline_seconds: baseline,
            });
        }
    }

    if selected("export") {
        rows.extend(
            export_benchmark(&server, &client, &url, &largest, largest_rows, &export_dir).await,
        );
        write_table(&mut std::io::stderr(), &rows);
    }

    if selected("dump-sql") {
        let query = "select id, resource from patient";
        let patients = counts.get("Patient").copied().unwrap_or_default();
        let copy = best(|| async { psql_copy(&url, &format!("COPY ({query}) TO STDOUT")) }).await;
        let baseline = copy.seconds;
        rows.push(Row {
            operation: format!("raw psql COPY ({query})"),
            rows: patients,
            measurement: copy,
            baseline_seconds: baseline,
        });
        for (name, format) in [("TSV", ""), ("NDJSON", "?_format=ndjson")] {
            let path = format!("{}/$dump-sql{format}", server.base);
            let m = best(|| {
                http(
                    &server,
                    &client,
                    client
                        .post(&path)
                        .json(&serde_json::json!({"query": query})),
                )
            })
            .await;
            rows.push(Row {
                operation: format!("POST /$dump-sql ({name})"),
                rows: patients,
                measurement: m,
                baseline_seconds: baseline,
            });
        }
    }

    if selected("views") {
        rows.extend(views::views_benchmark(&server, &client, &url, &largest, &table).await);
    }

    if selected("smart") {
        rows.extend(smart::smart_benchmark(&server, &client, &largest, largest_rows).await);
    }

    if selected("replicas") {
        rows.extend(
            replicas::replicas_benchmark(&cluster, &server, &client, &url, &largest, largest_rows)
                .await,
        );
    }

    // The bucket rows are export (and import) figures: `export` runs them too.
    if selected("s3") || selected("export") {
        rows.extend(
            s3::s3_benchmark(
                &server,
                &client,
                &url,
                &largest,
                largest_rows,
                &counts,
                files.path(),
            )
            .await,
        );
    }

    write_table(&mut std::io::stderr(), &rows);
    if selected("import") {
        rows.extend(import_benchmark(&server, &client, &url, &counts, files.path()).await);
        write_table(&mut std::io::stderr(), &rows);
    }

    if selected("load") {
        rows.extend(
            load_benchmarks(&server, &client, &url, &largest, largest_rows, files.path()).await,
        );
    }

    print(&rows);
    tokio::time::sleep(Duration::from_millis(10)).await;
}
