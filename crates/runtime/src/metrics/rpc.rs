//! Server-side RPC metrics, in the shape of go-grpc-prometheus:
//!
//! - `membrane_grpc_server_started_total{grpc_service, grpc_method}`
//! - `membrane_grpc_server_handled_total{grpc_service, grpc_method, grpc_code}`
//! - `membrane_grpc_server_handling_seconds{grpc_service, grpc_method, grpc_code}` (histogram)
//!
//! An RPC is handled when its status is known: from the response headers
//! (an error returned by the handler, "trailers-only"), or from the trailers
//! at the end of the response body. For a streaming RPC that is when the
//! stream ends, so its handling time is the stream's lifetime. A response
//! dropped before its status was sent (the client went away, the server shut
//! down) counts as `Canceled`.
//!
//! [`RpcMetricsLayer`] is installed by [`crate::grpc::serve`] and
//! [`crate::grpc::serve_unix`]; no service does anything to get these.

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

/// Upper bounds of the latency buckets, in seconds: 1 ms to 10 s. Streams
/// that live longer land in `+Inf`.
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

type MethodLabels = [(&'static str, String); 2];
type CodeLabels = [(&'static str, String); 3];

struct RpcMetrics {
    started: Family<MethodLabels, Counter>,
    handled: Family<CodeLabels, Counter>,
    seconds: Family<CodeLabels, Histogram>,
}

fn new_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

fn rpc_metrics() -> &'static RpcMetrics {
    static METRICS: OnceLock<RpcMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let m = RpcMetrics {
            started: Family::default(),
            handled: Family::default(),
            seconds: Family::new_with_constructor(new_histogram as fn() -> Histogram),
        };
        super::with_registry(|r| {
            r.register(
                "membrane_grpc_server_started",
                "RPCs started on the server",
                m.started.clone(),
            );
            r.register(
                "membrane_grpc_server_handled",
                "RPCs completed on the server, by status code",
                m.handled.clone(),
            );
            r.register(
                "membrane_grpc_server_handling_seconds",
                "Time from receiving an RPC to sending its status (a stream's lifetime)",
                m.seconds.clone(),
            );
        });
        m
    })
}

/// Registers the RPC metric families now, so that `/metrics` lists them
/// (empty) before the first RPC.
pub fn register() {
    rpc_metrics();
}

/// The name Prometheus users know for each gRPC status code (Go's `codes.Code.String()`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// Splits `/pkg.Service/Method` into service and method.
fn split_path(path: &str) -> (String, String) {
    match path.trim_start_matches('/').split_once('/') {
        Some((service, method)) if !service.is_empty() && !method.contains('/') => {
            (service.to_string(), method.to_string())
        }
        _ => ("unknown".to_string(), "unknown".to_string()),
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    value.parse::<i32>().ok().map(tonic::Code::from_i32)
}

/// Records one RPC's outcome, once.
struct Recorder {
    start: Instant,
    service: String,
    method: String,
}

impl Recorder {
    fn finish(self, code: tonic::Code) {
        let m = rpc_metrics();
        let labels = [
            ("grpc_service", self.service),
            ("grpc_method", self.method),
            ("grpc_code", code_name(code).to_string()),
        ];
        m.handled.get_or_create(&labels).inc();
        m.seconds
            .get_or_create(&labels)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

// === impl RpcMetricsLayer ===

/// Tower layer that records [`rpc`](self) metrics for every request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService { inner }
    }
}

// === impl RpcMetricsService ===

/// See [`RpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body<Data = Bytes> + Unpin,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let (service, method) = split_path(req.uri().path());
        rpc_metrics()
            .started
            .get_or_create(&[
                ("grpc_service", service.clone()),
                ("grpc_method", method.clone()),
            ])
            .inc();
        let recorder = Recorder {
            start: Instant::now(),
            service,
            method,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(resp) => {
                    let mut recorder = Some(recorder);
                    // Trailers-only: the status is already in the headers.
                    if let Some(code) = status_of(resp.headers())
                        && let Some(r) = recorder.take()
                    {
                        r.finish(code);
                    }
                    Ok(resp.map(|inner| MeteredBody { inner, recorder }))
                }
                Err(e) => {
                    recorder.finish(tonic::Code::Unknown);
                    Err(e)
                }
            }
        })
    }
}

// === impl MeteredBody ===

/// A response body that records its RPC when the trailers go out.
pub struct MeteredBody<B> {
    inner: B,
    recorder: Option<Recorder>,
}

impl<B> std::fmt::Debug for MeteredBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody").finish_non_exhaustive()
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(item) = &polled {
            let code = match item {
                Some(Ok(frame)) => frame
                    .trailers_ref()
                    .map(|t| status_of(t).unwrap_or(tonic::Code::Unknown)),
                Some(Err(_)) => Some(tonic::Code::Internal),
                // A gRPC body always ends with trailers; without them the
                // client cannot know the outcome either.
                None => Some(tonic::Code::Unknown),
            };
            if let Some(code) = code
                && let Some(r) = this.recorder.take()
            {
                r.finish(code);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        if let Some(r) = self.recorder.take() {
            r.finish(tonic::Code::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_path_splits_into_service_and_method() {
        assert_eq!(
            split_path("/membrane.ipam.v1.Ipam/Allocate"),
            ("membrane.ipam.v1.Ipam".to_string(), "Allocate".to_string())
        );
        assert_eq!(
            split_path("/favicon.ico"),
            ("unknown".to_string(), "unknown".to_string())
        );
        assert_eq!(
            split_path("/a/b/c"),
            ("unknown".to_string(), "unknown".to_string())
        );
    }

    #[test]
    fn status_codes_carry_their_go_names() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::Cancelled), "Canceled");
        assert_eq!(code_name(tonic::Code::NotFound), "NotFound");
    }
}
