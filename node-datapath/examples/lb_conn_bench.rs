// SPDX-License-Identifier: Apache-2.0
//! Connection setup rate and latency to a ClusterIP with N services
//! programmed: Membrane's socket-level load balancing (`bpf_sock`, cgroup
//! connect4) against kube-proxy-style iptables rules for the same services,
//! built in the same run. Needs root; `scripts/bench-lb.sh` builds and runs
//! it and removes whatever a killed run left behind.
//!
//! For each N (default 10, 1,000 and 10,000), everything is built afresh:
//! - a server namespace whose loopback holds the measured service's three
//!   backends (10.244.0.1-3), each a real TCP listener on :8080 that reads
//!   one byte, answers with its last octet and closes;
//! - one client namespace per path, each wired to the server namespace by a
//!   veth pair of its own, so no path sees another's rules;
//! - **ours**: a fresh pin directory and cgroup v2 with `bpf_sock` attached
//!   and N services programmed: the measured one with a Maglev table of
//!   M = 16381, the N - 1 fillers with M = 251 (the smallest size) and three
//!   unreachable backends each, to keep kernel memory small (the lookup is a
//!   hash lookup plus two array lookups whatever M is). The client runs with
//!   this process moved into a child of that cgroup;
//! - **iptables** (`iptables-nft-restore`, Debian 12's default backend) and
//!   **iptables-legacy** (`iptables-legacy-restore`): the same N services as
//!   kube-proxy 1.19/1.20 iptables-mode nat rules, loaded with one
//!   `iptables-restore` into the client namespace: OUTPUT → KUBE-SERVICES
//!   (two rules per service, the measured one last, as with many services)
//!   → KUBE-SVC-* (`-m statistic --mode random --probability`) → KUBE-SEP-*
//!   (DNAT).
//!
//! The client is one Tokio current-thread runtime looping, with
//! `--concurrency` connections in flight (default 1): connect → 1-byte
//! request → 1-byte response → close with SO_LINGER 0 (an RST, so neither
//! TIME_WAIT sockets nor TIME_WAIT conntrack entries pile up over a run).
//! The setup latency is the connect() duration; the rate counts whole
//! connections. The loop is `membrane_test_support::run_concurrently`, in
//! batches until `--secs` have passed. Within a round the paths take turns
//! (rotating who goes first); the medians over `--rounds` are printed.
//!
//! The machine is shared, so the on-CPU time of the client and backend
//! threads per connection is reported too (their `sum_exec_runtime`, which
//! on this kernel, without IRQ time accounting, includes the softirq work
//! run on their time: the handshake over the veth); it moves less with what
//! else runs than the rate does. `scripts/bench-lb.sh` pins the process
//! (client and backends) to one CPU: spread over two, each handshake wakes
//! a thread on the other CPU, and rounds became bimodal.
//!
//! `--programming-only` measures instead what programming ours costs, per
//! N, with the table writes batched as the agent does them and with the
//! path of kernels without batch commands (one update per slot and per
//! table, the only path before batching), plus one table swap at
//! M = 16381; no namespaces, cgroups or iptables involved.

// The eBPF tests' fixtures (pin directory, network namespaces, commands):
// compiled in here too rather than written again.
#[path = "../tests/bpf_support/mod.rs"]
mod bpf_support;

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use bpf_support::{Netns, PinDir, enter_netns, in_ns, run, unique};
use clap::Parser;
use membrane_lb::maglev::{self, Seed, TableSize, Weighted};
use membrane_node_datapath::bpf::{
    LbAlgorithm, LbBackend, LbFrontend, LbProtocol, LbService, SockLb, TableBatching,
};
use membrane_test_support::run_concurrently;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const UNIFIED: &str = "/sys/fs/cgroup/unified";
/// The measured service's backends (on the server namespace's loopback).
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 0, 1),
    Ipv4Addr::new(10, 244, 0, 2),
    Ipv4Addr::new(10, 244, 0, 3),
];
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
/// Pod CIDR: client addresses are inside it, so kube-proxy's
/// `! -s <cluster CIDR> ... -j KUBE-MARK-MASQ` rules do not fire.
const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Services and backends share the 65,536-entry maps of `bpf/lib/lb.h`.
const MAX_SERVICES: usize = 20_000;
/// Connections per `run_concurrently` call; the run ends after the call
/// that crosses `--secs`.
const BATCH: usize = 256;
/// Unmeasured connections before each measured run.
const WARMUP: usize = 256;
/// A connection that takes longer counts as failed (and fails the run).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Connection setup to a ClusterIP with N services: socket LB vs iptables.
#[derive(Debug, Clone, Parser)]
struct Options {
    /// Service counts to measure.
    #[arg(
        long,
        env = "LB_BENCH_SIZES",
        value_delimiter = ',',
        default_value = "10,1000,10000"
    )]
    sizes: Vec<usize>,
    /// Rounds per size (each path once per round); medians are reported.
    #[arg(long, env = "LB_BENCH_ROUNDS", default_value_t = 5)]
    rounds: usize,
    /// Seconds each path runs per round.
    #[arg(long, env = "LB_BENCH_SECS", default_value_t = 2.0)]
    secs: f64,
    /// Connections in flight.
    #[arg(long, env = "LB_BENCH_CONCURRENCY", default_value_t = 1)]
    concurrency: usize,
    /// Paths to measure (the first iptables one is the ratios' baseline).
    #[arg(
        long,
        env = "LB_BENCH_PATHS",
        value_delimiter = ',',
        default_value = "sock,iptables-nft,iptables-legacy"
    )]
    paths: Vec<Lb>,
    /// Only measure the time to program ours (per size, batched and
    /// per-element) and one table swap at M = 16381.
    #[arg(long, env = "LB_BENCH_PROGRAMMING_ONLY")]
    programming_only: bool,
}

/// A way of reaching the ClusterIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Lb {
    /// Membrane: `bpf_sock` on the client's cgroup.
    Sock,
    /// kube-proxy rules through `iptables-nft-restore`.
    IptablesNft,
    /// kube-proxy rules through `iptables-legacy-restore`.
    IptablesLegacy,
}

impl Lb {
    fn label(self) -> &'static str {
        match self {
            Self::Sock => "Membrane bpf_sock",
            Self::IptablesNft => "iptables (nft)",
            Self::IptablesLegacy => "iptables-legacy",
        }
    }

    fn restore_tool(self) -> Option<&'static str> {
        match self {
            Self::Sock => None,
            Self::IptablesNft => Some("iptables-nft-restore"),
            Self::IptablesLegacy => Some("iptables-legacy-restore"),
        }
    }
}

/// One measured run of one path.
#[derive(Debug, Clone)]
struct Sample {
    connections: usize,
    rate: f64,
    p50: Duration,
    p99: Duration,
    /// On-CPU time of the client and backend threads per connection.
    cpu_per_connection: Duration,
    /// Connections answered per backend (10.244.0.1, .2, .3).
    per_backend: [usize; 3],
}

/// Every round of one path at one size.
#[derive(Debug, Clone)]
struct PathResult {
    lb: Lb,
    samples: Vec<Sample>,
    /// Conntrack drops + early drops + failed inserts in the client
    /// namespace after the rounds (0 where conntrack never ran).
    conntrack_drops: u64,
}

impl PathResult {
    fn median(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        let mut v: Vec<f64> = self.samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn rate(&self) -> f64 {
        self.median(|s| s.rate)
    }

    fn p50_us(&self) -> f64 {
        self.median(|s| s.p50.as_secs_f64() * 1e6)
    }

    fn p99_us(&self) -> f64 {
        self.median(|s| s.p99.as_secs_f64() * 1e6)
    }

    fn cpu_us(&self) -> f64 {
        self.median(|s| s.cpu_per_connection.as_secs_f64() * 1e6)
    }
}

fn main() -> anyhow::Result<()> {
    let opts = Options::parse();
    ensure!(!opts.paths.is_empty(), "--paths: nothing to measure");
    for (i, lb) in opts.paths.iter().enumerate() {
        ensure!(!opts.paths[..i].contains(lb), "--paths: {lb:?} twice");
    }
    ensure!(opts.rounds > 0, "--rounds must be at least 1");
    for n in &opts.sizes {
        ensure!(
            (1..=MAX_SERVICES).contains(n),
            "--sizes: {n} services (1 to {MAX_SERVICES})"
        );
    }
    if opts.programming_only {
        return measure_programming(&opts);
    }
    let mut results = Vec::new();
    for &n in &opts.sizes {
        results.push((n, measure_size(n, &opts)?));
    }
    print_report(&opts, &results);
    Ok(())
}

/// Builds everything for `n` services, runs the rounds, tears it all down.
fn measure_size(n: usize, opts: &Options) -> anyhow::Result<Vec<PathResult>> {
    let services = Service::all(n);
    let bench = SizeBench::new(&services, &opts.paths)?;
    let target = SocketAddrV4::new(services[n - 1].cluster_ip, SERVICE_PORT);
    let secs = Duration::from_secs_f64(opts.secs);
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); bench.clients.len()];
    for round in 0..opts.rounds {
        for turn in 0..bench.clients.len() {
            let i = (round + turn) % bench.clients.len();
            let (lb, ns) = &bench.clients[i];
            let sample = bench
                .with_client_context(*lb, || {
                    measure(ns, target, secs, opts.concurrency, bench.server.tid)
                })
                .with_context(|| format!("{} services, {}", n, lb.label()))?;
            samples[i].push(sample);
        }
        eprintln!("{n} services: round {} of {} done", round + 1, opts.rounds);
    }
    bench
        .clients
        .iter()
        .zip(samples)
        .map(|((lb, ns), samples)| {
            Ok(PathResult {
                lb: *lb,
                samples,
                conntrack_drops: conntrack_drops(ns)?,
            })
        })
        .collect()
}

// === Services ===

/// One ClusterIP service as both load balancers program it.
#[derive(Debug, Clone)]
struct Service {
    index: usize,
    cluster_ip: Ipv4Addr,
    backends: [Ipv4Addr; 3],
}

impl Service {
    /// `n` services; the last is the measured one, with the real backends.
    fn all(n: usize) -> Vec<Self> {
        (0..n)
            .map(|index| Self {
                index,
                cluster_ip: nth_address([10, 96], index),
                backends: if index == n - 1 {
                    BACKENDS
                } else {
                    [0, 1, 2].map(|k| nth_address([10, 245], 3 * index + k))
                },
            })
            .collect()
    }

    fn is_measured(&self) -> bool {
        self.backends == BACKENDS
    }

    fn id(&self) -> u32 {
        self.index as u32 + 1
    }

    fn backend_id(&self, k: usize) -> u32 {
        (3 * self.index + k) as u32 + 1
    }
}

/// The `i`-th address of a /16 (`.1` to `.250` in each /24).
fn nth_address(prefix: [u8; 2], i: usize) -> Ipv4Addr {
    Ipv4Addr::new(prefix[0], prefix[1], (i / 250) as u8, (i % 250 + 1) as u8)
}

// === The topology of one size ===

/// Server namespace, one client namespace per path, and ours' cgroup and
/// maps. Fields drop in order: the server stops before its namespace goes.
struct SizeBench {
    server: Server,
    sock: Option<SockSide>,
    clients: Vec<(Lb, Netns)>,
    _server_ns: Netns,
}

impl SizeBench {
    fn new(services: &[Service], paths: &[Lb]) -> anyhow::Result<Self> {
        let server_ns = Netns::new("lbsrv");
        for b in BACKENDS {
            ip(&format!("-n {} addr add {b}/32 dev lo", server_ns.name));
        }
        let server = Server::start(&server_ns)?;
        let mut clients = Vec::new();
        let mut sock = None;
        for (k, &lb) in paths.iter().enumerate() {
            let ns = client_ns(&server_ns, k);
            let started = Instant::now();
            match lb.restore_tool() {
                None => sock = Some(SockSide::new(services)?),
                Some(tool) => iptables_restore(&ns, tool, &kube_proxy_rules(services))?,
            }
            eprintln!(
                "{} services: {} programmed in {:.2?}",
                services.len(),
                lb.label(),
                started.elapsed()
            );
            clients.push((lb, ns));
        }
        Ok(Self {
            server,
            sock,
            clients,
            _server_ns: server_ns,
        })
    }

    /// Runs `f` with this process in ours' cgroup when `lb` is ours.
    fn with_client_context<T>(
        &self,
        lb: Lb,
        f: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        match (lb, &self.sock) {
            (Lb::Sock, Some(sock)) => sock.cgroup.inside(f),
            _ => f(),
        }
    }
}

/// Client namespace `k`: 10.244.(100+k).2/24 on a veth whose peer in the
/// server namespace is .1, the default route through it.
fn client_ns(server: &Netns, k: usize) -> Netns {
    let ns = Netns::new(&format!("lbcl{k}"));
    let (client, server) = (&ns.name, &server.name);
    let net = format!("10.244.{}", 100 + k);
    for args in [
        format!("link add lb{k}c netns {client} type veth peer name lb{k}s netns {server}"),
        format!("-n {server} addr add {net}.1/24 dev lb{k}s"),
        format!("-n {server} link set lb{k}s up"),
        format!("-n {client} addr add {net}.2/24 dev lb{k}c"),
        format!("-n {client} link set lb{k}c up"),
        format!("-n {client} route add default via {net}.1"),
    ] {
        ip(&args);
    }
    ns
}

/// `ip <args>` (split at white space); panics with the output on failure.
fn ip(args: &str) {
    run(&[&["ip"], &args.split_whitespace().collect::<Vec<_>>()[..]].concat());
}

// === Ours: bpf_sock ===

/// The loaded `bpf_sock` with N services, attached to a fresh cgroup.
struct SockSide {
    lb: SockLb,
    cgroup: Cgroup,
    _pins: PinDir,
}

impl SockSide {
    fn new(services: &[Service]) -> anyhow::Result<Self> {
        let pins = PinDir::new();
        let mut lb = SockLb::load(pins.path()).context("load bpf_sock")?;
        let tables = maglev_tables(services)?;
        let took = program(&mut lb, services, &tables)?;
        eprintln!(
            "{} services: tables {:.2?} of {:.2?} programming",
            services.len(),
            took.tables,
            took.total
        );
        let cgroup = Cgroup::new()?;
        lb.attach(&cgroup.node).context("attach bpf_sock")?;
        Ok(Self {
            lb,
            cgroup,
            _pins: pins,
        })
    }
}

/// Time spent programming the maps.
#[derive(Debug, Clone, Copy)]
struct ProgrammingTime {
    total: Duration,
    /// Of which in `set_tables`.
    tables: Duration,
}

/// Every service's Maglev table (M = 16381 for the measured one, 251 for
/// the fillers), as backend ids.
fn maglev_tables(services: &[Service]) -> anyhow::Result<Vec<Vec<u32>>> {
    let seed = Seed::from_bytes(*b"lb-conn-bnch");
    services
        .iter()
        .map(|svc| maglev_slots(svc, seed, if svc.is_measured() { 16381 } else { 251 }))
        .collect()
}

/// Programs `services` with their `tables` as the agent's reconciler
/// does: backends, then every table in one `set_tables`, then frontends.
fn program(
    lb: &mut SockLb,
    services: &[Service],
    tables: &[Vec<u32>],
) -> anyhow::Result<ProgrammingTime> {
    let started = Instant::now();
    for svc in services {
        for (k, address) in svc.backends.iter().enumerate() {
            lb.upsert_backend(
                svc.backend_id(k),
                LbBackend {
                    address: *address,
                    port: 0,
                },
            )?;
        }
    }
    let tables_started = Instant::now();
    let batch: Vec<(u32, &[u32])> = services
        .iter()
        .zip(tables)
        .map(|(svc, t)| (svc.id(), &t[..]))
        .collect();
    lb.set_tables(&batch)?;
    let tables_took = tables_started.elapsed();
    for svc in services {
        lb.upsert_service(
            LbFrontend {
                address: svc.cluster_ip,
                port: SERVICE_PORT,
                protocol: LbProtocol::Tcp,
            },
            LbService {
                service_id: svc.id(),
                algorithm: LbAlgorithm::Maglev,
                target_port: TARGET_PORT,
                hash_source_address_only: false,
                affinity_timeout_secs: 0,
            },
        )?;
    }
    Ok(ProgrammingTime {
        total: started.elapsed(),
        tables: tables_took,
    })
}

// === --programming-only ===

/// The ways of writing tables compared: what kernels without batch
/// commands get (and what ours did before batching), the fill batched
/// alone, and the fill and the outer swaps and removals batched.
const TABLE_WRITES: [(&str, TableBatching); 3] = [
    ("per element", TableBatching::NONE),
    (
        "fill batched",
        TableBatching {
            fill: true,
            swap: false,
            remove: false,
        },
    ),
    (
        "batched",
        TableBatching {
            fill: true,
            swap: true,
            remove: true,
        },
    ),
];
/// Above this many services the middle way is skipped, and the first one
/// does not remove its tables: each pays one map-of-maps wait per table
/// (minutes at 10,000).
const PER_TABLE_WAIT_MAX_SERVICES: usize = 1000;
/// Swaps of the M = 16381 table timed per way (the median is reported).
const SWAPS: usize = 15;
/// Tables of M = 16381 in the one `set_tables` call that shows the cost of
/// a fill apart from the map-of-maps wait.
const LARGE_TABLES: u32 = 100;

fn measure_programming(opts: &Options) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for &n in &opts.sizes {
        let services = Service::all(n);
        let tables = maglev_tables(&services)?;
        for (i, (way, batching)) in TABLE_WRITES.iter().enumerate() {
            if i == 1 && n > PER_TABLE_WAIT_MAX_SERVICES {
                continue;
            }
            let pins = PinDir::new();
            let loaded = Instant::now();
            let mut lb = SockLb::load(pins.path()).context("load bpf_sock")?;
            let load = loaded.elapsed();
            lb.set_table_batching(*batching);
            ensure!(
                lb.table_batching() == *batching,
                "this kernel lacks batch commands: {:?}",
                lb.table_batching()
            );
            let took = program(&mut lb, &services, &tables)?;
            let ids: Vec<u32> = services.iter().map(Service::id).collect();
            let remove = if batching.remove || n <= PER_TABLE_WAIT_MAX_SERVICES {
                let removed = Instant::now();
                lb.remove_tables(&ids)?;
                Some(removed.elapsed())
            } else {
                None
            };
            eprintln!(
                "{n} services, {way}: programmed in {:.2?} (tables {:.2?}), tables removed in {remove:.2?}, load {load:.2?}",
                took.total, took.tables
            );
            rows.push((n, *way, took, remove, load));
        }
    }
    // One swap of a table of M = 16381 (the measured service's), whole:
    // build, fill and swap in; alternating between two tables.
    let services = Service::all(1);
    let seed = Seed::from_bytes(*b"lb-conn-bnch");
    let a = maglev_slots(&services[0], seed, 16381)?;
    let b = maglev_slots(&services[0], Seed::from_bytes(*b"lb-conn-bnc2"), 16381)?;
    let mut swaps = Vec::new();
    for (way, batching) in TABLE_WRITES {
        let pins = PinDir::new();
        let mut lb = SockLb::load(pins.path()).context("load bpf_sock")?;
        lb.set_table_batching(batching);
        let mut took: Vec<Duration> = (0..SWAPS)
            .map(|k| {
                let t = if k % 2 == 0 { &a } else { &b };
                let started = Instant::now();
                lb.set_table(1, t).map(|()| started.elapsed())
            })
            .collect::<Result<_, _>>()?;
        took.sort();
        // Many large tables at once: the fills add up, the wait (one per
        // table or one per batch) does not hide them.
        let many: Vec<(u32, &[u32])> = (1..=LARGE_TABLES).map(|id| (id, &a[..])).collect();
        let started = Instant::now();
        lb.set_tables(&many)?;
        let many_took = started.elapsed();
        swaps.push((way, took[SWAPS / 2], took[0], took[SWAPS - 1], many_took));
    }

    println!(
        "\n| services | table writes | programming | of which tables | removing every table | load (probes included) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (n, way, took, remove, load) in rows {
        let remove = remove.map_or("-".to_owned(), |r| format!("{r:.3?}"));
        println!(
            "| {n} | {way} | {:.3?} | {:.3?} | {remove} | {load:.2?} |",
            took.total, took.tables
        );
    }
    println!(
        "\nTables of M = 16381: one swap (`set_table`, median of {SWAPS}, min to max), and {LARGE_TABLES} in one `set_tables`:\n"
    );
    println!(
        "| table writes | one swap | min | max | {LARGE_TABLES} tables |\n| --- | --- | --- | --- | --- |"
    );
    for (way, median, min, max, many) in swaps {
        println!("| {way} | {median:.2?} | {min:.2?} | {max:.2?} | {many:.2?} |");
    }
    Ok(())
}

impl Drop for SockSide {
    fn drop(&mut self) {
        let _ = self.lb.detach(&self.cgroup.node);
    }
}

/// The service's Maglev table of size `m` as backend ids.
fn maglev_slots(svc: &Service, seed: Seed, m: u64) -> anyhow::Result<Vec<u32>> {
    let weighted = svc.backends.map(|address| Weighted { address, weight: 1 });
    let table = maglev::build(&weighted, seed, TableSize::new("m", m)?);
    // `table.backends` is sorted by address; map each back to its id.
    let ids: Vec<u32> = table
        .backends
        .iter()
        .map(|b| {
            let k = svc.backends.iter().position(|a| *a == b.address);
            k.map(|k| svc.backend_id(k))
        })
        .collect::<Option<_>>()
        .context("maglev returned an unknown backend")?;
    Ok(table.slots.iter().map(|s| ids[*s as usize]).collect())
}

/// A cgroup v2 "node" (where `bpf_sock` is attached) with a "pod" child that
/// this process joins while it measures ours. Removed on drop.
struct Cgroup {
    node: PathBuf,
    pod: PathBuf,
    /// Where this process lived before (and returns to).
    home: PathBuf,
}

impl Cgroup {
    fn new() -> anyhow::Result<Self> {
        let fs_type = nix::sys::statfs::statfs(UNIFIED)
            .with_context(|| format!("statfs {UNIFIED}"))?
            .filesystem_type();
        ensure!(
            fs_type == nix::sys::statfs::CGROUP2_SUPER_MAGIC,
            "{UNIFIED} is not a cgroup v2 mount"
        );
        let own = fs::read_to_string("/proc/self/cgroup").context("read /proc/self/cgroup")?;
        let home = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 line in /proc/self/cgroup")?;
        let node = Path::new(UNIFIED).join(unique("mbt-lb-"));
        let pod = node.join("pod");
        fs::create_dir_all(&pod).with_context(|| format!("create {}", pod.display()))?;
        Ok(Self {
            node,
            pod,
            home: Path::new(UNIFIED).join(home.trim_start_matches('/')),
        })
    }

    /// Runs `f` with this whole process (every thread) in the pod cgroup.
    fn inside<T>(&self, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        move_self(&self.pod)?;
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        move_self(&self.home)?;
        out.unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = move_self(&self.home);
        let _ = fs::remove_dir(&self.pod);
        let _ = fs::remove_dir(&self.node);
    }
}

fn move_self(cgroup: &Path) -> anyhow::Result<()> {
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("write {}", procs.display()))
}

// === Baseline: kube-proxy iptables mode ===

/// kube-proxy's (1.19/1.20) iptables-mode nat table for `services`, each
/// with one TCP port and three endpoints, in `iptables-restore` format.
/// Chain names are made-up 16-character hashes, as kube-proxy's are.
fn kube_proxy_rules(services: &[Service]) -> String {
    let mut chains = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE --random-fully\n",
    );
    // `write!` to a String cannot fail.
    for svc in services {
        let name = format!("default/svc-{}:http", svc.index);
        let svc_chain = format!("KUBE-SVC-{:016X}", mix(svc.index as u64));
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let dst = format!("-d {}/32 -p tcp", svc.cluster_ip);
        let comment = format!("-m comment --comment \"{name} cluster IP\"");
        let dport = format!("-m tcp --dport {SERVICE_PORT}");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES ! -s {CLUSTER_CIDR} {dst} {comment} {dport} -j KUBE-MARK-MASQ\n\
             -A KUBE-SERVICES {dst} {comment} {dport} -j {svc_chain}"
        );
        let count = svc.backends.len();
        for (k, backend) in svc.backends.iter().enumerate() {
            let sep_chain = format!(
                "KUBE-SEP-{:016X}",
                mix((1 << 63) | (3 * svc.index + k) as u64)
            );
            let _ = writeln!(chains, ":{sep_chain} - [0:0]");
            let pick = if k + 1 < count {
                format!(
                    "-m statistic --mode random --probability {:.10} ",
                    1.0 / (count - k) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc_chain} -m comment --comment \"{name}\" {pick}-j {sep_chain}\n\
                 -A {sep_chain} -s {backend}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ\n\
                 -A {sep_chain} -p tcp -m comment --comment \"{name}\" -m tcp \
                 -j DNAT --to-destination {backend}:{TARGET_PORT}"
            );
        }
    }
    let _ = writeln!(
        rules,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be \
         the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT"
    );
    chains + &rules
}

/// splitmix64's finalizer: chain-name hashes that look like kube-proxy's.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Loads `rules` with `tool` (an `iptables-restore`) in `ns`, in one go.
fn iptables_restore(ns: &Netns, tool: &str, rules: &str) -> anyhow::Result<()> {
    let mut child = in_ns(&ns.name, &[tool])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {tool} (is the iptables package installed?)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .with_context(|| format!("write rules to {tool}"))?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{tool} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Conntrack drops, early drops and failed inserts in `ns`, all CPUs.
fn conntrack_drops(ns: &Netns) -> anyhow::Result<u64> {
    let text = match ns.run_in(|| fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack")) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).context("read nf_conntrack stats"),
    };
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let mut total = 0;
    for line in lines {
        for (name, value) in header.iter().zip(line.split_whitespace()) {
            if matches!(*name, "drop" | "early_drop" | "insert_failed") {
                total += u64::from_str_radix(value, 16)
                    .with_context(|| format!("nf_conntrack stat {name}={value}"))?;
            }
        }
    }
    Ok(total)
}

// === The measured service's backends ===

/// The backends' listeners, served by a thread of their own (in the server
/// namespace) until drop.
struct Server {
    /// The serving thread (its CPU time is counted per connection).
    tid: i32,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(ns: &Netns) -> anyhow::Result<Self> {
        let path = format!("/run/netns/{}", ns.name);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter_netns(&path);
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                    return;
                }
            };
            runtime.block_on(async move {
                for address in BACKENDS {
                    match tokio::net::TcpListener::bind((address, TARGET_PORT)).await {
                        Ok(l) => drop(tokio::spawn(serve(l, address.octets()[3]))),
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow::Error::from(e)
                                .context(format!("listen on {address}:{TARGET_PORT}"))));
                            return;
                        }
                    }
                }
                let _ = ready_tx.send(Ok(nix::unistd::gettid().as_raw()));
                let _ = stopped.await;
            });
        });
        let mut server = Self {
            tid: 0,
            stop: Some(stop),
            thread: Some(thread),
        };
        server.tid = ready.recv().context("backend thread died")??;
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Each connection: read one byte, answer `octet`, close.
async fn serve(listener: tokio::net::TcpListener, octet: u8) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::task::yield_now().await;
            continue;
        };
        tokio::spawn(async move {
            let mut b = [0u8; 1];
            if stream.read_exact(&mut b).await.is_ok() {
                let _ = stream.write_all(&[octet]).await;
            }
        });
    }
}

// === The client ===

/// What the client's connections recorded.
#[derive(Debug, Default)]
struct Record {
    setup: Vec<Duration>,
    per_backend: [usize; 3],
    errors: usize,
    first_error: Option<String>,
}

/// Runs the client loop in `ns` for `secs` (plus a warm-up).
fn measure(
    ns: &Netns,
    target: SocketAddrV4,
    secs: Duration,
    concurrency: usize,
    server_tid: i32,
) -> anyhow::Result<Sample> {
    ns.run_in(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(client_loop(target, secs, concurrency, server_tid))
    })
}

/// The loop on the calling thread (a current-thread runtime: every
/// connection is made here).
async fn client_loop(
    target: SocketAddrV4,
    secs: Duration,
    concurrency: usize,
    server_tid: i32,
) -> anyhow::Result<Sample> {
    let server_schedstat = format!("/proc/self/task/{server_tid}/schedstat");
    let cpu = || -> anyhow::Result<Duration> {
        Ok(on_cpu("/proc/thread-self/schedstat")? + on_cpu(&server_schedstat)?)
    };
    let batch = |record: &Arc<Mutex<Record>>, n: usize| {
        let record = record.clone();
        run_concurrently(n, concurrency, move |_| {
            connect_once(target, record.clone())
        })
    };
    let warmup = Arc::new(Mutex::new(Record::default()));
    batch(&warmup, WARMUP).await;
    check(
        &warmup.lock().unwrap_or_else(PoisonError::into_inner),
        target,
    )?;

    let record = Arc::new(Mutex::new(Record::default()));
    let mut wall = Duration::ZERO;
    let cpu_before = cpu()?;
    while wall < secs {
        wall += batch(&record, BATCH).await;
    }
    let cpu_used = cpu()?.saturating_sub(cpu_before);
    let mut record = std::mem::take(&mut *record.lock().unwrap_or_else(PoisonError::into_inner));
    check(&record, target)?;
    record.setup.sort_unstable();
    let at = |p: usize| record.setup[(record.setup.len() * p / 100).min(record.setup.len() - 1)];
    Ok(Sample {
        connections: record.setup.len(),
        rate: record.setup.len() as f64 / wall.as_secs_f64(),
        p50: at(50),
        p99: at(99),
        cpu_per_connection: cpu_used / record.setup.len() as u32,
        per_backend: record.per_backend,
    })
}

/// A thread's time on CPU (the first field of its `schedstat`, in ns).
fn on_cpu(schedstat: &str) -> anyhow::Result<Duration> {
    let text = fs::read_to_string(schedstat).with_context(|| format!("read {schedstat}"))?;
    let ns = text
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .with_context(|| format!("{schedstat}: `{text}`"))?;
    Ok(Duration::from_nanos(ns))
}

/// Every connection succeeded, and every backend answered some.
fn check(record: &Record, target: SocketAddrV4) -> anyhow::Result<()> {
    if let Some(e) = &record.first_error {
        bail!(
            "{} connections to {target} failed; first: {e}",
            record.errors
        );
    }
    ensure!(
        record.per_backend.iter().all(|n| *n > 0),
        "not every backend of {target} answered: {:?}",
        record.per_backend
    );
    Ok(())
}

/// connect (timed) → 1-byte request → 1-byte response → close with an RST.
async fn connect_once(target: SocketAddrV4, record: Arc<Mutex<Record>>) {
    let connection = async {
        let started = Instant::now();
        let mut stream = tokio::net::TcpStream::connect(target).await?;
        let setup = started.elapsed();
        stream.write_all(b"?").await?;
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer).await?;
        stream.set_zero_linger()?;
        Ok::<_, std::io::Error>((setup, answer[0]))
    };
    let outcome = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
    let mut r = record.lock().unwrap_or_else(PoisonError::into_inner);
    match outcome {
        Ok(Ok((setup, octet))) if (1..=3).contains(&octet) => {
            r.setup.push(setup);
            r.per_backend[usize::from(octet - 1)] += 1;
        }
        other => {
            r.errors += 1;
            r.first_error.get_or_insert_with(|| match other {
                Ok(Ok((_, octet))) => format!("unexpected answer {octet}"),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {CONNECTION_TIMEOUT:?}"),
            });
        }
    }
}

// === Report ===

/// A report column: name, unit, value.
type Metric = (&'static str, &'static str, fn(&PathResult) -> f64);

fn print_report(opts: &Options, results: &[(usize, Vec<PathResult>)]) {
    println!(
        "\nmedians of {} rounds, {} s per path per round, {} connection(s) in flight\n",
        opts.rounds, opts.secs, opts.concurrency
    );
    // (column, unit, value): each printed with its ratio to the baseline,
    // the first iptables path.
    let metrics: [Metric; 4] = [
        ("conn/s", "", PathResult::rate),
        ("p50 connect", " µs", PathResult::p50_us),
        ("p99 connect", " µs", PathResult::p99_us),
        ("CPU per conn", " µs", PathResult::cpu_us),
    ];
    let base_label = opts
        .paths
        .iter()
        .find(|l| **l != Lb::Sock)
        .map_or("-", |l| l.label());
    let mut header = String::from("| services | path |");
    for (name, _, _) in &metrics {
        let _ = write!(header, " {name} | vs {base_label} |");
    }
    println!("{header}\n|{}", " --- |".repeat(2 + 2 * metrics.len()));
    for (n, paths) in results {
        let base = paths.iter().find(|p| p.lb != Lb::Sock);
        for p in paths {
            let mut row = format!("| {n} | {} |", p.lb.label());
            for (_, unit, f) in &metrics {
                let v = f(p);
                let ratio = base.map_or("-".to_owned(), |b| format!("{:.2}", v / f(b)));
                let _ = if unit.is_empty() {
                    write!(row, " {v:.0} | {ratio} |")
                } else {
                    write!(row, " {v:.1}{unit} | {ratio} |")
                };
            }
            println!("{row}");
        }
    }
    if let (Some((first, a)), Some((last, b))) = (results.first(), results.last()) {
        println!("\nat {last} services / at {first} (1.00 = flat): conn/s, p50, CPU per conn");
        for (pa, pb) in a.iter().zip(b) {
            println!(
                "  {}: {:.2}, {:.2}, {:.2}",
                pa.lb.label(),
                pb.rate() / pa.rate(),
                pb.p50_us() / pa.p50_us(),
                pb.cpu_us() / pa.cpu_us()
            );
        }
    }
    println!("\nraw rounds (conn/s / p50 µs / p99 µs / CPU µs per conn [answers per backend]):");
    for (n, paths) in results {
        for p in paths {
            let rounds: Vec<String> = p
                .samples
                .iter()
                .map(|s| {
                    format!(
                        "{:.0}/{:.1}/{:.1}/{:.1} {:?}",
                        s.rate,
                        s.p50.as_secs_f64() * 1e6,
                        s.p99.as_secs_f64() * 1e6,
                        s.cpu_per_connection.as_secs_f64() * 1e6,
                        s.per_backend
                    )
                })
                .collect();
            let total: usize = p.samples.iter().map(|s| s.connections).sum();
            println!(
                "  {n} {}: {}  ({total} connections, conntrack drops {})",
                p.lb.label(),
                rounds.join("  "),
                p.conntrack_drops
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_rules_have_two_service_rules_each_and_the_measured_service_last() {
        let rules = kube_proxy_rules(&Service::all(3));
        let services: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES -d "))
            .collect();
        assert_eq!(services.len(), 3);
        assert!(services[2].contains("-d 10.96.0.3/32"), "{}", services[2]);
        assert_eq!(rules.matches("-j DNAT").count(), 9);
        assert!(rules.contains("--probability 0.3333333333 "));
        assert!(rules.contains("--to-destination 10.244.0.3:8080"));
    }

    /// Ten services, one short round on every path.
    fn smoke(programming_only: bool) -> Options {
        Options {
            sizes: vec![10],
            rounds: 1,
            secs: 0.2,
            concurrency: 1,
            paths: vec![Lb::Sock, Lb::IptablesNft, Lb::IptablesLegacy],
            programming_only,
        }
    }

    /// Runs as root only (`cargo test -p membrane-node-datapath --example
    /// lb_conn_bench`); about two seconds, not on the default test path.
    #[test]
    fn ten_services_are_measured_on_every_path() {
        if !bpf_support::privileged("lb_conn_bench smoke") {
            return;
        }
        let results = measure_size(10, &smoke(false)).expect("measure 10 services");
        assert_eq!(results.len(), 3);
        for p in &results {
            assert!(p.rate() > 0.0, "{:?}", p.lb);
        }
    }

    /// Runs as root only, like the test above; about five seconds.
    #[test]
    fn programming_ten_services_is_measured_every_way() {
        if !bpf_support::privileged("lb_conn_bench programming smoke") {
            return;
        }
        measure_programming(&smoke(true)).expect("measure programming 10 services");
    }
}
