//! Cluster-pool IPAM: carves a per-node pod CIDR out of the cluster CIDR and
//! allocates pod addresses from each node's CIDR, with every decision made
//! in an etcd transaction so that replicas never hand out the same address.
//!
//! Module map:
//! - [`pool`]: the domain: CIDR arithmetic and choices, as plain Rust (no I/O).
//! - [`store`]: the etcd adapter: keys, transactions, retries.
//! - [`grpc`]: the `membrane.ipam.v1.Ipam` service and the stream's resource mapping.
//! - [`objects`]: the `Node` kind for `membrane apply`.
#![forbid(unsafe_code)]

pub mod grpc;
pub mod objects;
pub mod pool;
pub mod store;
