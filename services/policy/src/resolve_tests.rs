//! Resolution and trace, against the cases Cilium and Kubernetes document.

use super::*;
use crate::model::{self, Object};

// === fixtures ===

/// A cluster: identities, namespaces and policies, built up like a sentence.
#[derive(Default)]
struct Cluster {
    identities: BTreeMap<u32, LabelSet>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    policies: Vec<Policy>,
}

impl Cluster {
    fn new() -> Self {
        Self::default()
    }

    /// A pod identity: `app` in namespace `ns`.
    fn pod(mut self, id: u32, ns: &str, app: &str) -> Self {
        self.identities.insert(
            id,
            LabelSet::parse([
                format!("k8s:app={app}"),
                format!("k8s:io.kubernetes.pod.namespace={ns}"),
            ]),
        );
        self
    }

    /// Applies one YAML document (a policy or a namespace).
    fn apply(mut self, yaml: &str) -> Self {
        match parse_yaml(yaml).expect("valid document") {
            Object::Policy(p) => self.policies.push(p),
            Object::Namespace(n) => {
                self.namespaces.insert(n.name, n.labels);
            }
        }
        self
    }

    fn resolution(&self) -> Resolution {
        resolve(&self.identities, &self.namespaces, &self.policies)
    }

    fn trace(&self, from: TracePeer, to: TracePeer, port: u16, proto: Proto) -> Trace {
        trace(&self.resolution(), &from, &to, port, proto)
    }

    fn verdict(&self, from: TracePeer, to: TracePeer, port: u16, proto: Proto) -> Verdict {
        self.trace(from, to, port, proto).verdict
    }
}

fn parse_yaml(yaml: &str) -> Result<Object, model::ValidationError> {
    let value: serde_json::Value = serde_yaml::from_str(yaml).expect("yaml");
    let api = value["apiVersion"].as_str().unwrap_or_default().to_string();
    let kind = value["kind"].as_str().unwrap_or_default().to_string();
    model::parse(&api, &kind, &value)
}

fn id(n: u32) -> TracePeer {
    TracePeer::Identity(n)
}

fn addr(s: &str) -> TracePeer {
    TracePeer::Address(s.parse().expect("address"))
}

use Proto::{Icmp, Tcp, Udp};
use Verdict::{Allow, Deny};

const CLIENT: u32 = 300;
const SERVER: u32 = 301;

// The deny table of Cilium's "Deny Policies" page: ingress policies on the
// server pod; the client probes port 81, port 80 and ping.
const ALLOW_L7_L4_L3: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-client, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/public/.*", headers: ["X-Team: blue"]}]
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "81", protocol: TCP}]
  - fromEndpoints: [{matchLabels: {app: client}}]
"#;

const DENY_L4_80: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny-80, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"#;

const DENY_L3_CLIENT: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny-client, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: client}}]
"#;

fn client_and_server() -> Cluster {
    Cluster::new()
        .pod(CLIENT, "default", "client")
        .pod(SERVER, "default", "server")
}

/// (curl :81, curl :80, ping) from the client to the server.
fn probes(c: &Cluster) -> [Verdict; 3] {
    [
        c.verdict(id(CLIENT), id(SERVER), 81, Tcp),
        c.verdict(id(CLIENT), id(SERVER), 80, Tcp),
        c.verdict(id(CLIENT), id(SERVER), 0, Icmp),
    ]
}

#[test]
fn the_documented_deny_table_holds_column_by_column() {
    let columns: [(&[&str], [Verdict; 3]); 5] = [
        (&[ALLOW_L7_L4_L3], [Allow, Allow, Allow]),
        (&[ALLOW_L7_L4_L3, DENY_L4_80], [Allow, Deny, Allow]),
        (&[ALLOW_L7_L4_L3, DENY_L3_CLIENT], [Deny, Deny, Deny]),
        (
            &[ALLOW_L7_L4_L3, DENY_L4_80, DENY_L3_CLIENT],
            [Deny, Deny, Deny],
        ),
        (&[DENY_L4_80], [Deny, Deny, Deny]),
    ];
    for (i, (docs, expected)) in columns.iter().enumerate() {
        let c = docs.iter().fold(client_and_server(), |c, d| c.apply(d));
        assert_eq!(probes(&c), *expected, "column {}", i + 1);
    }
}

#[test]
fn a_deny_only_policy_makes_the_server_default_deny_and_says_why() {
    let c = client_and_server().apply(DENY_L4_80);
    let t = c.trace(id(CLIENT), id(SERVER), 81, Tcp);
    assert_eq!(t.ingress.reason, TraceReason::DefaultDeny);
    assert!(t.ingress.enforced);
    assert_eq!(
        t.egress.reason,
        TraceReason::NotEnforced,
        "the client has no policy"
    );
    let t = c.trace(id(CLIENT), id(SERVER), 80, Tcp);
    assert_eq!(t.ingress.reason, TraceReason::DeniedByRule);
    assert_eq!(t.ingress.rules[0].rule.name, "deny-80");
    assert_eq!(t.ingress.rules[0].rule.path, "spec.ingressDeny[0]");
}

#[test]
fn deny_wins_over_a_more_specific_allow_and_the_trace_names_the_deny_rule() {
    let c = client_and_server()
        .apply(ALLOW_L7_L4_L3)
        .apply(DENY_L3_CLIENT);
    let t = c.trace(id(CLIENT), id(SERVER), 80, Tcp);
    assert_eq!(t.verdict, Deny);
    assert_eq!(t.ingress.reason, TraceReason::DeniedByRule);
    assert!(t.ingress.rules.iter().all(|r| r.verdict == Deny));
    assert_eq!(t.ingress.rules[0].rule.name, "deny-client");
}

#[test]
fn l7_rules_are_resolved_as_their_l4_part_and_flagged() {
    let c = client_and_server().apply(ALLOW_L7_L4_L3);
    let res = c.resolution();
    let server = &res.policies[&SERVER];
    let l7: Vec<_> = server.rules.iter().filter(|r| r.l7).collect();
    assert_eq!(l7.len(), 1);
    assert_eq!(
        l7[0].ports,
        vec![PortRange {
            proto: Tcp,
            lo: 80,
            hi: 80
        }]
    );
    assert!(c.policies[0].has_l7());
}

const LOCKDOWN: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: external-lockdown}
spec:
  endpointSelector: {}
  ingressDeny:
  - fromEntities: [world]
  ingress:
  - fromEntities: [all]
"#;

#[test]
fn the_cluster_wide_lockdown_denies_world_and_allows_everything_else() {
    let c = client_and_server().pod(500, "other", "db").apply(LOCKDOWN);
    for subject in [CLIENT, SERVER, 500] {
        assert_eq!(
            c.verdict(id(WORLD), id(subject), 80, Tcp),
            Deny,
            "world → {subject}"
        );
        assert_eq!(
            c.verdict(addr("8.8.8.8"), id(subject), 443, Tcp),
            Deny,
            "an outside address is world"
        );
        assert_eq!(c.verdict(id(HOST), id(subject), 80, Tcp), Allow);
        assert_eq!(c.verdict(id(REMOTE_NODE), id(subject), 0, Icmp), Allow);
    }
    assert_eq!(
        c.verdict(id(CLIENT), id(500), 5432, Tcp),
        Allow,
        "across namespaces"
    );
    assert_eq!(
        c.verdict(id(SERVER), addr("1.1.1.1"), 443, Tcp),
        Allow,
        "egress untouched"
    );
    let res = c.resolution();
    // Like Cilium's, an empty endpoint selector also selects the health and
    // init endpoints; never host, world or other non-endpoints.
    assert_eq!(res.selected[0], [HEALTH, INIT, CLIENT, SERVER, 500].into());
    assert!(!res.policies[&CLIENT].egress_enforced);
}

#[test]
fn a_wider_cidr_deny_beats_a_narrower_allow_inside_it() {
    let c = client_and_server().apply(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cidr, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egressDeny:
  - toCIDR: [192.0.2.0/24]
  egress:
  - toCIDR: [192.0.2.10/32]
"#,
    );
    assert_eq!(
        c.verdict(id(CLIENT), addr("192.0.2.10"), 443, Tcp),
        Deny,
        "the /32 is inside the denied /24"
    );
    assert_eq!(c.verdict(id(CLIENT), addr("192.0.2.20"), 443, Tcp), Deny);
    let t = c.trace(id(CLIENT), addr("198.51.100.1"), 443, Tcp);
    assert_eq!(t.egress.reason, TraceReason::DefaultDeny);
}

#[test]
fn a_narrower_cidr_deny_carves_a_hole_in_a_wider_allow() {
    let c = client_and_server().apply(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cidr, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egressDeny:
  - toCIDRSet: [{cidr: 192.0.2.10/32}]
  egress:
  - toCIDR: [192.0.2.0/24]
  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]
"#,
    );
    assert_eq!(c.verdict(id(CLIENT), addr("192.0.2.10"), 443, Tcp), Deny);
    assert_eq!(c.verdict(id(CLIENT), addr("192.0.2.20"), 443, Tcp), Allow);
    assert_eq!(c.verdict(id(CLIENT), addr("10.2.3.4"), 443, Tcp), Allow);
    assert_eq!(
        c.verdict(id(CLIENT), addr("10.1.2.3"), 443, Tcp),
        Deny,
        "except"
    );
    assert_eq!(
        c.verdict(id(CLIENT), id(SERVER), 443, Tcp),
        Deny,
        "CIDR rules never match pods"
    );
}

const APPS_NAMESPACE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: apps, labels: {team: a}}
"#;

const DB_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: a}}
      podSelector: {matchLabels: {app: api}}
    ports: [{port: 5432}]
  - from:
    - ipBlock: {cidr: 172.16.0.0/16, except: [172.16.1.0/24]}
"#;

#[test]
fn a_network_policy_allows_selected_pods_of_selected_namespaces_on_one_port() {
    let (db, api_a, api_dev, web_a) = (400, 401, 402, 403);
    let c = Cluster::new()
        .pod(db, "prod", "db")
        .pod(api_a, "apps", "api")
        .pod(api_dev, "dev", "api")
        .pod(web_a, "apps", "web")
        .apply(APPS_NAMESPACE)
        .apply(DB_POLICY);
    assert_eq!(c.verdict(id(api_a), id(db), 5432, Tcp), Allow);
    assert_eq!(
        c.verdict(id(api_a), id(db), 5432, Udp),
        Deny,
        "protocol defaults to TCP"
    );
    assert_eq!(
        c.verdict(id(api_a), id(db), 80, Tcp),
        Deny,
        "other ports are default-deny"
    );
    assert_eq!(
        c.verdict(id(api_dev), id(db), 5432, Tcp),
        Deny,
        "namespace without the label"
    );
    assert_eq!(
        c.verdict(id(web_a), id(db), 5432, Tcp),
        Deny,
        "pod without the label"
    );
    assert_eq!(
        c.verdict(addr("172.16.2.2"), id(db), 22, Tcp),
        Allow,
        "ipBlock, every port"
    );
    assert_eq!(
        c.verdict(addr("172.16.1.5"), id(db), 22, Tcp),
        Deny,
        "ipBlock except"
    );
    assert_eq!(c.verdict(id(WORLD), id(db), 22, Tcp), Deny);
    assert_eq!(
        c.verdict(id(db), addr("8.8.8.8"), 53, Udp),
        Allow,
        "policyTypes defaults to Ingress only"
    );
}

#[test]
fn a_namespace_never_applied_is_selected_by_its_name_label() {
    let c = Cluster::new()
        .pod(400, "prod", "db")
        .pod(402, "dev", "api")
        .apply(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-dev, namespace: prod}
spec:
  podSelector: {}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: dev}}
"#,
        );
    assert_eq!(c.verdict(id(402), id(400), 1, Tcp), Allow);
    assert_eq!(c.verdict(id(400), id(400), 1, Tcp), Deny, "prod is not dev");
}

#[test]
fn a_network_policy_with_both_types_and_no_rules_isolates_its_namespace_only() {
    let c = Cluster::new()
        .pod(400, "prod", "db")
        .pod(401, "prod", "api")
        .pod(402, "dev", "api")
        .apply(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: prod}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
"#,
        );
    assert_eq!(c.verdict(id(401), id(400), 5432, Tcp), Deny);
    assert_eq!(c.verdict(id(402), id(400), 5432, Tcp), Deny);
    let t = c.trace(id(400), addr("8.8.8.8"), 53, Udp);
    assert_eq!(t.egress.reason, TraceReason::DefaultDeny);
    assert_eq!(
        c.verdict(id(402), addr("8.8.8.8"), 53, Udp),
        Allow,
        "dev is untouched"
    );
}

#[test]
fn enable_default_deny_false_lets_a_deny_only_policy_subtract_traffic() {
    let c = client_and_server().pod(302, "default", "bad").apply(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: block-bad, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: server}}
  enableDefaultDeny: {ingress: false, egress: false}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: bad}}]
"#,
    );
    assert_eq!(c.verdict(id(302), id(SERVER), 80, Tcp), Deny);
    assert_eq!(c.verdict(id(CLIENT), id(SERVER), 80, Tcp), Allow);
    assert_eq!(c.verdict(id(WORLD), id(SERVER), 80, Tcp), Allow);
    assert!(!c.resolution().policies[&SERVER].ingress_enforced);
    // Another policy that does enforce switches default deny back on.
    let c = c.apply(DENY_L4_80);
    assert_eq!(c.verdict(id(WORLD), id(SERVER), 443, Tcp), Deny);
}

#[test]
fn namespaced_policies_select_and_allow_only_within_their_namespace() {
    let c = Cluster::new()
        .pod(300, "default", "client")
        .pod(301, "default", "server")
        .pod(310, "other", "client")
        .pod(311, "other", "server")
        .apply(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow, namespace: default}
specs:
- endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
  - fromEndpoints:
    - matchLabels:
        app: client
        k8s:io.kubernetes.pod.namespace: other
    toPorts: [{ports: [{port: "8080", endPort: 8090}]}]
"#,
        );
    let res = c.resolution();
    assert_eq!(
        res.selected[0],
        [301].into(),
        "the other namespace's server is not selected"
    );
    assert_eq!(c.verdict(id(300), id(301), 1, Tcp), Allow);
    assert_eq!(c.verdict(id(310), id(301), 80, Tcp), Deny);
    assert_eq!(
        c.verdict(id(310), id(301), 8085, Udp),
        Allow,
        "ANY is TCP and UDP, with endPort"
    );
    assert_eq!(c.verdict(id(310), id(301), 8091, Tcp), Deny);
    assert_eq!(
        c.verdict(id(300), id(311), 1, Tcp),
        Allow,
        "not selected: not enforced"
    );
}

#[test]
fn entities_and_match_expressions_resolve_to_identity_sets() {
    let c = client_and_server().pod(302, "default", "batch").apply(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: egress, namespace: default}
spec:
  endpointSelector:
    matchExpressions: [{key: app, operator: In, values: [client, batch]}]
  egress:
  - toEntities: [cluster]
    toPorts: [{ports: [{port: "53", protocol: UDP}]}]
  - toEndpoints:
    - matchExpressions: [{key: app, operator: NotIn, values: [batch, client]}]
"#,
    );
    let res = c.resolution();
    assert_eq!(res.selected[0], [CLIENT, 302].into());
    let rules = &res.policies[&CLIENT].rules;
    assert_eq!(
        rules[0].peer,
        PeerSet::Identities(
            [
                HOST,
                UNMANAGED,
                HEALTH,
                INIT,
                REMOTE_NODE,
                CLIENT,
                SERVER,
                302
            ]
            .into()
        )
    );
    assert_eq!(rules[1].peer, PeerSet::Identities([SERVER].into()));
    assert_eq!(c.verdict(id(CLIENT), id(SERVER), 443, Tcp), Allow);
    assert_eq!(c.verdict(id(CLIENT), id(302), 443, Tcp), Deny);
    assert_eq!(c.verdict(id(CLIENT), id(HOST), 53, Udp), Allow);
    assert_eq!(
        c.verdict(id(CLIENT), addr("8.8.8.8"), 53, Udp),
        Deny,
        "world is not in the cluster"
    );
}

#[test]
fn an_empty_ingress_rule_denies_everything_without_allowing_anything() {
    let c = client_and_server().apply(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny-all, namespace: default}
spec:
  endpointSelector: {}
  ingress: [{}]
"#,
    );
    assert_eq!(c.verdict(id(CLIENT), id(SERVER), 80, Tcp), Deny);
    let res = c.resolution();
    assert!(res.policies[&SERVER].rules.is_empty());
    assert!(res.policies[&SERVER].ingress_enforced);
}

#[test]
fn resolution_is_deterministic_whatever_the_policy_order() {
    let a = client_and_server()
        .apply(ALLOW_L7_L4_L3)
        .apply(DENY_L4_80)
        .apply(LOCKDOWN);
    let b = client_and_server()
        .apply(LOCKDOWN)
        .apply(DENY_L4_80)
        .apply(ALLOW_L7_L4_L3);
    assert_eq!(a.resolution().policies, b.resolution().policies);
}
