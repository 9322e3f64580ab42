//! `membrane-cni`: the CNI plugin (spec 1.0.0) the container runtime runs
//! for every pod. A thin client: the node agent (`node-datapath`) does the
//! work (IPAM, veth, routes, eBPF) behind `membrane.node.v1.Node` on a unix
//! socket; this crate only translates between CNI and that API.
//!
//! - [`config`]: CNI_* variables and the netconf on stdin, parsed into plain
//!   types; every failure carries its spec error code.
//! - [`result`]: the printed JSON (results, VERSION, errors), versioned.
//! - [`plugin`]: ADD / DEL / CHECK / VERSION over an [`plugin::Agent`] trait.
//! - [`agent`]: that trait over gRPC; the only module that sees tonic.
//!
//! Invariants: stdout carries exactly one JSON document (or nothing, for a
//! successful DEL/CHECK); every failure is a spec error object with exit
//! status 1; no input makes the plugin panic.
#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod plugin;
pub mod result;
