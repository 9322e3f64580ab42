//! Network policy for Membrane: CiliumNetworkPolicy,
//! CiliumClusterwideNetworkPolicy and Kubernetes NetworkPolicy (plus
//! Namespace labels), applied with `membrane apply`, stored in etcd,
//! resolved against the identity service's identities into one policy per
//! subject identity, and published to nodes on the desired-state stream.
//!
//! Module map:
//! - [`labels`]: labels and selectors as Cilium reads them (pure).
//! - [`docs`]: the documents as written, typed with serde (pure).
//! - [`model`]: validation into the domain, with field paths (pure).
//! - [`resolve`]: per-identity resolution and `trace`, the datapath's semantics (pure).
//! - [`store`]: the etcd adapter: key layout, all-or-nothing writes, list + watch.
//! - [`objects`]: the four kinds for `membrane apply`.
//! - [`engine`]: recomputes on every change of policies or identities and publishes.
//! - [`grpc`]: `membrane.policy.v1.Policy`, the identity-stream sink, proto conversions.
#![forbid(unsafe_code)]

pub mod docs;
pub mod engine;
pub mod grpc;
pub mod labels;
pub mod model;
pub mod objects;
pub mod resolve;
pub mod store;
