//! The node's gRPC API (`membrane.node.v1.Node`): endpoints for the CNI
//! plugin and the CLI, and the node's status. The only module besides the
//! agent wiring that sees generated types.

use std::collections::BTreeMap;
use std::sync::Arc;

use membrane_proto::node::v1 as pb;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::bpf::{Datapath, LbAlgorithm};
use crate::endpoints::{AddRequest, EndpointError, EndpointManager, EndpointRecord};
use crate::lb::LbView;

impl std::fmt::Debug for NodeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeApi")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl From<EndpointError> for Status {
    fn from(e: EndpointError) -> Self {
        let msg = e.to_string();
        match e {
            EndpointError::Invalid { .. } => Status::invalid_argument(msg),
            EndpointError::AlreadyExists { .. } => Status::already_exists(msg),
            EndpointError::NotFound { .. } => Status::not_found(msg),
            EndpointError::Drifted { .. } => Status::failed_precondition(msg),
            EndpointError::Ipam(s) => Status::new(s.code(), format!("ipam: {}", s.message())),
            EndpointError::Identity(s) => {
                Status::new(s.code(), format!("identity: {}", s.message()))
            }
            EndpointError::Netlink(_)
            | EndpointError::Datapath(_)
            | EndpointError::State { .. } => Status::internal(msg),
        }
    }
}

/// What the node reports about itself besides endpoints.
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    /// Underlay address.
    pub underlay_ip: String,
    /// Cluster CIDR.
    pub cluster_cidr: String,
    /// Features in use.
    pub features: Vec<String>,
    /// Delivery mode.
    pub delivery: String,
}

/// The `Node` service.
#[derive(Clone)]
pub struct NodeApi {
    endpoints: Arc<EndpointManager>,
    datapath: Arc<std::sync::Mutex<Datapath>>,
    facts: NodeFacts,
    applied: watch::Receiver<BTreeMap<String, u64>>,
    lb: Option<LbView>,
}

impl NodeApi {
    /// Serves `endpoints`; `applied` tracks the streams' applied versions;
    /// `lb` is what service load balancing programmed (None: it is off).
    pub fn new(
        endpoints: Arc<EndpointManager>,
        datapath: Arc<std::sync::Mutex<Datapath>>,
        facts: NodeFacts,
        applied: watch::Receiver<BTreeMap<String, u64>>,
        lb: Option<LbView>,
    ) -> pb::node_server::NodeServer<Self> {
        pb::node_server::NodeServer::new(Self {
            endpoints,
            datapath,
            facts,
            applied,
            lb,
        })
    }

    fn to_pb(&self, r: EndpointRecord, programmed: bool) -> pb::Endpoint {
        pb::Endpoint {
            id: r.id,
            container_id: r.container_id,
            netns: r.netns,
            ifname: r.ifname,
            mac: r.mac,
            host_ifname: r.host_ifname,
            host_mac: r.host_mac,
            host_ifindex: r.host_ifindex,
            address: format!("{}/32", r.ip),
            gateway: self.endpoints.net().gateway.to_string(),
            pod_name: r.pod_name,
            pod_namespace: r.pod_namespace,
            labels: r.labels.into_iter().collect(),
            identity: r.identity,
            programmed,
            node: self.endpoints.node().to_string(),
        }
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for NodeApi {
    async fn add_endpoint(
        &self,
        req: Request<pb::AddEndpointRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let pb::AddEndpointRequest {
            container_id,
            netns,
            ifname,
            pod_name,
            pod_namespace,
            labels,
            annotations,
        } = req.into_inner();
        let record = self
            .endpoints
            .add(AddRequest {
                container_id,
                netns,
                ifname,
                pod_name,
                pod_namespace,
                labels: labels.into_iter().collect(),
                annotations: annotations.into_iter().collect(),
            })
            .await?;
        Ok(Response::new(self.to_pb(record, true)))
    }

    async fn del_endpoint(
        &self,
        req: Request<pb::DelEndpointRequest>,
    ) -> Result<Response<pb::DelEndpointResponse>, Status> {
        let pb::DelEndpointRequest {
            container_id,
            ifname,
        } = req.into_inner();
        let existed = self.endpoints.del(&container_id, &ifname).await?;
        Ok(Response::new(pb::DelEndpointResponse { existed }))
    }

    async fn check_endpoint(
        &self,
        req: Request<pb::CheckEndpointRequest>,
    ) -> Result<Response<pb::CheckEndpointResponse>, Status> {
        let pb::CheckEndpointRequest {
            container_id,
            netns,
            ifname,
        } = req.into_inner();
        let endpoints = self.endpoints.clone();
        tokio::task::spawn_blocking(move || endpoints.check(&container_id, &netns, &ifname))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(pb::CheckEndpointResponse {}))
    }

    async fn list_endpoints(
        &self,
        _req: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::ListEndpointsResponse>, Status> {
        let programmed = self.endpoints.programmed()?;
        let endpoints = self
            .endpoints
            .records()
            .into_iter()
            .map(|r| {
                let p = programmed
                    .get(&r.ip)
                    .is_some_and(|e| e.ifindex == r.host_ifindex);
                self.to_pb(r, p)
            })
            .collect();
        Ok(Response::new(pb::ListEndpointsResponse { endpoints }))
    }

    async fn set_endpoint_labels(
        &self,
        req: Request<pb::SetEndpointLabelsRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let pb::SetEndpointLabelsRequest {
            container_id,
            ifname,
            labels,
        } = req.into_inner();
        let record = self
            .endpoints
            .set_labels(&container_id, &ifname, labels.into_iter().collect())
            .await?;
        Ok(Response::new(self.to_pb(record, true)))
    }

    async fn ipcache(
        &self,
        _req: Request<pb::IpcacheRequest>,
    ) -> Result<Response<pb::IpcacheResponse>, Status> {
        let entries = self
            .datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ipcache()
            .map_err(|e| Status::internal(format!("read ipcache map: {e:#}")))?
            .into_iter()
            .map(|(prefix, identity)| pb::IpcacheMapEntry {
                prefix: prefix.to_string(),
                identity,
            })
            .collect();
        Ok(Response::new(pb::IpcacheResponse { entries }))
    }

    async fn service_table(
        &self,
        req: Request<pb::ServiceTableRequest>,
    ) -> Result<Response<pb::ServiceTableResponse>, Status> {
        let pb::ServiceTableRequest { service } = req.into_inner();
        let service = if service.contains('/') {
            service
        } else {
            format!("default/{service}")
        };
        if service.ends_with('/') {
            return Err(Status::invalid_argument(
                "service: required (`namespace/name`)",
            ));
        }
        let lb = self.lb.clone().ok_or_else(|| {
            Status::unavailable(format!(
                "node `{}`: service load balancing is off",
                self.endpoints.node()
            ))
        })?;
        let lookup = service.clone();
        let table = tokio::task::spawn_blocking(move || lb.table(&lookup))
            .await
            .map_err(|e| Status::internal(format!("read service table: {e}")))?
            .map_err(|e| Status::internal(format!("read service table: {e}")))?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "service `{service}` is not programmed on node `{}`",
                    self.endpoints.node()
                ))
            })?;
        let mut per: BTreeMap<String, u32> = BTreeMap::new();
        for a in &table.slots {
            *per.entry(a.to_string()).or_default() += 1;
        }
        Ok(Response::new(pb::ServiceTableResponse {
            service,
            node: self.endpoints.node().to_string(),
            version: table.version,
            algorithm: match table.algorithm {
                LbAlgorithm::Maglev => "maglev",
                LbAlgorithm::Random => "random",
            }
            .to_string(),
            table_size: u32::try_from(table.slots.len()).unwrap_or(u32::MAX),
            slots: table.slots.iter().map(ToString::to_string).collect(),
            slots_per_backend: per.into_iter().collect(),
        }))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        let net = self.endpoints.net();
        Ok(Response::new(pb::NodeStatus {
            node: self.endpoints.node().to_string(),
            underlay_ip: self.facts.underlay_ip.clone(),
            pod_cidr: net.pod_cidr.to_string(),
            cluster_cidr: self.facts.cluster_cidr.clone(),
            features: self.facts.features.clone(),
            delivery: self.facts.delivery.clone(),
            applied_versions: self.applied.borrow().clone().into_iter().collect(),
            endpoints: self.endpoints.records().len() as u32,
        }))
    }
}
