//! Validation: every refusal names the field path.

use super::*;

fn parse_yaml(yaml: &str) -> Result<Object, ValidationError> {
    let value: serde_json::Value = serde_yaml::from_str(yaml).expect("yaml");
    let api = value["apiVersion"].as_str().unwrap_or_default().to_string();
    let kind = value["kind"].as_str().unwrap_or_default().to_string();
    parse(&api, &kind, &value)
}

fn refused(yaml: &str) -> ValidationError {
    parse_yaml(yaml).expect_err("must be refused")
}

const HEAD: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: default}\n";

fn cnp(spec: &str) -> String {
    format!("{HEAD}{spec}")
}

#[test]
fn an_unknown_field_is_refused_with_its_path() {
    let e = refused(&cnp(
        "spec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoint: [{}]\n",
    ));
    assert_eq!(e.field, "spec.ingress[0].fromEndpoint", "{e}");
    assert!(e.message.contains("unknown field"), "{e}");
}

#[test]
fn a_port_out_of_range_is_refused_with_its_path() {
    let e = refused(&cnp(
        "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"99999\", protocol: TCP}]\n",
    ));
    assert_eq!(e.field, "spec.ingress[0].toPorts[0].ports[0].port");
    assert!(e.message.contains("out of range"), "{e}");
}

#[test]
fn a_named_port_is_refused_as_not_supported_yet() {
    let e = refused(&cnp(
        "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: http}]\n",
    ));
    assert_eq!(e.field, "spec.ingress[0].toPorts[0].ports[0].port");
    assert!(
        e.message.contains("named ports are not supported yet"),
        "{e}"
    );
    let e = refused(&cnp(
        "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"8O!\"}]\n",
    ));
    assert!(e.message.contains("not a port number or name"), "{e}");
}

#[test]
fn an_end_port_below_the_port_is_refused() {
    let e = refused(&cnp(
        "spec:\n  endpointSelector: {}\n  egress:\n  - toPorts:\n    - ports: [{port: \"8080\", endPort: 8000}]\n",
    ));
    assert_eq!(e.field, "spec.egress[0].toPorts[0].ports[0].endPort");
    assert_eq!(e.message, "endPort 8000 is below port 8080");
}

#[test]
fn a_bad_cidr_or_an_except_outside_it_is_refused() {
    let e = refused(&cnp(
        "spec:\n  endpointSelector: {}\n  egress:\n  - toCIDR: [10.0.0.0/33]\n",
    ));
    assert_eq!(e.field, "spec.egress[0].toCIDR[0]");
    let e = refused(&cnp(
        "spec:\n  endpointSelector: {}\n  egressDeny:\n  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [192.168.0.0/16]}]\n",
    ));
    assert_eq!(e.field, "spec.egressDeny[0].toCIDRSet[0].except[0]");
    let e = refused(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: banana}}]\n",
    );
    assert_eq!(e.field, "spec.ingress[0].from[0].ipBlock.cidr");
}

#[test]
fn network_policy_ports_and_peers_are_checked() {
    let np = |rest: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: n}}\nspec:\n  podSelector: {{}}\n{rest}"
        )
    };
    let e = refused(&np("  ingress:\n  - ports: [{port: 0}]\n"));
    assert_eq!(e.field, "spec.ingress[0].ports[0].port");
    let e = refused(&np("  ingress:\n  - ports: [{port: 80, protocol: ICMP}]\n"));
    assert_eq!(e.field, "spec.ingress[0].ports[0].protocol");
    let e = refused(&np("  egress:\n  - to: [{}]\n"));
    assert_eq!(e.field, "spec.egress[0].to[0]");
    let e = refused(&np("  policyTypes: [Sideways]\n"));
    assert_eq!(e.field, "spec.policyTypes[0]");
}

#[test]
fn cilium_fields_not_implemented_are_refused_by_name() {
    let e = refused(&cnp(
        "spec:\n  endpointSelector: {}\n  egress:\n  - toFQDNs: [{matchName: example.com}]\n",
    ));
    assert_eq!(e.field, "spec.egress[0].toFQDNs");
    assert_eq!(e.message, "`toFQDNs` is not supported yet");
    let e = refused(&cnp("spec:\n  ingress: [{}]\n"));
    assert_eq!(e.field, "spec.endpointSelector");
    let e = refused(&cnp(
        "spec:\n  endpointSelector: {}\n  ingress:\n  - fromEntities: [moon]\n",
    ));
    assert_eq!(e.field, "spec.ingress[0].fromEntities[0]");
}

#[test]
fn deny_rules_cannot_carry_l7_and_l7_shapes_are_checked() {
    let e = refused(&cnp(
        "spec:\n  endpointSelector: {}\n  ingressDeny:\n  - toPorts:\n    - ports: [{port: \"80\"}]\n      rules: {http: [{method: GET}]}\n",
    ));
    assert_eq!(e.field, "spec.ingressDeny[0].toPorts[0].rules");
    let e = refused(&cnp(
        "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"80\"}]\n      rules: {http: [{method: GET, headers: [\": nothing\"]}]}\n",
    ));
    assert_eq!(
        e.field,
        "spec.ingress[0].toPorts[0].rules.http[0].headers[0]"
    );
    let e = refused(&cnp(
        "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"80\"}]\n      rules: {http: [{path: \"/a b\"}]}\n",
    ));
    assert_eq!(e.field, "spec.ingress[0].toPorts[0].rules.http[0].path");
}

#[test]
fn selectors_are_checked() {
    let e = refused(&cnp(
        "spec:\n  endpointSelector:\n    matchExpressions: [{key: app, operator: In}]\n",
    ));
    assert_eq!(e.field, "spec.endpointSelector.matchExpressions[0].values");
    let e = refused(&cnp(
        "spec:\n  endpointSelector:\n    matchExpressions: [{key: app, operator: Near, values: [x]}]\n",
    ));
    assert_eq!(
        e.field,
        "spec.endpointSelector.matchExpressions[0].operator"
    );
}

#[test]
fn scope_and_shape_of_metadata_are_checked() {
    let e = refused(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: c, namespace: x}\nspec: {endpointSelector: {}}\n",
    );
    assert_eq!(e.field, "metadata.namespace");
    let e = refused(HEAD);
    assert_eq!(e.field, "spec");
}

#[test]
fn documents_written_for_cilium_are_accepted_as_they_are() {
    let obj = parse_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: rule1
  namespace: default
  uid: 0d4f5c5e-1111-2222-3333-444455556666
  resourceVersion: "12345"
  annotations: {note: exported}
spec:
  description: "L3-L4 policy to restrict deathstar access to empire ships only"
  endpointSelector:
    matchLabels:
      org: empire
      class: deathstar
  ingress:
  - fromEndpoints:
    - matchLabels:
        org: empire
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
      rules:
        http:
        - method: "POST"
          path: "/v1/request-landing"
"#,
    )
    .expect("valid");
    let Object::Policy(p) = obj else {
        panic!("a policy")
    };
    assert_eq!(p.namespace.as_deref(), Some("default"));
    assert!(p.has_l7());
    assert!(p.rules[0].enforce_ingress);
    assert!(!p.rules[0].enforce_egress);
}

#[test]
fn a_namespace_keeps_its_labels_and_gains_its_name_label() {
    let Object::Namespace(ns) =
        parse_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: apps, labels: {team: a}}\n")
            .expect("valid")
    else {
        panic!("a namespace")
    };
    assert_eq!(ns.labels.get("team").map(String::as_str), Some("a"));
    assert_eq!(
        ns.labels
            .get("kubernetes.io/metadata.name")
            .map(String::as_str),
        Some("apps")
    );
}
