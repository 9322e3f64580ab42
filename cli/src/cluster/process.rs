//! Starting and stopping the cluster's processes.
//!
//! Every process runs in its own session (through util-linux `setsid`), so a
//! Ctrl-C in the terminal that ran `membrane up` reaches only `membrane`,
//! which then stops the cluster in order. Output is appended to
//! `DIR/logs/NAME.log` and the pid written to `DIR/pids/NAME.pid`: `down`
//! needs nothing else to find its processes, even after `up` crashed.
//!
//! Before signalling a pid from a pid file, `down` checks `/proc/PID/cmdline`
//! still names the expected program, so a recycled pid is never killed.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use super::net;

/// How long `down` waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A process `up` started.
#[derive(Debug)]
pub struct Spawned {
    /// Component name (`etcd`, `ipam`, `node-1`): names the log and pid files.
    pub name: String,
    /// Its pid (also its process group and session id).
    pub pid: u32,
    /// The handle, to notice an early exit and to reap it.
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
}

/// What to run. Saved as `DIR/launch/NAME.json` so `membrane restart` can
/// start the component again exactly as `up` did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Launch {
    /// Component name.
    pub name: String,
    /// Absolute path of the program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Environment to set; inherited `MEMBRANE_*` variables are removed first
    /// so the user's shell cannot leak settings (e.g. `MEMBRANE_STATE_DIR`).
    pub env: Vec<(String, String)>,
    /// Network namespace to run in (entered with `nsenter --net`, which,
    /// unlike `ip netns exec`, leaves /sys — and so /sys/fs/bpf — as is).
    pub netns: Option<String>,
}

/// The pid file of component `name`.
pub fn pid_file(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("pids").join(format!("{name}.pid"))
}

/// How component `name` was started.
pub fn launch_file(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("launch").join(format!("{name}.json"))
}

/// The log file of component `name`.
pub fn log_file(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("logs").join(format!("{name}.log"))
}

/// Starts `launch` detached, logging to its log file; records its pid.
pub fn spawn(state_dir: &Path, launch: &Launch) -> anyhow::Result<Spawned> {
    let log = log_file(state_dir, &launch.name);
    let pid_path = pid_file(state_dir, &launch.name);
    for dir in [log.parent(), pid_path.parent()].into_iter().flatten() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("open {}", log.display()))?;
    let err = out.try_clone().context("duplicate log file handle")?;

    let mut cmd = Command::new("setsid");
    if let Some(netns) = &launch.netns {
        cmd.arg("nsenter")
            .arg(format!("--net={}", net::netns_path(netns)))
            .arg("--");
    }
    cmd.arg(&launch.program).args(&launch.args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MEMBRANE_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out.try_clone().context("duplicate log file handle")?)
        .stderr(err);

    writeln!(
        out,
        "--- membrane up: starting {} at unix time {}: {:?}",
        launch.name,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        cmd
    )
    .with_context(|| format!("write {}", log.display()))?;

    let saved = launch_file(state_dir, &launch.name);
    if let Some(dir) = saved.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(
        &saved,
        serde_json::to_vec_pretty(launch).context("serialize launch")?,
    )
    .with_context(|| format!("write {}", saved.display()))?;

    let child = cmd
        .spawn()
        .with_context(|| format!("start {} ({})", launch.name, launch.program.display()))?;
    let pid = child.id();
    std::fs::write(&pid_path, format!("{pid}\n"))
        .with_context(|| format!("write {}", pid_path.display()))?;
    Ok(Spawned {
        name: launch.name.clone(),
        pid,
        child,
        log,
    })
}

/// Whether `pid` is a live process (zombies count as gone: with no reaper
/// around they would otherwise look alive forever).
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the `(comm)` field, which may itself contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// Whether `pid` is still running `program_name` (a basename), possibly still
/// inside the `setsid` / `nsenter` wrappers `spawn` puts in front of it.
pub fn runs_program(pid: u32, program_name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let base = |a: &str| {
        Path::new(a)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
    };
    let Some(argv0) = args.first().and_then(|a| base(a)) else {
        return false;
    };
    (argv0 == program_name || argv0 == "setsid" || argv0 == "nsenter")
        && args
            .iter()
            .any(|a| base(a).as_deref() == Some(program_name))
}

/// A pid file found in the state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidEntry {
    /// Component name (file stem).
    pub name: String,
    /// The pid it holds.
    pub pid: u32,
    /// The file.
    pub path: PathBuf,
}

/// Every readable pid file under `DIR/pids`.
pub fn pid_entries(state_dir: &Path) -> Vec<PidEntry> {
    let Ok(dir) = std::fs::read_dir(state_dir.join("pids")) else {
        return Vec::new();
    };
    let mut entries: Vec<PidEntry> = dir
        .filter_map(Result::ok)
        .filter_map(|e| {
            let path = e.path();
            let name = path
                .file_name()?
                .to_str()?
                .strip_suffix(".pid")?
                .to_string();
            let pid = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
            Some(PidEntry { name, pid, path })
        })
        .collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    entries
}

/// Stops the processes of `entries` whose pid still runs the program
/// `program_of(name)` says: SIGTERM to each process group at once, up to
/// [`STOP_GRACE`] for all to exit, then SIGKILL. Removes the pid files.
/// Returns the names that had to be killed.
pub async fn stop_all(
    entries: &[PidEntry],
    program_of: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Vec<String>> {
    let mut ours = Vec::new();
    for entry in entries {
        let expected = program_of(&entry.name);
        match expected {
            Some(program) if is_alive(entry.pid) && runs_program(entry.pid, &program) => {
                signal(entry.pid, Signal::SIGTERM);
                ours.push(entry);
            }
            Some(_) if is_alive(entry.pid) => {
                eprintln!(
                    "  not stopping pid {} from {}: it no longer runs our program",
                    entry.pid,
                    entry.path.display()
                );
            }
            _ => {}
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    while ours.iter().any(|e| is_alive(e.pid)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut killed = Vec::new();
    for entry in ours.iter().filter(|e| is_alive(e.pid)) {
        signal(entry.pid, Signal::SIGKILL);
        killed.push(entry.name.clone());
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while ours.iter().any(|e| is_alive(e.pid)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(stuck) = ours.iter().find(|e| is_alive(e.pid)) {
        anyhow::bail!("{} (pid {}) survived SIGKILL", stuck.name, stuck.pid);
    }
    for entry in entries {
        match std::fs::remove_file(&entry.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("remove {}", entry.path.display()));
            }
            _ => {}
        }
    }
    Ok(killed)
}

/// Signals the whole process group when `pid` leads one (so helpers it forked
/// go too), else just the process.
fn signal(pid: u32, sig: Signal) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    let pid = Pid::from_raw(raw);
    let leads_group = nix::unistd::getpgid(Some(pid)).is_ok_and(|pgid| pgid == pid);
    if !leads_group || killpg(pid, sig).is_err() {
        let _ = kill(pid, sig);
    }
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_runs_its_own_program() {
        let me = std::process::id();
        assert!(is_alive(me));
        let exe = std::env::current_exe().expect("exe");
        let name = exe
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(runs_program(me, &name));
        assert!(!runs_program(me, "etcd"));
    }

    #[test]
    fn a_missing_pid_is_not_alive() {
        assert!(!is_alive(u32::MAX - 1));
        assert!(!runs_program(u32::MAX - 1, "etcd"));
    }

    #[test]
    fn pid_files_are_listed_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("pids")).expect("mkdir");
        std::fs::write(pid_file(dir.path(), "node-1"), "42\n").expect("write");
        std::fs::write(pid_file(dir.path(), "etcd"), "7\n").expect("write");
        std::fs::write(dir.path().join("pids/garbage.pid"), "x").expect("write");
        let got: Vec<_> = pid_entries(dir.path())
            .into_iter()
            .map(|e| (e.name, e.pid))
            .collect();
        assert_eq!(
            got,
            vec![("etcd".to_string(), 7), ("node-1".to_string(), 42)]
        );
    }

    #[test]
    fn the_log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("x.log");
        std::fs::write(&log, "a\nb\nc\n").expect("write");
        assert_eq!(log_tail(&log, 2), "b\nc");
    }
}
