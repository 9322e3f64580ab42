//! The event pump: one task drains the datapath's ring buffer as fast as it
//! can and hands events over a bounded queue; a second builds and records
//! flows. A full queue loses the event (counted), so enrichment never slows
//! the ring buffer's reader down.
//!
//! Lost events are counted where they can be:
//! - in the pump: events read but dropped because the builder fell behind;
//! - in the kernel: a full ring buffer drops the event (`bpf_ringbuf_output`
//!   fails; the datapath keeps no counter of that). The datapath does count
//!   every event's cause: each drop (`drops`) and each new connection
//!   (`ct_new`) emits exactly one event. So events emitted since the pump
//!   started minus events received is what the kernel lost; sampled with a
//!   delay so events still in flight are not counted (a lower bound).
//!
//! Followers that fall behind learn what they missed from their own
//! broadcast lag (see `grpc`), not from these counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{FlowBuilder, Observer};
use crate::bpf::{AsyncEventReader, Datapath};

/// Events between the reader and the builder.
const QUEUE: usize = 8192;
/// How often the kernel's losses are estimated (and how long in-flight events get).
const LOSS_SAMPLE: Duration = Duration::from_secs(2);

/// What the datapath counted of the events it tried to emit.
pub trait EventCounters: Send + Sync + 'static {
    /// Events emitted since the datapath's maps were created (every drop and
    /// every new connection).
    fn emitted(&self) -> Result<u64, String>;
}

/// [`EventCounters`] from the datapath's pinned metrics.
#[derive(Clone)]
pub struct DatapathCounters(pub Arc<Mutex<Datapath>>);

impl EventCounters for DatapathCounters {
    fn emitted(&self) -> Result<u64, String> {
        let dp = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let m = dp.metrics().map_err(|e| format!("{e:#}"))?;
        Ok(m.ct_new.packets + m.dropped())
    }
}

/// Starts the pump: reads `reader` until the tasks are aborted, recording
/// flows built by `builder` into `observer`. With `counters`, also estimates
/// what the kernel's ring buffer lost.
pub fn spawn_pump(
    mut reader: AsyncEventReader,
    mut builder: FlowBuilder,
    observer: Observer,
    counters: Option<Arc<dyn EventCounters>>,
) -> Vec<JoinHandle<()>> {
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let received = Arc::new(AtomicU64::new(0));
    let baseline = counters.as_ref().and_then(|c| c.emitted().ok());
    let mut tasks = Vec::new();

    tasks.push(tokio::spawn({
        let observer = observer.clone();
        let received = received.clone();
        async move {
            loop {
                match reader.next().await {
                    Ok(ev) => {
                        received.fetch_add(1, Ordering::Relaxed);
                        if tx.try_send(ev).is_err() {
                            observer.add_lost_in_pump(1);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "flow events: reading the ring buffer failed; no more flows");
                        return;
                    }
                }
            }
        }
    }));

    tasks.push(tokio::spawn({
        let observer = observer.clone();
        async move {
            while let Some(ev) = rx.recv().await {
                observer.record(builder.build(&ev));
            }
        }
    }));

    if let (Some(counters), Some(baseline)) = (counters, baseline) {
        tasks.push(tokio::spawn(async move {
            let mut estimate = LossEstimate::new(baseline);
            loop {
                // Count what was emitted, give it time to arrive, then compare.
                let emitted = tokio::task::spawn_blocking({
                    let c = counters.clone();
                    move || c.emitted()
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                tokio::time::sleep(LOSS_SAMPLE).await;
                match emitted {
                    Ok(n) => observer
                        .set_lost_in_kernel(estimate.update(n, received.load(Ordering::Relaxed))),
                    Err(e) => {
                        tracing::debug!(error = %e, "flow events: datapath counters unreadable")
                    }
                }
            }
        }));
    }
    tasks
}

/// Events the kernel lost: emitted (by its counters, since `baseline`)
/// minus received, never decreasing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossEstimate {
    baseline: u64,
    lost: u64,
}

impl LossEstimate {
    pub fn new(baseline: u64) -> Self {
        Self { baseline, lost: 0 }
    }

    /// `emitted`: the counters' total at some time; `received`: events the
    /// pump had read by a later time (so everything emitted earlier had
    /// its chance to arrive). Events already in the ring buffer when the
    /// pump started count as received but not as emitted: a lower bound.
    pub fn update(&mut self, emitted: u64, received: u64) -> u64 {
        let expected = emitted.saturating_sub(self.baseline);
        self.lost = self.lost.max(expected.saturating_sub(received));
        self.lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_loss_estimate_is_emitted_minus_received_and_never_shrinks() {
        let mut e = LossEstimate::new(100);
        assert_eq!(e.update(150, 50), 0);
        assert_eq!(e.update(200, 90), 10);
        assert_eq!(
            e.update(210, 110),
            10,
            "a later sample does not undo a loss"
        );
        assert_eq!(e.update(300, 180), 20);
        // Old events in the buffer (received, not emitted since baseline) do not go negative.
        assert_eq!(LossEstimate::new(100).update(100, 5), 0);
    }
}
