//! The desired-state stream (`membrane.stream.v1.DesiredState`), implemented
//! once for every service and every node.
//!
//! - [`Publisher`] (services): holds the resources a service publishes, each
//!   visible to every node or to one node ([`Scope`]), with a version that only
//!   grows; serves snapshots and updates to subscribed nodes and tracks each
//!   node's ACK/NACK.
//! - [`Subscriber`] (nodes): subscribes, stages snapshots until they are
//!   complete, hands the whole desired state to a [`StateSink`], and ACKs or
//!   NACKs; reconnects with back-off and never drops state while doing so.
//!
//! Batching, on both sides, never changes what a node ends up with:
//! - The publisher sends each node, in one update, all the changes that are
//!   already waiting for it when it sends (net of each other, as the newest
//!   of their versions); a node that keeps up gets one update per version.
//! - The subscriber folds every message it has already received into one
//!   apply, and ACKs (or NACKs) only the newest version it applied. An ACK
//!   of version `v` covers every older version: the publisher records the
//!   highest version acknowledged. Versions still only grow, and a snapshot
//!   is applied only once complete.

mod publisher;
mod subscriber;

pub use publisher::{Change, NodeDelivery, Publisher, PublisherService, Scope};
pub use subscriber::{StateSink, Subscriber, SubscriberState};

/// Resources per snapshot message, so a large snapshot never exceeds the
/// gRPC message limit.
pub const SNAPSHOT_CHUNK: usize = 512;
