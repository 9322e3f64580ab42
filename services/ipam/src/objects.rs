//! The `Node` kind (`v1`): registering a node through `membrane apply`, the
//! way a Kubernetes Node object would. The underlay address comes from the
//! `membrane.io/underlay-ip` annotation or the `InternalIP` status address;
//! `spec.podCIDR` pins the node's CIDR, else one is carved.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use membrane_runtime::objects::{HandlerError, KubeObject, ObjectError, ObjectHandler};
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::pool::{self, IpamError};
use crate::store::IpamStore;

/// Annotation carrying a node's underlay address.
pub const UNDERLAY_ANNOTATION: &str = "membrane.io/underlay-ip";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NodeDoc {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[allow(dead_code)]
    metadata: IgnoredAny,
    #[serde(default)]
    spec: NodeSpec,
    #[serde(default)]
    status: Option<NodeStatus>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NodeSpec {
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Option<Vec<String>>,
    #[serde(rename = "providerID")]
    #[allow(dead_code)]
    provider_id: Option<String>,
    #[allow(dead_code)]
    unschedulable: Option<bool>,
    #[allow(dead_code)]
    taints: Option<IgnoredAny>,
}

/// Status is reported by the node, not intent: only addresses are read.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeStatus {
    #[serde(default)]
    addresses: Vec<NodeAddress>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeAddress {
    #[serde(rename = "type")]
    kind: String,
    address: String,
}

/// A validated node registration.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeIntent {
    name: String,
    underlay_ip: Ipv4Addr,
    pod_cidr: Option<Ipv4Net>,
}

/// Handles `v1/Node`.
#[derive(Debug, Clone)]
pub struct NodeObjects {
    store: IpamStore,
}

impl NodeObjects {
    /// Handles nodes in `store`.
    pub fn new(store: IpamStore) -> Self {
        Self { store }
    }

    fn validate(&self, obj: &KubeObject) -> Result<NodeIntent, ObjectError> {
        let doc: NodeDoc = obj.parse()?;
        if obj.metadata.namespace.is_some() {
            return Err(ObjectError::new(
                obj,
                "metadata.namespace",
                "Node is cluster-scoped",
            ));
        }
        let wrap = |field: &str, e: IpamError| ObjectError::new(obj, field, e.to_string());
        let (field, underlay) = match obj.metadata.annotations.get(UNDERLAY_ANNOTATION) {
            Some(v) => (
                format!("metadata.annotations[{UNDERLAY_ANNOTATION}]"),
                v.clone(),
            ),
            None => {
                let addr = doc
                    .status
                    .iter()
                    .flat_map(|s| s.addresses.iter().enumerate())
                    .find(|(_, a)| a.kind == "InternalIP")
                    .ok_or_else(|| {
                        ObjectError::new(
                            obj,
                            "status.addresses",
                            format!("an InternalIP address or the {UNDERLAY_ANNOTATION} annotation is required"),
                        )
                    })?;
                (
                    format!("status.addresses[{}].address", addr.0),
                    addr.1.address.clone(),
                )
            }
        };
        let underlay_ip = pool::parse_ip(&field, &underlay).map_err(|e| wrap(&field, e))?;
        let cidr_text = match (&doc.spec.pod_cidr, &doc.spec.pod_cidrs) {
            (Some(c), _) => Some(("spec.podCIDR", c.clone())),
            (None, Some(list)) => list.first().map(|c| ("spec.podCIDRs[0]", c.clone())),
            (None, None) => None,
        };
        let pod_cidr = match cidr_text {
            Some((field, text)) => {
                let cidr = pool::parse_cidr(field, &text).map_err(|e| wrap(field, e))?;
                self.store
                    .config()
                    .check_node_cidr(field, cidr)
                    .map_err(|e| wrap(field, e))?;
                Some(cidr)
            }
            None => None,
        };
        Ok(NodeIntent {
            name: obj.metadata.name.clone(),
            underlay_ip,
            pod_cidr,
        })
    }
}

fn conflict(e: IpamError) -> HandlerError {
    match e {
        IpamError::Store(m) => HandlerError::Unavailable(m),
        other => HandlerError::Conflict(other.to_string()),
    }
}

#[tonic::async_trait]
impl ObjectHandler for NodeObjects {
    fn kinds(&self) -> Vec<(&'static str, &'static str)> {
        vec![("v1", "Node")]
    }

    async fn apply(
        &self,
        objects: Vec<KubeObject>,
        dry_run: bool,
    ) -> Result<Vec<String>, HandlerError> {
        // Validate everything, including against stored state, before writing anything.
        let mut intents = Vec::new();
        for obj in &objects {
            let intent = self.validate(obj)?;
            let existing = self.store.node(&intent.name).await.map_err(conflict)?;
            if let Some(cidr) = intent.pod_cidr {
                match &existing {
                    Some(n) if n.pod_cidr != cidr => {
                        return Err(ObjectError::new(
                            obj,
                            "spec.podCIDR",
                            format!(
                                "node already has pod CIDR {}; a node's CIDR cannot change",
                                n.pod_cidr
                            ),
                        )
                        .into());
                    }
                    Some(_) => {}
                    None => {
                        if let Some(holder) =
                            self.store.cidr_holder(cidr).await.map_err(conflict)?
                        {
                            return Err(ObjectError::new(
                                obj,
                                "spec.podCIDR",
                                format!("{cidr} is held by node `{holder}`"),
                            )
                            .into());
                        }
                    }
                }
            }
            intents.push((intent, existing));
        }
        let mut results = Vec::new();
        for (intent, existing) in intents {
            let unchanged = existing
                .as_ref()
                .is_some_and(|n| n.underlay_ip == intent.underlay_ip);
            if !dry_run && !unchanged {
                self.store
                    .register_node(&intent.name, intent.underlay_ip, intent.pod_cidr)
                    .await
                    .map_err(conflict)?;
            }
            let verb = match (existing.is_some(), unchanged) {
                (_, true) => "unchanged",
                (true, false) => "configured",
                (false, _) => "created",
            };
            let dry = if dry_run { " (dry run)" } else { "" };
            results.push(format!("node/{} {verb}{dry}", intent.name));
        }
        Ok(results)
    }

    async fn delete(
        &self,
        objects: Vec<KubeObject>,
        dry_run: bool,
    ) -> Result<Vec<String>, HandlerError> {
        let mut names = Vec::new();
        for obj in &objects {
            let exists = self
                .store
                .node(&obj.metadata.name)
                .await
                .map_err(conflict)?
                .is_some();
            if exists
                && !self
                    .store
                    .allocations(Some(&obj.metadata.name))
                    .await
                    .map_err(conflict)?
                    .is_empty()
            {
                return Err(ObjectError::new(
                    obj,
                    "metadata.name",
                    "node still has allocated addresses; remove its pods first",
                )
                .into());
            }
            names.push((obj.metadata.name.clone(), exists));
        }
        let mut results = Vec::new();
        for (name, exists) in names {
            if !exists {
                results.push(format!("node/{name} not found"));
                continue;
            }
            if !dry_run {
                self.store
                    .remove_node(&name, false)
                    .await
                    .map_err(conflict)?;
            }
            results.push(format!(
                "node/{name} deleted{}",
                if dry_run { " (dry run)" } else { "" }
            ));
        }
        Ok(results)
    }

    async fn list(&self, _kind: &str) -> Result<Vec<serde_json::Value>, HandlerError> {
        let nodes = self.store.nodes().await.map_err(conflict)?;
        Ok(nodes
            .into_iter()
            .map(|n| {
                serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": n.name, "annotations": {UNDERLAY_ANNOTATION: n.underlay_ip.to_string()}},
                    "spec": {"podCIDR": n.pod_cidr.to_string()},
                })
            })
            .collect())
    }
}
