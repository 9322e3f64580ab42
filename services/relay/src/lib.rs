//! The relay: one `membrane.observer.v1.Observer` for the whole cluster.
//! It learns the nodes from IPAM (or a fixed list), keeps a client to every
//! node's observer, fans each request out to all of them and merges the
//! answers in time order, saying which nodes could not be reached.
//!
//! Module map:
//! - [`merge`]: the domain: ordering items from many nodes by time (most
//!   recent N; a reorder window for live streams). Plain Rust, no I/O.
//! - [`status`]: the domain: summing node observer states into the cluster's.
//! - [`nodes`]: the nodes side: the [`nodes::NodeObserver`] seam (a gRPC
//!   client in production, in-process streams in tests), the `--nodes` list
//!   and discovery from IPAM.
//! - [`grpc`]: the `Observer` service the relay serves: fan-out, merge, status.
//!
//! Only `nodes` and `grpc` see generated types.
#![forbid(unsafe_code)]

pub mod grpc;
pub mod merge;
pub mod nodes;
pub mod status;
