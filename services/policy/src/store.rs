//! The etcd adapter: where policy objects live and how they change.
//!
//! Layout (under the cluster prefix):
//! `policy/objects/<apiVersion-kind>/<namespace>/<name>` → [`StoredObject`]
//! as JSON, where `<apiVersion-kind>` is the apiVersion with `/` written as
//! `.` (keys stay one segment), a dash and the kind
//! (`cilium.io.v2-CiliumNetworkPolicy`), and `<namespace>` is `_` for
//! cluster-scoped kinds (no namespace can be named `_`).
//!
//! Every apply or delete is one etcd transaction: all or nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, Txn, TxnOp, WatchOptions};
use membrane_runtime::store::{Store, StoreError, to_json};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::model::Kind;

/// Prefix of every policy object key.
pub const OBJECTS: &str = "policy/objects/";

/// Most operations etcd accepts in one transaction (its default
/// `--max-txn-ops`); a larger apply is refused rather than split.
pub const MAX_TXN_OPS: usize = 128;

/// A stored object: the document as applied, and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredObject {
    /// `file#N` of the apply that stored it.
    pub origin: String,
    /// The whole document.
    pub doc: serde_json::Value,
}

/// The relative key of an object.
pub fn object_key(kind: Kind, namespace: Option<&str>, name: &str) -> String {
    format!(
        "{OBJECTS}{}-{}/{}/{name}",
        kind.api_version().replace('/', "."),
        kind.name(),
        namespace.unwrap_or("_"),
    )
}

/// Every stored object at one etcd revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObjectsSnapshot {
    /// The etcd revision the objects were read at.
    pub revision: u64,
    /// Relative key → object.
    pub objects: BTreeMap<String, StoredObject>,
}

/// Policy objects in etcd.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    store: Store,
}

impl PolicyStore {
    /// Uses `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// The underlying store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// One object.
    pub async fn get(&self, key: &str) -> Result<Option<StoredObject>, StoreError> {
        Ok(self.store.get_json(key).await?.map(|(v, _)| v))
    }

    /// Every object.
    pub async fn list(&self) -> Result<Vec<(String, StoredObject)>, StoreError> {
        self.store.list_json(OBJECTS).await
    }

    /// Writes `puts` and removes `deletes` in one transaction.
    pub async fn write(
        &self,
        puts: Vec<(String, StoredObject)>,
        deletes: Vec<String>,
    ) -> Result<(), StoreError> {
        let mut ops: Vec<TxnOp> = puts
            .iter()
            .map(|(k, v)| TxnOp::put(self.store.key(k), to_json(v), None))
            .collect();
        ops.extend(
            deletes
                .iter()
                .map(|k| TxnOp::delete(self.store.key(k), None)),
        );
        if ops.is_empty() {
            return Ok(());
        }
        self.store.client().txn(Txn::new().and_then(ops)).await?;
        Ok(())
    }
}

/// Keeps `tx` equal to every stored object: lists, then watches from the
/// listed revision, re-listing after any interruption. Runs until dropped.
pub async fn watch_objects(store: Store, tx: watch::Sender<ObjectsSnapshot>) {
    loop {
        if let Err(e) = watch_once(&store, &tx).await {
            tracing::warn!(error = %e, "policy object watch interrupted; re-listing");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

async fn watch_once(
    store: &Store,
    tx: &watch::Sender<ObjectsSnapshot>,
) -> Result<(), etcd_client::Error> {
    let prefix = store.key(OBJECTS);
    let mut client = store.client();
    let resp = client
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut snap = ObjectsSnapshot {
        revision: revision as u64,
        objects: BTreeMap::new(),
    };
    for kv in resp.kvs() {
        let key = store.rel(&String::from_utf8_lossy(kv.key())).to_string();
        match serde_json::from_slice(kv.value()) {
            Ok(v) => {
                snap.objects.insert(key, v);
            }
            Err(e) => tracing::warn!(key = %key, error = %e, "corrupt policy object ignored"),
        }
    }
    tx.send_replace(snap.clone());

    let mut stream = client
        .watch(
            prefix.as_str(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await?;
    while let Some(resp) = stream.message().await? {
        if resp.canceled() {
            return Err(etcd_client::Error::WatchError(format!(
                "watch canceled: {}",
                resp.cancel_reason()
            )));
        }
        let mut changed = false;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            changed = true;
            snap.revision = snap.revision.max(kv.mod_revision() as u64);
            let key = store.rel(&String::from_utf8_lossy(kv.key())).to_string();
            match ev.event_type() {
                EventType::Put => match serde_json::from_slice(kv.value()) {
                    Ok(v) => {
                        snap.objects.insert(key, v);
                    }
                    Err(e) => {
                        tracing::warn!(key = %key, error = %e, "corrupt policy object ignored");
                        snap.objects.remove(&key);
                    }
                },
                EventType::Delete => {
                    snap.objects.remove(&key);
                }
            }
        }
        if changed {
            tx.send_replace(snap.clone());
        }
    }
    Err(etcd_client::Error::WatchError("watch stream ended".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_api_version_and_kind_in_one_segment() {
        assert_eq!(
            object_key(Kind::CiliumNetworkPolicy, Some("default"), "allow"),
            "policy/objects/cilium.io.v2-CiliumNetworkPolicy/default/allow"
        );
        assert_eq!(
            object_key(Kind::CiliumClusterwideNetworkPolicy, None, "lockdown"),
            "policy/objects/cilium.io.v2-CiliumClusterwideNetworkPolicy/_/lockdown"
        );
        assert_eq!(
            object_key(Kind::Namespace, None, "apps"),
            "policy/objects/v1-Namespace/_/apps"
        );
    }
}
