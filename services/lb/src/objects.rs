//! `Service` (`v1`), `Endpoints` (`v1`) and `EndpointSlice`
//! (`discovery.k8s.io/v1`) for `membrane apply`. Every object of a request
//! is validated before anything is written, and all services of a request
//! are stored in one etcd transaction: all or nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use membrane_runtime::objects::{HandlerError, KubeObject, ObjectError, ObjectHandler};
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::model::{Algorithm, EndpointSet, LbConfig, Protocol, Service, ServicePort, ServiceType};
use crate::store::{LbError, LbStore, Outcome};

/// Annotation choosing the algorithm: `random` or `maglev`.
pub const ALGORITHM_ANNOTATION: &str = "service.membrane.io/lb-algorithm";
/// Annotation `"true"`: hash only the source address (client stickiness).
pub const SOURCE_HASH_ANNOTATION: &str = "service.membrane.io/lb-hash-source-only";
/// Annotation on Endpoints/EndpointSlice: JSON map address → weight.
pub const WEIGHTS_ANNOTATION: &str = "service.membrane.io/backend-weights";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceDoc {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[allow(dead_code)]
    metadata: IgnoredAny,
    spec: ServiceSpec,
    #[allow(dead_code)]
    status: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceSpec {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default)]
    ports: Vec<PortDoc>,
    selector: Option<BTreeMap<String, String>>,
    #[serde(rename = "externalIPs", default)]
    external_ips: Vec<String>,
    #[serde(rename = "loadBalancerIP")]
    load_balancer_ip: Option<String>,
    session_affinity: Option<String>,
    session_affinity_config: Option<AffinityConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AffinityConfig {
    #[serde(rename = "clientIP")]
    client_ip: Option<ClientIpConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ClientIpConfig {
    timeout_seconds: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PortDoc {
    #[serde(default)]
    name: String,
    protocol: Option<String>,
    port: u16,
    target_port: Option<serde_json::Value>,
    node_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EndpointsDoc {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[allow(dead_code)]
    metadata: IgnoredAny,
    #[serde(default)]
    subsets: Vec<SubsetDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SubsetDoc {
    #[serde(default)]
    addresses: Vec<AddressDoc>,
    #[serde(default)]
    not_ready_addresses: Vec<AddressDoc>,
    #[serde(default)]
    ports: Vec<EpPortDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AddressDoc {
    ip: String,
    #[allow(dead_code)]
    hostname: Option<String>,
    #[allow(dead_code)]
    node_name: Option<String>,
    #[allow(dead_code)]
    target_ref: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EpPortDoc {
    #[serde(default)]
    name: String,
    port: u16,
    protocol: Option<String>,
    #[allow(dead_code)]
    app_protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SliceDoc {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[allow(dead_code)]
    metadata: IgnoredAny,
    address_type: String,
    #[serde(default)]
    endpoints: Vec<SliceEndpoint>,
    #[serde(default)]
    ports: Vec<EpPortDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SliceEndpoint {
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Conditions,
    #[allow(dead_code)]
    hostname: Option<String>,
    #[allow(dead_code)]
    node_name: Option<String>,
    #[allow(dead_code)]
    zone: Option<String>,
    #[allow(dead_code)]
    target_ref: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Conditions {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

/// A validated object.
#[derive(Debug, Clone, PartialEq)]
enum Intent {
    Service(Service),
    Set(EndpointSet),
}

fn ns(obj: &KubeObject) -> String {
    obj.metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into())
}

fn ipv4(obj: &KubeObject, field: &str, text: &str) -> Result<Ipv4Addr, ObjectError> {
    text.parse()
        .map_err(|_| ObjectError::new(obj, field, format!("`{text}` is not an IPv4 address")))
}

fn protocol(obj: &KubeObject, field: &str, p: Option<&str>) -> Result<Protocol, ObjectError> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        other => Err(ObjectError::new(
            obj,
            field,
            format!("protocol `{other}` is not supported (TCP or UDP)"),
        )),
    }
}

/// Validates a `v1/Service` against `config` (no stored state).
pub fn validate_service(obj: &KubeObject, config: &LbConfig) -> Result<Service, ObjectError> {
    let doc: ServiceDoc = obj.parse()?;
    let spec = doc.spec;
    let kind = match spec.kind.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" => ServiceType::ClusterIP,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        other => {
            return Err(ObjectError::new(
                obj,
                "spec.type",
                format!("type `{other}` is not supported (ClusterIP, NodePort or LoadBalancer)"),
            ));
        }
    };
    let cluster_ip = match spec.cluster_ip.as_deref() {
        None | Some("") => None,
        Some("None") => {
            return Err(ObjectError::new(
                obj,
                "spec.clusterIP",
                "headless services are not supported",
            ));
        }
        Some(text) => {
            let ip = ipv4(obj, "spec.clusterIP", text)?;
            if !config.service_cidr.contains(&ip)
                || ip == config.service_cidr.network()
                || ip == config.service_cidr.broadcast()
            {
                return Err(ObjectError::new(
                    obj,
                    "spec.clusterIP",
                    format!(
                        "{ip} is not a host address of the service CIDR {}",
                        config.service_cidr
                    ),
                ));
            }
            Some(ip)
        }
    };
    if spec.ports.is_empty() {
        return Err(ObjectError::new(
            obj,
            "spec.ports",
            "at least one port is required",
        ));
    }
    let mut seen: BTreeMap<(u16, Protocol), usize> = BTreeMap::new();
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut node_ports: BTreeMap<u16, usize> = BTreeMap::new();
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let f = |s: &str| format!("spec.ports[{i}].{s}");
        let proto = protocol(obj, &f("protocol"), p.protocol.as_deref())?;
        if p.port == 0 {
            return Err(ObjectError::new(obj, f("port"), "must be 1-65535"));
        }
        if let Some(j) = seen.insert((p.port, proto), i) {
            return Err(ObjectError::new(
                obj,
                f("port"),
                format!("duplicate port {}/{proto} (also spec.ports[{j}])", p.port),
            ));
        }
        if spec.ports.len() > 1 && p.name.is_empty() {
            return Err(ObjectError::new(
                obj,
                f("name"),
                "required when a service has more than one port",
            ));
        }
        if let Some(j) = names
            .insert(p.name.clone(), i)
            .filter(|_| !p.name.is_empty())
        {
            return Err(ObjectError::new(
                obj,
                f("name"),
                format!("duplicate port name `{}` (also spec.ports[{j}])", p.name),
            ));
        }
        let target_port = match &p.target_port {
            None => p.port,
            Some(serde_json::Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    ObjectError::new(obj, f("targetPort"), format!("{n} is not a port (1-65535)"))
                })?,
            Some(serde_json::Value::String(s)) => match s.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(ObjectError::new(
                        obj,
                        f("targetPort"),
                        format!("named target port `{s}` is not supported yet; give a number"),
                    ));
                }
            },
            Some(other) => {
                return Err(ObjectError::new(
                    obj,
                    f("targetPort"),
                    format!("{other} is not a port"),
                ));
            }
        };
        if let Some(np) = p.node_port {
            if kind == ServiceType::ClusterIP {
                return Err(ObjectError::new(
                    obj,
                    f("nodePort"),
                    "only NodePort and LoadBalancer services have node ports",
                ));
            }
            if !crate::model::NODE_PORT_RANGE.contains(&np) {
                return Err(ObjectError::new(
                    obj,
                    f("nodePort"),
                    format!("{np} is outside 30000-32767"),
                ));
            }
            if let Some(j) = node_ports.insert(np, i) {
                return Err(ObjectError::new(
                    obj,
                    f("nodePort"),
                    format!("duplicate node port {np} (also spec.ports[{j}])"),
                ));
            }
        }
        ports.push(ServicePort {
            name: p.name.clone(),
            protocol: proto,
            port: p.port,
            target_port,
            node_port: p.node_port,
        });
    }
    let external_ips = spec
        .external_ips
        .iter()
        .enumerate()
        .map(|(i, t)| ipv4(obj, &format!("spec.externalIPs[{i}]"), t))
        .collect::<Result<Vec<_>, _>>()?;
    let load_balancer_ip = match spec.load_balancer_ip.as_deref() {
        None | Some("") => None,
        Some(t) => {
            if kind != ServiceType::LoadBalancer {
                return Err(ObjectError::new(
                    obj,
                    "spec.loadBalancerIP",
                    "only LoadBalancer services have one",
                ));
            }
            let ip = ipv4(obj, "spec.loadBalancerIP", t)?;
            if !config.lb_pool.contains(&ip) {
                return Err(ObjectError::new(
                    obj,
                    "spec.loadBalancerIP",
                    format!("{ip} is outside the pool {}", config.lb_pool),
                ));
            }
            Some(ip)
        }
    };
    let affinity_timeout = match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => {
            if spec.session_affinity_config.is_some() {
                return Err(ObjectError::new(
                    obj,
                    "spec.sessionAffinityConfig",
                    "requires sessionAffinity: ClientIP",
                ));
            }
            None
        }
        "ClientIP" => {
            let t = spec
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(10800);
            if t == 0 || t > 86400 {
                return Err(ObjectError::new(
                    obj,
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    "must be 1-86400",
                ));
            }
            Some(t)
        }
        other => {
            return Err(ObjectError::new(
                obj,
                "spec.sessionAffinity",
                format!("`{other}` is not None or ClientIP"),
            ));
        }
    };
    let ann = &obj.metadata.annotations;
    let algorithm = ann
        .get(ALGORITHM_ANNOTATION)
        .map(|v| v.parse::<Algorithm>())
        .transpose()
        .map_err(|e| {
            ObjectError::new(
                obj,
                format!("metadata.annotations[{ALGORITHM_ANNOTATION}]"),
                e,
            )
        })?;
    let hash_source_only = match ann.get(SOURCE_HASH_ANNOTATION).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            return Err(ObjectError::new(
                obj,
                format!("metadata.annotations[{SOURCE_HASH_ANNOTATION}]"),
                format!("`{v}` is not true or false"),
            ));
        }
    };
    Ok(Service {
        namespace: ns(obj),
        name: obj.metadata.name.clone(),
        kind,
        cluster_ip,
        ports,
        selector: spec.selector.filter(|s| !s.is_empty()),
        external_ips,
        load_balancer_ip,
        affinity_timeout,
        algorithm,
        hash_source_only,
    })
}

fn weights(obj: &KubeObject) -> Result<BTreeMap<Ipv4Addr, u32>, ObjectError> {
    let field = format!("metadata.annotations[{WEIGHTS_ANNOTATION}]");
    match obj.metadata.annotations.get(WEIGHTS_ANNOTATION) {
        None => Ok(BTreeMap::new()),
        Some(text) => serde_json::from_str::<BTreeMap<Ipv4Addr, u32>>(text).map_err(|e| {
            ObjectError::new(
                obj,
                field,
                format!("not a JSON map of address to weight: {e}"),
            )
        }),
    }
}

fn ep_ports(
    obj: &KubeObject,
    base: &str,
    ports: &[EpPortDoc],
) -> Result<BTreeMap<String, u16>, ObjectError> {
    let mut out = BTreeMap::new();
    for (i, p) in ports.iter().enumerate() {
        protocol(obj, &format!("{base}[{i}].protocol"), p.protocol.as_deref())?;
        if out.insert(p.name.clone(), p.port).is_some() {
            return Err(ObjectError::new(
                obj,
                format!("{base}[{i}].name"),
                format!("duplicate port name `{}`", p.name),
            ));
        }
    }
    Ok(out)
}

/// Validates a `v1/Endpoints` (named like its service).
pub fn validate_endpoints(obj: &KubeObject) -> Result<EndpointSet, ObjectError> {
    let doc: EndpointsDoc = obj.parse()?;
    let w = weights(obj)?;
    let mut backends = Vec::new();
    let mut ports = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (s, sub) in doc.subsets.iter().enumerate() {
        let lists = [
            (&sub.addresses, "addresses", true),
            (&sub.not_ready_addresses, "notReadyAddresses", false),
        ];
        for (list, name, ready) in lists {
            for (i, a) in list.iter().enumerate() {
                let field = format!("subsets[{s}].{name}[{i}].ip");
                let ip = ipv4(obj, &field, &a.ip)?;
                if !seen.insert(ip) {
                    return Err(ObjectError::new(
                        obj,
                        field,
                        format!("duplicate address {ip}"),
                    ));
                }
                backends.push((
                    ip,
                    if ready {
                        w.get(&ip).copied().unwrap_or(1)
                    } else {
                        0
                    },
                ));
            }
        }
        ports.extend(ep_ports(obj, &format!("subsets[{s}].ports"), &sub.ports)?);
    }
    Ok(EndpointSet {
        namespace: ns(obj),
        service: obj.metadata.name.clone(),
        source: format!("endpoints/{}/{}", ns(obj), obj.metadata.name),
        backends,
        ports,
    })
}

/// Validates a `discovery.k8s.io/v1/EndpointSlice` (its service is the
/// `kubernetes.io/service-name` label).
pub fn validate_slice(obj: &KubeObject) -> Result<EndpointSet, ObjectError> {
    let doc: SliceDoc = obj.parse()?;
    if doc.address_type != "IPv4" {
        return Err(ObjectError::new(
            obj,
            "addressType",
            format!("`{}` is not supported (IPv4)", doc.address_type),
        ));
    }
    let service = obj
        .metadata
        .labels
        .get("kubernetes.io/service-name")
        .cloned()
        .ok_or_else(|| {
            ObjectError::new(
                obj,
                "metadata.labels[kubernetes.io/service-name]",
                "required: names the service",
            )
        })?;
    let w = weights(obj)?;
    let mut backends = Vec::new();
    let mut seen = BTreeSet::new();
    for (e, ep) in doc.endpoints.iter().enumerate() {
        // Terminating or not-ready endpoints drain: weight 0.
        let c = &ep.conditions;
        let live =
            c.ready.unwrap_or(true) && c.serving.unwrap_or(true) && !c.terminating.unwrap_or(false);
        for (i, a) in ep.addresses.iter().enumerate() {
            let field = format!("endpoints[{e}].addresses[{i}]");
            let ip = ipv4(obj, &field, a)?;
            if !seen.insert(ip) {
                return Err(ObjectError::new(
                    obj,
                    field,
                    format!("duplicate address {ip}"),
                ));
            }
            backends.push((
                ip,
                if live {
                    w.get(&ip).copied().unwrap_or(1)
                } else {
                    0
                },
            ));
        }
    }
    Ok(EndpointSet {
        namespace: ns(obj),
        service,
        source: format!("endpointslice/{}/{}", ns(obj), obj.metadata.name),
        backends,
        ports: ep_ports(obj, "ports", &doc.ports)?,
    })
}

/// Handles the lb kinds.
#[derive(Debug, Clone)]
pub struct LbObjects {
    store: LbStore,
}

impl LbObjects {
    /// Handles objects in `store`.
    pub fn new(store: LbStore) -> Self {
        Self { store }
    }

    fn validate(&self, obj: &KubeObject) -> Result<Intent, ObjectError> {
        match obj.kind.as_str() {
            "Service" => validate_service(obj, &self.store.config()).map(Intent::Service),
            "Endpoints" => validate_endpoints(obj).map(Intent::Set),
            _ => validate_slice(obj).map(Intent::Set),
        }
    }
}

fn handler_err(e: LbError) -> HandlerError {
    match e {
        LbError::Store(m) => HandlerError::Unavailable(m),
        other => HandlerError::Conflict(other.to_string()),
    }
}

#[tonic::async_trait]
impl ObjectHandler for LbObjects {
    fn kinds(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("v1", "Service"),
            ("v1", "Endpoints"),
            ("discovery.k8s.io/v1", "EndpointSlice"),
        ]
    }

    async fn apply(
        &self,
        objects: Vec<KubeObject>,
        dry_run: bool,
    ) -> Result<Vec<String>, HandlerError> {
        let intents = objects
            .iter()
            .map(|o| self.validate(o))
            .collect::<Result<Vec<_>, _>>()?;
        let mut keys = BTreeSet::new();
        for (o, i) in objects.iter().zip(&intents) {
            let key = match i {
                Intent::Service(s) => format!("service/{}", s.id()),
                Intent::Set(s) => s.source.clone(),
            };
            if !keys.insert(key.clone()) {
                return Err(ObjectError::new(
                    o,
                    "metadata.name",
                    format!("`{key}` appears twice in this request"),
                )
                .into());
            }
        }
        let services: Vec<Service> = intents
            .iter()
            .filter_map(|i| match i {
                Intent::Service(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        let sets: Vec<EndpointSet> = intents
            .iter()
            .filter_map(|i| match i {
                Intent::Set(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        // Services first: their allocations are the part that can conflict.
        let stored = self
            .store
            .apply_services(services, dry_run)
            .await
            .map_err(handler_err)?;
        let changed = self
            .store
            .put_sets(&sets, dry_run)
            .await
            .map_err(handler_err)?;
        let dry = if dry_run { " (dry run)" } else { "" };
        let mut lines = Vec::new();
        for (s, o) in stored {
            let verb = match o {
                Outcome::Created => "created",
                Outcome::Configured => "configured",
                Outcome::Unchanged => "unchanged",
            };
            let ip = s
                .cluster_ip
                .map(|i| format!(" clusterIP={i}"))
                .unwrap_or_default();
            lines.push(format!(
                "service/{}/{} {verb}{ip}{dry}",
                s.namespace, s.name
            ));
        }
        for (s, c) in sets.iter().zip(changed) {
            let verb = match c {
                None => "created",
                Some(true) => "configured",
                Some(false) => "unchanged",
            };
            lines.push(format!("{} {verb}{dry}", s.source));
        }
        Ok(lines)
    }

    async fn delete(
        &self,
        objects: Vec<KubeObject>,
        dry_run: bool,
    ) -> Result<Vec<String>, HandlerError> {
        let mut svcs = Vec::new();
        let mut sets = Vec::new();
        for o in &objects {
            match o.kind.as_str() {
                "Service" => svcs.push((ns(o), o.metadata.name.clone())),
                "Endpoints" => sets.push(format!("endpoints/{}/{}", ns(o), o.metadata.name)),
                _ => sets.push(format!("endpointslice/{}/{}", ns(o), o.metadata.name)),
            }
        }
        let found = self
            .store
            .delete_services(&svcs, dry_run)
            .await
            .map_err(handler_err)?;
        let set_found = self
            .store
            .delete_sets(&sets, dry_run)
            .await
            .map_err(handler_err)?;
        let dry = if dry_run { " (dry run)" } else { "" };
        let mut lines: Vec<String> = svcs
            .iter()
            .zip(found)
            .map(|((n, s), f)| {
                format!(
                    "service/{n}/{s} {}{dry}",
                    if f { "deleted" } else { "not found" }
                )
            })
            .collect();
        lines.extend(
            sets.iter()
                .zip(set_found)
                .map(|(s, f)| format!("{s} {}{dry}", if f { "deleted" } else { "not found" })),
        );
        Ok(lines)
    }

    async fn list(&self, kind: &str) -> Result<Vec<serde_json::Value>, HandlerError> {
        let snap = self.store.snapshot().await.map_err(handler_err)?;
        let mut out = Vec::new();
        if kind.is_empty() || kind == "Service" {
            for s in snap.services {
                out.push(serde_json::json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": s.name, "namespace": s.namespace},
                    "spec": {
                        "type": format!("{:?}", s.kind),
                        "clusterIP": s.cluster_ip.map(|i| i.to_string()),
                        "loadBalancerIP": s.load_balancer_ip.map(|i| i.to_string()),
                        "externalIPs": s.external_ips.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                        "selector": s.selector,
                        "ports": s.ports.iter().map(|p| serde_json::json!({
                            "name": p.name, "protocol": p.protocol.to_string(), "port": p.port,
                            "targetPort": p.target_port, "nodePort": p.node_port,
                        })).collect::<Vec<_>>(),
                    },
                }));
            }
        }
        if kind.is_empty() || kind == "Endpoints" || kind == "EndpointSlice" {
            for s in snap.sets {
                out.push(serde_json::json!({
                    "source": s.source, "service": format!("{}/{}", s.namespace, s.service),
                    "backends": s.backends.iter().map(|(a, w)| serde_json::json!({"ip": a.to_string(), "weight": w})).collect::<Vec<_>>(),
                }));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maglev::TableSize;

    fn config() -> LbConfig {
        LbConfig {
            service_cidr: "10.96.0.0/16".parse().expect("cidr"),
            lb_pool: "10.99.0.128/27".parse().expect("cidr"),
            default_algorithm: Algorithm::Maglev,
            table_size: TableSize::default(),
        }
    }

    fn svc(spec: serde_json::Value) -> Result<Service, ObjectError> {
        let doc = serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"}, "spec": spec});
        let obj = KubeObject::from_json("svc.yaml#1", &doc.to_string()).expect("envelope");
        validate_service(&obj, &config())
    }

    #[test]
    fn a_duplicate_port_is_rejected_naming_the_field() {
        let e = svc(
            serde_json::json!({"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]}),
        )
        .expect_err("duplicate");
        assert_eq!(e.field, "spec.ports[1].port");
        assert_eq!(e.message, "duplicate port 80/TCP (also spec.ports[0])");
    }

    #[test]
    fn a_cluster_ip_outside_the_service_cidr_is_rejected() {
        let e = svc(serde_json::json!({"clusterIP": "10.97.0.1", "ports": [{"port": 80}]}))
            .expect_err("outside");
        assert_eq!(e.field, "spec.clusterIP");
        assert!(
            e.message
                .contains("not a host address of the service CIDR 10.96.0.0/16"),
            "{}",
            e.message
        );
    }

    #[test]
    fn unknown_fields_and_named_target_ports_are_rejected_naming_the_field() {
        let e = svc(serde_json::json!({"ports": [{"port": 80, "bogus": 1}]})).expect_err("unknown");
        assert_eq!(e.field, "spec.ports[0].bogus");
        let e = svc(serde_json::json!({"ports": [{"port": 80, "targetPort": "http"}]}))
            .expect_err("named");
        assert_eq!(e.field, "spec.ports[0].targetPort");
        let e = svc(
            serde_json::json!({"type": "ClusterIP", "ports": [{"port": 80, "nodePort": 30001}]}),
        )
        .expect_err("np");
        assert_eq!(e.field, "spec.ports[0].nodePort");
    }

    #[test]
    fn a_full_load_balancer_service_validates_with_affinity_and_annotations() {
        let doc = serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "annotations": {ALGORITHM_ANNOTATION: "random", SOURCE_HASH_ANNOTATION: "true"}},
            "spec": {"type": "LoadBalancer", "selector": {"app": "web"}, "externalIPs": ["192.0.2.7"],
                "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}});
        let obj = KubeObject::from_json("x", &doc.to_string()).expect("envelope");
        let s = validate_service(&obj, &config()).expect("valid");
        assert_eq!(
            (s.namespace.as_str(), s.kind, s.affinity_timeout),
            ("default", ServiceType::LoadBalancer, Some(60))
        );
        assert_eq!(
            (s.algorithm, s.hash_source_only),
            (Some(Algorithm::Random), true)
        );
        let bad = doc.to_string().replace("\"random\"", "\"roundrobin\"");
        let obj = KubeObject::from_json("x", &bad).expect("envelope");
        let e = validate_service(&obj, &config()).expect_err("bad algorithm");
        assert_eq!(
            e.field,
            format!("metadata.annotations[{ALGORITHM_ANNOTATION}]")
        );
    }

    #[test]
    fn terminating_slice_endpoints_drain_with_weight_zero() {
        let doc = serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"], "conditions": {"terminating": true}}]});
        let obj = KubeObject::from_json("x", &doc.to_string()).expect("envelope");
        let set = validate_slice(&obj).expect("valid");
        assert_eq!(
            set.backends,
            vec![([10, 0, 0, 1].into(), 1), ([10, 0, 0, 2].into(), 0)]
        );
        assert_eq!(set.service, "web");
    }
}
