//! One module per group of subcommands.

pub mod apply;
pub mod get;
pub mod identities;
pub mod ipam;
pub mod observe;
pub mod pod;
pub mod policy;
pub mod services;
pub mod status;

/// Turns a gRPC status into an error that reads like the service's message.
pub fn status_err(what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", s.message())
}
