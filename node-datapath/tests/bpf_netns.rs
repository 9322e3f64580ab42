// SPDX-License-Identifier: Apache-2.0
//! Privileged end-to-end tests with real veths in real network namespaces:
//! one node namespace with `ip_forward=0` and two pod namespaces wired the
//! way the CNI plugin will wire them (pod `eth0` /32, default route via a
//! link-local gateway whose MAC is pinned to the node-side veth's). If a
//! packet gets from pod A to pod B, the eBPF redirect carried it: the
//! node's stack is not allowed to forward.

mod bpf_support;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use bpf_support::*;
use membrane_node_datapath::bpf::{
    AttachMode, Datapath, DatapathOptions, Direction, DropReason, EndpointInfo, Hook, LoadConfig,
    PolicyEntry, PortMatch, Verdict, identity, probe_features,
};

/// A flood runs at ~150k pings/s here and a reload takes ~0.3 s: this
/// count leaves room for several reloads mid-flood.
const FLOOD_COUNT: &str = "400000";

/// A node namespace with two pods. Dropping it deletes every namespace
/// (and with them the veths); the pin dir goes with its own guard.
struct Topology {
    pods: Vec<Pod>,
    node: Netns,
}

impl Topology {
    fn new() -> Self {
        let node = Netns::new("node");
        run_ns(&node.name, &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
        let pods = [
            ("a", Ipv4Addr::new(10, 200, 1, 10), 0x0a),
            ("b", Ipv4Addr::new(10, 200, 1, 11), 0x0b),
        ]
        .into_iter()
        .map(|(name, ip, n)| add_pod(&node, "", name, ip, n))
        .collect();
        Self { pods, node }
    }

    fn endpoints(&self) -> impl Iterator<Item = (Ipv4Addr, EndpointInfo)> + '_ {
        self.pods.iter().enumerate().map(|(i, p)| {
            (
                p.ip,
                EndpointInfo {
                    ifindex: p.lxc_ifindex,
                    pod_mac: p.mac,
                    node_mac: p.lxc_mac,
                    endpoint_id: i as u32 + 1,
                    identity: 0,
                    flags: 0,
                },
            )
        })
    }

    /// Loads the datapath from `pins`, attaches it to both pods and programs
    /// the endpoints. Must run inside the node namespace.
    fn load(&self, pins: &PinDir) -> (Datapath, Vec<AttachMode>) {
        self.load_with(pins, &LoadConfig::default())
    }

    fn load_with(&self, pins: &PinDir, config: &LoadConfig) -> (Datapath, Vec<AttachMode>) {
        let opts = DatapathOptions::from_features(&probe_features().expect("probe"));
        assert!(opts.redirect_peer, "this test needs bpf_redirect_peer");
        let mut dp = Datapath::load_with(pins.path(), &opts, config).expect("load");
        let modes = self
            .pods
            .iter()
            .map(|p| dp.attach_lxc(p.lxc_ifindex).expect("attach lxc"))
            .collect();
        for (ip, info) in self.endpoints() {
            dp.upsert_endpoint(ip, &info).expect("upsert");
        }
        (dp, modes)
    }

    fn ping(&self, from: usize, to: usize, args: &[&str]) -> std::process::Output {
        let dst = self.pods[to].ip.to_string();
        in_ns(
            &self.pods[from].ns.name,
            &[&["ping", "-n"], args, &[dst.as_str()]].concat(),
        )
        .output()
        .expect("spawn ping")
    }
}

fn run_ns(ns: &str, args: &[&str]) {
    let out = in_ns(ns, args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `(transmitted, received)` from ping's summary line.
fn ping_counts(out: &std::process::Output) -> (u64, u64) {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {text}"));
    let nums: Vec<u64> = line
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect();
    (nums[0], nums[1])
}

/// A TCP sink in pod `ns` that counts bytes until EOF and sends the count back.
fn tcp_sink(ns: &str, ip: Ipv4Addr) -> (SocketAddr, thread::JoinHandle<u64>) {
    let path = format!("/run/netns/{ns}");
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        enter_netns(&path);
        let listener = TcpListener::bind((ip, 0)).expect("bind");
        tx.send(listener.local_addr().expect("addr"))
            .expect("send addr");
        let (mut conn, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            match conn.read(&mut buf).expect("read") {
                0 => break,
                n => total += n as u64,
            }
        }
        conn.write_all(&total.to_be_bytes()).expect("write count");
        total
    });
    (rx.recv().expect("sink address"), handle)
}

/// Streams from pod `ns` to `addr` until `keep_going` says stop (at least
/// `min` bytes); returns (sent, acknowledged by the sink).
fn tcp_stream(
    ns: &str,
    addr: SocketAddr,
    min: u64,
    keep_going: impl Fn() -> bool + Send + 'static,
) -> thread::JoinHandle<(u64, u64)> {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        enter_netns(&path);
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        conn.set_write_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let chunk = vec![0x5au8; 64 * 1024];
        let mut sent = 0u64;
        while sent < min || keep_going() {
            conn.write_all(&chunk).expect("write: the stream broke");
            sent += chunk.len() as u64;
        }
        conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut count = [0u8; 8];
        conn.read_exact(&mut count).expect("read count");
        (sent, u64::from_be_bytes(count))
    })
}

#[test]
fn pods_on_one_node_reach_each_other_through_redirect_peer_with_forwarding_off() {
    if !privileged("pods_on_one_node_reach_each_other_through_redirect_peer_with_forwarding_off") {
        return;
    }
    let pins = PinDir::new();
    let topo = Topology::new();

    // Without the datapath the node's stack must not carry pod traffic.
    let before = topo.ping(0, 1, &["-c", "1", "-W", "1"]);
    assert!(
        !before.status.success(),
        "ping worked with no datapath: ip_forward=0 is not in effect"
    );

    topo.node.run_in(|| {
        let (mut dp, modes) = topo.load(&pins);
        assert_eq!(modes, [AttachMode::Fresh, AttachMode::Fresh]);
        let attached: Vec<_> = topo
            .pods
            .iter()
            .map(|p| (Hook::Lxc, p.lxc_ifindex))
            .collect();
        assert_eq!(dp.pinned_attachments().expect("list"), attached);

        let ping = topo.ping(0, 1, &["-c", "3", "-i", "0.2", "-W", "2"]);
        assert_eq!(
            ping_counts(&ping),
            (3, 3),
            "{}",
            String::from_utf8_lossy(&ping.stdout)
        );

        let (addr, sink) = tcp_sink(&topo.pods[1].ns.name, topo.pods[1].ip);
        let (sent, acked) = tcp_stream(&topo.pods[0].ns.name, addr, 8 << 20, || false)
            .join()
            .expect("client");
        assert_eq!(sink.join().expect("sink"), sent);
        assert_eq!(acked, sent);

        let m = dp.metrics().expect("metrics");
        assert!(m.redirect_peer.packets >= 6, "ping both ways + TCP: {m:?}");
        assert_eq!(m.dropped(), 0, "{m:?}");
        let tcp = dp
            .conntrack()
            .expect("ct")
            .into_iter()
            .find(|(f, _)| f.proto == 6 && f.dport == addr.port());
        let (_, entry) = tcp.expect("ct entry for the TCP connection");
        assert!(
            entry.seen_reply && entry.packets_fwd > 0 && entry.packets_rev > 0,
            "{entry:?}"
        );

        // Detaching really detaches: the stack (forwarding off) drops again.
        for p in &topo.pods {
            assert!(dp.detach(Hook::Lxc, p.lxc_ifindex).expect("detach"));
        }
        assert!(dp.pinned_attachments().expect("list").is_empty());
        let after = topo.ping(0, 1, &["-c", "1", "-W", "1"]);
        assert!(!after.status.success(), "ping still works after detach");
    });
}

#[test]
fn reloading_the_datapath_under_a_ping_flood_and_a_tcp_stream_loses_nothing() {
    if !privileged("reloading_the_datapath_under_a_ping_flood_and_a_tcp_stream_loses_nothing") {
        return;
    }
    let pins = PinDir::new();
    let topo = Topology::new();

    topo.node.run_in(|| {
        let (mut dp, _) = topo.load(&pins);
        let (addr, sink) = tcp_sink(&topo.pods[1].ns.name, topo.pods[1].ip);
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let stop_rx = std::sync::Mutex::new(stop_rx);
        let stream = tcp_stream(&topo.pods[0].ns.name, addr, 1 << 20, move || {
            matches!(
                stop_rx.lock().map(|rx| rx.try_recv()),
                Ok(Err(mpsc::TryRecvError::Empty))
            )
        });
        let dst = topo.pods[1].ip.to_string();
        let flood = in_ns(
            &topo.pods[0].ns.name,
            &["ping", "-n", "-q", "-f", "-c", FLOOD_COUNT, "-W", "1", &dst],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ping flood");

        // "Restart the agent" again and again while traffic flows: a new
        // Datapath adopts the pinned links, then the old one is dropped.
        let started = Instant::now();
        let mut reloads = 0;
        let flood = {
            let mut flood = flood;
            while flood.try_wait().expect("poll ping").is_none() {
                let t = Instant::now();
                let (next, modes) = topo.load(&pins);
                eprintln!("reload {reloads}: {:?}", t.elapsed());
                assert_eq!(
                    modes,
                    [AttachMode::Adopted, AttachMode::Adopted],
                    "reload {reloads}"
                );
                dp = next;
                reloads += 1;
                thread::sleep(Duration::from_millis(20));
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "ping flood never finished"
                );
            }
            flood.wait_with_output().expect("ping output")
        };
        stop_tx.send(()).expect("stop stream");
        let (sent, acked) = stream.join().expect("stream thread");
        assert_eq!(sink.join().expect("sink"), sent);
        assert_eq!(acked, sent, "TCP stream intact across {reloads} reloads");

        let (tx, rx) = ping_counts(&flood);
        eprintln!(
            "{reloads} reloads in {:?}; ping flood {tx} sent / {rx} received; tcp {sent} bytes",
            started.elapsed()
        );
        assert!(
            reloads >= 3,
            "only {reloads} reloads happened during the flood"
        );
        assert_eq!(tx.to_string(), FLOOD_COUNT);
        assert_eq!(rx, tx, "lost flood pings across {reloads} reloads");
        let m = dp.metrics().expect("metrics");
        assert!(m.redirect_peer.packets >= 40000, "{m:?}");
        assert_eq!(m.dropped(), 0, "{m:?}");

        for p in &topo.pods {
            dp.detach(Hook::Lxc, p.lxc_ifindex).expect("detach");
        }
    });
}

#[test]
fn a_pinned_link_whose_interface_was_deleted_is_replaced_on_attach() {
    if !privileged("a_pinned_link_whose_interface_was_deleted_is_replaced_on_attach") {
        return;
    }
    let pins = PinDir::new();
    let topo = Topology::new();
    topo.node.run_in(|| {
        let (mut dp, _) = topo.load(&pins);
        let gone = topo.pods[0].lxc_ifindex;
        run(&[
            "ip",
            "-n",
            &topo.node.name,
            "link",
            "del",
            &topo.pods[0].lxc,
        ]);
        // A new interface gets the old index (set explicitly, as a reused index would be).
        let index = gone.to_string();
        run(&[
            "ip",
            "-n",
            &topo.node.name,
            "link",
            "add",
            "lxcnew",
            "index",
            &index,
            "type",
            "veth",
            "peer",
            "name",
            "lxcnewpeer",
        ]);
        run(&["ip", "-n", &topo.node.name, "link", "set", "lxcnew", "up"]);
        assert_eq!(
            dp.attach_lxc(gone).expect("attach over severed pin"),
            AttachMode::ReplacedSevered
        );
        assert_eq!(
            dp.attach_lxc(gone).expect("attach again"),
            AttachMode::Adopted
        );
        assert!(dp.detach(Hook::Lxc, gone).expect("detach"));
        assert!(
            !dp.detach(Hook::Lxc, gone).expect("detach again"),
            "nothing left to detach"
        );
    });
}

/// A TCP server in pod `ns` that answers every connection with one byte,
/// until the returned flag is set.
fn tcp_greeter(ns: &str, ip: Ipv4Addr) -> (SocketAddr, Arc<AtomicBool>, thread::JoinHandle<()>) {
    let path = format!("/run/netns/{ns}");
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn({
        let stop = stop.clone();
        move || {
            enter_netns(&path);
            let listener = TcpListener::bind((ip, 0)).expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            tx.send(listener.local_addr().expect("addr"))
                .expect("send addr");
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.write_all(b"!");
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    });
    (rx.recv().expect("server address"), stop, handle)
}

/// Whether a TCP connection from the calling thread's namespace (or pod
/// `ns`'s, if given) to `addr` completes and carries the server's byte back.
fn tcp_reaches(ns: Option<&str>, addr: SocketAddr) -> bool {
    let path = ns.map(|ns| format!("/run/netns/{ns}"));
    thread::scope(|s| {
        s.spawn(|| {
            if let Some(path) = &path {
                enter_netns(path);
            }
            let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_millis(700)) else {
                return false;
            };
            conn.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut byte = [0u8; 1];
            conn.read_exact(&mut byte).is_ok() && byte == *b"!"
        })
        .join()
        .expect("client thread")
    })
}

#[test]
fn policy_map_entries_alone_decide_which_pods_and_the_node_may_connect() {
    if !privileged("policy_map_entries_alone_decide_which_pods_and_the_node_may_connect") {
        return;
    }
    const ID_A: u32 = 1000;
    const ID_B: u32 = 2000;
    const NODE_IP: &str = "10.200.0.1";
    let pins = PinDir::new();
    let topo = Topology::new();
    // The node reaches pods through its stack: an address, a route and a
    // neighbour per pod. What it sends leaves through lxc egress (to_container).
    run_ns(
        &topo.node.name,
        &["ip", "addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"],
    );
    for p in &topo.pods {
        let (ip, mac) = (p.ip.to_string(), p.mac.to_string());
        run_ns(
            &topo.node.name,
            &["ip", "route", "add", &ip, "dev", &p.lxc, "src", NODE_IP],
        );
        run_ns(
            &topo.node.name,
            &[
                "ip",
                "neigh",
                "add",
                &ip,
                "lladdr",
                &mac,
                "dev",
                &p.lxc,
                "nud",
                "permanent",
            ],
        );
    }
    let (a, b) = (&topo.pods[0], &topo.pods[1]);

    topo.node.run_in(|| {
        let (mut dp, _) = topo.load(&pins);
        for p in &topo.pods {
            assert_eq!(
                dp.attach_lxc_egress(p.lxc_ifindex)
                    .expect("attach to_container"),
                AttachMode::Fresh
            );
        }
        for ((ip, mut info), id) in topo.endpoints().zip([ID_A, ID_B]) {
            info.identity = id;
            dp.upsert_endpoint(ip, &info).expect("upsert with identity");
        }
        dp.upsert_ipcache(
            format!("{NODE_IP}/32").parse().expect("net"),
            identity::HOST,
        )
        .expect("ipcache");
        let (addr, stop, server) = tcp_greeter(&b.ns.name, b.ip);
        let allow = |peer, rule_id| PolicyEntry {
            endpoint_id: 2,
            direction: Direction::Ingress,
            proto: Some(6),
            peer_identity: Some(peer),
            ports: PortMatch::Range(addr.port(), addr.port()),
            verdict: Verdict::Allow,
            rule_id,
        };

        assert!(
            tcp_reaches(Some(&a.ns.name), addr),
            "no enforcement: pod A reaches B"
        );
        assert!(
            tcp_reaches(None, addr),
            "no enforcement: the node reaches B"
        );

        dp.set_endpoint_enforcement(b.ip, true, false)
            .expect("enforce");
        assert!(
            !tcp_reaches(Some(&a.ns.name), addr),
            "B ingress enforced, no rule: A is dropped"
        );
        assert!(
            !tcp_reaches(None, addr),
            "B ingress enforced, no rule: the node is dropped"
        );
        let drops = dp.endpoint_drops().expect("drops");
        assert!(
            drops
                .get(&(2, DropReason::PolicyDefaultDeny, Direction::Ingress))
                .copied()
                >= Some(2),
            "{drops:?}"
        );

        dp.replace_endpoint_policy(2, &[allow(ID_A, 1)])
            .expect("allow A");
        assert!(
            tcp_reaches(Some(&a.ns.name), addr),
            "allowed from A's identity"
        );
        assert!(!tcp_reaches(None, addr), "still nothing for identity host");

        dp.replace_endpoint_policy(2, &[allow(ID_A, 1), allow(identity::HOST, 2)])
            .expect("allow host");
        assert!(
            tcp_reaches(None, addr),
            "allowed from identity host, through to_container"
        );

        dp.replace_endpoint_policy(
            2,
            &[
                allow(ID_A, 1),
                allow(identity::HOST, 2),
                PolicyEntry {
                    peer_identity: None,
                    verdict: Verdict::Deny,
                    ..allow(0, 3)
                },
            ],
        )
        .expect("deny all on the port");
        assert!(
            !tcp_reaches(Some(&a.ns.name), addr),
            "a deny for any peer beats the allows"
        );
        assert!(!tcp_reaches(None, addr));
        let drops = dp.endpoint_drops().expect("drops");
        assert!(
            drops
                .get(&(2, DropReason::PolicyDeny, Direction::Ingress))
                .copied()
                >= Some(2),
            "{drops:?}"
        );
        let m = dp.metrics().expect("metrics");
        assert!(m.to_container.packets > 0, "{m:?}");

        stop.store(true, Ordering::Relaxed);
        server.join().expect("server");
        for p in &topo.pods {
            assert!(
                dp.detach(Hook::LxcEgress, p.lxc_ifindex)
                    .expect("detach egress")
            );
            assert!(dp.detach(Hook::Lxc, p.lxc_ifindex).expect("detach"));
        }
    });
}

#[test]
fn with_source_verification_a_pod_sending_from_another_address_is_dropped() {
    if !privileged("with_source_verification_a_pod_sending_from_another_address_is_dropped") {
        return;
    }
    let pins = PinDir::new();
    let topo = Topology::new();
    // Pod a also holds .12, no endpoint's address.
    let a = &topo.pods[0].ns.name;
    run_ns(a, &["ip", "addr", "add", "10.200.1.12/32", "dev", "eth0"]);
    topo.node.run_in(|| {
        let config = LoadConfig {
            verify_source: true,
            ..LoadConfig::default()
        };
        let (dp, _) = topo.load_with(&pins, &config);
        let ping = |src: &str, dst: &str| {
            let args = [
                "ping", "-n", "-c", "2", "-i", "0.2", "-W", "1", "-I", src, dst,
            ];
            ping_counts(&in_ns(a, &args).output().expect("ping")).1
        };
        let spoofed = || {
            dp.metrics()
                .expect("metrics")
                .drops
                .get(&DropReason::InvalidSource)
                .map(|c| c.packets)
                .unwrap_or(0)
        };
        assert_eq!(
            ping("10.200.1.10", "10.200.1.11"),
            2,
            "its own address passes"
        );
        assert_eq!(spoofed(), 0);
        assert_eq!(
            ping("10.200.1.12", "10.200.1.11"),
            0,
            "an address no endpoint has"
        );
        assert_eq!(spoofed(), 2);
        // Pod b's own address, taken by pod a (on its loopback, towards an
        // address that is nobody's so the packet leaves by eth0).
        run_ns(a, &["ip", "addr", "add", "10.200.1.11/32", "dev", "lo"]);
        assert_eq!(
            ping("10.200.1.11", "10.200.1.99"),
            0,
            "pod b's address, from pod a"
        );
        assert_eq!(spoofed(), 4);
    });
}
