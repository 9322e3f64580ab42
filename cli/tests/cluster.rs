//! End-to-end tests of `membrane up` / `membrane down` with the real binary,
//! real network namespaces, a real etcd and whichever component binaries the
//! workspace has built.
//!
//! They need root. Without it each test prints `SKIPPED (needs root)` and
//! passes — unless `CI=true`, where skipping would hide a broken setup, so
//! they fail instead. They share fixed names (`mbr0`, `node-1`, ports), so
//! they take [`SERIAL`] and never run concurrently.
//!
//! Components: every `membrane-*` binary next to the `membrane` under test
//! that answers `--help` is linked into a private `--bin-dir`; a binary
//! that prints nothing for it (an empty `fn main`) is left out, so `up` is expected
//! to health-check exactly the components that really exist.

mod support;

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use support::*;

#[test]
fn a_two_node_cluster_comes_up_connects_its_namespaces_and_goes_down_without_leftovers() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let cluster = Cluster::new();
    cluster.ok(&["up", "--nodes", "2", "--detach"]);

    // Namespaces, devices, processes.
    for ns in ["node-1", "node-2", "external"] {
        assert!(netns_exists(ns), "netns {ns} missing");
    }
    for link in ["mbr0", "mbn-1", "mbn-2", "mbn-ext"] {
        assert!(link_exists(link), "device {link} missing");
    }
    let info = cluster.info();
    let etcd_pid = cluster.pid("etcd");
    assert!(alive(etcd_pid));
    assert_eq!(info["etcd_pid"], etcd_pid);
    assert_eq!(info["etcd_endpoint"], "http://127.0.0.1:23790");
    assert_eq!(info["underlay_gateway"], "10.99.0.1");
    assert_eq!(info["cluster_cidr"], "10.200.0.0/16");
    assert_eq!(info["node_mask_size"], 24);
    assert_eq!(info["external"]["netns"], "external");
    assert_eq!(info["external"]["ip"], "10.99.0.200");
    assert_eq!(
        info["tls"]["cert"].as_str(),
        cluster.dir().join("tls/cli.pem").to_str()
    );

    // Exactly the services whose binaries exist, each running.
    let mut services: Vec<String> = info["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| s["name"].as_str().expect("name").to_string())
        .collect();
    services.sort();
    assert_eq!(services, cluster.expected_services());
    for s in info["services"].as_array().expect("services") {
        let name = s["name"].as_str().expect("name");
        assert_eq!(s["server_name"], format!("{name}.membrane.local"));
        assert!(
            s["endpoint"]
                .as_str()
                .expect("endpoint")
                .starts_with("https://10.99.0.1:71")
        );
        assert_eq!(s["pid"], cluster.pid(name));
        assert!(alive(cluster.pid(name)), "{name} not running");
    }
    if cluster.has("membrane-ipam") {
        let ipam = &info["services"][0];
        assert_eq!(ipam["name"], "ipam");
        assert_eq!(ipam["endpoint"], "https://10.99.0.1:7101");
    }

    // Nodes: addresses, endpoints, and a datapath each when it exists.
    let nodes = info["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2);
    for (i, node) in nodes.iter().enumerate() {
        let k = i + 1;
        assert_eq!(node["name"], format!("node-{k}"));
        assert_eq!(node["netns"], format!("node-{k}"));
        assert_eq!(node["underlay_ip"], format!("10.99.0.{}", 10 + k));
        assert_eq!(node["endpoint"], format!("https://10.99.0.{}:7200", 10 + k));
        assert_eq!(
            node["server_name"],
            format!("node-{k}.nodes.membrane.local")
        );
        if cluster.has(NODE_BINARY) {
            let pid = cluster.pid(&format!("node-{k}"));
            assert_eq!(node["pid"], pid);
            assert!(alive(pid), "node-{k} datapath not running");
        } else {
            assert!(node["pid"].is_null());
        }
    }

    // The underlay carries traffic between nodes, to the gateway and from outside.
    assert_reaches("node-1", Some("node-2"), Ipv4Addr::new(10, 99, 0, 12));
    assert_reaches("node-2", Some("node-1"), Ipv4Addr::new(10, 99, 0, 11));
    assert_reaches("node-1", None, Ipv4Addr::new(10, 99, 0, 1));
    assert_reaches("node-2", None, Ipv4Addr::new(10, 99, 0, 1));
    assert_reaches("external", Some("node-1"), Ipv4Addr::new(10, 99, 0, 11));

    // A second `up` with the same flags finds the cluster running and leaves it be.
    let pids = cluster.pids();
    let out = cluster.ok(&["up", "--nodes", "2", "--detach"]);
    assert!(out.contains("already running"), "{out}");
    let mut again = cluster.pids();
    let mut before = pids.clone();
    again.sort_unstable();
    before.sort_unstable();
    assert_eq!(again, before);

    // Other flags against a running cluster: refused, pointing at `down`.
    let out = cluster.run(&["up", "--nodes", "3", "--detach"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--nodes") && stderr.contains("membrane down"),
        "{stderr}"
    );

    cluster.ok(&["down"]);
    assert_nothing_left(&cluster, &pids, 3);
    let out = cluster.ok(&["down"]);
    assert!(out.contains("no local cluster"), "{out}");
}

#[test]
fn a_half_dead_cluster_is_replaced_by_up_and_removed_by_down() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let cluster = Cluster::new();
    cluster.ok(&["up", "--nodes", "1", "--detach"]);
    let first_etcd = cluster.pid("etcd");
    let mut all_pids = cluster.pids();

    // etcd dies: `up` notices the cluster is unhealthy and starts afresh.
    Command::new("kill")
        .args(["-KILL", &first_etcd.to_string()])
        .status()
        .expect("kill");
    let out = cluster.ok(&["up", "--nodes", "1", "--detach"]);
    assert!(out.contains("cleaning up"), "{out}");
    assert_ne!(cluster.pid("etcd"), first_etcd);
    assert!(alive(cluster.pid("etcd")));
    all_pids.extend(cluster.pids());

    // Now break it further by hand: kill etcd, delete a node namespace.
    Command::new("kill")
        .args(["-KILL", &cluster.pid("etcd").to_string()])
        .status()
        .expect("kill");
    let deleted = Command::new("ip")
        .args(["netns", "del", "node-1"])
        .status()
        .expect("ip");
    assert!(deleted.success());

    cluster.ok(&["down"]);
    assert_nothing_left(&cluster, &all_pids, 1);
    cluster.ok(&["down"]);
}

#[test]
fn up_refuses_a_namespace_it_did_not_create_and_down_leaves_it_alone() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let cluster = Cluster::new();
    let added = Command::new("ip")
        .args(["netns", "add", "external"])
        .status()
        .expect("ip");
    assert!(added.success());

    let out = cluster.run(&["up", "--nodes", "1", "--detach"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    cluster.ok(&["down"]);
    let survived = netns_exists("external");
    let _ = Command::new("ip")
        .args(["netns", "del", "external"])
        .status();

    assert!(!out.status.success());
    assert!(
        stderr.contains("`external`") && stderr.contains("not created"),
        "{stderr}"
    );
    assert!(survived, "down deleted a namespace it did not create");
    assert!(!link_exists("mbr0") && !netns_exists("node-1"));
}

#[test]
fn a_foreground_cluster_goes_down_on_sigterm() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let cluster = Cluster::new();
    let mut child = cluster
        .command(&["up", "--nodes", "1"])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn up");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !cluster.dir().join("cluster.json").exists() {
        assert!(Instant::now() < deadline, "cluster did not come up");
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "up exited early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pids = cluster.pids();
    assert!(pids.iter().all(|p| alive(*p)));

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "up did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "up exited with {status}");
    assert_nothing_left(&cluster, &pids, 1);
}

#[test]
fn down_without_a_cluster_succeeds() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let state = tempfile::tempdir().expect("state dir");
    let out = Command::new(env!("CARGO_BIN_EXE_membrane"))
        .arg("--state-dir")
        .arg(state.path())
        .arg("down")
        .output()
        .expect("run membrane");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn status_get_and_apply_work_against_a_running_cluster_and_status_names_a_dead_node() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let cluster = Cluster::new();
    assert!(
        cluster.has("membrane-ipam") && cluster.has(NODE_BINARY),
        "this test needs ipam and the node datapath"
    );
    cluster.ok(&["up", "--nodes", "2", "--detach"]);

    let status = cluster.ok(&["status"]);
    assert!(status.contains("connected nodes 2/2"), "{status}");
    assert!(status.contains("Cluster healthy"), "{status}");

    // Both nodes registered themselves and got distinct CIDRs; each routes to the other's pods.
    let nodes: Value =
        serde_json::from_str(&cluster.ok(&["get", "nodes", "-o", "json"])).expect("json");
    let items = nodes["items"].as_array().expect("items");
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(|n| n["status"] == "Ready"), "{nodes}");
    let cidr_of = |name: &str| {
        items
            .iter()
            .find(|n| n["name"] == name)
            .and_then(|n| n["podCIDR"].as_str())
            .expect("cidr")
            .to_string()
    };
    assert_ne!(cidr_of("node-1"), cidr_of("node-2"));
    wait_route("node-1", &cidr_of("node-2"), "via 10.99.0.12");
    wait_route("node-2", &cidr_of("node-1"), "via 10.99.0.11");

    // Intent through `apply`: a third node object with a pinned CIDR.
    let dir = tempfile::tempdir().expect("tmp");
    let good = dir.path().join("node-3.yaml");
    std::fs::write(
        &good,
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-3\n  annotations: {membrane.io/underlay-ip: 10.99.0.13}\nspec:\n  podCIDR: 10.200.77.0/24\n",
    )
    .expect("write");
    let out = cluster.ok(&["apply", "-f", good.to_str().expect("path")]);
    assert!(out.contains("node/node-3 created"), "{out}");
    // node-1 learns the new node over the stream and routes to it.
    wait_route("node-1", "10.200.77.0/24", "via 10.99.0.13");

    // A file with one bad document applies nothing and names file, document, object and field.
    let before = cluster.ok(&["get", "nodes", "-o", "json"]);
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-4, annotations: {membrane.io/underlay-ip: 10.99.0.14}}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: node-5, annotations: {membrane.io/underlay-ip: 10.99.0.15}}\nspec: {podCIDR: 10.200.0.0/99}\n",
    )
    .expect("write");
    let out = cluster.run(&["apply", "-f", bad.to_str().expect("path")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "bad.yaml#2: Node/node-5: spec.podCIDR: spec.podCIDR: invalid CIDR `10.200.0.0/99`"
        ),
        "{err}"
    );
    assert_eq!(
        cluster.ok(&["get", "nodes", "-o", "json"]),
        before,
        "nothing applied"
    );

    // node-2's datapath dies: status fails and names it, in the service's view and the node's.
    let node2 = cluster.pid("node-2");
    let _ = Command::new("kill")
        .args(["-9", &node2.to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = cluster.run(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() && text.contains("unavailable: node-2") {
            assert!(text.contains("connected nodes 1/2"), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never reported node-2 down: {text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    cluster.ok(&["down"]);
}

/// Waits until `node`'s routing table sends `cidr` as `expect` (a Membrane route).
fn wait_route(node: &str, cidr: &str, expect: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("nsenter")
            .args([
                &format!("--net=/run/netns/{node}"),
                "ip",
                "route",
                "show",
                cidr,
                "proto",
                "177",
            ])
            .output()
            .expect("ip route");
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains(expect) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{node} never routed {cidr} {expect}; has: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
