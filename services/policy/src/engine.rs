//! The level-triggered core of the service: whenever the stored policy
//! objects or the identities change, resolve everything again and publish
//! the result. Resolution is a pure function of its inputs, so replicas fed
//! the same objects and identities publish the same content.
//!
//! Versions: the published state is derived, not stored, so it has no etcd
//! revision of its own. Its version is max(etcd revision the objects were
//! read at, version of the identity stream) — both etcd revisions of the
//! same cluster, so they grow across restarts too — and the publisher adds
//! one whenever content changes without either growing, so versions only grow.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use membrane_runtime::stream::{Publisher, Scope};
use tokio::sync::watch;

use crate::labels::LabelSet;
use crate::model::{self, Object, Policy};
use crate::resolve::{self, Resolution};
use crate::store::ObjectsSnapshot;

/// Identities as the identity stream last delivered them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentitySnapshot {
    /// The identity stream's version (an etcd revision).
    pub version: u64,
    /// Identity → labels (`source:key=value`).
    pub identities: BTreeMap<u32, Vec<String>>,
}

/// A stored policy with its document.
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedPolicy {
    /// The validated policy.
    pub policy: Policy,
    /// The document as applied.
    pub doc: serde_json::Value,
}

/// What the service currently knows and publishes.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The version published for this view.
    pub version: u64,
    /// Policies, sorted by kind, namespace, name (the resolution's order).
    pub policies: Vec<AppliedPolicy>,
    /// The resolution.
    pub resolution: Resolution,
}

/// Recomputes and publishes; shares its current [`View`].
#[derive(Debug, Clone)]
pub struct Engine {
    publisher: Publisher,
    view: Arc<RwLock<View>>,
}

/// The stream key of a subject identity's policy.
pub fn resource_key(identity: u32) -> String {
    format!("policy/{identity}")
}

/// Turns stored objects into policies and namespace labels, skipping (with
/// a warning) documents that no longer validate.
pub fn decode_objects(
    snap: &ObjectsSnapshot,
) -> (
    Vec<AppliedPolicy>,
    BTreeMap<String, BTreeMap<String, String>>,
) {
    let mut policies = Vec::new();
    let mut namespaces = BTreeMap::new();
    for (key, obj) in &snap.objects {
        let text = |f: &str| {
            obj.doc
                .get(f)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        match model::parse(&text("apiVersion"), &text("kind"), &obj.doc) {
            Ok(Object::Policy(policy)) => policies.push(AppliedPolicy {
                policy,
                doc: obj.doc.clone(),
            }),
            Ok(Object::Namespace(ns)) => {
                namespaces.insert(ns.name, ns.labels);
            }
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "stored policy object does not validate; ignored")
            }
        }
    }
    policies.sort_by(|a, b| {
        (a.policy.kind, &a.policy.namespace, &a.policy.name).cmp(&(
            b.policy.kind,
            &b.policy.namespace,
            &b.policy.name,
        ))
    });
    (policies, namespaces)
}

impl Engine {
    /// Publishes through `publisher`.
    pub fn new(publisher: Publisher) -> Self {
        Self {
            publisher,
            view: Arc::default(),
        }
    }

    /// The current view.
    pub fn view(&self) -> View {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Resolves `objects` × `identities` and publishes the result.
    pub fn recompute(&self, objects: &ObjectsSnapshot, identities: &IdentitySnapshot) {
        let (policies, namespaces) = decode_objects(objects);
        let ids: BTreeMap<u32, LabelSet> = identities
            .identities
            .iter()
            .map(|(id, l)| (*id, LabelSet::parse(l)))
            .collect();
        let list: Vec<Policy> = policies.iter().map(|p| p.policy.clone()).collect();
        let resolution = resolve::resolve(&ids, &namespaces, &list);
        let resources = resolution
            .policies
            .values()
            .map(|p| {
                (
                    resource_key(p.identity),
                    Scope::All,
                    crate::grpc::encode_policy(p),
                )
            })
            .collect();
        let floor = objects.revision.max(identities.version);
        self.publisher.replace_all(floor, resources);
        let version = self.publisher.version();
        tracing::debug!(
            version,
            subjects = resolution.policies.len(),
            "policy resolved"
        );
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = View {
            version,
            policies,
            resolution,
        };
    }

    /// Recomputes on every change of either input, until both senders are gone.
    pub async fn run(
        self,
        mut objects: watch::Receiver<ObjectsSnapshot>,
        mut identities: watch::Receiver<IdentitySnapshot>,
    ) {
        let (mut objects_open, mut identities_open) = (true, true);
        loop {
            let o = objects.borrow_and_update().clone();
            let i = identities.borrow_and_update().clone();
            self.recompute(&o, &i);
            tokio::select! {
                r = objects.changed(), if objects_open => objects_open = r.is_ok(),
                r = identities.changed(), if identities_open => identities_open = r.is_ok(),
                else => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredObject;

    fn objects(revision: u64) -> ObjectsSnapshot {
        let doc = serde_json::json!({
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}]},
        });
        ObjectsSnapshot {
            revision,
            objects: [(
                "policy/objects/cilium.io.v2-CiliumNetworkPolicy/default/web".to_string(),
                StoredObject {
                    origin: "t#1".into(),
                    doc,
                },
            )]
            .into(),
        }
    }

    fn identities(version: u64, ids: &[u32]) -> IdentitySnapshot {
        IdentitySnapshot {
            version,
            identities: ids
                .iter()
                .map(|id| {
                    (
                        *id,
                        vec![
                            "k8s:app=web".to_string(),
                            "k8s:io.kubernetes.pod.namespace=default".to_string(),
                        ],
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn versions_follow_the_inputs_revisions_and_only_grow() {
        let publisher = Publisher::new();
        let engine = Engine::new(publisher.clone());
        engine.recompute(&objects(10), &identities(12, &[300]));
        assert_eq!(publisher.version(), 12);
        assert_eq!(publisher.len(), 1);
        // A new identity at a newer revision: a newer version.
        engine.recompute(&objects(10), &identities(15, &[300, 301]));
        assert_eq!(publisher.version(), 15);
        assert_eq!(publisher.len(), 2);
        // Inputs that went backwards (a lagging replica) still move forward.
        engine.recompute(&objects(3), &identities(4, &[300]));
        assert_eq!(publisher.version(), 16);
        assert_eq!(engine.view().version, 16);
    }

    #[test]
    fn two_engines_fed_the_same_inputs_publish_the_same_state() {
        let (pa, pb) = (Publisher::new(), Publisher::new());
        Engine::new(pa.clone()).recompute(&objects(7), &identities(9, &[300, 301]));
        Engine::new(pb.clone()).recompute(&objects(7), &identities(9, &[301, 300]));
        assert_eq!(pa.version(), pb.version());
        let ea = Engine::new(pa);
        let eb = Engine::new(pb);
        ea.recompute(&objects(7), &identities(9, &[300, 301]));
        eb.recompute(&objects(7), &identities(9, &[300, 301]));
        assert_eq!(ea.view().resolution, eb.view().resolution);
    }
}
