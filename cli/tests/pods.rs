//! End-to-end tests of pods on a local cluster: real namespaces attached by
//! the real CNI plugin through the real node agent, traffic carried by the
//! eBPF datapath. They need root (see `support::has_root`).

mod support;

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use support::*;

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 8081;

/// TCP and UDP echo servers bound inside `netns` for the rest of the test.
fn echo_servers(netns: &str) {
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_in_netns(netns, move || {
        let tcp = TcpListener::bind(("0.0.0.0", TCP_PORT)).expect("bind tcp");
        let udp = UdpSocket::bind(("0.0.0.0", UDP_PORT)).expect("bind udp");
        tx.send(()).expect("ready");
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&buf[..n], peer);
            }
        });
        for conn in tcp.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 512];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("servers up");
}

/// From inside `netns`: a TCP and a UDP round trip to `ip`.
fn round_trips(netns: &str, ip: &str) -> Result<(), String> {
    let ip: std::net::IpAddr = ip.parse().map_err(|e| format!("{e}"))?;
    in_netns(Some(netns), move || {
        let msg = b"membrane";
        let mut tcp =
            TcpStream::connect_timeout(&SocketAddr::new(ip, TCP_PORT), Duration::from_secs(3))
                .map_err(|e| format!("tcp connect {ip}: {e}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        tcp.write_all(msg).map_err(|e| format!("tcp write: {e}"))?;
        let mut buf = [0u8; 8];
        tcp.read_exact(&mut buf)
            .map_err(|e| format!("tcp read from {ip}: {e}"))?;
        if &buf != msg {
            return Err(format!("tcp echo from {ip} differs"));
        }
        let udp = UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| e.to_string())?;
        udp.set_read_timeout(Some(Duration::from_millis(700)))
            .map_err(|e| e.to_string())?;
        // UDP may lose a datagram while neighbours resolve: a few tries.
        for _ in 0..4 {
            udp.send_to(msg, SocketAddr::new(ip, UDP_PORT))
                .map_err(|e| format!("udp send: {e}"))?;
            if let Ok((n, _)) = udp.recv_from(&mut buf)
                && &buf[..n] == msg
            {
                return Ok(());
            }
        }
        Err(format!("no udp echo from {ip}"))
    })
}

fn endpoints(cluster: &Cluster) -> Vec<Value> {
    let v: Value =
        serde_json::from_str(&cluster.ok(&["get", "endpoints", "-o", "json"])).expect("json");
    v["items"].as_array().cloned().unwrap_or_default()
}

fn lxc_devices(node: &str) -> BTreeSet<String> {
    let out = Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{node}"),
            "ip",
            "-o",
            "link",
            "show",
        ])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split(':')
                .nth(1)
                .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        })
        .filter(|n| n.starts_with("lxc"))
        .collect()
}

fn allocations(cluster: &Cluster) -> usize {
    let v: Value = serde_json::from_str(&cluster.ok(&["get", "ipam", "-o", "json"])).expect("json");
    v["allocations"].as_array().map(Vec::len).unwrap_or(0)
}

#[test]
fn six_pods_on_two_nodes_reach_each_other_and_the_world_over_tcp_and_udp() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let cluster = Cluster::new();
    cluster.ok(&["up", "--nodes", "2", "--detach"]);
    let pods = ["a1", "a2", "a3", "b1", "b2", "b3"];
    for p in pods {
        let node = if p.starts_with('a') {
            "node-1"
        } else {
            "node-2"
        };
        cluster.ok(&[
            "pod",
            "run",
            p,
            "--node",
            node,
            "--labels",
            &format!("app={p}"),
        ]);
    }
    let mut targets: Vec<(String, String)> = pods
        .iter()
        .map(|p| (p.to_string(), cluster.pod_ip(p, "default")))
        .collect();
    for p in pods {
        echo_servers(&format!("pod-default-{p}"));
    }
    echo_servers("external");
    targets.push(("external".into(), "10.99.0.200".into()));

    let mut failures = Vec::new();
    for src in pods {
        for (dst, ip) in &targets {
            if dst == src {
                continue;
            }
            if let Err(e) = round_trips(&format!("pod-default-{src}"), ip) {
                failures.push(format!("{src} -> {dst} ({ip}): {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "connectivity failures:\n{}",
        failures.join("\n")
    );
    // The nodes themselves reach pods on either node (replies must not be masqueraded).
    for node in ["node-1", "node-2"] {
        for (dst, ip) in targets.iter().filter(|(d, _)| d != "external") {
            round_trips(node, ip).unwrap_or_else(|e| panic!("{node} -> {dst} ({ip}): {e}"));
        }
    }

    // A second CNI ADD for a container that is already attached (what a
    // confused runtime might do) is refused with a spec-shaped error and
    // changes nothing: the pod keeps working.
    let a1: Value = serde_json::from_slice(
        &std::fs::read(cluster.dir().join("pods/default/a1.json")).expect("pod record"),
    )
    .expect("json");
    let plugin =
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_membrane")).with_file_name("membrane-cni");
    let socket = cluster.dir().join("nodes/node-1/agent.sock");
    let mut add = Command::new(&plugin)
        .env("CNI_COMMAND", "ADD")
        .env(
            "CNI_CONTAINERID",
            a1["container_id"].as_str().expect("container id"),
        )
        .env("CNI_NETNS", "/run/netns/pod-default-a1")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run membrane-cni");
    add.stdin
        .take()
        .expect("stdin")
        .write_all(serde_json::json!({"cniVersion": "1.0.0", "name": "membrane", "type": "membrane-cni", "socket": socket}).to_string().as_bytes())
        .expect("netconf");
    let out = add.wait_with_output().expect("cni");
    assert!(!out.status.success(), "second ADD must fail");
    let err: Value = serde_json::from_slice(&out.stdout).expect("spec-shaped error JSON");
    assert_eq!(err["code"], 100, "{err}");
    assert_eq!(err["cniVersion"], "1.0.0");
    assert!(err["msg"].as_str().is_some_and(|m| !m.is_empty()), "{err}");
    assert_eq!(endpoints(&cluster).len(), 6, "no endpoint added");
    round_trips("pod-default-b1", &targets[0].1).expect("a1 still reachable after the refused ADD");

    // Our programs are attached to every pod veth and both underlay devices,
    // as bpftool sees the pinned tcx links.
    let eps = endpoints(&cluster);
    assert_eq!(eps.len(), 6);
    assert!(eps.iter().all(|e| e["programmed"] == true), "{eps:?}");
    for e in &eps {
        let pin = format!(
            "/sys/fs/bpf/membrane/{}/links/lxc_ingress_{}",
            e["node"].as_str().expect("node"),
            e["hostIfindex"]
        );
        let out = Command::new("bpftool")
            .args(["link", "show", "pinned", &pin])
            .output()
            .expect("bpftool");
        assert!(
            out.status.success(),
            "bpftool link show pinned {pin}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("prog"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    for node in ["node-1", "node-2"] {
        let pins: Vec<_> = std::fs::read_dir(format!("/sys/fs/bpf/membrane/{node}/links"))
            .expect("links dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("host_ingress_"))
            .collect();
        assert_eq!(pins.len(), 1, "{node}: {pins:?}");
    }

    // `pod rm` releases the address and removes the device, the map entry,
    // the namespace, and the pod's processes with its cgroup.
    let a3_ip = cluster.pod_ip("a3", "default");
    let before_devices = lxc_devices("node-1");
    let mut sleeper = cluster
        .command(&["pod", "exec", "a3", "--", "sleep", "300"])
        .spawn()
        .expect("pod exec");
    let mut sleeper_a1 = cluster
        .command(&["pod", "exec", "a1", "--", "sleep", "300"])
        .spawn()
        .expect("pod exec");
    std::thread::sleep(Duration::from_millis(300));
    cluster.ok(&["pod", "rm", "a3"]);
    assert!(!netns_exists("pod-default-a3"));
    assert!(
        !std::path::Path::new("/sys/fs/cgroup/unified/membrane/node-1/pod-default-a3").exists()
    );
    let exited = sleeper.wait().expect("wait");
    assert!(!exited.success(), "the pod's process was not killed");
    assert_eq!(lxc_devices("node-1").len(), before_devices.len() - 1);
    assert!(
        !endpoints(&cluster)
            .iter()
            .any(|e| e["address"] == format!("{a3_ip}/32"))
    );
    let ipam = cluster.ok(&["get", "ipam"]);
    assert!(!ipam.contains(&a3_ip), "{ipam}");
    assert_eq!(allocations(&cluster), 5);
    cluster.ok(&["down"]);
    assert!(!netns_exists("pod-default-a1"), "down removes pods too");
    assert!(
        !sleeper_a1.wait().expect("wait").success(),
        "down kills pods' processes"
    );
    assert!(!std::path::Path::new("/sys/fs/cgroup/unified/membrane/node-1").exists());
}

#[test]
fn restarting_a_node_datapath_does_not_break_a_running_tcp_stream() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let cluster = Cluster::new();
    cluster.ok(&["up", "--nodes", "2", "--detach"]);
    cluster.ok(&["pod", "run", "client", "--node", "node-1"]);
    cluster.ok(&["pod", "run", "server", "--node", "node-2"]);
    let server_ip = cluster.pod_ip("server", "default");
    let mut server = cluster
        .command(&[
            "pod", "exec", "server", "--", "iperf3", "-s", "-1", "-p", "5201",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(500));
    let client = cluster
        .command(&[
            "pod", "exec", "client", "--", "iperf3", "-c", &server_ip, "-p", "5201", "-t", "6",
            "-J",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("iperf3 client");
    std::thread::sleep(Duration::from_secs(2));
    cluster.ok(&["restart", "node-1"]);
    cluster.ok(&["restart", "node-2"]);
    let out = client.wait_with_output().expect("iperf3 client");
    let _ = server.wait();
    let report: Value = serde_json::from_slice(&out.stdout).expect("iperf3 json");
    assert!(
        out.status.success() && report.get("error").is_none(),
        "iperf3: {report}"
    );
    let sent = report["end"]["sum_sent"]["bytes"].as_u64().unwrap_or(0);
    let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(
        received > 0 && received + 64 * 1024 * 1024 >= sent,
        "sent {sent}, received {received}"
    );
    eprintln!(
        "iperf3 across two datapath restarts: {:.2} Gbit/s",
        report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e9
    );
}

#[test]
fn fifty_pods_started_and_removed_in_parallel_get_distinct_addresses_and_leak_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let cluster = Cluster::new();
    cluster.ok(&["up", "--nodes", "2", "--detach"]);
    cluster.ok(&["pod", "run", "prober", "--node", "node-1"]);
    let names: Vec<String> = (0..50).map(|i| format!("p{i}")).collect();
    let started = Instant::now();
    let children: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let node = if i % 2 == 0 { "node-1" } else { "node-2" };
            cluster
                .command(&["pod", "run", n, "--node", node])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn pod run")
        })
        .collect();
    let mut ips = BTreeSet::new();
    for (child, name) in children.into_iter().zip(&names) {
        let out = child.wait_with_output().expect("pod run");
        assert!(
            out.status.success(),
            "pod run {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ips.insert(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    eprintln!("50 parallel pod runs took {:?}", started.elapsed());
    assert_eq!(ips.len(), 50, "addresses must be distinct: {ips:?}");

    // Every one answers a ping from a pod on node-1 (half of them across nodes).
    let pings: Vec<_> = ips
        .iter()
        .map(|ip| {
            cluster
                .command(&[
                    "pod", "exec", "prober", "--", "ping", "-c", "1", "-W", "3", ip,
                ])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("ping")
        })
        .collect();
    let unreachable: Vec<_> = pings
        .into_iter()
        .zip(&ips)
        .filter_map(|(mut c, ip)| (!c.wait().expect("ping").success()).then_some(ip.clone()))
        .collect();
    assert!(unreachable.is_empty(), "unreachable: {unreachable:?}");

    let children: Vec<_> = names
        .iter()
        .map(|n| {
            cluster
                .command(&["pod", "rm", n])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("rm")
        })
        .collect();
    for (child, name) in children.into_iter().zip(&names) {
        let out = child.wait_with_output().expect("pod rm");
        assert!(
            out.status.success(),
            "pod rm {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Only the prober is left: one address, one device, one map entry, one pod namespace.
    assert_eq!(allocations(&cluster), 1);
    assert_eq!(lxc_devices("node-1").len(), 1);
    assert_eq!(lxc_devices("node-2").len(), 0);
    assert_eq!(endpoints(&cluster).len(), 1);
    let pod_netns = std::fs::read_dir("/run/netns")
        .expect("netns dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("pod-"))
        .count();
    assert_eq!(pod_netns, 1);
}

/// Packets sent by `dev` in `netns` (from `ip -s -j link`).
fn tx_packets(netns: &str, dev: &str) -> u64 {
    let out = Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{netns}"),
            "ip",
            "-s",
            "-j",
            "link",
            "show",
            "dev",
            dev,
        ])
        .output()
        .expect("ip link");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v[0]["stats64"]["tx"]["packets"].as_u64().unwrap_or(0)
}

#[test]
fn in_vxlan_mode_pods_on_different_nodes_talk_through_the_tunnel() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let cluster = Cluster::new();
    cluster.ok(&["up", "--nodes", "2", "--detach", "--routing", "vxlan"]);
    cluster.ok(&["pod", "run", "a", "--node", "node-1"]);
    cluster.ok(&["pod", "run", "b", "--node", "node-2"]);
    let b = cluster.pod_ip("b", "default");
    let a = cluster.pod_ip("a", "default");
    echo_servers("pod-default-b");
    echo_servers("pod-default-a");
    let before = tx_packets("node-1", "mbvx0");
    round_trips("pod-default-a", &b).expect("a -> b through the tunnel");
    round_trips("pod-default-b", &a).expect("b -> a through the tunnel");
    let sent = tx_packets("node-1", "mbvx0") - before;
    assert!(sent >= 4, "node-1 sent {sent} packets through mbvx0");
    let routes = Command::new("nsenter")
        .args([
            "--net=/run/netns/node-1",
            "ip",
            "route",
            "show",
            "proto",
            "177",
        ])
        .output()
        .expect("ip route");
    assert!(
        String::from_utf8_lossy(&routes.stdout).contains("dev mbvx0"),
        "{}",
        String::from_utf8_lossy(&routes.stdout)
    );
    // The world is still reached through the underlay, masqueraded.
    echo_servers("external");
    round_trips("pod-default-a", "10.99.0.200").expect("a -> external");
}
