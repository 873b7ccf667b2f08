//! One log line per request, written when its answer has been sent (or has failed, or its
//! client went away): method, path (never the query string, which may hold secrets), status,
//! bytes sent, milliseconds, subject, and for a server error its cause. A 5xx is logged at
//! ERROR, a body that fails after its first byte at WARN, everything else at INFO: each
//! failure once, with the request it belongs to. The same numbers feed the metrics
//! ([`crate::metrics`]).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::error::Cause;

/// What the inner layers tell the log about a request, in the response's extensions.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `root`, `Client/<id>`.
    pub subject: String,
    /// The route template (`/{type}/$dump`), for metrics without unbounded labels.
    pub route: String,
}

/// The middleware.
pub async fn log_requests(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let seen = response.extensions().get::<Seen>().cloned();
    let line = Line {
        method,
        path,
        status: response.status(),
        subject: seen.as_ref().map(|s| s.subject.clone()),
        route: seen.map(|s| s.route),
        cause: response.extensions().get::<Cause>().map(|c| c.0.clone()),
        started,
    };
    response.map(|body| {
        Body::new(Logged {
            body,
            bytes: 0,
            line: Some(line),
        })
    })
}

/// The request's line, written once.
struct Line {
    method: Method,
    path: String,
    status: StatusCode,
    subject: Option<String>,
    route: Option<String>,
    cause: Option<String>,
    started: Instant,
}

/// How the answer ended.
enum End<'e> {
    Sent,
    Failed(&'e dyn std::fmt::Display),
    Abandoned,
}

impl Line {
    fn write(self, bytes: u64, end: End<'_>) {
        let elapsed = self.started.elapsed();
        let ms = elapsed.as_millis() as u64;
        let subject = self.subject.as_deref().unwrap_or("-");
        let (method, path, status) = (
            self.method.as_str(),
            self.path.as_str(),
            self.status.as_u16(),
        );
        crate::metrics::request(
            method,
            self.route.as_deref().unwrap_or("unrouted"),
            status,
            bytes,
            elapsed,
        );
        match end {
            End::Failed(error) => tracing::warn!(
                method, path, status, bytes, ms, subject,
                error = %crate::bulk::report::log_safe(&error.to_string()),
                "request failed after its first byte (the client sees a broken transfer)"
            ),
            _ if self.status.is_server_error() => tracing::error!(
                method,
                path,
                status,
                bytes,
                ms,
                subject,
                cause = crate::bulk::report::log_safe(self.cause.as_deref().unwrap_or("")),
                "request failed"
            ),
            End::Abandoned => tracing::info!(
                method,
                path,
                status,
                bytes,
                ms,
                subject,
                "request ended: the client went away"
            ),
            End::Sent => tracing::info!(method, path, status, bytes, ms, subject, "request"),
        }
    }
}

/// A response body that counts what it sends and writes the request's line at its end.
struct Logged {
    body: Body,
    bytes: u64,
    line: Option<Line>,
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(error))) => {
                if let Some(line) = self.line.take() {
                    line.write(self.bytes, End::Failed(error));
                }
            }
            Poll::Ready(None) => {
                if let Some(line) = self.line.take() {
                    line.write(self.bytes, End::Sent);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(line) = self.line.take() {
            // hyper may drop a finished body without polling its end (a known length): that
            // is a sent answer, not an abandoned one.
            let end = match self.body.is_end_stream() {
                true => End::Sent,
                false => End::Abandoned,
            };
            line.write(self.bytes, end);
        }
    }
}
