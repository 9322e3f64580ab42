//! etcd helpers shared by every service's store adapter: connecting, keys
//! under the cluster prefix, JSON values, and feeding a prefix into a
//! desired-state [`Publisher`](crate::stream::Publisher) (list, then watch
//! from the listed revision, re-listing after any interruption).

use std::time::Duration;

use anyhow::Context as _;
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::flags::EtcdFlags;
use crate::stream::{Change, Publisher, Scope};

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd could not be reached or refused the request.
    #[error("etcd unavailable: {0}")]
    Unavailable(#[from] etcd_client::Error),
    /// A stored value is not what the service wrote.
    #[error("corrupt value at `{key}`: {source}")]
    Corrupt {
        /// The key.
        key: String,
        /// The decoding error.
        source: serde_json::Error,
    },
}

/// An etcd client bound to the cluster's key prefix.
#[derive(Clone)]
pub struct Store {
    client: Client,
    prefix: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Store {
    /// Connects to etcd. Retries for up to `wait` so services may start before etcd.
    pub async fn connect(flags: &EtcdFlags, wait: Duration) -> anyhow::Result<Self> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let attempt = async {
                let mut client = Client::connect(&flags.endpoints, Some(opts.clone())).await?;
                client.status().await?;
                Ok::<_, etcd_client::Error>(client)
            };
            match attempt.await {
                Ok(client) => {
                    return Ok(Self {
                        client,
                        prefix: flags.prefix.trim_end_matches('/').to_string(),
                    });
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "etcd not reachable yet");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("connect to etcd at {}", flags.endpoints.join(","))
                    });
                }
            }
        }
    }

    /// The full key for `rel` (`ipam/nodes/node-1` → `/membrane/ipam/nodes/node-1`).
    pub fn key(&self, rel: &str) -> String {
        format!("{}/{}", self.prefix, rel)
    }

    /// Strips the cluster prefix from a full key.
    pub fn rel<'a>(&self, key: &'a str) -> &'a str {
        key.strip_prefix(&self.prefix)
            .map(|k| k.trim_start_matches('/'))
            .unwrap_or(key)
    }

    /// A client handle for transactions and raw calls.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Reads and decodes one JSON value with its mod revision.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        rel: &str,
    ) -> Result<Option<(T, i64)>, StoreError> {
        let key = self.key(rel);
        let resp = self.client.clone().get(key.as_str(), None).await?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => {
                let v =
                    serde_json::from_slice(kv.value()).map_err(|source| StoreError::Corrupt {
                        key: key.clone(),
                        source,
                    })?;
                Ok(Some((v, kv.mod_revision())))
            }
        }
    }

    /// Lists and decodes every JSON value under `rel_prefix`, as (relative key, value).
    pub async fn list_json<T: DeserializeOwned>(
        &self,
        rel_prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let prefix = self.key(rel_prefix);
        let resp = self
            .client
            .clone()
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        resp.kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let v =
                    serde_json::from_slice(kv.value()).map_err(|source| StoreError::Corrupt {
                        key: key.clone(),
                        source,
                    })?;
                Ok((self.rel(&key).to_string(), v))
            })
            .collect()
    }

    /// Lists the relative keys under `rel_prefix` without their values.
    pub async fn list_keys(&self, rel_prefix: &str) -> Result<Vec<String>, StoreError> {
        let prefix = self.key(rel_prefix);
        let resp = self
            .client
            .clone()
            .get(
                prefix.as_str(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| self.rel(&String::from_utf8_lossy(kv.key())).to_string())
            .collect())
    }
}

/// Encodes a value for the store.
pub fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing our own plain structs cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// How a service publishes what it stores: stored keys (relative to the
/// cluster prefix) map to resource keys and scopes, stored values to messages.
pub trait ResourceMapper: Send + Sync + 'static {
    /// The resource key and scope for a stored key; `None` if not published.
    fn key(&self, rel: &str) -> Option<(String, Scope)>;
    /// The published message for a stored value; `None` if it does not decode.
    fn value(&self, rel: &str, value: &[u8]) -> Option<prost_types::Any>;
}

fn map_kv(
    mapper: &dyn ResourceMapper,
    rel: &str,
    value: &[u8],
) -> Option<(String, Scope, prost_types::Any)> {
    let (key, scope) = mapper.key(rel)?;
    match mapper.value(rel, value) {
        Some(v) => Some((key, scope, v)),
        None => {
            tracing::warn!(key = %rel, "stored value does not decode; not published");
            None
        }
    }
}

/// Keeps `publisher` equal to what is stored under `rel_prefix`, with etcd
/// revisions as stream versions: every replica that feeds from the same etcd
/// publishes the same versions. Runs until the task is dropped; when etcd is
/// unreachable the publisher keeps its last state and the feed retries.
pub async fn feed_publisher(
    store: Store,
    rel_prefix: String,
    mapper: std::sync::Arc<dyn ResourceMapper>,
    publisher: Publisher,
) {
    let prefix = store.key(&rel_prefix);
    loop {
        if let Err(e) = feed_once(&store, &prefix, &*mapper, &publisher).await {
            tracing::warn!(error = %e, prefix = %prefix, "store feed interrupted; re-listing");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

async fn feed_once(
    store: &Store,
    prefix: &str,
    mapper: &dyn ResourceMapper,
    publisher: &Publisher,
) -> Result<(), etcd_client::Error> {
    let mut client = store.client();
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let resources = resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            map_kv(
                mapper,
                store.rel(&String::from_utf8_lossy(kv.key())),
                kv.value(),
            )
        })
        .collect();
    publisher.replace_all(revision as u64, resources);

    let mut stream = client
        .watch(
            prefix,
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
        let mut changes = Vec::new();
        let mut version = 0;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            version = version.max(kv.mod_revision() as u64);
            let rel = store.rel(&String::from_utf8_lossy(kv.key())).to_string();
            match ev.event_type() {
                EventType::Put => {
                    if let Some((key, scope, value)) = map_kv(mapper, &rel, kv.value()) {
                        changes.push(Change::Upsert { key, scope, value });
                    }
                }
                EventType::Delete => {
                    if let Some((key, _)) = mapper.key(&rel) {
                        changes.push(Change::Remove { key });
                    }
                }
            }
        }
        if version > 0 {
            publisher.apply(version, changes);
        }
    }
    Err(etcd_client::Error::WatchError("watch stream ended".into()))
}
