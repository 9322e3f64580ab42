//! Security identities: every endpoint gets a numeric identity derived from
//! its security-relevant labels, the same number for the same label set on
//! every node and from every replica; and the ipcache, which tells every
//! node the identity of each IP address. State lives in etcd, each decision
//! in one transaction, and is published on the desired-state stream.
//!
//! Module map:
//! - [`labels`]: the label model: sources, filtering, the canonical form (pure).
//! - [`numbers`]: reserved identities, the global range, CIDR identities (pure).
//! - [`gc`]: which unreferenced identities to collect, and the invariant that makes it safe (pure).
//! - [`config`]: the validated configuration and duration parsing (pure).
//! - [`error`]: the domain's error enum.
//! - [`store`]: the etcd adapter: key layout, transactions, leases, the GC loop.
//! - [`grpc`]: the `membrane.identity.v1.Identity` service and the stream's resource mapping.
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod gc;
pub mod grpc;
pub mod labels;
pub mod numbers;
pub mod store;
