//! IPAM against a real etcd, through real `membrane-ipam` processes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ipnet::Ipv4Net;
use membrane_proto::ipam::v1 as pb;
use membrane_runtime::grpc::{self, GrpcChannel};
use membrane_test_support::{Etcd, free_port};
use pb::ipam_client::IpamClient;
use tonic::Code;

/// One `membrane-ipam` process, killed on drop.
struct Replica {
    child: Child,
    url: String,
}

impl Replica {
    async fn start(etcd: &Etcd, node_mask: u8) -> Replica {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_membrane-ipam"))
            .env("MEMBRANE_LISTEN", format!("127.0.0.1:{port}"))
            .env("MEMBRANE_ETCD_ENDPOINTS", etcd.endpoint())
            .env("MEMBRANE_CLUSTER_CIDR", "10.200.0.0/16")
            .env("MEMBRANE_NODE_MASK_SIZE", node_mask.to_string())
            .env("MEMBRANE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn membrane-ipam");
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
        panic!("membrane-ipam did not become healthy");
    }

    fn client(&self) -> IpamClient<GrpcChannel> {
        IpamClient::new(grpc::connect_lazy(&self.url, "", None).expect("channel"))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn register(c: &mut IpamClient<GrpcChannel>, node: &str, underlay: &str) -> pb::NodeInfo {
    c.register_node(pb::RegisterNodeRequest {
        node: node.into(),
        underlay_ip: underlay.into(),
        pod_cidr: String::new(),
    })
    .await
    .expect("register")
    .into_inner()
}

async fn allocations(c: &mut IpamClient<GrpcChannel>) -> Vec<(String, String, String)> {
    c.list_allocations(pb::ListAllocationsRequest {
        node: String::new(),
    })
    .await
    .expect("list")
    .into_inner()
    .allocations
    .into_iter()
    .map(|a| (a.node, a.ip, a.owner))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_hand_out_200_distinct_addresses_even_when_one_dies_mid_run() {
    let etcd = Etcd::start().await.expect("etcd");
    let a = Replica::start(&etcd, 25).await;
    let mut b = Replica::start(&etcd, 25).await;
    let mut ca = a.client();
    let mut cidrs = BTreeMap::new();
    for (i, node) in ["node-1", "node-2", "node-3"].iter().enumerate() {
        let info = register(&mut ca, node, &format!("10.99.0.{}", 11 + i)).await;
        cidrs.insert(
            node.to_string(),
            info.pod_cidr.parse::<Ipv4Net>().expect("cidr"),
        );
    }
    assert_eq!(
        cidrs.values().collect::<BTreeSet<_>>().len(),
        3,
        "node CIDRs are distinct"
    );

    let clients = [a.client(), b.client()];
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..200usize {
        let mut order = [clients[i % 2].clone(), clients[(i + 1) % 2].clone()];
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let node = format!("node-{}", i % 3 + 1);
            let req = pb::AllocateRequest {
                node: node.clone(),
                owner: format!("pod-{i}"),
            };
            // A caller whose replica dies retries on the other one; the owner
            // makes the retry idempotent.
            for attempt in 0..20 {
                let c = &mut order[attempt % 2];
                match c.allocate(req.clone()).await {
                    Ok(r) => {
                        done.fetch_add(1, Ordering::SeqCst);
                        return r.into_inner();
                    }
                    Err(s)
                        if matches!(
                            s.code(),
                            Code::Unavailable | Code::Unknown | Code::Cancelled
                        ) =>
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(s) => panic!("allocate pod-{i}: {s}"),
                }
            }
            panic!("allocate pod-{i}: no replica answered");
        }));
    }
    while done.load(Ordering::SeqCst) < 60 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.kill();
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.expect("task"));
    }

    let ips: BTreeSet<&str> = got.iter().map(|a| a.ip.as_str()).collect();
    assert_eq!(ips.len(), 200, "every address is distinct");
    for alloc in &got {
        let ip: Ipv4Addr = alloc.ip.parse().expect("ip");
        assert!(
            cidrs[&alloc.node].contains(&ip),
            "{} outside {}",
            ip,
            cidrs[&alloc.node]
        );
    }
    // Nothing lost, nothing extra: the store holds exactly what callers got.
    let stored = allocations(&mut ca).await;
    assert_eq!(stored.len(), 200);
    let by_owner: BTreeMap<&str, &str> = stored
        .iter()
        .map(|(_, ip, o)| (o.as_str(), ip.as_str()))
        .collect();
    for alloc in &got {
        assert_eq!(by_owner.get(alloc.owner.as_str()), Some(&alloc.ip.as_str()));
    }

    // Every released address can be handed out again.
    for alloc in &got {
        ca.release(pb::ReleaseRequest {
            node: alloc.node.clone(),
            ip: alloc.ip.clone(),
        })
        .await
        .expect("release");
    }
    assert!(allocations(&mut ca).await.is_empty());
    let mut again = BTreeSet::new();
    for i in 0..200usize {
        let r = ca
            .allocate(pb::AllocateRequest {
                node: format!("node-{}", i % 3 + 1),
                owner: format!("again-{i}"),
            })
            .await
            .expect("allocate again")
            .into_inner();
        again.insert(r.ip);
    }
    assert_eq!(again.len(), 200);
}

#[tokio::test]
async fn bad_input_is_answered_clearly_and_changes_nothing() {
    let etcd = Etcd::start().await.expect("etcd");
    let r = Replica::start(&etcd, 29).await;
    let mut c = r.client();
    register(&mut c, "node-1", "10.99.0.11").await;
    let first = c
        .allocate(pb::AllocateRequest {
            node: "node-1".into(),
            owner: "a".into(),
        })
        .await
        .expect("allocate")
        .into_inner();
    let before = allocations(&mut c).await;

    let err = c
        .register_node(pb::RegisterNodeRequest {
            node: "node-2".into(),
            underlay_ip: "10.99.0.12".into(),
            pod_cidr: "10.200.0.0/99".into(),
        })
        .await
        .expect_err("malformed cidr");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("pod_cidr: invalid CIDR `10.200.0.0/99`"),
        "{}",
        err.message()
    );

    let err = c
        .register_node(pb::RegisterNodeRequest {
            node: "node-2".into(),
            underlay_ip: "300.1.1.1".into(),
            pod_cidr: String::new(),
        })
        .await
        .expect_err("bad ip");
    assert!(err.message().contains("underlay_ip"), "{}", err.message());

    let err = c
        .allocate(pb::AllocateRequest {
            node: "node-9".into(),
            owner: "x".into(),
        })
        .await
        .expect_err("unknown node");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "unknown node `node-9`");

    // A /29 holds 5 pod addresses: 4 more fit, the 6th is refused.
    for i in 0..4 {
        c.allocate(pb::AllocateRequest {
            node: "node-1".into(),
            owner: format!("fill-{i}"),
        })
        .await
        .expect("fits");
    }
    let full = allocations(&mut c).await;
    let err = c
        .allocate(pb::AllocateRequest {
            node: "node-1".into(),
            owner: "one-too-many".into(),
        })
        .await
        .expect_err("exhausted");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message()
            .starts_with("pool of node `node-1` (10.200.0.0/29) exhausted"),
        "{}",
        err.message()
    );
    assert_eq!(allocations(&mut c).await, full);

    // Release, then release again.
    c.release(pb::ReleaseRequest {
        node: "node-1".into(),
        ip: first.ip.clone(),
    })
    .await
    .expect("release");
    let err = c
        .release(pb::ReleaseRequest {
            node: "node-1".into(),
            ip: first.ip.clone(),
        })
        .await
        .expect_err("double release");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        format!("address {} on node `node-1` is not allocated", first.ip)
    );
    // The freed address is the one handed out next.
    let next = c
        .allocate(pb::AllocateRequest {
            node: "node-1".into(),
            owner: "reuse".into(),
        })
        .await
        .expect("reuse")
        .into_inner();
    assert_eq!(next.ip, first.ip);
    assert_eq!(before.len(), 1);
}

#[tokio::test]
async fn state_survives_restarts_of_the_service_and_of_etcd() {
    let mut etcd = Etcd::start().await.expect("etcd");
    let mut r = Replica::start(&etcd, 24).await;
    let mut c = r.client();
    register(&mut c, "node-1", "10.99.0.11").await;
    let a = c
        .allocate(pb::AllocateRequest {
            node: "node-1".into(),
            owner: "p".into(),
        })
        .await
        .expect("alloc")
        .into_inner();

    r.kill();
    let r = Replica::start(&etcd, 24).await;
    let mut c = r.client();
    assert_eq!(
        allocations(&mut c).await,
        vec![("node-1".into(), a.ip.clone(), "p".into())]
    );

    etcd.stop();
    let err = c
        .allocate(pb::AllocateRequest {
            node: "node-1".into(),
            owner: "q".into(),
        })
        .await
        .expect_err("etcd down");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("etcd unavailable"),
        "{}",
        err.message()
    );
    etcd.restart().await.expect("etcd back");
    let mut ok = None;
    for _ in 0..50 {
        match c
            .allocate(pb::AllocateRequest {
                node: "node-1".into(),
                owner: "q".into(),
            })
            .await
        {
            Ok(r) => {
                ok = Some(r.into_inner());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let q = ok.expect("allocation works again after etcd is back");
    assert_ne!(q.ip, a.ip);
    // Same owner, same address: the allocation is idempotent.
    let p = c
        .allocate(pb::AllocateRequest {
            node: "node-1".into(),
            owner: "p".into(),
        })
        .await
        .expect("again")
        .into_inner();
    assert_eq!(p.ip, a.ip);
}

#[tokio::test]
async fn a_replica_refuses_a_pool_that_differs_from_the_stored_one() {
    let etcd = Etcd::start().await.expect("etcd");
    let _r = Replica::start(&etcd, 24).await;
    let out = Command::new(env!("CARGO_BIN_EXE_membrane-ipam"))
        .env("MEMBRANE_LISTEN", "127.0.0.1:0")
        .env("MEMBRANE_ETCD_ENDPOINTS", etcd.endpoint())
        .env("MEMBRANE_NODE_MASK_SIZE", "26")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .contains("pool configuration in etcd is cluster CIDR 10.200.0.0/16 with /24 per node"),
        "{stderr}"
    );
}
