//! Host networking for the local cluster: the bridge, network namespaces,
//! veth pairs, and the bpffs mount.
//!
//! Netlink work shells out to `ip` (iproute2) on purpose: the commands are
//! the ones an operator would type to inspect or repair the same state, and
//! every failure names the exact command and its stderr. Nothing else in the
//! CLI runs `ip`.

use std::path::Path;
use std::process::Command;

/// Where `ip netns add` keeps namespace handles.
pub const NETNS_DIR: &str = "/run/netns";

/// Where bpffs is expected; node datapaths pin under it.
pub const BPFFS: &str = "/sys/fs/bpf";

/// A failed host networking command.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The command could not be started at all.
    #[error("run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not start.
        source: std::io::Error,
    },
    /// The command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Mounting bpffs failed.
    #[error("mount bpffs at {BPFFS}: {0}")]
    Mount(nix::Error),
}

/// Runs `program args...`, returning stdout; failures carry the command line
/// and stderr.
fn run(program: &str, args: &[&str]) -> Result<String, NetError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| NetError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetError::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String, NetError> {
    run("ip", args)
}

/// The path `nsenter --net=` takes for a named namespace.
pub fn netns_path(name: &str) -> String {
    format!("{NETNS_DIR}/{name}")
}

/// Whether a named network namespace exists.
pub fn netns_exists(name: &str) -> bool {
    Path::new(&netns_path(name)).exists()
}

/// Whether a network device exists in the host (our own) namespace.
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// `ip netns add NAME`.
pub fn add_netns(name: &str) -> Result<(), NetError> {
    ip(&["netns", "add", name]).map(drop)
}

/// `ip netns del NAME`; a namespace already gone is fine.
pub fn del_netns(name: &str) -> Result<(), NetError> {
    if !netns_exists(name) {
        return Ok(());
    }
    ip(&["netns", "del", name]).map(drop)
}

/// `ip link del NAME`; a device already gone (e.g. a veth whose peer's
/// namespace was deleted) is fine.
pub fn del_link(name: &str) -> Result<(), NetError> {
    if !link_exists(name) {
        return Ok(());
    }
    match ip(&["link", "del", name]) {
        Err(_) if !link_exists(name) => Ok(()),
        other => other.map(drop),
    }
}

/// Creates the bridge with `addr` (`A.B.C.D/P`) and brings it up.
pub fn add_bridge(name: &str, addr: &str) -> Result<(), NetError> {
    ip(&["link", "add", name, "type", "bridge"])?;
    ip(&["addr", "add", addr, "dev", name])?;
    ip(&["link", "set", name, "up"]).map(drop)
}

/// Connects namespace `netns` to `bridge`: a veth pair whose host end is
/// `host_dev` (enslaved, up) and whose other end is created directly inside
/// the namespace as `ns_dev` — so it never clashes with a host `eth0` —
/// with `addr`, a default route via `gateway`, `lo` up and IPv4 forwarding on
/// (the node datapath routes pod traffic).
pub fn connect_netns(
    bridge: &str,
    netns: &str,
    host_dev: &str,
    ns_dev: &str,
    addr: &str,
    gateway: &str,
) -> Result<(), NetError> {
    ip(&[
        "link", "add", host_dev, "type", "veth", "peer", "name", ns_dev, "netns", netns,
    ])?;
    ip(&["link", "set", host_dev, "master", bridge, "up"])?;
    ip(&["-n", netns, "addr", "add", addr, "dev", ns_dev])?;
    ip(&["-n", netns, "link", "set", ns_dev, "up"])?;
    ip(&["-n", netns, "link", "set", "lo", "up"])?;
    ip(&["-n", netns, "route", "replace", "default", "via", gateway])?;
    // `ip netns exec` is fine for a one-shot sysctl: its /sys remount only
    // matters to long-lived processes that need /sys/fs/bpf.
    ip(&[
        "netns",
        "exec",
        netns,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ip_forward=1",
    ])
    .map(drop)
}

/// Whether `path` is a mount point, from /proc/self/mountinfo (field 5).
fn is_mountpoint(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| {
            info.lines()
                .any(|line| line.split(' ').nth(4) == Some(path))
        })
        .unwrap_or(false)
}

/// Mounts bpffs at /sys/fs/bpf unless something is mounted there already.
/// It stays mounted after `down`: other tools may pin there too.
pub fn ensure_bpffs() -> Result<bool, NetError> {
    if is_mountpoint(BPFFS) {
        return Ok(false);
    }
    nix::mount::mount(
        Some("bpffs"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(NetError::Mount)?;
    Ok(true)
}

/// Runs `ip ARGS` inside network namespace `netns` (`ip -n`).
pub fn ip_in_netns(netns: &str, args: &[&str]) -> Result<String, NetError> {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    ip(&full)
}
