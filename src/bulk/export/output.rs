//! An export task's output files: `<Type>-<n>.ndjson` in the job's directory, a new file
//! whenever the current one reached the size limit (files split between lines only).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokio::fs::File;
use tokio::io::{AsyncWriteExt, BufWriter};

/// One written file: its name and how many resources it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub name: String,
    pub count: u64,
}

/// Writes one type's lines into size-limited files.
pub struct Output {
    dir: PathBuf,
    type_name: String,
    limit: u64,
    done: Vec<Written>,
    current: Option<Current>,
}

struct Current {
    file: BufWriter<File>,
    written: Written,
    bytes: u64,
}

impl Output {
    /// Starts a type's output in `dir`, removing what an earlier attempt of the same task left.
    pub async fn create(dir: &Path, type_name: &str, limit: u64) -> std::io::Result<Output> {
        tokio::fs::create_dir_all(dir).await?;
        let prefix = format!("{type_name}-");
        let mut entries = tokio::fs::read_dir(dir).await?;
        while let Some(entry) = entries.next_entry().await? {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".ndjson") {
                tokio::fs::remove_file(entry.path()).await?;
            }
        }
        Ok(Output {
            dir: dir.to_path_buf(),
            type_name: type_name.to_string(),
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
            current.file.write_all(part).await?;
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

    /// Flushes and syncs the last file; returns every file written.
    pub async fn finish(mut self) -> std::io::Result<Vec<Written>> {
        self.close_current().await?;
        Ok(self.done)
    }

    async fn open_next(&mut self) -> std::io::Result<()> {
        let name = format!("{}-{}.ndjson", self.type_name, self.done.len() + 1);
        let file = File::create(self.dir.join(&name)).await?;
        self.current = Some(Current {
            file: BufWriter::with_capacity(1 << 20, file),
            written: Written { name, count: 0 },
            bytes: 0,
        });
        Ok(())
    }

    async fn close_current(&mut self) -> std::io::Result<()> {
        if let Some(mut current) = self.current.take() {
            current.file.flush().await?;
            current.file.get_mut().sync_all().await?;
            self.done.push(current.written);
        }
        Ok(())
    }
}

/// A task's result as stored: `{"files": [{"name", "count"}]}`.
pub fn result_document(files: &[Written]) -> Value {
    json!({
        "files": files
            .iter()
            .map(|f| json!({"name": f.name, "count": f.count}))
            .collect::<Vec<_>>()
    })
}

/// The files of a stored task result.
pub fn result_files(result: Option<&Value>) -> Vec<Written> {
    result
        .and_then(|r| r["files"].as_array())
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
        let dir = std::env::temp_dir().join(format!("fhirbox-output-{}", rand::random::<u32>()));
        tokio::fs::create_dir_all(&dir).await.expect("dir");
        tokio::fs::write(dir.join("Patient-7.ndjson"), "stale")
            .await
            .expect("stale file");
        let mut output = Output::create(&dir, "Patient", 10).await.expect("create");
        assert!(
            !dir.join("Patient-7.ndjson").exists(),
            "an earlier attempt's file is gone"
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
                ("Patient-1.ndjson", 2),
                ("Patient-2.ndjson", 1),
                ("Patient-3.ndjson", 1),
                ("Patient-4.ndjson", 1)
            ]
        );
        let mut all = String::new();
        for f in &files {
            all.push_str(&std::fs::read_to_string(dir.join(&f.name)).expect("read"));
        }
        assert_eq!(all, "aaa\nbbb\nccc\na-very-long-line\nd\n");
        assert_eq!(result_files(Some(&result_document(&files))), files);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
