//! The documents users apply, typed as written (serde, unknown fields are
//! errors). Fields that Cilium or Kubernetes define but Membrane does not
//! implement yet are read as [`IgnoredAny`] so that [`crate::model`] can
//! refuse them by name ("not supported yet") instead of a bare "unknown field".

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::IgnoredAny;

/// `metadata`, leniently: exported objects carry uid, resourceVersion,
/// managedFields and more, none of which matter here.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Namespace.
    pub namespace: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `CiliumNetworkPolicy` / `CiliumClusterwideNetworkPolicy` (`cilium.io/v2`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CiliumPolicyDoc {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: Meta,
    pub spec: Option<CiliumRuleDoc>,
    pub specs: Option<Vec<CiliumRuleDoc>>,
    #[allow(dead_code)]
    pub status: Option<IgnoredAny>,
}

/// One Cilium rule (`spec`, or an element of `specs`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CiliumRuleDoc {
    pub endpoint_selector: Option<SelectorDoc>,
    pub node_selector: Option<IgnoredAny>,
    pub ingress: Option<Vec<IngressDoc>>,
    pub ingress_deny: Option<Vec<IngressDenyDoc>>,
    pub egress: Option<Vec<EgressDoc>>,
    pub egress_deny: Option<Vec<EgressDenyDoc>>,
    pub enable_default_deny: Option<DefaultDenyDoc>,
    #[allow(dead_code)]
    pub labels: Option<IgnoredAny>,
    #[allow(dead_code)]
    pub description: Option<String>,
}

/// `enableDefaultDeny`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DefaultDenyDoc {
    pub ingress: Option<bool>,
    pub egress: Option<bool>,
}

/// A Kubernetes label selector.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelectorDoc {
    pub match_labels: Option<BTreeMap<String, String>>,
    pub match_expressions: Option<Vec<ExpressionDoc>>,
}

/// One `matchExpressions` element.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExpressionDoc {
    pub key: String,
    pub operator: String,
    pub values: Option<Vec<String>>,
}

/// `fromCIDRSet` / `toCIDRSet` element.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CidrRuleDoc {
    pub cidr: Option<String>,
    pub except: Option<Vec<String>>,
    pub cidr_group_ref: Option<IgnoredAny>,
    pub cidr_group_selector: Option<IgnoredAny>,
}

/// An `ingress` element.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressDoc {
    pub from_endpoints: Option<Vec<SelectorDoc>>,
    pub from_entities: Option<Vec<String>>,
    #[serde(rename = "fromCIDR")]
    pub from_cidr: Option<Vec<String>>,
    #[serde(rename = "fromCIDRSet")]
    pub from_cidr_set: Option<Vec<CidrRuleDoc>>,
    pub to_ports: Option<Vec<PortRuleDoc>>,
    pub from_requires: Option<IgnoredAny>,
    pub from_nodes: Option<IgnoredAny>,
    pub from_groups: Option<IgnoredAny>,
    pub icmps: Option<IgnoredAny>,
    pub authentication: Option<IgnoredAny>,
}

/// An `ingressDeny` element: like `ingress`, but ports carry no L7 rules.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressDenyDoc {
    pub from_endpoints: Option<Vec<SelectorDoc>>,
    pub from_entities: Option<Vec<String>>,
    #[serde(rename = "fromCIDR")]
    pub from_cidr: Option<Vec<String>>,
    #[serde(rename = "fromCIDRSet")]
    pub from_cidr_set: Option<Vec<CidrRuleDoc>>,
    pub to_ports: Option<Vec<PortDenyRuleDoc>>,
    pub from_requires: Option<IgnoredAny>,
    pub from_nodes: Option<IgnoredAny>,
    pub from_groups: Option<IgnoredAny>,
    pub icmps: Option<IgnoredAny>,
}

/// An `egress` element.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressDoc {
    pub to_endpoints: Option<Vec<SelectorDoc>>,
    pub to_entities: Option<Vec<String>>,
    #[serde(rename = "toCIDR")]
    pub to_cidr: Option<Vec<String>>,
    #[serde(rename = "toCIDRSet")]
    pub to_cidr_set: Option<Vec<CidrRuleDoc>>,
    pub to_ports: Option<Vec<PortRuleDoc>>,
    pub to_requires: Option<IgnoredAny>,
    pub to_services: Option<IgnoredAny>,
    #[serde(rename = "toFQDNs")]
    pub to_fqdns: Option<IgnoredAny>,
    pub to_groups: Option<IgnoredAny>,
    pub to_nodes: Option<IgnoredAny>,
    pub icmps: Option<IgnoredAny>,
    pub authentication: Option<IgnoredAny>,
}

/// An `egressDeny` element.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressDenyDoc {
    pub to_endpoints: Option<Vec<SelectorDoc>>,
    pub to_entities: Option<Vec<String>>,
    #[serde(rename = "toCIDR")]
    pub to_cidr: Option<Vec<String>>,
    #[serde(rename = "toCIDRSet")]
    pub to_cidr_set: Option<Vec<CidrRuleDoc>>,
    pub to_ports: Option<Vec<PortDenyRuleDoc>>,
    pub to_requires: Option<IgnoredAny>,
    pub to_services: Option<IgnoredAny>,
    pub to_groups: Option<IgnoredAny>,
    pub to_nodes: Option<IgnoredAny>,
    pub icmps: Option<IgnoredAny>,
}

/// A `toPorts` element of an allow rule.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortRuleDoc {
    pub ports: Option<Vec<PortProtocolDoc>>,
    pub rules: Option<L7RulesDoc>,
    pub server_names: Option<IgnoredAny>,
    pub listener: Option<IgnoredAny>,
    #[serde(rename = "originatingTLS")]
    pub originating_tls: Option<IgnoredAny>,
    #[serde(rename = "terminatingTLS")]
    pub terminating_tls: Option<IgnoredAny>,
}

/// A `toPorts` element of a deny rule (Cilium has no L7 deny).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortDenyRuleDoc {
    pub ports: Option<Vec<PortProtocolDoc>>,
}

/// A port with its protocol.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortProtocolDoc {
    pub port: Option<PortValue>,
    pub protocol: Option<String>,
    pub end_port: Option<i64>,
}

/// A port as written: Cilium writes strings (`"80"`), Kubernetes numbers
/// or names; both forms are accepted everywhere.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PortValue {
    /// `80`.
    Number(i64),
    /// `"80"` or `"http"`.
    Text(String),
}

/// `rules` (L7).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L7RulesDoc {
    pub http: Option<Vec<HttpRuleDoc>>,
    pub dns: Option<Vec<DnsRuleDoc>>,
    pub kafka: Option<IgnoredAny>,
    pub l7proto: Option<IgnoredAny>,
    pub l7: Option<IgnoredAny>,
}

/// One HTTP rule.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRuleDoc {
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub headers: Option<Vec<String>>,
    pub header_matches: Option<Vec<HeaderMatchDoc>>,
}

/// One `headerMatches` element.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatchDoc {
    pub name: String,
    pub value: Option<String>,
    pub mismatch: Option<String>,
    pub secret: Option<IgnoredAny>,
}

/// One DNS rule.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DnsRuleDoc {
    pub match_name: Option<String>,
    pub match_pattern: Option<String>,
}

/// Kubernetes `NetworkPolicy` (`networking.k8s.io/v1`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyDoc {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: Meta,
    pub spec: NetworkPolicySpecDoc,
    #[allow(dead_code)]
    pub status: Option<IgnoredAny>,
}

/// `NetworkPolicy.spec`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicySpecDoc {
    pub pod_selector: SelectorDoc,
    pub policy_types: Option<Vec<String>>,
    pub ingress: Option<Vec<NpIngressDoc>>,
    pub egress: Option<Vec<NpEgressDoc>>,
}

/// A NetworkPolicy ingress rule.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NpIngressDoc {
    pub from: Option<Vec<NpPeerDoc>>,
    pub ports: Option<Vec<NpPortDoc>>,
}

/// A NetworkPolicy egress rule.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NpEgressDoc {
    pub to: Option<Vec<NpPeerDoc>>,
    pub ports: Option<Vec<NpPortDoc>>,
}

/// A NetworkPolicy peer.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NpPeerDoc {
    pub pod_selector: Option<SelectorDoc>,
    pub namespace_selector: Option<SelectorDoc>,
    pub ip_block: Option<IpBlockDoc>,
}

/// `ipBlock`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpBlockDoc {
    pub cidr: String,
    pub except: Option<Vec<String>>,
}

/// A NetworkPolicy port.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NpPortDoc {
    pub protocol: Option<String>,
    pub port: Option<PortValue>,
    pub end_port: Option<i64>,
}

/// `Namespace` (`v1`): only its labels matter.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceDoc {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: Meta,
    #[allow(dead_code)]
    pub spec: Option<IgnoredAny>,
    #[allow(dead_code)]
    pub status: Option<IgnoredAny>,
}
