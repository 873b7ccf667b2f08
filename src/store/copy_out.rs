//! Streaming query results out of the database, for every export: `COPY (...) TO STDOUT`
//! ([`copy_out`]) and row streams of a portal ([`OwnedStream`] over a `RowStream`).
//!
//! An [`OwnedStream`] owns its pooled connection for as long as it streams. Back-pressure is
//! end to end: tokio-postgres hands each batch of data to us through a channel of one slot, so
//! while we do not poll (the HTTP client reads slowly), its connection task stops reading the
//! socket and PostgreSQL waits on TCP. No part of the result is buffered beyond that.
//!
//! If the stream is dropped before the end (the client went away), tokio-postgres would keep
//! reading the rest of the result and throw it away, holding the backend busy. So the drop
//! sends a cancel request for the query and detaches the connection from the pool (it is
//! closed, not reused: it may still be mid-result). The pool then opens a fresh one when it
//! needs it. A stream that ends normally gives its connection back, unless it was opened
//! with [`OwnedStream::discard_after`] (its connection holds a transaction of its own).

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio_postgres::CancelToken;

use super::{Connection, Store, StoreError};

/// A result stream that owns its connection.
pub struct OwnedStream<S> {
    /// The connection the query runs on; `None` once given back or detached.
    conn: Option<Connection>,
    stream: Pin<Box<S>>,
    cancel: CancelToken,
    /// Whether the stream ended (completely or with an error): nothing to cancel then.
    done: bool,
    /// Close the connection at the end instead of giving it back to the pool.
    discard: bool,
}

/// A `COPY ... TO STDOUT` stream.
pub type CopyOut = OwnedStream<tokio_postgres::CopyOutStream>;

/// Starts `sql` (a `COPY (...) TO STDOUT` statement built by the store) on a pooled
/// connection. Errors the server reports before the first row (bad SQL, a missing table)
/// come back here, before anything is streamed.
pub async fn copy_out(store: &Store, sql: &str) -> Result<CopyOut, StoreError> {
    let conn = store.connection().await?;
    copy_out_on(conn, sql).await
}

/// [`copy_out`] on a given connection (one prepared with session settings).
pub async fn copy_out_on(conn: Connection, sql: &str) -> Result<CopyOut, StoreError> {
    match conn.copy_out(sql).await {
        Ok(stream) => Ok(OwnedStream::new(conn, stream)),
        Err(error) => {
            // It may have been inside a transaction that the error aborted: do not reuse it.
            drop(deadpool_postgres::Object::take(conn));
            Err(error.into())
        }
    }
}

impl<S> OwnedStream<S> {
    /// Wraps a stream running on `conn`.
    pub fn new(conn: Connection, stream: S) -> OwnedStream<S> {
        OwnedStream {
            cancel: conn.cancel_token(),
            conn: Some(conn),
            stream: Box::pin(stream),
            done: false,
            discard: false,
        }
    }

    /// Closes the connection at the end rather than giving it back (it holds an open
    /// transaction, or session state that must not leak to the next user).
    pub fn discard_after(mut self) -> OwnedStream<S> {
        self.discard = true;
        self
    }

    fn release(&mut self, reuse: bool) {
        if let Some(conn) = self.conn.take() {
            if !reuse || self.discard {
                drop(deadpool_postgres::Object::take(conn));
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
        if self.done {
            return Poll::Ready(None);
        }
        match self.stream.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(item))) => Poll::Ready(Some(Ok(item))),
            Poll::Ready(Some(Err(error))) => {
                self.done = true;
                // The connection's state is unknown after an error mid-result: do not reuse it.
                self.release(false);
                Poll::Ready(Some(Err(error.into())))
            }
            Poll::Ready(None) => {
                self.done = true;
                self.release(true);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S> Drop for OwnedStream<S> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let cancel = self.cancel.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = cancel.cancel_query(tokio_postgres::NoTls).await {
                    tracing::warn!(%error, "could not cancel an abandoned query");
                }
            });
        }
        self.release(false);
    }
}
