//! Our binary against a scripted `membrane.node.v1.Node` agent on a unix
//! socket: the gRPC contract the real agent will serve, end to end through
//! the CNI interface. Needs no root.

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use membrane_proto::node::v1::node_server::{Node, NodeServer};
use membrane_proto::node::v1::{
    AddEndpointRequest, CheckEndpointRequest, CheckEndpointResponse, DelEndpointRequest,
    DelEndpointResponse, Endpoint, ListEndpointsRequest, ListEndpointsResponse, NodeStatus,
    StatusRequest,
};
use serde_json::{Value, json};
use support::{Outcome, ours, run};
use tonic::{Request, Response, Status};

/// Answers by container id: `full`, `twice`, `bad-labels`, `never`, `gone`,
/// `down` and `drifted` script the failures; anything else succeeds.
#[derive(Clone, Default)]
struct ScriptedAgent {
    added: Arc<Mutex<Vec<AddEndpointRequest>>>,
}

#[tonic::async_trait]
impl Node for ScriptedAgent {
    async fn add_endpoint(
        &self,
        req: Request<AddEndpointRequest>,
    ) -> Result<Response<Endpoint>, Status> {
        let req = req.into_inner();
        self.added.lock().expect("lock").push(req.clone());
        match req.container_id.as_str() {
            "full" => Err(Status::resource_exhausted("pool `default` exhausted")),
            "twice" => Err(Status::already_exists("endpoint full/eth0 exists")),
            "bad-labels" => Err(Status::invalid_argument("labels: key `-x` is invalid")),
            _ => Ok(Response::new(Endpoint {
                id: 1,
                container_id: req.container_id,
                netns: req.netns,
                ifname: req.ifname,
                mac: "02:00:0a:c8:00:05".into(),
                host_ifname: "lxc0c0ffee".into(),
                host_mac: "02:00:00:00:00:01".into(),
                host_ifindex: 42,
                address: "10.200.0.5/32".into(),
                gateway: "10.200.0.1".into(),
                pod_name: req.pod_name,
                pod_namespace: req.pod_namespace,
                labels: req.labels,
                identity: 0,
                programmed: true,
                node: "node-a".into(),
            })),
        }
    }

    async fn del_endpoint(
        &self,
        req: Request<DelEndpointRequest>,
    ) -> Result<Response<DelEndpointResponse>, Status> {
        match req.into_inner().container_id.as_str() {
            "never" => Ok(Response::new(DelEndpointResponse { existed: false })),
            "gone" => Err(Status::not_found("no endpoint gone/eth0")),
            "down" => Err(Status::unavailable("datapath restarting")),
            _ => Ok(Response::new(DelEndpointResponse { existed: true })),
        }
    }

    async fn check_endpoint(
        &self,
        req: Request<CheckEndpointRequest>,
    ) -> Result<Response<CheckEndpointResponse>, Status> {
        match req.into_inner().container_id.as_str() {
            "drifted" => Err(Status::failed_precondition("route 0.0.0.0/0 missing")),
            _ => Ok(Response::new(CheckEndpointResponse {})),
        }
    }

    async fn list_endpoints(
        &self,
        _: Request<ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<NodeStatus>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn set_endpoint_labels(
        &self,
        _: Request<membrane_proto::node::v1::SetEndpointLabelsRequest>,
    ) -> Result<Response<membrane_proto::node::v1::Endpoint>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn ipcache(
        &self,
        _: Request<membrane_proto::node::v1::IpcacheRequest>,
    ) -> Result<Response<membrane_proto::node::v1::IpcacheResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }
    async fn service_table(
        &self,
        _: Request<membrane_proto::node::v1::ServiceTableRequest>,
    ) -> Result<Response<membrane_proto::node::v1::ServiceTableResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }
}

/// A scripted agent serving on a socket in a temporary directory.
struct AgentFixture {
    agent: ScriptedAgent,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl AgentFixture {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind agent socket");
        let agent = ScriptedAgent::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .add_service(NodeServer::new(agent.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            );
        tokio::spawn(server);
        Self {
            agent,
            socket,
            _dir: dir,
            _stop: stop,
        }
    }

    /// Runs our plugin with the socket named in the netconf (the
    /// environment names a wrong one, to prove the netconf wins).
    async fn invoke(&self, command: &str, container: &str, version: &str, extra: Value) -> Outcome {
        let mut conf = json!({
            "cniVersion": version, "name": "membrane", "type": "membrane-cni",
            "socket": self.socket,
            "args": {"cni": {"labels": {"app": "web"}, "annotations": {"owner": "shop-team"}}},
            "runtimeConfig": {"portMappings": []}
        });
        if let (Value::Object(c), Value::Object(e)) = (&mut conf, extra) {
            c.extend(e);
        }
        let env: Vec<(String, String)> = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", container),
            ("CNI_NETNS", "/var/run/netns/pod-a"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=x"),
            ("MEMBRANE_AGENT_SOCKET", "/nonexistent/agent.sock"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let stdin = conf.to_string();
        tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            run(Path::new(&ours()), &env, &stdin)
        })
        .await
        .expect("plugin task")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn add_through_the_agent_prints_the_spec_result_and_sends_pod_metadata() {
    let fx = AgentFixture::start();
    let out = fx.invoke("ADD", "c0ffee", "1.0.0", json!({})).await;
    assert_eq!(out.status, 0, "{out:?}");
    assert_eq!(
        out.json(),
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "lxc0c0ffee", "mac": "02:00:00:00:00:01"},
                {"name": "eth0", "mac": "02:00:0a:c8:00:05", "sandbox": "/var/run/netns/pod-a"}
            ],
            "ips": [{"address": "10.200.0.5/32", "gateway": "10.200.0.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.200.0.1"}],
            "dns": {}
        })
    );
    let sent = fx.agent.added.lock().expect("lock").clone();
    assert_eq!(sent.len(), 1);
    let sent = &sent[0];
    assert_eq!(
        (
            sent.container_id.as_str(),
            sent.netns.as_str(),
            sent.ifname.as_str()
        ),
        ("c0ffee", "/var/run/netns/pod-a", "eth0")
    );
    assert_eq!(
        (sent.pod_name.as_str(), sent.pod_namespace.as_str()),
        ("web-0", "shop")
    );
    assert_eq!(sent.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(
        sent.annotations.get("owner").map(String::as_str),
        Some("shop-team")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_add_for_0_3_1_carries_the_ip_version() {
    let fx = AgentFixture::start();
    let v = fx.invoke("ADD", "c0ffee", "0.3.1", json!({})).await.json();
    assert_eq!(v["cniVersion"], "0.3.1");
    assert_eq!(v["ips"][0]["version"], "4");
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_refusals_on_add_map_to_cni_codes() {
    let fx = AgentFixture::start();
    for (container, code) in [("full", 101), ("twice", 100), ("bad-labels", 7)] {
        let v = fx
            .invoke("ADD", container, "1.0.0", json!({}))
            .await
            .expect_error(code);
        assert_eq!(v["cniVersion"], "1.0.0");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn del_succeeds_silently_for_attached_never_attached_and_unknown_containers() {
    let fx = AgentFixture::start();
    for container in ["c0ffee", "never", "gone"] {
        let out = fx.invoke("DEL", container, "1.0.0", json!({})).await;
        assert_eq!(
            (out.status, out.stdout.as_str()),
            (0, ""),
            "{container}: {out:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn del_while_the_agent_is_unavailable_is_code_11() {
    let fx = AgentFixture::start();
    fx.invoke("DEL", "down", "1.0.0", json!({}))
        .await
        .expect_error(11);
}

#[tokio::test(flavor = "multi_thread")]
async fn check_accepts_our_own_add_result_as_prev_result_and_reports_drift_as_102() {
    let fx = AgentFixture::start();
    let prev = fx.invoke("ADD", "c0ffee", "1.0.0", json!({})).await.json();
    let out = fx
        .invoke("CHECK", "c0ffee", "1.0.0", json!({"prevResult": prev}))
        .await;
    assert_eq!((out.status, out.stdout.as_str()), (0, ""), "{out:?}");
    fx.invoke("CHECK", "drifted", "1.0.0", json!({"prevResult": prev}))
        .await
        .expect_error(102);
}
