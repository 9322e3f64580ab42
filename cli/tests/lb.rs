//! End-to-end: Kubernetes services load-balanced at the socket in pods
//! (cgroup connect4), with Maglev tables computed on every node from what
//! the lb service publishes. Needs root (see `support::has_root`).

mod support;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use support::*;

/// Backend servers answering with their pod name, killed on drop.
struct Backends(Vec<Child>);

impl Backends {
    fn start(pods: &[&str]) -> Self {
        let children = pods
            .iter()
            .map(|p| {
                Command::new("nsenter")
                    .args([
                        &format!("--net=/run/netns/pod-default-{p}"),
                        "socat",
                        "TCP-LISTEN:8080,fork,reuseaddr",
                        &format!("SYSTEM:echo {p}"),
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("socat")
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        Self(children)
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `n` connections to `ip:port` from inside pod `client` (in its cgroup, as
/// a process of the pod would), counted by the backend that answered;
/// refused/failed connections are counted under `!error`.
fn connect_many(
    cluster: &Cluster,
    client: &str,
    ip: &str,
    port: u16,
    n: usize,
) -> BTreeMap<String, usize> {
    let script = format!(
        "import socket, collections, json\nseen = collections.Counter()\nfor i in range({n}):\n    try:\n        s = socket.create_connection(('{ip}', {port}), timeout=2)\n        seen[s.recv(64).decode().strip()] += 1\n        s.close()\n    except OSError as e:\n        seen['!' + type(e).__name__] += 1\nprint(json.dumps(seen))"
    );
    let out = cluster.ok(&["pod", "exec", client, "--", "python3", "-c", &script]);
    serde_json::from_str(out.trim()).expect("counts")
}

fn cluster_ip(cluster: &Cluster) -> String {
    let v: Value =
        serde_json::from_str(&cluster.ok(&["get", "services", "-o", "json"])).expect("json");
    let fe = v["items"][0]["frontends"]
        .as_str()
        .expect("frontends")
        .to_string();
    fe.split(':').next().expect("ip").to_string()
}

#[test]
fn a_cluster_ip_balances_pods_on_both_nodes_over_its_backends_and_follows_them() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let cluster = Cluster::new();
    assert!(cluster.has("membrane-lb"), "this test needs the lb service");
    cluster.ok(&["up", "--nodes", "2", "--detach"]);
    for (p, node) in [("w1", "node-1"), ("w2", "node-2"), ("w3", "node-1")] {
        cluster.ok(&["pod", "run", p, "--node", node, "--labels", "app=web"]);
    }
    cluster.ok(&["pod", "run", "c1", "--node", "node-1"]);
    cluster.ok(&["pod", "run", "c2", "--node", "node-2"]);
    let _backends = Backends::start(&["w1", "w2", "w3"]);
    let dir = tempfile::tempdir().expect("tmp");
    let svc = dir.path().join("svc.yaml");
    std::fs::write(&svc, "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]\n").expect("write");
    cluster.ok(&["apply", "-f", svc.to_str().expect("path")]);
    let ip = cluster_ip(&cluster);

    // 300 connections from pods on both nodes reach all three backends.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut total: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        total.clear();
        for c in ["c1", "c2"] {
            for (k, v) in connect_many(&cluster, c, &ip, 80, 150) {
                *total.entry(k).or_default() += v;
            }
        }
        if ["w1", "w2", "w3"]
            .iter()
            .all(|w| total.get(*w).copied().unwrap_or(0) > 0)
            || Instant::now() > deadline
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        total.keys().cloned().collect::<Vec<_>>(),
        ["w1", "w2", "w3"],
        "{total:?}"
    );
    assert_eq!(total.values().sum::<usize>(), 300);
    for (w, n) in &total {
        assert!(*n >= 50, "{w} got only {n} of 300: {total:?}");
    }

    // A removed backend is never chosen again.
    cluster.ok(&["pod", "rm", "w3"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = connect_many(&cluster, "c1", &ip, 80, 100);
        if !seen.contains_key("w3") && seen.keys().all(|k| !k.starts_with('!')) {
            assert_eq!(seen.values().sum::<usize>(), 100, "{seen:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "w3 still chosen or errors: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // Without backends the connection is refused at once, never a silent timeout.
    for p in ["w1", "w2"] {
        cluster.ok(&["pod", "rm", p]);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let started = Instant::now();
        let seen = connect_many(&cluster, "c2", &ip, 80, 5);
        if seen.get("!ConnectionRefusedError") == Some(&5) {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "refusals took {:?}",
                started.elapsed()
            );
            break;
        }
        assert!(Instant::now() < deadline, "still {seen:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// From the `external` namespace (the world): one connection per client
/// port to `ip:port`, each from that fixed source port; the backend that
/// answered per client port (`!Error` where it failed).
fn external_connects(ip: &str, port: u16, sports: std::ops::Range<u16>) -> BTreeMap<u16, String> {
    let script = format!(
        "import socket, json\nseen = {{}}\nfor sp in range({}, {}):\n    try:\n        s = socket.socket()\n        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n        s.settimeout(2)\n        s.bind(('0.0.0.0', sp))\n        s.connect(('{ip}', {port}))\n        seen[sp] = s.recv(64).decode().strip()\n        s.close()\n    except OSError as e:\n        seen[sp] = '!' + type(e).__name__\nprint(json.dumps(seen))",
        sports.start, sports.end
    );
    let out = Command::new("nsenter")
        .args(["--net=/run/netns/external", "python3", "-c", &script])
        .output()
        .expect("python3 in external");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: BTreeMap<String, String> =
        serde_json::from_slice(&out.stdout).expect("json from external");
    m.into_iter()
        .map(|(k, v)| (k.parse().expect("port"), v))
        .collect()
}

#[test]
fn a_node_port_reached_through_either_node_lands_on_the_same_backend_per_client_flow() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let cluster = Cluster::new();
    assert!(cluster.has("membrane-lb"), "this test needs the lb service");
    cluster.ok(&["up", "--nodes", "2", "--detach"]);
    for (p, node) in [("w1", "node-1"), ("w2", "node-2"), ("w3", "node-1")] {
        cluster.ok(&["pod", "run", p, "--node", node, "--labels", "app=web"]);
    }
    let _backends = Backends::start(&["w1", "w2", "w3"]);
    let dir = tempfile::tempdir().expect("tmp");
    let svc = dir.path().join("svc.yaml");
    std::fs::write(&svc, "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: NodePort\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}]\n").expect("write");
    cluster.ok(&["apply", "-f", svc.to_str().expect("path")]);

    // Until programmed on both nodes: every client port answered through both.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (via1, via2) = loop {
        let via1 = external_connects("10.99.0.11", 30080, 42000..42100);
        let via2 = external_connects("10.99.0.12", 30080, 42000..42100);
        let ok = |m: &BTreeMap<u16, String>| m.values().all(|b| !b.starts_with('!'));
        if ok(&via1) && ok(&via2) {
            break (via1, via2);
        }
        assert!(
            Instant::now() < deadline,
            "failures: via node-1 {via1:?}, via node-2 {via2:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(via1, via2, "node-1 and node-2 chose different backends");
    let used: std::collections::BTreeSet<&String> = via1.values().collect();
    assert_eq!(used.len(), 3, "all three backends used: {used:?}");
}
