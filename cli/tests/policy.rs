//! End-to-end network policy: real TCP, UDP and ICMP between pods on a
//! 2-node cluster and the `external` world namespace, with policies applied
//! as users write them. Needs root (see `support::has_root`).

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

const PROBE: Duration = Duration::from_millis(1200);

/// A probe and the verdict it must reach; retried until it does (policy
/// takes effect asynchronously) or the deadline passes.
fn eventually(what: &str, expect: bool, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let got = probe();
        if got == expect {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: expected {}, still {}",
            verdict(expect),
            verdict(got)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "allowed" } else { "denied" }
}

fn write(dir: &std::path::Path, name: &str, yaml: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, yaml).expect("write policy");
    p.to_string_lossy().into_owned()
}

const ALLOW_L4: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: allow-l4, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"80\", protocol: TCP}, {port: \"81\", protocol: TCP}]\n";
const ALLOW_L3: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: allow-l3-client, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n";
const DENY_L4: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: deny-l4-80, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingressDeny:\n  - toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n";
const DENY_L3: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: deny-l3-client, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n";

#[test]
fn cilium_deny_policies_lockdown_cidr_precedence_network_policy_and_bad_files() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let cluster = Cluster::new();
    assert!(
        cluster.has("membrane-policy"),
        "this test needs the policy service"
    );
    let server = cluster.up_with_server_and_client();
    echo_servers_on("pod-default-server", &[80, 81], &[53]);
    let dir = tempfile::tempdir().expect("tmp");
    let (allow_l4, allow_l3, deny_l4, deny_l3) = (
        write(dir.path(), "allow-l4.yaml", ALLOW_L4),
        write(dir.path(), "allow-l3.yaml", ALLOW_L3),
        write(dir.path(), "deny-l4.yaml", DENY_L4),
        write(dir.path(), "deny-l3.yaml", DENY_L3),
    );
    let probes = |label: &str, p81: bool, p80: bool, ping: bool| {
        let s = server.clone();
        eventually(&format!("{label}: client -> server:81"), p81, || {
            tcp_ok("pod-default-client", &s, 81, None, PROBE)
        });
        eventually(&format!("{label}: client -> server:80"), p80, || {
            tcp_ok("pod-default-client", &s, 80, None, PROBE)
        });
        eventually(&format!("{label}: client -> server ping"), ping, || {
            ping_ok("pod-default-client", &s)
        });
    };

    // Cilium's deny-policy table: every cell.
    probes("no policy", true, true, true);
    cluster.ok(&["apply", "-f", &allow_l4]);
    cluster.ok(&["apply", "-f", &allow_l3]);
    probes("allow L4 80+81 + L3 client", true, true, true);
    cluster.ok(&["apply", "-f", &deny_l4]);
    probes("... + deny L4 80", true, false, true);
    cluster.ok(&["apply", "-f", &deny_l3]);
    probes("... + deny L3 client", false, false, false);
    for f in [&allow_l4, &allow_l3, &deny_l3] {
        cluster.ok(&["delete", "-f", f]);
    }
    probes("deny L4 80 only", false, false, false);
    cluster.ok(&["delete", "-f", &deny_l4]);
    cluster.ok(&["apply", "-f", &deny_l3]);
    probes("deny L3 client only", false, false, false);
    cluster.ok(&["delete", "-f", &deny_l3]);
    probes("policies removed", true, true, true);

    // `policy trace` explains a verdict with the deciding rule.
    cluster.ok(&["apply", "-f", &deny_l4]);
    let trace = cluster.ok(&[
        "policy",
        "trace",
        "--from",
        "pod/default/client",
        "--to",
        "pod/default/server",
        "--port",
        "80/TCP",
    ]);
    assert!(
        trace.contains("DENIED") && trace.contains("deny-l4-80"),
        "{trace}"
    );
    cluster.ok(&["delete", "-f", &deny_l4]);

    // Cluster-wide lockdown: the world is denied, pods still reach each other.
    let lockdown = write(
        dir.path(),
        "lockdown.yaml",
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: lockdown}\nspec:\n  endpointSelector: {}\n  ingressDeny:\n  - fromEntities: [world]\n  ingress:\n  - fromEntities: [all]\n",
    );
    eventually("external -> server before lockdown", true, || {
        tcp_ok("external", &server, 80, None, PROBE)
    });
    cluster.ok(&["apply", "-f", &lockdown]);
    eventually("external -> server under lockdown", false, || {
        tcp_ok("external", &server, 80, None, PROBE)
    });
    eventually("client -> server under lockdown", true, || {
        tcp_ok("pod-default-client", &server, 80, None, PROBE)
    });
    eventually("client -> server udp under lockdown", true, || {
        Command::new("nsenter")
            .args([
                "--net=/run/netns/pod-default-client",
                "socat",
                "-T",
                "1",
                "-",
                &format!("UDP:{server}:53"),
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                if let Some(mut i) = c.stdin.take() {
                    std::io::Write::write_all(&mut i, b"udp\n")?;
                }
                c.wait_with_output()
            })
            .map(|o| o.stdout == b"udp\n")
            .unwrap_or(false)
    });
    cluster.ok(&["delete", "-f", &lockdown]);

    // CIDR precedence, with addresses that live in `external`.
    for a in ["192.0.2.3/32", "192.0.2.4/32"] {
        assert!(
            Command::new("ip")
                .args(["-n", "external", "addr", "add", a, "dev", "eth0"])
                .status()
                .expect("ip")
                .success()
        );
    }
    assert!(
        Command::new("ip")
            .args([
                "-n",
                "node-1",
                "route",
                "add",
                "192.0.2.0/24",
                "via",
                "10.99.0.200"
            ])
            .status()
            .expect("ip")
            .success()
    );
    let from = |src: &'static str| {
        let s = server.clone();
        move || tcp_ok("external", &s, 80, Some(src), PROBE)
    };
    eventually("192.0.2.3 with no policy", true, from("192.0.2.3"));
    let cidr1 = write(
        dir.path(),
        "cidr1.yaml",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: cidr, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingressDeny:\n  - fromCIDR: [192.0.2.0/24]\n  ingress:\n  - fromCIDR: [192.0.2.3/32]\n",
    );
    cluster.ok(&["apply", "-f", &cidr1]);
    eventually("deny /24 + allow .3/32: .3", false, from("192.0.2.3"));
    eventually("deny /24 + allow .3/32: .4", false, from("192.0.2.4"));
    let cidr2 = write(
        dir.path(),
        "cidr2.yaml",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: cidr, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingressDeny:\n  - fromCIDR: [192.0.2.3/32]\n  ingress:\n  - fromCIDR: [192.0.2.0/24]\n",
    );
    cluster.ok(&["apply", "-f", &cidr2]);
    eventually("deny .3/32 + allow /24: .4", true, from("192.0.2.4"));
    eventually("deny .3/32 + allow /24: .3", false, from("192.0.2.3"));
    cluster.ok(&["delete", "-f", &cidr2]);

    // An invalid file changes nothing: the probes read the same after it.
    cluster.ok(&["apply", "-f", &allow_l4]);
    cluster.ok(&["apply", "-f", &deny_l4]);
    eventually("deny L4 80 before the bad file", false, || {
        tcp_ok("pod-default-client", &server, 80, None, PROBE)
    });
    eventually("allow L4 81 before the bad file", true, || {
        tcp_ok("pod-default-client", &server, 81, None, PROBE)
    });
    let bad = write(
        dir.path(),
        "bad.yaml",
        &format!(
            "{DENY_L3}---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: broken, namespace: default}}\nspec:\n  endpointSelector: {{}}\n  ingress:\n  - toPorts:\n    - ports: [{{port: \"99999\"}}]\n"
        ),
    );
    let out = cluster.run(&["apply", "-f", &bad]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml#2") && err.contains("spec.ingress[0].toPorts[0].ports[0].port"),
        "{err}"
    );
    assert!(
        !cluster.ok(&["get", "policies"]).contains("deny-l3-client"),
        "nothing from the bad file was stored"
    );
    // Had the valid first document (deny L3 client) been applied, 81 would be denied.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        tcp_ok("pod-default-client", &server, 81, None, PROBE),
        "port 81 still allowed after the bad file"
    );
    assert!(
        !tcp_ok("pod-default-client", &server, 80, None, PROBE),
        "port 80 still denied after the bad file"
    );
    cluster.ok(&["delete", "-f", &deny_l4]);
    cluster.ok(&["delete", "-f", &allow_l4]);

    // Kubernetes NetworkPolicy: default-deny in a namespace, then allow one
    // port from pods of labelled namespaces; ipBlock with except.
    cluster.ok(&[
        "pod", "run", "web", "-n", "team-a", "--node", "node-1", "--labels", "app=web",
    ]);
    cluster.ok(&[
        "pod",
        "run",
        "cli",
        "-n",
        "team-b",
        "--node",
        "node-2",
        "--labels",
        "app=client",
    ]);
    cluster.ok(&[
        "pod",
        "run",
        "cli",
        "-n",
        "team-c",
        "--node",
        "node-2",
        "--labels",
        "app=client",
    ]);
    let web = cluster.pod_ip("web", "team-a");
    echo_servers_on("pod-team-a-web", &[80, 8080], &[]);
    let knp = write(
        dir.path(),
        "knp.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: team-b, labels: {team: b}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: default-deny, namespace: team-a}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-b-clients, namespace: team-a}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: b}}\n      podSelector: {matchLabels: {app: client}}\n    ports: [{port: 80, protocol: TCP}]\n  - from:\n    - ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.4/32]}\n",
    );
    cluster.ok(&["apply", "-f", &knp]);
    assert!(
        Command::new("ip")
            .args([
                "-n",
                "node-1",
                "route",
                "replace",
                "192.0.2.0/24",
                "via",
                "10.99.0.200"
            ])
            .status()
            .expect("ip")
            .success()
    );
    eventually("team-b client -> web:80", true, || {
        tcp_ok("pod-team-b-cli", &web, 80, None, PROBE)
    });
    eventually("team-b client -> web:8080", false, || {
        tcp_ok("pod-team-b-cli", &web, 8080, None, PROBE)
    });
    eventually("team-c client -> web:80", false, || {
        tcp_ok("pod-team-c-cli", &web, 80, None, PROBE)
    });
    eventually("default/client -> web:80", false, || {
        tcp_ok("pod-default-client", &web, 80, None, PROBE)
    });
    let w = web.clone();
    eventually("ipBlock 192.0.2.3 -> web:8080", true, move || {
        tcp_ok("external", &w, 8080, Some("192.0.2.3"), PROBE)
    });
    eventually("ipBlock except 192.0.2.4 -> web", false, || {
        tcp_ok("external", &web, 8080, Some("192.0.2.4"), PROBE)
    });
    // default/server has no policy: still open.
    eventually("default/server unaffected", true, || {
        tcp_ok("pod-default-client", &server, 80, None, PROBE)
    });
}

#[test]
fn a_restarted_node_keeps_enforcing_policy_while_the_policy_service_is_away() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let cluster = Cluster::new();
    assert!(
        cluster.has("membrane-policy"),
        "this test needs the policy service"
    );
    let server = cluster.up_with_server_and_client();
    echo_servers_on("pod-default-server", &[80], &[]);
    let dir = tempfile::tempdir().expect("tmp");
    let deny = write(dir.path(), "deny.yaml", DENY_L3);
    let reach = || tcp_ok("pod-default-client", &server, 80, None, PROBE);
    eventually("no policy", true, reach);
    cluster.ok(&["apply", "-f", &deny]);
    eventually("deny client", false, reach);

    // The policy service goes away, then node-1's agent restarts: it must
    // not open what the policy closed while it cannot learn the policy.
    let policy_pid = cluster.pid("policy");
    let killed = Command::new("kill")
        .args(["-9", &policy_pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    cluster.ok(&["restart", "node-1"]);
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert!(
            !reach(),
            "node-1 restarted without the policy service and let the client in"
        );
    }

    // Back with the policy service: still denied, and a change is followed
    // once the nodes' streams reconnect (their retry backoff is up to 5 s).
    cluster.ok(&["restart", "policy"]);
    eventually("deny after the policy service is back", false, reach);
    cluster.ok(&["delete", "-f", &deny]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reach() {
        if Instant::now() > deadline {
            let log = |n: &str| {
                std::fs::read_to_string(cluster.dir().join(format!("logs/{n}.log")))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("policy"))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            panic!(
                "the deleted policy still denies\nnode-1:\n{}\nnode-2:\n{}",
                log("node-1"),
                log("node-2")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
