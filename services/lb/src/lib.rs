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
#![forbid(unsafe_code)]

pub mod grpc;
pub mod maglev;
pub mod model;
pub mod objects;
pub mod reconcile;
pub mod store;
