//! [`Dedicated`]: a connection for work that may end half-way (a stream whose client goes
//! away, a transaction that fails), and the one place that decides whether a connection goes
//! back to the pool.
//!
//! A pooled connection handed back in the middle of a transaction, a COPY or a session setting
//! would carry that state to the next request, whoever sends it. So work that opens a
//! transaction, changes session settings or streams a result takes a `Dedicated` connection,
//! and says how it ended:
//!
//! - [`Dedicated::release`]: it ended cleanly and left nothing behind: back to the pool;
//! - [`Dedicated::close`]: it ended, but left session state (an open transaction, settings):
//!   the connection is closed;
//! - dropped without either (an error, or the request went away): a cancel request stops what
//!   the server may still be running for it, and the connection is closed. PostgreSQL rolls
//!   back whatever transaction it had open.
//!
//! Nothing else in fhirbox takes a connection out of the pool.

use std::ops::Deref;
use std::sync::Arc;

use tokio_postgres::CancelToken;

use super::socket::Connector;
use super::{Connection, Store, StoreError};

/// A connection whose end is decided by its user (see the module documentation).
pub struct Dedicated {
    /// `None` once released or closed.
    conn: Option<Connection>,
    cancel: CancelToken,
    /// How to reach the server with a cancel request.
    connector: Arc<Connector>,
}

impl Store {
    /// A connection from the pool that goes back only through [`Dedicated::release`].
    pub async fn dedicated(&self) -> Result<Dedicated, StoreError> {
        let conn = self.connection().await?;
        Ok(Dedicated {
            cancel: conn.cancel_token(),
            conn: Some(conn),
            connector: self.connector(),
        })
    }
}

impl Dedicated {
    /// The work ended cleanly, outside any transaction, with no session state: the
    /// connection goes back to the pool.
    pub fn release(mut self) {
        self.conn.take();
    }

    /// The work ended but left session state: the connection is closed, not reused.
    pub fn close(mut self) {
        if let Some(conn) = self.conn.take() {
            detach(conn);
        }
    }
}

impl Deref for Dedicated {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        // Present until `release`/`close`, which consume `self`.
        match &self.conn {
            Some(conn) => conn,
            None => unreachable!("a Dedicated connection is used only before its end"),
        }
    }
}

impl Drop for Dedicated {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        // Abandoned: stop what the server may still run for it (a COPY keeps going, and
        // filling temp files, until it is told), then close the connection.
        let (cancel, connector) = (self.cancel.clone(), self.connector.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = connector.cancel(cancel).await {
                    tracing::warn!(%error, "could not cancel an abandoned query");
                }
            });
        }
        detach(conn);
    }
}

/// Takes a connection out of the pool for good and closes it.
fn detach(conn: Connection) {
    drop(deadpool_postgres::Object::take(conn));
}

/// A transaction on a [`Dedicated`] connection. It ends with [`Tx::commit`] or
/// [`Tx::finish`]; dropped before (the request went away mid-statement), its connection is
/// cancelled and closed, and PostgreSQL rolls the transaction back.
pub struct Tx {
    conn: Dedicated,
}

impl Store {
    /// Begins a transaction.
    pub async fn begin(&self) -> Result<Tx, StoreError> {
        let conn = self.dedicated().await?;
        conn.batch_execute("BEGIN").await?;
        Ok(Tx { conn })
    }
}

impl Tx {
    /// Commits; the connection goes back to the pool.
    pub async fn commit(self) -> Result<(), StoreError> {
        self.conn.batch_execute("COMMIT").await?;
        self.conn.release();
        Ok(())
    }

    /// Commits if the work succeeded, else rolls back; gives the work's result back. (A
    /// failed commit is the work's error.)
    pub async fn finish<T, E: From<StoreError>>(self, result: Result<T, E>) -> Result<T, E> {
        match result {
            Ok(value) => {
                self.commit().await?;
                Ok(value)
            }
            Err(error) => {
                // A rollback that fails leaves the connection in an unknown state: dropping it
                // closes it.
                if self.conn.batch_execute("ROLLBACK").await.is_ok() {
                    self.conn.release();
                }
                Err(error)
            }
        }
    }
}

impl Deref for Tx {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.conn
    }
}
