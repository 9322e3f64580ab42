//! `membrane apply -f` / `membrane delete -f`: Kubernetes-style documents
//! routed to the service owning their kind. A run is all or nothing: every
//! service validates its objects (dry run) before any service stores any.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use membrane_proto::objects::v1 as pb;
use pb::objects_client::ObjectsClient;

use super::status_err;
use crate::client::Ctx;

/// `(apiVersion, kind)` → owning service. A kind arrives with its issue.
pub const KINDS: &[(&str, &str, &str)] = &[
    ("v1", "Node", "ipam"),
    ("cilium.io/v2", "CiliumNetworkPolicy", "policy"),
    ("cilium.io/v2", "CiliumClusterwideNetworkPolicy", "policy"),
    ("networking.k8s.io/v1", "NetworkPolicy", "policy"),
    ("v1", "Namespace", "policy"),
    ("v1", "Service", "lb"),
    ("v1", "Endpoints", "lb"),
    ("discovery.k8s.io/v1", "EndpointSlice", "lb"),
];

/// One document read from a file.
#[derive(Debug, Clone)]
pub struct Doc {
    /// `file#N`, 1-based.
    pub origin: String,
    /// The owning service.
    pub service: &'static str,
    /// The document as JSON.
    pub json: String,
}

/// Reads every document of `path` (a file, a directory of `.yaml`/`.yml`/
/// `.json` files, or `-` for stdin) and routes it to its service.
pub fn read_docs(path: &Path) -> anyhow::Result<Vec<Doc>> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("read directory {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
            })
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut docs = Vec::new();
    for file in files {
        let text = if file.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("read stdin")?
        } else {
            std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?
        };
        docs.extend(parse_docs(&file.display().to_string(), &text)?);
    }
    Ok(docs)
}

/// Splits multi-document YAML (JSON is YAML) and routes each document.
pub fn parse_docs(name: &str, text: &str) -> anyhow::Result<Vec<Doc>> {
    use serde::Deserialize as _;
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let origin = format!("{name}#{}", i + 1);
        let value = serde_json::Value::deserialize(de)
            .with_context(|| format!("{origin}: not valid YAML"))?;
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        let field = |f: &str| {
            value
                .get(f)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        anyhow::ensure!(!api_version.is_empty(), "{origin}: apiVersion: required");
        anyhow::ensure!(!kind.is_empty(), "{origin}: kind: required");
        let service = KINDS
            .iter()
            .find(|(v, k, _)| *v == api_version && *k == kind)
            .map(|(_, _, s)| *s)
            .with_context(|| {
                let known: Vec<String> = KINDS.iter().map(|(v, k, _)| format!("{v}/{k}")).collect();
                format!(
                    "{origin}: kind: `{api_version}/{kind}` is not a kind membrane knows (known: {})",
                    known.join(", ")
                )
            })?;
        docs.push(Doc {
            origin,
            service,
            json: value.to_string(),
        });
    }
    Ok(docs)
}

fn by_service(docs: Vec<Doc>) -> BTreeMap<&'static str, Vec<pb::Object>> {
    let mut groups: BTreeMap<&'static str, Vec<pb::Object>> = BTreeMap::new();
    for d in docs {
        groups.entry(d.service).or_default().push(pb::Object {
            origin: d.origin,
            json: d.json,
        });
    }
    groups
}

/// `membrane apply -f` (or `delete -f` when `delete`).
pub async fn run(ctx: &Ctx, path: &Path, delete: bool, dry_run: bool) -> anyhow::Result<()> {
    let groups = by_service(read_docs(path)?);
    anyhow::ensure!(!groups.is_empty(), "{}: no documents", path.display());
    let mut clients = BTreeMap::new();
    for service in groups.keys() {
        clients.insert(
            *service,
            ObjectsClient::new(ctx.service_channel(service).await?),
        );
    }
    // Validate everywhere first, so that one bad document applies nothing.
    for (service, objects) in &groups {
        call(
            clients.get_mut(service).context("client")?,
            objects.clone(),
            delete,
            true,
        )
        .await
        .map_err(|s| status_err(&format!("{} rejected by {service}", path.display()), s))?;
    }
    if dry_run {
        println!("validated (dry run); nothing changed");
        return Ok(());
    }
    for (service, objects) in groups {
        let results = call(
            clients.get_mut(service).context("client")?,
            objects,
            delete,
            false,
        )
        .await
        .map_err(|s| status_err(&format!("{} rejected by {service}", path.display()), s))?;
        for line in results {
            println!("{line}");
        }
    }
    Ok(())
}

async fn call(
    client: &mut ObjectsClient<membrane_runtime::grpc::GrpcChannel>,
    objects: Vec<pb::Object>,
    delete: bool,
    dry_run: bool,
) -> Result<Vec<String>, tonic::Status> {
    Ok(if delete {
        client
            .delete(pb::DeleteRequest { objects, dry_run })
            .await?
            .into_inner()
            .results
    } else {
        client
            .apply(pb::ApplyRequest { objects, dry_run })
            .await?
            .into_inner()
            .results
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_numbered_and_empty_ones_skipped() {
        let docs = parse_docs(
            "n.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n---\n---\napiVersion: v1\nkind: Node\nmetadata: {name: b}\n",
        )
        .expect("parses");
        let origins: Vec<_> = docs.iter().map(|d| d.origin.as_str()).collect();
        assert_eq!(origins, ["n.yaml#1", "n.yaml#3"]);
        assert!(docs.iter().all(|d| d.service == "ipam"));
    }

    #[test]
    fn an_unknown_kind_names_the_document() {
        let err = parse_docs(
            "p.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n---\napiVersion: x/v1\nkind: Foo\n",
        )
        .expect_err("unknown kind");
        assert!(
            err.to_string().starts_with("p.yaml#2: kind: `x/v1/Foo`"),
            "{err}"
        );
    }

    #[test]
    fn broken_yaml_names_the_document() {
        let err = parse_docs("b.yaml", "kind: [unclosed\n").expect_err("bad yaml");
        assert!(err.to_string().starts_with("b.yaml#1"), "{err}");
    }
}
