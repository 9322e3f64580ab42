//! Serving and connecting gRPC the same way in every process: mTLS when
//! configured, a span per RPC whose parent comes from the caller's
//! `traceparent` metadata, the standard health service, graceful shutdown.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use futures::FutureExt as _;
use opentelemetry::propagation::{Extractor, Injector};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Server};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::metrics::rpc::RpcMetricsLayer;
use crate::tls::TlsFiles;

/// A client channel that carries the current trace context to the server.
pub type GrpcChannel = InterceptedService<Channel, TracePropagation>;

/// Serves `routes` (plus `grpc.health.v1.Health`) on `listener` until
/// `shutdown` resolves. The health service reports SERVING for `""` and for
/// every name in `health_names`.
pub async fn serve<F>(
    listener: TcpListener,
    routes: Routes,
    health_names: &[&str],
    tls: Option<&TlsFiles>,
    shutdown: F,
) -> anyhow::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in health_names.iter().copied().chain([""]) {
        reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let mut builder = Server::builder().trace_fn(rpc_span).layer(RpcMetricsLayer);
    crate::metrics::rpc::register();
    let router = builder.add_routes(routes.add_service(health));
    // Long-lived streams (desired state, flows) never finish by themselves:
    // after the shutdown signal, in-flight calls get a grace period, then the
    // server stops regardless.
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = fired_tx.send(());
    };
    let grace = async {
        if fired_rx.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    // TLS is accepted here, not by tonic, so that each new connection gets
    // the certificate and CA currently on disk (`tls::ReloadingTls`).
    let server = match tls {
        Some(tls) => {
            let config = tls
                .reloading()
                .and_then(|t| t.server_config())
                .context("configure server tls")?;
            router
                .serve_with_incoming_shutdown(crate::tls::incoming(listener, config), signal)
                .boxed()
        }
        None => router
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal)
            .boxed(),
    };
    tokio::select! {
        r = server => r.context("grpc server")?,
        _ = grace => tracing::info!("grace period over; closing remaining streams"),
    }
    Ok(())
}

/// How long in-flight calls may run after the shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Serves `routes` (plus health) on a unix socket at `path`, without TLS:
/// for local clients such as the CNI plugin, guarded by file permissions
/// (the socket is made accessible to its owner only).
pub async fn serve_unix<F>(
    path: &std::path::Path,
    routes: Routes,
    shutdown: F,
) -> anyhow::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    // A socket left by a previous process would make bind fail.
    let _ = std::fs::remove_file(path);
    let listener =
        tokio::net::UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    let (_reporter, health) = tonic_health::server::health_reporter();
    Server::builder()
        .trace_fn(rpc_span)
        .layer(RpcMetricsLayer)
        .add_routes(routes.add_service(health))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
        .context("grpc server on unix socket")?;
    Ok(())
}

/// Connects to a gRPC server on the unix socket at `path`.
pub async fn connect_unix(path: &std::path::Path) -> anyhow::Result<GrpcChannel> {
    let path = path.to_path_buf();
    let shown = path.display().to_string();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| format!("connect to {shown}"))?;
    Ok(InterceptedService::new(channel, TracePropagation))
}

/// A span per RPC, child of the caller's span when it sent `traceparent`.
fn rpc_span(req: &http::Request<()>) -> tracing::Span {
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&HeaderExtractor(req.headers()))
    });
    let path = req.uri().path();
    let span =
        tracing::info_span!("rpc", otel.name = %path, rpc.system = "grpc", otel.kind = "server");
    let _ = span.set_parent(parent);
    span
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// Builds a channel to `url` (`http://` or `https://`). With TLS, the
/// server's certificate must name `server_name`. The channel connects lazily
/// and reconnects by itself, so callers can create it before the server is up.
pub fn connect_lazy(
    url: &str,
    server_name: &str,
    tls: Option<&TlsFiles>,
) -> anyhow::Result<GrpcChannel> {
    let Some(tls) = tls else {
        return Ok(InterceptedService::new(
            endpoint(url)?.connect_lazy(),
            TracePropagation,
        ));
    };
    // TLS is done by our connector, with the certificate and CA currently on
    // disk (`tls::ReloadingTls`), so tonic's own TLS must not see `https`
    // in the address it connects to; requests still say `https`.
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let origin: http::Uri = format!("https://{rest}")
        .parse()
        .with_context(|| format!("invalid endpoint `{url}`"))?;
    let endpoint = endpoint(&format!("http://{rest}"))?.origin(origin);
    let server_name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .with_context(|| format!("invalid tls server name `{server_name}`"))?;
    let config = tls
        .reloading()
        .and_then(|t| t.client_config())
        .with_context(|| format!("configure tls for `{url}`"))?;
    Ok(InterceptedService::new(
        endpoint.connect_with_connector_lazy(crate::tls::connector(config, server_name)),
        TracePropagation,
    ))
}

/// The client settings every channel shares.
fn endpoint(url: &str) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(url.to_string())
        .with_context(|| format!("invalid endpoint `{url}`"))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

/// Like [`connect_lazy`], but fails at once when the server cannot be reached.
pub async fn connect(
    url: &str,
    server_name: &str,
    tls: Option<&TlsFiles>,
) -> anyhow::Result<GrpcChannel> {
    let mut channel = connect_lazy(url, server_name, tls)?;
    std::future::poll_fn(|cx| tower::Service::poll_ready(&mut channel, cx))
        .await
        .with_context(|| format!("connect to `{url}`"))?;
    Ok(channel)
}

/// Checks `grpc.health.v1` at `url`; `Ok(())` when it reports SERVING.
pub async fn check_health(
    url: &str,
    server_name: &str,
    tls: Option<&TlsFiles>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let probe = async {
        let channel = connect(url, server_name, tls).await?;
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let resp = client
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .with_context(|| format!("health check of `{url}`"))?
            .into_inner();
        anyhow::ensure!(
            resp.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "`{url}` reports status {}",
            resp.status
        );
        Ok(())
    };
    tokio::time::timeout(timeout, probe)
        .await
        .with_context(|| format!("health check of `{url}` timed out"))?
}

/// Client interceptor that writes the current span's context into the
/// request metadata (`traceparent`), so the server's span becomes its child.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracePropagation;

impl tonic::service::Interceptor for TracePropagation {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let cx = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut MetadataInjector(req.metadata_mut()))
        });
        Ok(req)
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}
