//! The CNI commands: parse the input, ask the agent, shape the answer.
//!
//! The agent is a trait here so every command path is unit-tested against
//! a fake; [`crate::agent`] implements it over the agent's unix socket.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;

use crate::config::{self, Command, Env, Lookup, NetConf};
use crate::result::{
    Attachment, CniError, CniVersion, ErrorCode, SPEC_VERSION, Success, VersionResult,
};

/// What the plugin needs from the node agent. Errors are already mapped to
/// spec codes; a container the agent does not know is [`ErrorCode::UnknownContainer`].
pub trait Agent {
    /// Attaches the pod and reports what was created.
    fn add(&self, request: &AddRequest) -> impl Future<Output = Result<Attachment, CniError>>;
    /// Detaches the pod; `Ok(false)` when nothing was attached.
    fn del(&self, container_id: &str, ifname: &str)
    -> impl Future<Output = Result<bool, CniError>>;
    /// Verifies the pod is still as attached.
    fn check(
        &self,
        container_id: &str,
        netns: &str,
        ifname: &str,
    ) -> impl Future<Output = Result<(), CniError>>;
}

/// Everything the agent needs to attach a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddRequest {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// A failed invocation: the error and the version to print it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub version: CniVersion,
    pub error: CniError,
}

/// Runs one invocation. `Ok(Some(json))` is printed on stdout with exit 0,
/// `Ok(None)` prints nothing, a [`Failure`] is printed with exit 1.
///
/// `stdin` is read only for commands that take a netconf; `connect` is
/// called only once the input is valid, so VERSION and bad input never need
/// the agent.
pub async fn run<A: Agent>(
    lookup: Lookup<'_>,
    stdin: impl FnOnce() -> std::io::Result<Vec<u8>>,
    connect: impl FnOnce(&Path) -> A,
) -> Result<Option<String>, Failure> {
    let fail = |version| move |error| Failure { version, error };

    let command = config::command(lookup).map_err(fail(SPEC_VERSION))?;
    if command == Command::Version {
        // The runtime may send `{"cniVersion": ...}`; the answer is the same.
        return Ok(Some(to_json(&VersionResult::ours())));
    }

    let input = stdin()
        .map_err(|e| {
            CniError::new(
                ErrorCode::IoFailure,
                "error reading network configuration from stdin",
                e.to_string(),
            )
        })
        .map_err(fail(SPEC_VERSION))?;
    let doc = config::decode(&input).map_err(fail(SPEC_VERSION))?;
    let version = config::version(&doc).map_err(fail(SPEC_VERSION))?;
    let env = config::env(command, lookup).map_err(fail(version))?;
    let netconf = config::netconf(doc, version, lookup).map_err(fail(version))?;

    let agent = connect(&netconf.socket);
    match command {
        Command::Add => add(&agent, &env, netconf).await.map(Some),
        Command::Del => del(&agent, &env).await.map(|()| None),
        Command::Check => check(&agent, &env, &netconf).await.map(|()| None),
        Command::Version => Ok(None),
    }
    .map_err(fail(version))
}

async fn add(agent: &impl Agent, env: &Env, netconf: NetConf) -> Result<String, CniError> {
    let netns = env.netns.clone().unwrap_or_default();
    let request = AddRequest {
        container_id: env.container_id.clone(),
        netns: netns.clone(),
        ifname: env.ifname.clone(),
        pod_name: env.args.pod_name.clone().unwrap_or_default(),
        pod_namespace: env.args.pod_namespace.clone().unwrap_or_default(),
        labels: netconf.labels,
        annotations: netconf.annotations,
    };
    let attached = agent.add(&request).await?;
    Ok(to_json(&Success::attached(
        netconf.version,
        &attached,
        &netns,
        netconf.dns,
    )))
}

/// DEL succeeds whenever there is nothing left to release: no netns, an
/// unknown container, an endpoint the agent never had. It fails when the
/// agent cannot be asked, because releasing the address is the agent's job
/// and it keeps that state: reporting success without reaching it would make
/// the runtime forget the pod while its address stays allocated (a leak
/// nobody retries). Code 11 makes the runtime try again later.
async fn del(agent: &impl Agent, env: &Env) -> Result<(), CniError> {
    match agent.del(&env.container_id, &env.ifname).await {
        Ok(_existed) => Ok(()),
        Err(e) if e.code == ErrorCode::UnknownContainer => Ok(()),
        Err(e) => Err(e),
    }
}

/// CHECK consults `prevResult` (the spec requires it) for the interface we
/// own, then asks the agent, which holds the addresses and routes it attached
/// and verifies them against the kernel and its eBPF maps.
async fn check(agent: &impl Agent, env: &Env, netconf: &NetConf) -> Result<(), CniError> {
    if !netconf.version.has_check() {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            "config version does not allow CHECK",
            format!(
                "CHECK needs cniVersion 0.4.0 or later, config is {}",
                netconf.version
            ),
        ));
    }
    let netns = env.netns.as_deref().unwrap_or_default();
    let Some(prev) = &netconf.prev_result else {
        return Err(CniError::new(
            ErrorCode::InvalidConfig,
            "invalid network configuration: required prevResult missing",
            "the runtime must pass the ADD result as prevResult on CHECK",
        ));
    };
    if !prev.has_sandbox_interface(&env.ifname, netns) {
        return Err(CniError::new(
            ErrorCode::InvalidConfig,
            "invalid network configuration: prevResult does not list this interface",
            format!(
                "no interface {:?} with sandbox {netns:?} in prevResult",
                env.ifname
            ),
        ));
    }
    agent.check(&env.container_id, netns, &env.ifname).await
}

impl Failure {
    /// The spec error object, as printed on stdout.
    pub fn to_json(&self) -> String {
        to_json(&self.error.to_result(self.version))
    }
}

/// Our types always serialize; the fallback exists so nothing can panic.
fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| {
        format!(
            r#"{{"cniVersion":"1.0.0","code":999,"msg":"error encoding result","details":{:?}}}"#,
            e.to_string()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::path::PathBuf;

    use serde_json::{Value, json};

    /// A scripted agent recording what it was asked.
    #[derive(Default)]
    struct FakeAgent {
        add: Option<Result<Attachment, CniError>>,
        del: Option<Result<bool, CniError>>,
        check: Option<Result<(), CniError>>,
        calls: RefCell<Vec<String>>,
        added: RefCell<Option<AddRequest>>,
    }

    impl Agent for &FakeAgent {
        async fn add(&self, request: &AddRequest) -> Result<Attachment, CniError> {
            self.calls.borrow_mut().push("add".into());
            *self.added.borrow_mut() = Some(request.clone());
            self.add.clone().unwrap_or_else(|| Err(unreachable()))
        }
        async fn del(&self, container_id: &str, ifname: &str) -> Result<bool, CniError> {
            self.calls
                .borrow_mut()
                .push(format!("del {container_id} {ifname}"));
            self.del.clone().unwrap_or_else(|| Err(unreachable()))
        }
        async fn check(
            &self,
            container_id: &str,
            netns: &str,
            ifname: &str,
        ) -> Result<(), CniError> {
            self.calls
                .borrow_mut()
                .push(format!("check {container_id} {netns} {ifname}"));
            self.check.clone().unwrap_or_else(|| Err(unreachable()))
        }
    }

    fn unreachable() -> CniError {
        CniError::new(ErrorCode::TryAgainLater, "agent unreachable", "test")
    }

    fn attachment() -> Attachment {
        Attachment {
            host_ifname: "lxcabc".into(),
            host_mac: "aa:00:00:00:00:01".into(),
            pod_ifname: "eth0".into(),
            pod_mac: "aa:00:00:00:00:02".into(),
            address: "10.200.0.5/32".parse().expect("address"),
            gateway: "10.200.0.1".parse().expect("gateway"),
        }
    }

    struct Call<'a> {
        env: Vec<(&'a str, &'a str)>,
        stdin: Value,
    }

    fn call(command: &'static str) -> Call<'static> {
        Call {
            env: vec![
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", "/var/run/netns/p1"),
                ("CNI_IFNAME", "eth0"),
                (
                    "CNI_ARGS",
                    "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=u",
                ),
            ],
            stdin: json!({
                "cniVersion": "1.0.0", "name": "membrane", "type": "membrane-cni",
                "socket": "/tmp/membrane-test.sock",
                "args": {"cni": {"labels": {"app": "web"}, "annotations": {"note": "x"}}}
            }),
        }
    }

    impl Call<'_> {
        fn without(mut self, key: &str) -> Self {
            self.env.retain(|(k, _)| *k != key);
            self
        }
        fn with_conf(mut self, key: &str, value: Value) -> Self {
            self.stdin[key] = value;
            self
        }
        async fn run(
            &self,
            agent: &FakeAgent,
        ) -> (Result<Option<String>, Failure>, Option<PathBuf>) {
            let vars: BTreeMap<String, String> = self
                .env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let lookup = move |k: &str| vars.get(k).cloned();
            let stdin = self.stdin.to_string().into_bytes();
            let socket = RefCell::new(None);
            let out = run(
                &lookup,
                || Ok(stdin),
                |p| {
                    *socket.borrow_mut() = Some(p.to_path_buf());
                    agent
                },
            )
            .await;
            (out, socket.into_inner())
        }
    }

    fn error_code(out: Result<Option<String>, Failure>) -> u32 {
        out.expect_err("a failure").error.code.value()
    }

    #[tokio::test]
    async fn add_sends_pod_identity_and_labels_and_prints_the_result() {
        let agent = FakeAgent {
            add: Some(Ok(attachment())),
            ..FakeAgent::default()
        };
        let (out, socket) = call("ADD").run(&agent).await;
        let printed: Value =
            serde_json::from_str(&out.expect("ok").expect("output")).expect("json");
        assert_eq!(printed["ips"][0]["address"], "10.200.0.5/32");
        assert_eq!(printed["interfaces"][1]["sandbox"], "/var/run/netns/p1");
        assert_eq!(socket, Some(PathBuf::from("/tmp/membrane-test.sock")));

        let sent = agent.added.borrow().clone().expect("add called");
        assert_eq!(sent.container_id, "c1");
        assert_eq!(sent.pod_name, "web-0");
        assert_eq!(sent.pod_namespace, "shop");
        assert_eq!(sent.labels["app"], "web");
        assert_eq!(sent.annotations["note"], "x");
    }

    #[tokio::test]
    async fn add_prints_the_requested_version_with_ip_versions_before_1_0_0() {
        let agent = FakeAgent {
            add: Some(Ok(attachment())),
            ..FakeAgent::default()
        };
        let (out, _) = call("ADD")
            .with_conf("cniVersion", json!("0.3.1"))
            .run(&agent)
            .await;
        let printed: Value =
            serde_json::from_str(&out.expect("ok").expect("output")).expect("json");
        assert_eq!(printed["cniVersion"], "0.3.1");
        assert_eq!(printed["ips"][0]["version"], "4");
    }

    #[tokio::test]
    async fn agent_errors_on_add_are_passed_through_in_the_requested_version() {
        let agent = FakeAgent {
            add: Some(Err(CniError::new(
                ErrorCode::PoolExhausted,
                "pool exhausted",
                "x",
            ))),
            ..FakeAgent::default()
        };
        let (out, _) = call("ADD")
            .with_conf("cniVersion", json!("0.4.0"))
            .run(&agent)
            .await;
        let failure = out.expect_err("failure");
        assert_eq!(failure.version, CniVersion::V0_4_0);
        assert_eq!(failure.error.code.value(), 101);
    }

    #[tokio::test]
    async fn version_needs_neither_stdin_nor_the_agent() {
        let vars = |k: &str| (k == "CNI_COMMAND").then(|| "VERSION".to_string());
        let out = run(
            &vars,
            || panic!("stdin read"),
            |_| -> &FakeAgent { panic!("agent used") },
        )
        .await;
        assert_eq!(
            out.expect("ok").as_deref(),
            Some(r#"{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]}"#)
        );
    }

    #[tokio::test]
    async fn bad_input_fails_before_the_agent_is_contacted() {
        let agent = FakeAgent::default();
        assert_eq!(
            error_code(call("ADD").without("CNI_NETNS").run(&agent).await.0),
            4
        );
        assert_eq!(
            error_code(
                call("ADD")
                    .with_conf("cniVersion", json!("0.2.0"))
                    .run(&agent)
                    .await
                    .0
            ),
            1
        );
        assert_eq!(
            error_code(
                call("ADD")
                    .with_conf("ipam", json!({"type": "host-local"}))
                    .run(&agent)
                    .await
                    .0
            ),
            2
        );
        assert_eq!(
            error_code(call("ADD").with_conf("name", json!(7)).run(&agent).await.0),
            7
        );
        assert_eq!(error_code(call("BOGUS").run(&agent).await.0), 4);
        assert!(agent.calls.borrow().is_empty());
    }

    #[tokio::test]
    async fn unreadable_stdin_is_code_5() {
        let vars = |k: &str| (k == "CNI_COMMAND").then(|| "ADD".to_string());
        let agent = FakeAgent::default();
        let out = run(&vars, || Err(std::io::Error::other("boom")), |_| &agent).await;
        assert_eq!(error_code(out), 5);
    }

    #[tokio::test]
    async fn errors_before_the_version_is_known_are_printed_as_1_0_0() {
        let agent = FakeAgent::default();
        let mut c = call("ADD");
        c.stdin = json!("not an object");
        let failure = c.run(&agent).await.0.expect_err("failure");
        assert_eq!(failure.version, CniVersion::V1_0_0);
        assert_eq!(failure.error.code.value(), 6);
        let printed: Value = serde_json::from_str(&failure.to_json()).expect("json");
        let mut keys: Vec<&str> = printed
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["cniVersion", "code", "details", "msg"]);
    }

    #[tokio::test]
    async fn del_succeeds_silently_whether_or_not_anything_was_attached() {
        for del in [
            Ok(true),
            Ok(false),
            Err(CniError::new(ErrorCode::UnknownContainer, "unknown", "c1")),
        ] {
            let agent = FakeAgent {
                del: Some(del),
                ..FakeAgent::default()
            };
            let (out, _) = call("DEL").without("CNI_NETNS").run(&agent).await;
            assert_eq!(out, Ok(None));
            assert_eq!(*agent.calls.borrow(), ["del c1 eth0"]);
        }
    }

    #[tokio::test]
    async fn del_fails_with_code_11_when_the_agent_is_unreachable() {
        let agent = FakeAgent::default();
        assert_eq!(error_code(call("DEL").run(&agent).await.0), 11);
    }

    #[tokio::test]
    async fn check_consults_prev_result_then_asks_the_agent() {
        let prev = serde_json::to_value(Success::attached(
            CniVersion::V1_0_0,
            &attachment(),
            "/var/run/netns/p1",
            Default::default(),
        ))
        .expect("prev");
        let agent = FakeAgent {
            check: Some(Ok(())),
            ..FakeAgent::default()
        };
        let (out, _) = call("CHECK")
            .with_conf("prevResult", prev.clone())
            .run(&agent)
            .await;
        assert_eq!(out, Ok(None));
        assert_eq!(*agent.calls.borrow(), ["check c1 /var/run/netns/p1 eth0"]);

        let mismatch = FakeAgent {
            check: Some(Err(CniError::new(
                ErrorCode::EndpointMismatch,
                "differs",
                "route",
            ))),
            ..FakeAgent::default()
        };
        let (out, _) = call("CHECK")
            .with_conf("prevResult", prev)
            .run(&mismatch)
            .await;
        assert_eq!(error_code(out), 102);
    }

    #[tokio::test]
    async fn check_without_a_usable_prev_result_or_before_0_4_0_fails_without_the_agent() {
        let agent = FakeAgent::default();
        assert_eq!(error_code(call("CHECK").run(&agent).await.0), 7);
        let other = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth1", "sandbox": "/var/run/netns/p1"}]});
        assert_eq!(
            error_code(
                call("CHECK")
                    .with_conf("prevResult", other)
                    .run(&agent)
                    .await
                    .0
            ),
            7
        );
        assert_eq!(
            error_code(
                call("CHECK")
                    .with_conf("cniVersion", json!("0.3.1"))
                    .run(&agent)
                    .await
                    .0
            ),
            1
        );
        assert!(agent.calls.borrow().is_empty());
    }
}
