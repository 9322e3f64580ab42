//! `/metrics` scraped over HTTP from servers running in the test: RPC
//! counts, latency histograms and status codes recorded by `grpc::serve`,
//! and desired-state delivery read from a registered publisher.

use std::collections::BTreeMap;
use std::time::Duration;

use membrane_runtime::stream::{Change, Publisher, Scope, StateSink, Subscriber};
use membrane_runtime::{grpc, metrics};
use prost_types::Any;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Serves `/metrics` on a free port; returns its address.
async fn serve_metrics() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(metrics::serve(listener, std::future::pending()));
    addr
}

/// A bare HTTP/1.1 GET: (status line, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut raw = String::new();
    conn.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("http response");
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let (status, body) = get(addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    body
}

/// The value of the sample `series` (name and labels, exactly as exposed).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

async fn serve_grpc(routes: tonic::service::Routes) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        grpc::serve(
            listener,
            routes,
            &["test.Svc"],
            None,
            std::future::pending(),
        )
        .await
    });
    url
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test]
async fn rpc_counts_latency_buckets_and_status_codes_move_with_calls() {
    let metrics_addr = serve_metrics().await;
    let url = serve_grpc(tonic::service::Routes::default()).await;
    let channel = grpc::connect(&url, "", None).await.expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);

    let ok = r#"{grpc_service="grpc.health.v1.Health",grpc_method="Check",grpc_code="OK"}"#;
    let before = scrape(metrics_addr).await;
    let count =
        |t: &str| value(t, &format!("membrane_grpc_server_handled_total{ok}")).unwrap_or(0.0);
    let n0 = count(&before);

    for _ in 0..3 {
        health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "test.Svc".into(),
            })
            .await
            .expect("check");
    }
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(status.code(), tonic::Code::NotFound);

    let after = scrape(metrics_addr).await;
    assert_eq!(count(&after) - n0, 3.0, "{after}");
    let le = |bound: &str| {
        format!(
            r#"membrane_grpc_server_handling_seconds_bucket{{grpc_service="grpc.health.v1.Health",grpc_method="Check",grpc_code="OK",le="{bound}"}}"#
        )
    };
    let inf = value(&after, &le("+Inf")).expect("+Inf bucket");
    let ten = value(&after, &le("10")).expect("10s bucket");
    assert!(
        inf >= 3.0 && ten >= 3.0,
        "a health check takes well under 10s:\n{after}"
    );
    assert_eq!(
        value(
            &after,
            &format!("membrane_grpc_server_handling_seconds_count{ok}")
        ),
        Some(inf)
    );
    let not_found = r#"membrane_grpc_server_handled_total{grpc_service="grpc.health.v1.Health",grpc_method="Check",grpc_code="NotFound"}"#;
    assert!(value(&after, not_found).unwrap_or(0.0) >= 1.0, "{after}");
    assert!(
        value(
            &after,
            r#"membrane_grpc_server_started_total{grpc_service="grpc.health.v1.Health",grpc_method="Check"}"#
        )
        .unwrap_or(0.0)
            >= 4.0
    );

    let (status, _) = get(metrics_addr, "/other").await;
    assert!(status.contains("404"), "{status}");
}

#[derive(Clone, Default)]
struct Accept;

impl StateSink for Accept {
    async fn apply(
        &mut self,
        _version: u64,
        _state: &BTreeMap<String, Any>,
        _changed: &[String],
    ) -> Result<(), String> {
        Ok(())
    }
}

#[tokio::test]
async fn stream_delivery_per_node_follows_a_subscriber_that_acks() {
    let metrics_addr = serve_metrics().await;
    let publisher = Publisher::new();
    metrics::register_publisher("metrics-test", &publisher);
    publisher.apply(
        5,
        vec![Change::Upsert {
            key: "a".into(),
            scope: Scope::All,
            value: Any {
                type_url: "test/v".into(),
                value: b"1".to_vec(),
            },
        }],
    );
    let url = serve_grpc(tonic::service::Routes::new(publisher.service())).await;
    let text = scrape(metrics_addr).await;
    assert_eq!(
        value(&text, r#"membrane_stream_version{stream="metrics-test"}"#),
        Some(5.0),
        "{text}"
    );

    let channel = grpc::connect_lazy(&url, "", None).expect("channel");
    let sub = tokio::spawn(
        Subscriber::new("node-1", "metrics-test", channel).run(Accept, std::future::pending()),
    );
    let acked = r#"membrane_stream_node_acked_version{stream="metrics-test",node="node-1"}"#;
    let connected = r#"membrane_stream_node_connected{stream="metrics-test",node="node-1"}"#;
    eventually("node-1 acked version 5", || async {
        let t = scrape(metrics_addr).await;
        value(&t, acked) == Some(5.0) && value(&t, connected) == Some(1.0)
    })
    .await;
    let text = scrape(metrics_addr).await;
    assert_eq!(
        value(
            &text,
            r#"membrane_stream_node_nacked_version{stream="metrics-test",node="node-1"}"#
        ),
        Some(0.0)
    );

    // The node goes away: it shows disconnected, and its stream counts as a
    // handled (canceled) RPC whose lifetime went into the histogram.
    sub.abort();
    let subscribe = r#"{grpc_service="membrane.stream.v1.DesiredState",grpc_method="Subscribe",grpc_code="Canceled"}"#;
    eventually("node-1 disconnected", || async {
        value(&scrape(metrics_addr).await, connected) == Some(0.0)
    })
    .await;
    eventually("its stream counted", || async {
        let t = scrape(metrics_addr).await;
        let done = value(
            &t,
            &format!("membrane_grpc_server_handled_total{subscribe}"),
        )
        .unwrap_or(0.0)
            >= 1.0;
        if !done {
            eprintln!("{t}");
        }
        done
    })
    .await;
}
