//! Generated Rust types and gRPC stubs for Membrane's `.proto` contracts.
//!
//! This is the only crate that contains generated code. Services convert these
//! types into their domain types at their gRPC edge (`TryFrom`), so nothing
//! beyond a service's `grpc` module sees them.
#![allow(missing_docs, clippy::all)]

/// `membrane.common.v1`
pub mod common {
    pub mod v1 {
        tonic::include_proto!("membrane.common.v1");
    }
}

/// `membrane.stream.v1`: the desired-state stream.
pub mod stream {
    pub mod v1 {
        tonic::include_proto!("membrane.stream.v1");
    }
}

/// `membrane.objects.v1`: `membrane apply` / `delete` / `get`.
pub mod objects {
    pub mod v1 {
        tonic::include_proto!("membrane.objects.v1");
    }
}

/// `membrane.ipam.v1`
pub mod ipam {
    pub mod v1 {
        tonic::include_proto!("membrane.ipam.v1");
    }
}

/// The type URL prost uses for a message packed into `google.protobuf.Any`.
pub fn type_url<M: prost::Name>() -> String {
    M::type_url()
}

/// `membrane.node.v1`: the node agent's API.
pub mod node {
    pub mod v1 {
        tonic::include_proto!("membrane.node.v1");
    }
}

/// `membrane.identity.v1`: security identities and the ipcache.
pub mod identity {
    pub mod v1 {
        tonic::include_proto!("membrane.identity.v1");
    }
}

/// `membrane.policy.v1`: network policy, resolved per identity.
pub mod policy {
    pub mod v1 {
        tonic::include_proto!("membrane.policy.v1");
    }
}

/// `membrane.observer.v1`: flows, per node and through the relay.
pub mod observer {
    pub mod v1 {
        tonic::include_proto!("membrane.observer.v1");
    }
}

/// `membrane.lb.v1`: service load balancing.
pub mod lb {
    pub mod v1 {
        tonic::include_proto!("membrane.lb.v1");
    }
}
