//! Traces leave over OTLP and the trace context crosses process boundaries:
//! a span opened in this test process is the parent of the span that a real
//! `membrane-ipam` process records for the RPC it serves.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use membrane_proto::ipam::v1 as pb;
use membrane_runtime::{flags::TelemetryFlags, grpc, telemetry};
use membrane_test_support::{Etcd, free_port};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// A real OTLP/gRPC trace receiver that keeps what it gets:
/// (service name, span name, trace id, parent span id).
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<(String, String, Vec<u8>, Vec<u8>)>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    self.0.lock().expect("lock").push((
                        service.clone(),
                        span.name,
                        span.trace_id,
                        span.parent_span_id,
                    ));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_span_in_the_service_is_a_child_of_the_callers_span() {
    let etcd = Etcd::start().await.expect("etcd");
    let receiver = Receiver::default();
    let otlp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let otlp_url = format!("http://{}", otlp.local_addr().expect("addr"));
    let routes = tonic::service::Routes::new(TraceServiceServer::new(receiver.clone()));
    tokio::spawn(grpc::serve(otlp, routes, &[], None, std::future::pending()));

    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_membrane-ipam"))
        .env("MEMBRANE_LISTEN", format!("127.0.0.1:{port}"))
        .env("MEMBRANE_ETCD_ENDPOINTS", etcd.endpoint())
        .env("MEMBRANE_OTLP_ENDPOINT", &otlp_url)
        .env("MEMBRANE_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let url = format!("http://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..100 {
        if grpc::check_health(&url, "", None, Duration::from_millis(500))
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "membrane-ipam came up");

    let _guard = telemetry::init(
        "ipam-telemetry-test",
        &TelemetryFlags {
            log: "warn".into(),
            otlp_endpoint: Some(otlp_url.clone()),
        },
    )
    .expect("telemetry");
    let span = tracing::info_span!("caller");
    let trace_id = span
        .context()
        .span()
        .span_context()
        .trace_id()
        .to_bytes()
        .to_vec();
    async {
        let mut c =
            pb::ipam_client::IpamClient::new(grpc::connect_lazy(&url, "", None).expect("channel"));
        c.register_node(pb::RegisterNodeRequest {
            node: "node-1".into(),
            underlay_ip: "10.99.0.11".into(),
            pod_cidr: String::new(),
        })
        .await
        .expect("register");
    }
    .instrument(span)
    .await;

    let mut found = None;
    for _ in 0..150 {
        found = receiver
            .0
            .lock()
            .expect("lock")
            .iter()
            .find(|(svc, name, tid, parent)| {
                svc.contains("membrane-ipam")
                    && name == "/membrane.ipam.v1.Ipam/RegisterNode"
                    && *tid == trace_id
                    && !parent.is_empty()
            })
            .cloned();
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let spans = receiver.0.lock().expect("lock").clone();
    assert!(
        found.is_some(),
        "no server span in the caller's trace; received: {spans:?}"
    );
}
