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
    /// Port 8080 answers the pod name and closes; 9090 answers the pod
    /// name, then echoes.
    fn start(pods: &[&str]) -> Self {
        let children = pods
            .iter()
            .flat_map(|p| {
                [
                    ("TCP-LISTEN:8080,fork,reuseaddr", format!("SYSTEM:echo {p}")),
                    (
                        "TCP-LISTEN:9090,fork,reuseaddr",
                        format!("SYSTEM:echo {p}; cat"),
                    ),
                ]
                .map(|(listen, answer)| {
                    Command::new("nsenter")
                        .args([
                            &format!("--net=/run/netns/pod-default-{p}"),
                            "socat",
                            listen,
                            &answer,
                        ])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("socat")
                })
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

/// A 2-node cluster whose pods w1 (node-1), w2 (node-2) and w3 (node-1),
/// labelled `app=web`, serve as [`Backends`], and a directory for the
/// test's documents. The servers stop before the cluster goes down.
struct WebCluster {
    _backends: Backends,
    cluster: Cluster,
    dir: tempfile::TempDir,
}

impl WebCluster {
    fn start() -> Self {
        let cluster = Cluster::new();
        assert!(cluster.has("membrane-lb"), "this test needs the lb service");
        cluster.ok(&["up", "--nodes", "2", "--detach"]);
        for (p, node) in [("w1", "node-1"), ("w2", "node-2"), ("w3", "node-1")] {
            cluster.ok(&["pod", "run", p, "--node", node, "--labels", "app=web"]);
        }
        Self {
            _backends: Backends::start(&["w1", "w2", "w3"]),
            cluster,
            dir: tempfile::tempdir().expect("tmp"),
        }
    }

    /// Writes `yaml` to `name` in the test's directory and applies it;
    /// returns the file's path.
    fn apply(&self, name: &str, yaml: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, yaml).expect("write");
        let path = path.to_str().expect("path").to_string();
        self.cluster.ok(&["apply", "-f", &path]);
        path
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

/// One TCP connection from inside a pod, held open by a python child that
/// echoes each line it is given through the connection.
struct HeldConnection {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    /// The backend pod that answered.
    backend: String,
}

impl HeldConnection {
    fn script(ip: &str, port: u16) -> String {
        format!(
            "import socket, sys\ns = socket.create_connection(('{ip}', {port}), timeout=5)\nf = s.makefile('r')\nprint(f.readline().strip(), flush=True)\nfor line in sys.stdin:\n    s.sendall(line.encode())\n    print(f.readline().strip(), flush=True)\n"
        )
    }

    /// From inside pod `pod`.
    fn open(cluster: &Cluster, pod: &str, ip: &str, port: u16) -> Self {
        let script = Self::script(ip, port);
        Self::spawn(cluster.command(&["pod", "exec", pod, "--", "python3", "-u", "-c", &script]))
    }

    /// From the `external` namespace.
    fn open_external(ip: &str, port: u16) -> Self {
        let mut cmd = Command::new("nsenter");
        cmd.args([
            "--net=/run/netns/external",
            "python3",
            "-u",
            "-c",
            &Self::script(ip, port),
        ]);
        Self::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Self {
        use std::io::BufRead as _;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the held connection");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut backend = String::new();
        stdout.read_line(&mut backend).expect("backend name");
        let backend = backend.trim().to_string();
        assert!(!backend.is_empty(), "no answer on the held connection");
        Self {
            child,
            stdin,
            stdout,
            backend,
        }
    }

    fn echo(&mut self, word: &str) -> String {
        use std::io::{BufRead as _, Write as _};
        writeln!(self.stdin, "{word}").expect("write");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read");
        line.trim().to_string()
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ClusterIP of the only service, once the lb service published it.
fn cluster_ip(cluster: &Cluster) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: Value =
            serde_json::from_str(&cluster.ok(&["get", "services", "-o", "json"])).expect("json");
        if let Some(fe) = v["items"][0]["frontends"].as_str() {
            return fe.split(':').next().expect("ip").to_string();
        }
        assert!(Instant::now() < deadline, "the service never showed: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_cluster_ip_balances_pods_on_both_nodes_over_its_backends_and_follows_them() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let web = WebCluster::start();
    let cluster = &web.cluster;
    cluster.ok(&["pod", "run", "c1", "--node", "node-1"]);
    cluster.ok(&["pod", "run", "c2", "--node", "node-2"]);
    web.apply("svc.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: 8080, protocol: TCP}\n  - {name: echo, port: 90, targetPort: 9090, protocol: TCP}\n");
    let ip = cluster_ip(cluster);

    // 300 connections from pods on both nodes reach all three backends.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut total: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        total.clear();
        for c in ["c1", "c2"] {
            for (k, v) in connect_many(cluster, c, &ip, 80, 150) {
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

    // ClientIP affinity: every connection of a pod goes to one backend.
    let sticky = web.apply("sticky.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: sticky, namespace: default}\nspec:\n  selector: {app: web}\n  clusterIP: 10.96.200.200\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = connect_many(cluster, "c2", "10.96.200.200", 80, 60);
        if seen.len() == 1 && seen.keys().all(|k| k.starts_with('w')) {
            assert_eq!(seen.values().sum::<usize>(), 60);
            break;
        }
        assert!(Instant::now() < deadline, "not sticky: {seen:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    cluster.ok(&["delete", "-f", &sticky]);

    // A connection in flight survives unrelated changes: another backend
    // going, another service coming.
    let mut held = HeldConnection::open(cluster, "c1", &ip, 90);
    let other = ["w1", "w2", "w3"]
        .into_iter()
        .find(|w| *w != held.backend && *w != "w3")
        .expect("another backend");
    web.apply("extra.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: default}\nspec:\n  selector: {app: web}\n  ports: [{name: http, port: 81, targetPort: 8080, protocol: TCP}]\n");
    cluster.ok(&["pod", "label", other, "app=gone"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        held.echo("still-here"),
        "still-here",
        "the held connection broke"
    );
    cluster.ok(&["pod", "label", other, "app=web"]);
    drop(held);

    // A removed backend is never chosen again.
    cluster.ok(&["pod", "rm", "w3"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = connect_many(cluster, "c1", &ip, 80, 100);
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
        let seen = connect_many(cluster, "c2", &ip, 80, 5);
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
    let web = WebCluster::start();
    let cluster = &web.cluster;
    web.apply("svc.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: NodePort\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}\n  - {name: echo, port: 90, targetPort: 9090, nodePort: 30090, protocol: TCP}\n");

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

    // A flow in flight through a node keeps its backend while the table
    // changes under it (another backend leaves, then comes back).
    let mut held = HeldConnection::open_external("10.99.0.12", 30090);
    let other = ["w1", "w2", "w3"]
        .into_iter()
        .find(|w| *w != held.backend)
        .expect("another backend");
    cluster.ok(&["pod", "label", other, "app=gone"]);
    wait_programmed(cluster);
    assert_eq!(held.echo("one"), "one", "the held flow broke");
    cluster.ok(&["pod", "label", other, "app=web"]);
    wait_programmed(cluster);
    assert_eq!(held.echo("two"), "two", "the held flow broke");
}

/// `membrane lb table SERVICE --node NODE -o json`: slots as that node's maps hold them.
fn programmed_table(cluster: &Cluster, service: &str, node: &str) -> Vec<String> {
    let v: Value =
        serde_json::from_str(&cluster.ok(&["lb", "table", service, "--node", node, "-o", "json"]))
            .expect("json");
    v["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .map(|s| s.as_str().expect("address").to_string())
        .collect()
}

/// Waits until every node reports the current state of every service as
/// programmed (`membrane get services`: acked version ≥ the service's).
fn wait_programmed(cluster: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v: Value =
            serde_json::from_str(&cluster.ok(&["get", "services", "-o", "json"])).expect("json");
        let items = v["items"].as_array().expect("items");
        let done = !items.is_empty()
            && items.iter().all(|s| {
                let nodes = s["nodes"].as_array().expect("nodes");
                nodes.len() == 2 && nodes.iter().all(|n| n["programmed"] == true)
            });
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "not programmed everywhere: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn counts(slots: &[String]) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for s in slots {
        *c.entry(s.clone()).or_insert(0) += 1;
    }
    c
}

fn endpoints_yaml(name: &str, addresses: &[String], weights: Option<&str>) -> String {
    let ann = weights
        .map(|w| format!("  annotations: {{service.membrane.io/backend-weights: '{w}'}}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata:\n  name: {name}\n  namespace: default\n{ann}subsets:\n- addresses: [{}]\n  ports: [{{name: http, port: 8080, protocol: TCP}}]\n",
        addresses
            .iter()
            .map(|a| format!("{{ip: {a}}}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

#[test]
fn maglev_tables_as_programmed_are_the_same_on_every_node_balanced_weighted_and_stable() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let cluster = Cluster::new();
    assert!(cluster.has("membrane-lb"), "this test needs the lb service");
    cluster.ok(&["up", "--nodes", "2", "--detach"]);
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("svc.yaml");
    let file = file.to_str().expect("path");
    let hundred: Vec<String> = (0..100)
        .map(|i| format!("10.250.{}.{}", i / 50, 10 + i % 50))
        .collect();
    std::fs::write(file, endpoints_yaml("big", &hundred, None)).expect("write");
    cluster.ok(&["apply", "-f", file]);
    std::fs::write(
        dir.path().join("w.yaml"),
        endpoints_yaml(
            "weighted",
            &[
                "10.251.0.1".into(),
                "10.251.0.2".into(),
                "10.251.0.3".into(),
            ],
            Some(r#"{"10.251.0.1": 1, "10.251.0.2": 2, "10.251.0.3": 3}"#),
        ),
    )
    .expect("write");
    cluster.ok(&[
        "apply",
        "-f",
        dir.path().join("w.yaml").to_str().expect("path"),
    ]);
    wait_programmed(&cluster);

    // Identical on every node, and what the lb service computes.
    let t1 = programmed_table(&cluster, "big", "node-1");
    let t2 = programmed_table(&cluster, "big", "node-2");
    assert_eq!(t1.len(), 16381);
    assert!(t1 == t2, "node-1 and node-2 programmed different tables");
    let computed: Value =
        serde_json::from_str(&cluster.ok(&["lb", "table", "big", "-o", "json"])).expect("json");
    let computed: Vec<&str> = computed["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .map(|s| s.as_str().expect("address"))
        .collect();
    assert!(
        t1.iter().map(String::as_str).eq(computed),
        "programmed ≠ computed"
    );

    // Every backend owns ⌊M/N⌋ or ⌈M/N⌉ slots.
    let c = counts(&t1);
    assert_eq!(c.len(), 100);
    assert!(c.values().all(|n| *n == 163 || *n == 164), "{c:?}");

    // Weights 1:2:3 → 1/6, 2/6, 3/6 of the slots (within 1% of M).
    let w = counts(&programmed_table(&cluster, "weighted", "node-2"));
    for (addr, share) in [
        ("10.251.0.1", 1.0),
        ("10.251.0.2", 2.0),
        ("10.251.0.3", 3.0),
    ] {
        let want = 16381.0 * share / 6.0;
        let got = w[addr] as f64;
        assert!(
            (got - want).abs() < 164.0,
            "{addr}: {got} slots, want ≈{want:.0}"
        );
    }

    // Removing one of 100 backends moves at most 1% of the survivors' slots.
    let removed = hundred[37].clone();
    let rest: Vec<String> = hundred.iter().filter(|a| **a != removed).cloned().collect();
    std::fs::write(file, endpoints_yaml("big", &rest, None)).expect("write");
    cluster.ok(&["apply", "-f", file]);
    wait_programmed(&cluster);
    let after = programmed_table(&cluster, "big", "node-1");
    assert!(!after.contains(&removed));
    let surviving = t1.iter().filter(|a| **a != removed).count();
    let moved = t1
        .iter()
        .zip(&after)
        .filter(|(old, new)| **old != removed && old != new)
        .count();
    assert!(
        moved * 100 <= surviving,
        "{moved} of {surviving} surviving slots moved"
    );
    assert!(after == programmed_table(&cluster, "big", "node-2"));
}

#[test]
fn bad_maglev_settings_and_a_duplicate_port_are_refused_with_the_field_named_and_nothing_changes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let cluster = Cluster::new();
    for (flags, want) in [
        (["--maglev-seed", "bm90LWJhc2U2NCE"], "--maglev-seed"),
        (["--maglev-seed", "%%%"], "not valid base64"),
        (["--maglev-seed", "c2hvcnQ="], "exactly 12 bytes"),
        (
            ["--maglev-table-size", "1000"],
            "--maglev-table-size: table size 1000 is not supported",
        ),
    ] {
        let out = cluster.run(&["up", "--detach", flags[0], flags[1]]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} accepted");
        assert!(err.contains(want), "{flags:?}: {err}");
        assert!(!netns_exists("node-1"), "{flags:?}: something was started");
    }

    cluster.ok(&["up", "--nodes", "2", "--detach"]);
    let dir = tempfile::tempdir().expect("tmp");
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, endpoints_yaml("web", &["10.250.0.1".into()], None)).expect("write");
    cluster.ok(&["apply", "-f", good.to_str().expect("path")]);
    wait_programmed(&cluster);
    let before = cluster.ok(&["get", "services", "-o", "json"]);
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  ports:\n  - {name: a, port: 80, protocol: TCP}\n  - {name: b, port: 80, protocol: TCP}\n").expect("write");
    let out = cluster.run(&["apply", "-f", bad.to_str().expect("path")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("spec.ports[1]") && err.contains("duplicate port 80/TCP"),
        "{err}"
    );
    // A running cluster is not touched by a bad flag either.
    let out = cluster.run(&["up", "--detach", "--maglev-table-size", "7"]);
    assert!(!out.status.success());
    assert_eq!(cluster.ok(&["get", "services", "-o", "json"]), before);
}

/// The LoadBalancer frontend of the only service and the node announcing
/// it, once both are published.
fn load_balancer(cluster: &Cluster) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v: Value =
            serde_json::from_str(&cluster.ok(&["get", "services", "-o", "json"])).expect("json");
        let lb = v["items"][0]["frontendList"].as_array().and_then(|l| {
            l.iter()
                .find(|f| f["kind"] == "FRONTEND_KIND_LOAD_BALANCER" && f["announcer"] != "")
                .map(|f| {
                    (
                        f["address"].as_str().expect("address").to_string(),
                        f["announcer"].as_str().expect("announcer").to_string(),
                    )
                })
        });
        if let Some(lb) = lb {
            return lb;
        }
        assert!(
            Instant::now() < deadline,
            "no announced LoadBalancer address: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn external_ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", "external"])
        .args(args)
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every client port answered (retrying while the change propagates).
fn all_answered(ip: &str, port: u16, sports: std::ops::Range<u16>) -> BTreeMap<u16, String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen = external_connects(ip, port, sports.clone());
        if seen.values().all(|b| !b.starts_with('!')) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "failures to {ip}:{port}: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_load_balancer_address_is_announced_and_either_node_sends_a_client_flow_to_the_same_backend() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let web = WebCluster::start();
    let cluster = &web.cluster;
    web.apply("svc.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: LoadBalancer\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]\n");
    // Once both nodes follow the lb stream (the announcer is chosen among
    // the subscribed nodes, so it can move while they connect).
    load_balancer(cluster);
    wait_programmed(cluster);
    let (lb_ip, announcer) = load_balancer(cluster);

    // Announced: `external` has no route but its on-link /24, so it asks
    // for the address by ARP, and the announcing node answers.
    let seen = all_answered(&lb_ip, 80, 43000..43100);
    let used: std::collections::BTreeSet<&String> = seen.values().collect();
    assert_eq!(used.len(), 3, "all three backends used: {used:?}");
    let neigh = external_ip(&["neigh", "show", &lb_ip]);
    let node_ip = if announcer == "node-1" {
        "10.99.0.11"
    } else {
        "10.99.0.12"
    };
    assert!(
        ping_ok("external", node_ip),
        "external cannot reach {node_ip}"
    );
    let node_neigh = external_ip(&["neigh", "show", node_ip]);
    let mac = |s: &str| {
        s.split_whitespace()
            .skip_while(|w| *w != "lladdr")
            .nth(1)
            .map(str::to_string)
    };
    assert!(
        mac(&neigh).is_some() && mac(&neigh) == mac(&node_neigh),
        "{lb_ip} resolved to {neigh:?}, {announcer} is {node_neigh:?}"
    );

    // Through node-1 and through node-2 (a route via each): the same
    // backend per client address and port.
    let mut via = Vec::new();
    for node_ip in ["10.99.0.11", "10.99.0.12"] {
        external_ip(&["route", "replace", &format!("{lb_ip}/32"), "via", node_ip]);
        via.push(all_answered(&lb_ip, 80, 43000..43100));
    }
    external_ip(&["route", "del", &format!("{lb_ip}/32")]);
    assert_eq!(via[0], via[1], "node-1 and node-2 chose different backends");
    assert_eq!(via[0], seen, "the announced path chose differently");

    // Pods reach the LoadBalancer address too (translated at the socket).
    cluster.ok(&["pod", "run", "c1", "--node", "node-2"]);
    let from_pod = connect_many(cluster, "c1", &lb_ip, 80, 30);
    assert_eq!(from_pod.values().sum::<usize>(), 30);
    assert!(from_pod.keys().all(|k| k.starts_with('w')), "{from_pod:?}");

    // Without backends the address refuses at once, whichever node it reaches.
    for p in ["w1", "w2", "w3"] {
        cluster.ok(&["pod", "label", p, "app=idle"]);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for route in [None, Some("10.99.0.11"), Some("10.99.0.12")] {
        if let Some(via) = route {
            external_ip(&["route", "replace", &format!("{lb_ip}/32"), "via", via]);
        }
        loop {
            let started = Instant::now();
            let seen = external_connects(&lb_ip, 80, 44000..44005);
            if seen.values().all(|b| b == "!ConnectionRefusedError") {
                assert!(
                    started.elapsed() < Duration::from_secs(2),
                    "{:?}",
                    started.elapsed()
                );
                break;
            }
            assert!(Instant::now() < deadline, "via {route:?}: {seen:?}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    external_ip(&["route", "del", &format!("{lb_ip}/32")]);
}
