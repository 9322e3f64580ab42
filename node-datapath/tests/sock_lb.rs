// SPDX-License-Identifier: Apache-2.0
//! Privileged test of socket-level load balancing (`bpf_sock`): the programs
//! attached to a test cgroup v2 (`<unified>/mbt-socklb-*`), connects made by
//! this process after it moved into a child cgroup (the "pod"), backends
//! served by listeners in a test network namespace (`mbt-socklb-*`).
//!
//! One test function: the process moves between cgroups, which would
//! affect any test running beside it in this binary.

mod bpf_support;

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use bpf_support::*;
use membrane_lb::maglev::{self, Seed, TableSize, Weighted};
use membrane_node_datapath::bpf::{
    LbAlgorithm, LbBackend, LbFrontend, LbProtocol, LbService, SockLb,
};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, getpeername, setsockopt, socket,
    sockopt,
};

const UNIFIED: &str = "/sys/fs/cgroup/unified";
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const B1: Ipv4Addr = Ipv4Addr::new(10, 244, 99, 1);
const B2: Ipv4Addr = Ipv4Addr::new(10, 244, 99, 2);
const SERVICE_ID: u32 = 7;

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

/// Connected UDP from source port `sport`: which backend connect() chose.
fn udp_connect_backend(sport: u16, port: u16) -> Ipv4Addr {
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
    let peer: SockaddrIn = getpeername(std::os::fd::AsRawFd::as_raw_fd(&fd)).expect("peer");
    peer.ip()
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

#[test]
fn socket_lb_spreads_connects_over_backends_drops_removed_ones_and_refuses_empty_services() {
    if !privileged("socket_lb") {
        return;
    }
    let Some(cg) = TestCgroup::new() else { return };
    let pins = PinDir::new();
    let ns = Netns::new("socklb");
    run(&[
        "ip",
        "-n",
        &ns.name,
        "addr",
        "add",
        "10.244.99.1/32",
        "dev",
        "lo",
    ]);
    run(&[
        "ip",
        "-n",
        &ns.name,
        "addr",
        "add",
        "10.244.99.2/32",
        "dev",
        "lo",
    ]);

    let tcp = LbFrontend {
        address: CLUSTER_IP,
        port: 80,
        protocol: LbProtocol::Tcp,
    };
    let udp = LbFrontend {
        address: CLUSTER_IP,
        port: 53,
        protocol: LbProtocol::Udp,
    };
    let maglev_svc = LbService {
        service_id: SERVICE_ID,
        algorithm: LbAlgorithm::Maglev,
        target_port: 8080,
        hash_source_address_only: false,
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
        lb.upsert_service(tcp, maglev_svc).expect("tcp service");
        lb.upsert_service(
            udp,
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

    ns.run_in(|| {
        for a in [B1, B2] {
            serve_tcp(TcpListener::bind((a, 8080)).expect("listen"));
            serve_udp(UdpSocket::bind((a, 5353)).expect("bind udp"));
        }
        cg.enter_child();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // Not a service: untouched.
            let mut direct = TcpStream::connect((B2, 8080)).expect("direct connect");
            let mut b = [0u8; 1];
            direct.read_exact(&mut b).expect("direct answer");
            assert_eq!(b[0], 2);

            // Maglev, unbound sockets (per-connect random stand-in port).
            let mut seen = [0usize; 3];
            for _ in 0..100 {
                seen[tcp_backend(80) as usize] += 1;
            }
            assert!(seen[1] > 0 && seen[2] > 0, "maglev reaches both: {seen:?}");

            // Maglev with bound source ports: both backends over the
            // ports, and the same port always picks the same backend.
            let mut by_port = [0usize; 2];
            for sport in 40000..40100u16 {
                let first = udp_connect_backend(sport, 53);
                assert_eq!(udp_connect_backend(sport, 53), first, "sport {sport}");
                by_port[usize::from(first == B2)] += 1;
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
                tcp,
                LbService {
                    algorithm: LbAlgorithm::Random,
                    ..maglev_svc
                },
            )
            .expect("random");
            lb.set_table(SERVICE_ID, &[1, 2]).expect("random table");
            let mut seen = [0usize; 3];
            for _ in 0..100 {
                seen[tcp_backend(80) as usize] += 1;
            }
            assert!(seen[1] > 0 && seen[2] > 0, "random reaches both: {seen:?}");

            // Backend 2 removed: never chosen again (maglev and random).
            lb.set_table(SERVICE_ID, &maglev_table(&[(1, B1)]))
                .expect("table without 2");
            lb.remove_backend(2).expect("remove backend");
            lb.upsert_service(tcp, maglev_svc).expect("maglev again");
            for _ in 0..100 {
                assert_eq!(tcp_backend(80), 1, "removed backend chosen (maglev)");
            }
            for sport in 41000..41050u16 {
                assert_eq!(udp_connect_backend(sport, 53), B1);
            }

            // No backends: refused at once.
            lb.set_table(SERVICE_ID, &[]).expect("empty table");
            let started = Instant::now();
            let err = TcpStream::connect_timeout(
                &SocketAddr::from((CLUSTER_IP, 80)),
                Duration::from_secs(5),
            )
            .expect_err("a service without backends must refuse");
            assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED), "{err}");
            assert!(started.elapsed() < Duration::from_millis(500));
            let err = client
                .send_to(b"hi", (CLUSTER_IP, 53))
                .expect_err("sendmsg refused too");
            assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED), "{err}");

            // Service removed: its address is no longer translated.
            lb.remove_service(tcp).expect("remove");
            lb.remove_table(SERVICE_ID).expect("remove table");
            assert!(
                TcpStream::connect_timeout(
                    &SocketAddr::from((CLUSTER_IP, 80)),
                    Duration::from_millis(300)
                )
                .is_err()
            );
        }));
        cg.leave();
        if let Err(p) = outcome {
            std::panic::resume_unwind(p);
        }
    });
    assert!(lb.detach(&cg.parent).expect("detach"), "links were pinned");
}
