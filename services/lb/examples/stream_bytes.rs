//! Bytes a backend change costs on the lb stream:
//! `cargo run -p membrane-lb --example stream_bytes`.
//!
//! A service is published as its `ServiceState` without backends plus one
//! resource per backend, and nodes compute the Maglev table themselves (a
//! pure function of what is published), so a backend change costs that
//! backend's resource. Same-run baselines: the whole `ServiceState` (what
//! one resource per service would cost) and the table itself (M slots of
//! a 4-byte backend id).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use membrane_lb::grpc;
use membrane_lb::maglev::{Seed, TableSize};
use membrane_lb::model::{Algorithm, Backend, Frontend, FrontendKind, Protocol, ServiceState};
use membrane_proto::stream::v1 as stream;
use prost::Message as _;
use prost_types::Any;

fn state(backends: u32) -> ServiceState {
    ServiceState {
        namespace: "default".into(),
        name: "web".into(),
        frontends: vec![Frontend {
            kind: FrontendKind::ClusterIp,
            address: Some(Ipv4Addr::new(10, 96, 0, 10)),
            port: 80,
            protocol: Protocol::Tcp,
            port_name: "http".into(),
            target_port: 8080,
            announcer: None,
        }],
        algorithm: Algorithm::Maglev,
        hash_source_only: false,
        affinity_timeout: 0,
        backends: (0..backends)
            .map(|i| Backend {
                id: i + 1,
                address: Ipv4Addr::from(0x0ac8_0000 + i),
                weight: 1,
                source: format!("pod/default/web-{i}"),
            })
            .collect(),
        table_size: TableSize::default(),
        seed: Seed::from_bytes(*b"membrane-lb!"),
    }
}

/// The encoded stream message carrying what changed from `old` to `new`
/// (the resources the lb service publishes for each).
fn update_bytes(old: &ServiceState, new: &ServiceState) -> anyhow::Result<usize> {
    let before: BTreeMap<String, Any> = grpc::stream_resources(old)?.into_iter().collect();
    let after: BTreeMap<String, Any> = grpc::stream_resources(new)?.into_iter().collect();
    let update = stream::StateUpdate {
        version: 2,
        snapshot: false,
        snapshot_end: false,
        upserts: after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(*v))
            .map(|(k, v)| stream::Resource {
                key: k.clone(),
                value: Some(v.clone()),
            })
            .collect(),
        removals: before
            .keys()
            .filter(|k| !after.contains_key(*k))
            .cloned()
            .collect(),
    };
    Ok(update.encoded_len())
}

fn main() -> anyhow::Result<()> {
    let m = u64::from(TableSize::default().get());
    println!(
        "{:>9} {:>16} {:>16} {:>20} {:>18}",
        "backends", "remove one (B)", "reweigh one (B)", "whole state (B)", "table M=16381 (B)"
    );
    for n in [3u32, 100, 1000] {
        let old = state(n);
        let mut removed = old.clone();
        removed.backends.pop();
        let mut reweighed = old.clone();
        reweighed.backends[0].weight = 0;
        let whole = grpc::encode(&old)?.value.len();
        println!(
            "{n:>9} {:>16} {:>16} {whole:>20} {:>18}",
            update_bytes(&old, &removed)?,
            update_bytes(&old, &reweighed)?,
            m * 4
        );
    }
    Ok(())
}
