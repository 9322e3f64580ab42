//! The kinds this service owns for `membrane apply` / `delete` / `get`:
//! `CiliumNetworkPolicy`, `CiliumClusterwideNetworkPolicy` (`cilium.io/v2`),
//! `NetworkPolicy` (`networking.k8s.io/v1`) and `Namespace` (`v1`, for
//! namespace labels). Every object is validated before anything is written,
//! and everything is written in one etcd transaction.

use membrane_runtime::objects::{HandlerError, KubeObject, ObjectError, ObjectHandler};
use membrane_runtime::store::StoreError;

use crate::model::{self, Kind, Object};
use crate::store::{MAX_TXN_OPS, PolicyStore, StoredObject, object_key};

/// Handles the policy kinds.
#[derive(Debug, Clone)]
pub struct PolicyObjects {
    store: PolicyStore,
}

/// An object that passed validation, with its key.
struct Checked {
    key: String,
    display: String,
    stored: StoredObject,
}

fn unavailable(e: StoreError) -> HandlerError {
    HandlerError::Unavailable(e.to_string())
}

/// Validates one object: its kind, its namespace and its whole document.
pub fn validate(obj: &KubeObject) -> Result<(Kind, Object), ObjectError> {
    let kind = Kind::from_type(&obj.api_version, &obj.kind).ok_or_else(|| {
        ObjectError::new(
            obj,
            "kind",
            format!("`{}/{}` is not a policy kind", obj.api_version, obj.kind),
        )
    })?;
    let parsed = model::parse(&obj.api_version, &obj.kind, &obj.doc)
        .map_err(|e| ObjectError::new(obj, e.field, e.message))?;
    Ok((kind, parsed))
}

fn display(kind: Kind, namespace: Option<&str>, name: &str) -> String {
    let kind = kind.name().to_lowercase();
    match namespace {
        Some(ns) => format!("{kind}/{ns}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

impl PolicyObjects {
    /// Handles objects in `store`.
    pub fn new(store: PolicyStore) -> Self {
        Self { store }
    }

    fn check(&self, obj: &KubeObject) -> Result<Checked, ObjectError> {
        let (kind, parsed) = validate(obj)?;
        let namespace = match &parsed {
            Object::Policy(p) => p.namespace.clone(),
            Object::Namespace(_) => None,
        };
        Ok(Checked {
            key: object_key(kind, namespace.as_deref(), &obj.metadata.name),
            display: display(kind, namespace.as_deref(), &obj.metadata.name),
            stored: StoredObject {
                origin: obj.origin.clone(),
                doc: obj.doc.clone(),
            },
        })
    }

    fn check_size(n: usize) -> Result<(), HandlerError> {
        if n > MAX_TXN_OPS {
            return Err(HandlerError::Conflict(format!(
                "{n} policy objects in one apply; at most {MAX_TXN_OPS} are applied atomically: split the file"
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl ObjectHandler for PolicyObjects {
    fn kinds(&self) -> Vec<(&'static str, &'static str)> {
        Kind::ALL
            .iter()
            .map(|k| (k.api_version(), k.name()))
            .collect()
    }

    async fn apply(
        &self,
        objects: Vec<KubeObject>,
        dry_run: bool,
    ) -> Result<Vec<String>, HandlerError> {
        Self::check_size(objects.len())?;
        let checked = objects
            .iter()
            .map(|o| self.check(o))
            .collect::<Result<Vec<_>, _>>()?;
        let mut lines = Vec::new();
        let mut puts = Vec::new();
        let dry = if dry_run { " (dry run)" } else { "" };
        for c in checked {
            let verb = match self.store.get(&c.key).await.map_err(unavailable)? {
                None => "created",
                Some(old) if old.doc == c.stored.doc => "unchanged",
                Some(_) => "configured",
            };
            lines.push(format!("{} {verb}{dry}", c.display));
            if verb != "unchanged" {
                puts.push((c.key, c.stored));
            }
        }
        if !dry_run {
            self.store
                .write(puts, Vec::new())
                .await
                .map_err(unavailable)?;
        }
        Ok(lines)
    }

    async fn delete(
        &self,
        objects: Vec<KubeObject>,
        dry_run: bool,
    ) -> Result<Vec<String>, HandlerError> {
        Self::check_size(objects.len())?;
        let mut lines = Vec::new();
        let mut deletes = Vec::new();
        let dry = if dry_run { " (dry run)" } else { "" };
        for obj in &objects {
            // Deleting needs only the identity of the object, not a valid body.
            let kind = Kind::from_type(&obj.api_version, &obj.kind).ok_or_else(|| {
                ObjectError::new(
                    obj,
                    "kind",
                    format!("`{}/{}` is not a policy kind", obj.api_version, obj.kind),
                )
            })?;
            let namespace = match (kind.is_namespaced(), &obj.metadata.namespace) {
                (true, ns) => Some(ns.clone().unwrap_or_else(|| "default".into())),
                (false, _) => None,
            };
            let key = object_key(kind, namespace.as_deref(), &obj.metadata.name);
            let shown = display(kind, namespace.as_deref(), &obj.metadata.name);
            if self.store.get(&key).await.map_err(unavailable)?.is_some() {
                lines.push(format!("{shown} deleted{dry}"));
                deletes.push(key);
            } else {
                lines.push(format!("{shown} not found"));
            }
        }
        if !dry_run {
            self.store
                .write(Vec::new(), deletes)
                .await
                .map_err(unavailable)?;
        }
        Ok(lines)
    }

    async fn list(&self, kind: &str) -> Result<Vec<serde_json::Value>, HandlerError> {
        let all = self.store.list().await.map_err(unavailable)?;
        Ok(all
            .into_iter()
            .map(|(_, o)| o.doc)
            .filter(|d| kind.is_empty() || d.get("kind").and_then(|k| k.as_str()) == Some(kind))
            .collect())
    }
}
