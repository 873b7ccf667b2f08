//! `$viewdefinition-export`'s one task: every view of the request, each into one file
//! (`<name>-<run>-1.csv|ndjson|parquet` in the job's directory), all read in one snapshot
//! ([`crate::store::view_export`]). The views were checked and their references resolved
//! at kick-off; the job stores their bodies, so a ViewDefinition changed meanwhile does not
//! change the export.

use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::output::Written;
use super::request::ExportSpec;
use super::task::{count, failed, TaskOutput};
use super::Exports;
use crate::bulk::jobs::{Progress, TaskFailure};
use crate::bulk::report::Report;
use crate::bulk::stream::ByteStream;
use crate::store::jobs::TaskRow;
use crate::store::view_export;
use crate::views::definition::View;
use crate::views::parquet::{parquet, Physical};
use crate::views::sql::{self as view_sql, Columns, Rows};

/// The name of the one task of a view export.
pub const TASK: &str = "views";

/// One view of an export: the name of its output and the ViewDefinition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewExport {
    pub name: String,
    pub view: Value,
}

impl Exports {
    pub(super) async fn write_views(
        &self,
        spec: &ExportSpec,
        task: &TaskRow,
        progress: &Progress,
        report: &Report,
        budget: &super::task::Budget,
    ) -> Result<TaskOutput, TaskFailure> {
        let format = spec.view_format.as_deref().unwrap_or("ndjson");
        let converter = self.formats.converter().await.map_err(|e| failed(&e))?;
        // The snapshot and every view's COPY on one server (a snapshot is that server's).
        let reader = self.reader(spec).await;
        let store = &reader;
        let snapshot = view_export::snapshot(store).await.map_err(|e| failed(&e))?;
        // What an earlier run of this task left (a truncated file of a run that died).
        super::output::remove_earlier_runs(&self.storage, &task.job_id, task.attempts)
            .await
            .map_err(|e| self.write_failed(task, e))?;
        let rows = Rows {
            patients: spec.patients.clone(),
            since: spec.since.map(|s| s.to_rfc3339()),
            limit: None,
        };
        let (mut files, mut total, mut bytes) = (Vec::new(), 0u64, 0u64);
        for export in &spec.views {
            let view = View::parse(&export.view).map_err(|e| failed(&e))?;
            let attributes = converter.rules().for_type(&view.resource);
            let columns = if format == "csv" {
                Columns::Text
            } else {
                Columns::Json
            };
            let compiled =
                view_sql::compile(&view, attributes, &rows, columns, &self.settings.views)
                    .map_err(|e| failed(&e))?;
            let options = if format == "csv" {
                "FORMAT csv, HEADER true"
            } else {
                "FORMAT binary"
            };
            let limits = &self.settings.view_session;
            let copy = view_export::copy_in(store, &snapshot, &compiled.sql, options, limits)
                .await
                .map_err(|e| failed(&e))?;
            let counted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let seen = counted.clone();
            let mut body: ByteStream = if format == "csv" {
                // One COPY message per row, the header first.
                Box::pin(copy.map(move |chunk| {
                    seen.fetch_add(1, Ordering::Relaxed);
                    chunk.map_err(std::io::Error::other)
                }))
            } else {
                let lines =
                    crate::bulk::dump_sql::json_rows(copy, compiled.json_fields(), move |rows| {
                        seen.fetch_add(rows, Ordering::Relaxed);
                    });
                if format == "parquet" {
                    let columns = Physical::columns(&view, &compiled);
                    parquet(lines, columns, self.settings.parquet).map_err(|e| failed(&e))?
                } else {
                    lines
                }
            };
            let name = format!("{}-{}-1.{format}", export.name, task.attempts);
            let mut file = self
                .storage
                .create(&task.job_id, &name)
                .await
                .map_err(|e| self.write_failed(task, e))?;
            let mut view_bytes = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| failed(&e))?;
                file.write(&chunk)
                    .await
                    .map_err(|e| self.write_failed(task, e))?;
                bytes += chunk.len() as u64;
                view_bytes += chunk.len() as u64;
                let view_rows = counted.load(Ordering::Relaxed);
                let rows = total + view_rows;
                count(progress, report, rows, bytes, chunk.len());
                if let Some(why) = self.settings.view_output.exceeded(view_rows, view_bytes) {
                    return Err(TaskFailure::Failed(format!(
                        "view {}: the export stopped: {why}",
                        export.name
                    )));
                }
                budget.check(rows, bytes)?;
            }
            file.finish()
                .await
                .map_err(|e| self.write_failed(task, e))?;
            // A CSV file's header is no row.
            let rows = counted.load(Ordering::Relaxed) - u64::from(format == "csv");
            total += rows;
            files.push(Written { name, count: rows });
        }
        Ok(TaskOutput {
            files,
            deleted: Vec::new(),
            total,
            bytes,
        })
    }
}
