//! The validated domain: what a policy document means, independent of how
//! it was written. [`parse`] turns an applied document into an [`Object`]
//! or a [`ValidationError`] naming the field path
//! (`spec.ingress[0].toPorts[0].ports[0].port`).
//!
//! Namespacing is decided here, once: a namespaced policy's subject
//! selector is restricted to its namespace, and its peer selectors too
//! unless they name a namespace themselves; a cluster-wide policy's empty
//! peer selector (`{}`) selects every pod (every identity with a namespace),
//! not reserved identities.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;
use serde::de::DeserializeOwned;

use crate::docs::{self, PortValue, SelectorDoc};
use crate::labels::{
    self, NAMESPACE_KEY, NAMESPACE_LABELS_PREFIX, Operator, Requirement, SOURCE_K8S, Selector,
};

/// An invalid document: the field path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// Field path, e.g. `spec.ingress[0].toPorts[0].ports[0].port`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        message: message.into(),
    }
}

/// The kinds this service owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `cilium.io/v2` `CiliumNetworkPolicy` (namespaced).
    CiliumNetworkPolicy,
    /// `cilium.io/v2` `CiliumClusterwideNetworkPolicy`.
    CiliumClusterwideNetworkPolicy,
    /// `networking.k8s.io/v1` `NetworkPolicy` (namespaced).
    NetworkPolicy,
    /// `v1` `Namespace`: only its labels, for namespace selectors.
    Namespace,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// === impl Kind ===

impl Kind {
    /// Every kind, with its apiVersion.
    pub const ALL: [Kind; 4] = [
        Kind::CiliumNetworkPolicy,
        Kind::CiliumClusterwideNetworkPolicy,
        Kind::NetworkPolicy,
        Kind::Namespace,
    ];

    /// The kind's name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            Kind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Namespace => "Namespace",
        }
    }

    /// Its apiVersion.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::CiliumNetworkPolicy | Kind::CiliumClusterwideNetworkPolicy => "cilium.io/v2",
            Kind::NetworkPolicy => "networking.k8s.io/v1",
            Kind::Namespace => "v1",
        }
    }

    /// The kind of an (apiVersion, kind) pair, if owned here.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.name() == kind)
    }

    /// Whether objects of this kind live in a namespace.
    pub fn is_namespaced(self) -> bool {
        matches!(self, Kind::CiliumNetworkPolicy | Kind::NetworkPolicy)
    }
}

/// A validated object.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// A policy.
    Policy(Policy),
    /// A namespace's labels.
    Namespace(Namespace),
}

/// A namespace, for namespace selectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Name.
    pub name: String,
    /// Labels, including `kubernetes.io/metadata.name`.
    pub labels: BTreeMap<String, String>,
}

/// A policy: one or more rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Its kind (never `Namespace`).
    pub kind: Kind,
    /// Its namespace; `None` for cluster-wide policies.
    pub namespace: Option<String>,
    /// Its name.
    pub name: String,
    /// Its rules (`spec`, then `specs`).
    pub rules: Vec<Rule>,
}

// === impl Policy ===

impl Policy {
    /// Whether any rule has L7 sections (accepted, not enforced).
    pub fn has_l7(&self) -> bool {
        self.rules.iter().flat_map(|r| &r.entries).any(|e| e.l7)
    }
}

/// One rule: a subject selector and what it allows or denies.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Field path of the rule (`spec`, `specs[1]`).
    pub path: String,
    /// Which identities the rule applies to.
    pub subject: Selector,
    /// Whether selected identities become default-deny for ingress.
    pub enforce_ingress: bool,
    /// Whether selected identities become default-deny for egress.
    pub enforce_egress: bool,
    /// Allow and deny entries.
    pub entries: Vec<Entry>,
}

/// Which list an entry comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Section {
    /// `ingress`.
    Ingress,
    /// `ingressDeny`.
    IngressDeny,
    /// `egress`.
    Egress,
    /// `egressDeny`.
    EgressDeny,
}

/// Direction, seen from the subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Towards the subject.
    Ingress,
    /// From the subject.
    Egress,
}

/// What a rule does with matching traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Let it pass.
    Allow,
    /// Drop it.
    Deny,
}

// === impl Section ===

impl Section {
    /// The field name.
    pub fn name(self) -> &'static str {
        match self {
            Section::Ingress => "ingress",
            Section::IngressDeny => "ingressDeny",
            Section::Egress => "egress",
            Section::EgressDeny => "egressDeny",
        }
    }

    /// Its direction.
    pub fn direction(self) -> Direction {
        match self {
            Section::Ingress | Section::IngressDeny => Direction::Ingress,
            Section::Egress | Section::EgressDeny => Direction::Egress,
        }
    }

    /// Its verdict.
    pub fn verdict(self) -> Verdict {
        match self {
            Section::Ingress | Section::Egress => Verdict::Allow,
            Section::IngressDeny | Section::EgressDeny => Verdict::Deny,
        }
    }
}

/// One element of a section.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The section.
    pub section: Section,
    /// Index in the section.
    pub index: usize,
    /// Peers it applies to.
    pub peers: Peers,
    /// Ports it applies to; empty means every port of every protocol.
    pub ports: Vec<PortRange>,
    /// Whether it carries L7 rules (not enforced).
    pub l7: bool,
}

/// Whom an entry applies to.
#[derive(Debug, Clone, PartialEq)]
pub enum Peers {
    /// Every peer.
    Any,
    /// The listed peers (an empty list matches nothing).
    Listed(Vec<Peer>),
}

/// One peer of an entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Peer {
    /// Identities whose labels the selector matches.
    Endpoints(Selector),
    /// A Cilium entity.
    Entity(Entity),
    /// Addresses in a prefix.
    Cidr(CidrPeer),
}

/// Cilium entities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Entity {
    /// Outside the cluster (identity 2).
    World,
    /// Every global identity plus host, remote-node, init, health, unmanaged.
    Cluster,
    /// The local host (1).
    Host,
    /// Other nodes (6).
    RemoteNode,
    /// Every peer.
    All,
    /// Endpoints whose labels are not known yet (5).
    Init,
    /// Health endpoints (4).
    Health,
    /// Endpoints not managed by Membrane (3).
    Unmanaged,
}

// === impl Entity ===

impl Entity {
    fn parse(field: &str, s: &str) -> Result<Self, ValidationError> {
        Ok(match s {
            "world" => Entity::World,
            "cluster" => Entity::Cluster,
            "host" => Entity::Host,
            "remote-node" => Entity::RemoteNode,
            "all" => Entity::All,
            "init" => Entity::Init,
            "health" => Entity::Health,
            "unmanaged" => Entity::Unmanaged,
            "kube-apiserver" | "ingress" => {
                return Err(invalid(field, format!("entity `{s}` is not supported yet")));
            }
            other => {
                return Err(invalid(
                    field,
                    format!(
                        "unknown entity `{other}` (expected world, cluster, host, remote-node, all, init, health or unmanaged)"
                    ),
                ));
            }
        })
    }
}

/// A CIDR peer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CidrPeer {
    /// The prefix (host bits cleared).
    pub cidr: IpNet,
    /// Prefixes inside it that are excluded.
    pub except: Vec<IpNet>,
}

/// An L4 protocol in a port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP (only in traces: no port rule names it).
    Icmp,
    /// TCP or UDP.
    Any,
}

/// Ports of one protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    /// Protocol.
    pub proto: Proto,
    /// First port.
    pub lo: u16,
    /// Last port.
    pub hi: u16,
}

// === impl PortRange ===

impl PortRange {
    /// Whether a packet to `port` over `proto` falls in the range.
    pub fn matches(&self, port: u16, proto: Proto) -> bool {
        let proto_ok = match self.proto {
            Proto::Any => matches!(proto, Proto::Tcp | Proto::Udp | Proto::Any),
            p => p == proto,
        };
        proto_ok && self.lo <= port && port <= self.hi
    }
}

/// Parses and validates a document of one of the owned kinds.
pub fn parse(
    api_version: &str,
    kind: &str,
    doc: &serde_json::Value,
) -> Result<Object, ValidationError> {
    let kind = Kind::from_type(api_version, kind).ok_or_else(|| {
        invalid(
            "kind",
            format!("`{api_version}/{kind}` is not a policy kind"),
        )
    })?;
    match kind {
        Kind::CiliumNetworkPolicy | Kind::CiliumClusterwideNetworkPolicy => {
            cilium_policy(kind, typed(doc)?).map(Object::Policy)
        }
        Kind::NetworkPolicy => network_policy(typed(doc)?).map(Object::Policy),
        Kind::Namespace => namespace(typed(doc)?).map(Object::Namespace),
    }
}

fn typed<T: DeserializeOwned>(doc: &serde_json::Value) -> Result<T, ValidationError> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        invalid(path, e.into_inner().to_string())
    })
}

fn check_name(field: &str, name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("`{name}` must be a DNS name (lowercase letters, digits, '-', '.')"),
        ))
    }
}

fn scope(kind: Kind, meta: &docs::Meta) -> Result<Option<String>, ValidationError> {
    check_name("metadata.name", &meta.name)?;
    match (kind.is_namespaced(), &meta.namespace) {
        (true, None) => Ok(Some("default".into())),
        (true, Some(ns)) => {
            check_name("metadata.namespace", ns)?;
            Ok(Some(ns.clone()))
        }
        (false, None) => Ok(None),
        (false, Some(_)) => Err(invalid(
            "metadata.namespace",
            format!("{kind} is cluster-scoped"),
        )),
    }
}

fn namespace(doc: docs::NamespaceDoc) -> Result<Namespace, ValidationError> {
    scope(Kind::Namespace, &doc.metadata)?;
    let mut labels = doc.metadata.labels;
    labels.insert(
        labels::NAMESPACE_NAME_LABEL.into(),
        doc.metadata.name.clone(),
    );
    Ok(Namespace {
        name: doc.metadata.name,
        labels,
    })
}

/// Refuses fields that exist in Cilium but are not implemented here.
fn unsupported(path: &str, fields: &[(&str, bool)]) -> Result<(), ValidationError> {
    match fields.iter().find(|(_, present)| *present) {
        Some((name, _)) => Err(invalid(
            format!("{path}.{name}"),
            format!("`{name}` is not supported yet"),
        )),
        None => Ok(()),
    }
}

fn selector(path: &str, doc: &SelectorDoc) -> Result<Selector, ValidationError> {
    let mut sel = Selector::default();
    for (k, v) in doc.match_labels.iter().flatten() {
        check_label_key(&format!("{path}.matchLabels[{k}]"), k)?;
        sel.requirements
            .push(Requirement::new(k, Operator::In, [v.clone()]));
    }
    for (i, e) in doc.match_expressions.iter().flatten().enumerate() {
        let field = format!("{path}.matchExpressions[{i}]");
        check_label_key(&format!("{field}.key"), &e.key)?;
        let values = e.values.clone().unwrap_or_default();
        let op = match e.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return Err(invalid(
                    format!("{field}.operator"),
                    format!(
                        "unknown operator `{other}` (expected In, NotIn, Exists or DoesNotExist)"
                    ),
                ));
            }
        };
        match op {
            Operator::In | Operator::NotIn if values.is_empty() => {
                return Err(invalid(
                    format!("{field}.values"),
                    format!("must not be empty for `{}`", e.operator),
                ));
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                return Err(invalid(
                    format!("{field}.values"),
                    format!("must be empty for `{}`", e.operator),
                ));
            }
            _ => {}
        }
        sel.requirements.push(Requirement::new(&e.key, op, values));
    }
    Ok(sel)
}

fn check_label_key(field: &str, key: &str) -> Result<(), ValidationError> {
    let bare = key.split_once(':').map_or(key, |(_, k)| k);
    if bare.is_empty() || bare.contains(['=', ';', ' ']) {
        return Err(invalid(field, format!("`{key}` is not a valid label key")));
    }
    Ok(())
}

/// How peer selectors of one policy are scoped.
#[derive(Debug, Clone, Copy)]
struct PeerScope<'a> {
    namespace: Option<&'a str>,
}

impl PeerScope<'_> {
    fn peer_selector(&self, sel: Selector) -> Selector {
        match self.namespace {
            Some(ns) if !sel.names_namespace() => {
                sel.with(Requirement::equals(SOURCE_K8S, NAMESPACE_KEY, ns))
            }
            None if sel.is_empty() => sel.with(Requirement {
                source: Some(SOURCE_K8S.into()),
                key: NAMESPACE_KEY.into(),
                op: Operator::Exists,
                values: Default::default(),
            }),
            _ => sel,
        }
    }
}

fn parse_cidr(field: &str, s: &str) -> Result<IpNet, ValidationError> {
    let net = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match s.parse::<std::net::IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => {
                return Err(invalid(
                    field,
                    format!("`{s}` is not a CIDR (e.g. 10.0.0.0/24)"),
                ));
            }
        },
    };
    Ok(net.trunc())
}

fn cidr_peer(field: &str, cidr: &str, except: &[String]) -> Result<CidrPeer, ValidationError> {
    let cidr_field = format!("{field}.cidr");
    let net = parse_cidr(&cidr_field, cidr)?;
    let mut out = Vec::new();
    for (i, e) in except.iter().enumerate() {
        let f = format!("{field}.except[{i}]");
        let ex = parse_cidr(&f, e)?;
        if !net.contains(&ex) {
            return Err(invalid(f, format!("`{e}` is not inside `{net}`")));
        }
        out.push(ex);
    }
    out.sort();
    out.dedup();
    Ok(CidrPeer {
        cidr: net,
        except: out,
    })
}

/// The peer fields of a Cilium entry, by field name.
struct CiliumPeers<'a> {
    endpoints: (&'a str, Option<&'a Vec<SelectorDoc>>),
    entities: (&'a str, Option<&'a Vec<String>>),
    cidr: (&'a str, Option<&'a Vec<String>>),
    cidr_set: (&'a str, Option<&'a Vec<docs::CidrRuleDoc>>),
}

fn cilium_peers(
    path: &str,
    p: CiliumPeers<'_>,
    scope: PeerScope<'_>,
) -> Result<Option<Peers>, ValidationError> {
    let mut peers = Vec::new();
    let mut any_field = false;
    let mut all = false;
    for (i, s) in p.endpoints.1.iter().copied().flatten().enumerate() {
        any_field = true;
        let sel = selector(&format!("{path}.{}[{i}]", p.endpoints.0), s)?;
        peers.push(Peer::Endpoints(scope.peer_selector(sel)));
    }
    for (i, e) in p.entities.1.iter().copied().flatten().enumerate() {
        any_field = true;
        let entity = Entity::parse(&format!("{path}.{}[{i}]", p.entities.0), e)?;
        all |= entity == Entity::All;
        peers.push(Peer::Entity(entity));
    }
    for (i, c) in p.cidr.1.iter().copied().flatten().enumerate() {
        any_field = true;
        let f = format!("{path}.{}[{i}]", p.cidr.0);
        peers.push(Peer::Cidr(CidrPeer {
            cidr: parse_cidr(&f, c)?,
            except: Vec::new(),
        }));
    }
    for (i, c) in p.cidr_set.1.iter().copied().flatten().enumerate() {
        any_field = true;
        let f = format!("{path}.{}[{i}]", p.cidr_set.0);
        unsupported(
            &f,
            &[
                ("cidrGroupRef", c.cidr_group_ref.is_some()),
                ("cidrGroupSelector", c.cidr_group_selector.is_some()),
            ],
        )?;
        let cidr = c
            .cidr
            .as_deref()
            .ok_or_else(|| invalid(format!("{f}.cidr"), "required"))?;
        peers.push(Peer::Cidr(cidr_peer(
            &f,
            cidr,
            c.except.as_deref().unwrap_or_default(),
        )?));
    }
    Ok(match (any_field, all) {
        (false, _) => None,
        (true, true) => Some(Peers::Any),
        (true, false) => Some(Peers::Listed(peers)),
    })
}

fn protocol(field: &str, s: Option<&str>, default: Proto) -> Result<Proto, ValidationError> {
    match s {
        None | Some("") => Ok(default),
        Some("TCP") => Ok(Proto::Tcp),
        Some("UDP") => Ok(Proto::Udp),
        Some("ANY") if default == Proto::Any => Ok(Proto::Any),
        Some("SCTP") => Err(invalid(field, "protocol SCTP is not supported yet")),
        Some(other) => Err(invalid(
            field,
            if default == Proto::Any {
                format!("unknown protocol `{other}` (expected TCP, UDP or ANY)")
            } else {
                format!("unknown protocol `{other}` (expected TCP or UDP)")
            },
        )),
    }
}

/// Whether `s` is a valid port name (IANA_SVC_NAME, as Kubernetes checks it).
fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// One port entry → a range. `zero_ok`: Cilium reads port 0 (or none) as
/// every port; Kubernetes requires 1-65535 when a port is given.
fn port_range(
    path: &str,
    port: Option<&PortValue>,
    proto: Proto,
    end_port: Option<i64>,
    zero_ok: bool,
) -> Result<PortRange, ValidationError> {
    let pf = format!("{path}.port");
    let number = match port {
        None => 0,
        Some(PortValue::Number(n)) => *n,
        Some(PortValue::Text(s)) => match s.parse::<i64>() {
            Ok(n) => n,
            Err(_) if is_port_name(s) => {
                return Err(invalid(
                    pf,
                    format!("named ports are not supported yet (`{s}`): use the port number"),
                ));
            }
            Err(_) => return Err(invalid(pf, format!("`{s}` is not a port number or name"))),
        },
    };
    let min = if zero_ok || port.is_none() { 0 } else { 1 };
    if !(min..=65535).contains(&number) {
        return Err(invalid(
            pf,
            format!("port {number} is out of range ({min}-65535)"),
        ));
    }
    let lo = number as u16;
    let hi = match end_port {
        None if lo == 0 => 65535,
        None => lo,
        Some(_) if lo == 0 => {
            return Err(invalid(
                format!("{path}.endPort"),
                "endPort requires a port number",
            ));
        }
        Some(e) if !(1..=65535).contains(&e) => {
            return Err(invalid(
                format!("{path}.endPort"),
                format!("endPort {e} is out of range (1-65535)"),
            ));
        }
        Some(e) if e < number => {
            return Err(invalid(
                format!("{path}.endPort"),
                format!("endPort {e} is below port {number}"),
            ));
        }
        Some(e) => e as u16,
    };
    Ok(PortRange { proto, lo, hi })
}

fn port_list(
    path: &str,
    ports: Option<&Vec<docs::PortProtocolDoc>>,
) -> Result<Vec<PortRange>, ValidationError> {
    let ports = ports.map(Vec::as_slice).unwrap_or_default();
    if ports.is_empty() {
        return Err(invalid(
            format!("{path}.ports"),
            "at least one port is required",
        ));
    }
    ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let f = format!("{path}.ports[{i}]");
            let proto = protocol(&format!("{f}.protocol"), p.protocol.as_deref(), Proto::Any)?;
            port_range(&f, p.port.as_ref(), proto, p.end_port, true)
        })
        .collect()
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

fn l7_rules(path: &str, rules: &docs::L7RulesDoc) -> Result<bool, ValidationError> {
    unsupported(
        path,
        &[
            ("kafka", rules.kafka.is_some()),
            ("l7proto", rules.l7proto.is_some()),
            ("l7", rules.l7.is_some()),
        ],
    )?;
    let no_space = |f: String, what: &str, v: &str| {
        if v.is_empty() || v.chars().any(char::is_whitespace) {
            Err(invalid(
                f,
                format!("{what} `{v}` must be non-empty without spaces"),
            ))
        } else {
            Ok(())
        }
    };
    for (i, h) in rules.http.iter().flatten().enumerate() {
        let f = format!("{path}.http[{i}]");
        if let Some(m) = &h.method {
            no_space(format!("{f}.method"), "method", m)?;
        }
        if let Some(p) = &h.path {
            no_space(format!("{f}.path"), "path", p)?;
        }
        if let Some(host) = &h.host {
            no_space(format!("{f}.host"), "host", host)?;
        }
        for (j, header) in h.headers.iter().flatten().enumerate() {
            let name = header
                .split_once(':')
                .map_or(header.as_str(), |(n, _)| n)
                .trim();
            if !is_header_name(name) {
                return Err(invalid(
                    format!("{f}.headers[{j}]"),
                    format!("`{header}` is not `Name` or `Name: value`"),
                ));
            }
        }
        for (j, m) in h.header_matches.iter().flatten().enumerate() {
            let g = format!("{f}.headerMatches[{j}]");
            if !is_header_name(&m.name) {
                return Err(invalid(
                    format!("{g}.name"),
                    format!("`{}` is not a header name", m.name),
                ));
            }
            unsupported(&g, &[("secret", m.secret.is_some())])?;
            if let Some(mm) = &m.mismatch
                && !matches!(mm.as_str(), "" | "LOG" | "ADD" | "DELETE" | "REPLACE")
            {
                return Err(invalid(
                    format!("{g}.mismatch"),
                    format!(
                        "unknown mismatch action `{mm}` (expected LOG, ADD, DELETE or REPLACE)"
                    ),
                ));
            }
            let _ = &m.value;
        }
    }
    for (i, d) in rules.dns.iter().flatten().enumerate() {
        let f = format!("{path}.dns[{i}]");
        if d.match_name.is_none() && d.match_pattern.is_none() {
            return Err(invalid(f, "one of matchName or matchPattern is required"));
        }
    }
    let http = rules.http.as_ref().is_some_and(|v| !v.is_empty());
    let dns = rules.dns.as_ref().is_some_and(|v| !v.is_empty());
    Ok(http || dns)
}

/// `toPorts` of an allow entry → (ranges, has L7). `None` when absent.
fn allow_ports(
    path: &str,
    to_ports: Option<&Vec<docs::PortRuleDoc>>,
) -> Result<Option<(Vec<PortRange>, bool)>, ValidationError> {
    let Some(list) = to_ports.filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let mut ranges = Vec::new();
    let mut l7 = false;
    for (i, pr) in list.iter().enumerate() {
        let f = format!("{path}.toPorts[{i}]");
        unsupported(
            &f,
            &[
                ("serverNames", pr.server_names.is_some()),
                ("listener", pr.listener.is_some()),
                ("originatingTLS", pr.originating_tls.is_some()),
                ("terminatingTLS", pr.terminating_tls.is_some()),
            ],
        )?;
        ranges.extend(port_list(&f, pr.ports.as_ref())?);
        if let Some(rules) = &pr.rules {
            l7 |= l7_rules(&format!("{f}.rules"), rules)?;
        }
    }
    Ok(Some((ranges, l7)))
}

fn deny_ports(
    path: &str,
    to_ports: Option<&Vec<docs::PortDenyRuleDoc>>,
) -> Result<Option<Vec<PortRange>>, ValidationError> {
    let Some(list) = to_ports.filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let mut ranges = Vec::new();
    for (i, pr) in list.iter().enumerate() {
        ranges.extend(port_list(
            &format!("{path}.toPorts[{i}]"),
            pr.ports.as_ref(),
        )?);
    }
    Ok(Some(ranges))
}

/// Builds an entry: no peer field and no ports matches nothing (Cilium's
/// `ingress: [{}]`: default deny, nothing allowed); ports without peers
/// apply to every peer.
fn entry(
    section: Section,
    index: usize,
    peers: Option<Peers>,
    ports: Option<(Vec<PortRange>, bool)>,
) -> Option<Entry> {
    let (peers, (ports, l7)) = match (peers, ports) {
        (None, None) => return None,
        (None, Some(p)) => (Peers::Any, p),
        (Some(peers), p) => (peers, p.unwrap_or_default()),
    };
    Some(Entry {
        section,
        index,
        peers,
        ports,
        l7,
    })
}

fn cilium_policy(kind: Kind, doc: docs::CiliumPolicyDoc) -> Result<Policy, ValidationError> {
    let namespace = scope(kind, &doc.metadata)?;
    let mut specs: Vec<(String, &docs::CiliumRuleDoc)> = Vec::new();
    if let Some(s) = &doc.spec {
        specs.push(("spec".into(), s));
    }
    for (i, s) in doc.specs.iter().flatten().enumerate() {
        specs.push((format!("specs[{i}]"), s));
    }
    if specs.is_empty() {
        return Err(invalid("spec", "a policy needs `spec` or `specs`"));
    }
    let ps = PeerScope {
        namespace: namespace.as_deref(),
    };
    let mut rules = Vec::new();
    for (path, r) in specs {
        rules.push(cilium_rule(&path, r, namespace.as_deref(), ps)?);
    }
    Ok(Policy {
        kind,
        namespace,
        name: doc.metadata.name,
        rules,
    })
}

fn cilium_rule(
    path: &str,
    r: &docs::CiliumRuleDoc,
    namespace: Option<&str>,
    ps: PeerScope<'_>,
) -> Result<Rule, ValidationError> {
    unsupported(path, &[("nodeSelector", r.node_selector.is_some())])?;
    let sel_doc = r
        .endpoint_selector
        .as_ref()
        .ok_or_else(|| invalid(format!("{path}.endpointSelector"), "required"))?;
    let mut subject = selector(&format!("{path}.endpointSelector"), sel_doc)?;
    if let Some(ns) = namespace {
        // Namespaced policies select only endpoints of their own namespace.
        subject = subject.with(Requirement::equals(SOURCE_K8S, NAMESPACE_KEY, ns));
    }
    let mut entries = Vec::new();
    for (i, e) in r.ingress.iter().flatten().enumerate() {
        let f = format!("{path}.ingress[{i}]");
        unsupported(
            &f,
            &[
                ("fromRequires", e.from_requires.is_some()),
                ("fromNodes", e.from_nodes.is_some()),
                ("fromGroups", e.from_groups.is_some()),
                ("icmps", e.icmps.is_some()),
                ("authentication", e.authentication.is_some()),
            ],
        )?;
        let peers = cilium_peers(
            &f,
            CiliumPeers {
                endpoints: ("fromEndpoints", e.from_endpoints.as_ref()),
                entities: ("fromEntities", e.from_entities.as_ref()),
                cidr: ("fromCIDR", e.from_cidr.as_ref()),
                cidr_set: ("fromCIDRSet", e.from_cidr_set.as_ref()),
            },
            ps,
        )?;
        let ports = allow_ports(&f, e.to_ports.as_ref())?;
        entries.extend(entry(Section::Ingress, i, peers, ports));
    }
    for (i, e) in r.ingress_deny.iter().flatten().enumerate() {
        let f = format!("{path}.ingressDeny[{i}]");
        unsupported(
            &f,
            &[
                ("fromRequires", e.from_requires.is_some()),
                ("fromNodes", e.from_nodes.is_some()),
                ("fromGroups", e.from_groups.is_some()),
                ("icmps", e.icmps.is_some()),
            ],
        )?;
        let peers = cilium_peers(
            &f,
            CiliumPeers {
                endpoints: ("fromEndpoints", e.from_endpoints.as_ref()),
                entities: ("fromEntities", e.from_entities.as_ref()),
                cidr: ("fromCIDR", e.from_cidr.as_ref()),
                cidr_set: ("fromCIDRSet", e.from_cidr_set.as_ref()),
            },
            ps,
        )?;
        let ports = deny_ports(&f, e.to_ports.as_ref())?.map(|p| (p, false));
        entries.extend(entry(Section::IngressDeny, i, peers, ports));
    }
    for (i, e) in r.egress.iter().flatten().enumerate() {
        let f = format!("{path}.egress[{i}]");
        unsupported(
            &f,
            &[
                ("toRequires", e.to_requires.is_some()),
                ("toServices", e.to_services.is_some()),
                ("toFQDNs", e.to_fqdns.is_some()),
                ("toGroups", e.to_groups.is_some()),
                ("toNodes", e.to_nodes.is_some()),
                ("icmps", e.icmps.is_some()),
                ("authentication", e.authentication.is_some()),
            ],
        )?;
        let peers = cilium_peers(
            &f,
            CiliumPeers {
                endpoints: ("toEndpoints", e.to_endpoints.as_ref()),
                entities: ("toEntities", e.to_entities.as_ref()),
                cidr: ("toCIDR", e.to_cidr.as_ref()),
                cidr_set: ("toCIDRSet", e.to_cidr_set.as_ref()),
            },
            ps,
        )?;
        let ports = allow_ports(&f, e.to_ports.as_ref())?;
        entries.extend(entry(Section::Egress, i, peers, ports));
    }
    for (i, e) in r.egress_deny.iter().flatten().enumerate() {
        let f = format!("{path}.egressDeny[{i}]");
        unsupported(
            &f,
            &[
                ("toRequires", e.to_requires.is_some()),
                ("toServices", e.to_services.is_some()),
                ("toGroups", e.to_groups.is_some()),
                ("toNodes", e.to_nodes.is_some()),
                ("icmps", e.icmps.is_some()),
            ],
        )?;
        let peers = cilium_peers(
            &f,
            CiliumPeers {
                endpoints: ("toEndpoints", e.to_endpoints.as_ref()),
                entities: ("toEntities", e.to_entities.as_ref()),
                cidr: ("toCIDR", e.to_cidr.as_ref()),
                cidr_set: ("toCIDRSet", e.to_cidr_set.as_ref()),
            },
            ps,
        )?;
        let ports = deny_ports(&f, e.to_ports.as_ref())?.map(|p| (p, false));
        entries.extend(entry(Section::EgressDeny, i, peers, ports));
    }
    let non_empty = |n: usize| n > 0;
    let dd = r.enable_default_deny.as_ref();
    let enforce_ingress = (non_empty(r.ingress.as_ref().map_or(0, Vec::len))
        || non_empty(r.ingress_deny.as_ref().map_or(0, Vec::len)))
        && dd.and_then(|d| d.ingress) != Some(false);
    let enforce_egress = (non_empty(r.egress.as_ref().map_or(0, Vec::len))
        || non_empty(r.egress_deny.as_ref().map_or(0, Vec::len)))
        && dd.and_then(|d| d.egress) != Some(false);
    Ok(Rule {
        path: path.to_string(),
        subject,
        enforce_ingress,
        enforce_egress,
        entries,
    })
}

/// A NetworkPolicy peer as a selector (pods) or a CIDR.
fn np_peer(path: &str, p: &docs::NpPeerDoc, ns: &str) -> Result<Peer, ValidationError> {
    if let Some(block) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            return Err(invalid(
                format!("{path}.ipBlock"),
                "ipBlock may not be combined with podSelector or namespaceSelector",
            ));
        }
        return Ok(Peer::Cidr(cidr_peer(
            &format!("{path}.ipBlock"),
            &block.cidr,
            block.except.as_deref().unwrap_or_default(),
        )?));
    }
    let mut sel = match &p.pod_selector {
        Some(s) => pod_selector(&format!("{path}.podSelector"), s)?,
        None => Selector::default(),
    };
    match &p.namespace_selector {
        None if p.pod_selector.is_none() => {
            return Err(invalid(
                path,
                "a peer needs podSelector, namespaceSelector or ipBlock",
            ));
        }
        None => sel = sel.with(Requirement::equals(SOURCE_K8S, NAMESPACE_KEY, ns)),
        Some(nsel) => {
            // Namespace labels join pod labels under a prefix (as in Cilium).
            let nsel = selector(&format!("{path}.namespaceSelector"), nsel)?;
            for r in nsel.requirements {
                sel = sel.with(Requirement {
                    source: Some(SOURCE_K8S.into()),
                    key: format!("{NAMESPACE_LABELS_PREFIX}{}", r.key),
                    ..r
                });
            }
            sel = sel.with(Requirement {
                source: Some(SOURCE_K8S.into()),
                key: NAMESPACE_KEY.into(),
                op: Operator::Exists,
                values: Default::default(),
            });
        }
    }
    Ok(Peer::Endpoints(sel))
}

/// A Kubernetes pod selector: keys are pod labels, source `k8s`.
fn pod_selector(path: &str, doc: &SelectorDoc) -> Result<Selector, ValidationError> {
    let sel = selector(path, doc)?;
    Ok(Selector {
        requirements: sel
            .requirements
            .into_iter()
            .map(|r| Requirement {
                source: Some(r.source.unwrap_or_else(|| SOURCE_K8S.into())),
                ..r
            })
            .collect(),
    })
}

fn np_ports(
    path: &str,
    ports: Option<&Vec<docs::NpPortDoc>>,
) -> Result<Vec<PortRange>, ValidationError> {
    ports
        .iter()
        .copied()
        .flatten()
        .enumerate()
        .map(|(i, p)| {
            let f = format!("{path}.ports[{i}]");
            let proto = protocol(&format!("{f}.protocol"), p.protocol.as_deref(), Proto::Tcp)?;
            port_range(&f, p.port.as_ref(), proto, p.end_port, false)
        })
        .collect()
}

fn network_policy(doc: docs::NetworkPolicyDoc) -> Result<Policy, ValidationError> {
    let ns = scope(Kind::NetworkPolicy, &doc.metadata)?.unwrap_or_else(|| "default".into());
    let spec = &doc.spec;
    let subject = pod_selector("spec.podSelector", &spec.pod_selector)?.with(Requirement::equals(
        SOURCE_K8S,
        NAMESPACE_KEY,
        &ns,
    ));
    let (mut ingress_type, mut egress_type) = (false, false);
    match &spec.policy_types {
        None => {
            ingress_type = true;
            egress_type = spec.egress.is_some();
        }
        Some(types) => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ingress_type = true,
                    "Egress" => egress_type = true,
                    other => {
                        return Err(invalid(
                            format!("spec.policyTypes[{i}]"),
                            format!("unknown policy type `{other}` (expected Ingress or Egress)"),
                        ));
                    }
                }
            }
        }
    }
    let mut entries = Vec::new();
    if ingress_type {
        for (i, r) in spec.ingress.iter().flatten().enumerate() {
            let f = format!("spec.ingress[{i}]");
            let peers = np_peers(&f, "from", r.from.as_ref(), &ns)?;
            let ports = np_ports(&f, r.ports.as_ref())?;
            entries.push(Entry {
                section: Section::Ingress,
                index: i,
                peers,
                ports,
                l7: false,
            });
        }
    }
    if egress_type {
        for (i, r) in spec.egress.iter().flatten().enumerate() {
            let f = format!("spec.egress[{i}]");
            let peers = np_peers(&f, "to", r.to.as_ref(), &ns)?;
            let ports = np_ports(&f, r.ports.as_ref())?;
            entries.push(Entry {
                section: Section::Egress,
                index: i,
                peers,
                ports,
                l7: false,
            });
        }
    }
    Ok(Policy {
        kind: Kind::NetworkPolicy,
        namespace: Some(ns),
        name: doc.metadata.name.clone(),
        rules: vec![Rule {
            path: "spec".into(),
            subject,
            enforce_ingress: ingress_type,
            enforce_egress: egress_type,
            entries,
        }],
    })
}

/// NetworkPolicy peers: an empty or missing list means every peer.
fn np_peers(
    path: &str,
    field: &str,
    peers: Option<&Vec<docs::NpPeerDoc>>,
    ns: &str,
) -> Result<Peers, ValidationError> {
    match peers.filter(|p| !p.is_empty()) {
        None => Ok(Peers::Any),
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, p)| np_peer(&format!("{path}.{field}[{i}]"), p, ns))
            .collect::<Result<_, _>>()
            .map(Peers::Listed),
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
