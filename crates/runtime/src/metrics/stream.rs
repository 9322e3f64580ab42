//! Desired-state stream metrics, read from each registered
//! [`Publisher`] at scrape time (so they can never disagree with the
//! `Subscribers` RPC):
//!
//! - `membrane_stream_version{stream}`: the publisher's current version.
//! - `membrane_stream_node_acked_version{stream, node}`: newest version the node acknowledged.
//! - `membrane_stream_node_nacked_version{stream, node}`: newest version the node refused (0: none).
//! - `membrane_stream_node_connected{stream, node}`: 1 while the node's stream is open.
//!
//! A node appears once it has subscribed to this replica. Its acked version
//! can stay below the current version when the newer versions held nothing
//! the node sees; compare with the node's own applied versions, not with
//! `membrane_stream_version`, to find a node that is behind.

use std::collections::BTreeMap;
use std::sync::{Mutex, Once, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::stream::Publisher;

/// Makes `publisher`'s delivery state part of `/metrics`, labelled
/// `stream="<stream>"` (the service's name: `ipam`, `identity`, ...).
/// Registering another publisher under the same name replaces the first.
pub fn register_publisher(stream: &str, publisher: &Publisher) {
    let collector = publishers();
    collector
        .publishers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(stream.to_string(), publisher.clone());
}

fn publishers() -> &'static PublisherCollector {
    static COLLECTOR: OnceLock<PublisherCollector> = OnceLock::new();
    static REGISTERED: Once = Once::new();
    let collector = COLLECTOR.get_or_init(PublisherCollector::default);
    // One collector for every publisher, so each family is emitted once.
    REGISTERED.call_once(|| super::register_collector(Shared(collector)));
    collector
}

#[derive(Debug, Default)]
struct PublisherCollector {
    publishers: Mutex<BTreeMap<String, Publisher>>,
}

#[derive(Debug)]
struct Shared(&'static PublisherCollector);

impl Collector for Shared {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Copy out, so the publishers' locks are taken without holding ours.
        let publishers: Vec<(String, Publisher)> = self
            .0
            .publishers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut versions = Vec::new();
        let mut nodes = Vec::new();
        for (stream, publisher) in &publishers {
            versions.push(([("stream", stream.clone())], publisher.version()));
            for (node, d) in publisher.deliveries() {
                nodes.push((
                    [("stream", stream.clone()), ("node", node)],
                    d.acked_version,
                    d.nacked_version,
                    d.connected,
                ));
            }
        }

        let mut family = encoder.encode_descriptor(
            "membrane_stream_version",
            "Current version of the desired state this replica publishes",
            None,
            MetricType::Gauge,
        )?;
        for (labels, v) in &versions {
            ConstGauge::new(*v).encode(family.encode_family(labels)?)?;
        }
        type Pick = fn(&([(&str, String); 2], u64, u64, bool)) -> u64;
        let per_node: [(&str, &str, Pick); 3] = [
            (
                "membrane_stream_node_acked_version",
                "Newest version the node acknowledged",
                |n| n.1,
            ),
            (
                "membrane_stream_node_nacked_version",
                "Newest version the node refused (0: none)",
                |n| n.2,
            ),
            (
                "membrane_stream_node_connected",
                "Whether the node's stream to this replica is open (1) or not (0)",
                |n| u64::from(n.3),
            ),
        ];
        for (name, help, pick) in per_node {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for n in &nodes {
                ConstGauge::new(pick(n)).encode(family.encode_family(&n.0)?)?;
            }
        }
        Ok(())
    }
}
