//! Shared fixtures of the CLI's privileged end-to-end tests: a local
//! cluster in a temporary state directory, torn down even when a test panics,
//! and helpers that run code inside network namespaces.
#![allow(dead_code)]

use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub static SERIAL: Mutex<()> = Mutex::new(());

pub const NODE_BINARY: &str = "membrane-node-datapath";
pub const BPF_ROOT: &str = "/sys/fs/bpf/membrane";

// === fixtures ===

/// Whether the test may run; prints the skip or panics under CI.
pub fn has_root() -> bool {
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        })
        .and_then(|u| u.parse::<u32>().ok());
    if euid == Some(0) {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "cluster tests need root, and CI=true forbids skipping them"
    );
    // Written to the stderr handle, not with `eprintln!`, so the test
    // harness does not capture it: a skip must be visible.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        b"\n======== SKIPPED (needs root): membrane up/down tests ========\n",
    );
    false
}

/// A state directory and a bin directory, torn down with `membrane down`
/// even when the test panics.
pub struct Cluster {
    state: tempfile::TempDir,
    bins: tempfile::TempDir,
    /// Component binaries linked into `bins`, by file name.
    components: Vec<String>,
}

impl Cluster {
    pub fn new() -> Self {
        let membrane = PathBuf::from(env!("CARGO_BIN_EXE_membrane"));
        let target = membrane.parent().expect("target dir");
        let bins = tempfile::tempdir().expect("bin dir");
        let mut components = Vec::new();
        let mut entries: Vec<_> = std::fs::read_dir(target)
            .expect("read target dir")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        entries.sort();
        for path in entries {
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            if !name.starts_with("membrane-") || name.contains('.') || !path.is_file() {
                continue;
            }
            // The CNI plugin speaks CNI, not `--help`: link it whenever it exists.
            if name == "membrane-cni" || is_real_component(&path) {
                std::os::unix::fs::symlink(&path, bins.path().join(&name)).expect("symlink");
                components.push(name);
            } else {
                eprintln!("leaving out {name}: it does not answer --help");
            }
        }
        eprintln!("components under test: {components:?}");
        Self {
            state: tempfile::tempdir().expect("state dir"),
            bins,
            components,
        }
    }

    pub fn dir(&self) -> &Path {
        self.state.path()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_membrane"));
        cmd.arg("--state-dir")
            .arg(self.dir())
            .args(args)
            .env("MEMBRANE_BIN_DIR", self.bins.path())
            .env_remove("MEMBRANE_STATE_DIR");
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().expect("run membrane");
        eprintln!(
            "$ membrane {}\n{}{}(exit {:?})",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            out.status.code()
        );
        out
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "`membrane {}` failed", args.join(" "));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The address of pod `namespace/name`, as `membrane pod list` reports it.
    pub fn pod_ip(&self, name: &str, namespace: &str) -> String {
        let pods: Value =
            serde_json::from_str(&self.ok(&["pod", "list", "-o", "json"])).expect("json");
        pods["items"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|p| p["name"] == name && p["namespace"] == namespace)
            })
            .and_then(|p| p["ip"].as_str())
            .expect("pod ip")
            .to_string()
    }

    /// `up` with two nodes, pod `server` (`app=server`) on node-1 and pod
    /// `client` (`app=client`) on node-2; returns the server's address.
    pub fn up_with_server_and_client(&self) -> String {
        self.ok(&["up", "--nodes", "2", "--detach"]);
        for (pod, node, labels) in [
            ("server", "node-1", "app=server"),
            ("client", "node-2", "app=client"),
        ] {
            self.ok(&["pod", "run", pod, "--node", node, "--labels", labels]);
        }
        self.pod_ip("server", "default")
    }

    pub fn info(&self) -> Value {
        let bytes = std::fs::read(self.dir().join("cluster.json")).expect("cluster.json");
        serde_json::from_slice(&bytes).expect("cluster.json is json")
    }

    pub fn pid(&self, name: &str) -> u32 {
        std::fs::read_to_string(self.dir().join("pids").join(format!("{name}.pid")))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid")
    }

    pub fn pids(&self) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir(self.dir().join("pids")) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
            .collect()
    }

    pub fn has(&self, binary: &str) -> bool {
        self.components.iter().any(|c| c == binary)
    }

    /// Services `up` should have started: every component but the node datapath.
    pub fn expected_services(&self) -> Vec<String> {
        let mut services: Vec<String> = self
            .components
            .iter()
            .filter(|c| c.as_str() != NODE_BINARY && c.as_str() != "membrane-cni")
            .filter_map(|c| c.strip_prefix("membrane-").map(str::to_string))
            .collect();
        services.sort();
        services
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.command(&["down"]).stdout(Stdio::null()).output();
    }
}

/// A real binary prints usage for `--help`; an empty `fn main` prints nothing.
pub fn is_real_component(path: &Path) -> bool {
    let Ok(mut child) = Command::new(path)
        .arg("--help")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
    }
    out.contains("Usage")
}

pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Alive and not a zombie (nobody may reap a detached component here).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next())
        })
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// Runs `f` on a thread that has entered network namespace `netns` (or the
/// host's when `None`); sockets created there stay in that namespace.
pub fn in_netns<T: Send + 'static>(
    netns: Option<&str>,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let path = netns.map(|n| Path::new("/run/netns").join(n));
    std::thread::spawn(move || {
        if let Some(path) = path {
            let file = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        }
        f()
    })
    .join()
    .expect("netns thread")
}

/// Proves `from` reaches `to_ip` over the underlay: a TCP connection from a
/// socket in `from` to a listener bound in `to` on that address.
pub fn assert_reaches(from: &str, to: Option<&str>, to_ip: Ipv4Addr) {
    let listener = in_netns(to.map(str::to_string).as_deref(), move || {
        TcpListener::bind(SocketAddrV4::new(to_ip, 0)).expect("bind listener")
    });
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let connected = in_netns(Some(from), move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map(drop)
    });
    assert!(
        connected.is_ok(),
        "{from} cannot reach {addr}: {connected:?}"
    );
    let _ = listener.accept();
}

/// Everything `up` creates is gone.
pub fn assert_nothing_left(cluster: &Cluster, pids: &[u32], nodes: u32) {
    for k in 1..=nodes {
        assert!(!netns_exists(&format!("node-{k}")), "netns node-{k} left");
        assert!(!link_exists(&format!("mbn-{k}")), "device mbn-{k} left");
        let cgroup = format!("/sys/fs/cgroup/unified/membrane/node-{k}");
        assert!(!Path::new(&cgroup).exists(), "cgroup {cgroup} left");
    }
    assert!(!netns_exists("external"), "netns external left");
    for link in ["mbr0", "mbn-ext"] {
        assert!(!link_exists(link), "device {link} left");
    }
    for pid in pids {
        assert!(!alive(*pid), "process {pid} still runs");
    }
    assert!(!Path::new(BPF_ROOT).exists(), "{BPF_ROOT} left");
    let dir = cluster.dir();
    for gone in ["cluster.json", "created.json", "pids", "etcd", "nodes"] {
        assert!(!dir.join(gone).exists(), "{gone} left in the state dir");
    }
    for kept in ["logs/etcd.log", "tls/ca.pem", "tls/cli.pem"] {
        assert!(dir.join(kept).exists(), "{kept} should be kept");
    }
}

/// Like [`in_netns`], but leaves the thread running (for servers).
pub fn spawn_in_netns(
    netns: &str,
    f: impl FnOnce() + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let path = Path::new("/run/netns").join(netns);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// TCP echo servers on `tcp_ports` and UDP echo servers on `udp_ports`,
/// bound inside `netns` for the rest of the test process.
pub fn echo_servers_on(netns: &str, tcp_ports: &[u16], udp_ports: &[u16]) {
    use std::io::{Read as _, Write as _};
    for &port in tcp_ports {
        let (tx, rx) = std::sync::mpsc::channel();
        spawn_in_netns(netns, move || {
            let l = std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind tcp");
            tx.send(()).expect("ready");
            for conn in l.incoming().flatten() {
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
        rx.recv_timeout(Duration::from_secs(5))
            .expect("tcp server up");
    }
    for &port in udp_ports {
        let (tx, rx) = std::sync::mpsc::channel();
        spawn_in_netns(netns, move || {
            let s = std::net::UdpSocket::bind(("0.0.0.0", port)).expect("bind udp");
            tx.send(()).expect("ready");
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], peer);
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("udp server up");
    }
}

/// Whether a TCP round trip from inside `netns` to `ip:port` works
/// (optionally from source address `bind`), within `timeout`.
pub fn tcp_ok(netns: &str, ip: &str, port: u16, bind: Option<&str>, timeout: Duration) -> bool {
    let mut addr = format!("TCP:{ip}:{port},connect-timeout={}", timeout.as_secs_f32());
    if let Some(b) = bind {
        addr.push_str(&format!(",bind={b}"));
    }
    let mut child = match Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{netns}"),
            "socat",
            "-T",
            &format!("{}", timeout.as_secs_f32()),
            "-",
            &addr,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(_) => return false,
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = std::io::Write::write_all(&mut stdin, b"membrane\n");
    }
    child
        .wait_with_output()
        .map(|o| o.status.success() && o.stdout == b"membrane\n")
        .unwrap_or(false)
}

/// Whether one ping from inside `netns` to `ip` is answered within a second.
pub fn ping_ok(netns: &str, ip: &str) -> bool {
    Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{netns}"),
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            ip,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
