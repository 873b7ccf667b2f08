//! The accept loop: one task per connection, HTTP/1.1 and HTTP/2, with the time limits a
//! server exposed to strangers needs, and a graceful shutdown.
//!
//! - A connection must send a request's headers within `header_timeout` of starting to read
//!   them, and that includes the wait for the next request on an idle keep-alive connection:
//!   a client that connects and says nothing, or trickles its headers (slowloris), or parks
//!   an idle connection, is disconnected.
//! - Over TLS, the handshake and then the first request's first bytes must come within it
//!   too (a client that completes its handshake and says nothing is dropped).
//! - HTTP/2 connections are pinged every `header_timeout` and closed when a ping goes
//!   unanswered; any connection with no request in flight for `header_timeout` is asked to
//!   close (HTTP/2: `GOAWAY`), so idle connections do not hold descriptors for ever.
//! - At most `max_connections` connections, `max_per_address` from one address
//!   ([`super::admission`]); more are closed at once.
//! - On shutdown, the listener closes, connections finish the requests they are serving and
//!   close.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::admission::Admission;

/// Limits of connections (`serve --http-header-timeout`, `--max-connections*`), and TLS
/// (`serve --tls-*`).
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// How long a connection may take to send a request's headers (or stay idle between
    /// requests, HTTP/2 included); a TLS handshake too, and the first request after it.
    pub header_timeout: Duration,
    /// Serve HTTPS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Connections held at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Connections held at once from one client address (IPv6: one /64).
    pub max_per_address: usize,
}

impl Default for ConnectionSettings {
    fn default() -> ConnectionSettings {
        ConnectionSettings {
            header_timeout: Duration::from_secs(30),
            tls: None,
            max_connections: 4096,
            max_per_address: 256,
        }
    }
}

/// Whether a request came over TLS (in every request's extensions): links and the SMART
/// endpoints' URLs use `https` then.
#[derive(Debug, Clone, Copy)]
pub struct Secure(pub bool);

/// A TLS configuration from PEM files: the certificate chain and its private key. TLS 1.2
/// and 1.3 only (rustls has nothing older), HTTP/2 and HTTP/1.1 offered by ALPN.
pub fn tls_config(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", cert_file.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("{}: {e}", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{} and {}: {e}", cert_file.display(), key_file.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `app` on `listener` until `shutdown` completes, then lets the connections finish.
pub async fn serve_app(
    listener: tokio::net::TcpListener,
    app: Router,
    settings: ConnectionSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.header_timeout)
        .keep_alive_timeout(settings.header_timeout);
    let admission = Admission::new(settings.max_connections, settings.max_per_address);
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: wait a moment, do not spin.
                    tracing::warn!(%error, "could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(ticket) = admission.admit(remote.ip()) else {
            // Over the bound: closed at once, nothing read, nothing spent.
            metrics_refused();
            drop(stream);
            continue;
        };
        let connection = Connection {
            app: app.clone(),
            builder: builder.clone(),
            remote,
            timeout: settings.header_timeout,
            tls: settings.tls.clone().map(tokio_rustls::TlsAcceptor::from),
            stop: stop.clone(),
        };
        connections.spawn(async move {
            let _ticket = ticket;
            connection.serve(stream).await;
        });
    }
    drop(listener);
    stop.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}

fn metrics_refused() {
    tracing::debug!("a connection over the connection limits was closed");
}

/// One accepted connection and what serving it needs.
struct Connection {
    app: Router,
    builder: Builder<TokioExecutor>,
    remote: SocketAddr,
    timeout: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
}

impl Connection {
    async fn serve(self, stream: tokio::net::TcpStream) {
        // hyper's timers start once it knows the protocol, from the first bytes: a client that
        // sends none (or never finishes its TLS handshake) is dropped here.
        if !speaks(&stream, self.timeout).await {
            return;
        }
        let activity = Activity::new();
        let secure = Secure(self.tls.is_some());
        let service = TowerToHyperService::new(with_remote(
            self.app.clone(),
            self.remote,
            secure,
            activity.clone(),
        ));
        let served = match &self.tls {
            None => {
                let connection = self
                    .builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                self.drive(connection, &activity).await
            }
            Some(acceptor) => {
                let Ok(Ok(stream)) =
                    tokio::time::timeout(self.timeout, acceptor.accept(stream)).await
                else {
                    return;
                };
                // The protocol is ALPN's; the first request must still come within the
                // timeout, as on plain HTTP (hyper's timers start with it): a client that
                // completes its handshake and then says nothing is dropped here.
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                let mut stream = tokio::io::BufReader::new(stream);
                match tokio::time::timeout(self.timeout, stream.fill_buf()).await {
                    Ok(Ok(first)) if !first.is_empty() => {}
                    _ => return,
                }
                let builder = match h2 {
                    true => self.builder.clone().http2_only(),
                    false => self.builder.clone().http1_only(),
                };
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                self.drive(connection, &activity).await
            }
        };
        if let Err(error) = served {
            tracing::debug!(%error, remote = %self.remote, "a connection ended with an error");
        }
    }

    /// Runs a connection to its end; on shutdown, or once it has been idle (no request in
    /// flight) for the timeout, it is asked to finish what it serves and close (HTTP/2:
    /// `GOAWAY`), so an idle HTTP/2 connection does not hold its descriptor for ever.
    async fn drive<C>(&self, connection: C, activity: &Activity) -> Result<(), BoxError>
    where
        C: std::future::Future<Output = Result<(), BoxError>> + GracefulShutdown,
    {
        let mut connection = std::pin::pin!(connection);
        let mut closing = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => return result,
                () = self.stop.cancelled(), if !closing => {
                    connection.as_mut().shutdown_gracefully();
                    closing = true;
                }
                () = activity.idle_for(self.timeout), if !closing => {
                    connection.as_mut().shutdown_gracefully();
                    closing = true;
                }
            }
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connection that can be asked to finish and close.
trait GracefulShutdown {
    fn shutdown_gracefully(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B> GracefulShutdown
    for hyper_util::server::conn::auto::UpgradeableConnection<'static, I, S, TokioExecutor>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn shutdown_gracefully(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Requests in flight on one connection, and when the last one ended.
#[derive(Clone)]
struct Activity(Arc<ActivityState>);

struct ActivityState {
    in_flight: AtomicUsize,
    /// Milliseconds since `start` when a request last began or ended.
    last: AtomicU64,
    start: Instant,
}

impl Activity {
    fn new() -> Activity {
        Activity(Arc::new(ActivityState {
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            start: Instant::now(),
        }))
    }

    fn touch(&self) {
        let now = self.0.start.elapsed().as_millis() as u64;
        self.0.last.store(now, Ordering::SeqCst);
    }

    /// A request began; its response's body, when dropped, says it ended.
    fn begin(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        InFlight(self.clone())
    }

    /// Returns once no request has been in flight for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.0.last.load(Ordering::SeqCst));
            let quiet = self.0.start.elapsed().saturating_sub(last);
            if self.0.in_flight.load(Ordering::SeqCst) == 0 && quiet >= idle {
                return;
            }
            let wait = idle.saturating_sub(quiet).max(Duration::from_millis(100));
            tokio::time::sleep(wait).await;
        }
    }
}

/// A request in flight (until its response body is dropped).
struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0 .0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.touch();
    }
}

/// A response body that holds its request's [`InFlight`] until it is sent or dropped.
struct Tracked {
    body: axum::body::Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The first bytes of an HTTP/2 connection.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the client sent, within `timeout`, enough to tell its protocol: a byte that does
/// not begin the HTTP/2 preface, or the whole preface.
async fn speaks(stream: &tokio::net::TcpStream, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut head = [0u8; 24];
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut head)).await;
        let n = match peeked {
            Ok(Ok(n)) => n,
            _ => return false,
        };
        if n == 0 {
            return false;
        }
        if head[..n] != H2_PREFACE[..n] || n == H2_PREFACE.len() {
            return true;
        }
        // A part of the preface: wait for the rest (peek returns at once while data waits).
        if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(10)))
            .await
            .is_err()
        {
            return false;
        }
    }
}

/// The router as one connection's service: each request is told where it came from
/// (`ConnectInfo`) and whether over TLS, and counted in flight on the connection until its
/// response body has been sent (or dropped).
#[derive(Clone)]
struct Service {
    app: Router,
    remote: SocketAddr,
    secure: Secure,
    activity: Activity,
}

fn with_remote(app: Router, remote: SocketAddr, secure: Secure, activity: Activity) -> Service {
    Service {
        app,
        remote,
        secure,
        activity,
    }
}

impl tower::Service<Request<Incoming>> for Service {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // A Router is always ready.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(ConnectInfo(self.remote));
        request.extensions_mut().insert(self.secure);
        let in_flight = self.activity.begin();
        let answer = self.app.clone().oneshot(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| {
                axum::body::Body::new(Tracked {
                    body,
                    _in_flight: in_flight,
                })
            }))
        })
    }
}
