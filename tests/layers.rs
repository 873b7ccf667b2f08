//! The layers of docs/architecture.md, checked on the source: no module imports one above
//! it. `format` and `store` name nothing of the operations or `http`, `format` reads no
//! database, `fhirpath` runs nothing, and `metrics` (called from everywhere) names nothing of
//! fhirbox's.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir` (or `dir` itself when it is a file).
fn sources(dir: &Path) -> Vec<PathBuf> {
    if dir.is_file() {
        return vec![dir.to_path_buf()];
    }
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).expect("a source directory") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out
}

/// The places under `module` that name one of `forbidden` (`crate::x` paths).
fn reaching(module: &str, forbidden: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join(module);
    let mut found = Vec::new();
    for file in sources(&root) {
        let text = std::fs::read_to_string(&file).expect("readable source");
        for (n, line) in text.lines().enumerate() {
            for name in forbidden {
                if line.contains(&format!("crate::{name}::"))
                    || line.contains(&format!("crate::{name};"))
                {
                    found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    found
}

const OPERATIONS: &[&str] = &[
    "http", "crud", "bundle", "bulk", "auth", "views", "search", "app", "server", "formats",
];

#[test]
fn format_converts_with_what_it_is_given() {
    let mut forbidden = OPERATIONS.to_vec();
    forbidden.push("store");
    assert_eq!(reaching("format", &forbidden), Vec::<String>::new());
}

#[test]
fn store_and_fhirpath_call_nothing_above_them() {
    for module in ["store", "fhirpath"] {
        assert_eq!(
            reaching(module, OPERATIONS),
            Vec::<String>::new(),
            "{module}"
        );
    }
}

#[test]
fn metrics_names_nothing_of_fhirbox() {
    let mut forbidden = OPERATIONS.to_vec();
    forbidden.extend(["store", "format", "objects", "cluster"]);
    assert_eq!(reaching("metrics.rs", &forbidden), Vec::<String>::new());
}
