//! An identity's life against a real etcd, through real `membrane-identity`
//! processes: garbage collection after a grace period, an etcd outage, the
//! ipcache on the desired-state stream, and bad input.

mod support;

use std::time::{Duration, Instant};

use membrane_proto::identity::v1 as pb;
use membrane_test_support::Etcd;
use support::{Recorded, Replica, allocate, eventually, heartbeat, pod};
use tonic::Code;

/// Short timings so a test sees leases expire and identities collected.
const FAST: &[(&str, &str)] = &[
    ("MEMBRANE_IDENTITY_LEASE_TTL", "2"),
    ("MEMBRANE_IDENTITY_GC_GRACE", "2s"),
    ("MEMBRANE_IDENTITY_GC_INTERVAL", "200ms"),
];

async fn exists(c: &mut support::Client, id: u32) -> bool {
    match c.get(pb::GetRequest { id }).await {
        Ok(_) => true,
        Err(s) if s.code() == Code::NotFound => false,
        Err(s) => panic!("get {id}: {s}"),
    }
}

#[tokio::test]
async fn unreferenced_identities_are_collected_after_the_grace_period_and_kept_when_reused_within_it()
 {
    let etcd = Etcd::start().await.expect("etcd");
    let a = Replica::start(&etcd, FAST).await;
    let b = Replica::start(&etcd, FAST).await;
    let (mut ca, mut cb) = (a.client(), b.client());
    // node-1 keeps heartbeating; node-2 heartbeats once and then "dies".
    let hb = {
        let mut c = ca.clone();
        tokio::spawn(async move {
            loop {
                heartbeat(&mut c, "node-1").await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    heartbeat(&mut cb, "node-2").await;

    let web = pod("node-1", "default", &[("app", "web")]);
    let db = pod("node-2", "default", &[("app", "db")]);
    let web_id = allocate(&mut ca, web.clone()).await.id;
    let db_id = allocate(&mut cb, db).await.id;

    // Released, then allocated again within the grace period: same number.
    ca.release(pb::ReleaseRequest {
        id: web_id,
        node: "node-1".into(),
    })
    .await
    .expect("release");
    let got = cb
        .get(pb::GetRequest { id: web_id })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.refcount, 0);
    assert!(got.unreferenced_since_unix_ms > 0);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let again = allocate(&mut cb, web.clone()).await;
    assert_eq!((again.id, again.created), (web_id, false));
    // That reference restarted the clock: it outlives the first grace period.
    cb.release(pb::ReleaseRequest {
        id: web_id,
        node: "node-1".into(),
    })
    .await
    .expect("release");
    let released = Instant::now();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        exists(&mut ca, web_id).await,
        "collected before its grace period ended"
    );

    // Released for longer than the grace period: gone.
    eventually(
        Duration::from_secs(4),
        "released identity collected",
        || {
            let mut c = ca.clone();
            async move { !exists(&mut c, web_id).await }
        },
    )
    .await;
    assert!(
        released.elapsed() >= Duration::from_secs(2),
        "collected early"
    );
    // Its label set gets an identity again (a new one is fine).
    let fresh = allocate(&mut ca, web).await;
    assert!(fresh.created);

    // node-2's lease expired long ago: its reference went with it, and its
    // identity followed after the grace period.
    eventually(
        Duration::from_secs(6),
        "identity of a dead node collected",
        || {
            let mut c = cb.clone();
            async move { !exists(&mut c, db_id).await }
        },
    )
    .await;
    let err = cb
        .allocate(pod("node-2", "default", &[("app", "db")]))
        .await
        .expect_err("dead node");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        "node `node-2` has no live lease; call Heartbeat first"
    );
    let hb2 = heartbeat(&mut cb, "node-2").await;
    assert!(hb2.new_lease, "the node learns it must re-register");
    hb.abort();
}

#[tokio::test]
async fn while_etcd_is_down_allocation_fails_fast_and_nodes_keep_their_state() {
    let mut etcd = Etcd::start().await.expect("etcd");
    let r = Replica::start(&etcd, &[]).await;
    let mut c = r.client();
    heartbeat(&mut c, "node-1").await;
    let web = allocate(&mut c, pod("node-1", "default", &[("app", "web")])).await;
    let (mut seen, _stop) = Recorded::subscribe(&r, "node-1");
    let key = format!("identity/{}", web.id);
    seen.wait_for(Duration::from_secs(5), "identity published", |s| {
        s.contains_key(&key)
    })
    .await;

    etcd.stop();
    let started = Instant::now();
    let err = c
        .allocate(pod("node-1", "default", &[("app", "new")]))
        .await
        .expect_err("etcd down");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().starts_with(
            "etcd unavailable while allocating label set `k8s:app=new;k8s:io.kubernetes.pod.namespace=default`: "
        ),
        "{}",
        err.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );

    // The outage goes on for 30 s; the node keeps everything it was given.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let info: pb::IdentityInfo = seen.get(&key).expect("identity still known");
    assert_eq!(info.labels, web.labels);
    assert!(
        seen.0.borrow().contains_key("identity/1"),
        "reserved identities kept"
    );

    etcd.restart().await.expect("etcd back");
    let mut created = None;
    for _ in 0..50 {
        match c
            .allocate(pod("node-1", "default", &[("app", "new")]))
            .await
        {
            Ok(r) => {
                created = Some(r.into_inner());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let created = created.expect("allocation works again after etcd is back");
    assert!(created.created);
    assert_ne!(created.id, web.id);
    // Nothing half-done from the failed attempt: exactly the two identities.
    assert_eq!(support::globals(&mut c).await.len(), 2);
    let key = format!("identity/{}", created.id);
    seen.wait_for(Duration::from_secs(10), "new identity published", |s| {
        s.contains_key(&key)
    })
    .await;
}

#[tokio::test]
async fn ipcache_entries_reach_every_node_and_vanish_on_delete_or_with_the_nodes_lease() {
    let etcd = Etcd::start().await.expect("etcd");
    let r = Replica::start(&etcd, FAST).await;
    let mut c = r.client();
    heartbeat(&mut c, "node-1").await;
    let web = allocate(&mut c, pod("node-1", "default", &[("app", "web")])).await;
    // node-2 subscribes: it sees node-1's endpoints too.
    let (mut seen, _stop) = Recorded::subscribe(&r, "node-2");

    let upsert = |ip: &str, pod: &str| pb::UpsertEndpointRequest {
        ip: ip.into(),
        identity: web.id,
        node: "node-1".into(),
        namespace: "default".into(),
        pod: pod.into(),
    };
    let stored = c
        .upsert_endpoint(upsert("10.200.0.5", "web-1"))
        .await
        .expect("upsert")
        .into_inner()
        .entry
        .expect("entry");
    assert_eq!(stored.prefix, "10.200.0.5/32");
    seen.wait_for(Duration::from_secs(5), "endpoint published", |s| {
        s.contains_key("ipcache/10.200.0.5/32")
    })
    .await;
    let e: pb::IpcacheEntry = seen.get("ipcache/10.200.0.5/32").expect("entry");
    assert_eq!(
        (e.identity, e.node.as_str(), e.pod.as_str()),
        (web.id, "node-1", "web-1")
    );

    c.delete_endpoint(pb::DeleteEndpointRequest {
        ip: "10.200.0.5".into(),
        node: "node-1".into(),
    })
    .await
    .expect("delete");
    seen.wait_for(Duration::from_secs(5), "endpoint removed", |s| {
        !s.contains_key("ipcache/10.200.0.5/32")
    })
    .await;

    // The node's own address, and another endpoint; then node-1 stops
    // heartbeating and both vanish with its lease.
    let node_ip = c
        .register_node_ip(pb::RegisterNodeIpRequest {
            node: "node-1".into(),
            ip: "10.99.0.11".into(),
        })
        .await
        .expect("node ip")
        .into_inner()
        .entry
        .expect("entry");
    assert_eq!(
        (node_ip.prefix.as_str(), node_ip.identity),
        ("10.99.0.11/32", 6)
    );
    c.upsert_endpoint(upsert("10.200.0.6", "web-2"))
        .await
        .expect("upsert");
    let listed = c
        .list_ipcache(pb::ListIpcacheRequest {
            node: "node-1".into(),
        })
        .await
        .expect("list")
        .into_inner()
        .entries;
    assert_eq!(
        listed.iter().map(|e| e.prefix.as_str()).collect::<Vec<_>>(),
        ["10.99.0.11/32", "10.200.0.6/32"]
    );
    seen.wait_for(
        Duration::from_secs(5),
        "node address and endpoint published",
        |s| s.contains_key("ipcache/10.99.0.11/32") && s.contains_key("ipcache/10.200.0.6/32"),
    )
    .await;
    let remote: pb::IpcacheEntry = seen.get("ipcache/10.99.0.11/32").expect("entry");
    assert_eq!(remote.identity, pb::ReservedIdentity::RemoteNode as u32);
    seen.wait_for(
        Duration::from_secs(6),
        "a dead node's entries vanish",
        |s| !s.keys().any(|k| k.starts_with("ipcache/")),
    )
    .await;
    assert!(
        c.list_ipcache(pb::ListIpcacheRequest {
            node: String::new()
        })
        .await
        .expect("list")
        .into_inner()
        .entries
        .is_empty()
    );
}

#[tokio::test]
async fn bad_input_is_answered_clearly_and_changes_nothing() {
    let etcd = Etcd::start().await.expect("etcd");
    let r = Replica::start(&etcd, &[("MEMBRANE_IDENTITY_RANGE", "256-258")]).await;
    let mut c = r.client();

    let err = c
        .allocate(pod("node-1", "default", &[("app", "web")]))
        .await
        .expect_err("no lease");
    assert_eq!(err.code(), Code::FailedPrecondition);
    heartbeat(&mut c, "node-1").await;

    let err = c
        .allocate(pod("node-1", "default", &[("reserved:host", "")]))
        .await
        .expect_err("reserved source");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("labels: invalid label `reserved:host=`"),
        "{}",
        err.message()
    );
    let err = c
        .allocate(pod("node-1", "", &[("app", "web")]))
        .await
        .expect_err("no namespace");
    assert_eq!(err.message(), "namespace: must not be empty");

    // Three numbers in range: the fourth label set is refused.
    let mut ids = Vec::new();
    for app in ["a", "b", "c"] {
        ids.push(
            allocate(&mut c, pod("node-1", "default", &[("app", app)]))
                .await
                .id,
        );
    }
    ids.sort();
    assert_eq!(ids, [256, 257, 258]);
    let err = c
        .allocate(pod("node-1", "default", &[("app", "d")]))
        .await
        .expect_err("exhausted");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(
        err.message(),
        "identity range 256-258 exhausted: no number left for label set `k8s:app=d;k8s:io.kubernetes.pod.namespace=default`"
    );
    assert_eq!(support::globals(&mut c).await.len(), 3);

    // Releasing one of two references leaves the identity referenced.
    heartbeat(&mut c, "node-2").await;
    let shared = allocate(&mut c, pod("node-2", "default", &[("app", "a")]))
        .await
        .id;
    c.release(pb::ReleaseRequest {
        id: shared,
        node: "node-1".into(),
    })
    .await
    .expect("release");
    let got = c
        .get(pb::GetRequest { id: shared })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        (got.refcount, got.nodes, got.unreferenced_since_unix_ms),
        (1, vec!["node-2".to_string()], 0)
    );

    // Releasing what is not held, or a reserved identity.
    let err = c
        .release(pb::ReleaseRequest {
            id: 256,
            node: "node-9".into(),
        })
        .await
        .expect_err("not referenced");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        "identity 256 is not referenced by node `node-9`"
    );
    let err = c
        .release(pb::ReleaseRequest {
            id: 1,
            node: "node-1".into(),
        })
        .await
        .expect_err("reserved");
    assert_eq!(err.code(), Code::InvalidArgument);

    // Reserved identities are listed, with no references.
    let all = c
        .list(pb::ListRequest {})
        .await
        .expect("list")
        .into_inner()
        .identities;
    let reserved: Vec<(u32, &str)> = all
        .iter()
        .filter(|i| i.reserved)
        .map(|i| (i.id, i.labels[0].as_str()))
        .collect();
    assert_eq!(
        reserved,
        [
            (0, "reserved:unknown"),
            (1, "reserved:host"),
            (2, "reserved:world"),
            (3, "reserved:unmanaged"),
            (4, "reserved:health"),
            (5, "reserved:init"),
            (6, "reserved:remote-node"),
        ]
    );
    let err = c
        .get(pb::GetRequest { id: 300 })
        .await
        .expect_err("unknown");
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, "identity 300 not found")
    );

    // The ipcache refuses unknown identities, bad addresses and other nodes' entries.
    let up = |ip: &str, identity: u32, node: &str| pb::UpsertEndpointRequest {
        ip: ip.into(),
        identity,
        node: node.into(),
        namespace: "default".into(),
        pod: "p".into(),
    };
    let err = c
        .upsert_endpoint(up("10.200.0.5", 300, "node-1"))
        .await
        .expect_err("unknown id");
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .upsert_endpoint(up("10.200.0.500", 256, "node-1"))
        .await
        .expect_err("bad ip");
    assert_eq!(err.message(), "ip: invalid IP address `10.200.0.500`");
    let err = c
        .upsert_endpoint(up("10.200.0.5", 1 << 24, "node-1"))
        .await
        .expect_err("cidr identity");
    assert_eq!(err.code(), Code::InvalidArgument);
    c.upsert_endpoint(up("10.200.0.5", 256, "node-1"))
        .await
        .expect("upsert");
    let err = c
        .delete_endpoint(pb::DeleteEndpointRequest {
            ip: "10.200.0.5".into(),
            node: "node-2".into(),
        })
        .await
        .expect_err("other node");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        "ipcache entry for 10.200.0.5 belongs to node `node-1`, not `node-2`"
    );
    let err = c
        .delete_endpoint(pb::DeleteEndpointRequest {
            ip: "10.200.0.9".into(),
            node: "node-1".into(),
        })
        .await
        .expect_err("absent");
    assert_eq!(err.code(), Code::NotFound);
}
