//! How much one output may hold: a view's rows (a run, each view of an export, a
//! materialization) and an export job's, in rows and bytes, each a flag. Past a bound the
//! stream ends with an error, or the job fails, with a message that names the flag.

use futures_util::StreamExt;

use super::stream::ByteStream;

/// The bounds of one output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputBounds {
    pub rows: u64,
    pub bytes: u64,
    /// The flags that set them, for messages (`--view-max-rows`, `--view-max-bytes`).
    pub flags: (&'static str, &'static str),
}

impl OutputBounds {
    /// A view's output (`--view-max-rows`, `--view-max-bytes`): 100 million rows, 10 GiB.
    pub fn views(rows: u64, bytes: u64) -> OutputBounds {
        OutputBounds {
            rows,
            bytes,
            flags: ("--view-max-rows", "--view-max-bytes"),
        }
    }

    /// An export job's output (`--export-max-rows`, `--export-max-bytes`).
    pub fn exports(rows: u64, bytes: u64) -> OutputBounds {
        OutputBounds {
            rows,
            bytes,
            flags: ("--export-max-rows", "--export-max-bytes"),
        }
    }

    /// Why `rows` and `bytes` so far are too many, if they are.
    pub fn exceeded(&self, rows: u64, bytes: u64) -> Option<String> {
        if rows > self.rows {
            return Some(format!(
                "the output passed {} rows, the most allowed ({})",
                self.rows, self.flags.0
            ));
        }
        if bytes > self.bytes {
            return Some(format!(
                "the output passed {} bytes, the most allowed ({})",
                self.bytes, self.flags.1
            ));
        }
        None
    }
}

/// `body` (lines), ended with an error once it passes `bounds`.
pub fn bounded(body: ByteStream, bounds: OutputBounds) -> ByteStream {
    let (mut rows, mut bytes, mut over) = (0u64, 0u64, false);
    Box::pin(body.map(move |chunk| {
        if over {
            return Err(std::io::Error::other("output bound exceeded"));
        }
        let chunk = chunk?;
        rows += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        bytes += chunk.len() as u64;
        if let Some(why) = bounds.exceeded(rows, bytes) {
            over = true;
            tracing::warn!(reason = %why, "an output was cut off");
            return Err(std::io::Error::other(why));
        }
        Ok(chunk)
    }))
}

impl Default for OutputBounds {
    fn default() -> OutputBounds {
        OutputBounds::views(100_000_000, 10 << 30)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_flag() {
        let bounds = OutputBounds::exports(10, 100);
        assert_eq!(bounds.exceeded(10, 100), None);
        assert!(bounds
            .exceeded(11, 0)
            .is_some_and(|m| m.contains("--export-max-rows")));
        assert!(bounds
            .exceeded(0, 101)
            .is_some_and(|m| m.contains("--export-max-bytes")));
    }
}
