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

mod publisher;
mod subscriber;

pub use publisher::{Change, NodeDelivery, Publisher, PublisherService, Scope};
pub use subscriber::{StateSink, Subscriber, SubscriberState};

/// Resources per snapshot message, so a large snapshot never exceeds the
/// gRPC message limit.
pub const SNAPSHOT_CHUNK: usize = 512;
