//! What every Membrane process shares, defined once.
//!
//! Module map:
//! - [`flags`]: command-line flag groups (listen address, TLS, etcd, telemetry, metrics), each readable from an environment variable.
//! - [`telemetry`]: structured logging and OpenTelemetry tracing over OTLP.
//! - [`tls`]: mTLS for every gRPC listener and client (rustls).
//! - [`pki`]: a development CA and certificates for local clusters.
//! - [`grpc`]: serving (health, tracing, graceful shutdown) and connecting.
//! - [`store`]: etcd helpers shared by every service's store adapter.
//! - [`stream`]: the desired-state stream, publisher half (services) and subscriber half (nodes).
//! - [`objects`]: the `apply` path: Kubernetes-style objects and the seam for where they come from.
//! - [`metrics`]: Prometheus metrics: the process registry, `/metrics`, RPC and stream metrics.
#![forbid(unsafe_code)]

pub mod flags;
pub mod grpc;
pub mod metrics;
pub mod objects;
pub mod pki;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod tls;
