// SPDX-License-Identifier: Apache-2.0
//! Per-packet cost of network policy in the datapath, measured in the kernel
//! with BPF_PROG_TEST_RUN (`repeat` runs of one frame; the kernel reports
//! the mean time per run). Needs root (CAP_BPF) and a bpffs.
//!
//! Configurations, each a fresh load into its own pin directory:
//! - policy compiled out (the verifier removed every policy branch);
//! - policy on, 10 policy map entries;
//! - policy on, 10,000 entries spread over 10 endpoints, many peers and ports.
//!
//! Paths measured:
//! - `bpf_lxc` (from_container): an established TCP packet from pod A to a
//!   pod on another node, with A's egress enforced and allowed by one
//!   entry: ct lookup, two identity resolutions, four policy lookups, to the
//!   stack. (Pod -> local pod would redirect, and the TTL the redirect
//!   decrements would expire across repeats, so the remote path is used.)
//! - `to_container`: an established TCP packet from the node to pod B with
//!   B's ingress enforced: the same work in the ingress direction.
//!
//! Run: `cargo run -p membrane-node-datapath --example policy_bench [repeat]`.
//! The programs run in the kernel, so the Rust build mode (debug/release)
//! only affects the setup, not the numbers.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use membrane_node_datapath::bpf::{
    self, Datapath, DatapathOptions, Direction, EndpointInfo, Hook, MacAddr, PolicyEntry,
    PolicyMode, PortMatch, TcVerdict, Verdict, identity,
};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 11);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 10);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 11);
const ID_A: u32 = 1000;
const ID_B: u32 = 2000;
const ID_REMOTE: u32 = 3000;
/// Measurements per configuration and path; the median is reported.
const ROUNDS: usize = 5;

struct Config {
    name: &'static str,
    policy: PolicyMode,
    /// Policy map entries to write (0 with policy compiled out).
    entries: usize,
}

/// One measured row.
struct Row {
    name: &'static str,
    entries: usize,
    lxc: Duration,
    to_container: Duration,
}

fn main() -> anyhow::Result<()> {
    let repeat: u32 = match std::env::args().nth(1) {
        Some(s) => s.parse().with_context(|| format!("repeat count `{s}`"))?,
        None => 1_000_000,
    };
    bpf::ensure_bpffs().context("mount bpffs")?;
    let configs = [
        Config {
            name: "policy compiled out",
            policy: PolicyMode::CompiledOut,
            entries: 0,
        },
        Config {
            name: "policy on, 10 entries",
            policy: PolicyMode::Enforced,
            entries: 10,
        },
        Config {
            name: "policy on, 10,000 entries",
            policy: PolicyMode::Enforced,
            entries: 10_000,
        },
    ];
    println!(
        "BPF_PROG_TEST_RUN, repeat {repeat}, median of {ROUNDS} rounds; setup built in {} mode \
         (the programs run in the kernel either way)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let mut rows = Vec::new();
    for config in &configs {
        rows.push(measure(config, repeat)?);
    }
    let base = &rows[0];
    println!(
        "\n{:<28} {:>9} {:>16} {:>8} {:>22} {:>8}",
        "configuration", "entries", "bpf_lxc ns/pkt", "ratio", "to_container ns/pkt", "ratio"
    );
    for r in &rows {
        println!(
            "{:<28} {:>9} {:>16} {:>8.2} {:>22} {:>8.2}",
            r.name,
            r.entries,
            r.lxc.as_nanos(),
            ratio(r.lxc, base.lxc),
            r.to_container.as_nanos(),
            ratio(r.to_container, base.to_container),
        );
    }
    Ok(())
}

fn ratio(x: Duration, base: Duration) -> f64 {
    x.as_nanos() as f64 / (base.as_nanos().max(1)) as f64
}

fn measure(config: &Config, repeat: u32) -> anyhow::Result<Row> {
    let pins = PinDir::new()?;
    let opts = DatapathOptions {
        redirect_peer: true,
        redirect_neigh: true,
    };
    let mut dp = Datapath::load_with_policy(pins.path(), &opts, config.policy)
        .with_context(|| format!("load datapath ({})", config.name))?;
    program(&mut dp, config.entries)?;

    let to_remote = tcp_frame(POD_A, REMOTE_POD, 40000, 443);
    let from_node = tcp_frame(NODE_IP, POD_B, 33000, 80);
    let lxc = median_run(&dp, Hook::Lxc, &to_remote, TcVerdict::Ok, repeat)?;
    let to_container = median_run(&dp, Hook::LxcEgress, &from_node, TcVerdict::Ok, repeat)?;
    let dropped = dp.metrics().context("metrics")?.dropped();
    if dropped != 0 {
        bail!(
            "{}: {dropped} packets dropped; the benchmark measures the allow path",
            config.name
        );
    }
    Ok(Row {
        name: config.name,
        entries: config.entries,
        lxc,
        to_container,
    })
}

/// Endpoints A and B (A egress and B ingress enforced), an ipcache of 1,024
/// prefixes, and `entries` policy entries of which exactly two match the
/// benchmark's packets.
fn program(dp: &mut Datapath, entries: usize) -> anyhow::Result<()> {
    for (ip, endpoint_id, id, flags) in [
        (POD_A, 1, ID_A, EndpointInfo::EGRESS_ENFORCED),
        (POD_B, 2, ID_B, EndpointInfo::INGRESS_ENFORCED),
    ] {
        let info = EndpointInfo {
            ifindex: 100 + endpoint_id,
            pod_mac: MacAddr([2, 0, 0, 0, endpoint_id as u8, 2]),
            node_mac: MacAddr([2, 0, 0, 0, endpoint_id as u8, 1]),
            endpoint_id,
            identity: id,
            flags,
        };
        dp.upsert_endpoint(ip, &info).context("upsert endpoint")?;
    }
    // Other nodes' pods: a /24 per node plus /32s, so lookups walk a real trie.
    for node in 0..64u8 {
        dp.upsert_ipcache(
            format!("10.201.{node}.0/24").parse()?,
            5000 + u32::from(node),
        )?;
        for pod in 1..16u8 {
            let id = 6000 + u32::from(node) * 16 + u32::from(pod);
            dp.upsert_ipcache(format!("10.201.{node}.{pod}/32").parse()?, id)?;
        }
    }
    dp.upsert_ipcache("10.200.2.0/24".parse()?, 4000)?;
    dp.upsert_ipcache(format!("{REMOTE_POD}/32").parse()?, ID_REMOTE)?;
    dp.upsert_ipcache(format!("{NODE_IP}/32").parse()?, identity::HOST)?;
    if entries == 0 {
        return Ok(());
    }

    let allow = |endpoint_id, direction, peer, port: u16, rule_id| PolicyEntry {
        endpoint_id,
        direction,
        proto: Some(6),
        peer_identity: Some(peer),
        ports: PortMatch::Range(port, port),
        verdict: Verdict::Allow,
        rule_id,
    };
    // Ten endpoints share the entries; 1 and 2 hold the two that match.
    let per_endpoint = entries.div_ceil(10);
    let mut written = 0;
    for endpoint_id in 1..=10u32 {
        let n = per_endpoint.min(entries - written);
        if n == 0 {
            break;
        }
        let mut rules: Vec<PolicyEntry> = (0..n - 1)
            .map(|i| {
                // Distinct single ports of many peers: one map entry per rule.
                let peer = 10_000 + (i / 8) as u32;
                let port = 1000 + (i % 8) as u16;
                let direction = if i % 2 == 0 {
                    Direction::Egress
                } else {
                    Direction::Ingress
                };
                allow(endpoint_id, direction, peer, port, i as u32 + 100)
            })
            .collect();
        rules.push(match endpoint_id {
            1 => allow(1, Direction::Egress, ID_REMOTE, 443, 1),
            2 => allow(2, Direction::Ingress, identity::HOST, 80, 2),
            other => allow(other, Direction::Egress, 9999, 9, 3),
        });
        dp.replace_endpoint_policy(endpoint_id, &rules)
            .with_context(|| format!("policy of endpoint {endpoint_id}"))?;
        written += dp.policy_entries(endpoint_id)?.len();
    }
    if written != entries {
        bail!("wrote {written} policy map entries, wanted {entries}");
    }
    Ok(())
}

/// The kernel's mean per-run time, median over ROUNDS measurements. A first
/// run creates the ct entry, so every measured run is an established packet.
fn median_run(
    dp: &Datapath,
    hook: Hook,
    frame: &[u8],
    want: TcVerdict,
    repeat: u32,
) -> anyhow::Result<Duration> {
    let (first, _) = dp.test_run_repeat(hook, frame, 1).context("warm-up run")?;
    if first.verdict != want {
        bail!("{hook}: verdict {:?}, expected {want:?}", first.verdict);
    }
    let mut times = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let (out, per_run) = dp
            .test_run_repeat(hook, frame, repeat)
            .context("test run")?;
        if out.verdict != want {
            bail!("{hook}: verdict {:?}, expected {want:?}", out.verdict);
        }
        times.push(per_run);
    }
    times.sort();
    Ok(times[ROUNDS / 2])
}

/// Ethernet + IPv4 + TCP (ACK) frame.
fn tcp_frame(saddr: Ipv4Addr, daddr: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(54);
    f.extend_from_slice(&[2, 0, 0, 0, 1, 1, 2, 0, 0, 0, 1, 2]);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&saddr.octets());
    ip[16..20].copy_from_slice(&daddr.octets());
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let csum = !((sum & 0xffff) + (sum >> 16)) as u16;
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x10; // ACK
    f.extend_from_slice(&tcp);
    f
}

/// A pin directory on bpffs for one configuration, removed on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> anyhow::Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            Path::new(bpf::BPFFS_PATH).join(format!("membrane-bench-{}x{n}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
