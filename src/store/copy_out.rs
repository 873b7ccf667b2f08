//! Streaming query results out of the database, for every export: `COPY (...) TO STDOUT`
//! ([`copy_out`]) and row streams of a portal ([`OwnedStream`] over a `RowStream`).
//!
//! An [`OwnedStream`] owns its [`Dedicated`] connection for as long as it streams.
//! Back-pressure is end to end: tokio-postgres hands each batch of data to us through a
//! channel of one slot, so while we do not poll (the HTTP client reads slowly), its connection
//! task stops reading the socket and PostgreSQL waits on TCP. No part of the result is
//! buffered beyond that.
//!
//! A stream dropped before its end (the client went away) drops its connection unfinished:
//! the query is cancelled and the connection closed (see [`super::conn`]). A stream that ends
//! with an error closes its connection (its state is unknown). One that ends normally gives
//! its connection back, unless it was opened with [`OwnedStream::close_after`] (its
//! connection holds a transaction or settings of its own).

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;

use super::conn::Dedicated;
use super::{Store, StoreError};

/// A result stream that owns its connection.
pub struct OwnedStream<S> {
    /// The connection the query runs on; `None` once the stream ended.
    conn: Option<Dedicated>,
    stream: Pin<Box<S>>,
    /// Close the connection at the end instead of giving it back to the pool.
    close: bool,
}

/// A `COPY ... TO STDOUT` stream.
pub type CopyOut = OwnedStream<tokio_postgres::CopyOutStream>;

/// Starts `sql` (a `COPY (...) TO STDOUT` statement built by the store) on a connection of its
/// own. Errors the server reports before the first row (bad SQL, a missing table) come back
/// here, before anything is streamed.
pub async fn copy_out(store: &Store, sql: &str) -> Result<CopyOut, StoreError> {
    copy_out_on(store.dedicated().await?, sql).await
}

/// [`copy_out`] on a given connection (one prepared with a transaction or settings).
pub async fn copy_out_on(conn: Dedicated, sql: &str) -> Result<CopyOut, StoreError> {
    match conn.copy_out(sql).await {
        Ok(stream) => Ok(OwnedStream::new(conn, stream)),
        Err(error) => {
            // It may have been inside a transaction that the error aborted: do not reuse it.
            conn.close();
            Err(error.into())
        }
    }
}

impl<S> OwnedStream<S> {
    /// Wraps a stream running on `conn`.
    pub fn new(conn: Dedicated, stream: S) -> OwnedStream<S> {
        OwnedStream {
            conn: Some(conn),
            stream: Box::pin(stream),
            close: false,
        }
    }

    /// Closes the connection at the end rather than giving it back (it holds an open
    /// transaction, or session state that must not leak to the next user).
    pub fn close_after(mut self) -> OwnedStream<S> {
        self.close = true;
        self
    }

    /// The stream ended: decide the connection's fate.
    fn end(&mut self, clean: bool) {
        if let Some(conn) = self.conn.take() {
            if clean && !self.close {
                conn.release();
            } else {
                conn.close();
            }
        }
    }
}

impl<S, T> Stream for OwnedStream<S>
where
    S: Stream<Item = Result<T, tokio_postgres::Error>>,
{
    type Item = Result<T, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.conn.is_none() {
            return Poll::Ready(None);
        }
        match self.stream.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(item))) => Poll::Ready(Some(Ok(item))),
            Poll::Ready(Some(Err(error))) => {
                self.end(false);
                Poll::Ready(Some(Err(error.into())))
            }
            Poll::Ready(None) => {
                self.end(true);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
