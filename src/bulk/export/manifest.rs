//! What the status URL shows: `X-Progress` while an export runs, and the manifest (IG 3.0.0),
//! whole or, with `allowPartialManifests`, in pages that list the types finished so far.
//!
//! Pages: each poll puts the tasks finished since the last page on a new page
//! ([`crate::store::jobs::manifest_pages`]); a page never changes once made, except that it
//! gains a `link` to the next page when there is one (what the IG allows). Page 1 is the
//! status URL itself, page N is `<status URL>?page=N`.

use serde_json::{json, Value};

use super::output::{result_deleted, result_files};
use super::request::ExportSpec;
use crate::resource::format_instant;
use crate::store::jobs::TaskRow;

/// The file that carries an export's warnings (OperationOutcomes, one per line). Its stem is
/// no resource type's: a type's task removes the files of its own earlier runs by their
/// `<Type>-` prefix, and once took this file for one (when it was `OperationOutcome-0-1`).
pub const WARNINGS_FILE: &str = "messages-0-1.ndjson";

/// `X-Progress` while an export runs: a percentage by rows (of each type's expected rows; a
/// finished type counts whole), then the types done and the resources written.
pub fn progress(tasks: &[TaskRow]) -> String {
    let finished = |t: &TaskRow| t.status == "finished";
    let (written, expected) = tasks.iter().fold((0i64, 0i64), |(written, expected), t| {
        let total = t.total.unwrap_or(0);
        let whole = t.size.unwrap_or(0).max(total).max(1);
        let got = if finished(t) { whole } else { total.min(whole) };
        (written + got, expected + whole)
    });
    let percent = (written as f64 / expected.max(1) as f64 * 100.0)
        .floor()
        .min(99.0);
    let done = tasks.iter().filter(|t| finished(t)).count();
    let resources: i64 = tasks.iter().filter_map(|t| t.total).sum();
    format!(
        "{percent}% ({done} of {} types, {resources} resources written)",
        tasks.len()
    )
}

/// A manifest listing the files of `tasks` (all of a finished job's, or one page's), in task
/// order; files under `files_base`.
pub fn manifest(spec: &ExportSpec, tasks: &[&TaskRow], files_base: &str) -> Value {
    let entry = |type_name: Option<&str>, name: &str, count: u64| {
        let mut entry = json!({"url": format!("{files_base}/{name}"), "count": count});
        if let Some(type_name) = type_name {
            entry["type"] = json!(type_name);
        }
        entry
    };
    let output: Vec<Value> = tasks
        .iter()
        .flat_map(|task| {
            // Patient blocks hold many types: the IG leaves `type` out then.
            let type_name = (!spec.by_patient).then_some(task.resource_type.as_str());
            // A view export's files are named by their views.
            let views = !spec.views.is_empty();
            result_files(task.result.as_ref())
                .into_iter()
                // (Every view is listed, an empty one too: its file still names the columns.)
                .filter(move |f| views || f.count > 0)
                .map(move |f| {
                    let view = f.name.split('-').next().unwrap_or_default();
                    entry(if views { Some(view) } else { type_name }, &f.name, f.count)
                })
        })
        .collect();
    let deleted: Vec<Value> = tasks
        .iter()
        .flat_map(|task| result_deleted(task.result.as_ref()))
        .filter(|f| f.count > 0)
        .map(|f| entry(Some("Bundle"), &f.name, f.count))
        .collect();
    let error: Vec<Value> = if spec.warnings.is_empty() {
        Vec::new()
    } else {
        vec![entry(
            Some("OperationOutcome"),
            WARNINGS_FILE,
            spec.warnings.len() as u64,
        )]
    };
    let mut manifest = json!({
        "transactionTime": format_instant(&spec.transaction_time),
        "request": spec.request,
        "requiresAccessToken": true,
        "output": output,
        "deleted": deleted,
        "error": error,
    });
    if spec.by_patient {
        manifest["outputOrganizedBy"] = json!("Patient");
    }
    manifest
}

/// Page `number` (from 1) of a paged manifest, with a `link` to the next page if there is
/// one; `None` if there is no such page.
pub fn page(
    spec: &ExportSpec,
    tasks: &[TaskRow],
    pages: &[Vec<i32>],
    number: usize,
    files_base: &str,
    status_url: &str,
) -> Option<Value> {
    let positions = pages.get(number.checked_sub(1)?)?;
    let listed: Vec<&TaskRow> = tasks
        .iter()
        .filter(|t| positions.contains(&t.position))
        .collect();
    let mut manifest = manifest(spec, &listed, files_base);
    if number < pages.len() {
        manifest["link"] = json!([{
            "relation": "next",
            "url": format!("{status_url}?page={}", number + 1),
        }]);
    }
    Some(manifest)
}

/// The warnings file: one OperationOutcome a line.
pub fn warnings_ndjson(warnings: &[String]) -> String {
    warnings
        .iter()
        .map(|message| {
            let outcome = json!({
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "warning", "code": "not-supported", "diagnostics": message}],
            });
            format!("{outcome}\n")
        })
        .collect()
}
