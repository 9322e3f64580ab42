//! The node agent: the only Membrane process that touches eBPF.
//!
//! Module map:
//! - `bpf`: loads the C programs, owns every map and link (the only module with raw aya calls).
//! - [`routes`]: kernel routes to other nodes' pod CIDRs, from IPAM's stream.
//! - [`agent`]: the daemon: registration, stream subscriptions, the node's gRPC API.

pub mod agent;
pub mod bpf;
pub mod routes;
