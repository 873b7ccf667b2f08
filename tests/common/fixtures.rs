//! A local HTTP server for `$load`/`$import` sources, started by the test itself. Each path
//! serves one [`Fixture`]: bytes, an error status, a download that breaks off, a slow stream
//! or a redirect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

#[derive(Clone)]
pub enum Fixture {
    Bytes(Vec<u8>),
    Status(u16),
    /// Sends the first `cut` bytes, then breaks the connection.
    BrokenOff {
        bytes: Vec<u8>,
        cut: usize,
    },
    /// Sends `chunk` bytes every `every`.
    Slow {
        bytes: Vec<u8>,
        chunk: usize,
        every: Duration,
    },
    /// Redirects (302) to this URL.
    Redirect(String),
    /// Sends `chunk` again and again, forever, counting the bytes it sent in `sent`.
    Endless {
        chunk: Bytes,
        sent: Arc<AtomicU64>,
    },
    /// Answers 200 and its headers, then sends nothing, ever.
    Stall,
}

pub struct FixtureServer {
    pub base: String,
}

impl FixtureServer {
    pub async fn start(files: Vec<(&str, Fixture)>) -> FixtureServer {
        let files: Arc<HashMap<String, Fixture>> = Arc::new(
            files
                .into_iter()
                .map(|(path, fixture)| (path.to_string(), fixture))
                .collect(),
        );
        let app = axum::Router::new().fallback(move |request: Request| {
            let files = files.clone();
            async move { serve(files.get(request.uri().path()).cloned()) }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        FixtureServer { base }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

fn serve(fixture: Option<Fixture>) -> Response {
    match fixture {
        None => StatusCode::NOT_FOUND.into_response(),
        Some(Fixture::Bytes(bytes)) => bytes.into_response(),
        Some(Fixture::Status(code)) => StatusCode::from_u16(code)
            .unwrap_or(StatusCode::IM_A_TEAPOT)
            .into_response(),
        Some(Fixture::Redirect(to)) => {
            (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
        }
        Some(Fixture::BrokenOff { bytes, cut }) => {
            let first = Bytes::from(bytes[..cut].to_vec());
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(first),
                Err(std::io::Error::other("the fixture breaks off here")),
            ];
            Body::from_stream(futures_util::stream::iter(chunks)).into_response()
        }
        Some(Fixture::Endless { chunk, sent }) => {
            let stream = futures_util::stream::repeat_with(move || {
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                Ok::<_, std::io::Error>(chunk.clone())
            });
            Body::from_stream(stream).into_response()
        }
        Some(Fixture::Stall) => {
            Body::from_stream(futures_util::stream::pending::<Result<Bytes, std::io::Error>>())
                .into_response()
        }
        Some(Fixture::Slow {
            bytes,
            chunk,
            every,
        }) => {
            let length = bytes.len();
            let chunks: Vec<Bytes> = bytes.chunks(chunk).map(Bytes::copy_from_slice).collect();
            let stream =
                futures_util::stream::unfold(chunks.into_iter(), move |mut chunks| async move {
                    let next = chunks.next()?;
                    tokio::time::sleep(every).await;
                    Some((Ok::<_, std::io::Error>(next), chunks))
                });
            // With its length, as a file server would send it (clients show progress by it).
            (
                [(header::CONTENT_LENGTH, length.to_string())],
                Body::from_stream(stream),
            )
                .into_response()
        }
    }
}

/// gzip of `bytes` (one member).
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}
