//! The node's flow observer (Hubble's per-node part): datapath events become
//! flows, kept in a ring and served as `membrane.observer.v1.Observer`.
//!
//! Code map:
//! - [`clock`]: datapath timestamps (`CLOCK_MONOTONIC`) to wall-clock time.
//! - [`flow`]: one event → one `Flow`, enriched from the node's endpoints and
//!   the identity stream's [`crate::identity::ClusterView`].
//! - [`ring`]: the last N flows with sequence numbers, and query selection
//!   with lost-flow accounting (pure).
//! - [`filter`]: `FlowFilter` semantics (pure).
//! - [`pump`]: the tasks that read the event ring buffer and record flows,
//!   and the estimate of events the kernel could not deliver.
//! - [`grpc`]: the tonic service (the only place that sees tonic).
//!
//! What the datapath emits (and so what flows exist): a trace event on each
//! connection's first packet (when connection tracking creates its entry,
//! in `bpf_lxc` for traffic leaving a pod and in `bpf_host`/`to_container`
//! for traffic entering one), and a drop event for every drop. Established
//! and reply packets produce no events: that is the sampling, done in the
//! kernel. One connection therefore shows as one FORWARDED flow per hook
//! that created state for it, while a blocked client retrying shows one
//! DROPPED flow per attempt.
//!
//! Invariants:
//! - The pump never makes the kernel wait: the task draining the ring buffer
//!   only decodes and hands events over a bounded queue; when the queue is
//!   full the event is counted as lost, not awaited. (The kernel never waits
//!   anyway: a full ring buffer loses the event, never the packet.)
//! - Sequence numbers only grow; a query that reaches past what the ring
//!   still holds is answered with a `LostEvents` item first, never an error.
//! - Flow types are the generated `membrane.observer.v1` messages: a flow is
//!   a wire record, and the relay merges the very same type (a twin domain
//!   struct would be a field-by-field copy). Only `grpc` sees tonic.

pub mod clock;
pub mod filter;
pub mod flow;
pub mod grpc;
pub mod pump;
pub mod ring;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use membrane_proto::observer::v1 as pb;
use tokio::sync::broadcast;

pub use flow::{BuiltFlow, FlowBuilder, LocalEndpoint, LocalEndpoints};
pub use grpc::ObserverService;
pub use pump::{DatapathCounters, EventCounters, spawn_pump};
pub use ring::{Entry, Query, Ring, Selection};

use crate::metrics::FlowMetrics;

/// The ring's default capacity (Hubble's default).
pub const DEFAULT_CAPACITY: usize = 4095;

/// A recorded flow as the ring and followers see it.
pub type FlowEntry = Entry<Arc<pb::Flow>>;

/// The observer's shared state: cheap to clone.
#[derive(Clone)]
pub struct Observer {
    shared: Arc<Shared>,
}

struct Shared {
    node: String,
    enabled: bool,
    started: Instant,
    ring: Mutex<Ring<Arc<pb::Flow>>>,
    /// New flows for followers; sent under the ring lock, so a follower that
    /// subscribes under the same lock sees every flow after its snapshot.
    tx: broadcast::Sender<FlowEntry>,
    rate: Mutex<RateWindow>,
    /// Events read from the ring buffer but dropped because the flow
    /// builder fell behind (the pump's queue was full).
    lost_in_pump: AtomicU64,
    /// Events the datapath counted but never delivered (estimate, see `pump`).
    lost_in_kernel: AtomicU64,
    /// Prometheus counters moved as flows are recorded and lost.
    metrics: OnceLock<FlowMetrics>,
}

/// The observer's state, as `ServerStatus` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub num_flows: u64,
    pub max_flows: u64,
    pub seen_flows: u64,
    pub uptime_ns: u64,
    pub flows_rate: f64,
    pub lost_events: u64,
    pub enabled: bool,
}

// === impl Observer ===

impl Observer {
    /// An observer for `node` holding the last `capacity` flows; `enabled`
    /// false when flow events are turned off (nothing will be recorded).
    pub fn new(node: impl Into<String>, capacity: usize, enabled: bool) -> Self {
        let ring = Ring::new(capacity);
        // Followers may lag by up to a ring's worth before they lose flows.
        let (tx, _) = broadcast::channel(ring.capacity().clamp(16, 1 << 16));
        Self {
            shared: Arc::new(Shared {
                node: node.into(),
                enabled,
                started: Instant::now(),
                ring: Mutex::new(ring),
                tx,
                rate: Mutex::new(RateWindow::default()),
                lost_in_pump: AtomicU64::new(0),
                lost_in_kernel: AtomicU64::new(0),
                metrics: OnceLock::new(),
            }),
        }
    }

    /// Also counts recorded and lost flows in `metrics` (first call wins).
    pub fn set_metrics(&self, metrics: FlowMetrics) {
        let _ = self.shared.metrics.set(metrics);
    }

    /// The node whose flows these are.
    pub fn node(&self) -> &str {
        &self.shared.node
    }

    /// Records one flow: into the ring, to followers, into the rate.
    pub fn record(&self, built: BuiltFlow) {
        if let Some(m) = self.shared.metrics.get() {
            let verdict =
                pb::Verdict::try_from(built.flow.verdict).unwrap_or(pb::Verdict::Unspecified);
            m.observe(verdict.as_str_name(), &built.flow.drop_reason);
        }
        let flow = Arc::new(built.flow);
        {
            let mut ring = self.lock_ring();
            let seq = ring.push(built.time_ns, flow.clone());
            // No followers is not an error.
            let _ = self.shared.tx.send(Entry {
                seq,
                time_ns: built.time_ns,
                item: flow,
            });
        }
        let secs = self.shared.started.elapsed().as_secs();
        self.shared
            .rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(secs);
    }

    /// Answers `query` from the ring and, atomically with it, subscribes to
    /// the flows recorded afterwards.
    pub fn select_and_follow(
        &self,
        query: &Query,
        keep: impl Fn(&pb::Flow) -> bool,
    ) -> (Selection<Arc<pb::Flow>>, broadcast::Receiver<FlowEntry>) {
        let ring = self.lock_ring();
        let sel = ring.select(query, |f| keep(f));
        (sel, self.shared.tx.subscribe())
    }

    /// Counts events dropped between the ring buffer and the flow builder.
    pub fn add_lost_in_pump(&self, n: u64) {
        self.shared.lost_in_pump.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = self.shared.metrics.get() {
            m.lost(n);
        }
    }

    /// Raises the estimate of events the kernel could not deliver.
    pub fn set_lost_in_kernel(&self, n: u64) {
        let before = self.shared.lost_in_kernel.fetch_max(n, Ordering::Relaxed);
        if let Some(m) = self.shared.metrics.get()
            && n > before
        {
            m.lost(n - before);
        }
    }

    /// The observer's state now.
    pub fn status(&self) -> Status {
        let (num_flows, max_flows, seen_flows) = {
            let ring = self.lock_ring();
            (ring.len() as u64, ring.capacity() as u64, ring.pushed())
        };
        let elapsed = self.shared.started.elapsed();
        let flows_rate = self
            .shared
            .rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .per_second(elapsed.as_secs(), elapsed.as_secs_f64());
        Status {
            num_flows,
            max_flows,
            seen_flows,
            uptime_ns: u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            flows_rate,
            lost_events: self.shared.lost_in_pump.load(Ordering::Relaxed)
                + self.shared.lost_in_kernel.load(Ordering::Relaxed),
            enabled: self.shared.enabled,
        }
    }

    fn lock_ring(&self) -> std::sync::MutexGuard<'_, Ring<Arc<pb::Flow>>> {
        self.shared.ring.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("node", &self.shared.node)
            .field("enabled", &self.shared.enabled)
            .finish_non_exhaustive()
    }
}

/// Flows per second over the last minute, from per-second buckets.
#[derive(Debug, Clone)]
pub struct RateWindow {
    /// `(second since start, flows in it)`, indexed by `second % 60`.
    buckets: [(u64, u64); 60],
}

impl Default for RateWindow {
    fn default() -> Self {
        Self {
            buckets: [(u64::MAX, 0); 60],
        }
    }
}

impl RateWindow {
    /// Counts one flow in second `sec` (seconds since start).
    pub fn add(&mut self, sec: u64) {
        let b = &mut self.buckets[(sec % 60) as usize];
        if b.0 != sec {
            *b = (sec, 0);
        }
        b.1 += 1;
    }

    /// Flows per second over the minute up to second `now_sec`; over the
    /// time since start while younger than a minute (`uptime_secs`).
    pub fn per_second(&self, now_sec: u64, uptime_secs: f64) -> f64 {
        let total: u64 = self
            .buckets
            .iter()
            .filter(|(s, _)| *s != u64::MAX && *s <= now_sec && now_sec - *s < 60)
            .map(|(_, n)| n)
            .sum();
        total as f64 / uptime_secs.clamp(1.0, 60.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(time_ns: i64) -> BuiltFlow {
        BuiltFlow {
            time_ns,
            flow: pb::Flow {
                node_name: "obs-a".into(),
                ..pb::Flow::default()
            },
        }
    }

    #[test]
    fn the_rate_counts_only_the_last_minute() {
        let mut r = RateWindow::default();
        for s in [0, 0, 1, 30, 61, 61] {
            r.add(s);
        }
        // At second 61 the window is seconds 2..=61: 0 and 1 fell out.
        assert_eq!(r.per_second(61, 61.5), 3.0 / 60.0);
        // Young observers divide by their uptime.
        let mut young = RateWindow::default();
        young.add(0);
        young.add(1);
        assert_eq!(young.per_second(1, 2.0), 1.0);
    }

    #[test]
    fn status_counts_held_seen_and_lost_flows() {
        let obs = Observer::new("obs-a", 2, true);
        for t in 0..5 {
            obs.record(built(t));
        }
        let metrics = FlowMetrics::unregistered();
        obs.set_metrics(metrics.clone());
        obs.record(built(5));
        obs.add_lost_in_pump(3);
        obs.set_lost_in_kernel(4);
        obs.set_lost_in_kernel(2); // an estimate never goes down
        let s = obs.status();
        assert_eq!(
            (s.num_flows, s.max_flows, s.seen_flows, s.lost_events),
            (2, 2, 6, 7)
        );
        assert!(s.enabled && s.flows_rate > 0.0);
        assert_eq!(metrics.flows("VERDICT_UNSPECIFIED", ""), 1);
        assert_eq!(metrics.lost_total(), 7);
    }

    #[tokio::test]
    async fn a_follower_sees_every_flow_after_its_snapshot_and_a_lagging_one_learns_how_many_it_lost()
     {
        let obs = Observer::new("obs-a", 16, true);
        obs.record(built(1));
        let (sel, mut rx) = obs.select_and_follow(&Query::default(), |_| true);
        assert_eq!((sel.entries.len(), sel.next_seq), (1, 1));
        obs.record(built(2));
        assert_eq!(rx.recv().await.expect("next").seq, 1);
        // The channel holds 16: 20 more make the follower lag by 4.
        for t in 0..20 {
            obs.record(built(t));
        }
        match rx.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert_eq!(n, 4),
            other => panic!("expected a lag, got {other:?}"),
        }
    }
}
