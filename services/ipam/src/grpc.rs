//! The gRPC edge: `membrane.ipam.v1.Ipam`, and how IPAM's stored state is
//! published on the desired-state stream. The only module that sees
//! generated types.

use membrane_proto::ipam::v1 as pb;
use membrane_runtime::store::ResourceMapper;
use membrane_runtime::stream::Scope;
use tonic::{Request, Response, Status};

use crate::pool::{self, IpamError};
use crate::store::{AllocRecord, IpamStore, NodeRecord};

impl From<IpamError> for Status {
    fn from(e: IpamError) -> Self {
        let msg = e.to_string();
        match e {
            IpamError::InvalidCidr { .. }
            | IpamError::InvalidIp { .. }
            | IpamError::Empty { .. } => Status::invalid_argument(msg),
            IpamError::UnknownNode(_) => Status::not_found(msg),
            IpamError::Exhausted { .. } | IpamError::ClusterExhausted(_) => {
                Status::resource_exhausted(msg)
            }
            IpamError::NotAllocated { .. }
            | IpamError::CidrTaken { .. }
            | IpamError::CidrMismatch { .. }
            | IpamError::NodeInUse { .. }
            | IpamError::ConfigMismatch { .. } => Status::failed_precondition(msg),
            IpamError::Store(_) => Status::unavailable(msg),
            IpamError::Contention(_) => Status::aborted(msg),
        }
    }
}

/// The `Ipam` gRPC service.
#[derive(Debug, Clone)]
pub struct IpamService {
    store: IpamStore,
}

impl IpamService {
    /// Serves `store`.
    pub fn new(store: IpamStore) -> pb::ipam_server::IpamServer<Self> {
        pb::ipam_server::IpamServer::new(Self { store })
    }

    async fn node_info(&self, n: NodeRecord) -> Result<pb::NodeInfo, IpamError> {
        let allocated = self.store.allocations(Some(&n.name)).await?.len() as u32;
        Ok(pb::NodeInfo {
            node: n.name,
            underlay_ip: n.underlay_ip.to_string(),
            pod_cidr: n.pod_cidr.to_string(),
            allocated,
            capacity: pool::capacity(n.pod_cidr),
        })
    }
}

fn allocation(a: AllocRecord, cidr: ipnet::Ipv4Net) -> pb::Allocation {
    pb::Allocation {
        node: a.node,
        ip: a.ip.to_string(),
        owner: a.owner,
        pod_cidr: cidr.to_string(),
    }
}

#[tonic::async_trait]
impl pb::ipam_server::Ipam for IpamService {
    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let pb::RegisterNodeRequest {
            node,
            underlay_ip,
            pod_cidr,
        } = req.into_inner();
        let underlay = pool::parse_ip("underlay_ip", &underlay_ip)?;
        let requested = match pod_cidr.as_str() {
            "" => None,
            c => Some(pool::parse_cidr("pod_cidr", c)?),
        };
        let rec = self.store.register_node(&node, underlay, requested).await?;
        Ok(Response::new(self.node_info(rec).await?))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let pb::RemoveNodeRequest { node, force } = req.into_inner();
        self.store.remove_node(&node, force).await?;
        Ok(Response::new(pb::RemoveNodeResponse {}))
    }

    async fn list_nodes(
        &self,
        _req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let mut nodes = Vec::new();
        for n in self.store.nodes().await? {
            nodes.push(self.node_info(n).await?);
        }
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn allocate(
        &self,
        req: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        let pb::AllocateRequest { node, owner } = req.into_inner();
        let (a, cidr) = self.store.allocate(&node, &owner).await?;
        Ok(Response::new(allocation(a, cidr)))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let pb::ReleaseRequest { node, ip } = req.into_inner();
        let ip = pool::parse_ip("ip", &ip)?;
        self.store.release(&node, ip).await?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn list_allocations(
        &self,
        req: Request<pb::ListAllocationsRequest>,
    ) -> Result<Response<pb::ListAllocationsResponse>, Status> {
        let pb::ListAllocationsRequest { node } = req.into_inner();
        let filter = (!node.is_empty()).then_some(node.as_str());
        let cidrs: std::collections::BTreeMap<String, ipnet::Ipv4Net> = self
            .store
            .nodes()
            .await?
            .into_iter()
            .map(|n| (n.name, n.pod_cidr))
            .collect();
        let allocations = self
            .store
            .allocations(filter)
            .await?
            .into_iter()
            .filter_map(|a| {
                let cidr = *cidrs.get(&a.node)?;
                Some(allocation(a, cidr))
            })
            .collect();
        Ok(Response::new(pb::ListAllocationsResponse { allocations }))
    }

    async fn get_pool(
        &self,
        _req: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::PoolInfo>, Status> {
        let cfg = self.store.config();
        let nodes = self.store.nodes().await?.len() as u32;
        Ok(Response::new(pb::PoolInfo {
            cluster_cidr: cfg.cluster.to_string(),
            node_mask_size: u32::from(cfg.node_mask),
            nodes,
            node_capacity: cfg.node_capacity().min(u64::from(u32::MAX)) as u32,
        }))
    }
}

/// Publishes every node's CIDR to every node (`node/<name>`, for routes to
/// other nodes' pods) and each node's allocations to that node only
/// (`alloc/<node>/<ip>`).
#[derive(Debug, Clone, Copy, Default)]
pub struct IpamResources;

impl ResourceMapper for IpamResources {
    fn key(&self, rel: &str) -> Option<(String, Scope)> {
        if let Some(node) = rel.strip_prefix("ipam/nodes/") {
            return Some((format!("node/{node}"), Scope::All));
        }
        let rest = rel.strip_prefix("ipam/allocs/")?;
        let (node, ip) = rest.split_once('/')?;
        Some((format!("alloc/{node}/{ip}"), Scope::Node(node.to_string())))
    }

    fn value(&self, rel: &str, value: &[u8]) -> Option<prost_types::Any> {
        if rel.starts_with("ipam/nodes/") {
            let n: NodeRecord = serde_json::from_slice(value).ok()?;
            return prost_types::Any::from_msg(&pb::NodeCidr {
                node: n.name,
                underlay_ip: n.underlay_ip.to_string(),
                pod_cidr: n.pod_cidr.to_string(),
            })
            .ok();
        }
        let a: AllocRecord = serde_json::from_slice(value).ok()?;
        prost_types::Any::from_msg(&pb::Allocation {
            node: a.node,
            ip: a.ip.to_string(),
            owner: a.owner,
            pod_cidr: String::new(),
        })
        .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_published_to_all_and_allocations_to_their_node() {
        let m = IpamResources;
        assert_eq!(
            m.key("ipam/nodes/node-1"),
            Some(("node/node-1".into(), Scope::All))
        );
        assert_eq!(
            m.key("ipam/allocs/node-2/10.200.1.7"),
            Some((
                "alloc/node-2/10.200.1.7".into(),
                Scope::Node("node-2".into())
            ))
        );
        assert_eq!(m.key("ipam/owners/node-2/x"), None);
        assert_eq!(m.key("ipam/config"), None);
        let v = m
            .value(
                "ipam/nodes/node-1",
                br#"{"name":"node-1","underlay_ip":"10.99.0.11","pod_cidr":"10.200.0.0/24"}"#,
            )
            .expect("decodes");
        let n: pb::NodeCidr = v.to_msg().expect("a NodeCidr");
        assert_eq!(n.pod_cidr, "10.200.0.0/24");
        assert!(m.value("ipam/nodes/node-1", b"garbage").is_none());
    }
}
