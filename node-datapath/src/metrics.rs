//! The node's Prometheus metrics, on the process registry of
//! [`membrane_runtime::metrics`] (served on `--metrics-listen`):
//!
//! Datapath counters, read from the pinned eBPF maps at every scrape
//! ([`register_datapath`]); they count since the maps were created, so they
//! survive agent restarts:
//! - `membrane_datapath_packets_total{counter}`, `membrane_datapath_bytes_total{counter}`:
//!   `counter` is one of `lxc_rx`, `host_rx`, `passed`, `redirect_peer`,
//!   `redirect_neigh`, `ct_new`, `ct_established`, `ct_reply`, `to_container`.
//! - `membrane_datapath_drops_total{reason}`, `membrane_datapath_drop_bytes_total{reason}`:
//!   every drop, by reason.
//! - `membrane_endpoint_drops_total{reason, direction}`: policy drops of local
//!   endpoints, summed over endpoints (`direction` is the endpoint's `ingress`
//!   or `egress`).
//!
//! Flow observer hooks ([`FlowMetrics`]), counted by the observer as it
//! records flows:
//! - `membrane_flows_total{verdict, drop_reason}`
//! - `membrane_flows_lost_total`
//!
//! Reason labels are the observer's names ([`drop_reason_name`]:
//! `POLICY_DENIED`, `CT_MAP_FULL`, ...), so drops and dropped flows can be
//! compared label for label.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Once, OnceLock};

use membrane_runtime::metrics::prometheus_client::collector::Collector;
use membrane_runtime::metrics::prometheus_client::encoding::{
    DescriptorEncoder, EncodeMetric as _,
};
use membrane_runtime::metrics::prometheus_client::metrics::MetricType;
use membrane_runtime::metrics::prometheus_client::metrics::counter::{ConstCounter, Counter};
use membrane_runtime::metrics::prometheus_client::metrics::family::Family;

use crate::bpf::{self, Direction, DropReason};
pub use crate::observer::flow::drop_reason_name;

/// Where the datapath collector reads its counters: the real
/// [`bpf::Datapath`], or a fake in tests.
pub trait DatapathCounters: Send + Sync + 'static {
    /// The datapath's global counters.
    fn metrics(&self) -> Result<bpf::Metrics, String>;
    /// Policy drops per (endpoint, reason, direction).
    fn endpoint_drops(&self) -> Result<BTreeMap<(u32, DropReason, Direction), u64>, String>;
}

impl DatapathCounters for Mutex<bpf::Datapath> {
    fn metrics(&self) -> Result<bpf::Metrics, String> {
        let dp = self.lock().unwrap_or_else(|p| p.into_inner());
        dp.metrics().map_err(|e| e.to_string())
    }

    fn endpoint_drops(&self) -> Result<BTreeMap<(u32, DropReason, Direction), u64>, String> {
        let dp = self.lock().unwrap_or_else(|p| p.into_inner());
        dp.endpoint_drops().map_err(|e| e.to_string())
    }
}

/// Makes the datapath's counters part of `/metrics`. Call once the datapath
/// is loaded; calling again replaces the source (families appear once).
pub fn register_datapath(datapath: Arc<Mutex<bpf::Datapath>>) {
    register_counters(datapath);
}

/// [`register_datapath`] for any [`DatapathCounters`].
pub fn register_counters(source: Arc<dyn DatapathCounters>) {
    static SLOT: OnceLock<DatapathCollector> = OnceLock::new();
    static REGISTERED: Once = Once::new();
    let collector = SLOT.get_or_init(DatapathCollector::default);
    *collector.source.lock().unwrap_or_else(|p| p.into_inner()) = Some(source);
    REGISTERED.call_once(|| membrane_runtime::metrics::register_collector(collector.clone()));
}

// === impl DatapathCollector ===

/// Reads [`DatapathCounters`] at scrape time.
#[derive(Clone, Default)]
pub struct DatapathCollector {
    source: Arc<Mutex<Option<Arc<dyn DatapathCounters>>>>,
}

impl std::fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathCollector").finish_non_exhaustive()
    }
}

impl DatapathCollector {
    /// A collector reading `source`.
    pub fn new(source: Arc<dyn DatapathCounters>) -> Self {
        Self {
            source: Arc::new(Mutex::new(Some(source))),
        }
    }
}

type Labels2 = [(&'static str, String); 2];

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(source) = self
            .source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Ok(());
        };
        match source.metrics() {
            Ok(m) => {
                let points = [
                    ("lxc_rx", m.lxc_rx),
                    ("host_rx", m.host_rx),
                    ("passed", m.passed),
                    ("redirect_peer", m.redirect_peer),
                    ("redirect_neigh", m.redirect_neigh),
                    ("ct_new", m.ct_new),
                    ("ct_established", m.ct_established),
                    ("ct_reply", m.ct_reply),
                    ("to_container", m.to_container),
                ];
                let counter = |name: &str| [("counter", name.to_string())];
                counters(
                    &mut encoder,
                    "membrane_datapath_packets",
                    "Packets counted by the datapath, by counter",
                    points.iter().map(|(n, c)| (counter(n), c.packets)),
                )?;
                counters(
                    &mut encoder,
                    "membrane_datapath_bytes",
                    "Bytes counted by the datapath, by counter",
                    points.iter().map(|(n, c)| (counter(n), c.bytes)),
                )?;
                let reason = |r: &DropReason| [("reason", drop_reason_name(*r))];
                counters(
                    &mut encoder,
                    "membrane_datapath_drops",
                    "Packets dropped by the datapath, by reason",
                    m.drops.iter().map(|(r, c)| (reason(r), c.packets)),
                )?;
                counters(
                    &mut encoder,
                    "membrane_datapath_drop_bytes",
                    "Bytes dropped by the datapath, by reason",
                    m.drops.iter().map(|(r, c)| (reason(r), c.bytes)),
                )?;
            }
            Err(e) => tracing::warn!(error = %e, "metrics: reading datapath counters failed"),
        }
        match source.endpoint_drops() {
            Ok(drops) => {
                let mut summed: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
                for ((_endpoint, reason, direction), packets) in drops {
                    *summed
                        .entry((drop_reason_name(reason), direction_name(direction)))
                        .or_default() += packets;
                }
                counters(
                    &mut encoder,
                    "membrane_endpoint_drops",
                    "Policy drops of local endpoints, summed over endpoints, by reason and direction",
                    summed.into_iter().map(|((reason, direction), n)| {
                        let labels: Labels2 =
                            [("reason", reason), ("direction", direction.to_string())];
                        (labels, n)
                    }),
                )?;
            }
            Err(e) => tracing::warn!(error = %e, "metrics: reading endpoint drops failed"),
        }
        Ok(())
    }
}

/// Encodes one counter family from (labels, value) pairs.
fn counters<const N: usize>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl Iterator<Item = ([(&'static str, String); N], u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

// === impl FlowMetrics ===

/// Counters the flow observer moves as it records flows. Cheap to clone;
/// every clone (and every [`FlowMetrics::global`]) counts into the same
/// families on the process registry.
///
/// ```no_run
/// use membrane_node_datapath::metrics::FlowMetrics;
/// let m = FlowMetrics::global();
/// m.observe("FORWARDED", "");
/// m.observe("DROPPED", "POLICY_DENIED");
/// m.lost(3); // events the pump or the kernel could not deliver
/// ```
#[derive(Clone, Debug)]
pub struct FlowMetrics {
    flows: Family<Labels2, Counter>,
    lost: Counter,
}

impl FlowMetrics {
    /// The process's flow metrics, registered on first use.
    pub fn global() -> Self {
        static GLOBAL: OnceLock<FlowMetrics> = OnceLock::new();
        GLOBAL
            .get_or_init(|| {
                let m = Self::unregistered();
                membrane_runtime::metrics::with_registry(|r| {
                    r.register(
                        "membrane_flows",
                        "Flows recorded by the node's observer, by verdict and drop reason",
                        m.flows.clone(),
                    );
                    r.register(
                        "membrane_flows_lost",
                        "Datapath events that never became flows (ring buffer or pump overflow)",
                        m.lost.clone(),
                    );
                });
                m
            })
            .clone()
    }

    /// Counters on no registry (for tests of code that takes a `FlowMetrics`).
    pub fn unregistered() -> Self {
        Self {
            flows: Family::default(),
            lost: Counter::default(),
        }
    }

    /// Counts one recorded flow. `verdict` is the flow's verdict name
    /// (`FORWARDED`, `DROPPED`, ...); `drop_reason` is [`drop_reason_name`]
    /// for drops and `""` otherwise.
    pub fn observe(&self, verdict: &str, drop_reason: &str) {
        let labels: Labels2 = [
            ("verdict", verdict.to_string()),
            ("drop_reason", drop_reason.to_string()),
        ];
        self.flows.get_or_create(&labels).inc();
    }

    /// Counts `n` events lost. For a running estimate (such as the kernel's
    /// losses, which only grow), pass the increase since the last call.
    pub fn lost(&self, n: u64) {
        self.lost.inc_by(n);
    }

    /// Flows counted with these labels so far.
    pub fn flows(&self, verdict: &str, drop_reason: &str) -> u64 {
        self.flows
            .get(&[
                ("verdict", verdict.to_string()),
                ("drop_reason", drop_reason.to_string()),
            ])
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// Events counted as lost so far.
    pub fn lost_total(&self) -> u64 {
        self.lost.get()
    }
}

#[cfg(test)]
mod tests {
    use membrane_runtime::metrics::prometheus_client::encoding::prometheus_text;
    use membrane_runtime::metrics::prometheus_client::registry::Registry;

    use super::*;
    use crate::bpf::Counter as BpfCounter;

    struct Fake;

    impl DatapathCounters for Fake {
        fn metrics(&self) -> Result<bpf::Metrics, String> {
            Ok(bpf::Metrics {
                lxc_rx: BpfCounter {
                    packets: 10,
                    bytes: 1000,
                },
                redirect_peer: BpfCounter {
                    packets: 7,
                    bytes: 700,
                },
                drops: [(
                    DropReason::PolicyDeny,
                    BpfCounter {
                        packets: 3,
                        bytes: 180,
                    },
                )]
                .into_iter()
                .collect(),
                ..Default::default()
            })
        }

        fn endpoint_drops(&self) -> Result<BTreeMap<(u32, DropReason, Direction), u64>, String> {
            Ok([
                ((1, DropReason::PolicyDeny, Direction::Egress), 2),
                ((2, DropReason::PolicyDeny, Direction::Egress), 1),
                ((2, DropReason::PolicyDefaultDeny, Direction::Ingress), 4),
            ]
            .into_iter()
            .collect())
        }
    }

    fn render(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_text::encode(&mut out, registry).expect("encode");
        out
    }

    #[test]
    fn datapath_counters_and_endpoint_drops_summed_per_reason_and_direction_are_exposed() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(DatapathCollector::new(Arc::new(Fake))));
        let text = render(&registry);
        for line in [
            "membrane_datapath_packets_total{counter=\"lxc_rx\"} 10",
            "membrane_datapath_bytes_total{counter=\"lxc_rx\"} 1000",
            "membrane_datapath_packets_total{counter=\"redirect_peer\"} 7",
            "membrane_datapath_packets_total{counter=\"to_container\"} 0",
            "membrane_datapath_drops_total{reason=\"POLICY_DENIED\"} 3",
            "membrane_datapath_drop_bytes_total{reason=\"POLICY_DENIED\"} 180",
            "membrane_endpoint_drops_total{reason=\"POLICY_DENIED\",direction=\"egress\"} 3",
            "membrane_endpoint_drops_total{reason=\"POLICY_DEFAULT_DENY\",direction=\"ingress\"} 4",
            "# TYPE membrane_endpoint_drops_total counter",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
    }

    #[test]
    fn flow_metrics_count_flows_by_verdict_and_reason_and_lost_events() {
        let m = FlowMetrics::global();
        m.observe("DROPPED", "POLICY_DENIED");
        m.observe("DROPPED", "POLICY_DENIED");
        m.observe("FORWARDED", "");
        m.lost(5);
        assert_eq!(m.flows("DROPPED", "POLICY_DENIED"), 2);
        let text = membrane_runtime::metrics::render();
        for line in [
            "membrane_flows_total{verdict=\"DROPPED\",drop_reason=\"POLICY_DENIED\"} 2",
            "membrane_flows_total{verdict=\"FORWARDED\",drop_reason=\"\"} 1",
            "membrane_flows_lost_total 5",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
    }
}
