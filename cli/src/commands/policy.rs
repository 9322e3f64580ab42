//! `membrane get policies` and `membrane policy trace`: what the policy
//! service has applied and resolved, and what it would do with one packet.
//!
//! The policy service knows identities, not pods: `trace` resolves
//! `pod/NS/NAME` to the pod's identity by asking the nodes for their
//! endpoints, then sends identity numbers, entities and addresses.

use membrane_proto::node::v1 as node;
use membrane_proto::policy::v1 as policy;
use serde_json::{Value, json};

use super::status_err;
use crate::client::Ctx;
use crate::output::{self, Format};

/// `membrane get policies`: every applied policy with the identities it
/// selects, whether it switches default-deny on, and notes such as
/// "L7 rules not enforced". JSON/YAML include the document as applied.
pub async fn get_policies(ctx: &Ctx, format: Format) -> anyhow::Result<()> {
    let list = policy::policy_client::PolicyClient::new(ctx.service_channel("policy").await?)
        .list_policies(policy::ListPoliciesRequest {})
        .await
        .map_err(|s| status_err("list policies", s))?
        .into_inner();
    let items: Vec<Value> = list.policies.into_iter().map(|p| item(p, format)).collect();
    output::print_items(
        format,
        &[
            ("KIND", "kind"),
            ("NAMESPACE", "namespace"),
            ("NAME", "name"),
            ("SELECTED", "selectedIdentities"),
            ("INGRESS", "ingress"),
            ("EGRESS", "egress"),
            ("NOTES", "notes"),
        ],
        &items,
    )
}

fn enforced(on: bool) -> &'static str {
    if on { "default-deny" } else { "-" }
}

fn item(p: policy::PolicySummary, format: Format) -> Value {
    let policy::PolicySummary {
        kind,
        namespace,
        name,
        selected_identities,
        ingress_enforced,
        egress_enforced,
        notes,
        document_json,
    } = p;
    if format == Format::Table {
        return json!({
            "kind": kind,
            "namespace": if namespace.is_empty() { "-".to_string() } else { namespace },
            "name": name,
            "selectedIdentities": selected_identities,
            "ingress": enforced(ingress_enforced),
            "egress": enforced(egress_enforced),
            "notes": notes.join("; "),
        });
    }
    let document: Value =
        serde_json::from_str(&document_json).unwrap_or(Value::String(document_json));
    json!({
        "kind": kind,
        "namespace": namespace,
        "name": name,
        "selectedIdentities": selected_identities,
        "ingressEnforced": ingress_enforced,
        "egressEnforced": egress_enforced,
        "notes": notes,
        "document": document,
    })
}

/// Parses `80/TCP`, `53/udp`, `80` (TCP) or `icmp` / `ping`.
pub fn parse_port(s: &str) -> anyhow::Result<(u32, policy::Protocol)> {
    let lower = s.trim().to_ascii_lowercase();
    if matches!(lower.as_str(), "icmp" | "ping" | "0/icmp") {
        return Ok((0, policy::Protocol::Icmp));
    }
    let (num, proto) = lower.split_once('/').unwrap_or((lower.as_str(), "tcp"));
    let proto = match proto {
        "tcp" => policy::Protocol::Tcp,
        "udp" => policy::Protocol::Udp,
        other => anyhow::bail!("--port: unknown protocol `{other}` (TCP, UDP, or `icmp` alone)"),
    };
    let port: u16 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("--port: `{num}` is not a port number (e.g. 80/TCP)"))?;
    Ok((port.into(), proto))
}

/// Resolves `pod/NS/NAME` (or `pod/NAME` in `default`) to `identity/N` by
/// asking every node for its endpoints; other forms pass through.
async fn resolve_side(ctx: &Ctx, flag: &str, s: &str) -> anyhow::Result<String> {
    let Some(rest) = s.strip_prefix("pod/") else {
        return Ok(s.to_string());
    };
    let (ns, name) = rest.split_once('/').unwrap_or(("default", rest));
    for n in &ctx.nodes {
        let list = node::node_client::NodeClient::new(ctx.connect(n).await?)
            .list_endpoints(node::ListEndpointsRequest {})
            .await
            .map_err(|st| status_err(&format!("endpoints of {}", n.name), st))?
            .into_inner();
        if let Some(ep) = list
            .endpoints
            .into_iter()
            .find(|e| e.pod_namespace == ns && e.pod_name == name)
        {
            anyhow::ensure!(
                ep.identity != 0,
                "{flag}: pod `{ns}/{name}` on {} has no identity yet",
                n.name
            );
            return Ok(format!("identity/{}", ep.identity));
        }
    }
    anyhow::bail!("{flag}: pod `{ns}/{name}` is not attached on any node")
}

fn verdict_word(v: i32) -> &'static str {
    match policy::Verdict::try_from(v) {
        Ok(policy::Verdict::Allow) => "ALLOWED",
        Ok(policy::Verdict::Deny) => "DENIED",
        _ => "UNKNOWN",
    }
}

fn reason_text(r: i32) -> &'static str {
    match policy::TraceReason::try_from(r) {
        Ok(policy::TraceReason::DeniedByRule) => "denied by rule",
        Ok(policy::TraceReason::AllowedByRule) => "allowed by rule",
        Ok(policy::TraceReason::DefaultDeny) => "no rule matched; default deny",
        Ok(policy::TraceReason::NotEnforced) => "no rule matched; not enforced",
        Ok(policy::TraceReason::NotAnEndpoint) => "not an endpoint; no policy",
        _ => "unknown",
    }
}

fn peer_text(r: &policy::ResolvedRule) -> String {
    match &r.peer {
        Some(policy::resolved_rule::Peer::Any(_)) => "any peer".into(),
        Some(policy::resolved_rule::Peer::Identities(s)) => format!(
            "identities {}",
            s.ids
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
        Some(policy::resolved_rule::Peer::Cidr(c)) if c.except.is_empty() => {
            format!("cidr {}", c.cidr)
        }
        Some(policy::resolved_rule::Peer::Cidr(c)) => {
            format!("cidr {} except {}", c.cidr, c.except.join(","))
        }
        None => "no peer".into(),
    }
}

fn ports_text(r: &policy::ResolvedRule) -> String {
    if r.ports.is_empty() {
        return "all ports".into();
    }
    r.ports
        .iter()
        .map(|p| {
            let proto = match policy::Protocol::try_from(p.protocol) {
                Ok(policy::Protocol::Tcp) => "TCP",
                Ok(policy::Protocol::Udp) => "UDP",
                Ok(policy::Protocol::Icmp) => "ICMP",
                _ => "ANY",
            };
            match (p.lo, p.hi) {
                (0, 65535) => format!("*/{proto}"),
                (lo, hi) if lo == hi => format!("{lo}/{proto}"),
                (lo, hi) => format!("{lo}-{hi}/{proto}"),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn rule_line(r: &policy::ResolvedRule) -> String {
    let origin = r
        .rule
        .as_ref()
        .map(|o| {
            let ns = if o.namespace.is_empty() {
                String::new()
            } else {
                format!("{}/", o.namespace)
            };
            format!("{} {ns}{} {}", o.kind, o.name, o.path)
        })
        .unwrap_or_default();
    let l7 = if r.l7_not_enforced {
        " (L7 rules not enforced)"
    } else {
        ""
    };
    format!("{origin}: {} {}{l7}", peer_text(r), ports_text(r))
}

fn direction_lines(name: &str, d: &policy::DirectionTrace) -> String {
    let subject = if d.subject == 0 {
        "-".to_string()
    } else {
        format!("identity {}", d.subject)
    };
    let mut out = format!(
        "  {name:<8} {:<8} {subject}, {}: {}\n",
        verdict_word(d.verdict),
        if d.enforced {
            "enforced"
        } else {
            "not enforced"
        },
        reason_text(d.reason),
    );
    for r in &d.rules {
        out.push_str(&format!("             {}\n", rule_line(r)));
    }
    out
}

/// `membrane policy trace --from A --to B --port 80/TCP`: what the datapath
/// would do with one packet and which rules decided it. A and B are
/// `pod/NS/NAME`, an identity number, `entity/world` (host, remote-node, ...)
/// or `cidr/ADDRESS`.
pub async fn trace(ctx: &Ctx, from: &str, to: &str, port: &str) -> anyhow::Result<()> {
    let (port, protocol) = parse_port(port)?;
    let from = resolve_side(ctx, "--from", from).await?;
    let to = resolve_side(ctx, "--to", to).await?;
    let t = policy::policy_client::PolicyClient::new(ctx.service_channel("policy").await?)
        .trace(policy::TraceRequest {
            from: from.clone(),
            to: to.clone(),
            port,
            protocol: protocol as i32,
        })
        .await
        .map_err(|s| status_err("trace", s))?
        .into_inner();
    let mut out = format!("{from} -> {to}: {}\n", verdict_word(t.verdict));
    if let Some(e) = &t.egress {
        out.push_str(&direction_lines("egress", e));
    }
    if let Some(i) = &t.ingress {
        out.push_str(&direction_lines("ingress", i));
    }
    print!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_read_as_number_slash_protocol() {
        assert_eq!(parse_port("80/TCP").ok(), Some((80, policy::Protocol::Tcp)));
        assert_eq!(parse_port("53/udp").ok(), Some((53, policy::Protocol::Udp)));
        assert_eq!(parse_port("8080").ok(), Some((8080, policy::Protocol::Tcp)));
        assert_eq!(parse_port("ping").ok(), Some((0, policy::Protocol::Icmp)));
        assert!(parse_port("80/SCTP").is_err());
        assert!(parse_port("http").is_err());
    }
}
