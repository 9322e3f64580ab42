//! `membrane get identities`: every security identity with its labels and
//! how many nodes reference it.

use membrane_proto::identity::v1 as identity;
use serde_json::{Value, json};

use super::status_err;
use crate::client::Ctx;
use crate::output::{self, Format};

/// Lists identities: ID, LABELS, REFS as a table (`-` for reserved
/// identities, which are not reference-counted), or every field in JSON/YAML.
pub async fn identities(ctx: &Ctx, format: Format) -> anyhow::Result<()> {
    let list =
        identity::identity_client::IdentityClient::new(ctx.service_channel("identity").await?)
            .list(identity::ListRequest {})
            .await
            .map_err(|s| status_err("list identities", s))?
            .into_inner()
            .identities;
    let items: Vec<Value> = list.into_iter().map(|i| item(i, format)).collect();
    output::print_items(
        format,
        &[("ID", "id"), ("LABELS", "labels"), ("REFS", "refs")],
        &items,
    )
}

fn item(i: identity::IdentityEntry, format: Format) -> Value {
    let identity::IdentityEntry {
        id,
        labels,
        reserved,
        refcount,
        nodes,
        unreferenced_since_unix_ms,
    } = i;
    if format == Format::Table {
        let refs = if reserved {
            "-".to_string()
        } else {
            refcount.to_string()
        };
        return json!({ "id": id, "labels": labels, "refs": refs });
    }
    json!({
        "id": id,
        "labels": labels,
        "reserved": reserved,
        "refcount": refcount,
        "nodes": nodes,
        "unreferencedSinceUnixMs": unreferenced_since_unix_ms,
    })
}
