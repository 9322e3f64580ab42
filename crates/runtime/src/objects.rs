//! The `apply` path: Kubernetes-style objects (apiVersion/kind/metadata/spec)
//! and the seam between where objects come from and who handles them.
//!
//! A service implements [`ObjectHandler`] for the kinds it owns. Sources feed
//! it: today the `membrane.objects.v1.Objects` gRPC endpoint that
//! `membrane apply` calls ([`ObjectsService`]); in a Kubernetes cluster, a
//! kube-rs watcher calling the same handler.

use std::collections::BTreeMap;
use std::sync::Arc;

use membrane_proto::objects::v1 as pb;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

/// `metadata` of an object (the fields Membrane reads).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Object name.
    #[serde(default)]
    pub name: String,
    /// Namespace, for namespaced kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// One object as sent by a source, before its kind's handler parses `doc`.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeObject {
    /// Where it came from, for error messages (`policy.yaml#2`).
    pub origin: String,
    /// `apiVersion`.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// `metadata`.
    pub metadata: ObjectMeta,
    /// The whole document.
    pub doc: serde_json::Value,
}

/// A rejected object: names the origin, the object and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {kind}/{name}: {field}: {message}")]
pub struct ObjectError {
    /// Where the object came from.
    pub origin: String,
    /// Its kind.
    pub kind: String,
    /// Its name (with namespace, `ns/name`, when namespaced).
    pub name: String,
    /// The field path, e.g. `spec.podCIDR`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl ObjectError {
    /// An error about `field` of `obj`.
    pub fn new(obj: &KubeObject, field: impl Into<String>, message: impl Into<String>) -> Self {
        let name = match &obj.metadata.namespace {
            Some(ns) => format!("{ns}/{}", obj.metadata.name),
            None => obj.metadata.name.clone(),
        };
        Self {
            origin: obj.origin.clone(),
            kind: obj.kind.clone(),
            name,
            field: field.into(),
            message: message.into(),
        }
    }
}

impl KubeObject {
    /// Parses a JSON document; `origin` names it in errors.
    pub fn from_json(origin: &str, json: &str) -> Result<Self, ObjectError> {
        let bad = |field: &str, message: String| ObjectError {
            origin: origin.to_string(),
            kind: "<unknown>".into(),
            name: "<unknown>".into(),
            field: field.into(),
            message,
        };
        let doc: serde_json::Value =
            serde_json::from_str(json).map_err(|e| bad("<document>", format!("not JSON: {e}")))?;
        let text = |field: &str| -> Result<String, ObjectError> {
            match doc.get(field) {
                Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                _ => Err(bad(field, "required string".into())),
            }
        };
        let api_version = text("apiVersion")?;
        let kind = text("kind")?;
        let metadata: ObjectMeta = doc
            .get("metadata")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| ObjectError {
                kind: kind.clone(),
                ..bad("metadata", e.to_string())
            })?
            .unwrap_or_default();
        let obj = Self {
            origin: origin.to_string(),
            api_version,
            kind,
            metadata,
            doc,
        };
        if obj.metadata.name.is_empty() {
            return Err(ObjectError::new(&obj, "metadata.name", "required"));
        }
        Ok(obj)
    }

    /// Deserializes the whole document as `T` (a kind's typed form, which
    /// should `deny_unknown_fields`), naming the failing field path.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ObjectError> {
        serde_path_to_error::deserialize(&self.doc).map_err(|e| {
            let path = e.path().to_string();
            ObjectError::new(self, path, e.into_inner().to_string())
        })
    }
}

/// A service's handling of the kinds it owns. Every method is all-or-nothing:
/// one invalid object means nothing is applied.
#[tonic::async_trait]
pub trait ObjectHandler: Send + Sync + 'static {
    /// `(apiVersion, kind)` pairs this handler owns.
    fn kinds(&self) -> Vec<(&'static str, &'static str)>;
    /// Validates and (unless `dry_run`) stores `objects`. Returns a line per object.
    async fn apply(
        &self,
        objects: Vec<KubeObject>,
        dry_run: bool,
    ) -> Result<Vec<String>, HandlerError>;
    /// Deletes `objects` (unless `dry_run`). Returns a line per object.
    async fn delete(
        &self,
        objects: Vec<KubeObject>,
        dry_run: bool,
    ) -> Result<Vec<String>, HandlerError>;
    /// Stored objects of `kind` (every owned kind when empty), as documents.
    async fn list(&self, kind: &str) -> Result<Vec<serde_json::Value>, HandlerError>;
}

/// Why a handler refused a request.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The object is invalid; nothing was applied.
    #[error(transparent)]
    Invalid(#[from] ObjectError),
    /// The object conflicts with stored state (e.g. a CIDR already taken).
    #[error("{0}")]
    Conflict(String),
    /// The store is unavailable; nothing was applied.
    #[error("{0}")]
    Unavailable(String),
}

impl From<HandlerError> for Status {
    fn from(e: HandlerError) -> Self {
        match e {
            HandlerError::Invalid(e) => Status::invalid_argument(e.to_string()),
            HandlerError::Conflict(m) => Status::failed_precondition(m),
            HandlerError::Unavailable(m) => Status::unavailable(m),
        }
    }
}

/// The gRPC source of objects: what `membrane apply` talks to.
#[derive(Debug)]
pub struct ObjectsService<H> {
    handler: Arc<H>,
}

impl<H: ObjectHandler> ObjectsService<H> {
    /// Serves `handler` over `membrane.objects.v1.Objects`.
    pub fn new(handler: Arc<H>) -> pb::objects_server::ObjectsServer<Self> {
        pb::objects_server::ObjectsServer::new(Self { handler })
    }

    fn decode(&self, objects: Vec<pb::Object>) -> Result<Vec<KubeObject>, Status> {
        let kinds = self.handler.kinds();
        objects
            .into_iter()
            .map(|o| {
                let obj = KubeObject::from_json(&o.origin, &o.json)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                if !kinds
                    .iter()
                    .any(|(v, k)| *v == obj.api_version && *k == obj.kind)
                {
                    let owned = kinds
                        .iter()
                        .map(|(v, k)| format!("{v}/{k}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(Status::invalid_argument(
                        ObjectError::new(
                            &obj,
                            "kind",
                            format!(
                                "`{}/{}` is not served here (serves {owned})",
                                obj.api_version, obj.kind
                            ),
                        )
                        .to_string(),
                    ));
                }
                Ok(obj)
            })
            .collect()
    }
}

#[tonic::async_trait]
impl<H: ObjectHandler> pb::objects_server::Objects for ObjectsService<H> {
    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let req = request.into_inner();
        let objects = self.decode(req.objects)?;
        let results = self.handler.apply(objects, req.dry_run).await?;
        Ok(Response::new(pb::ApplyResponse { results }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let req = request.into_inner();
        let objects = self.decode(req.objects)?;
        let results = self.handler.delete(objects, req.dry_run).await?;
        Ok(Response::new(pb::DeleteResponse { results }))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let kind = request.into_inner().kind;
        let docs = self.handler.list(&kind).await?;
        let objects = docs
            .into_iter()
            .map(|d| pb::Object {
                origin: String::new(),
                json: d.to_string(),
            })
            .collect();
        Ok(Response::new(pb::ListResponse { objects }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_without_a_name_is_rejected_naming_the_field() {
        let err = KubeObject::from_json(
            "f.yaml#1",
            r#"{"apiVersion":"v1","kind":"Node","metadata":{}}"#,
        )
        .expect_err("must fail");
        assert_eq!(err.field, "metadata.name");
        assert!(err.to_string().starts_with("f.yaml#1: Node/"), "{err}");
    }

    #[test]
    fn a_typed_parse_names_the_failing_field_path() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Spec {
            #[allow(dead_code)]
            cidr: String,
        }
        #[derive(Debug, Deserialize)]
        struct Doc {
            #[allow(dead_code)]
            spec: Spec,
        }
        let obj = KubeObject::from_json(
            "x#3",
            r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n"},"spec":{"cidr":"a","bogus":1}}"#,
        )
        .expect("valid envelope");
        let err = obj.parse::<Doc>().expect_err("unknown field");
        assert_eq!(err.field, "spec.bogus");
        assert!(err.message.contains("bogus"), "{}", err.message);
        assert_eq!(err.to_string().split(':').next(), Some("x#3"));
    }
}
