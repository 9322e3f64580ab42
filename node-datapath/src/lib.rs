//! The node agent: the only Membrane process that touches eBPF.
//!
//! Module map:
//! - `bpf`: loads the C programs, owns every map and link (the only module with raw aya calls).
//! - [`routes`]: kernel routes to other nodes' pod CIDRs, from IPAM's stream.
//! - [`endpoints`]: attaching pods (veth, addresses, routes, eBPF) and detaching them.
//! - [`identity`]: identities of local pods, the node's lease, the ipcache map from the identity service's stream.
//! - [`lb`]: socket-level ClusterIP load balancing from the lb service's stream (behind `--service-lb`).
//! - [`netlink`]: iproute2 invocations, in the node's or a pod's namespace.
//! - [`policy`]: network policy from the policy service's stream into per-endpoint eBPF entries.
//! - [`masquerade`]: nftables masquerading of traffic leaving the cluster.
//! - [`metrics`]: Prometheus metrics of the node: datapath counters, drops, flow observer hooks.
//! - [`api`]: the node's gRPC API (`membrane.node.v1.Node`).
//! - [`observer`]: flows from the datapath's events: ring, filters, `membrane.observer.v1.Observer`.
//! - [`agent`]: the daemon: registration, datapath, stream subscriptions, serving.

pub mod agent;
pub mod api;
pub mod bpf;
pub mod endpoints;
pub mod identity;
pub mod lb;
pub mod masquerade;
pub mod metrics;
pub mod netlink;
pub mod observer;
pub mod policy;
pub mod routes;
