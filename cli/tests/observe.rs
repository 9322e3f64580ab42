//! End-to-end flow observability: denied connections between pods on a
//! 2-node cluster show up in `membrane observe` through the relay, live with
//! `--follow`, and `membrane status` reports the relay's view of the nodes.
//! Needs root (see `support::has_root`).

mod support;

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use support::*;

const PROBE: Duration = Duration::from_millis(800);

const DENY_CLIENT: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: deny-client, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n";

fn json(cluster: &Cluster, args: &[&str]) -> Value {
    serde_json::from_str(&cluster.ok(args)).expect("json output")
}

fn endpoint_identity(cluster: &Cluster, ip: &str) -> u64 {
    json(cluster, &["get", "endpoints", "-o", "json"])["items"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["address"] == format!("{ip}/32")))
        .and_then(|e| e["identity"].as_u64())
        .expect("endpoint identity")
}

/// `-o json` prints one flow per line.
fn flows(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

fn is_denied_client_to_server(f: &Value) -> bool {
    f["verdict"] == "DROPPED"
        && f["drop_reason"] == "POLICY_DENIED"
        && f["source"]["pod_name"] == "client"
        && f["source"]["namespace"] == "default"
        && f["destination"]["pod_name"] == "server"
}

/// Polls `membrane status` until `done` accepts (exit success, stdout).
fn wait_status(cluster: &Cluster, what: &str, done: impl Fn(bool, &str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cluster.run(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if done(out.status.success(), &text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}: {text}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]

fn denied_flows_are_observed_through_the_relay_live_and_status_reports_unavailable_nodes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let cluster = Cluster::new();
    for needed in ["membrane-relay", "membrane-policy", NODE_BINARY] {
        assert!(cluster.has(needed), "this test needs {needed}");
    }
    let server = cluster.up_with_server_and_client();
    let client = cluster.pod_ip("client", "default");
    echo_servers_on("pod-default-server", &[80], &[]);

    // The relay sees both nodes.
    let status = wait_status(&cluster, "relay never saw both nodes", |ok, text| {
        ok && text.contains("Connected Nodes: 2/2")
    });
    assert!(status.contains("Healthcheck (via relay): Ok"), "{status}");

    // Deny the client, then try a few connections.
    let dir = tempfile::tempdir().expect("tmp");
    let policy = dir.path().join("deny-client.yaml");
    std::fs::write(&policy, DENY_CLIENT).expect("write policy");
    cluster.ok(&["apply", "-f", policy.to_str().expect("path")]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tcp_ok("pod-default-client", &server, 80, None, PROBE) {
        assert!(
            Instant::now() < deadline,
            "the deny policy never took effect"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..3 {
        assert!(!tcp_ok("pod-default-client", &server, 80, None, PROBE));
    }

    // The relay shows the denied attempts with pods, identities and reason.
    let client_id = endpoint_identity(&cluster, &client);
    let server_id = endpoint_identity(&cluster, &server);
    let deadline = Instant::now() + Duration::from_secs(10);
    let denied = loop {
        let out = cluster.ok(&[
            "observe",
            "--verdict",
            "DROPPED",
            "--last",
            "20",
            "-o",
            "json",
        ]);
        let denied: Vec<Value> = flows(&out)
            .into_iter()
            .filter(is_denied_client_to_server)
            .collect();
        if !denied.is_empty() {
            break denied;
        }
        assert!(Instant::now() < deadline, "no denied flow observed: {out}");
        std::thread::sleep(Duration::from_millis(500));
    };
    for f in &denied {
        assert_eq!(f["source"]["identity"].as_u64(), Some(client_id), "{f}");
        assert_eq!(
            f["destination"]["identity"].as_u64(),
            Some(server_id),
            "{f}"
        );
        assert_eq!(f["l4"]["TCP"]["destination_port"], 80, "{f}");
    }
    let table = cluster.ok(&["observe", "--from-pod", "default/client", "--last", "5"]);
    assert!(
        table.contains("default/client")
            && table.contains("default/server:80")
            && table.contains("DROPPED"),
        "{table}"
    );

    // Denied attempts on the other node too: the relay merges both nodes.
    cluster.ok(&[
        "pod",
        "run",
        "server2",
        "--node",
        "node-2",
        "--labels",
        "app=server",
    ]);
    cluster.ok(&[
        "pod",
        "run",
        "client2",
        "--node",
        "node-1",
        "--labels",
        "app=client",
    ]);
    let server2 = cluster.pod_ip("server2", "default");
    echo_servers_on("pod-default-server2", &[80], &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let nodes_with_drops = loop {
        assert!(
            !tcp_ok("pod-default-client2", &server2, 80, None, PROBE),
            "client2 -> server2 must be denied"
        );
        let out = cluster.ok(&[
            "observe",
            "--verdict",
            "DROPPED",
            "--last",
            "50",
            "-o",
            "json",
        ]);
        let nodes: std::collections::BTreeSet<String> = flows(&out)
            .iter()
            .filter(|f| f["drop_reason"] == "POLICY_DENIED")
            .filter_map(|f| f["node_name"].as_str().map(str::to_string))
            .collect();
        if nodes.len() == 2 || Instant::now() > deadline {
            break nodes;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        nodes_with_drops.into_iter().collect::<Vec<_>>(),
        ["node-1", "node-2"],
        "drops from both nodes"
    );

    // --follow streams a new denied attempt within a second.
    let mut follow = cluster
        .command(&[
            "observe",
            "--follow",
            "--from-pod",
            "default/client",
            "--verdict",
            "DROPPED",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("observe --follow");
    let stdout = follow.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    let mut streamed = None;
    for _ in 0..5 {
        let server = server.clone();
        let sent = Instant::now();
        let probe =
            std::thread::spawn(move || tcp_ok("pod-default-client", &server, 80, None, PROBE));
        if let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) {
            streamed = Some((line, sent.elapsed()));
            let _ = probe.join();
            break;
        }
        let _ = probe.join();
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let (line, after) = streamed.expect("--follow printed no new flow");
    let f: Value = serde_json::from_str(&line).expect("json line");
    assert!(is_denied_client_to_server(&f), "{f}");
    assert!(after < Duration::from_secs(1), "streamed after {after:?}");

    // node-2's datapath dies: the relay reports it, status fails.
    let _ = Command::new("kill")
        .args(["-9", &cluster.pid("node-2").to_string()])
        .status();
    let text = wait_status(
        &cluster,
        "status never reported node-2 unavailable",
        |ok, text| !ok && text.contains("Connected Nodes: 1/2"),
    );
    assert!(text.contains("Unavailable Nodes:\n  - node-2"), "{text}");
    let out = cluster.run(&["status", "-o", "json"]);
    let doc: Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(doc["relay"]["connectedNodes"], 1, "{doc}");
    assert_eq!(
        doc["relay"]["unavailableNodes"],
        serde_json::json!(["node-2"]),
        "{doc}"
    );
    // Flows from node-1 are still served.
    cluster.ok(&["observe", "--last", "5", "-o", "json"]);

    // Restarted, it is back.
    cluster.ok(&["restart", "node-2"]);
    wait_status(&cluster, "node-2 never came back", |ok, text| {
        ok && text.contains("Connected Nodes: 2/2")
    });
    cluster.ok(&["down"]);
}
