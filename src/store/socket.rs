//! How fhirbox reaches PostgreSQL: [`Connector`] opens the socket itself (a Unix socket or
//! TCP, from the connection settings), so that it can put a [`MessageGuard`] between the
//! server and the driver, and sends cancel requests the same way.
//!
//! **Why a guard.** The driver reads each protocol message whole before handing it on, so one
//! row of a result (a `CopyData` or `DataRow` message) is one allocation of its size: a
//! client's `select repeat('x', 500000000)` would make fhirbox hold 500 MB, per query. With a
//! limit, the guard looks at each message's length as it arrives; a message over the limit is
//! never read: the driver sees an ErrorResponse in its place (SQLSTATE 54000, "program limit
//! exceeded", saying which limit), then the end of the connection. The query fails like any
//! other failed query, and the connection is closed, never reused.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use deadpool_postgres::Connect;
use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::Host;
use tokio_postgres::{CancelToken, NoTls};

/// Opens connections (and cancel requests) to one server.
#[derive(Debug, Clone)]
pub struct Connector {
    config: tokio_postgres::Config,
    /// The largest message (a row) a connection may receive; `None`: no limit.
    max_message: Option<usize>,
}

impl Connector {
    pub fn new(config: tokio_postgres::Config, max_message: Option<usize>) -> Connector {
        Connector {
            config,
            max_message,
        }
    }

    /// A socket to the server: the first of its hosts that answers.
    async fn open(&self) -> io::Result<Socket> {
        let ports = self.config.get_ports();
        let mut last = io::Error::other("no host in the connection settings");
        for (index, host) in self.config.get_hosts().iter().enumerate() {
            let port = ports.get(index).or(ports.first()).copied().unwrap_or(5432);
            let opened = async {
                match host {
                    Host::Tcp(name) => {
                        let stream = TcpStream::connect((name.as_str(), port)).await?;
                        stream.set_nodelay(true)?;
                        Ok(Socket::Tcp(stream))
                    }
                    Host::Unix(dir) => {
                        let path = dir.join(format!(".s.PGSQL.{port}"));
                        Ok(Socket::Unix(UnixStream::connect(path).await?))
                    }
                }
            };
            let opened = match self.config.get_connect_timeout() {
                Some(limit) => tokio::time::timeout(*limit, opened)
                    .await
                    .unwrap_or_else(|_| Err(io::Error::other("connect timeout"))),
                None => opened.await,
            };
            match opened {
                Ok(socket) => return Ok(socket),
                Err(error) => last = error,
            }
        }
        Err(last)
    }

    /// A socket, or one that fails with the reason it could not be opened (so that the
    /// driver reports it as its own connection error).
    async fn open_or_failed(&self) -> Socket {
        self.open()
            .await
            .unwrap_or_else(|error| Socket::Failed(Some(error)))
    }

    /// Asks the server to cancel what `token`'s connection runs.
    pub async fn cancel(&self, token: CancelToken) -> Result<(), tokio_postgres::Error> {
        token
            .cancel_query_raw(self.open_or_failed().await, NoTls)
            .await
    }
}

impl Connect for Connector {
    fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let config = config.clone();
        Box::pin(async move {
            let guarded = MessageGuard::new(self.open_or_failed().await, self.max_message);
            let (client, connection) = config.connect_raw(guarded, NoTls).await?;
            let task = tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "a database connection ended with an error");
                }
            });
            Ok((client, task))
        })
    }
}

/// A Unix or TCP socket (or one that could not be opened, and says why when used).
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    Failed(Option<io::Error>),
}

impl Socket {
    fn failure(error: &mut Option<io::Error>) -> io::Error {
        error
            .take()
            .unwrap_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Failed(error) => Poll::Ready(Err(Socket::failure(error))),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Failed(error) => Poll::Ready(Err(Socket::failure(error))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
            Socket::Failed(error) => Poll::Ready(Err(Socket::failure(error))),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Failed(_) => Poll::Ready(Ok(())),
        }
    }
}

/// Passes the server's messages through, but none longer than `max` (see the module docs).
/// The server's bytes are read straight into the driver's buffer and checked there; a
/// message's 5-byte header cut by a read is held back until it is whole and checked.
pub struct MessageGuard<S> {
    inner: S,
    max: Option<usize>,
    /// The header of the message in progress, until it is whole.
    header: Vec<u8>,
    /// Body bytes of the current message still to pass.
    remaining: usize,
    /// Checked bytes waiting for the driver.
    out: BytesMut,
    /// A message was over the limit: after `out`, the connection ends.
    refused: bool,
}

impl<S> MessageGuard<S> {
    pub fn new(inner: S, max: Option<usize>) -> MessageGuard<S> {
        MessageGuard {
            inner,
            max,
            header: Vec::with_capacity(5),
            remaining: 0,
            out: BytesMut::new(),
            refused: false,
        }
    }

    /// Moves checked bytes of `data` to `out`; on a message over the limit, puts the error in
    /// its place and stops.
    fn admit(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.refused {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.out.put_slice(&data[..n]);
                self.remaining -= n;
                data = &data[n..];
                continue;
            }
            self.header.push(data[0]);
            data = &data[1..];
            if self.header.len() < 5 {
                continue;
            }
            let length = u32::from_be_bytes([
                self.header[1],
                self.header[2],
                self.header[3],
                self.header[4],
            ]) as usize;
            let body = length.saturating_sub(4);
            match self.max {
                Some(max) if body > max => {
                    self.refused = true;
                    self.out.put_slice(&refusal(max));
                }
                _ => {
                    self.out.put_slice(&self.header);
                    self.remaining = body;
                }
            }
            self.header.clear();
        }
    }
}

/// An ErrorResponse saying the limit was passed, then ReadyForQuery (failed transaction).
fn refusal(max: usize) -> Vec<u8> {
    let message = format!(
        "a row of the result is larger than the limit of {max} bytes (--sql-max-row-bytes); \
         select fewer or smaller columns"
    );
    let mut fields = Vec::new();
    for (code, value) in [
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', "54000"),
        (b'M', message.as_str()),
    ] {
        fields.push(code);
        fields.extend_from_slice(value.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut out = Vec::with_capacity(fields.len() + 11);
    out.push(b'E');
    out.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(&fields);
    out.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'E']);
    out
}

impl<S> MessageGuard<S> {
    /// Checks the bytes the driver just received in place, `data` being what follows
    /// everything checked before. Returns how many of them may pass now: the rest is a header
    /// held back (incomplete) or replaced by the refusal.
    fn check_in_place(&mut self, data: &[u8]) -> usize {
        let mut at = 0;
        while at < data.len() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len() - at);
                self.remaining -= n;
                at += n;
                continue;
            }
            if data.len() - at < 5 {
                self.header.extend_from_slice(&data[at..]);
                return at;
            }
            let length =
                u32::from_be_bytes([data[at + 1], data[at + 2], data[at + 3], data[at + 4]]);
            let body = (length as usize).saturating_sub(4);
            if self.max.is_some_and(|max| body > max) {
                self.refused = true;
                self.out.put_slice(&refusal(self.max.unwrap_or(0)));
                return at;
            }
            self.remaining = body;
            at += 5;
        }
        at
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for MessageGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.max.is_none() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.refused {
                // The end of the connection: what the server still sends is never read.
                return Poll::Ready(Ok(()));
            }
            if !this.header.is_empty() {
                // A header cut by the last read: complete it through the slow path, which
                // holds it until it is whole (rare: a read boundary inside 5 bytes).
                let mut chunk = [0u8; 64];
                let mut read = ReadBuf::new(&mut chunk);
                match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(Ok(())),
                    Poll::Ready(Ok(())) => {
                        let filled = read.filled().to_vec();
                        this.admit(&filled);
                        continue;
                    }
                    other => return other,
                }
            }
            // The usual path: the server's bytes go straight into the driver's buffer and are
            // checked where they are.
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            let after = buf.filled().len();
            if after == before {
                return Poll::Ready(Ok(()));
            }
            let passed = this.check_in_place(&buf.filled()[before..after]);
            buf.set_filled(before + passed);
            if passed > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for MessageGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Gives its bytes `chunk` at a time.
    struct Chunked {
        data: Vec<u8>,
        at: usize,
        chunk: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let n = this
                .chunk
                .min(this.data.len() - this.at)
                .min(buf.remaining());
            buf.put_slice(&this.data[this.at..this.at + n]);
            this.at += n;
            Poll::Ready(Ok(()))
        }
    }

    async fn through_guard(data: &[u8], chunk: usize, max: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let source = Chunked {
            data: data.to_vec(),
            at: 0,
            chunk,
        };
        let mut out = Vec::new();
        MessageGuard::new(source, Some(max))
            .read_to_end(&mut out)
            .await
            .expect("read");
        out
    }

    #[tokio::test]
    async fn reads_pass_checked_messages_and_refuse_the_first_too_large() {
        let small: Vec<u8> = (0..20)
            .flat_map(|i| message(b'd', &vec![b'a' + i; i as usize * 3]))
            .collect();
        let mut stream = small.clone();
        stream.extend(message(b'd', &[b'x'; 100]));
        stream.extend(message(b'd', b"never seen"));
        for chunk in [1, 2, 3, 5, 7, 64, 100_000] {
            assert_eq!(
                through_guard(&small, chunk, 1000).await,
                small,
                "chunks of {chunk}"
            );
            let out = through_guard(&stream, chunk, 80).await;
            assert_eq!(&out[..small.len()], &small[..], "chunks of {chunk}");
            assert_eq!(&out[small.len()..], &refusal(80)[..], "chunks of {chunk}");
        }
    }

    #[test]
    fn messages_pass_until_one_is_too_large_whatever_the_chunks() {
        let mut stream = message(b'd', b"small row");
        stream.extend(message(b'd', &[b'x'; 100]));
        stream.extend(message(b'd', b"never seen"));
        for chunk in [1, 2, 3, 7, 1000] {
            let mut guard = MessageGuard::new((), Some(50));
            for piece in stream.chunks(chunk) {
                guard.admit(piece);
            }
            let out = guard.out.to_vec();
            let first = message(b'd', b"small row");
            assert_eq!(&out[..first.len()], &first[..], "chunks of {chunk}");
            assert_eq!(out[first.len()], b'E', "then the refusal");
            assert!(guard.refused);
            assert!(out.ends_with(&[b'Z', 0, 0, 0, 5, b'E']));
            assert!(!out.windows(10).any(|w| w == b"never seen"));
        }
    }
}
