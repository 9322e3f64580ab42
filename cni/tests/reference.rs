//! Side by side with the reference plugins (Debian's
//! `containernetworking-plugins`: `bridge` + `host-local`, libcni 1.1):
//! where our output overlaps theirs, the JSON shapes and error codes agree,
//! and where they differ the difference is asserted here, so it stays known.
//!
//! Known differences, each pinned by an assertion below:
//! - our error objects always carry `cniVersion` and `details` (the spec
//!   requires the former); libcni 1.1 prints neither `cniVersion` nor an
//!   empty `details`;
//! - unknown `CNI_ARGS` keys: ours 4 (invalid environment), theirs 999;
//! - CHECK without `prevResult`: ours 7 (invalid network config), theirs 999;
//! - a missing `CNI_COMMAND`: ours code 4, theirs prints an "about" line on
//!   stderr and exits 0;
//! - cniVersion 0.1.0/0.2.0: they accept, we answer code 1;
//! - DEL of an unknown container: both succeed silently when the plugin can
//!   decide; without a reachable agent we answer 11 (try again later),
//!   because the agent owns the address to release (see `plugin::del`).
//!
//! Comparing the error paths needs only the reference binaries; the ADD/DEL
//! comparisons create a network namespace and a bridge, so they need root.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use membrane_cni::result::{Attachment, CniVersion, Dns, Success};
use serde_json::{Value, json};
use support::{Outcome, error_keys, keys, ours, run};

const REFERENCE_DIR: &str = "/usr/lib/cni";

/// The reference `bridge` plugin, or a loud skip (a failure under CI=true).
fn reference_bridge(test: &str) -> Option<PathBuf> {
    let bridge = Path::new(REFERENCE_DIR).join("bridge");
    if bridge.exists() && Path::new(REFERENCE_DIR).join("host-local").exists() {
        return Some(bridge);
    }
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "{test}: reference plugins missing (apt-get install -y containernetworking-plugins), and CI=true forbids skipping"
    );
    eprintln!(
        "\n!!!!!!!!!! SKIPPED (needs {REFERENCE_DIR}/bridge: apt-get install containernetworking-plugins): {test} !!!!!!!!!!\n"
    );
    None
}

/// A complete environment for `command`; ours gets a socket nobody serves.
fn env<'a>(
    command: &'a str,
    netns: &'a str,
    container: &'a str,
    socket: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", REFERENCE_DIR),
        ("MEMBRANE_AGENT_SOCKET", socket),
    ]
}

fn ours_conf(version: &str) -> String {
    json!({"cniVersion": version, "name": "membrane", "type": "membrane-cni"}).to_string()
}

/// A reference netconf; without `ipam.subnet` a real ADD is impossible, but
/// the error paths never get that far.
fn ref_conf(version: &str, bridge: &str, subnet: &str, data_dir: &Path) -> String {
    json!({
        "cniVersion": version, "name": "membrane-ref", "type": "bridge",
        "bridge": bridge, "isGateway": true, "isDefaultGateway": true, "ipMasq": false,
        "ipam": {"type": "host-local", "subnet": subnet, "dataDir": data_dir}
    })
    .to_string()
}

/// Asserts both failed with `code`, and that the reference's error keys are
/// a subset of ours (which always has exactly cniVersion/code/msg/details).
fn same_error(case: &str, theirs: &Outcome, ours: &Outcome, code: u64) {
    let t = theirs.expect_error(code);
    let o = ours.expect_error(code);
    assert_eq!(keys(&o), error_keys(), "{case}: ours {o}");
    assert!(keys(&t).is_subset(&error_keys()), "{case}: theirs {t}");
    assert!(
        !keys(&t).contains("cniVersion"),
        "{case}: libcni 1.1 started printing cniVersion: update the docs"
    );
}

// === Without root: VERSION and error paths ===

#[test]
fn version_answers_have_the_same_keys_and_we_support_a_subset_of_the_reference_versions() {
    let Some(bridge) = reference_bridge("version_answers") else {
        return;
    };
    let theirs = run(&bridge, &[("CNI_COMMAND", "VERSION")], "");
    let ours = run(&ours(), &[("CNI_COMMAND", "VERSION")], "");
    assert_eq!((theirs.status, ours.status), (0, 0));
    let (t, o) = (theirs.json(), ours.json());
    assert_eq!(keys(&t), keys(&o));
    assert_eq!(t["cniVersion"], o["cniVersion"]);
    let set = |v: &Value| -> BTreeSet<String> {
        v["supportedVersions"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|s| s.as_str().map(String::from))
            .collect()
    };
    assert!(set(&o).is_subset(&set(&t)), "ours {o}, theirs {t}");
    // The difference: they still speak 0.1.0 and 0.2.0.
    let extra: Vec<String> = set(&t).difference(&set(&o)).cloned().collect();
    assert_eq!(extra, ["0.1.0", "0.2.0"]);
}

#[test]
fn the_same_bad_input_gets_the_same_error_code_from_both() {
    let Some(bridge) = reference_bridge("same_bad_input") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock").display().to_string();
    let bridge_name = format!("mcnibad{}", std::process::id() % 100_000);
    let _cleanup = LinkCleanup(bridge_name.clone());
    let theirs_conf = ref_conf("1.0.0", &bridge_name, "198.51.100.0/27", dir.path());
    let our_conf = ours_conf("1.0.0");
    let netns = "/var/run/netns/membrane-cni-nonexistent";

    let compare = |case: &str, vars: &[(&str, &str)], theirs_in: &str, ours_in: &str, code: u64| {
        same_error(
            case,
            &run(&bridge, vars, theirs_in),
            &run(&ours(), vars, ours_in),
            code,
        );
    };
    let add = env("ADD", netns, "c0ffee", &socket);
    let without = |key: &str| -> Vec<(&str, &str)> {
        add.iter().copied().filter(|(k, _)| *k != key).collect()
    };

    compare(
        "missing CNI_NETNS",
        &without("CNI_NETNS"),
        &theirs_conf,
        &our_conf,
        4,
    );
    compare(
        "missing CNI_CONTAINERID",
        &without("CNI_CONTAINERID"),
        &theirs_conf,
        &our_conf,
        4,
    );
    compare(
        "unknown CNI_COMMAND",
        &env("FROB", netns, "c0ffee", &socket),
        &theirs_conf,
        &our_conf,
        4,
    );
    compare(
        "GC (spec 1.1.0)",
        &env("GC", netns, "c0ffee", &socket),
        &theirs_conf,
        &our_conf,
        4,
    );
    compare(
        "invalid container id",
        &env("ADD", netns, "-c0ffee", &socket),
        &theirs_conf,
        &our_conf,
        4,
    );
    compare("malformed JSON", &add, "{bad", "{bad", 6);
    compare("empty stdin", &add, "", "", 6);
    let (theirs_v, ours_v) = (
        theirs_conf.replace("1.0.0", "9.9.9"),
        our_conf.replace("1.0.0", "9.9.9"),
    );
    compare("unsupported cniVersion", &add, &theirs_v, &ours_v, 1);

    // An invalid interface name: both 4 (checked separately: CNI_IFNAME).
    let mut vars = env("ADD", netns, "c0ffee", &socket);
    vars.retain(|(k, _)| *k != "CNI_IFNAME");
    vars.push(("CNI_IFNAME", "eth0/bad"));
    same_error(
        "invalid CNI_IFNAME",
        &run(&bridge, &vars, &theirs_conf),
        &run(&ours(), &vars, &our_conf),
        4,
    );
}

#[test]
fn the_known_error_differences_from_the_reference_are_as_documented() {
    let Some(bridge) = reference_bridge("known_differences") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock").display().to_string();
    // With cniVersion 0.2.0 the reference plugin gets as far as creating its
    // bridge (when root) before failing on the netns: remove it afterwards.
    let bridge_name = format!("mcnierr{}", std::process::id() % 100_000);
    let _cleanup = LinkCleanup(bridge_name.clone());
    let theirs_conf = ref_conf("1.0.0", &bridge_name, "198.51.100.32/27", dir.path());
    let netns = "/var/run/netns/membrane-cni-nonexistent";

    // Unknown CNI_ARGS: theirs 999 (a plain Go error), ours 4.
    let mut vars = env("ADD", netns, "c0ffee", &socket);
    vars.push(("CNI_ARGS", "FOO=bar"));
    run(&bridge, &vars, &theirs_conf).expect_error(999);
    run(&ours(), &vars, &ours_conf("1.0.0")).expect_error(4);

    // No CNI_COMMAND: theirs exits 0 with an "about" line; ours code 4.
    let vars: Vec<_> = env("ADD", netns, "c0ffee", &socket)
        .into_iter()
        .filter(|(k, _)| *k != "CNI_COMMAND")
        .collect();
    let theirs = run(&bridge, &vars, &theirs_conf);
    assert_eq!(
        (theirs.status, theirs.stdout.as_str()),
        (0, ""),
        "{theirs:?}"
    );
    run(&ours(), &vars, &ours_conf("1.0.0")).expect_error(4);

    // cniVersion 0.2.0: they would go on to ADD (and fail on the missing
    // netns, 999); we refuse the version.
    let vars = env("ADD", netns, "c0ffee", &socket);
    run(&bridge, &vars, &theirs_conf.replace("1.0.0", "0.2.0")).expect_error(999);
    run(&ours(), &vars, &ours_conf("0.2.0")).expect_error(1);

    // Errors: their objects omit cniVersion (and an empty details).
    let t = run(
        &bridge,
        &env("FROB", netns, "c0ffee", &socket),
        &theirs_conf,
    )
    .expect_error(4);
    assert_eq!(keys(&t), ["code", "msg"].map(String::from).into());
}

/// Deletes a link on drop, if it exists (best effort).
struct LinkCleanup(String);

impl Drop for LinkCleanup {
    fn drop(&mut self) {
        if Path::new("/sys/class/net").join(&self.0).exists() {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
}

// === With root: real ADD / DEL of the reference plugins ===

/// A network namespace plus the reference bridge and IPAM state it gets,
/// all removed on drop (DEL through the reference plugin first).
struct RefNetwork {
    netns: String,
    bridge: String,
    subnet: String,
    ipam: tempfile::TempDir,
    plugin: PathBuf,
    added: Vec<(String, String)>,
}

impl RefNetwork {
    fn create(plugin: &Path) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{n}", std::process::id() % 100_000);
        let netns = format!("membrane-cni-ref-{id}");
        ip(&["netns", "add", &netns]);
        Self {
            netns,
            bridge: format!("mcni{id}"),
            // TEST-NET-2: never routed anywhere, so no clash with the host.
            subnet: format!("198.51.100.{}/27", 64 + (n % 6) * 32),
            ipam: tempfile::tempdir().expect("ipam dir"),
            plugin: plugin.to_path_buf(),
            added: Vec::new(),
        }
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.netns)
    }

    fn conf(&self, version: &str) -> String {
        ref_conf(version, &self.bridge, &self.subnet, self.ipam.path())
    }

    fn invoke(&self, command: &str, container: &str, version: &str) -> Outcome {
        let path = self.path();
        run(
            &self.plugin,
            &env(command, &path, container, ""),
            &self.conf(version),
        )
    }

    fn add(&mut self, container: &str, version: &str) -> Value {
        let out = self.invoke("ADD", container, version);
        assert_eq!(out.status, 0, "reference ADD: {out:?}");
        self.added
            .push((container.to_string(), version.to_string()));
        out.json()
    }
}

impl Drop for RefNetwork {
    fn drop(&mut self) {
        for (container, version) in std::mem::take(&mut self.added) {
            let _ = self.invoke("DEL", &container, &version);
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

fn our_add_result(version: CniVersion) -> Value {
    let attached = Attachment {
        host_ifname: "lxc0c0ffee".into(),
        host_mac: "02:00:00:00:00:01".into(),
        pod_ifname: "eth0".into(),
        pod_mac: "02:00:0a:c8:00:05".into(),
        address: "10.200.0.5/32".parse().expect("address"),
        gateway: "10.200.0.1".parse().expect("gateway"),
    };
    serde_json::to_value(Success::attached(
        version,
        &attached,
        "/var/run/netns/pod",
        Dns::default(),
    ))
    .expect("serialize")
}

#[test]
fn the_reference_add_result_round_trips_through_our_result_types_with_our_shape() {
    let test = "reference_add_result_round_trips";
    if !membrane_test_support::privileged(test) {
        return;
    }
    let Some(bridge) = reference_bridge(test) else {
        return;
    };
    for version in [
        CniVersion::V1_0_0,
        CniVersion::V0_4_0,
        CniVersion::V0_3_1,
        CniVersion::V0_3_0,
    ] {
        let mut net = RefNetwork::create(&bridge);
        let theirs = net.add("c0ffee", version.as_str());

        // Decoding loses nothing: every field of theirs is one of ours.
        let decoded: Success = serde_json::from_value(theirs.clone()).unwrap_or_else(|e| {
            panic!("{version}: reference result does not decode: {e}\n{theirs}")
        });
        assert_eq!(
            serde_json::to_value(&decoded).expect("serialize"),
            theirs,
            "{version}: round trip"
        );
        assert!(
            decoded.has_sandbox_interface("eth0", &net.path()),
            "{version}: {theirs}"
        );

        // Same shape: top-level keys, and the keys of each kind of entry.
        let ours = our_add_result(version);
        assert_eq!(keys(&theirs), keys(&ours), "{version}: top-level keys");
        let sandbox_if = |v: &Value| {
            v["interfaces"]
                .as_array()
                .and_then(|a| a.iter().find(|i| i.get("sandbox").is_some()).cloned())
                .unwrap_or_default()
        };
        assert_eq!(
            keys(&sandbox_if(&theirs)),
            keys(&sandbox_if(&ours)),
            "{version}: pod interface"
        );
        assert_eq!(
            keys(&theirs["interfaces"][0]),
            keys(&ours["interfaces"][0]),
            "{version}: host interface"
        );
        assert_eq!(
            keys(&theirs["ips"][0]),
            keys(&ours["ips"][0]),
            "{version}: ips"
        );
        assert_eq!(
            keys(&theirs["routes"][0]),
            keys(&ours["routes"][0]),
            "{version}: routes"
        );
        assert_eq!(
            theirs["ips"][0].get("version").is_some(),
            version < CniVersion::V1_0_0
        );
        assert_eq!(theirs["cniVersion"], version.as_str());
    }
}

#[test]
fn del_is_idempotent_in_the_reference_and_ours_defers_to_the_agent() {
    let test = "del_idempotency";
    if !membrane_test_support::privileged(test) {
        return;
    }
    let Some(bridge) = reference_bridge(test) else {
        return;
    };
    let mut net = RefNetwork::create(&bridge);
    net.add("c0ffee", "1.0.0");

    // CHECK without prevResult (a known difference): theirs 999, ours 7.
    net.invoke("CHECK", "c0ffee", "1.0.0").expect_error(999);
    let path = net.path();
    run(
        &ours(),
        &env("CHECK", &path, "c0ffee", ""),
        &ours_conf("1.0.0"),
    )
    .expect_error(7);

    // Theirs: DEL, DEL again, DEL of a container never added, DEL without a
    // netns: all exit 0 and print nothing.
    for container in ["c0ffee", "c0ffee", "never-added"] {
        let out = net.invoke("DEL", container, "1.0.0");
        assert_eq!(
            (out.status, out.stdout.as_str()),
            (0, ""),
            "{container}: {out:?}"
        );
    }
    net.added.clear();
    let mut vars = env("DEL", "", "never-added", "");
    vars.retain(|(k, _)| *k != "CNI_NETNS");
    let out = run(&bridge, &vars, &net.conf("1.0.0"));
    assert_eq!(
        (out.status, out.stdout.as_str()),
        (0, ""),
        "no netns: {out:?}"
    );

    // Ours, same DEL without a reachable agent: code 11, on purpose.
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock").display().to_string();
    run(
        &ours(),
        &env("DEL", &path, "never-added", &socket),
        &ours_conf("1.0.0"),
    )
    .expect_error(11);
    let mut vars = env("DEL", "", "never-added", &socket);
    vars.retain(|(k, _)| *k != "CNI_NETNS");
    run(&ours(), &vars, &ours_conf("1.0.0")).expect_error(11);
}
