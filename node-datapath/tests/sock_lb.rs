// SPDX-License-Identifier: Apache-2.0
//! Privileged tests of socket-level load balancing (`bpf_sock`): the programs
//! attached to a test cgroup v2 (`<unified>/mbt-socklb-*`), connects made by
//! this process after it moved into a child cgroup (the "pod"), backends
//! served by listeners in a test network namespace (`mbt-socklb-*`), which
//! is also the pod's network namespace (its cookie is the client of session
//! affinity).
//!
//! The tests take turns ([`serial`]): each moves the whole process between
//! cgroups, which would affect any test running beside it in this binary.

mod bpf_support;

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use bpf_support::*;
use membrane_lb::maglev::{self, Seed, TableSize, Weighted};
use membrane_node_datapath::bpf::{
    LbAlgorithm, LbBackend, LbFrontend, LbProtocol, LbService, MAX_TABLE_SLOTS, ServiceIds, SockLb,
    SockLbError, TableBatching,
};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
};

const UNIFIED: &str = "/sys/fs/cgroup/unified";
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const B1: Ipv4Addr = Ipv4Addr::new(10, 244, 99, 1);
const B2: Ipv4Addr = Ipv4Addr::new(10, 244, 99, 2);
const SERVICE_ID: u32 = 7;
const TCP: LbFrontend = LbFrontend {
    address: CLUSTER_IP,
    port: 80,
    protocol: LbProtocol::Tcp,
};
const UDP: LbFrontend = LbFrontend {
    address: CLUSTER_IP,
    port: 53,
    protocol: LbProtocol::Udp,
};
/// Random (so that without affinity a pod's connects visibly spread),
/// with ClientIP affinity.
const AFFINE: LbService = LbService {
    service_id: SERVICE_ID,
    algorithm: LbAlgorithm::Random,
    target_port: 8080,
    hash_source_address_only: false,
    affinity_timeout_secs: 60,
};

/// One test at a time moves this process between cgroups.
fn serial() -> MutexGuard<'static, ()> {
    static CGROUPS: Mutex<()> = Mutex::new(());
    // A test that panicked while holding it poisons it; the next may go on.
    CGROUPS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A cgroup v2 directory with a child; on drop moves this process back to
/// where it was and removes both.
struct TestCgroup {
    parent: PathBuf,
    child: PathBuf,
    home: PathBuf,
}

impl TestCgroup {
    fn new() -> Option<Self> {
        let is_v2 = nix::sys::statfs::statfs(UNIFIED)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC);
        if !is_v2 {
            let _ = writeln!(
                std::io::stderr(),
                "\n==== SKIPPED: no cgroup v2 at {UNIFIED} ====\n"
            );
            return None;
        }
        let own = fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("/")
            .trim_start_matches('/')
            .to_owned();
        let parent = Path::new(UNIFIED).join(unique("mbt-socklb-"));
        let child = parent.join("pod");
        fs::create_dir_all(&child).expect("create test cgroups");
        Some(Self {
            parent,
            child,
            home: Path::new(UNIFIED).join(rel),
        })
    }

    fn enter_child(&self) {
        fs::write(
            self.child.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .expect("move into the child cgroup");
    }

    fn leave(&self) {
        let _ = fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        self.leave();
        let _ = fs::remove_dir(&self.child);
        let _ = fs::remove_dir(&self.parent);
    }
}

/// Serves `addr`: each accepted connection gets one byte, the backend's last octet.
fn serve_tcp(listener: TcpListener) {
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let SocketAddr::V4(local) = s.local_addr().expect("local") else {
                return;
            };
            let _ = s.write_all(&[local.ip().octets()[3]]);
        }
    });
}

/// Echoes datagrams prefixed with the backend's last octet.
fn serve_udp(socket: UdpSocket) {
    thread::spawn(move || {
        let mut buf = [0u8; 64];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                return;
            };
            let SocketAddr::V4(local) = socket.local_addr().expect("local") else {
                return;
            };
            let mut reply = vec![local.ip().octets()[3]];
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from);
        }
    });
}

/// Connects to the ClusterIP and returns which backend answered (last octet).
fn tcp_backend(port: u16) -> u8 {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from((CLUSTER_IP, port)),
        Duration::from_secs(2),
    )
    .expect("connect to the ClusterIP");
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).expect("backend answers");
    b[0]
}

/// A UDP socket bound to source port `sport` and connected to the
/// ClusterIP.
fn udp_connected(sport: u16, port: u16) -> UdpSocket {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::empty(),
        None,
    )
    .expect("socket");
    setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, sport)),
    )
    .expect("bind the source port");
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(CLUSTER_IP, port)),
    )
    .expect("connect UDP");
    let socket = UdpSocket::from(fd);
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    socket
}

/// Which backend (last octet) answers a datagram on a connected socket.
fn udp_echo_backend(socket: &UdpSocket) -> u8 {
    socket.send(b"hi").expect("send");
    let mut buf = [0u8; 16];
    let n = socket.recv(&mut buf).expect("reply");
    assert_eq!(&buf[1..n], b"hi");
    buf[0]
}

/// Connected UDP from source port `sport`: which backend connect() chose
/// (last octet).
fn udp_connect_backend(sport: u16, port: u16) -> u8 {
    udp_echo_backend(&udp_connected(sport, port))
}

fn maglev_table(backends: &[(u32, Ipv4Addr)]) -> Vec<u32> {
    let weighted: Vec<Weighted> = backends
        .iter()
        .map(|(_, a)| Weighted {
            address: *a,
            weight: 1,
        })
        .collect();
    let t = maglev::build(
        &weighted,
        Seed::from_bytes(*b"membrane-lb!"),
        TableSize::new("m", 251).expect("251 is a table size"),
    );
    t.slots
        .iter()
        .map(|i| {
            let addr = t.backends[*i as usize].address;
            backends.iter().find(|(_, a)| *a == addr).expect("known").0
        })
        .collect()
}

/// A network namespace where B1 and B2 serve TCP 8080 and UDP 5353; the
/// pod's namespace as well.
fn backends_netns() -> Netns {
    let ns = Netns::new("socklb");
    for a in [B1, B2] {
        run(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{a}/32"),
            "dev",
            "lo",
        ]);
    }
    ns.run_in(|| {
        for a in [B1, B2] {
            serve_tcp(TcpListener::bind((a, 8080)).expect("listen"));
            serve_udp(UdpSocket::bind((a, 5353)).expect("bind udp"));
        }
    });
    ns
}

/// Runs `f` as the pod: in `ns`, with this process in the child cgroup;
/// back in its own cgroup afterwards, even when `f` panics.
fn in_pod<T: Send>(ns: &Netns, cg: &TestCgroup, f: impl FnOnce() -> T + Send) -> T {
    ns.run_in(|| {
        cg.enter_child();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        cg.leave();
        outcome.unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// How often each backend (by last octet) answered `n` picks.
fn tally(n: usize, mut pick: impl FnMut() -> u8) -> [usize; 3] {
    let mut seen = [0; 3];
    for _ in 0..n {
        seen[usize::from(pick())] += 1;
    }
    seen
}

/// `n` TCP connects to the ClusterIP, every one answered by `backend`.
fn assert_every_connect_reaches(backend: u8, n: usize) {
    let seen = tally(n, || tcp_backend(80));
    assert_eq!(seen[usize::from(backend)], n, "all to {backend}: {seen:?}");
}

/// A node: bpf_sock attached to a test cgroup, backends 1 (B1) and 2 (B2)
/// serving in the pod's namespace, and one service over both with a TCP
/// (80 → 8080) and a UDP (53 → 5353) frontend on the ClusterIP.
struct Node {
    lb: SockLb,
    ns: Netns,
    cg: TestCgroup,
    _pins: PinDir,
    _serial: MutexGuard<'static, ()>,
}

impl Node {
    /// `None`: skipped (not root, or no cgroup v2).
    fn new(test: &str, service: LbService) -> Option<Self> {
        if !privileged(test) {
            return None;
        }
        let serial = serial();
        let cg = TestCgroup::new()?;
        let pins = PinDir::new();
        let ns = backends_netns();
        let mut lb = SockLb::load(pins.path()).expect("load bpf_sock");
        for (id, address) in [(1, B1), (2, B2)] {
            lb.upsert_backend(id, LbBackend { address, port: 0 })
                .expect("backend");
        }
        lb.set_table(SERVICE_ID, &table(service.algorithm, &[(1, B1), (2, B2)]))
            .expect("table");
        lb.upsert_service(TCP, service).expect("tcp frontend");
        lb.upsert_service(
            UDP,
            LbService {
                target_port: 5353,
                ..service
            },
        )
        .expect("udp frontend");
        lb.attach(&cg.parent).expect("attach to the node cgroup");
        Some(Self {
            lb,
            ns,
            cg,
            _pins: pins,
            _serial: serial,
        })
    }

    /// Runs `f` as the pod, with the loader at hand to reprogram the maps.
    fn in_pod<T: Send>(&mut self, f: impl FnOnce(&mut SockLb) -> T + Send) -> T {
        let Self { lb, ns, cg, .. } = self;
        in_pod(ns, cg, || f(lb))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.lb.detach(&self.cg.parent);
    }
}

/// The table of `algorithm` over `backends`.
fn table(algorithm: LbAlgorithm, backends: &[(u32, Ipv4Addr)]) -> Vec<u32> {
    match algorithm {
        LbAlgorithm::Random => backends.iter().map(|(id, _)| *id).collect(),
        LbAlgorithm::Maglev => maglev_table(backends),
    }
}

#[test]
fn socket_lb_spreads_connects_over_backends_drops_removed_ones_and_refuses_empty_services() {
    if !privileged("socket_lb") {
        return;
    }
    let _serial = serial();
    let Some(cg) = TestCgroup::new() else { return };
    let pins = PinDir::new();
    let ns = backends_netns();

    let maglev_svc = LbService {
        algorithm: LbAlgorithm::Maglev,
        affinity_timeout_secs: 0,
        ..AFFINE
    };

    // Load, program, attach; then drop the loader: the pinned links keep
    // the hooks (an agent restart), and a second load adopts the maps.
    {
        let mut lb = SockLb::load(pins.path()).expect("load bpf_sock");
        for (id, a) in [(1, B1), (2, B2)] {
            lb.upsert_backend(
                id,
                LbBackend {
                    address: a,
                    port: 0,
                },
            )
            .expect("backend");
        }
        lb.upsert_service(TCP, maglev_svc).expect("tcp service");
        lb.upsert_service(
            UDP,
            LbService {
                target_port: 5353,
                ..maglev_svc
            },
        )
        .expect("udp service");
        lb.set_table(SERVICE_ID, &maglev_table(&[(1, B1), (2, B2)]))
            .expect("table");
        lb.attach(&cg.parent).expect("attach to the node cgroup");
        lb.attach(&cg.parent)
            .expect("attach again (replaces the pinned links)");
    }
    let mut lb = SockLb::load(pins.path()).expect("reload bpf_sock");
    assert_eq!(lb.services().expect("services").len(), 2, "maps adopted");
    assert_eq!(
        lb.table(SERVICE_ID).expect("table").map(|t| t.len()),
        Some(251)
    );

    in_pod(&ns, &cg, || {
        // Not a service: untouched.
        let mut direct = TcpStream::connect((B2, 8080)).expect("direct connect");
        let mut b = [0u8; 1];
        direct.read_exact(&mut b).expect("direct answer");
        assert_eq!(b[0], 2);

        // Maglev, unbound sockets (per-connect random stand-in port).
        let seen = tally(100, || tcp_backend(80));
        assert!(seen[1] > 0 && seen[2] > 0, "maglev reaches both: {seen:?}");

        // Maglev with bound source ports: both backends over the
        // ports, and the same port always picks the same backend.
        let mut by_port = [0usize; 2];
        for sport in 40000..40100u16 {
            let first = udp_connect_backend(sport, 53);
            assert_eq!(udp_connect_backend(sport, 53), first, "sport {sport}");
            by_port[usize::from(first == 2)] += 1;
        }
        assert!(
            by_port[0] > 0 && by_port[1] > 0,
            "ports spread: {by_port:?}"
        );

        // Unconnected UDP: sendmsg picks a backend, recvmsg shows the frontend.
        let client = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("client");
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        client.send_to(b"hi", (CLUSTER_IP, 53)).expect("send");
        let mut buf = [0u8; 16];
        let (n, from) = client.recv_from(&mut buf).expect("reply");
        assert_eq!(&buf[1..n], b"hi");
        assert!(buf[0] == 1 || buf[0] == 2);
        assert_eq!(
            from,
            SocketAddr::from((CLUSTER_IP, 53)),
            "reverse translated"
        );

        // Random.
        lb.upsert_service(
            TCP,
            LbService {
                algorithm: LbAlgorithm::Random,
                ..maglev_svc
            },
        )
        .expect("random");
        lb.set_table(SERVICE_ID, &[1, 2]).expect("random table");
        let seen = tally(100, || tcp_backend(80));
        assert!(seen[1] > 0 && seen[2] > 0, "random reaches both: {seen:?}");

        // Backend 2 removed: never chosen again (maglev and random).
        lb.set_table(SERVICE_ID, &maglev_table(&[(1, B1)]))
            .expect("table without 2");
        lb.remove_backend(2).expect("remove backend");
        lb.upsert_service(TCP, maglev_svc).expect("maglev again");
        for _ in 0..100 {
            assert_eq!(tcp_backend(80), 1, "removed backend chosen (maglev)");
        }
        for sport in 41000..41050u16 {
            assert_eq!(udp_connect_backend(sport, 53), 1);
        }

        // No backends: refused at once.
        lb.set_table(SERVICE_ID, &[]).expect("empty table");
        let started = Instant::now();
        let err =
            TcpStream::connect_timeout(&SocketAddr::from((CLUSTER_IP, 80)), Duration::from_secs(5))
                .expect_err("a service without backends must refuse");
        assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED), "{err}");
        assert!(started.elapsed() < Duration::from_millis(500));
        let err = client
            .send_to(b"hi", (CLUSTER_IP, 53))
            .expect_err("sendmsg refused too");
        assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED), "{err}");

        // Service removed: its address is no longer translated.
        lb.remove_service(TCP).expect("remove");
        lb.remove_table(SERVICE_ID).expect("remove table");
        assert!(
            TcpStream::connect_timeout(
                &SocketAddr::from((CLUSTER_IP, 80)),
                Duration::from_millis(300)
            )
            .is_err()
        );
    });
    assert!(lb.detach(&cg.parent).expect("detach"), "links were pinned");
}

#[test]
fn with_client_ip_affinity_a_pods_connections_stick_to_one_backend_until_the_timeout_passes() {
    let timeout = Duration::from_secs(1);
    let Some(mut node) = Node::new(
        "with_client_ip_affinity_a_pods_connections_stick_to_one_backend_until_the_timeout_passes",
        LbService {
            affinity_timeout_secs: 1,
            ..AFFINE
        },
    ) else {
        return;
    };
    node.in_pod(|_| {
        // Random would spread these; affinity keeps every one, TCP and UDP
        // frontends of the service alike, on the first one's backend.
        let first = tcp_backend(80);
        assert_every_connect_reaches(first, 50);
        for sport in 42000..42010u16 {
            assert_eq!(udp_connect_backend(sport, 53), first, "connected UDP");
        }
        let unconnected = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("client");
        unconnected
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        for _ in 0..10 {
            unconnected.send_to(b"hi", (CLUSTER_IP, 53)).expect("send");
            let mut buf = [0u8; 16];
            unconnected.recv_from(&mut buf).expect("reply");
            assert_eq!(buf[0], first, "unconnected UDP");
        }

        // Each use refreshed the entry; once it is older than the timeout
        // the next connection is load-balanced afresh (and sticks again).
        let mut after_expiry = [0usize; 3];
        for _ in 0..16 {
            thread::sleep(timeout + Duration::from_millis(300));
            let fresh = tcp_backend(80);
            assert_eq!(tcp_backend(80), fresh, "sticks again at once");
            after_expiry[usize::from(fresh)] += 1;
            if after_expiry[1] > 0 && after_expiry[2] > 0 {
                break;
            }
        }
        assert!(
            after_expiry[1] > 0 && after_expiry[2] > 0,
            "choices spread again after the timeout: {after_expiry:?}"
        );
    });
}

#[test]
fn a_backend_removed_from_the_table_is_never_chosen_again_even_by_a_live_affinity_entry() {
    let Some(mut node) = Node::new(
        "a_backend_removed_from_the_table_is_never_chosen_again_even_by_a_live_affinity_entry",
        AFFINE,
    ) else {
        return;
    };
    node.in_pod(|lb| {
        let first = tcp_backend(80);
        let (first_id, other_id) = (u32::from(first), 3 - u32::from(first));
        let other = 3 - first;

        // Out of the table but still a backend (draining, or a backend of
        // another service too): the live entry (60 s) must not be used.
        lb.set_table(SERVICE_ID, &[other_id])
            .expect("table without it");
        assert_eq!(lb.backends().expect("backends").len(), 2);
        assert_every_connect_reaches(other, 50);

        // Back in the table: the pod's entry now names the other backend.
        lb.set_table(SERVICE_ID, &[1, 2]).expect("both again");
        assert_every_connect_reaches(other, 50);

        // The other one gone from table and backends: the first again.
        lb.set_table(SERVICE_ID, &[first_id])
            .expect("only the first");
        lb.remove_backend(other_id).expect("remove backend");
        assert_every_connect_reaches(first, 50);
        for sport in 42100..42110u16 {
            assert_eq!(udp_connect_backend(sport, 53), first);
        }
    });
}

#[test]
fn without_affinity_a_pods_connections_spread_over_the_backends() {
    let Some(mut node) = Node::new(
        "without_affinity_a_pods_connections_spread_over_the_backends",
        AFFINE,
    ) else {
        return;
    };
    node.in_pod(|lb| {
        // On: stuck to the first connection's backend.
        assert_every_connect_reaches(tcp_backend(80), 30);

        // Off (timeout 0) while the pod's entry is live: random again.
        for frontend in [TCP, UDP] {
            let mut service = lb
                .services()
                .expect("services")
                .into_iter()
                .find(|(f, _)| *f == frontend)
                .expect("programmed")
                .1;
            service.affinity_timeout_secs = 0;
            lb.upsert_service(frontend, service).expect("affinity off");
        }
        let seen = tally(100, || tcp_backend(80));
        assert!(seen[1] > 0 && seen[2] > 0, "spread: {seen:?}");
        let seen = tally(100, || udp_echo_backend(&udp_connected(0, 53)));
        assert!(seen[1] > 0 && seen[2] > 0, "spread (UDP): {seen:?}");
    });
}

#[test]
fn getpeername_of_a_connected_socket_is_the_cluster_ip_while_the_data_comes_from_a_backend() {
    let Some(mut node) = Node::new(
        "getpeername_of_a_connected_socket_is_the_cluster_ip_while_the_data_comes_from_a_backend",
        LbService {
            algorithm: LbAlgorithm::Maglev,
            affinity_timeout_secs: 0,
            ..AFFINE
        },
    ) else {
        return;
    };
    node.in_pod(|_| {
        let frontend_tcp = SocketAddr::from((CLUSTER_IP, 80));
        let frontend_udp = SocketAddr::from((CLUSTER_IP, 53));
        let mut seen = [0usize; 3];
        for sport in 43000..43040u16 {
            let mut tcp =
                TcpStream::connect_timeout(&frontend_tcp, Duration::from_secs(2)).expect("connect");
            assert_eq!(tcp.peer_addr().expect("getpeername"), frontend_tcp);
            let mut b = [0u8; 1];
            tcp.read_exact(&mut b).expect("backend answers");
            seen[usize::from(b[0])] += 1;

            let udp = udp_connected(sport, 53);
            assert_eq!(udp.peer_addr().expect("getpeername"), frontend_udp);
            let backend = udp_echo_backend(&udp);
            seen[usize::from(backend)] += 1;
            // recvmsg on the connected socket names the frontend too.
            udp.send(b"hi").expect("send");
            let mut buf = [0u8; 16];
            let (_, from) = udp.recv_from(&mut buf).expect("reply");
            assert_eq!((buf[0], from), (backend, frontend_udp));
        }
        assert!(seen[1] > 0 && seen[2] > 0, "both backends served: {seen:?}");

        // Not a service: the real peer.
        let direct = TcpStream::connect((B2, 8080)).expect("direct connect");
        assert_eq!(
            direct.peer_addr().expect("getpeername"),
            SocketAddr::from((B2, 8080))
        );
    });
}

/// A table that says whose it is and which version: slot s of service
/// `id`, version `v`, is `id * 1000 + v * 100 + s % 7`.
fn numbered_table(id: u32, version: u32) -> Vec<u32> {
    (0..251)
        .map(|s| id * 1000 + version * 100 + s % 7)
        .collect()
}

#[test]
fn a_batch_of_tables_is_read_back_whole_and_a_failing_batch_names_the_tables_it_left_as_they_were()
{
    if !privileged("sock_lb_batch") {
        return;
    }
    // Batched (more tables than one outer batch holds, the failure in the
    // second batch), and the per-element path of kernels without batches.
    for (batching, n, failing) in [(None, 520, 515), (Some(TableBatching::NONE), 20, 15)] {
        let pins = PinDir::new();
        let mut lb = SockLb::load(pins.path()).expect("load bpf_sock");
        match batching {
            Some(b) => lb.set_table_batching(b),
            None => assert_eq!(
                lb.table_batching(),
                TableBatching {
                    fill: true,
                    swap: true,
                    remove: true
                },
                "this kernel (>= 5.6) has batch commands for arrays and hash-of-maps"
            ),
        }
        let ids: Vec<u32> = (1..=n).collect();
        let old: Vec<Vec<u32>> = ids.iter().map(|id| numbered_table(*id, 1)).collect();
        let batch: Vec<(u32, &[u32])> = ids
            .iter()
            .copied()
            .zip(old.iter().map(|t| &t[..]))
            .collect();
        lb.set_tables(&batch).expect("first tables");
        for (id, t) in &batch {
            assert_eq!(
                lb.table(*id).expect("read").as_deref(),
                Some(*t),
                "service {id}"
            );
        }

        // The new tables; one of them too large to be built.
        let mut new: Vec<Vec<u32>> = ids.iter().map(|id| numbered_table(*id, 2)).collect();
        new[failing] = vec![1; MAX_TABLE_SLOTS + 1];
        let batch: Vec<(u32, &[u32])> = ids
            .iter()
            .copied()
            .zip(new.iter().map(|t| &t[..]))
            .collect();
        match lb.set_tables(&batch) {
            Err(SockLbError::TablesNotApplied {
                not_applied,
                total,
                source,
            }) => {
                assert_eq!(not_applied, ServiceIds(ids[failing..].to_vec()));
                assert_eq!(total, ids.len());
                assert!(
                    matches!(*source, SockLbError::TableTooLarge { service_id, .. } if service_id == ids[failing]),
                    "{source}"
                );
            }
            other => panic!("expected TablesNotApplied, got {other:?}"),
        }
        for (i, id) in ids.iter().enumerate() {
            let want = if i < failing { &new[i] } else { &old[i] };
            assert_eq!(
                lb.table(*id).expect("read").as_ref(),
                Some(want),
                "service {id}"
            );
        }

        // A missing table in the middle of a removal is skipped.
        let removed = lb.remove_tables(&[1, 9999, 2, 3]).expect("remove");
        assert_eq!(removed, 3);
        for id in [1, 2, 3] {
            assert_eq!(lb.table(id).expect("read"), None);
        }
        assert_eq!(lb.table(4).expect("read"), Some(new[3].clone()));
    }
}
