//! One log line per bulk operation, when it ends: what (operation, types), who, rows, MB,
//! seconds, MB/s, and how it ended. An operation that ends without saying how (its client
//! went away, its task was taken over) is logged as abandoned. The rows and bytes also feed
//! the metrics as they go ([`crate::metrics`]).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;

use super::stream::ByteStream;

/// How a bulk operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    Failed,
    Abandoned,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Finished => "finished",
            Outcome::Failed => "failed",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// The running account of one bulk operation. Cheap to clone; the line is written once.
#[derive(Clone)]
pub struct Report {
    inner: Arc<Inner>,
}

struct Inner {
    /// `$dump`, `$load`, `$export`, ...
    operation: &'static str,
    /// The types, or a short description.
    what: String,
    subject: String,
    /// `in` (loads) or `out` (exports), for the metrics.
    direction: &'static str,
    started: Instant,
    rows: AtomicU64,
    bytes: AtomicU64,
    ended: AtomicBool,
}

impl Report {
    /// Starts the account of an operation that reads (`direction: "out"`) or writes (`"in"`)
    /// the database.
    pub fn start(
        operation: &'static str,
        what: impl Into<String>,
        subject: impl Into<String>,
        direction: &'static str,
    ) -> Report {
        crate::metrics::bulk_started(operation);
        Report {
            inner: Arc::new(Inner {
                operation,
                what: what.into(),
                subject: subject.into(),
                direction,
                started: Instant::now(),
                rows: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                ended: AtomicBool::new(false),
            }),
        }
    }

    pub fn rows(&self, rows: u64) {
        self.inner.rows.fetch_add(rows, Ordering::Relaxed);
        crate::metrics::bulk_rows(self.inner.operation, self.inner.direction, rows);
    }

    pub fn bytes(&self, bytes: u64) {
        self.inner.bytes.fetch_add(bytes, Ordering::Relaxed);
        crate::metrics::bulk_bytes(self.inner.operation, self.inner.direction, bytes);
    }

    /// Ends the operation and writes its line (once; later calls do nothing).
    pub fn finish(&self, outcome: Outcome, detail: Option<&str>) {
        self.inner.end(outcome, detail);
    }
}

impl Inner {
    fn end(&self, outcome: Outcome, detail: Option<&str>) {
        if self.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        crate::metrics::bulk_ended(self.operation);
        let seconds = self.started.elapsed().as_secs_f64();
        let rows = self.rows.load(Ordering::Relaxed);
        let mb = self.bytes.load(Ordering::Relaxed) as f64 / 1_000_000.0;
        let mb_per_s = if seconds > 0.0 { mb / seconds } else { 0.0 };
        let (operation, what, subject) =
            (self.operation, self.what.as_str(), self.subject.as_str());
        let (mb, seconds, mb_per_s) = (round(mb), round(seconds), round(mb_per_s));
        let outcome = outcome.name();
        match detail {
            Some(detail) if outcome == "failed" => tracing::warn!(
                operation,
                what,
                subject,
                rows,
                mb,
                seconds,
                mb_per_s,
                outcome,
                error = log_safe(detail),
                "bulk operation"
            ),
            _ => tracing::info!(
                operation,
                what,
                subject,
                rows,
                mb,
                seconds,
                mb_per_s,
                outcome,
                "bulk operation"
            ),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.end(Outcome::Abandoned, None);
    }
}

/// An error message as the log may keep it: what went wrong and where, without the values
/// in it. PostgreSQL quotes the values and names in its messages (`invalid input syntax for
/// type integer: "..."`), and so does fhirbox: every quoted part is left out, so neither a
/// client's literal nor a bound parameter reaches the log.
pub fn log_safe(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quote: Option<char> = None;
    for c in message.chars() {
        match quote {
            Some(open) if c == open => {
                out.push('…');
                out.push(c);
                quote = None;
            }
            Some(_) => {}
            None if c == '"' || c == '\'' => {
                out.push(c);
                quote = Some(c);
            }
            None => out.push(c),
        }
    }
    if quote.is_some() {
        out.push('…');
    }
    out
}

fn round(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// `body`, counted into `report` as it is sent; its end (or failure) ends the report.
pub fn reporting(body: ByteStream, report: Report) -> ByteStream {
    let ended = report.clone();
    let counted = body.map(move |chunk| {
        match &chunk {
            Ok(bytes) => report.bytes(bytes.len() as u64),
            Err(error) => report.finish(Outcome::Failed, Some(&error.to_string())),
        }
        chunk
    });
    let end = futures_util::stream::once(async move {
        ended.finish(Outcome::Finished, None);
        Ok::<_, io::Error>(bytes::Bytes::new())
    })
    .filter(|_| std::future::ready(false));
    Box::pin(counted.chain(end))
}

#[cfg(test)]
mod tests {
    use super::log_safe;

    #[test]
    fn quoted_values_stay_out_of_the_log() {
        assert_eq!(
            log_safe(
                r#"PostgreSQL: invalid input syntax for type integer: "PARAM-SECRET-1" (at character 8) [SQLSTATE 22P02]"#
            ),
            r#"PostgreSQL: invalid input syntax for type integer: "…" (at character 8) [SQLSTATE 22P02]"#
        );
        assert_eq!(
            log_safe("resourceType 'Foo' is unknown"),
            "resourceType '…' is unknown"
        );
        assert_eq!(log_safe("an unclosed \"secret"), "an unclosed \"…");
    }
}
