//! The plugin's input, parsed into plain types: the command, the CNI_*
//! environment variables and the network configuration on stdin. Every
//! failure carries the spec error code it is reported with.
//!
//! The environment is read through a lookup function rather than
//! `std::env`, so tests never touch the process environment.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::result::{CniError, CniVersion, Dns, ErrorCode, Success};

/// Where the agent listens when neither the netconf nor the environment say.
pub const DEFAULT_SOCKET: &str = "/run/membrane/agent.sock";
/// Environment variable naming the agent socket (after netconf `socket`).
pub const SOCKET_ENV: &str = "MEMBRANE_AGENT_SOCKET";

/// Reads one environment variable; empty counts as unset, as in libcni.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

/// The CNI_* variables of an ADD, DEL or CHECK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub container_id: String,
    /// Absent only on DEL, where the runtime may have lost the namespace.
    pub netns: Option<String>,
    pub ifname: String,
    pub args: CniArgs,
}

/// The `CNI_ARGS` keys we understand (Kubernetes' conventional ones).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
}

/// The network configuration, reduced to what this plugin uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    pub version: CniVersion,
    pub name: String,
    /// The agent's unix socket: netconf `socket`, else `$MEMBRANE_AGENT_SOCKET`,
    /// else [`DEFAULT_SOCKET`].
    pub socket: PathBuf,
    /// Pod labels from `args.cni.labels` (a bare CNI call does not carry them).
    pub labels: BTreeMap<String, String>,
    /// Pod annotations from `args.cni.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// Echoed into the ADD result.
    pub dns: Dns,
    pub prev_result: Option<Success>,
}

// === Command ===

/// `CNI_COMMAND`. GC and STATUS belong to spec 1.1.0, which we do not speak;
/// they are refused by name rather than as "unknown".
pub fn command(lookup: Lookup<'_>) -> Result<Command, CniError> {
    let Some(cmd) = get(lookup, "CNI_COMMAND") else {
        return Err(env_error(
            "required env variables [CNI_COMMAND] missing",
            "set CNI_COMMAND to ADD, DEL, CHECK or VERSION",
        ));
    };
    match cmd.as_str() {
        "ADD" => Ok(Command::Add),
        "DEL" => Ok(Command::Del),
        "CHECK" => Ok(Command::Check),
        "VERSION" => Ok(Command::Version),
        "GC" | "STATUS" => Err(env_error(
            format!("unsupported CNI_COMMAND: {cmd}"),
            "GC and STATUS are CNI spec 1.1.0 commands; membrane-cni implements 1.0.0 (the agent garbage-collects endpoints itself)",
        )),
        _ => Err(env_error(
            format!("unknown CNI_COMMAND: {cmd}"),
            "expected ADD, DEL, CHECK or VERSION",
        )),
    }
}

// === Environment ===

/// The CNI_* variables `command` needs. CNI_NETNS may be absent on DEL only.
/// CNI_PATH is not required: this plugin delegates to no other plugin.
pub fn env(command: Command, lookup: Lookup<'_>) -> Result<Env, CniError> {
    let container_id = get(lookup, "CNI_CONTAINERID");
    let netns = get(lookup, "CNI_NETNS");
    let ifname = get(lookup, "CNI_IFNAME");

    let mut missing = Vec::new();
    if container_id.is_none() {
        missing.push("CNI_CONTAINERID");
    }
    if netns.is_none() && command != Command::Del {
        missing.push("CNI_NETNS");
    }
    if ifname.is_none() {
        missing.push("CNI_IFNAME");
    }
    let (Some(container_id), Some(ifname)) = (container_id, ifname) else {
        return Err(missing_env(&missing));
    };
    if !missing.is_empty() {
        return Err(missing_env(&missing));
    }

    validate_container_id(&container_id)?;
    validate_ifname(&ifname)?;
    let args = cni_args(get(lookup, "CNI_ARGS").as_deref().unwrap_or(""))?;
    Ok(Env {
        container_id,
        netns,
        ifname,
        args,
    })
}

fn missing_env(missing: &[&str]) -> CniError {
    env_error(
        format!("required env variables [{}] missing", missing.join(" ")),
        "the runtime must set CNI_CONTAINERID, CNI_IFNAME and (except on DEL) CNI_NETNS",
    )
}

/// Alphanumeric first, then alphanumerics, `_`, `.` or `-`.
fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else {
        Err(env_error("invalid characters in CNI_CONTAINERID", id))
    }
}

/// Linux interface name rules, as the spec restates them.
fn validate_ifname(name: &str) -> Result<(), CniError> {
    let why = if name == "." || name == ".." {
        Some("interface name is . or ..")
    } else if name.len() > 15 {
        Some("interface name is longer than 15 characters")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("interface name contains / or : or whitespace")
    } else {
        None
    };
    match why {
        Some(why) => Err(env_error(format!("invalid CNI_IFNAME: {why}"), name)),
        None => Ok(()),
    }
}

/// `K=V;K=V`. Unknown keys are an error unless `IgnoreUnknown` is true,
/// which is how libcni plugins treat them too.
pub fn cni_args(raw: &str) -> Result<CniArgs, CniError> {
    let mut args = CniArgs::default();
    let mut ignore_unknown = false;
    let mut unknown = Vec::new();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            return Err(env_error(
                "invalid CNI_ARGS: expected KEY=VALUE pairs separated by ;",
                pair,
            ));
        };
        match key {
            "K8S_POD_NAME" => args.pod_name = Some(value.to_string()),
            "K8S_POD_NAMESPACE" => args.pod_namespace = Some(value.to_string()),
            // Known to Kubernetes runtimes but of no use to the agent.
            "K8S_POD_INFRA_CONTAINER_ID" | "K8S_POD_UID" => {}
            "IgnoreUnknown" => {
                ignore_unknown = match value.to_ascii_lowercase().as_str() {
                    "1" | "true" => true,
                    "0" | "false" => false,
                    _ => {
                        return Err(env_error(
                            "invalid CNI_ARGS: IgnoreUnknown must be 1, 0, true or false",
                            pair,
                        ));
                    }
                }
            }
            _ => unknown.push(pair),
        }
    }
    if !unknown.is_empty() && !ignore_unknown {
        return Err(env_error(
            format!("unknown CNI_ARGS: {}", unknown.join(";")),
            "add IgnoreUnknown=1 to CNI_ARGS to ignore keys membrane-cni does not know",
        ));
    }
    Ok(args)
}

// === Network configuration ===

/// Step one: stdin must be a JSON object.
pub fn decode(stdin: &[u8]) -> Result<Map<String, Value>, CniError> {
    match serde_json::from_slice::<Value>(stdin) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(CniError::new(
            ErrorCode::DecodeFailure,
            "error decoding network configuration",
            format!("expected a JSON object on stdin, got {}", kind(&other)),
        )),
        Err(e) => Err(CniError::new(
            ErrorCode::DecodeFailure,
            "error decoding network configuration",
            if stdin.iter().all(u8::is_ascii_whitespace) {
                "stdin is empty".to_string()
            } else {
                e.to_string()
            },
        )),
    }
}

/// Step two: `cniVersion`, first, so every later error can be printed in
/// the version the runtime asked for.
pub fn version(doc: &Map<String, Value>) -> Result<CniVersion, CniError> {
    let requested = match doc.get("cniVersion") {
        Some(Value::String(s)) => s.as_str(),
        // libcni reads a missing cniVersion as 0.1.0, which we do not speak.
        None => "0.1.0",
        Some(other) => {
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                "invalid network configuration: cniVersion must be a string",
                format!("cniVersion is {}", kind(other)),
            ));
        }
    };
    CniVersion::parse(requested).ok_or_else(|| {
        let supported: Vec<&str> = CniVersion::ALL.iter().map(|v| v.as_str()).collect();
        CniError::new(
            ErrorCode::IncompatibleVersion,
            "incompatible CNI versions",
            format!("config is {requested:?}, plugin supports {supported:?}"),
        )
    })
}

/// Step three: the fields we use. Unknown fields are ignored (runtimes add
/// their own), except `ipam`: addresses come from the agent, and silently
/// ignoring an IPAM section would hand out addresses the operator did not ask for.
pub fn netconf(
    doc: Map<String, Value>,
    version: CniVersion,
    lookup: Lookup<'_>,
) -> Result<NetConf, CniError> {
    if let Some(ipam) = doc.get("ipam").filter(|v| !v.is_null()) {
        return Err(CniError::new(
            ErrorCode::UnsupportedField,
            format!("unsupported field in network configuration: ipam = {ipam}"),
            "membrane-cni takes pod addresses from the node agent; remove the ipam section",
        ));
    }
    let raw: RawNetConf = serde_path_to_error::deserialize(Value::Object(doc)).map_err(|e| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "invalid network configuration",
            format!("{}: {}", e.path(), e.inner()),
        )
    })?;
    let RawNetConf {
        name,
        plugin_type,
        socket,
        args,
        dns,
        prev_result,
    } = raw;

    let name = required(name, "name")?;
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(CniError::new(
            ErrorCode::InvalidConfig,
            "invalid network configuration: name may hold only alphanumerics, _, . and -",
            name,
        ));
    }
    required(plugin_type, "type")?;
    let socket = match socket.filter(|s| !s.is_empty()) {
        Some(s) => PathBuf::from(s),
        None => {
            get(lookup, SOCKET_ENV).map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from)
        }
    };

    let cni = args.and_then(|a| a.cni).unwrap_or_default();
    let labels = cni
        .labels
        .map(|l| l.into_map("labels"))
        .transpose()?
        .unwrap_or_default();
    let annotations = cni
        .annotations
        .map(|a| a.into_map("annotations"))
        .transpose()?
        .unwrap_or_default();

    let prev_result = prev_result
        .filter(|v| !v.is_null())
        .map(|v| {
            serde_path_to_error::deserialize::<_, Success>(v).map_err(|e| {
                CniError::new(
                    ErrorCode::DecodeFailure,
                    "error decoding prevResult",
                    format!("{}: {}", e.path(), e.inner()),
                )
            })
        })
        .transpose()?;

    Ok(NetConf {
        version,
        name,
        socket,
        labels,
        annotations,
        dns: dns.unwrap_or_default(),
        prev_result,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawNetConf {
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    socket: Option<String>,
    args: Option<RawArgs>,
    dns: Option<Dns>,
    prev_result: Option<Value>,
    // `runtimeConfig`, `capabilities` and the rest are accepted and ignored.
}

#[derive(Deserialize)]
struct RawArgs {
    cni: Option<RawCniArgs>,
}

#[derive(Default, Deserialize)]
struct RawCniArgs {
    labels: Option<KeyValues>,
    annotations: Option<KeyValues>,
}

/// The shapes labels arrive in: a map (`{"app": "web"}`), the CNI
/// conventions' list (`[{"key": "app", "value": "web"}]`) or `["app=web"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum KeyValues {
    Map(BTreeMap<String, String>),
    Pairs(Vec<KeyValue>),
    Strings(Vec<String>),
}

#[derive(Deserialize)]
struct KeyValue {
    key: String,
    value: String,
}

impl KeyValues {
    fn into_map(self, field: &str) -> Result<BTreeMap<String, String>, CniError> {
        let map: BTreeMap<String, String> = match self {
            Self::Map(m) => m,
            Self::Pairs(p) => p.into_iter().map(|kv| (kv.key, kv.value)).collect(),
            Self::Strings(s) => s
                .into_iter()
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => Ok((k.to_string(), v.to_string())),
                    None => Err(CniError::new(
                        ErrorCode::InvalidConfig,
                        format!("invalid network configuration: args.cni.{field} entries must be key=value"),
                        kv,
                    )),
                })
                .collect::<Result<_, _>>()?,
        };
        if map.contains_key("") {
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                format!("invalid network configuration: args.cni.{field} has an empty key"),
                format!("{map:?}"),
            ));
        }
        Ok(map)
    }
}

// === helpers ===

fn get(lookup: Lookup<'_>, key: &str) -> Option<String> {
    lookup(key).filter(|v| !v.is_empty())
}

fn env_error(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidEnvironment, msg, details)
}

fn required(value: Option<String>, field: &str) -> Result<String, CniError> {
    value.filter(|v| !v.is_empty()).ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            format!("invalid network configuration: missing {field}"),
            format!("the network configuration must set {field:?}"),
        )
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An environment from `KEY=VALUE` pairs.
    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn full_env() -> Vec<(&'static str, &'static str)> {
        vec![
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/pod"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u1;FOO=bar",
            ),
        ]
    }

    fn netconf_of(doc: Value, lookup: Lookup<'_>) -> Result<NetConf, CniError> {
        let Value::Object(map) = doc else {
            panic!("object")
        };
        let version = version(&map)?;
        netconf(map, version, lookup)
    }

    fn code_of<T: std::fmt::Debug>(r: Result<T, CniError>) -> u32 {
        r.expect_err("an error").code.value()
    }

    #[test]
    fn the_four_commands_parse_and_others_are_code_4() {
        assert_eq!(
            command(&env_of(&[("CNI_COMMAND", "ADD")])),
            Ok(Command::Add)
        );
        assert_eq!(
            command(&env_of(&[("CNI_COMMAND", "DEL")])),
            Ok(Command::Del)
        );
        assert_eq!(
            command(&env_of(&[("CNI_COMMAND", "CHECK")])),
            Ok(Command::Check)
        );
        assert_eq!(
            command(&env_of(&[("CNI_COMMAND", "VERSION")])),
            Ok(Command::Version)
        );
        for bad in ["add", "FOO", "GC", "STATUS", ""] {
            assert_eq!(
                code_of(command(&env_of(&[("CNI_COMMAND", bad)]))),
                4,
                "{bad:?}"
            );
        }
        assert_eq!(code_of(command(&env_of(&[]))), 4);
    }

    #[test]
    fn a_full_environment_parses_with_kubernetes_args() {
        let e = env(Command::Add, &env_of(&full_env())).expect("env");
        assert_eq!(e.container_id, "abc123");
        assert_eq!(e.netns.as_deref(), Some("/var/run/netns/pod"));
        assert_eq!(e.ifname, "eth0");
        assert_eq!(e.args.pod_name.as_deref(), Some("web-0"));
        assert_eq!(e.args.pod_namespace.as_deref(), Some("shop"));
    }

    #[test]
    fn add_and_check_need_a_netns_but_del_does_not() {
        let mut vars = full_env();
        vars.retain(|(k, _)| *k != "CNI_NETNS");
        let err = env(Command::Add, &env_of(&vars)).expect_err("ADD without netns");
        assert_eq!(err.code.value(), 4);
        assert!(err.msg.contains("CNI_NETNS"), "{err}");
        assert_eq!(code_of(env(Command::Check, &env_of(&vars))), 4);
        assert_eq!(env(Command::Del, &env_of(&vars)).expect("DEL").netns, None);
    }

    #[test]
    fn every_missing_variable_is_named_at_once() {
        let err = env(Command::Add, &env_of(&[])).expect_err("nothing set");
        assert_eq!(
            err.msg,
            "required env variables [CNI_CONTAINERID CNI_NETNS CNI_IFNAME] missing"
        );
        let err =
            env(Command::Del, &env_of(&[("CNI_CONTAINERID", "")])).expect_err("empty is unset");
        assert_eq!(
            err.msg,
            "required env variables [CNI_CONTAINERID CNI_IFNAME] missing"
        );
    }

    #[test]
    fn malformed_container_ids_and_interface_names_are_code_4() {
        for id in ["-abc", "_abc", "a/b", "a b", "ä"] {
            let mut vars = full_env();
            vars[0] = ("CNI_CONTAINERID", id);
            assert_eq!(code_of(env(Command::Add, &env_of(&vars))), 4, "{id:?}");
        }
        for ifname in [".", "..", "eth0/1", "eth:0", "eth 0", "a-very-long-ifname"] {
            let mut vars = full_env();
            vars[2] = ("CNI_IFNAME", ifname);
            assert_eq!(code_of(env(Command::Add, &env_of(&vars))), 4, "{ifname:?}");
        }
    }

    #[test]
    fn unknown_cni_args_are_code_4_unless_ignore_unknown_is_set() {
        assert_eq!(code_of(cni_args("FOO=bar")), 4);
        assert_eq!(code_of(cni_args("IgnoreUnknown=0;FOO=bar")), 4);
        assert!(cni_args("FOO=bar;IgnoreUnknown=true").is_ok());
        assert!(cni_args("IgnoreUnknown=1;FOO=bar").is_ok());
        assert_eq!(code_of(cni_args("IgnoreUnknown=maybe")), 4);
        assert_eq!(code_of(cni_args("K8S_POD_NAME")), 4);
        assert_eq!(code_of(cni_args("=x")), 4);
        assert_eq!(cni_args(""), Ok(CniArgs::default()));
        assert_eq!(cni_args(";;").expect("empty pairs").pod_name, None);
    }

    #[test]
    fn malformed_or_empty_stdin_is_code_6() {
        for input in [
            &b"{bad"[..],
            b"",
            b"  \n",
            b"[1,2]",
            b"\"text\"",
            b"\xff\xfe",
        ] {
            assert_eq!(code_of(decode(input)), 6, "{input:?}");
        }
        assert!(decode(b"{}").is_ok());
    }

    #[test]
    fn unsupported_or_missing_versions_are_code_1_and_non_strings_code_7() {
        for v in [json!("0.2.0"), json!("1.1.0"), json!("9.9.9")] {
            let Value::Object(doc) = json!({"cniVersion": v}) else {
                panic!()
            };
            assert_eq!(code_of(version(&doc)), 1, "{v}");
        }
        assert_eq!(code_of(version(&Map::new())), 1);
        let Value::Object(doc) = json!({"cniVersion": 1}) else {
            panic!()
        };
        assert_eq!(code_of(version(&doc)), 7);
    }

    #[test]
    fn a_full_netconf_parses_labels_annotations_dns_and_socket() {
        let nc = netconf_of(
            json!({
                "cniVersion": "1.0.0", "name": "membrane", "type": "membrane-cni",
                "socket": "/tmp/agent.sock",
                "args": {"cni": {"labels": {"app": "web"}, "annotations": {"team": "a"}}},
                "dns": {"nameservers": ["10.96.0.10"]},
                "runtimeConfig": {"portMappings": []},
                "somethingNew": true
            }),
            &env_of(&[]),
        )
        .expect("netconf");
        assert_eq!(nc.version, CniVersion::V1_0_0);
        assert_eq!(nc.name, "membrane");
        assert_eq!(nc.socket, PathBuf::from("/tmp/agent.sock"));
        assert_eq!(nc.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(nc.annotations.get("team").map(String::as_str), Some("a"));
        assert_eq!(nc.dns.nameservers, vec!["10.96.0.10".to_string()]);
        assert_eq!(nc.prev_result, None);
    }

    #[test]
    fn labels_arrive_as_a_map_a_key_value_list_or_key_equals_value_strings() {
        for labels in [
            json!({"app": "web", "tier": "front"}),
            json!([{"key": "app", "value": "web"}, {"key": "tier", "value": "front"}]),
            json!(["app=web", "tier=front"]),
        ] {
            let nc = netconf_of(
                json!({"cniVersion": "1.0.0", "name": "n", "type": "t", "args": {"cni": {"labels": labels}}}),
                &env_of(&[]),
            )
            .expect("netconf");
            assert_eq!(nc.labels.len(), 2);
            assert_eq!(nc.labels["tier"], "front");
        }
    }

    #[test]
    fn malformed_labels_and_wrongly_typed_fields_are_code_7() {
        let base = |extra: Value| {
            let mut doc = json!({"cniVersion": "1.0.0", "name": "n", "type": "t"});
            if let (Value::Object(d), Value::Object(e)) = (&mut doc, extra) {
                d.extend(e);
            }
            doc
        };
        for extra in [
            json!({"socket": 5}),
            json!({"args": {"cni": {"labels": "app=web"}}}),
            json!({"args": {"cni": {"labels": ["app"]}}}),
            json!({"args": {"cni": {"labels": {"": "x"}}}}),
            json!({"args": {"cni": {"annotations": {"a": 1}}}}),
            json!({"name": ""}),
            json!({"name": "bad name"}),
            json!({"type": null}),
        ] {
            let r = netconf_of(base(extra.clone()), &env_of(&[]));
            assert_eq!(code_of(r), 7, "{extra}");
        }
    }

    #[test]
    fn an_ipam_section_is_code_2_naming_the_field_and_value() {
        let err = netconf_of(
            json!({"cniVersion": "1.0.0", "name": "n", "type": "t", "ipam": {"type": "host-local"}}),
            &env_of(&[]),
        )
        .expect_err("ipam refused");
        assert_eq!(err.code.value(), 2);
        assert!(
            err.msg.contains("ipam") && err.msg.contains("host-local"),
            "{err}"
        );
    }

    #[test]
    fn the_socket_falls_back_to_the_environment_then_the_default() {
        let doc = json!({"cniVersion": "1.0.0", "name": "n", "type": "t"});
        let nc =
            netconf_of(doc.clone(), &env_of(&[(SOCKET_ENV, "/env/agent.sock")])).expect("netconf");
        assert_eq!(nc.socket, PathBuf::from("/env/agent.sock"));
        let nc = netconf_of(doc, &env_of(&[])).expect("netconf");
        assert_eq!(nc.socket, PathBuf::from(DEFAULT_SOCKET));
    }

    #[test]
    fn a_prev_result_is_decoded_and_a_malformed_one_is_code_6() {
        let prev = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/ns"}],
            "ips": [{"version": "4", "address": "10.200.0.5/32", "gateway": "10.200.0.1", "interface": 0}],
            "dns": {}
        });
        let nc = netconf_of(
            json!({"cniVersion": "0.4.0", "name": "n", "type": "t", "prevResult": prev}),
            &env_of(&[]),
        )
        .expect("netconf");
        assert!(
            nc.prev_result
                .expect("prevResult")
                .has_sandbox_interface("eth0", "/ns")
        );

        let bad = json!({"cniVersion": "0.4.0", "name": "n", "type": "t",
                         "prevResult": {"cniVersion": "0.4.0", "ips": [{"address": "not-an-ip"}]}});
        assert_eq!(code_of(netconf_of(bad, &env_of(&[]))), 6);
    }
}
