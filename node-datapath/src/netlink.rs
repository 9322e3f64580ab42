//! Links, addresses, routes and neighbours through iproute2, in this
//! process's network namespace or, with [`in_netns`], in a pod's. Every
//! failure names the command and what `ip` printed.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// A failed `ip` (or `nsenter`/`nft`) invocation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{command}` failed: {stderr}")]
pub struct CommandError {
    /// The command line.
    pub command: String,
    /// What it printed on stderr.
    pub stderr: String,
}

/// Runs `program args`, feeding `stdin` if given; returns stdout.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, CommandError> {
    let command = format!("{program} {}", args.join(" "));
    let fail = |stderr: String| CommandError {
        command: command.clone(),
        stderr,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS` here.
pub fn ip(args: &[&str]) -> Result<String, CommandError> {
    run("ip", args, None)
}

/// Runs `ip -batch -` with `commands` (one per line) in the network
/// namespace at `netns` (a path), entering only the network namespace so
/// bpffs pins stay visible.
pub fn ip_batch_in(netns: &str, commands: &[String]) -> Result<(), CommandError> {
    let script = commands.join("\n") + "\n";
    let ns = format!("--net={netns}");
    run("nsenter", &[&ns, "ip", "-batch", "-"], Some(&script)).map(drop)
}

/// Runs `ip ARGS` in the network namespace at `netns`.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<String, CommandError> {
    let ns = format!("--net={netns}");
    let mut full = vec![ns.as_str(), "ip"];
    full.extend_from_slice(args);
    run("nsenter", &full, None)
}

/// A link's index and MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index.
    pub ifindex: u32,
    /// MAC address, `aa:bb:...`.
    pub mac: String,
}

/// Reads `ip -j link show` output for one device.
pub fn parse_link(json: &str) -> Option<LinkInfo> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let l = v.as_array()?.first()?;
    Some(LinkInfo {
        ifindex: u32::try_from(l.get("ifindex")?.as_u64()?).ok()?,
        mac: l.get("address")?.as_str()?.to_string(),
    })
}

/// A link of this namespace, `None` if it does not exist.
pub fn link(name: &str) -> Option<LinkInfo> {
    ip(&["-j", "link", "show", "dev", name])
        .ok()
        .and_then(|j| parse_link(&j))
}

/// The kind of a link of this namespace (`veth`, `bridge`, ...; `ip -d`'s
/// `linkinfo.info_kind`), `None` for a device without one (a physical NIC)
/// or that does not exist.
pub fn link_kind(name: &str) -> Option<String> {
    let json = ip(&["-j", "-d", "link", "show", "dev", name]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&json).ok()?;
    Some(
        v.as_array()?
            .first()?
            .get("linkinfo")?
            .get("info_kind")?
            .as_str()?
            .to_owned(),
    )
}

/// A link in the namespace at `netns`, `None` if it (or the namespace) does not exist.
pub fn link_in(netns: &str, name: &str) -> Option<LinkInfo> {
    ip_in(netns, &["-j", "link", "show", "dev", name])
        .ok()
        .and_then(|j| parse_link(&j))
}

/// The IPv4 addresses (with prefix) on a link in `netns`.
pub fn addrs_in(netns: &str, name: &str) -> Result<Vec<String>, CommandError> {
    let out = ip_in(netns, &["-j", "-4", "addr", "show", "dev", name])?;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| {
            l.get("addr_info")
                .and_then(|a| a.as_array())
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|a| {
            Some(format!(
                "{}/{}",
                a.get("local")?.as_str()?,
                a.get("prefixlen")?.as_u64()?
            ))
        })
        .collect())
}

/// The default route's gateway in `netns`, if any.
pub fn default_gateway_in(netns: &str) -> Result<Option<Ipv4Addr>, CommandError> {
    let out = ip_in(netns, &["-j", "-4", "route", "show", "default"])?;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    Ok(v.as_array()
        .and_then(|a| a.first())
        .and_then(|r| r.get("gateway"))
        .and_then(|g| g.as_str())
        .and_then(|g| g.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_json_yields_index_and_mac() {
        let j = r#"[{"ifindex":88,"ifname":"lxc1","address":"66:1a:3c:81:b1:12"}]"#;
        assert_eq!(
            parse_link(j),
            Some(LinkInfo {
                ifindex: 88,
                mac: "66:1a:3c:81:b1:12".into()
            })
        );
        assert_eq!(parse_link("[]"), None);
        assert_eq!(parse_link("garbage"), None);
    }

    #[test]
    fn a_failing_command_names_itself_and_its_stderr() {
        let err = ip(&["link", "show", "dev", "no-such-device-xyz"]).expect_err("must fail");
        assert_eq!(err.command, "ip link show dev no-such-device-xyz");
        assert!(err.stderr.contains("does not exist"), "{}", err.stderr);
    }
}
