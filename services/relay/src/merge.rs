//! Ordering items from many nodes by time.
//!
//! Every node returns its own flows in time order; the relay must return the
//! cluster's. Two shapes:
//! - a finished query (no `follow`): everything is collected first, so
//!   [`most_recent`] sorts it and keeps the newest `number` flows overall;
//! - a live stream (`follow`): items arrive while nodes keep sending, so a
//!   [`ReorderWindow`] holds each item for a short window and releases items
//!   in time order, trading that much latency for order across nodes whose
//!   streams are a little out of step.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// What an item is, for counting against `number`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A flow: counts towards `number`.
    Flow,
    /// A report (lost events, an unavailable node): always passed through.
    Report,
}

/// An item from one node with the time it is ordered by.
#[derive(Debug, Clone, PartialEq)]
pub struct Timed<T> {
    /// Nanoseconds since the Unix epoch.
    pub time_ns: i128,
    /// The node it came from; among equal times, items order by node name.
    pub node: String,
    /// Flow or report.
    pub kind: Kind,
    /// The item itself.
    pub item: T,
}

/// Sorts `items` by time (node name breaking ties, each node's own order kept
/// among its equal times) and keeps the `number` most recent flows (`0`: all).
/// Reports are kept whatever their time: they say that something is missing.
pub fn most_recent<T>(mut items: Vec<Timed<T>>, number: u64) -> Vec<Timed<T>> {
    // A stable sort keeps each node's order among equal timestamps.
    items.sort_by(|a, b| (a.time_ns, &a.node).cmp(&(b.time_ns, &b.node)));
    if number == 0 {
        return items;
    }
    let flows = items.iter().filter(|i| i.kind == Kind::Flow).count();
    let mut skip = flows.saturating_sub(usize::try_from(number).unwrap_or(usize::MAX));
    items.retain(|i| {
        if i.kind == Kind::Flow && skip > 0 {
            skip -= 1;
            false
        } else {
            true
        }
    });
    items
}

/// Holds live items for up to `window` and releases them in time order.
///
/// Rule: as long as the item that arrived first has waited `window`, the
/// earliest item (by time) is released. So no item waits much longer than the
/// window, and items that arrive within a window of each other come out
/// sorted even when their nodes sent them out of step.
#[derive(Debug)]
pub struct ReorderWindow<T> {
    window: Duration,
    seq: u64,
    by_time: BTreeMap<(i128, u64), (Instant, Timed<T>)>,
    by_arrival: BTreeSet<(Instant, u64)>,
}

// === impl ReorderWindow ===

impl<T> ReorderWindow<T> {
    /// An empty window of `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            seq: 0,
            by_time: BTreeMap::new(),
            by_arrival: BTreeSet::new(),
        }
    }

    /// Adds an item that arrived at `now`.
    pub fn push(&mut self, item: Timed<T>, now: Instant) {
        self.seq += 1;
        self.by_arrival.insert((now, self.seq));
        self.by_time.insert((item.time_ns, self.seq), (now, item));
    }

    /// Items due at `now`, in time order.
    pub fn pop_ready(&mut self, now: Instant) -> Vec<Timed<T>> {
        let mut out = Vec::new();
        while let Some(&(oldest, _)) = self.by_arrival.first() {
            if oldest + self.window > now {
                break;
            }
            match self.pop_earliest() {
                Some(item) => out.push(item),
                None => break,
            }
        }
        out
    }

    /// When the next item becomes due, if any is held.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_arrival.first().map(|(t, _)| *t + self.window)
    }

    /// Everything held, in time order (the inputs have ended).
    pub fn drain(&mut self) -> Vec<Timed<T>> {
        let mut out = Vec::with_capacity(self.by_time.len());
        while let Some(item) = self.pop_earliest() {
            out.push(item);
        }
        out
    }

    /// Number of items held.
    pub fn len(&self) -> usize {
        self.by_time.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.by_time.is_empty()
    }

    fn pop_earliest(&mut self) -> Option<Timed<T>> {
        let ((_, seq), (arrived, item)) = self.by_time.pop_first()?;
        self.by_arrival.remove(&(arrived, seq));
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(node: &str, t: i128) -> Timed<String> {
        Timed {
            time_ns: t,
            node: node.into(),
            kind: Kind::Flow,
            item: format!("{node}@{t}"),
        }
    }

    fn report(node: &str, t: i128) -> Timed<String> {
        Timed {
            kind: Kind::Report,
            item: format!("lost {node}@{t}"),
            ..flow(node, t)
        }
    }

    fn names(items: &[Timed<String>]) -> Vec<&str> {
        items.iter().map(|i| i.item.as_str()).collect()
    }

    #[test]
    fn flows_of_two_nodes_interleave_by_time() {
        let items = vec![
            flow("node-1", 10),
            flow("node-1", 30),
            flow("node-2", 20),
            flow("node-2", 40),
        ];
        assert_eq!(
            names(&most_recent(items, 0)),
            ["node-1@10", "node-2@20", "node-1@30", "node-2@40"]
        );
    }

    #[test]
    fn number_keeps_the_most_recent_flows_across_all_nodes() {
        // Each node returned its own last 3; the cluster's last 3 are mixed.
        let items = vec![
            flow("node-1", 1),
            flow("node-1", 2),
            flow("node-1", 9),
            flow("node-2", 5),
            flow("node-2", 7),
            flow("node-2", 8),
        ];
        assert_eq!(
            names(&most_recent(items, 3)),
            ["node-2@7", "node-2@8", "node-1@9"]
        );
    }

    #[test]
    fn equal_times_order_by_node_and_keep_each_nodes_order() {
        let mut a = flow("node-2", 5);
        a.item = "second of node-2".into();
        let items = vec![flow("node-2", 5), a, flow("node-1", 5)];
        assert_eq!(
            names(&most_recent(items, 0)),
            ["node-1@5", "node-2@5", "second of node-2"]
        );
    }

    #[test]
    fn lost_events_pass_through_and_do_not_count_as_flows() {
        let items = vec![
            flow("node-1", 1),
            report("node-2", 2),
            flow("node-2", 3),
            flow("node-1", 4),
        ];
        assert_eq!(
            names(&most_recent(items, 2)),
            ["lost node-2@2", "node-2@3", "node-1@4"]
        );
    }

    #[test]
    fn a_number_larger_than_what_is_held_returns_everything() {
        let items = vec![flow("node-1", 1), flow("node-2", 2)];
        assert_eq!(most_recent(items, 100).len(), 2);
    }

    #[test]
    fn the_window_releases_out_of_step_arrivals_in_time_order() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut w = ReorderWindow::new(ms(200));
        w.push(flow("node-1", 30), start);
        w.push(flow("node-2", 10), start + ms(50));
        w.push(flow("node-1", 20), start + ms(100));
        assert!(
            w.pop_ready(start + ms(199)).is_empty(),
            "held for the window"
        );
        assert_eq!(w.next_deadline(), Some(start + ms(200)));
        // The first arrival is due: everything up to it comes out sorted.
        assert_eq!(
            names(&w.pop_ready(start + ms(200))),
            ["node-2@10", "node-1@20", "node-1@30"]
        );
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn no_item_waits_much_longer_than_the_window() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut w = ReorderWindow::new(ms(200));
        w.push(flow("node-1", 100), start);
        // Earlier flows keep arriving; the first arrival still leaves on time.
        w.push(flow("node-2", 50), start + ms(150));
        w.push(flow("node-2", 40), start + ms(190));
        let out = w.pop_ready(start + ms(200));
        assert_eq!(names(&out), ["node-2@40", "node-2@50", "node-1@100"]);
    }

    #[test]
    fn later_arrivals_wait_for_their_own_window() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut w = ReorderWindow::new(ms(200));
        w.push(flow("node-1", 10), start);
        w.push(flow("node-2", 20), start + ms(150));
        assert_eq!(names(&w.pop_ready(start + ms(200))), ["node-1@10"]);
        assert_eq!(w.len(), 1);
        assert_eq!(w.next_deadline(), Some(start + ms(350)));
        assert_eq!(names(&w.drain()), ["node-2@20"]);
    }
}
