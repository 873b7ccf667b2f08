//! An export task's output files: `<stem>-<attempt>-<n>.ndjson` in the job's directory (the
//! stem is the type, `<Type>_deleted` for deletions, `patients` for patient blocks), a new
//! file whenever the current one reached the size limit (files split between lines only, or
//! between blocks).
//!
//! The attempt (how many times the task was claimed) is in the name so that two runs of one
//! task never write the same file: a worker that stalled past its lease may still be writing
//! for a moment after another worker took the task over (it stops at its next renewal, and
//! its files are never listed, since only the claim holder can mark the task finished).

use std::sync::Arc;

use serde_json::{json, Value};

use super::storage::{ExportStorage, Sink};

/// The run of a file name `<stem>-<run>-<n>.<ext>`.
pub fn run_of(name: &str) -> Option<i32> {
    let mut parts = name.rsplitn(3, '-');
    parts.next();
    parts.next()?.parse().ok()
}

/// Removes every file of `job` whose run is before `attempt`, whatever its stem (a view
/// export's one task owns its job's files).
pub async fn remove_earlier_runs(
    storage: &ExportStorage,
    job: &str,
    attempt: i32,
) -> std::io::Result<()> {
    // Run 0 is the kick-off's own (the warnings file).
    storage
        .remove(job, |name| {
            run_of(name).is_some_and(|run| run >= 1 && run < attempt)
        })
        .await
}

/// One written file: its name and how many resources it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub name: String,
    pub count: u64,
}

/// Writes one type's lines into size-limited files.
pub struct Output {
    storage: Arc<ExportStorage>,
    job: String,
    /// `<Type>-<attempt>-`: every file name of this run starts so.
    prefix: String,
    limit: u64,
    done: Vec<Written>,
    current: Option<Current>,
}

struct Current {
    sink: Sink,
    written: Written,
    bytes: u64,
}

impl Output {
    /// Starts the output of `stem` in `job`'s files for run `attempt` of its task, removing
    /// what earlier runs left.
    pub async fn create(
        storage: &Arc<ExportStorage>,
        job: &str,
        stem: &str,
        attempt: i32,
        limit: u64,
    ) -> std::io::Result<Output> {
        let mine = format!("{stem}-");
        storage
            .remove(job, |name| {
                name.strip_prefix(&mine).is_some_and(|rest| {
                    run_of(&format!("x-{rest}")).is_some_and(|run| run < attempt)
                })
            })
            .await?;
        Ok(Output {
            storage: storage.clone(),
            job: job.to_string(),
            prefix: format!("{stem}-{attempt}-"),
            limit: limit.max(1),
            done: Vec::new(),
            current: None,
        })
    }

    /// Writes a batch of whole lines; returns how many lines it held.
    pub async fn write(&mut self, mut batch: &[u8]) -> std::io::Result<u64> {
        let mut lines = 0;
        while !batch.is_empty() {
            if self.current.is_none() {
                self.open_next().await?;
            }
            let current = self.current.as_mut().expect("opened above");
            let room = self.limit.saturating_sub(current.bytes) as usize;
            let take = if batch.len() <= room {
                batch.len()
            } else {
                // The whole lines that fit; a file holds at least one line, however long.
                match batch[..room].iter().rposition(|b| *b == b'\n') {
                    Some(end) => end + 1,
                    None if current.bytes == 0 => batch
                        .iter()
                        .position(|b| *b == b'\n')
                        .map_or(batch.len(), |end| end + 1),
                    None => 0,
                }
            };
            let (part, rest) = batch.split_at(take);
            current.sink.write(part).await?;
            let count = part.iter().filter(|b| **b == b'\n').count() as u64;
            current.bytes += part.len() as u64;
            current.written.count += count;
            lines += count;
            batch = rest;
            if current.bytes >= self.limit || take == 0 {
                self.close_current().await?;
            }
        }
        Ok(lines)
    }

    /// Starts a block of lines that belong together (a patient's, with `organizeOutputBy`):
    /// a file at its limit is closed first, so blocks are never split across files; a file
    /// goes over the limit by at most one block.
    pub async fn start_block(&mut self) -> std::io::Result<()> {
        if self.current.as_ref().is_some_and(|c| c.bytes >= self.limit) {
            self.close_current().await?;
        }
        Ok(())
    }

    /// Writes lines into the current file whatever its size (the rest of a block); returns
    /// how many lines they were.
    pub async fn append(&mut self, lines: &[u8]) -> std::io::Result<u64> {
        let count = self.append_uncounted(lines).await?;
        if let Some(current) = self.current.as_mut() {
            current.written.count += count;
        }
        Ok(count)
    }

    /// Writes a block's header line (a `Parameters` naming its Patient), which is no resource:
    /// a file's `count` is of resources only, as clients check it.
    pub async fn append_header(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.append_uncounted(line).await.map(|_| ())
    }

    async fn append_uncounted(&mut self, lines: &[u8]) -> std::io::Result<u64> {
        if self.current.is_none() {
            self.open_next().await?;
        }
        let current = self.current.as_mut().expect("opened above");
        current.sink.write(lines).await?;
        current.bytes += lines.len() as u64;
        Ok(lines.iter().filter(|b| **b == b'\n').count() as u64)
    }

    /// Flushes and syncs the last file; returns every file written.
    pub async fn finish(mut self) -> std::io::Result<Vec<Written>> {
        self.close_current().await?;
        Ok(self.done)
    }

    async fn open_next(&mut self) -> std::io::Result<()> {
        let name = format!("{}{}.ndjson", self.prefix, self.done.len() + 1);
        let sink = self.storage.create(&self.job, &name).await?;
        self.current = Some(Current {
            sink,
            written: Written { name, count: 0 },
            bytes: 0,
        });
        Ok(())
    }

    async fn close_current(&mut self) -> std::io::Result<()> {
        if let Some(current) = self.current.take() {
            current.sink.finish().await?;
            self.done.push(current.written);
        }
        Ok(())
    }
}

/// A task's result as stored: `{"files": [{"name", "count"}], "deleted": [...]}`.
pub fn result_document(files: &[Written], deleted: &[Written]) -> Value {
    let list = |files: &[Written]| {
        files
            .iter()
            .map(|f| json!({"name": f.name, "count": f.count}))
            .collect::<Vec<_>>()
    };
    json!({"files": list(files), "deleted": list(deleted)})
}

/// The output files of a stored task result.
pub fn result_files(result: Option<&Value>) -> Vec<Written> {
    listed(result, "files")
}

/// The `deleted` files (Bundles of deletions) of a stored task result.
pub fn result_deleted(result: Option<&Value>) -> Vec<Written> {
    listed(result, "deleted")
}

fn listed(result: Option<&Value>, key: &str) -> Vec<Written> {
    result
        .and_then(|r| r[key].as_array())
        .into_iter()
        .flatten()
        .filter_map(|f| {
            Some(Written {
                name: f["name"].as_str()?.to_string(),
                count: f["count"].as_u64()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn files_split_between_lines_at_the_limit() {
        let root = std::env::temp_dir().join(format!("fhirbox-output-{}", rand::random::<u32>()));
        let dir = root.join("job");
        tokio::fs::create_dir_all(&dir).await.expect("dir");
        let storage = Arc::new(ExportStorage::Local { dir: root.clone() });
        for stale in [
            "Patient-1-7.ndjson",
            "Patient-3-1.ndjson",
            "PatientX-1-1.ndjson",
        ] {
            tokio::fs::write(dir.join(stale), "stale")
                .await
                .expect("stale file");
        }
        let mut output = Output::create(&storage, "job", "Patient", 2, 10)
            .await
            .expect("create");
        assert!(
            !dir.join("Patient-1-7.ndjson").exists(),
            "an earlier run's file is gone"
        );
        assert!(
            dir.join("Patient-3-1.ndjson").exists(),
            "a later run's file is not ours"
        );
        assert!(
            dir.join("PatientX-1-1.ndjson").exists(),
            "another type's file stays"
        );
        // 4-byte lines: two fit in 10 bytes, the third starts a new file.
        assert_eq!(output.write(b"aaa\nbbb\nccc\n").await.expect("write"), 3);
        assert_eq!(
            output.write(b"a-very-long-line\nd\n").await.expect("write"),
            2
        );
        let files = output.finish().await.expect("finish");
        let names: Vec<(&str, u64)> = files.iter().map(|f| (f.name.as_str(), f.count)).collect();
        assert_eq!(
            names,
            [
                ("Patient-2-1.ndjson", 2),
                ("Patient-2-2.ndjson", 1),
                ("Patient-2-3.ndjson", 1),
                ("Patient-2-4.ndjson", 1)
            ]
        );
        let mut all = String::new();
        for f in &files {
            all.push_str(&std::fs::read_to_string(dir.join(&f.name)).expect("read"));
        }
        assert_eq!(all, "aaa\nbbb\nccc\na-very-long-line\nd\n");
        assert_eq!(result_files(Some(&result_document(&files, &[]))), files);
        assert_eq!(result_deleted(Some(&result_document(&[], &files))), files);
        std::fs::remove_dir_all(&root).expect("clean up");
    }
}
