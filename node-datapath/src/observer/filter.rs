//! Flow filters (`membrane.observer.v1.FlowFilter`), compiled once per
//! request and matched per flow. Pure: no I/O, no tonic.
//!
//! Semantics (as written in the proto):
//! - Within one filter, every field that is set must match (AND); a field
//!   with several values matches when any value does (OR).
//! - A request's whitelist matches when any filter does (OR; an empty
//!   whitelist matches everything); its blacklist excludes a flow that any
//!   filter matches.
//! - Pods: `namespace/name` (exact), `namespace/` (every pod of the
//!   namespace), `name` (the `default` namespace). `pod` matches either side.
//! - Labels: each value is a comma-separated selector whose terms are ANDed;
//!   a term is `key=value`, `key!=value` or `key` (exists). A term without a
//!   source (`app=web`) matches a label of any source (`k8s:app=web`,
//!   `app=web`); a term with one (`k8s:app=web`) matches only that source.
//! - Addresses: an address or a CIDR prefix. Ports: a number. Protocols:
//!   `tcp`, `udp`, `icmp` (also `icmpv4`), case-insensitive.
//! - Namespace: either side's namespace. Node: the observing node, exact or
//!   a trailing `*` prefix pattern.
//! - HTTP fields match only flows with HTTP details; no flow has them until
//!   L7 flows exist, so a filter setting one matches nothing. The path is
//!   compared exactly (no regular expressions yet); the status code is exact
//!   or a `5+` style prefix.

use std::net::IpAddr;

use ipnet::IpNet;
use membrane_proto::observer::v1 as pb;

/// A filter value that cannot mean anything; names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("{field}: `{value}` is not an address or CIDR prefix")]
    Address { field: &'static str, value: String },
    #[error("{field}: `{value}` is not a port")]
    Port { field: &'static str, value: String },
    #[error("protocol: `{0}` is not one of tcp, udp, icmp")]
    Protocol(String),
    #[error("{field}: `{value}` is not a label selector")]
    Label { field: &'static str, value: String },
    #[error("{field}: `{value}` is not a pod (`namespace/name`, `namespace/` or `name`)")]
    Pod { field: &'static str, value: String },
    #[error("http_status_code: `{0}` is not a status code or `N+` prefix")]
    StatusCode(String),
    #[error("{field}: {value} is not a known value")]
    Enum { field: &'static str, value: i32 },
}

impl FilterError {
    /// The request field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Address { field, .. }
            | Self::Port { field, .. }
            | Self::Label { field, .. }
            | Self::Pod { field, .. }
            | Self::Enum { field, .. } => field,
            Self::Protocol(_) => "protocol",
            Self::StatusCode(_) => "http_status_code",
        }
    }
}

/// A request's whitelist and blacklist, compiled.
#[derive(Debug, Clone, Default)]
pub struct FlowFilters {
    whitelist: Vec<Filter>,
    blacklist: Vec<Filter>,
}

impl FlowFilters {
    /// Compiles both lists; the first bad value fails the whole request.
    pub fn new(
        whitelist: Vec<pb::FlowFilter>,
        blacklist: Vec<pb::FlowFilter>,
    ) -> Result<Self, FilterError> {
        Ok(Self {
            whitelist: whitelist
                .into_iter()
                .map(Filter::try_from)
                .collect::<Result<_, _>>()?,
            blacklist: blacklist
                .into_iter()
                .map(Filter::try_from)
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether `flow` passes: matched by the whitelist (or it is empty) and by no blacklist filter.
    pub fn allows(&self, flow: &pb::Flow) -> bool {
        (self.whitelist.is_empty() || self.whitelist.iter().any(|f| f.matches(flow)))
            && !self.blacklist.iter().any(|f| f.matches(flow))
    }
}

/// One compiled `FlowFilter`. Empty vectors are fields not set.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    source_pod: Vec<PodPattern>,
    destination_pod: Vec<PodPattern>,
    pod: Vec<PodPattern>,
    source_ip: Vec<IpNet>,
    destination_ip: Vec<IpNet>,
    source_label: Vec<Selector>,
    destination_label: Vec<Selector>,
    source_identity: Vec<u32>,
    destination_identity: Vec<u32>,
    verdict: Vec<i32>,
    event_type: Vec<i32>,
    protocol: Vec<Protocol>,
    source_port: Vec<u16>,
    destination_port: Vec<u16>,
    namespace: Vec<String>,
    node_name: Vec<String>,
    http_method: Vec<String>,
    http_path: Vec<String>,
    http_status_code: Vec<StatusPattern>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PodPattern {
    /// `namespace/name`.
    Exact { namespace: String, name: String },
    /// `namespace/`.
    Namespace(String),
}

/// ANDed terms of one label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector(Vec<LabelTerm>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct LabelTerm {
    /// `k8s`, `reserved`, ...; `None` matches any source.
    source: Option<String>,
    key: String,
    op: LabelOp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelOp {
    Exists,
    Equals(String),
    NotEquals(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Tcp,
    Udp,
    Icmp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum StatusPattern {
    Exact(u32),
    /// `5+`: every code whose decimal form starts with these digits.
    Prefix(String),
}

// === impl Filter ===

impl TryFrom<pb::FlowFilter> for Filter {
    type Error = FilterError;

    fn try_from(f: pb::FlowFilter) -> Result<Self, Self::Error> {
        // Destructured so a new proto field fails to compile until handled.
        let pb::FlowFilter {
            source_pod,
            destination_pod,
            source_ip,
            destination_ip,
            source_label,
            destination_label,
            source_identity,
            destination_identity,
            verdict,
            event_type,
            protocol,
            source_port,
            destination_port,
            namespace,
            node_name,
            http_method,
            http_path,
            http_status_code,
            pod,
        } = f;
        let pods = |field: &'static str, v: Vec<String>| {
            v.into_iter()
                .map(|s| PodPattern::parse(field, &s))
                .collect::<Result<Vec<_>, _>>()
        };
        let ips = |field: &'static str, v: Vec<String>| {
            v.into_iter()
                .map(|s| parse_net(field, &s))
                .collect::<Result<Vec<_>, _>>()
        };
        let labels = |field: &'static str, v: Vec<String>| {
            v.into_iter()
                .map(|s| Selector::parse(field, &s))
                .collect::<Result<Vec<_>, _>>()
        };
        let ports = |field: &'static str, v: Vec<String>| {
            v.into_iter()
                .map(|s| {
                    s.trim()
                        .parse::<u16>()
                        .map_err(|_| FilterError::Port { field, value: s })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        for v in &verdict {
            pb::Verdict::try_from(*v).map_err(|_| FilterError::Enum {
                field: "verdict",
                value: *v,
            })?;
        }
        for v in &event_type {
            pb::EventType::try_from(*v).map_err(|_| FilterError::Enum {
                field: "event_type",
                value: *v,
            })?;
        }
        Ok(Self {
            source_pod: pods("source_pod", source_pod)?,
            destination_pod: pods("destination_pod", destination_pod)?,
            pod: pods("pod", pod)?,
            source_ip: ips("source_ip", source_ip)?,
            destination_ip: ips("destination_ip", destination_ip)?,
            source_label: labels("source_label", source_label)?,
            destination_label: labels("destination_label", destination_label)?,
            source_identity,
            destination_identity,
            verdict,
            event_type,
            protocol: protocol
                .into_iter()
                .map(|p| Protocol::parse(&p))
                .collect::<Result<_, _>>()?,
            source_port: ports("source_port", source_port)?,
            destination_port: ports("destination_port", destination_port)?,
            namespace,
            node_name,
            http_method,
            http_path,
            http_status_code: http_status_code
                .into_iter()
                .map(|s| StatusPattern::parse(&s))
                .collect::<Result<_, _>>()?,
        })
    }
}

impl Filter {
    /// Whether every set field matches `flow`.
    pub fn matches(&self, flow: &pb::Flow) -> bool {
        let src = flow.source.as_ref();
        let dst = flow.destination.as_ref();
        let ip = flow.ip.as_ref();
        let (sport, dport) = ports(flow);
        let http = flow.http.as_ref();
        any(&self.source_pod, |p| p.matches(src))
            && any(&self.destination_pod, |p| p.matches(dst))
            && any(&self.pod, |p| p.matches(src) || p.matches(dst))
            && any(&self.source_ip, |n| {
                addr_in(n, ip.map(|i| i.source.as_str()))
            })
            && any(&self.destination_ip, |n| {
                addr_in(n, ip.map(|i| i.destination.as_str()))
            })
            && any(&self.source_label, |s| s.matches(src))
            && any(&self.destination_label, |s| s.matches(dst))
            && any(&self.source_identity, |id| {
                src.is_some_and(|e| e.identity == *id)
            })
            && any(&self.destination_identity, |id| {
                dst.is_some_and(|e| e.identity == *id)
            })
            && any(&self.verdict, |v| flow.verdict == *v)
            && any(&self.event_type, |t| flow.event_type == *t)
            && any(&self.protocol, |p| p.matches(flow))
            && any(&self.source_port, |p| sport == Some(*p))
            && any(&self.destination_port, |p| dport == Some(*p))
            && any(&self.namespace, |ns| {
                [src, dst]
                    .into_iter()
                    .flatten()
                    .any(|e| !e.namespace.is_empty() && e.namespace == *ns)
            })
            && any(&self.node_name, |pat| node_matches(pat, &flow.node_name))
            && any(&self.http_method, |m| {
                http.is_some_and(|h| h.method.eq_ignore_ascii_case(m))
            })
            && any(&self.http_path, |p| http.is_some_and(|h| h.url == *p))
            && any(&self.http_status_code, |s| {
                http.is_some_and(|h| s.matches(h.code))
            })
    }
}

/// An unset field (no values) matches; a set one when any value does.
fn any<T>(values: &[T], f: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(f)
}

fn ports(flow: &pb::Flow) -> (Option<u16>, Option<u16>) {
    use pb::layer4::Protocol as P;
    let port = |p: u32| u16::try_from(p).ok();
    match flow.l4.as_ref().and_then(|l4| l4.protocol.as_ref()) {
        Some(P::Tcp(t)) => (port(t.source_port), port(t.destination_port)),
        Some(P::Udp(u)) => (port(u.source_port), port(u.destination_port)),
        _ => (None, None),
    }
}

fn parse_net(field: &'static str, s: &str) -> Result<IpNet, FilterError> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| FilterError::Address {
            field,
            value: s.to_string(),
        })
}

fn addr_in(net: &IpNet, addr: Option<&str>) -> bool {
    addr.and_then(|a| a.parse::<IpAddr>().ok())
        .is_some_and(|a| net.contains(&a))
}

fn node_matches(pattern: &str, node: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => node.starts_with(prefix),
        None => node == pattern,
    }
}

// === impl PodPattern ===

impl PodPattern {
    fn parse(field: &'static str, s: &str) -> Result<Self, FilterError> {
        let bad = || FilterError::Pod {
            field,
            value: s.to_string(),
        };
        let s = s.trim();
        match s.split_once('/') {
            Some((ns, "")) if !ns.is_empty() => Ok(Self::Namespace(ns.to_string())),
            Some((ns, name)) if !ns.is_empty() && !name.contains('/') => Ok(Self::Exact {
                namespace: ns.to_string(),
                name: name.to_string(),
            }),
            Some(_) => Err(bad()),
            None if s.is_empty() => Err(bad()),
            None => Ok(Self::Exact {
                namespace: "default".to_string(),
                name: s.to_string(),
            }),
        }
    }

    fn matches(&self, ep: Option<&pb::Endpoint>) -> bool {
        let Some(ep) = ep.filter(|e| !e.pod_name.is_empty()) else {
            return false;
        };
        match self {
            Self::Exact { namespace, name } => ep.namespace == *namespace && ep.pod_name == *name,
            Self::Namespace(ns) => ep.namespace == *ns,
        }
    }
}

// === impl Selector ===

impl Selector {
    fn parse(field: &'static str, s: &str) -> Result<Self, FilterError> {
        let bad = || FilterError::Label {
            field,
            value: s.to_string(),
        };
        let terms = s
            .split(',')
            .map(|t| LabelTerm::parse(t.trim()).ok_or_else(bad))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self(terms))
    }

    fn matches(&self, ep: Option<&pb::Endpoint>) -> bool {
        let labels = ep.map(|e| e.labels.as_slice()).unwrap_or_default();
        self.0.iter().all(|t| t.matches(labels))
    }
}

impl LabelTerm {
    fn parse(t: &str) -> Option<Self> {
        let (lhs, op) = if let Some((k, v)) = t.split_once("!=") {
            (k, LabelOp::NotEquals(v.to_string()))
        } else if let Some((k, v)) = t.split_once('=') {
            (k, LabelOp::Equals(v.to_string()))
        } else {
            (t, LabelOp::Exists)
        };
        let (source, key) = split_source(lhs);
        if key.is_empty() || key.contains(char::is_whitespace) {
            return None;
        }
        Some(Self {
            source: source.map(str::to_string),
            key: key.to_string(),
            op,
        })
    }

    fn matches(&self, labels: &[String]) -> bool {
        let value_of = |label: &str| -> Option<String> {
            let (k, v) = label.split_once('=').unwrap_or((label, ""));
            let (source, key) = split_source(k);
            let source_ok = match (&self.source, source) {
                (None, _) => true,
                (Some(want), Some(have)) => want == have,
                (Some(_), None) => false,
            };
            (source_ok && key == self.key).then(|| v.to_string())
        };
        let mut values = labels.iter().filter_map(|l| value_of(l));
        match &self.op {
            LabelOp::Exists => values.next().is_some(),
            LabelOp::Equals(want) => values.any(|v| v == *want),
            LabelOp::NotEquals(want) => values.all(|v| v != *want),
        }
    }
}

/// `k8s:app` → (`k8s`, `app`); `app` → (None, `app`). Keys may contain `.`
/// and `/` (`io.kubernetes.pod.namespace`, `app.kubernetes.io/name`) but not `:`.
fn split_source(s: &str) -> (Option<&str>, &str) {
    match s.split_once(':') {
        Some((source, key)) => (Some(source), key),
        None => (None, s),
    }
}

// === impl Protocol ===

impl Protocol {
    fn parse(s: &str) -> Result<Self, FilterError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            "icmp" | "icmpv4" => Ok(Self::Icmp),
            _ => Err(FilterError::Protocol(s.to_string())),
        }
    }

    fn matches(self, flow: &pb::Flow) -> bool {
        use pb::layer4::Protocol as P;
        matches!(
            (self, flow.l4.as_ref().and_then(|l4| l4.protocol.as_ref())),
            (Self::Tcp, Some(P::Tcp(_)))
                | (Self::Udp, Some(P::Udp(_)))
                | (Self::Icmp, Some(P::Icmpv4(_)))
        )
    }
}

// === impl StatusPattern ===

impl StatusPattern {
    fn parse(s: &str) -> Result<Self, FilterError> {
        let t = s.trim();
        let digits =
            |d: &str| !d.is_empty() && d.len() <= 3 && d.bytes().all(|b| b.is_ascii_digit());
        match t.strip_suffix('+') {
            Some(prefix) if digits(prefix) => Ok(Self::Prefix(prefix.to_string())),
            None if digits(t) => t
                .parse()
                .map(Self::Exact)
                .map_err(|_| FilterError::StatusCode(s.to_string())),
            _ => Err(FilterError::StatusCode(s.to_string())),
        }
    }

    fn matches(&self, code: u32) -> bool {
        match self {
            Self::Exact(c) => code == *c,
            Self::Prefix(p) => code.to_string().starts_with(p.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(ns: &str, pod: &str, identity: u32, labels: &[&str]) -> pb::Endpoint {
        pb::Endpoint {
            id: 0,
            identity,
            namespace: ns.into(),
            pod_name: pod.into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            node_name: String::new(),
        }
    }

    /// web (default, 1000, app=web) → db (prod, 2000, app=db) TCP 40000 → 5432, dropped on node-a.
    fn flow() -> pb::Flow {
        pb::Flow {
            verdict: pb::Verdict::Dropped as i32,
            event_type: pb::EventType::Drop as i32,
            node_name: "obs-a".into(),
            ip: Some(pb::Ip {
                source: "10.200.1.10".into(),
                destination: "10.200.2.20".into(),
            }),
            l4: Some(pb::Layer4 {
                protocol: Some(pb::layer4::Protocol::Tcp(pb::Tcp {
                    source_port: 40000,
                    destination_port: 5432,
                    flags: None,
                })),
            }),
            source: Some(endpoint(
                "default",
                "web",
                1000,
                &["k8s:app=web", "k8s:tier=front"],
            )),
            destination: Some(endpoint("prod", "db", 2000, &["k8s:app=db"])),
            ..pb::Flow::default()
        }
    }

    fn filter(f: pb::FlowFilter) -> Filter {
        Filter::try_from(f).expect("valid filter")
    }

    fn matches(f: pb::FlowFilter) -> bool {
        filter(f).matches(&flow())
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_empty_filter_matches_every_flow() {
        assert!(matches(pb::FlowFilter::default()));
    }

    #[test]
    fn fields_are_anded_and_values_within_a_field_are_ored() {
        let ok = pb::FlowFilter {
            source_pod: strings(&["default/nope", "default/web"]),
            verdict: vec![pb::Verdict::Dropped as i32],
            ..Default::default()
        };
        assert!(matches(ok.clone()));
        let one_field_fails = pb::FlowFilter {
            verdict: vec![pb::Verdict::Forwarded as i32],
            ..ok
        };
        assert!(!matches(one_field_fails));
    }

    #[test]
    fn pods_match_by_namespace_and_name_by_namespace_prefix_or_by_bare_name_in_default() {
        for (field_src, want) in [
            ("default/web", true),
            ("web", true),
            ("default/", true),
            ("prod/web", false),
            ("prod/", false),
        ] {
            let f = pb::FlowFilter {
                source_pod: strings(&[field_src]),
                ..Default::default()
            };
            assert_eq!(matches(f), want, "source_pod {field_src}");
        }
        // `db` alone means default/db, and db lives in prod.
        let f = pb::FlowFilter {
            destination_pod: strings(&["db"]),
            ..Default::default()
        };
        assert!(!matches(f));
        let either = pb::FlowFilter {
            pod: strings(&["prod/db"]),
            ..Default::default()
        };
        assert!(matches(either));
    }

    #[test]
    fn labels_match_with_or_without_their_source_and_selector_terms_are_anded() {
        for (sel, want) in [
            ("app=web", true),
            ("k8s:app=web", true),
            ("reserved:app=web", false),
            ("app=db", false),
            ("app=web,tier=front", true),
            ("app=web,tier=back", false),
            ("tier", true),
            ("app!=db", true),
            ("app!=web", false),
        ] {
            let f = pb::FlowFilter {
                source_label: strings(&[sel]),
                ..Default::default()
            };
            assert_eq!(matches(f), want, "source_label {sel}");
        }
    }

    #[test]
    fn identities_addresses_ports_and_protocols_match_their_side() {
        let cases = [
            (
                pb::FlowFilter {
                    source_identity: vec![1000],
                    ..Default::default()
                },
                true,
            ),
            (
                pb::FlowFilter {
                    destination_identity: vec![1000],
                    ..Default::default()
                },
                false,
            ),
            (
                pb::FlowFilter {
                    source_ip: strings(&["10.200.1.10"]),
                    ..Default::default()
                },
                true,
            ),
            (
                pb::FlowFilter {
                    source_ip: strings(&["10.200.1.0/24"]),
                    ..Default::default()
                },
                true,
            ),
            (
                pb::FlowFilter {
                    destination_ip: strings(&["10.200.1.0/24"]),
                    ..Default::default()
                },
                false,
            ),
            (
                pb::FlowFilter {
                    destination_port: strings(&["5432"]),
                    ..Default::default()
                },
                true,
            ),
            (
                pb::FlowFilter {
                    source_port: strings(&["5432"]),
                    ..Default::default()
                },
                false,
            ),
            (
                pb::FlowFilter {
                    protocol: strings(&["TCP"]),
                    ..Default::default()
                },
                true,
            ),
            (
                pb::FlowFilter {
                    protocol: strings(&["udp", "icmp"]),
                    ..Default::default()
                },
                false,
            ),
            (
                pb::FlowFilter {
                    event_type: vec![pb::EventType::Drop as i32],
                    ..Default::default()
                },
                true,
            ),
            (
                pb::FlowFilter {
                    namespace: strings(&["prod"]),
                    ..Default::default()
                },
                true,
            ),
            (
                pb::FlowFilter {
                    namespace: strings(&["kube-system"]),
                    ..Default::default()
                },
                false,
            ),
            (
                pb::FlowFilter {
                    node_name: strings(&["obs-a"]),
                    ..Default::default()
                },
                true,
            ),
            (
                pb::FlowFilter {
                    node_name: strings(&["obs-*"]),
                    ..Default::default()
                },
                true,
            ),
            (
                pb::FlowFilter {
                    node_name: strings(&["obs-b"]),
                    ..Default::default()
                },
                false,
            ),
        ];
        for (i, (f, want)) in cases.into_iter().enumerate() {
            assert_eq!(matches(f), want, "case {i}");
        }
    }

    #[test]
    fn http_fields_match_nothing_until_flows_carry_http() {
        for f in [
            pb::FlowFilter {
                http_method: strings(&["GET"]),
                ..Default::default()
            },
            pb::FlowFilter {
                http_path: strings(&["/"]),
                ..Default::default()
            },
            pb::FlowFilter {
                http_status_code: strings(&["5+"]),
                ..Default::default()
            },
        ] {
            assert!(!matches(f));
        }
        let mut l7 = flow();
        l7.http = Some(pb::Http {
            code: 503,
            method: "GET".into(),
            url: "/x".into(),
        });
        let f = filter(pb::FlowFilter {
            http_method: strings(&["get"]),
            http_status_code: strings(&["5+"]),
            ..Default::default()
        });
        assert!(f.matches(&l7));
    }

    #[test]
    fn filters_in_the_whitelist_are_ored_and_the_blacklist_excludes() {
        let drop = pb::FlowFilter {
            verdict: vec![pb::Verdict::Dropped as i32],
            ..Default::default()
        };
        let fwd = pb::FlowFilter {
            verdict: vec![pb::Verdict::Forwarded as i32],
            ..Default::default()
        };
        let web = pb::FlowFilter {
            source_pod: strings(&["web"]),
            ..Default::default()
        };
        let f = FlowFilters::new(vec![fwd.clone(), drop.clone()], vec![]).expect("valid");
        assert!(f.allows(&flow()));
        let f = FlowFilters::new(vec![fwd.clone()], vec![]).expect("valid");
        assert!(!f.allows(&flow()));
        let f = FlowFilters::new(vec![], vec![fwd, web]).expect("valid");
        assert!(!f.allows(&flow()), "a matching blacklist filter excludes");
        let f = FlowFilters::new(vec![drop], vec![]).expect("valid");
        assert!(f.allows(&flow()));
    }

    #[test]
    fn bad_values_are_rejected_naming_the_field() {
        let cases = [
            (
                pb::FlowFilter {
                    source_ip: strings(&["10.0.0.300"]),
                    ..Default::default()
                },
                "source_ip",
            ),
            (
                pb::FlowFilter {
                    destination_port: strings(&["http"]),
                    ..Default::default()
                },
                "destination_port",
            ),
            (
                pb::FlowFilter {
                    protocol: strings(&["sctp"]),
                    ..Default::default()
                },
                "protocol",
            ),
            (
                pb::FlowFilter {
                    source_pod: strings(&["a/b/c"]),
                    ..Default::default()
                },
                "source_pod",
            ),
            (
                pb::FlowFilter {
                    source_label: strings(&["=x"]),
                    ..Default::default()
                },
                "source_label",
            ),
            (
                pb::FlowFilter {
                    http_status_code: strings(&["abc"]),
                    ..Default::default()
                },
                "http_status_code",
            ),
            (
                pb::FlowFilter {
                    verdict: vec![99],
                    ..Default::default()
                },
                "verdict",
            ),
        ];
        for (f, field) in cases {
            let err = Filter::try_from(f).expect_err(field);
            assert_eq!(err.field(), field, "{err}");
        }
    }
}
