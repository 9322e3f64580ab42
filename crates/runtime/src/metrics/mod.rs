//! Prometheus metrics for every Membrane process: one process-wide registry,
//! a plain-HTTP `/metrics` endpoint in the Prometheus text format (0.0.4),
//! and the metrics every process shares.
//!
//! Module map:
//! - [`rpc`]: a tower layer, installed by [`crate::grpc::serve`], that counts
//!   and times every RPC per method and status code.
//! - [`stream`]: per-node delivery of the desired-state stream, read from a
//!   [`Publisher`](crate::stream::Publisher) at scrape time ([`register_publisher`]).
//! - `http`: the `/metrics` server ([`serve`], [`start`]).
//!
//! Why one global registry: metrics are recorded deep inside shared code
//! (`grpc::serve`, the publisher) that no caller should have to thread a
//! registry through; that is also how Prometheus client libraries work in
//! every other language. Processes add their own families with
//! [`with_registry`] (plain metrics) or [`register_collector`] (values read
//! at scrape time, e.g. eBPF map counters); [`prometheus_client`] is
//! re-exported so crates need no dependency of their own.
//!
//! Naming: everything starts with `membrane_`; counters are registered without
//! the `_total` suffix, which the encoder appends.

mod http;
pub mod rpc;
pub mod stream;

use std::sync::{Mutex, MutexGuard, OnceLock};

pub use prometheus_client;
use prometheus_client::collector::Collector;
use prometheus_client::registry::Registry;

pub use self::http::{serve, start};
pub use self::stream::register_publisher;

/// `Content-Type` of what [`render`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

fn registry() -> MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    // Registration never panics while holding the lock; should it, the
    // registry is still consistent enough to keep serving.
    REGISTRY
        .get_or_init(|| Mutex::new(Registry::default()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` with the process-wide registry, e.g. to register a counter:
///
/// ```
/// use membrane_runtime::metrics::{self, prometheus_client::metrics::counter::Counter};
/// let restarts: Counter = Counter::default();
/// metrics::with_registry(|r| r.register("membrane_example_restarts", "Restarts.", restarts.clone()));
/// restarts.inc();
/// assert!(metrics::render().contains("membrane_example_restarts_total 1"));
/// ```
///
/// Register each family once per process: the registry does not merge
/// families of the same name.
pub fn with_registry<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    f(&mut registry())
}

/// Adds a collector whose metrics are produced at every scrape.
pub fn register_collector(collector: impl Collector) {
    registry().register_collector(Box::new(collector));
}

/// The current value of every metric, in the Prometheus text format.
///
/// Collectors run on the calling thread (the `/metrics` server calls this
/// from a blocking task, since collectors may do system calls).
pub fn render() -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; a collector that fails is a bug,
    // and what was encoded so far is still worth serving.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry()) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    out
}
