//! The lb service against a real etcd, through two real `membrane-lb` processes.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use membrane_proto::lb::v1 as pb;
use membrane_proto::objects::v1 as objpb;
use membrane_runtime::grpc::{self, GrpcChannel};
use membrane_runtime::stream::{StateSink, Subscriber};
use membrane_test_support::{Etcd, free_port};
use prost_types::Any;
use tokio::sync::watch;

/// One `membrane-lb` process (publishing its stream), killed on drop.
struct Replica {
    child: Child,
    url: String,
}

impl Replica {
    async fn start(etcd: &Etcd) -> Replica {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_membrane-lb"))
            .env("MEMBRANE_LISTEN", format!("127.0.0.1:{port}"))
            .env("MEMBRANE_ETCD_ENDPOINTS", etcd.endpoint())
            .env("MEMBRANE_LB_PUBLISH", "true")
            .env("MEMBRANE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn membrane-lb");
        let url = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if grpc::check_health(&url, "", None, Duration::from_millis(500))
                .await
                .is_ok()
            {
                return Replica { child, url };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("membrane-lb did not become healthy");
    }

    fn channel(&self) -> GrpcChannel {
        grpc::connect_lazy(&self.url, "", None).expect("channel")
    }

    async fn apply(&self, docs: &[serde_json::Value]) -> Result<Vec<String>, tonic::Status> {
        let objects = docs
            .iter()
            .enumerate()
            .map(|(i, d)| objpb::Object {
                origin: format!("test.yaml#{i}"),
                json: d.to_string(),
            })
            .collect();
        objpb::objects_client::ObjectsClient::new(self.channel())
            .apply(objpb::ApplyRequest {
                objects,
                dry_run: false,
            })
            .await
            .map(|r| r.into_inner().results)
    }

    async fn services(&self) -> BTreeMap<String, pb::ServiceState> {
        pb::load_balancer_client::LoadBalancerClient::new(self.channel())
            .list_services(pb::ListServicesRequest {})
            .await
            .expect("list")
            .into_inner()
            .services
            .into_iter()
            .map(|s| (format!("{}/{}", s.namespace, s.name), s))
            .collect()
    }

    /// Follows the replica's desired-state stream.
    fn follow(&self) -> watch::Receiver<BTreeMap<String, Any>> {
        self.follow_as("test-node")
    }

    /// Follows the replica's desired-state stream as node `node`.
    fn follow_as(&self, node: &str) -> watch::Receiver<BTreeMap<String, Any>> {
        let (tx, rx) = watch::channel(BTreeMap::new());
        let sub = Subscriber::new(node, "lb", self.channel());
        tokio::spawn(sub.run(Capture(tx), std::future::pending()));
        rx
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Capture(watch::Sender<BTreeMap<String, Any>>);

impl StateSink for Capture {
    async fn apply(
        &mut self,
        _: u64,
        state: &BTreeMap<String, Any>,
        _: &[String],
    ) -> Result<(), String> {
        self.0.send_replace(state.clone());
        Ok(())
    }
}

fn service(name: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut spec = serde_json::json!({"ports": [{"name": "http", "port": 80, "targetPort": 8080}]});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec})
}

/// The service at `key` joined with its `backend/<ns>/<name>/…` resources,
/// as a node sees it.
fn joined(state: &BTreeMap<String, Any>, key: &str) -> Option<pb::ServiceState> {
    let mut st: pb::ServiceState = state.get(key)?.to_msg().ok()?;
    let prefix = format!("backend/{}/", key.strip_prefix("service/")?);
    for (_, b) in state
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
    {
        st.backends.push(b.to_msg().ok()?);
    }
    Some(st)
}

async fn wait_for(
    rx: &mut watch::Receiver<BTreeMap<String, Any>>,
    key: &str,
    backends: usize,
) -> pb::ServiceState {
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| joined(s, key).is_some_and(|st| st.backends.len() == backends)),
    )
    .await
    .expect("published in time")
    .expect("stream open");
    joined(&r, key).expect("present")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_agree_on_services_reject_bad_files_whole_and_never_share_a_node_port() {
    let etcd = Etcd::start().await.expect("etcd");
    let a = Replica::start(&etcd).await;
    let b = Replica::start(&etcd).await;
    let (mut follow_a, mut follow_b) = (a.follow(), b.follow());

    // A selector-less service with 3 explicit endpoints, applied on replica a.
    let endpoints = serde_json::json!({
        "apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "web", "namespace": "default"},
        "subsets": [{"addresses": [{"ip": "10.200.1.3"}, {"ip": "10.200.1.1"}, {"ip": "10.200.1.2"}],
                     "ports": [{"name": "http", "port": 8080}]}]
    });
    let lines = a
        .apply(&[service("web", serde_json::json!({})), endpoints])
        .await
        .expect("apply");
    assert!(
        lines[0].starts_with("service/default/web created clusterIP=10.96."),
        "{lines:?}"
    );

    let pa = wait_for(&mut follow_a, "service/default/web", 3).await;
    let pb_ = wait_for(&mut follow_b, "service/default/web", 3).await;
    assert_eq!(pa, pb_, "both replicas publish identical content");
    let st = pa;
    let ids: BTreeSet<u32> = st.backends.iter().map(|b| b.id).collect();
    assert_eq!(ids.len(), 3, "distinct backend ids");
    let addrs: Vec<&str> = st.backends.iter().map(|b| b.address.as_str()).collect();
    assert_eq!(
        addrs,
        ["10.200.1.1", "10.200.1.2", "10.200.1.3"],
        "sorted by address"
    );
    let (sa, sb) = (a.services().await, b.services().await);
    assert_eq!(
        sa["default/web"].frontends, sb["default/web"].frontends,
        "same ClusterIP on both"
    );

    // The table from either replica is the same pure function of that state.
    let table = |r: &Replica| {
        let mut c = pb::load_balancer_client::LoadBalancerClient::new(r.channel());
        async move {
            c.maglev_table(pb::MaglevTableRequest {
                service: "default/web".into(),
                node: String::new(),
            })
            .await
            .expect("table")
            .into_inner()
        }
    };
    let (ta, tb) = (table(&a).await, table(&b).await);
    assert_eq!(ta.slots.len(), 16381);
    assert_eq!(ta.slots, tb.slots);
    assert!(
        ta.slots_per_backend
            .values()
            .all(|n| *n == 5460 || *n == 5461),
        "{:?}",
        ta.slots_per_backend
    );

    // A file with one bad service changes nothing, not even its good neighbour.
    let bad = service(
        "dup",
        serde_json::json!({"ports": [
        {"name": "a", "port": 80}, {"name": "b", "port": 80}]}),
    );
    let err = b
        .apply(&[service("fine", serde_json::json!({})), bad])
        .await
        .expect_err("rejected");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("spec.ports[1].port: duplicate port 80/TCP"),
        "{}",
        err.message()
    );
    assert!(
        !a.services().await.contains_key("default/fine"),
        "nothing applied"
    );

    // 50 NodePort services applied concurrently, alternating replicas.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let ch = if i % 2 == 0 { a.channel() } else { b.channel() };
        let doc = service(&format!("np-{i}"), serde_json::json!({"type": "NodePort"}));
        tasks.push(tokio::spawn(async move {
            objpb::objects_client::ObjectsClient::new(ch)
                .apply(objpb::ApplyRequest {
                    objects: vec![objpb::Object {
                        origin: format!("np{i}"),
                        json: doc.to_string(),
                    }],
                    dry_run: false,
                })
                .await
                .expect("apply node port service");
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let mut ports = BTreeSet::new();
    let mut cluster_ips = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let svcs = a.services().await;
        let np: Vec<_> = svcs
            .values()
            .filter(|s| s.name.starts_with("np-"))
            .collect();
        if np.len() == 50 || tokio::time::Instant::now() > deadline {
            for s in np {
                for f in &s.frontends {
                    if f.kind == pb::FrontendKind::NodePort as i32 {
                        assert!(
                            ports.insert(f.port),
                            "node port {} handed out twice",
                            f.port
                        );
                    }
                    if f.kind == pb::FrontendKind::ClusterIp as i32 {
                        assert!(
                            cluster_ips.insert(f.address.clone()),
                            "cluster IP {} twice",
                            f.address
                        );
                    }
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ports.len(), 50, "50 distinct node ports");
    assert!(ports.iter().all(|p| (30000..=32767).contains(p)));
}

/// The announcer of the LoadBalancer frontend of `key`, once there is one.
async fn announcer(rx: &mut watch::Receiver<BTreeMap<String, Any>>, key: &str) -> String {
    let pick = |s: &BTreeMap<String, Any>| {
        joined(s, key).and_then(|st| {
            st.frontends
                .iter()
                .find(|f| f.kind == pb::FrontendKind::LoadBalancer as i32)
                .map(|f| f.announcer.clone())
        })
    };
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        rx.wait_for(|s| pick(s).is_some_and(|a| !a.is_empty())),
    )
    .await
    .expect("announced in time")
    .expect("stream open");
    pick(&r).expect("present")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_followed_by_different_nodes_agree_on_who_announces_a_load_balancer_address() {
    let etcd = Etcd::start().await.expect("etcd");
    let a = Replica::start(&etcd).await;
    let b = Replica::start(&etcd).await;
    // node-a follows replica a, node-b replica b: each replica sees one
    // node connected, but both must pick from both.
    let mut via_a = a.follow_as("node-a");
    let mut via_b = b.follow_as("node-b");
    a.apply(&[service("lb", serde_json::json!({"type": "LoadBalancer"}))])
        .await
        .expect("apply");
    let key = "service/default/lb";
    // Until both registrations are in etcd the choice may move: wait for
    // both replicas to publish the same announcer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (x, y) = (
            announcer(&mut via_a, key).await,
            announcer(&mut via_b, key).await,
        );
        if x == y {
            assert!(["node-a", "node-b"].contains(&x.as_str()), "{x}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica a says {x}, replica b says {y}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
