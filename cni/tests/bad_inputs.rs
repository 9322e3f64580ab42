//! Our binary fed bad input: every failure is one spec-shaped JSON error on
//! stdout with exit status 1, never a panic. Needs no agent and no root.

mod support;

use serde_json::json;
use support::{error_keys, keys, ours, run};

const NETCONF: &str = r#"{"cniVersion":"1.0.0","name":"membrane","type":"membrane-cni"}"#;

/// A complete ADD environment pointing at a socket nobody listens on.
fn env<'a>(command: &'a str, socket: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", "/var/run/netns/nonexistent"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        ("MEMBRANE_AGENT_SOCKET", socket),
    ]
}

fn without<'a>(mut vars: Vec<(&'a str, &'a str)>, key: &str) -> Vec<(&'a str, &'a str)> {
    vars.retain(|(k, _)| *k != key);
    vars
}

fn absent_socket() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.sock").display().to_string();
    (dir, path)
}

#[test]
fn version_prints_the_supported_versions_and_exits_0() {
    let out = run(&ours(), &[("CNI_COMMAND", "VERSION")], "");
    assert_eq!(out.status, 0);
    assert_eq!(
        out.json(),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]})
    );
}

#[test]
fn malformed_json_is_code_6() {
    let (_d, sock) = absent_socket();
    let v = run(&ours(), &env("ADD", &sock), "{bad").expect_error(6);
    assert_eq!(keys(&v), error_keys());
}

#[test]
fn empty_stdin_is_code_6() {
    let (_d, sock) = absent_socket();
    run(&ours(), &env("ADD", &sock), "").expect_error(6);
}

#[test]
fn missing_cni_netns_on_add_is_code_4() {
    let (_d, sock) = absent_socket();
    let v = run(&ours(), &without(env("ADD", &sock), "CNI_NETNS"), NETCONF).expect_error(4);
    assert_eq!(keys(&v), error_keys());
    assert!(
        v["msg"].as_str().is_some_and(|m| m.contains("CNI_NETNS")),
        "{v}"
    );
}

#[test]
fn an_unknown_cni_command_is_code_4() {
    let (_d, sock) = absent_socket();
    let v = run(&ours(), &env("FROB", &sock), NETCONF).expect_error(4);
    assert_eq!(keys(&v), error_keys());
}

#[test]
fn a_missing_cni_command_is_code_4() {
    let (_d, sock) = absent_socket();
    run(&ours(), &without(env("ADD", &sock), "CNI_COMMAND"), NETCONF).expect_error(4);
}

#[test]
fn gc_and_status_are_refused_as_unsupported_commands() {
    let (_d, sock) = absent_socket();
    for cmd in ["GC", "STATUS"] {
        let v = run(&ours(), &env(cmd, &sock), NETCONF).expect_error(4);
        assert!(
            v["details"].as_str().is_some_and(|d| d.contains("1.1.0")),
            "{v}"
        );
    }
}

#[test]
fn an_unsupported_cni_version_is_code_1() {
    let (_d, sock) = absent_socket();
    let conf = NETCONF.replace("1.0.0", "0.2.0");
    let v = run(&ours(), &env("ADD", &sock), &conf).expect_error(1);
    assert_eq!(keys(&v), error_keys());
    assert_eq!(
        v["cniVersion"], "1.0.0",
        "printed in our version, not the unsupported one"
    );
}

#[test]
fn errors_after_the_version_is_known_are_printed_in_that_version() {
    let (_d, sock) = absent_socket();
    let conf = NETCONF.replace("1.0.0", "0.4.0");
    let v = run(&ours(), &without(env("ADD", &sock), "CNI_IFNAME"), &conf).expect_error(4);
    assert_eq!(v["cniVersion"], "0.4.0");
}

#[test]
fn an_ipam_section_is_code_2() {
    let (_d, sock) = absent_socket();
    let conf = r#"{"cniVersion":"1.0.0","name":"membrane","type":"membrane-cni","ipam":{"type":"host-local"}}"#;
    run(&ours(), &env("ADD", &sock), conf).expect_error(2);
}

#[test]
fn a_wrongly_typed_field_is_code_7() {
    let (_d, sock) = absent_socket();
    let conf = r#"{"cniVersion":"1.0.0","name":"membrane","type":"membrane-cni","socket":42}"#;
    let v = run(&ours(), &env("ADD", &sock), conf).expect_error(7);
    assert!(
        v["details"].as_str().is_some_and(|d| d.contains("socket")),
        "{v}"
    );
}

#[test]
fn unknown_cni_args_are_code_4_unless_ignore_unknown() {
    let (_d, sock) = absent_socket();
    let mut vars = env("ADD", &sock);
    vars.push(("CNI_ARGS", "FOO=bar"));
    run(&ours(), &vars, NETCONF).expect_error(4);

    // With IgnoreUnknown the input is valid, so the plugin goes on to the
    // (absent) agent: code 11, not 4.
    let mut vars = env("ADD", &sock);
    vars.push(("CNI_ARGS", "IgnoreUnknown=1;FOO=bar;K8S_POD_NAME=web-0"));
    run(&ours(), &vars, NETCONF).expect_error(11);
}

#[test]
fn check_without_prev_result_is_code_7() {
    let (_d, sock) = absent_socket();
    run(&ours(), &env("CHECK", &sock), NETCONF).expect_error(7);
}

#[test]
fn add_and_del_without_a_reachable_agent_are_code_11() {
    let (_d, sock) = absent_socket();
    let v = run(&ours(), &env("ADD", &sock), NETCONF).expect_error(11);
    assert!(
        v["details"].as_str().is_some_and(|d| d.contains(&sock)),
        "{v}"
    );
    // DEL must not pretend: the agent holds the address to release.
    run(&ours(), &without(env("DEL", &sock), "CNI_NETNS"), NETCONF).expect_error(11);
}

#[test]
fn the_netconf_socket_field_wins_over_the_environment() {
    let (_d, sock) = absent_socket();
    let (_d2, other) = absent_socket();
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"membrane","type":"membrane-cni","socket":"{other}"}}"#
    );
    let v = run(&ours(), &env("ADD", &sock), &conf).expect_error(11);
    assert!(
        v["details"].as_str().is_some_and(|d| d.contains(&other)),
        "{v}"
    );
}

#[test]
fn binary_garbage_on_stdin_is_code_6_without_a_panic() {
    let (_d, sock) = absent_socket();
    let out = run(&ours(), &env("ADD", &sock), "\u{0}\u{1}\u{fffd}");
    out.expect_error(6);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}
