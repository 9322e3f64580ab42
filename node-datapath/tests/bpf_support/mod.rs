// SPDX-License-Identifier: Apache-2.0
//! Fixtures shared by the eBPF tests: the root gate, a bpffs pin directory,
//! packet builders, and network namespaces that clean up after themselves.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    fs,
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use membrane_node_datapath::bpf::{self, MacAddr};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether a privileged test may run. Not root: a loud skip, unless
/// `CI=true`, where skipping would hide a broken pipeline, so it fails.
pub fn privileged(test: &str) -> bool {
    let euid_is_root = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false);
    if euid_is_root {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} needs root, and CI=true forbids skipping it");
    }
    // Written to the raw stderr handle: libtest captures `eprintln!` of
    // passing tests, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n==== SKIPPED (needs root): {test} ====\n"
    );
    false
}

/// A pin directory on bpffs, removed (with every pin inside) on drop.
pub struct PinDir(PathBuf);

impl PinDir {
    pub fn new() -> Self {
        bpf::ensure_bpffs().expect("mount bpffs");
        let dir = Path::new(bpf::BPFFS_PATH).join(unique("membrane-test-"));
        fs::create_dir_all(&dir).expect("create pin dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// === packets ===

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

pub struct Ipv4Frame {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub ttl: u8,
}

impl Ipv4Frame {
    /// Ethernet + IPv4 (valid header checksum) + a 20-byte TCP header.
    pub fn tcp(&self, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[12] = 5 << 4; // data offset: 5 words
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        self.with_l4(6, &tcp)
    }

    /// An ICMP echo request with the given id.
    pub fn icmp_echo(&self, id: u16) -> Vec<u8> {
        let mut icmp = vec![0u8; 8];
        icmp[0] = 8;
        icmp[4..6].copy_from_slice(&id.to_be_bytes());
        self.with_l4(1, &icmp)
    }

    pub fn with_l4(&self, proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(34 + l4.len());
        f.extend_from_slice(&self.dst_mac.0);
        f.extend_from_slice(&self.src_mac.0);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = self.ttl;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&self.saddr.octets());
        ip[16..20].copy_from_slice(&self.daddr.octets());
        let csum = ipv4_checksum(&ip);
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(l4);
        f
    }
}

/// The Internet checksum of an IPv4 header whose checksum field is zero;
/// over a header with its checksum filled in, a valid one sums to 0.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn dst_mac(frame: &[u8]) -> MacAddr {
    MacAddr(frame[0..6].try_into().expect("6 bytes"))
}

pub fn src_mac(frame: &[u8]) -> MacAddr {
    MacAddr(frame[6..12].try_into().expect("6 bytes"))
}

pub fn ttl(frame: &[u8]) -> u8 {
    frame[14 + 8]
}

// === commands and namespaces ===

/// Runs a command, panicking with its output if it fails.
pub fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A command inside a network namespace, entering only the network
/// namespace (not `ip netns exec`, which remounts /sys and hides bpffs).
pub fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}")).args(args);
    cmd
}

/// A named network namespace, deleted on drop (even when the test panics),
/// which also deletes the veths inside it.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> Self {
        let name = unique(&format!("mbt-{role}-"));
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// Runs `f` on a thread that entered this namespace; threads it spawns
    /// inherit the namespace. Panics propagate.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                enter_netns(&path);
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// The index of interface `name` in this namespace.
    pub fn ifindex(&self, name: &str) -> u32 {
        let out = run(&["ip", "-n", &self.name, "-o", "link", "show", "dev", name]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .unwrap_or_else(|| panic!("ifindex of {name}: {text}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &str) {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {path}: {e}"));
}

/// Link-local gateway every test pod routes through (as Cilium's pods do).
pub const GATEWAY: &str = "169.254.1.1";

/// A pod namespace wired to a node namespace by a veth pair.
pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    /// Node-side veth.
    pub lxc: String,
    pub lxc_mac: MacAddr,
    pub lxc_ifindex: u32,
}

/// Creates pod namespace `<prefix>pod<name>` with `ip`/32, its veth
/// `<prefix>lxc<name>` in `node`, the gateway route and a static neighbour
/// for the gateway; `n` makes the MACs unique.
pub fn add_pod(node: &Netns, prefix: &str, name: &str, ip: Ipv4Addr, n: u8) -> Pod {
    let ns = Netns::new(&format!("{prefix}pod{name}"));
    let lxc = format!("{prefix}lxc{name}");
    let lxc_mac = MacAddr([0x02, 0, 0, 0, n, 0x01]);
    let mac = MacAddr([0x02, 0, 0, 0, n, 0x02]);
    let (lxc_mac_s, mac_s, ip_s) = (lxc_mac.to_string(), mac.to_string(), format!("{ip}/32"));
    let node_ip = |args: &[&str]| run(&[&["ip", "-n", &node.name], args].concat());
    let pod_ip = |args: &[&str]| run(&[&["ip", "-n", &ns.name], args].concat());
    node_ip(&[
        "link", "add", &lxc, "address", &lxc_mac_s, "type", "veth", "peer", "name", "eth0",
        "address", &mac_s, "netns", &ns.name,
    ]);
    node_ip(&["link", "set", &lxc, "up"]);
    pod_ip(&["link", "set", "eth0", "up"]);
    pod_ip(&["addr", "add", &ip_s, "dev", "eth0"]);
    pod_ip(&["route", "add", GATEWAY, "dev", "eth0", "scope", "link"]);
    pod_ip(&["route", "add", "default", "via", GATEWAY, "dev", "eth0"]);
    pod_ip(&[
        "neigh",
        "add",
        GATEWAY,
        "lladdr",
        &lxc_mac_s,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    let lxc_ifindex = node.ifindex(&lxc);
    Pod {
        ns,
        ip,
        mac,
        lxc,
        lxc_mac,
        lxc_ifindex,
    }
}
