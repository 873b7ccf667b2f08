//! Benchmark (not a test): native <-> FHIR conversion throughput, one core.
//!
//! Converts every resource of testdata/ in memory, each direction (parse + convert +
//! serialize), and reports MB/s beside a plain serde_json parse + serialize of the same bytes
//! measured in the same run. Run: `cargo bench --bench format`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use fhirbox::format::Converter;
use serde_json::Value;

/// Rounds per measurement; the best round counts (the least disturbed by the rest of the machine).
const ROUNDS: usize = 5;

fn load_lines() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut lines = Vec::new();
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("testdata")
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    for dir in dirs.into_iter().filter(|d| d.is_dir()) {
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("dir")
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for file in files
            .into_iter()
            .filter(|f| f.to_string_lossy().ends_with(".ndjson.gz"))
        {
            let reader = BufReader::new(flate2::read::MultiGzDecoder::new(
                std::fs::File::open(file).expect("open"),
            ));
            lines.extend(
                reader
                    .lines()
                    .map_while(Result::ok)
                    .filter(|l| !l.trim().is_empty()),
            );
        }
    }
    lines
}

/// Best of [`ROUNDS`] runs of `work` over `lines`; returns (seconds, output bytes).
fn measure(lines: &[String], work: impl Fn(&str) -> String) -> (Duration, usize) {
    let mut best = Duration::MAX;
    let mut out_bytes = 0;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let mut bytes = 0;
        for line in lines {
            bytes += std::hint::black_box(work(line)).len();
        }
        best = best.min(start.elapsed());
        out_bytes = bytes;
    }
    (best, out_bytes)
}

fn main() {
    let fhir_lines = load_lines();
    let converter = Converter::default();
    let native_lines: Vec<String> = fhir_lines
        .iter()
        .map(|line| {
            let doc: Value = serde_json::from_str(line).expect("json");
            converter.to_native(doc).expect("converts").to_string()
        })
        .collect();
    let fhir_mb = fhir_lines.iter().map(String::len).sum::<usize>() as f64 / 1e6;
    let native_mb = native_lines.iter().map(String::len).sum::<usize>() as f64 / 1e6;

    // `FHIRBOX_BENCH_FORMAT=text`: the bulk exports' text path alone, 20 rounds, to run
    // under a profiler (`perf record -g target/release/deps/format-*`; docs/performance.md).
    if std::env::var("FHIRBOX_BENCH_FORMAT").is_ok_and(|v| v == "text") {
        let started = Instant::now();
        let mut out = Vec::with_capacity(1 << 20);
        for _ in 0..20 {
            for line in &native_lines {
                out.clear();
                converter
                    .to_fhir_text(line.as_bytes(), &mut out)
                    .expect("converts");
                std::hint::black_box(&out);
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "native -> FHIR, text path: {:.1} MB/s over 20 rounds",
            native_mb * 20.0 / seconds
        );
        return;
    }

    let parse_serialize = |line: &str| {
        serde_json::from_str::<Value>(line)
            .expect("json")
            .to_string()
    };
    let (baseline_fhir, _) = measure(&fhir_lines, parse_serialize);
    let (baseline_native, _) = measure(&native_lines, parse_serialize);
    let (to_native, _) = measure(&fhir_lines, |line| {
        let doc: Value = serde_json::from_str(line).expect("json");
        converter.to_native(doc).expect("converts").to_string()
    });
    let (to_fhir, _) = measure(&native_lines, |line| {
        let doc: Value = serde_json::from_str(line).expect("json");
        converter.to_fhir(doc).to_string()
    });

    let (to_fhir_text, _) = measure(&native_lines, |line| {
        let mut out = Vec::with_capacity(line.len());
        converter
            .to_fhir_text(line.as_bytes(), &mut out)
            .expect("converts");
        String::from_utf8(out).expect("utf-8")
    });

    let rate = |mb: f64, d: Duration| mb / d.as_secs_f64();
    println!("format conversion, one core, {} resources ({fhir_mb:.1} MB FHIR, {native_mb:.1} MB native), best of {ROUNDS}", fhir_lines.len());
    println!(
        "{:<40} {:>10} {:>10} {:>8}",
        "operation", "seconds", "MB/s", "ratio"
    );
    let row = |name: &str, mb: f64, d: Duration, base: Duration| {
        println!(
            "{name:<40} {:>10.3} {:>10.1} {:>8.2}",
            d.as_secs_f64(),
            rate(mb, d),
            base.as_secs_f64() / d.as_secs_f64()
        );
    };
    row(
        "serde_json parse+serialize (FHIR bytes)",
        fhir_mb,
        baseline_fhir,
        baseline_fhir,
    );
    row(
        "FHIR -> native (parse+convert+write)",
        fhir_mb,
        to_native,
        baseline_fhir,
    );
    row(
        "serde_json parse+serialize (native)",
        native_mb,
        baseline_native,
        baseline_native,
    );
    row(
        "native -> FHIR (parse+convert+write)",
        native_mb,
        to_fhir,
        baseline_native,
    );
    row(
        "native -> FHIR, text path (bulk exports)",
        native_mb,
        to_fhir_text,
        baseline_native,
    );
}
