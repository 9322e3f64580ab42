//! Service load balancing (the control plane): owns the service model,
//! allocates frontends, gives backends stable ids and publishes, per
//! service, everything a node needs to load-balance it (Maglev parameters,
//! not the table: the table is a pure function of what is published).
//!
//! Module map:
//! - [`maglev`]: Maglev consistent hashing, as plain Rust (no I/O).
//! - [`model`]: the domain: services, their validation, backends and the
//!   published per-service state, as plain Rust (no I/O).
//! - [`store`]: the etcd adapter: config and seed, services, allocations in
//!   transactions, backend ids.
//! - [`objects`]: `Service`, `Endpoints` and `EndpointSlice` for `membrane apply`.
//! - [`reconcile`]: stored objects + pods → published `service/<ns>/<name>`.
//! - [`grpc`]: the `membrane.lb.v1.LoadBalancer` service, the proto
//!   conversions and the identity-stream sink that supplies pods.
//!
//! Feature `server` (default): everything but [`maglev`]. Without it the
//! crate is [`maglev`] alone, with no I/O dependencies (the node agent
//! uses it that way to build tables).
#![forbid(unsafe_code)]

#[cfg(feature = "server")]
pub mod grpc;
pub mod maglev;
#[cfg(feature = "server")]
pub mod model;
#[cfg(feature = "server")]
pub mod objects;
#[cfg(feature = "server")]
pub mod reconcile;
#[cfg(feature = "server")]
pub mod store;
