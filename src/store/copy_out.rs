//! Streaming `COPY (...) TO STDOUT` out of the database, for every export.
//!
//! A [`CopyOut`] owns its pooled connection for as long as it streams. Back-pressure is end to
//! end: tokio-postgres hands each batch of COPY data to us through a channel of one slot, so
//! while we do not poll (the HTTP client reads slowly), its connection task stops reading the
//! socket and PostgreSQL waits on TCP. No part of the result is buffered beyond that.
//!
//! If a `CopyOut` is dropped before the end (the client went away), tokio-postgres would keep
//! reading the rest of the COPY and throw it away, holding the backend busy. So the drop sends
//! a cancel request for the query and detaches the connection from the pool (it is closed, not
//! reused: it may still be mid-COPY). The pool then opens a fresh one when it needs it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use tokio_postgres::CancelToken;

use super::{Connection, Store, StoreError};

pub struct CopyOut {
    /// The connection the COPY runs on; `None` once given back or detached.
    conn: Option<Connection>,
    stream: Pin<Box<tokio_postgres::CopyOutStream>>,
    cancel: CancelToken,
    /// Whether the stream ended (completely or with an error): nothing to cancel then.
    done: bool,
}

/// Starts `sql` (a `COPY (...) TO STDOUT` statement built by the store) on a pooled
/// connection. Errors the server reports before the first row (bad SQL, a missing table)
/// come back here, before anything is streamed.
pub async fn copy_out(store: &Store, sql: &str) -> Result<CopyOut, StoreError> {
    let conn = store.connection().await?;
    copy_out_on(conn, sql).await
}

/// [`copy_out`] on a given connection (one prepared with session settings).
pub async fn copy_out_on(conn: Connection, sql: &str) -> Result<CopyOut, StoreError> {
    let cancel = conn.cancel_token();
    let stream = conn.copy_out(sql).await?;
    Ok(CopyOut {
        conn: Some(conn),
        stream: Box::pin(stream),
        cancel,
        done: false,
    })
}

impl Stream for CopyOut {
    type Item = Result<Bytes, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.stream.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => Poll::Ready(Some(Ok(chunk))),
            Poll::Ready(Some(Err(error))) => {
                self.done = true;
                // The connection's state is unknown after an error mid-COPY: do not reuse it.
                if let Some(conn) = self.conn.take() {
                    drop(deadpool_postgres::Object::take(conn));
                }
                Poll::Ready(Some(Err(error.into())))
            }
            Poll::Ready(None) => {
                self.done = true;
                // Complete: the connection goes back to the pool.
                self.conn.take();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for CopyOut {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let cancel = self.cancel.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = cancel.cancel_query(tokio_postgres::NoTls).await {
                    tracing::warn!(%error, "could not cancel an abandoned COPY");
                }
            });
        }
        if let Some(conn) = self.conn.take() {
            drop(deadpool_postgres::Object::take(conn));
        }
    }
}
