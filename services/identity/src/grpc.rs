//! The gRPC edge: `membrane.identity.v1.Identity`, and how the stored state
//! is published on the desired-state stream. The only module that sees
//! generated types.

use std::net::IpAddr;

use membrane_proto::identity::v1 as pb;
use membrane_runtime::store::ResourceMapper;
use membrane_runtime::stream::Scope;
use tonic::{Request, Response, Status};

use crate::error::IdentityError;
use crate::labels::{self, LabelSet};
use crate::numbers::{self, Kind};
use crate::store::{IdentityDetail, IdentityRecord, IdentityStore, IpcacheRecord, keys};

impl From<IdentityError> for Status {
    fn from(e: IdentityError) -> Self {
        let msg = e.to_string();
        match e {
            IdentityError::Empty { .. }
            | IdentityError::InvalidLabel { .. }
            | IdentityError::InvalidNode { .. }
            | IdentityError::InvalidIp { .. }
            | IdentityError::InvalidIdentity { .. }
            | IdentityError::InvalidConfig { .. } => Status::invalid_argument(msg),
            IdentityError::NotFound(_) | IdentityError::IpcacheNotFound(_) => {
                Status::not_found(msg)
            }
            IdentityError::NotReferenced { .. }
            | IdentityError::NoLease(_)
            | IdentityError::IpcacheOwner { .. } => Status::failed_precondition(msg),
            IdentityError::Exhausted { .. } => Status::resource_exhausted(msg),
            IdentityError::Unavailable { .. } => Status::unavailable(msg),
            IdentityError::Corrupt { .. } => Status::internal(msg),
            IdentityError::Contention { .. } => Status::aborted(msg),
        }
    }
}

fn parse_ip(field: &str, value: &str) -> Result<IpAddr, IdentityError> {
    value.trim().parse().map_err(|_| IdentityError::InvalidIp {
        field: field.into(),
        value: value.into(),
    })
}

impl TryFrom<pb::UpsertEndpointRequest> for IpcacheRecord {
    type Error = IdentityError;

    fn try_from(req: pb::UpsertEndpointRequest) -> Result<Self, Self::Error> {
        let pb::UpsertEndpointRequest {
            ip,
            identity,
            node,
            namespace,
            pod,
        } = req;
        Ok(Self {
            ip: parse_ip("ip", &ip)?,
            identity,
            node,
            namespace,
            pod,
        })
    }
}

impl From<IpcacheRecord> for pb::IpcacheEntry {
    fn from(r: IpcacheRecord) -> Self {
        Self {
            prefix: r.prefix(),
            identity: r.identity,
            node: r.node,
            namespace: r.namespace,
            pod: r.pod,
        }
    }
}

impl From<IdentityDetail> for pb::IdentityEntry {
    fn from(d: IdentityDetail) -> Self {
        Self {
            id: d.id,
            labels: d.labels,
            reserved: d.reserved,
            refcount: u32::try_from(d.nodes.len()).unwrap_or(u32::MAX),
            nodes: d.nodes,
            unreferenced_since_unix_ms: d.unreferenced_since_ms.unwrap_or(0),
        }
    }
}

/// The `Identity` gRPC service.
#[derive(Debug, Clone)]
pub struct IdentityService {
    store: IdentityStore,
}

impl IdentityService {
    /// Serves `store`.
    pub fn new(store: IdentityStore) -> pb::identity_server::IdentityServer<Self> {
        pb::identity_server::IdentityServer::new(Self { store })
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityService {
    async fn allocate(
        &self,
        req: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let pb::AllocateRequest {
            node,
            namespace,
            labels,
        } = req.into_inner();
        let set = LabelSet::for_pod(
            &namespace,
            labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &self.store.config().filter,
        )?;
        let a = self.store.allocate(&set, &node).await?;
        Ok(Response::new(pb::AllocateResponse {
            id: a.id,
            labels: set.strings(),
            created: a.created,
        }))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let pb::ReleaseRequest { id, node } = req.into_inner();
        self.store.release(id, &node).await?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn get(
        &self,
        req: Request<pb::GetRequest>,
    ) -> Result<Response<pb::IdentityEntry>, Status> {
        let pb::GetRequest { id } = req.into_inner();
        Ok(Response::new(self.store.get(id).await?.into()))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let pb::ListRequest {} = req.into_inner();
        let identities = self
            .store
            .list()
            .await?
            .into_iter()
            .map(Into::into)
            .collect();
        Ok(Response::new(pb::ListResponse { identities }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let pb::HeartbeatRequest { node } = req.into_inner();
        let lease = self.store.heartbeat(&node).await?;
        Ok(Response::new(pb::HeartbeatResponse {
            lease_id: lease.id,
            new_lease: lease.granted,
            ttl_seconds: lease.ttl_secs,
        }))
    }

    async fn upsert_endpoint(
        &self,
        req: Request<pb::UpsertEndpointRequest>,
    ) -> Result<Response<pb::UpsertEndpointResponse>, Status> {
        let entry = IpcacheRecord::try_from(req.into_inner())?;
        let entry = self.store.upsert_endpoint(entry).await?;
        Ok(Response::new(pb::UpsertEndpointResponse {
            entry: Some(entry.into()),
        }))
    }

    async fn delete_endpoint(
        &self,
        req: Request<pb::DeleteEndpointRequest>,
    ) -> Result<Response<pb::DeleteEndpointResponse>, Status> {
        let pb::DeleteEndpointRequest { ip, node } = req.into_inner();
        self.store
            .delete_endpoint(parse_ip("ip", &ip)?, &node)
            .await?;
        Ok(Response::new(pb::DeleteEndpointResponse {}))
    }

    async fn register_node_ip(
        &self,
        req: Request<pb::RegisterNodeIpRequest>,
    ) -> Result<Response<pb::RegisterNodeIpResponse>, Status> {
        let pb::RegisterNodeIpRequest { node, ip } = req.into_inner();
        let entry = self
            .store
            .register_node_ip(&node, parse_ip("ip", &ip)?)
            .await?;
        Ok(Response::new(pb::RegisterNodeIpResponse {
            entry: Some(entry.into()),
        }))
    }

    async fn list_ipcache(
        &self,
        req: Request<pb::ListIpcacheRequest>,
    ) -> Result<Response<pb::ListIpcacheResponse>, Status> {
        let pb::ListIpcacheRequest { node } = req.into_inner();
        let filter = (!node.is_empty()).then_some(node.as_str());
        let entries = self
            .store
            .ipcache(filter)
            .await?
            .into_iter()
            .map(Into::into)
            .collect();
        Ok(Response::new(pb::ListIpcacheResponse { entries }))
    }
}

/// Publishes every identity (`identity/<id>` → `IdentityInfo`) and every
/// ipcache entry (`ipcache/<prefix>` → `IpcacheEntry`) to every node: any
/// node may receive traffic from any identity and send to any address.
/// References, leases and GC markers stay private.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentityResources;

impl ResourceMapper for IdentityResources {
    fn key(&self, rel: &str) -> Option<(String, Scope)> {
        if let Some(id) = rel.strip_prefix(keys::IDS) {
            let id: u32 = id.parse().ok()?;
            return Some((format!("identity/{id}"), Scope::All));
        }
        let ip: IpAddr = rel.strip_prefix(keys::IPCACHE)?.parse().ok()?;
        let len = if ip.is_ipv4() { 32 } else { 128 };
        Some((format!("ipcache/{ip}/{len}"), Scope::All))
    }

    fn value(&self, rel: &str, value: &[u8]) -> Option<prost_types::Any> {
        if rel.starts_with(keys::IDS) {
            let r: IdentityRecord = serde_json::from_slice(value).ok()?;
            return prost_types::Any::from_msg(&pb::IdentityInfo {
                id: r.id,
                labels: labels::split_canonical(&r.labels),
                reserved: matches!(numbers::kind(r.id), Kind::Reserved(_)),
            })
            .ok();
        }
        let r: IpcacheRecord = serde_json::from_slice(value).ok()?;
        prost_types::Any::from_msg(&pb::IpcacheEntry::from(r)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numbers::Reserved;

    #[test]
    fn identities_and_ipcache_entries_are_published_to_every_node() {
        let m = IdentityResources;
        assert_eq!(
            m.key("identity/ids/300"),
            Some(("identity/300".into(), Scope::All))
        );
        assert_eq!(
            m.key("identity/ipcache/10.200.0.5"),
            Some(("ipcache/10.200.0.5/32".into(), Scope::All))
        );
        assert_eq!(
            m.key("identity/ipcache/fd00::5"),
            Some(("ipcache/fd00::5/128".into(), Scope::All))
        );
        for private in [
            "identity/refs/300/node-1",
            "identity/leases/node-1",
            "identity/unused/300",
            "identity/labels/k8s:app=web",
        ] {
            assert_eq!(m.key(private), None, "{private}");
        }
        let v = m
            .value(
                "identity/ids/300",
                br#"{"id":300,"labels":"k8s:app=web;k8s:io.kubernetes.pod.namespace=default"}"#,
            )
            .expect("decodes");
        let info: pb::IdentityInfo = v.to_msg().expect("an IdentityInfo");
        assert_eq!(
            info.labels,
            vec!["k8s:app=web", "k8s:io.kubernetes.pod.namespace=default"]
        );
        assert!(!info.reserved);
        let v = m
            .value(
                "identity/ipcache/10.200.0.5",
                br#"{"ip":"10.200.0.5","identity":300,"node":"node-1","namespace":"default","pod":"web-1"}"#,
            )
            .expect("decodes");
        let e: pb::IpcacheEntry = v.to_msg().expect("an IpcacheEntry");
        assert_eq!(
            (e.prefix.as_str(), e.identity, e.node.as_str()),
            ("10.200.0.5/32", 300, "node-1")
        );
        assert!(m.value("identity/ids/300", b"garbage").is_none());
    }

    #[test]
    fn the_numbers_agree_with_the_proto() {
        use pb::{IdentityRange as R, ReservedIdentity as I};
        let proto = [
            I::Unspecified,
            I::Host,
            I::World,
            I::Unmanaged,
            I::Health,
            I::Init,
            I::RemoteNode,
        ];
        for (r, p) in Reserved::ALL.iter().zip(proto) {
            assert_eq!(r.id(), p as u32, "{}", r.name());
        }
        assert_eq!(numbers::GLOBAL_MIN, R::GlobalMin as u32);
        assert_eq!(numbers::GLOBAL_MAX, R::GlobalMax as u32);
        assert_eq!(numbers::CIDR_BASE, R::CidrBase as u32);
    }

    #[test]
    fn errors_map_to_codes_with_the_object_named() {
        let s = Status::from(IdentityError::Exhausted {
            range: "256-260".into(),
            labels: "k8s:app=web".into(),
        });
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            s.message(),
            "identity range 256-260 exhausted: no number left for label set `k8s:app=web`"
        );
        let s = Status::from(IdentityError::NoLease("node-1".into()));
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        let s = Status::from(IdentityError::Unavailable {
            context: " while allocating label set `k8s:app=web`".into(),
            reason: "connection refused".into(),
        });
        assert_eq!(s.code(), tonic::Code::Unavailable);
        let err = IpcacheRecord::try_from(pb::UpsertEndpointRequest {
            ip: "10.200.0.500".into(),
            ..Default::default()
        })
        .expect_err("bad ip");
        assert_eq!(err.to_string(), "ip: invalid IP address `10.200.0.500`");
    }
}
