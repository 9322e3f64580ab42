//! Benchmark: IPAM allocations per second through gRPC, against raw etcd
//! puts measured in the same run on the same etcd, as a ratio.
//!
//! `cargo run --release -p membrane-ipam --example ipam_bench -- [ALLOCS] [CONCURRENCY]`

use std::time::Duration;

use membrane_ipam::{grpc::IpamService, pool::PoolConfig, store::IpamStore};
use membrane_proto::ipam::v1 as pb;
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
                br#"{"node":"node-1","ip":"10.200.0.2","owner":"bench/pod-000000"}"#.to_vec(),
                None,
            )
            .await
            .expect("put");
        }
    })
    .await;

    // IPAM: a real server on loopback, allocations spread over 4 nodes.
    let store = Store::connect(&flags, Duration::from_secs(5)).await?;
    let ipam = IpamStore::open(store, PoolConfig::new("10.200.0.0/16", 20)?).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let routes = tonic::service::Routes::new(IpamService::new(ipam.clone()));
    tokio::spawn(grpc::serve(
        listener,
        routes,
        &[],
        None,
        std::future::pending(),
    ));
    let channel = grpc::connect(&url, "", None).await?;
    let mut client = pb::ipam_client::IpamClient::new(channel.clone());
    for k in 1..=4 {
        client
            .register_node(pb::RegisterNodeRequest {
                node: format!("node-{k}"),
                underlay_ip: format!("10.99.0.{}", 10 + k),
                pod_cidr: String::new(),
            })
            .await?;
    }
    let ipam_time = run_concurrently(n, concurrency, |i| {
        let mut c = pb::ipam_client::IpamClient::new(channel.clone());
        async move {
            c.allocate(pb::AllocateRequest {
                node: format!("node-{}", i % 4 + 1),
                owner: format!("bench/pod-{i:06}"),
            })
            .await
            .expect("allocate");
        }
    })
    .await;

    let raw_rate = n as f64 / raw_time.as_secs_f64();
    let ipam_rate = n as f64 / ipam_time.as_secs_f64();
    println!("operations: {n}, concurrency: {concurrency}");
    println!("raw etcd puts:     {raw_rate:>9.0}/s  ({:.2?})", raw_time);
    println!("ipam allocations:  {ipam_rate:>9.0}/s  ({:.2?})", ipam_time);
    println!("ratio (ipam/raw):  {:.3}", ipam_rate / raw_rate);
    Ok(())
}
