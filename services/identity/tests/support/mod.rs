//! Fixtures for the identity service's tests: real `membrane-identity`
//! processes against a real etcd, clients, and a stream subscriber that
//! records what it is given.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use membrane_proto::identity::v1 as pb;
use membrane_runtime::grpc::{self, GrpcChannel};
use membrane_runtime::stream::{StateSink, Subscriber};
use membrane_test_support::{Etcd, free_port};
use pb::identity_client::IdentityClient;
use prost_types::Any;
use tokio::sync::watch;

pub type Client = IdentityClient<GrpcChannel>;

/// One `membrane-identity` process, killed on drop.
pub struct Replica {
    child: Child,
    pub url: String,
}

impl Replica {
    /// Starts a replica with the environment `membrane up` gives it, plus `env`.
    pub async fn start(etcd: &Etcd, env: &[(&str, &str)]) -> Replica {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_membrane-identity"));
        cmd.env("MEMBRANE_LISTEN", format!("127.0.0.1:{port}"))
            .env("MEMBRANE_ETCD_ENDPOINTS", etcd.endpoint())
            .env("MEMBRANE_LOG", "warn")
            .stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn membrane-identity");
        // Killed on drop from here on, also when it never becomes healthy.
        let replica = Replica {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        for _ in 0..100 {
            if grpc::check_health(&replica.url, "", None, Duration::from_millis(500))
                .await
                .is_ok()
            {
                return replica;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("membrane-identity did not become healthy");
    }

    pub fn channel(&self) -> GrpcChannel {
        grpc::connect_lazy(&self.url, "", None).expect("channel")
    }

    pub fn client(&self) -> Client {
        IdentityClient::new(self.channel())
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A pod's allocation request.
pub fn pod(node: &str, ns: &str, labels: &[(&str, &str)]) -> pb::AllocateRequest {
    pb::AllocateRequest {
        node: node.into(),
        namespace: ns.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
    }
}

pub async fn heartbeat(c: &mut Client, node: &str) -> pb::HeartbeatResponse {
    c.heartbeat(pb::HeartbeatRequest { node: node.into() })
        .await
        .expect("heartbeat")
        .into_inner()
}

pub async fn allocate(c: &mut Client, req: pb::AllocateRequest) -> pb::AllocateResponse {
    c.allocate(req).await.expect("allocate").into_inner()
}

/// `(id, labels, refcount)` of every global identity.
pub async fn globals(c: &mut Client) -> Vec<(u32, Vec<String>, u32)> {
    c.list(pb::ListRequest {})
        .await
        .expect("list")
        .into_inner()
        .identities
        .into_iter()
        .filter(|i| !i.reserved)
        .map(|i| (i.id, i.labels, i.refcount))
        .collect()
}

/// Waits up to `within` for `cond` to hold, polling.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not within {within:?}: {what}");
}

/// A node's view of the stream: the whole desired state after every apply.
#[derive(Clone)]
pub struct Recorded(pub watch::Receiver<BTreeMap<String, Any>>);

struct RecordingSink(watch::Sender<BTreeMap<String, Any>>);

impl StateSink for RecordingSink {
    async fn apply(
        &mut self,
        _version: u64,
        state: &BTreeMap<String, Any>,
        _changed: &[String],
    ) -> Result<(), String> {
        self.0.send_replace(state.clone());
        Ok(())
    }
}

impl Recorded {
    /// Subscribes `node` to `replica`'s stream until the returned sender drops.
    pub fn subscribe(
        replica: &Replica,
        node: &str,
    ) -> (Recorded, tokio::sync::oneshot::Sender<()>) {
        let (tx, rx) = watch::channel(BTreeMap::new());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let sub = Subscriber::new(node, "identity", replica.channel());
        tokio::spawn(sub.run(RecordingSink(tx), async move {
            let _ = stop_rx.await;
        }));
        (Recorded(rx), stop_tx)
    }

    /// Waits up to `within` until the state satisfies `cond`.
    pub async fn wait_for(
        &mut self,
        within: Duration,
        what: &str,
        cond: impl FnMut(&BTreeMap<String, Any>) -> bool,
    ) {
        let ok = matches!(
            tokio::time::timeout(within, self.0.wait_for(cond)).await,
            Ok(Ok(_))
        );
        if !ok {
            panic!(
                "stream state not within {within:?}: {what}; have keys {:?}",
                self.0.borrow().keys().collect::<Vec<_>>()
            );
        }
    }

    pub fn get<M: prost::Name + Default>(&self, key: &str) -> Option<M> {
        self.0.borrow().get(key).and_then(|a| a.to_msg().ok())
    }
}
