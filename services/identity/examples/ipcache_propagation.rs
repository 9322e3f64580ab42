//! Benchmark: ipcache propagation through the desired-state stream, in one
//! process, without a cluster: a real etcd, a real identity service (store,
//! `feed_publisher`, `Publisher`, gRPC over mTLS on loopback) and a real
//! `membrane_runtime::stream::Subscriber` whose sink records when each
//! `ipcache/<ip>/32` key is applied. `COUNT` endpoints are upserted through
//! gRPC (`CONCURRENCY` in flight); the latency is from each upsert's
//! acknowledgement to the sink applying that address. Prints p50/p99/max and
//! how many sink applies (and so ACKs) it took.
//!
//! `cargo run -p membrane-identity --example ipcache_propagation -- [COUNT] [CONCURRENCY] [SINK_US]`
//!
//! `SINK_US` (default 0) makes each sink apply busy for that many
//! microseconds plus 2 µs per changed key, standing in for the node's map
//! writes under the datapath lock.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use membrane_identity::config::IdentityConfig;
use membrane_identity::grpc::{IdentityResources, IdentityService};
use membrane_identity::store::{IdentityStore, keys};
use membrane_proto::identity::v1 as pb;
use membrane_runtime::flags::EtcdFlags;
use membrane_runtime::grpc;
use membrane_runtime::pki::{self, LeafSpec};
use membrane_runtime::store::Store;
use membrane_runtime::stream::{Publisher, StateSink, Subscriber};
use membrane_test_support::Etcd;
use prost_types::Any;
use tokio::sync::Semaphore;

/// Records when each key was first applied, and how many applies there were.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<HashMap<String, Instant>>>,
    applies: Arc<Mutex<usize>>,
    busy: Duration,
}

impl StateSink for Recorder {
    async fn apply(
        &mut self,
        _version: u64,
        _state: &BTreeMap<String, Any>,
        changed: &[String],
    ) -> Result<(), String> {
        let now = Instant::now();
        if !self.busy.is_zero() {
            let until = now + self.busy + Duration::from_micros(2 * changed.len() as u64);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        *self.applies.lock().expect("lock") += 1;
        let mut seen = self.seen.lock().expect("lock");
        for k in changed.iter().filter(|k| k.starts_with("ipcache/")) {
            seen.entry(k.clone()).or_insert(now);
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    membrane_runtime::tls::install_crypto_provider();
    let mut args = std::env::args().skip(1);
    let count: u32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let concurrency: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(16);
    let sink_us: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(0);

    let etcd = Etcd::start().await?;
    let flags = EtcdFlags {
        endpoints: vec![etcd.endpoint()],
        prefix: "/membrane".into(),
    };
    let pki_dir =
        std::env::temp_dir().join(format!("membrane-ipcache-prop-{}", std::process::id()));
    let bundle = pki::ensure_bundle(
        &pki_dir,
        &[LeafSpec::service("identity"), LeafSpec::node("node-2")],
    )?;
    let server_tls = bundle.leaves["identity"].clone();
    let node_tls = bundle.leaves["node-2"].clone();

    // The identity service, as `membrane-identity` wires it.
    let store = Store::connect(&flags, Duration::from_secs(5)).await?;
    let identities = IdentityStore::open(store.clone(), IdentityConfig::default()).await?;
    let publisher = Publisher::new();
    tokio::spawn(membrane_runtime::store::feed_publisher(
        store,
        keys::ROOT.into(),
        Arc::new(IdentityResources),
        publisher.clone(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://{}", listener.local_addr()?);
    let routes = tonic::service::Routes::new(IdentityService::new(identities))
        .add_service(publisher.service());
    tokio::spawn(async move {
        grpc::serve(
            listener,
            routes,
            &[],
            Some(&server_tls),
            std::future::pending(),
        )
        .await
    });
    let server_name = pki::service_server_name("identity");

    // Another node, subscribed to the identity stream.
    let recorder = Recorder {
        busy: Duration::from_micros(sink_us),
        ..Recorder::default()
    };
    let sub_channel = grpc::connect(&url, &server_name, Some(&node_tls)).await?;
    let subscriber = Subscriber::new("node-2", "identity", sub_channel);
    let mut sub_state = subscriber.state();
    tokio::spawn(subscriber.run(recorder.clone(), std::future::pending()));
    tokio::time::timeout(
        Duration::from_secs(10),
        sub_state.wait_for(|s| s.connected && s.applied_version > 0),
    )
    .await??;

    // The endpoints, recorded as node-1's (it holds a lease).
    let channel = grpc::connect(&url, &server_name, Some(&node_tls)).await?;
    let mut client = pb::identity_client::IdentityClient::new(channel.clone());
    client
        .heartbeat(pb::HeartbeatRequest {
            node: "node-1".into(),
        })
        .await?;
    let identity = client
        .allocate(pb::AllocateRequest {
            node: "node-1".into(),
            namespace: "bench".into(),
            labels: [("app".to_string(), "ipcache-bench".to_string())].into(),
        })
        .await?
        .into_inner()
        .id;
    // Let the identity itself reach the node first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let applies_before = *recorder.applies.lock().expect("lock");

    let acked: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let sem = Arc::new(Semaphore::new(concurrency));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..count {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 240, 0, 0)) + i);
        let permit = sem.clone().acquire_owned().await?;
        let (mut c, acked) = (
            pb::identity_client::IdentityClient::new(channel.clone()),
            acked.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let r = c
                .upsert_endpoint(pb::UpsertEndpointRequest {
                    ip: ip.to_string(),
                    identity,
                    node: "node-1".into(),
                    namespace: "bench".into(),
                    pod: format!("bench-{ip}"),
                })
                .await;
            acked
                .lock()
                .expect("lock")
                .insert(format!("ipcache/{ip}/32"), Instant::now());
            drop(permit);
            r.map(drop)
        }));
    }
    for t in tasks {
        t.await??;
    }
    let upserts_took = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while recorder.seen.lock().expect("lock").len() < count as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all_applied = start.elapsed();

    let acked = acked.lock().expect("lock");
    let seen = recorder.seen.lock().expect("lock");
    let mut lat: Vec<Duration> = acked
        .iter()
        .filter_map(|(k, a)| seen.get(k).map(|s| s.saturating_duration_since(*a)))
        .collect();
    lat.sort();
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    let applies = *recorder.applies.lock().expect("lock") - applies_before;
    println!(
        "endpoints: {count} ({concurrency} in flight, sink busy {sink_us} us/apply), applied: {}, upserts acked after {upserts_took:?}, all applied after {all_applied:?}, sink applies: {applies}",
        lat.len()
    );
    println!(
        "propagation upsert ack -> sink applied: p50 {:?}  p99 {:?}  max {:?}",
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    let _ = std::fs::remove_dir_all(&pki_dir);
    anyhow::ensure!(
        lat.len() == count as usize,
        "only {} of {count} entries reached the sink",
        lat.len()
    );
    Ok(())
}
