//! End-to-end: pods carry identities to every node's eBPF ipcache. Needs
//! root (see `support::has_root`).

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;

use support::*;

fn json(cluster: &Cluster, args: &[&str]) -> Value {
    serde_json::from_str(&cluster.ok(args)).expect("json output")
}

/// The identity each node's ipcache map gives `prefix`, per node.
fn ipcache_identity(cluster: &Cluster, prefix: &str) -> Vec<(String, Option<u64>)> {
    let v = json(cluster, &["get", "ipcache", "-o", "json"]);
    let items = v["items"].as_array().cloned().unwrap_or_default();
    ["node-1", "node-2"]
        .iter()
        .map(|n| {
            let id = items
                .iter()
                .find(|e| e["node"] == *n && e["prefix"] == prefix)
                .and_then(|e| e["identity"].as_u64());
            (n.to_string(), id)
        })
        .collect()
}

fn endpoint_identity(cluster: &Cluster, ip: &str) -> u64 {
    let v = json(cluster, &["get", "endpoints", "-o", "json"]);
    v["items"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["address"] == format!("{ip}/32")))
        .and_then(|e| e["identity"].as_u64())
        .expect("endpoint identity")
}

fn wait_for<F: FnMut() -> bool>(what: &str, timeout: Duration, mut f: F) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pod_identities_reach_every_node_follow_relabels_and_leave_with_the_pod() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !has_root() {
        return;
    }
    let cluster = Cluster::new();
    assert!(
        cluster.has("membrane-identity"),
        "this test needs the identity service"
    );
    cluster.ok(&["up", "--nodes", "2", "--detach"]);
    let status = cluster.ok(&["status"]);
    assert!(status.contains("Cluster healthy"), "{status}");

    // Same labels → same identity, on either node; different labels → another one.
    let mut latencies = Vec::new();
    let mut ips = Vec::new();
    for (i, (node, app)) in [
        ("node-1", "web"),
        ("node-2", "web"),
        ("node-1", "db"),
        ("node-2", "db"),
    ]
    .iter()
    .enumerate()
    {
        let name = format!("p{i}");
        let ip = cluster
            .ok(&[
                "pod",
                "run",
                &name,
                "--node",
                node,
                "--labels",
                &format!("app={app}"),
            ])
            .trim()
            .to_string();
        let prefix = format!("{ip}/32");
        let id = endpoint_identity(&cluster, &ip);
        assert!(id >= 256, "a pod gets a global identity, got {id}");
        latencies.push(wait_for(
            &format!("{prefix} in every ipcache"),
            Duration::from_secs(5),
            || {
                ipcache_identity(&cluster, &prefix)
                    .iter()
                    .all(|(_, got)| *got == Some(id))
            },
        ));
        ips.push((name, ip, id));
    }
    assert_eq!(
        ips[0].2, ips[1].2,
        "same labels, same identity across nodes"
    );
    assert_eq!(ips[2].2, ips[3].2);
    assert_ne!(ips[0].2, ips[2].2, "different labels, different identity");
    latencies.sort();
    eprintln!(
        "ipcache propagation after `pod run` returned: max {:?}",
        latencies.last()
    );
    assert!(
        latencies.iter().all(|l| *l < Duration::from_secs(1)),
        "{latencies:?}"
    );

    // Node addresses: each node sees itself as host (1) and the other as remote-node (6).
    let v = json(&cluster, &["get", "ipcache", "-o", "json"]);
    let items = v["items"].as_array().cloned().unwrap_or_default();
    let id_of = |node: &str, prefix: &str| {
        items
            .iter()
            .find(|e| e["node"] == node && e["prefix"] == prefix)
            .and_then(|e| e["identity"].as_u64())
    };
    assert_eq!(id_of("node-1", "10.99.0.11/32"), Some(1));
    assert_eq!(id_of("node-1", "10.99.0.12/32"), Some(6));
    assert_eq!(id_of("node-2", "10.99.0.12/32"), Some(1));

    // Identities are listed with their labels and references.
    let ids = json(&cluster, &["get", "identities", "-o", "json"]);
    let listed = ids["items"].as_array().cloned().unwrap_or_default();
    let web = listed
        .iter()
        .find(|i| i["id"].as_u64() == Some(ips[0].2))
        .expect("web identity listed");
    assert!(web.to_string().contains("k8s:app=web"), "{web}");

    // Relabel p0: it moves to the db identity on every node.
    cluster.ok(&["pod", "label", "p0", "app=db"]);
    let prefix = format!("{}/32", ips[0].1);
    let db = ips[2].2;
    let took = wait_for("relabel reaches every node", Duration::from_secs(5), || {
        ipcache_identity(&cluster, &prefix)
            .iter()
            .all(|(_, got)| *got == Some(db))
    });
    eprintln!("relabel propagated in {took:?}");
    assert_eq!(endpoint_identity(&cluster, &ips[0].1), db);

    // pod rm: the entry leaves every node's map.
    cluster.ok(&["pod", "rm", "p3"]);
    let prefix = format!("{}/32", ips[3].1);
    wait_for("entry removed everywhere", Duration::from_secs(5), || {
        ipcache_identity(&cluster, &prefix)
            .iter()
            .all(|(_, got)| got.is_none())
    });
}
