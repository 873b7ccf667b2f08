//! A real Bulk Data client nobody here wrote: `smart-fetch` (the SMART/Cumulus bulk exporter,
//! from PyPI, installed by `scripts/ensure-smart-fetch`) exports from fhirbox, and the files it
//! writes match the database: a system export, one `--since` a change, a Group export with a
//! `--type-filter`, a Group export with smart-fetch's default types, and exports into a
//! bucket downloaded by signed links and through fhirbox.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{load_synthea, TestServer, ROOT_PASSWORD};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// The smart-fetch executable, installed on first use (once per test process; the script
/// also locks, for test processes running at once).
fn smart_fetch() -> PathBuf {
    static INSTALLED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(install).clone()
}

fn install() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ensure-smart-fetch");
    let output = Command::new("bash")
        .arg(&script)
        .output()
        .expect("run scripts/ensure-smart-fetch");
    assert!(
        output.status.success(),
        "scripts/ensure-smart-fetch failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

/// Runs a prepared smart-fetch command (3 minutes at most), which must succeed; the ids it
/// wrote into `out`, by type.
async fn finish(
    mut command: tokio::process::Command,
    what: &str,
    out: &Path,
) -> BTreeMap<String, BTreeSet<String>> {
    command.kill_on_drop(true);
    let output = tokio::time::timeout(std::time::Duration::from_secs(180), command.output())
        .await
        .expect("smart-fetch finished in time")
        .expect("smart-fetch ran");
    assert!(
        output.status.success(),
        "smart-fetch {what} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    read_output(out)
}

/// Runs `smart-fetch bulk` as root into a fresh directory; returns the ids it wrote, by type.
async fn export(
    server: &TestServer,
    bin: &Path,
    work: &Path,
    name: &str,
    args: &[&str],
) -> BTreeMap<String, BTreeSet<String>> {
    let out = work.join(name);
    let password = work.join("password");
    std::fs::write(&password, ROOT_PASSWORD).expect("password file");
    let mut command = tokio::process::Command::new(bin);
    command
        .arg("bulk")
        .arg("--fhir-url")
        .arg(server.url("/fhir"))
        .arg("--basic-user")
        .arg("root")
        .arg("--basic-passwd")
        .arg(&password)
        .args(args)
        .arg(&out)
        .env("NO_COLOR", "1");
    finish(command, &format!("{args:?}"), &out).await
}

/// Every resource in the NDJSON(.gz) files smart-fetch wrote (its log aside).
fn read_output(dir: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut by_type: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("output dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        if name == "log.ndjson" || !name.contains(".ndjson") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read");
        let mut text = String::new();
        if name.ends_with(".gz") {
            flate2::read::MultiGzDecoder::new(&bytes[..])
                .read_to_string(&mut text)
                .expect("gunzip");
        } else {
            text = String::from_utf8(bytes).expect("utf-8");
        }
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let resource: Value = serde_json::from_str(line).expect("a resource a line");
            let type_name = resource["resourceType"].as_str().expect("type").to_string();
            let id = resource["id"].as_str().expect("id").to_string();
            assert!(
                by_type.entry(type_name).or_default().insert(id),
                "{name}: no duplicates"
            );
        }
    }
    by_type
}

async fn db_ids(server: &TestServer, sql: &str) -> BTreeSet<String> {
    let db = server.db().await;
    db.query(sql, &[])
        .await
        .expect("query")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn smart_fetch_exports_what_the_database_holds() {
    let bin = smart_fetch();
    let server = TestServer::start().await;
    let loaded = load_synthea(&server).await;
    let work = std::env::temp_dir().join(format!("fhirbox-smart-fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");

    // 1. The whole system: smart-fetch picks the patient-data types the CapabilityStatement
    //    lists, and each file set equals the table.
    let all = export(&server, &bin, &work, "all", &[]).await;
    assert!(all.len() >= 8, "{:?}", all.keys());
    for (type_name, ids) in &all {
        assert!(loaded.contains_key(type_name), "{type_name}");
        let table = type_name.to_lowercase();
        assert_eq!(
            ids,
            &db_ids(&server, &format!("SELECT id FROM {table}")).await,
            "{type_name}"
        );
    }

    // 2. --since: only what changed after it.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let since = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let patient = all["Patient"].iter().next().expect("a patient").clone();
    let (status, mut body) = server.get(&format!("/fhir/Patient/{patient}")).await;
    assert_eq!(status, StatusCode::OK);
    body["active"] = json!(true);
    let (status, _) = server
        .json(Method::PUT, &format!("/fhir/Patient/{patient}"), &body)
        .await;
    assert_eq!(status, StatusCode::OK);
    let changed = export(&server, &bin, &work, "since", &["--since", &since]).await;
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(changed["Patient"], BTreeSet::from([patient.clone()]));

    // 3. A Group of two patients, Patient and Condition only, Conditions filtered by
    //    --type-filter: exactly those patients' matching Conditions.
    let members: Vec<String> = all["Patient"].iter().take(2).cloned().collect();
    let group = json!({"resourceType": "Group", "id": "cohort", "type": "person", "actual": true,
        "member": members.iter().map(|id| json!({"entity": {"reference": format!("Patient/{id}")}})).collect::<Vec<_>>()});
    let (status, body) = server.json(Method::PUT, "/fhir/Group/cohort", &group).await;
    assert!(status.is_success(), "{body}");
    let cohort = export(
        &server,
        &bin,
        &work,
        "group",
        &[
            "--group",
            "cohort",
            "--type",
            "Patient,Condition",
            "--type-filter",
            "Condition?clinical-status=active,resolved",
        ],
    )
    .await;
    assert_eq!(cohort["Patient"], members.iter().cloned().collect());
    let expected = db_ids(
        &server,
        &format!(
            "SELECT id FROM condition
              WHERE resource #>> '{{subject,id}}' IN ('{}', '{}')
                AND resource #>> '{{clinicalStatus,coding,0,code}}' IN ('active', 'resolved')",
            members[0], members[1]
        ),
    )
    .await;
    assert!(!expected.is_empty());
    assert_eq!(cohort["Condition"], expected);

    // 4. The same Group with smart-fetch's default types (which include Device and types
    //    outside the Patient compartment): every type it gets is exactly the members' part
    //    of its table, Device (through Device.patient) included.
    let defaults = export(
        &server,
        &bin,
        &work,
        "group-defaults",
        &["--group", "cohort"],
    )
    .await;
    assert!(defaults.contains_key("Device"), "{:?}", defaults.keys());
    for (type_name, ids) in &defaults {
        let table = type_name.to_lowercase();
        let expected = if type_name == "Patient" {
            members.iter().cloned().collect()
        } else {
            db_ids(
                &server,
                &format!(
                    "SELECT id FROM {table}
                      WHERE coalesce(resource #>> '{{subject,id}}', resource #>> '{{patient,id}}')
                            IN ('{}', '{}')",
                    members[0], members[1]
                ),
            )
            .await
        };
        assert_eq!(ids, &expected, "{type_name}");
    }
    std::fs::remove_dir_all(&work).expect("clean up");
}

/// smart-fetch as production runs it: over HTTPS, authenticated with SMART Backend Services
/// (its key a PEM file, its `kid` the key's thumbprint, as jwcrypto makes it), trusting the
/// test CA through `SSL_CERT_FILE`.
#[tokio::test]
async fn smart_fetch_exports_over_https_with_a_smart_token() {
    use common::keys::{jwks, SigningKey, Tls};
    let bin = smart_fetch();
    let tls = Tls::new();
    let config = fhirbox::http::serve::tls_config(&tls.cert_file, &tls.key_file).expect("TLS");
    let mut server = TestServer::start_custom(common::fresh_database().await, |settings| {
        settings.http.connections.tls = Some(config);
    })
    .await;
    server.client = tls.client();
    let loaded = load_synthea(&server).await;
    let key = SigningKey::es384();
    let client = json!({"resourceType": "Client", "grant_types": ["client_credentials"],
        "scope": ["system/*.rs"], "jwks": jwks(&[&key])});
    let (status, body) = server.json(Method::PUT, "/Client/cumulus", &client).await;
    assert!(status.is_success(), "{body}");
    let policy = json!({"resourceType": "AccessPolicy", "engine": "allow",
        "link": [{"resourceType": "Client", "id": "cumulus"}]});
    let (status, body) = server
        .json(Method::PUT, "/AccessPolicy/cumulus-may", &policy)
        .await;
    assert!(status.is_success(), "{body}");

    let work = tempfile::tempdir().expect("work dir");
    let key_file = work.path().join("key.pem");
    std::fs::write(&key_file, &key.pem).expect("key file");
    let out = work.path().join("out");
    let mut command = tokio::process::Command::new(&bin);
    command
        .arg("bulk")
        .arg("--fhir-url")
        .arg(server.url("/fhir"))
        .arg("--smart-client-id")
        .arg("cumulus")
        .arg("--smart-key")
        .arg(&key_file)
        .args(["--type", "Patient,Condition,Encounter"])
        .arg(&out)
        .env("NO_COLOR", "1")
        .env("SSL_CERT_FILE", &tls.ca_file);
    let exported = finish(command, "over HTTPS with SMART", &out).await;
    for type_name in ["Patient", "Condition", "Encounter"] {
        assert!(loaded.contains_key(type_name));
        let table = type_name.to_lowercase();
        assert_eq!(
            exported.get(type_name).cloned().unwrap_or_default(),
            db_ids(&server, &format!("SELECT id FROM {table}")).await,
            "{type_name}"
        );
    }
}

/// smart-fetch downloads a bucket's files both ways: signed links straight from the bucket
/// (no token sent there: `requiresAccessToken` is false), and links through fhirbox
/// (`--export-links proxy`), files that match the database.
#[tokio::test]
async fn smart_fetch_downloads_from_a_bucket_signed_and_proxied() {
    use fhirbox::bulk::export::Links;
    let bin = smart_fetch();
    for links in [Links::Signed, Links::Proxy] {
        let bucket = common::s3::s3().bucket();
        let server = TestServer::start_custom(common::fresh_database().await, |settings| {
            settings.s3 = common::s3::s3().settings();
            settings.exports.bucket =
                fhirbox::objects::Location::parse(&format!("s3://{bucket}/nightly"));
            settings.exports.links = Some(links);
        })
        .await;
        let loaded = load_synthea(&server).await;
        let work = tempfile::tempdir().expect("work dir");
        let exported = export(
            &server,
            &bin,
            work.path(),
            "bucket",
            &["--type", "Patient,Condition"],
        )
        .await;
        for type_name in ["Patient", "Condition"] {
            assert!(loaded.contains_key(type_name));
            let table = type_name.to_lowercase();
            assert_eq!(
                exported.get(type_name).cloned().unwrap_or_default(),
                db_ids(&server, &format!("SELECT id FROM {table}")).await,
                "{links:?} {type_name}"
            );
        }
    }
}
