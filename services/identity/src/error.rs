//! Errors of the identity domain. Messages are lowercase and name the object
//! they are about; [`crate::grpc`] maps each variant to a gRPC code.

use std::net::IpAddr;

/// Everything that can go wrong in the identity service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// A required field is empty.
    #[error("{field}: must not be empty")]
    Empty {
        /// The field.
        field: String,
    },
    /// A label that cannot be part of a label set.
    #[error("{field}: invalid label `{label}`: {reason}")]
    InvalidLabel {
        /// Which input carried it.
        field: String,
        /// The label as given.
        label: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A node name that cannot be used in a key.
    #[error("{field}: invalid node name `{value}`: {reason}")]
    InvalidNode {
        /// Which input carried it.
        field: String,
        /// The value given.
        value: String,
        /// Why it is invalid.
        reason: String,
    },
    /// An address that does not parse.
    #[error("{field}: invalid IP address `{value}`")]
    InvalidIp {
        /// Which input carried it.
        field: String,
        /// The value given.
        value: String,
    },
    /// An identity number that cannot be used where it was given.
    #[error("{field}: identity {id} cannot be used here: {reason}")]
    InvalidIdentity {
        /// Which input carried it.
        field: String,
        /// The number.
        id: u32,
        /// Why not.
        reason: String,
    },
    /// A configuration value (flag) that does not parse or does not fit.
    #[error("{flag}: invalid value `{value}`: {reason}")]
    InvalidConfig {
        /// The flag.
        flag: String,
        /// The value given.
        value: String,
        /// Why it is invalid.
        reason: String,
    },
    /// No identity has this number.
    #[error("identity {0} not found")]
    NotFound(u32),
    /// The node does not reference the identity.
    #[error("identity {id} is not referenced by node `{node}`")]
    NotReferenced {
        /// The identity.
        id: u32,
        /// The node.
        node: String,
    },
    /// The node has no live lease.
    #[error("node `{0}` has no live lease; call Heartbeat first")]
    NoLease(String),
    /// Every number of the range is taken.
    #[error("identity range {range} exhausted: no number left for label set `{labels}`")]
    Exhausted {
        /// The range, e.g. `256-65535`.
        range: String,
        /// The label set that needed one.
        labels: String,
    },
    /// No ipcache entry for this address.
    #[error("ipcache entry for {0} not found")]
    IpcacheNotFound(IpAddr),
    /// The ipcache entry was recorded by another node.
    #[error("ipcache entry for {ip} belongs to node `{owner}`, not `{node}`")]
    IpcacheOwner {
        /// The address.
        ip: IpAddr,
        /// The node that asked.
        node: String,
        /// The node that recorded it.
        owner: String,
    },
    /// etcd could not be reached or refused the request. Nothing was changed.
    #[error("etcd unavailable{context}: {reason}")]
    Unavailable {
        /// ` while <doing what>`, or empty.
        context: String,
        /// What the client reported.
        reason: String,
    },
    /// A stored value is not what the service wrote.
    #[error("corrupt value at `{key}`: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// Why it does not decode.
        reason: String,
    },
    /// Too many concurrent writers kept winning the race.
    #[error("gave up on {what} after {attempts} conflicting attempts")]
    Contention {
        /// What was attempted.
        what: String,
        /// How many times.
        attempts: usize,
    },
}

impl IdentityError {
    /// Says what was being done when etcd became unavailable (a no-op for
    /// every other variant, and for an error that already says it).
    pub fn while_doing(self, doing: impl FnOnce() -> String) -> Self {
        match self {
            IdentityError::Unavailable { context, reason } if context.is_empty() => {
                IdentityError::Unavailable {
                    context: format!(" while {}", doing()),
                    reason,
                }
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailability_names_what_was_being_done_once() {
        let e = IdentityError::Unavailable {
            context: String::new(),
            reason: "connection refused".into(),
        }
        .while_doing(|| "allocating label set `k8s:app=web`".into())
        .while_doing(|| "something else".into());
        assert_eq!(
            e.to_string(),
            "etcd unavailable while allocating label set `k8s:app=web`: connection refused"
        );
        let e = IdentityError::NotFound(300).while_doing(|| "x".into());
        assert_eq!(e.to_string(), "identity 300 not found");
    }
}
