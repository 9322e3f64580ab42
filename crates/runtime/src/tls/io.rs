//! TLS on the wire, done here rather than by tonic so that the configs of
//! [`ReloadingTls`](super::ReloadingTls) are used: an accept loop that hands
//! tonic finished TLS streams, and a connector for client channels.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;

/// A client gets this long to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server-side TLS connection, as tonic accepts it (`Connected` gives
/// handlers the peer's certificates).
pub type ServerTlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// Accepts TCP connections on `listener` and yields those whose TLS
/// handshake (with `config`) succeeded. Handshakes run concurrently, so a
/// slow or hostile client delays nobody else. The listener closes when the
/// returned stream is dropped (tonic drops it on shutdown).
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> ReceiverStream<io::Result<ServerTlsStream>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        // The server is gone when this fails; the connection goes with it.
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => log_refused(peer, &e),
                    Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn log_refused(peer: SocketAddr, e: &io::Error) {
    // Certificate problems are what an operator looks for; a client that
    // simply went away is noise.
    if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
        tracing::info!(%peer, error = %e, "tls handshake refused");
    } else {
        tracing::debug!(%peer, error = %e, "tls handshake failed");
    }
}

/// A connector for tonic's `Endpoint::connect_with_connector*`: TCP to the
/// URI's host and port, then TLS with `config`, expecting the server's
/// certificate to name `server_name`.
pub fn connector(
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
) -> impl tower::Service<
    http::Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = io::Error,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    let connector = TlsConnector::from(config);
    tower::service_fn(move |uri: http::Uri| {
        let (connector, server_name) = (connector.clone(), server_name.clone());
        async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "uri without host"))?;
            // `[::1]` → `::1`
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        }
    })
}
