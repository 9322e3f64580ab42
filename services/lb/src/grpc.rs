//! The gRPC edge: `membrane.lb.v1.LoadBalancer`, the conversion of the
//! published state to and from proto, and the identity-stream sink that
//! turns `identity/<id>` + `ipcache/<prefix>` into pods.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use membrane_proto::identity::v1 as idpb;
use membrane_proto::lb::v1 as pb;
use membrane_runtime::stream::{Publisher, StateSink};
use prost_types::Any;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::maglev::{self, Seed, TableSize, Weighted};
use crate::model::{Algorithm, Frontend, FrontendKind, Pod, Protocol, ServiceState};
use crate::reconcile::Published;

// === encoding ===

fn frontend_to_proto(f: &Frontend) -> pb::Frontend {
    let Frontend {
        kind,
        address,
        port,
        protocol,
        port_name,
        target_port,
        announcer,
    } = f;
    pb::Frontend {
        kind: match kind {
            FrontendKind::ClusterIp => pb::FrontendKind::ClusterIp,
            FrontendKind::NodePort => pb::FrontendKind::NodePort,
            FrontendKind::LoadBalancer => pb::FrontendKind::LoadBalancer,
            FrontendKind::ExternalIp => pb::FrontendKind::ExternalIp,
        } as i32,
        address: address.map(|a| a.to_string()).unwrap_or_default(),
        port: (*port).into(),
        protocol: match protocol {
            Protocol::Tcp => pb::Protocol::Tcp,
            Protocol::Udp => pb::Protocol::Udp,
        } as i32,
        port_name: port_name.clone(),
        target_port: (*target_port).into(),
        announcer: announcer.clone().unwrap_or_default(),
    }
}

/// The proto form of a service's state.
pub fn to_proto(s: &ServiceState) -> pb::ServiceState {
    let ServiceState {
        namespace,
        name,
        frontends,
        algorithm,
        hash_source_only,
        affinity_timeout,
        backends,
        table_size,
        seed,
    } = s;
    pb::ServiceState {
        namespace: namespace.clone(),
        name: name.clone(),
        frontends: frontends.iter().map(frontend_to_proto).collect(),
        algorithm: match algorithm {
            Algorithm::Random => pb::Algorithm::Random,
            Algorithm::Maglev => pb::Algorithm::Maglev,
        } as i32,
        hash_source_address_only: *hash_source_only,
        affinity_timeout_seconds: *affinity_timeout,
        backends: backends
            .iter()
            .map(|b| pb::Backend {
                id: b.id,
                address: b.address.to_string(),
                weight: b.weight,
                source: b.source.clone(),
            })
            .collect(),
        maglev: Some(pb::MaglevParams {
            table_size: table_size.get(),
            seed: seed.to_base64(),
        }),
    }
}

/// Encodes a whole state (backends inline), as the API returns it.
pub fn encode(s: &ServiceState) -> Result<Any, prost::EncodeError> {
    Any::from_msg(&to_proto(s))
}

/// The stream resources of a service: `service/<ns>/<name>` with the
/// `ServiceState` minus its backends, and one `backend/<ns>/<name>/<address>`
/// per backend, so that a backend change costs one small resource, not
/// the whole service.
pub fn stream_resources(s: &ServiceState) -> Result<Vec<(String, Any)>, prost::EncodeError> {
    let mut state = to_proto(s);
    let backends = std::mem::take(&mut state.backends);
    let mut out = Vec::with_capacity(backends.len() + 1);
    out.push((
        crate::reconcile::resource_key(&s.namespace, &s.name),
        Any::from_msg(&state)?,
    ));
    for b in backends {
        out.push((
            backend_key(&s.namespace, &s.name, &b.address),
            Any::from_msg(&b)?,
        ));
    }
    Ok(out)
}

/// The stream key of one backend of a service.
pub fn backend_key(namespace: &str, name: &str, address: &str) -> String {
    format!("backend/{namespace}/{name}/{address}")
}

/// The Maglev inputs of a published `ServiceState` (what a node decodes):
/// backends, seed and M, validated.
pub fn maglev_inputs(s: &pb::ServiceState) -> Result<(Vec<Weighted>, Seed, TableSize), Status> {
    let params = s
        .maglev
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("maglev: required"))?;
    let seed = Seed::from_base64("maglev.seed", &params.seed)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let m = TableSize::new("maglev.table_size", params.table_size.into())
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let backends = s
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let address = b.address.parse::<Ipv4Addr>().map_err(|_| {
                Status::invalid_argument(format!(
                    "backends[{i}].address: `{}` is not IPv4",
                    b.address
                ))
            })?;
            Ok(Weighted {
                address,
                weight: b.weight,
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    Ok((backends, seed, m))
}

// === the LoadBalancer service ===

/// `membrane.lb.v1.LoadBalancer`, answering from the reconciler's state.
#[derive(Debug, Clone)]
pub struct LbService {
    published: watch::Receiver<Published>,
    publisher: Publisher,
}

impl LbService {
    /// Serves what the reconciler `published`, and the nodes' delivery
    /// state as `publisher` tracks it.
    pub fn new(
        published: watch::Receiver<Published>,
        publisher: Publisher,
    ) -> pb::load_balancer_server::LoadBalancerServer<Self> {
        pb::load_balancer_server::LoadBalancerServer::new(Self {
            published,
            publisher,
        })
    }
}

#[tonic::async_trait]
impl pb::load_balancer_server::LoadBalancer for LbService {
    async fn list_services(
        &self,
        _: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let (services, versions) = {
            let p = self.published.borrow();
            let services = p.states.values().map(to_proto).collect();
            let versions = p
                .versions
                .iter()
                .map(|(k, v)| (k.strip_prefix("service/").unwrap_or(k).to_string(), *v))
                .collect();
            (services, versions)
        };
        let nodes = self.publisher.subscriber_statuses();
        Ok(Response::new(pb::ListServicesResponse {
            services,
            versions,
            nodes,
        }))
    }

    async fn maglev_table(
        &self,
        request: Request<pb::MaglevTableRequest>,
    ) -> Result<Response<pb::MaglevTableResponse>, Status> {
        let pb::MaglevTableRequest { service, node } = request.into_inner();
        let (ns, name) = service
            .split_once('/')
            .unwrap_or(("default", service.as_str()));
        if name.is_empty() {
            return Err(Status::invalid_argument(
                "service: required (`namespace/name`)",
            ));
        }
        let key = crate::reconcile::resource_key(ns, name);
        let state = self
            .published
            .borrow()
            .states
            .get(&key)
            .map(to_proto)
            .ok_or_else(|| Status::not_found(format!("service `{ns}/{name}` not found")))?;
        // Computed from exactly what is published, as a node does.
        let (backends, seed, m) = maglev_inputs(&state)?;
        let table = maglev::build(&backends, seed, m);
        let slots: Vec<String> = table.addresses().iter().map(Ipv4Addr::to_string).collect();
        let mut per: BTreeMap<String, u32> = table
            .backends
            .iter()
            .map(|b| (b.address.to_string(), 0))
            .collect();
        for s in &slots {
            *per.entry(s.clone()).or_default() += 1;
        }
        Ok(Response::new(pb::MaglevTableResponse {
            service: format!("{ns}/{name}"),
            node,
            table_size: m.get(),
            slots,
            slots_per_backend: per.into_iter().collect(),
        }))
    }
}

// === pods from the identity stream ===

/// Decodes pods from the identity service's state: `ipcache/<prefix>`
/// entries with a pod name give address, namespace and identity; the
/// identity's `k8s:` labels are the pod's labels (as filtered by the
/// identity service's label filter).
pub fn decode_pods(state: &BTreeMap<String, Any>) -> Vec<Pod> {
    let mut labels: BTreeMap<u32, BTreeMap<String, String>> = BTreeMap::new();
    for (k, v) in state.iter().filter(|(k, _)| k.starts_with("identity/")) {
        match v.to_msg::<idpb::IdentityInfo>() {
            Ok(info) => {
                let map = info
                    .labels
                    .iter()
                    .filter_map(|l| l.strip_prefix("k8s:")?.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                labels.insert(info.id, map);
            }
            Err(e) => tracing::warn!(key = %k, error = %e, "identity does not decode; ignored"),
        }
    }
    let mut pods = Vec::new();
    for (k, v) in state.iter().filter(|(k, _)| k.starts_with("ipcache/")) {
        let Ok(e) = v.to_msg::<idpb::IpcacheEntry>() else {
            tracing::warn!(key = %k, "ipcache entry does not decode; ignored");
            continue;
        };
        if e.pod.is_empty() {
            continue;
        }
        let Some(address) = e.prefix.strip_suffix("/32").and_then(|a| a.parse().ok()) else {
            continue;
        };
        pods.push(Pod {
            namespace: e.namespace,
            name: e.pod,
            address,
            labels: labels.get(&e.identity).cloned().unwrap_or_default(),
        });
    }
    pods
}

/// Feeds the identity stream's pods into a watch channel.
#[derive(Debug)]
pub struct PodSink {
    tx: watch::Sender<Vec<Pod>>,
}

impl PodSink {
    /// A sink and the receiver of the pods it reads.
    pub fn new() -> (Self, watch::Receiver<Vec<Pod>>) {
        let (tx, rx) = watch::channel(Vec::new());
        (Self { tx }, rx)
    }
}

impl StateSink for PodSink {
    async fn apply(
        &mut self,
        _version: u64,
        state: &BTreeMap<String, Any>,
        _changed: &[String],
    ) -> Result<(), String> {
        let pods = decode_pods(state);
        self.tx.send_if_modified(|old| {
            let changed = *old != pods;
            *old = pods;
            changed
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_come_from_ipcache_entries_with_their_identitys_labels() {
        let mut state = BTreeMap::new();
        state.insert(
            "identity/300".to_string(),
            Any::from_msg(&idpb::IdentityInfo {
                id: 300,
                labels: vec![
                    "k8s:app=web".into(),
                    "k8s:io.kubernetes.pod.namespace=shop".into(),
                ],
                reserved: false,
            })
            .expect("encode"),
        );
        state.insert(
            "ipcache/10.200.0.5/32".to_string(),
            Any::from_msg(&idpb::IpcacheEntry {
                prefix: "10.200.0.5/32".into(),
                identity: 300,
                node: "node-1".into(),
                namespace: "shop".into(),
                pod: "web-1".into(),
            })
            .expect("encode"),
        );
        state.insert(
            "ipcache/10.99.0.11/32".to_string(),
            Any::from_msg(&idpb::IpcacheEntry {
                prefix: "10.99.0.11/32".into(),
                identity: 6,
                node: "node-1".into(),
                namespace: String::new(),
                pod: String::new(),
            })
            .expect("encode"),
        );
        let pods = decode_pods(&state);
        assert_eq!(pods.len(), 1, "node addresses are not pods");
        assert_eq!(pods[0].address, Ipv4Addr::new(10, 200, 0, 5));
        assert_eq!(pods[0].labels.get("app").map(String::as_str), Some("web"));
    }
}
