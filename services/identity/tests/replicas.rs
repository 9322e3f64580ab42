//! Several `membrane-identity` replicas against one real etcd agree on one
//! number per label set, however the calls are spread, and keep it across
//! restarts.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use membrane_test_support::Etcd;
use support::{Replica, allocate, globals, heartbeat, pod};

const LABEL_SETS: usize = 20;
const CALLS_PER_SET: usize = 50;
const NODES: [&str; 4] = ["node-1", "node-2", "node-3", "node-4"];

fn labels_of(set: usize) -> [(String, String); 3] {
    [
        ("app".into(), format!("app-{set}")),
        (
            "app.kubernetes.io/part-of".into(),
            format!("shop-{}", set % 3),
        ),
        // Rollout noise: differs per call, must not change the identity.
        ("pod-template-hash".into(), "will-be-replaced".into()),
    ]
}

/// Every label set's numbers as callers saw them, and how many calls said
/// they created an identity.
async fn allocate_everything(replicas: &[Replica]) -> (BTreeMap<usize, BTreeSet<u32>>, usize) {
    let clients: Vec<_> = replicas.iter().map(Replica::client).collect();
    let mut tasks = Vec::new();
    for call in 0..LABEL_SETS * CALLS_PER_SET {
        let set = call % LABEL_SETS;
        let mut c = clients[call % clients.len()].clone();
        let node = NODES[(call / LABEL_SETS) % NODES.len()];
        let mut labels = labels_of(set);
        labels[2].1 = format!("{call:x}");
        tasks.push(tokio::spawn(async move {
            let l: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let ns = if set.is_multiple_of(2) {
                "default"
            } else {
                "shop"
            };
            let r = allocate(&mut c, pod(node, ns, &l)).await;
            (set, r.id, r.created)
        }));
    }
    let mut ids: BTreeMap<usize, BTreeSet<u32>> = BTreeMap::new();
    let mut created = 0;
    for t in tasks {
        let (set, id, new) = t.await.expect("task");
        ids.entry(set).or_default().insert(id);
        created += usize::from(new);
    }
    (ids, created)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_give_each_of_20_label_sets_one_number_that_survives_restarts() {
    let etcd = Etcd::start().await.expect("etcd");
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Replica::start(&etcd, &[]).await);
    }
    let mut c0 = replicas[0].client();
    for node in NODES {
        heartbeat(&mut c0, node).await;
    }

    let started = Instant::now();
    let (ids, created) = allocate_everything(&replicas).await;
    let took = started.elapsed();
    assert_eq!(
        created, LABEL_SETS,
        "exactly one call created each identity"
    );
    assert_eq!(ids.len(), LABEL_SETS);
    for (set, got) in &ids {
        assert_eq!(got.len(), 1, "label set {set} got several numbers: {got:?}");
    }
    let numbers: BTreeSet<u32> = ids.values().flatten().copied().collect();
    assert_eq!(numbers.len(), LABEL_SETS, "label sets share numbers");
    assert!(
        numbers.iter().all(|n| (256..=65535).contains(n)),
        "{numbers:?}"
    );
    eprintln!(
        "{} allocations over 3 replicas in {took:?}",
        LABEL_SETS * CALLS_PER_SET
    );

    // Every replica lists the same 20 identities, each referenced by every node.
    let listed = globals(&mut c0).await;
    assert_eq!(listed.len(), LABEL_SETS);
    assert!(
        listed
            .iter()
            .all(|(_, _, refs)| *refs == NODES.len() as u32),
        "{listed:?}"
    );
    for r in &replicas[1..] {
        assert_eq!(globals(&mut r.client()).await, listed);
    }
    // The noise label was filtered out; the namespace label is in.
    let (_, labels, _) = &listed[0];
    assert!(
        labels.iter().all(|l| !l.contains("pod-template-hash")),
        "{labels:?}"
    );
    assert!(
        labels
            .iter()
            .any(|l| l.starts_with("k8s:io.kubernetes.pod.namespace=")),
        "{labels:?}"
    );

    // All replicas restart; the numbers stay.
    for r in &mut replicas {
        r.kill();
    }
    drop(replicas);
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Replica::start(&etcd, &[]).await);
    }
    let (again, created) = allocate_everything(&replicas).await;
    assert_eq!(again, ids, "numbers changed across a restart");
    assert_eq!(created, 0);
    for r in &replicas {
        assert_eq!(globals(&mut r.client()).await, listed);
    }
}
