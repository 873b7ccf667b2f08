//! The benchmark's database: a throwaway cluster filled from testdata/, replicated with fresh
//! ids up to the requested size. The fill writes straight with binary COPY: it is set-up, not
//! a measured operation.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::Instant;

use fhirbox::cluster::throwaway::ThrowawayCluster;
use fhirbox::format::Converter;
use fhirbox::resource::body_for_storage;
use fhirbox::resource_type::ResourceType;
use fhirbox::store::copy::{TupleWriter, PG_EPOCH_MICROS};
use fhirbox::store::{schema, Store};
use futures_util::SinkExt;
use serde_json::{Map, Value};

pub const DATABASE: &str = "bench";

/// Settings for a cluster that is loaded hard and read fast.
const SETTINGS: &[(&str, &str)] = &[
    ("shared_buffers", "1GB"),
    ("max_wal_size", "8GB"),
    ("checkpoint_timeout", "30min"),
    ("max_connections", "100"),
    ("synchronous_commit", "off"),
];

pub fn start_cluster() -> ThrowawayCluster {
    let parent = std::env::var_os("FHIRBOX_BENCH_DIR").map(std::path::PathBuf::from);
    let cluster = match parent {
        Some(parent) => ThrowawayCluster::start_in(&parent, SETTINGS),
        None => ThrowawayCluster::start(SETTINGS),
    };
    cluster.expect("start the benchmark's PostgreSQL")
}

/// The native documents of testdata/, by resource type.
pub struct Dataset {
    pub by_type: BTreeMap<String, Vec<Map<String, Value>>>,
    /// Every resource id, to know which references to rewrite in replicas.
    ids: HashSet<String>,
}

impl Dataset {
    pub fn load() -> Dataset {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
        let converter = Converter::default();
        let mut by_type: BTreeMap<String, Vec<Map<String, Value>>> = BTreeMap::new();
        let mut ids = HashSet::new();
        let mut seen = HashSet::new();
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
                for line in reader
                    .lines()
                    .map_while(Result::ok)
                    .filter(|l| !l.trim().is_empty())
                {
                    let doc: Value = serde_json::from_str(&line).expect("json");
                    let Value::Object(doc) = converter.to_native(doc).expect("converts") else {
                        continue;
                    };
                    let rt = doc["resourceType"].as_str().unwrap_or_default().to_string();
                    let id = doc["id"].as_str().unwrap_or_default().to_string();
                    // The datasets overlap (synthea-10 and synthea-1000 share resources).
                    if seen.insert((rt.clone(), id.clone())) {
                        ids.insert(id);
                        by_type.entry(rt).or_default().push(doc);
                    }
                }
            }
        }
        Dataset { by_type, ids }
    }

    pub fn len(&self) -> usize {
        self.by_type.values().map(Vec::len).sum()
    }

    /// A copy of `doc` for replica `replica` (0: the original): its id and the references to
    /// dataset resources get a suffix, so replicas are new resources with the same shape.
    pub fn replicate(&self, doc: &Map<String, Value>, replica: usize) -> Map<String, Value> {
        let mut copy = doc.clone();
        if replica > 0 {
            let suffix = format!("-r{replica}");
            for value in copy.values_mut() {
                self.rewrite_references(value, &suffix);
            }
            if let Some(Value::String(id)) = copy.get_mut("id") {
                id.push_str(&suffix);
            }
        }
        copy
    }

    fn rewrite_references(&self, value: &mut Value, suffix: &str) {
        match value {
            Value::Object(map) => {
                let is_reference = map.get("resourceType").is_some_and(Value::is_string)
                    && map
                        .get("id")
                        .and_then(Value::as_str)
                        .is_some_and(|id| self.ids.contains(id));
                if is_reference {
                    if let Some(Value::String(id)) = map.get_mut("id") {
                        id.push_str(suffix);
                    }
                }
                for child in map.values_mut() {
                    self.rewrite_references(child, suffix);
                }
            }
            Value::Array(items) => items
                .iter_mut()
                .for_each(|item| self.rewrite_references(item, suffix)),
            _ => {}
        }
    }
}

/// Creates the database, migrates it and fills it with `replicas` copies of the dataset.
/// Returns the number of rows per type.
pub async fn fill(
    cluster: &ThrowawayCluster,
    dataset: &Dataset,
    replicas: usize,
) -> BTreeMap<String, usize> {
    let (admin, connection) = cluster
        .config("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    admin
        .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
        .await
        .expect("create database");
    let store = Store::new(cluster.config(DATABASE), 4).expect("pool");
    let mut conn = store.connection().await.expect("connection");
    schema::migrate(&mut conn).await.expect("migrate");

    let started = Instant::now();
    let at = chrono::Utc::now().timestamp_micros() - PG_EPOCH_MICROS;
    let mut txid: i64 = 0;
    let mut counts = BTreeMap::new();
    for (name, docs) in &dataset.by_type {
        let rt = ResourceType::parse(name).expect("known type");
        let sink = conn
            .copy_in(&format!(
                "COPY {} (id, txid, cts, ts, resource_type, status, resource) FROM STDIN (FORMAT binary)",
                rt.table()
            ))
            .await
            .expect("copy in");
        let mut sink = std::pin::pin!(sink);
        let mut writer = TupleWriter::new();
        for replica in 0..replicas {
            for doc in docs {
                let copy = dataset.replicate(doc, replica);
                let id = copy["id"].as_str().unwrap_or_default().to_string();
                let body = Value::Object(body_for_storage(copy)).to_string();
                txid += 1;
                writer.start_tuple(7);
                writer.text(id.as_bytes());
                writer.i64(txid);
                writer.i64(at);
                writer.i64(at);
                writer.text(name.as_bytes());
                writer.text(b"created");
                writer.jsonb(body.as_bytes());
                if writer.len() > 1 << 20 {
                    sink.send(writer.take()).await.expect("copy data");
                }
            }
        }
        sink.send(writer.finish()).await.expect("copy data");
        sink.as_mut().finish().await.expect("copy done");
        counts.insert(name.clone(), docs.len() * replicas);
    }
    conn.execute("SELECT setval('transaction_id_seq', $1)", &[&txid])
        .await
        .expect("setval");
    conn.batch_execute("VACUUM ANALYZE").await.expect("vacuum");
    eprintln!(
        "filled {} resources in {:.1} s",
        counts.values().sum::<usize>(),
        started.elapsed().as_secs_f64()
    );
    counts
}
