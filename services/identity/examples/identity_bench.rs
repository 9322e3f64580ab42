//! Benchmark: allocations of new label sets per second through gRPC,
//! against raw etcd puts measured in the same run on the same etcd, as a
//! ratio. Each allocation is a new identity (number, label key, node
//! reference: one transaction when uncontended).
//!
//! `cargo run --release -p membrane-identity --example identity_bench -- [ALLOCS] [CONCURRENCY]`

use std::time::Duration;

use membrane_identity::config::IdentityConfig;
use membrane_identity::{grpc::IdentityService, store::IdentityStore};
use membrane_proto::identity::v1 as pb;
use membrane_runtime::flags::EtcdFlags;
use membrane_runtime::grpc;
use membrane_runtime::store::Store;
use membrane_test_support::{Etcd, run_concurrently};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2000);
    let concurrency: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(16);
    let etcd = Etcd::start().await?;
    let flags = EtcdFlags {
        endpoints: vec![etcd.endpoint()],
        prefix: "/membrane".into(),
    };

    // Baseline: raw puts of a value of the same size, same concurrency.
    let raw = Store::connect(&flags, Duration::from_secs(5)).await?;
    let raw_time = run_concurrently(n, concurrency, |i| {
        let mut c = raw.client();
        async move {
            c.put(
                format!("/bench/raw/{i}"),
                br#"{"id":12345,"labels":"k8s:app=bench-000000;k8s:io.kubernetes.pod.namespace=default"}"#
                    .to_vec(),
                None,
            )
            .await
            .expect("put");
        }
    })
    .await;

    // Identity: a real server on loopback, allocations spread over 4 nodes.
    let store = Store::connect(&flags, Duration::from_secs(5)).await?;
    let identities = IdentityStore::open(store, IdentityConfig::default()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let routes = tonic::service::Routes::new(IdentityService::new(identities));
    tokio::spawn(grpc::serve(
        listener,
        routes,
        &[],
        None,
        std::future::pending(),
    ));
    let channel = grpc::connect(&url, "", None).await?;
    let mut client = pb::identity_client::IdentityClient::new(channel.clone());
    for k in 1..=4 {
        client
            .heartbeat(pb::HeartbeatRequest {
                node: format!("node-{k}"),
            })
            .await?;
    }
    let alloc_time = run_concurrently(n, concurrency, |i| {
        let mut c = pb::identity_client::IdentityClient::new(channel.clone());
        async move {
            let r = c
                .allocate(pb::AllocateRequest {
                    node: format!("node-{}", i % 4 + 1),
                    namespace: "default".into(),
                    labels: [("app".to_string(), format!("bench-{i:06}"))].into(),
                })
                .await
                .expect("allocate")
                .into_inner();
            assert!(r.created, "label set {i} was new");
        }
    })
    .await;

    // The same label sets again from another node: the known-identity path.
    let again_time = run_concurrently(n, concurrency, |i| {
        let mut c = pb::identity_client::IdentityClient::new(channel.clone());
        async move {
            c.allocate(pb::AllocateRequest {
                node: format!("node-{}", (i + 1) % 4 + 1),
                namespace: "default".into(),
                labels: [("app".to_string(), format!("bench-{i:06}"))].into(),
            })
            .await
            .expect("allocate");
        }
    })
    .await;

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!("operations: {n}, concurrency: {concurrency}");
    println!(
        "raw etcd puts:          {:>9.0}/s  ({raw_time:.2?})",
        rate(raw_time)
    );
    println!(
        "new identities:         {:>9.0}/s  ({alloc_time:.2?})",
        rate(alloc_time)
    );
    println!(
        "known identities:       {:>9.0}/s  ({again_time:.2?})",
        rate(again_time)
    );
    println!(
        "ratio (new/raw):        {:.3}",
        rate(alloc_time) / rate(raw_time)
    );
    println!(
        "ratio (known/raw):      {:.3}",
        rate(again_time) / rate(raw_time)
    );
    Ok(())
}
