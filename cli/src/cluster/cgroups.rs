//! Pods' cgroups: `<root>/<node>/<pod netns>`, below the node's cgroup, to
//! which the node agent attaches socket load balancing (`--service-lb`).
//! `MEMBRANE_CGROUP_ROOT` overrides the root, as for the agent.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The root of every node's cgroup.
pub fn root() -> PathBuf {
    std::env::var_os("MEMBRANE_CGROUP_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup/unified/membrane"))
}

/// Kills every process in cgroup `dir` (`cgroup.kill`) and removes it.
/// A missing cgroup is fine.
pub fn kill_and_remove(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    // cgroup.kill (Linux 5.14) kills the whole subtree at once; processes
    // that fork meanwhile are caught too.
    if let Err(e) = std::fs::write(dir.join("cgroup.kill"), "1")
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(format!("kill the processes of {}: {e}", dir.display()));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // Busy until the killed processes are reaped.
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("remove cgroup {}: {e}", dir.display())),
        }
    }
}

/// Removes `dir` if it is empty (other clusters' pods may share it).
pub fn remove_if_empty(dir: &Path) {
    let _ = std::fs::remove_dir(dir);
}
