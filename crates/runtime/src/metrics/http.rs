//! The `/metrics` endpoint: HTTP/1.1 with hyper (already in every binary
//! through tonic), plain text, no TLS: Prometheus scrapes it on an address
//! the operator chooses (in a local cluster: the host side of the bridge).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::flags::MetricsFlags;

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `--metrics-listen` and serves `/metrics` in a background task for
/// the life of the process. Returns the bound address, `None` when the flag
/// is unset. A failing bind fails here, at start, not later.
pub async fn start(flags: &MetricsFlags) -> anyhow::Result<Option<SocketAddr>> {
    let Some(addr) = flags.metrics_listen else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind metrics listener {addr}"))?;
    let local = listener.local_addr().context("metrics listener address")?;
    tokio::spawn(async move {
        if let Err(e) = serve(listener, std::future::pending()).await {
            tracing::warn!(error = %format!("{e:#}"), "metrics server stopped");
        }
    });
    tracing::info!(addr = %local, "metrics serving on /metrics");
    Ok(Some(local))
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves (then stops
/// accepting; connections in flight finish by themselves).
pub async fn serve<F>(listener: TcpListener, shutdown: F) -> anyhow::Result<()>
where
    F: Future<Output = ()> + Send,
{
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle));
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "metrics connection ended");
            }
        });
    }
}

async fn handle<B>(req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = |status: StatusCode, content_type: &'static str, body: String| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(content_type),
        );
        resp
    };
    if req.uri().path() != "/metrics" {
        return Ok(response(
            StatusCode::NOT_FOUND,
            "text/plain",
            "only /metrics is served here\n".into(),
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        ));
    }
    // Collectors may read eBPF maps or take locks: keep them off the async workers.
    let text = match tokio::task::spawn_blocking(super::render).await {
        Ok(text) => text,
        Err(e) => {
            return Ok(response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("rendering metrics failed: {e}\n"),
            ));
        }
    };
    Ok(response(StatusCode::OK, super::CONTENT_TYPE, text))
}
