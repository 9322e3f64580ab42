//! The node agent's `membrane.node.v1.Node` client over its unix socket:
//! the only module that sees tonic and the generated types. gRPC statuses
//! become spec error codes here.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use membrane_proto::node::v1 as proto;
use proto::node_client::NodeClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

use crate::plugin::{AddRequest, Agent};
use crate::result::{Attachment, CniError, ErrorCode};

/// How long to wait for the socket to accept. Short: a live agent accepts
/// at once, and the runtime retries on code 11.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Per call. ADD allocates from IPAM and programs the datapath; the
/// kubelet's own runtime deadline (2 minutes by default) is longer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// The agent behind a unix socket, connected lazily on the first call.
///
/// Not `membrane_runtime::grpc::connect_unix`, on purpose: the runtime runs
/// this binary once per pod operation, so it stays free of the runtime
/// crate's OTLP/TLS/etcd dependencies, and it needs what that helper does not
/// give: connect and request timeouts, and the `io::Error` kind of a failed
/// dial (which decides between code 11 and code 5).
#[derive(Debug, Clone)]
pub struct UdsAgent {
    socket: PathBuf,
}

// === impl UdsAgent ===

impl UdsAgent {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    async fn client(&self) -> Result<NodeClient<Channel>, CniError> {
        // The URI is required by tonic but unused: the connector dials the socket.
        let endpoint = Endpoint::try_from("http://[::]:50051")
            .map_err(|e| CniError::new(ErrorCode::Agent, "invalid agent endpoint", e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        let path = self.socket.clone();
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
            }))
            .await
            .map_err(|e| connect_error(&self.socket, &e))?;
        Ok(NodeClient::new(channel))
    }
}

impl Agent for UdsAgent {
    async fn add(&self, request: &AddRequest) -> Result<Attachment, CniError> {
        let AddRequest {
            container_id,
            netns,
            ifname,
            pod_name,
            pod_namespace,
            labels,
            annotations,
        } = request.clone();
        let endpoint = self
            .client()
            .await?
            .add_endpoint(proto::AddEndpointRequest {
                container_id,
                netns,
                ifname,
                pod_name,
                pod_namespace,
                labels: labels.into_iter().collect(),
                annotations: annotations.into_iter().collect(),
            })
            .await
            .map_err(|s| status_error("AddEndpoint", &s))?
            .into_inner();
        Attachment::try_from(endpoint)
    }

    async fn del(&self, container_id: &str, ifname: &str) -> Result<bool, CniError> {
        let response = self
            .client()
            .await?
            .del_endpoint(proto::DelEndpointRequest {
                container_id: container_id.to_string(),
                ifname: ifname.to_string(),
            })
            .await
            .map_err(|s| status_error("DelEndpoint", &s))?;
        let proto::DelEndpointResponse { existed } = response.into_inner();
        Ok(existed)
    }

    async fn check(&self, container_id: &str, netns: &str, ifname: &str) -> Result<(), CniError> {
        let proto::CheckEndpointResponse {} = self
            .client()
            .await?
            .check_endpoint(proto::CheckEndpointRequest {
                container_id: container_id.to_string(),
                netns: netns.to_string(),
                ifname: ifname.to_string(),
            })
            .await
            .map_err(|s| status_error("CheckEndpoint", &s))?
            .into_inner();
        Ok(())
    }
}

// === impl Attachment ===

impl TryFrom<proto::Endpoint> for Attachment {
    type Error = CniError;

    fn try_from(endpoint: proto::Endpoint) -> Result<Self, CniError> {
        // Every field named, so a new one fails to compile until decided on.
        let proto::Endpoint {
            id: _,
            container_id: _,
            netns: _,
            ifname,
            mac,
            host_ifname,
            host_mac,
            host_ifindex: _,
            address,
            gateway,
            pod_name: _,
            pod_namespace: _,
            labels: _,
            identity: _,
            programmed: _,
            node: _,
        } = endpoint;
        let bad = |field: &str, value: &str| {
            CniError::new(
                ErrorCode::Agent,
                "agent returned an invalid endpoint",
                format!("{field} = {value:?}"),
            )
        };
        let address: IpNet = address.parse().map_err(|_| bad("address", &address))?;
        let gateway: IpAddr = gateway.parse().map_err(|_| bad("gateway", &gateway))?;
        if ifname.is_empty() {
            return Err(bad("ifname", &ifname));
        }
        if host_ifname.is_empty() {
            return Err(bad("host_ifname", &host_ifname));
        }
        Ok(Self {
            host_ifname,
            host_mac,
            pod_ifname: ifname,
            pod_mac: mac,
            address,
            gateway,
        })
    }
}

// === errors ===

/// The socket could not be dialled. Missing socket, refused connection or
/// timeout all mean "agent not (yet) running": code 11, so the runtime
/// retries. Anything else (e.g. permission denied) will not fix itself and
/// is an I/O failure.
fn connect_error(socket: &Path, error: &tonic::transport::Error) -> CniError {
    let io = find_io_error(error);
    let details = format!(
        "{}: {}",
        socket.display(),
        io.map_or_else(|| error.to_string(), |e| e.to_string())
    );
    let transient = io.is_none_or(|e| {
        matches!(
            e.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut
        )
    });
    if transient {
        CniError::new(ErrorCode::TryAgainLater, "node agent unreachable", details)
    } else {
        CniError::new(
            ErrorCode::IoFailure,
            "cannot connect to the node agent socket",
            details,
        )
    }
}

fn find_io_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io);
        }
        current = e.source();
    }
    None
}

/// The agent answered with an error status.
///
/// | gRPC code                                   | CNI code |
/// |---------------------------------------------|----------|
/// | NotFound                                    | 3        |
/// | InvalidArgument naming labels/annotations   | 7        |
/// | InvalidArgument (any other field: env vars) | 4        |
/// | Unavailable, DeadlineExceeded, Aborted, Cancelled | 11 |
/// | AlreadyExists                               | 100      |
/// | ResourceExhausted                           | 101      |
/// | FailedPrecondition                          | 102      |
/// | anything else                               | 999      |
pub fn status_error(rpc: &str, status: &Status) -> CniError {
    let message = status.message();
    let (code, what) = match status.code() {
        Code::NotFound => (
            ErrorCode::UnknownContainer,
            "container unknown to the agent",
        ),
        // The agent names the offending field (workspace convention); labels
        // and annotations come from the netconf, every other field from CNI_*.
        Code::InvalidArgument if message.contains("label") || message.contains("annotation") => (
            ErrorCode::InvalidConfig,
            "agent rejected the network configuration",
        ),
        Code::InvalidArgument => (
            ErrorCode::InvalidEnvironment,
            "agent rejected the CNI environment",
        ),
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Cancelled => {
            (ErrorCode::TryAgainLater, "node agent busy or unavailable")
        }
        Code::AlreadyExists => (ErrorCode::AlreadyAttached, "already attached"),
        Code::ResourceExhausted => (ErrorCode::PoolExhausted, "pool exhausted"),
        Code::FailedPrecondition => (ErrorCode::EndpointMismatch, "endpoint is not as attached"),
        _ => (ErrorCode::Agent, "node agent error"),
    };
    CniError::new(
        code,
        format!("{rpc}: {what}"),
        format!("{:?}: {message}", status.code()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> proto::Endpoint {
        proto::Endpoint {
            id: 7,
            container_id: "c1".into(),
            netns: "/ns".into(),
            ifname: "eth0".into(),
            mac: "aa:00:00:00:00:02".into(),
            host_ifname: "lxc1".into(),
            host_mac: "aa:00:00:00:00:01".into(),
            host_ifindex: 12,
            address: "10.200.0.5/32".into(),
            gateway: "10.200.0.1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_complete_endpoint_converts_into_an_attachment() {
        let a = Attachment::try_from(endpoint()).expect("valid");
        assert_eq!(a.host_ifname, "lxc1");
        assert_eq!(a.pod_ifname, "eth0");
        assert_eq!(a.address.to_string(), "10.200.0.5/32");
        assert_eq!(a.gateway.to_string(), "10.200.0.1");
    }

    #[test]
    fn an_endpoint_with_a_bad_address_or_gateway_is_code_999() {
        for e in [
            proto::Endpoint {
                address: "10.200.0.5".into(),
                ..endpoint()
            },
            proto::Endpoint {
                gateway: String::new(),
                ..endpoint()
            },
            proto::Endpoint {
                ifname: String::new(),
                ..endpoint()
            },
        ] {
            assert_eq!(
                Attachment::try_from(e).expect_err("invalid").code.value(),
                999
            );
        }
    }

    #[test]
    fn grpc_codes_map_to_cni_codes() {
        let cases = [
            (Status::not_found("endpoint c1/eth0"), 3),
            (Status::invalid_argument("labels: key `` is empty"), 7),
            (Status::invalid_argument("annotations: too large"), 7),
            (Status::invalid_argument("netns: not a namespace"), 4),
            (Status::unavailable("starting"), 11),
            (Status::deadline_exceeded("slow"), 11),
            (Status::aborted("retry"), 11),
            (Status::already_exists("c1/eth0"), 100),
            (Status::resource_exhausted("pool `default` exhausted"), 101),
            (Status::failed_precondition("route missing"), 102),
            (Status::internal("bpf"), 999),
            (Status::permission_denied("no"), 999),
        ];
        for (status, code) in cases {
            let e = status_error("AddEndpoint", &status);
            assert_eq!(e.code.value(), code, "{status:?}");
            assert!(e.msg.starts_with("AddEndpoint: "), "{e}");
            assert!(e.details.contains(status.message()), "{e}");
        }
    }

    #[tokio::test]
    async fn a_missing_socket_is_code_11_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("absent.sock");
        let err = UdsAgent::new(&socket)
            .del("c1", "eth0")
            .await
            .expect_err("no agent");
        assert_eq!(err.code.value(), 11, "{err}");
        assert!(err.details.contains("absent.sock"), "{err}");
    }

    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_code_11() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
        let err = UdsAgent::new(&socket)
            .del("c1", "eth0")
            .await
            .expect_err("no agent");
        assert_eq!(err.code.value(), 11, "{err}");
    }
}
