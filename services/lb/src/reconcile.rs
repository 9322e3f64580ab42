//! Level-triggered: stored objects (etcd) + pods (identity stream) → one
//! published `service/<ns>/<name>` per service. Every pass recomputes the
//! whole desired state from a fresh snapshot and publishes only the services
//! whose state changed, so a backend change costs one `ServiceState`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use membrane_runtime::stream::{Change, Publisher, Scope};
use tokio::sync::watch;

use crate::grpc;
use crate::model::{self, Pod, ServiceState};
use crate::store::{LbStore, Snapshot};

/// The published services by resource key, for the gRPC API.
pub type States = BTreeMap<String, ServiceState>;

/// What the reconciler last published, for the gRPC API.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// Every service's state by resource key.
    pub states: States,
    /// The stream version that published each service's current state.
    pub versions: BTreeMap<String, u64>,
}

/// The resource key of a service.
pub fn resource_key(ns: &str, name: &str) -> String {
    format!("service/{ns}/{name}")
}

/// Computes every service's state from `snap` and `pods`; also returns
/// backend addresses that still need an id.
pub fn desired(
    store: &LbStore,
    snap: &Snapshot,
    pods: &[Pod],
) -> (States, BTreeSet<std::net::Ipv4Addr>) {
    let mut missing = BTreeSet::new();
    let mut states = BTreeMap::new();
    for svc in &snap.services {
        let (cands, _) = model::backends_of(svc, pods, &snap.sets);
        missing.extend(cands.keys().filter(|a| !snap.ids.contains_key(a)));
        let st = model::service_state(
            svc,
            &store.config(),
            store.seed(),
            pods,
            &snap.sets,
            &snap.ids,
        );
        states.insert(resource_key(&svc.namespace, &svc.name), st);
    }
    (states, missing)
}

/// Publishes the difference between `old` and `new`, resource by resource
/// ([`grpc::stream_resources`]): a changed backend costs its own resource;
/// returns whether anything changed.
pub fn publish_diff(publisher: &Publisher, old: &States, new: &States) -> bool {
    let resources = |s: Option<&ServiceState>| -> BTreeMap<String, prost_types::Any> {
        match s.map(grpc::stream_resources).transpose() {
            Ok(r) => r.unwrap_or_default().into_iter().collect(),
            Err(e) => {
                tracing::error!(error = %e, "service state does not encode");
                BTreeMap::new()
            }
        }
    };
    let mut changes = Vec::new();
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for k in keys {
        let (before, after) = (old.get(k), new.get(k));
        if before == after {
            continue;
        }
        let (before, after) = (resources(before), resources(after));
        for (key, value) in &after {
            if before.get(key) != Some(value) {
                changes.push(Change::Upsert {
                    key: key.clone(),
                    scope: Scope::All,
                    value: value.clone(),
                });
            }
        }
        for key in before.keys().filter(|k| !after.contains_key(*k)) {
            changes.push(Change::Remove { key: key.clone() });
        }
    }
    if changes.is_empty() {
        return false;
    }
    publisher.apply(publisher.version() + 1, changes);
    true
}

/// Runs the reconciler until both inputs close: `changes` ticks on every
/// stored change (node registrations included: they decide who announces
/// LoadBalancer and external addresses), `pods` carries the current pods.
pub async fn run(
    store: LbStore,
    publisher: Publisher,
    mut changes: watch::Receiver<i64>,
    mut pods: watch::Receiver<Vec<Pod>>,
    published: watch::Sender<Published>,
) {
    loop {
        changes.borrow_and_update();
        let current_pods = pods.borrow_and_update().clone();
        match pass(&store, &current_pods).await {
            Ok(new) => {
                published.send_modify(|p| {
                    if publish_diff(&publisher, &p.states, &new) {
                        let version = publisher.version();
                        tracing::debug!(services = new.len(), version, "published");
                        for (k, v) in &new {
                            if p.states.get(k) != Some(v) {
                                p.versions.insert(k.clone(), version);
                            }
                        }
                        p.versions.retain(|k, _| new.contains_key(k));
                    }
                    p.states = new;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "reconcile failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() && pods.has_changed().is_err() { return },
            r = pods.changed() => if r.is_err() && changes.has_changed().is_err() { return },
        }
    }
}

async fn pass(store: &LbStore, pods: &[Pod]) -> Result<States, crate::store::LbError> {
    let mut snap = store.snapshot().await?;
    let (mut states, missing) = desired(store, &snap, pods);
    if !missing.is_empty() {
        store.ensure_backend_ids(&missing).await?;
        snap = store.snapshot().await?;
        states = desired(store, &snap, pods).0;
    }
    // Announcers from the nodes registered in etcd, identical on every replica.
    for st in states.values_mut() {
        model::assign_announcers(st, &snap.nodes);
    }
    Ok(states)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maglev::{Seed, TableSize};
    use crate::model::{Algorithm, Backend};

    fn state(name: &str, backends: u8) -> ServiceState {
        ServiceState {
            namespace: "default".into(),
            name: name.into(),
            frontends: vec![],
            algorithm: Algorithm::Maglev,
            hash_source_only: false,
            affinity_timeout: 0,
            backends: (1..=backends)
                .map(|i| Backend {
                    id: i.into(),
                    address: [10, 0, 0, i].into(),
                    weight: 1,
                    source: String::new(),
                })
                .collect(),
            table_size: TableSize::default(),
            seed: Seed::from_bytes([3; 12]),
        }
    }

    #[test]
    fn a_backend_change_publishes_only_the_changed_service() {
        let publisher = Publisher::new();
        let mut old = States::new();
        old.insert(resource_key("default", "web"), state("web", 3));
        old.insert(resource_key("default", "db"), state("db", 1));
        assert!(publish_diff(&publisher, &States::new(), &old));
        // Two services, four backends: six resources.
        assert_eq!((publisher.len(), publisher.version()), (6, 1));
        let mut new = old.clone();
        new.insert(resource_key("default", "web"), state("web", 2));
        assert!(publish_diff(&publisher, &old, &new));
        assert_eq!(publisher.version(), 2);
        // The bytes a one-backend change costs: the service's state without
        // its backends did not change, so nothing but the removal went.
        assert_eq!(
            grpc::stream_resources(&state("web", 3)).expect("encode")[0],
            grpc::stream_resources(&state("web", 2)).expect("encode")[0]
        );
        assert!(
            !publish_diff(&publisher, &new, &new),
            "no change, no version"
        );
        assert_eq!(publisher.len(), 5, "web's third backend went alone");
        let (old, new) = (new.clone(), {
            let mut n = new;
            n.remove(&resource_key("default", "db"));
            n
        });
        assert!(publish_diff(&publisher, &old, &new));
        assert_eq!(publisher.len(), 3, "db and its backend are gone");
    }
}
