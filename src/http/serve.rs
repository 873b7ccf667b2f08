//! The accept loop: one task per connection, HTTP/1.1 and HTTP/2, with the time limits a
//! server exposed to strangers needs, and a graceful shutdown.
//!
//! - A connection must send a request's headers within `header_timeout` of starting to read
//!   them, and that includes the wait for the next request on an idle keep-alive connection:
//!   a client that connects and says nothing, or trickles its headers (slowloris), or parks
//!   an idle connection, is disconnected.
//! - HTTP/2 connections are pinged every `header_timeout` and closed when a ping goes
//!   unanswered.
//! - On shutdown, the listener closes, connections finish the requests they are serving and
//!   close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tower::ServiceExt;

/// Time limits of connections (`serve --http-*`), and TLS (`serve --tls-*`).
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// How long a connection may take to send a request's headers (or stay idle between
    /// requests); a TLS handshake too.
    pub header_timeout: Duration,
    /// Serve HTTPS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ConnectionSettings {
    fn default() -> ConnectionSettings {
        ConnectionSettings {
            header_timeout: Duration::from_secs(30),
            tls: None,
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
    let graceful = GracefulShutdown::new();
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
        let secure = Secure(settings.tls.is_some());
        let service = TowerToHyperService::new(with_remote(app.clone(), remote, secure));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let timeout = settings.header_timeout;
        let tls = settings.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            // hyper's timers start once it knows the protocol, from the first bytes: a client
            // that sends none (or never finishes its TLS handshake) is dropped here.
            if !speaks(&stream, timeout).await {
                return;
            }
            let served = match tls {
                None => {
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    watcher.watch(connection).await
                }
                Some(acceptor) => {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(timeout, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    // The protocol is ALPN's: no bytes to wait for before hyper's timers run.
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    let builder = builder;
                    let builder = match h2 {
                        true => builder.http2_only(),
                        false => builder.http1_only(),
                    };
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    watcher.watch(connection).await
                }
            };
            if let Err(error) = served {
                tracing::debug!(%error, %remote, "a connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
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

/// The router, with each request told where it came from (`ConnectInfo`) and whether over
/// TLS.
fn with_remote(
    app: Router,
    remote: SocketAddr,
    secure: Secure,
) -> impl tower::Service<
    Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    app.map_request(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(remote));
        request.extensions_mut().insert(secure);
        request
    })
}
