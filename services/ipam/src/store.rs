//! IPAM's etcd adapter. Every decision is one transaction whose comparisons
//! make it fail if another replica got there first; the caller then re-reads
//! and tries again.
//!
//! Keys (under the cluster prefix):
//! - `ipam/config` → [`PoolConfig`]
//! - `ipam/nodes/<node>` → [`NodeRecord`]
//! - `ipam/cidrs/<a.b.c.d_n>` → node name (makes each node CIDR unique)
//! - `ipam/allocs/<node>/<ip>` → [`AllocRecord`]
//! - `ipam/owners/<node>/<owner>` → ip (makes allocation idempotent per owner)

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use etcd_client::{Compare, CompareOp, GetResponse, Txn, TxnOp, TxnOpResponse};
use ipnet::Ipv4Net;
use membrane_runtime::store::{Store, StoreError, to_json};
use serde::{Deserialize, Serialize};

use crate::pool::{self, IpamError, PoolConfig};

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node name.
    pub name: String,
    /// Underlay address.
    pub underlay_ip: Ipv4Addr,
    /// Pod CIDR.
    pub pod_cidr: Ipv4Net,
}

/// An allocated address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocRecord {
    /// Node name.
    pub node: String,
    /// The address.
    pub ip: Ipv4Addr,
    /// Who holds it.
    pub owner: String,
}

const CONFIG: &str = "ipam/config";
const MAX_ATTEMPTS: usize = 64;
/// Random candidates tried before listing the node's used addresses.
const RANDOM_PROBES: usize = 3;

fn node_key(node: &str) -> String {
    format!("ipam/nodes/{node}")
}
fn cidr_key(cidr: Ipv4Net) -> String {
    format!("ipam/cidrs/{}_{}", cidr.network(), cidr.prefix_len())
}
fn allocs_prefix(node: &str) -> String {
    format!("ipam/allocs/{node}/")
}
fn alloc_key(node: &str, ip: Ipv4Addr) -> String {
    format!("ipam/allocs/{node}/{ip}")
}
fn owner_key(node: &str, owner: &str) -> String {
    format!("ipam/owners/{node}/{owner}")
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, IpamError> {
    serde_json::from_slice(value)
        .map_err(|e| IpamError::Store(format!("corrupt value at `{key}`: {e}")))
}

impl From<StoreError> for IpamError {
    fn from(e: StoreError) -> Self {
        IpamError::Store(e.to_string())
    }
}

impl From<etcd_client::Error> for IpamError {
    fn from(e: etcd_client::Error) -> Self {
        IpamError::Store(format!("etcd unavailable: {e}"))
    }
}

/// IPAM state in etcd.
#[derive(Debug, Clone)]
pub struct IpamStore {
    store: Store,
    config: PoolConfig,
    /// Node records with their create revision: a node's CIDR never changes
    /// while it exists, and every write checks the revision, so a stale
    /// entry only costs a retry.
    nodes: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (NodeRecord, i64)>>>,
}

impl IpamStore {
    /// Binds to `store`, recording `config` on first use and refusing to run
    /// with a configuration different from the one already recorded.
    pub async fn open(store: Store, config: PoolConfig) -> Result<Self, IpamError> {
        let key = store.key(CONFIG);
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), to_json(&config), None)]);
        store.client().txn(txn).await?;
        let (stored, _) = store
            .get_json::<PoolConfig>(CONFIG)
            .await?
            .ok_or_else(|| IpamError::Store("pool configuration vanished".into()))?;
        if stored != config {
            return Err(IpamError::ConfigMismatch {
                stored: stored.to_string(),
                flags: config.to_string(),
            });
        }
        Ok(Self {
            store,
            config,
            nodes: Default::default(),
        })
    }

    /// The pool configuration.
    pub fn config(&self) -> PoolConfig {
        self.config
    }

    /// The shared store handle.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// One node, if registered.
    pub async fn node(&self, node: &str) -> Result<Option<NodeRecord>, IpamError> {
        Ok(self.store.get_json(&node_key(node)).await?.map(|(n, _)| n))
    }

    async fn require_node(&self, node: &str) -> Result<NodeRecord, IpamError> {
        self.node(node)
            .await?
            .ok_or_else(|| IpamError::UnknownNode(node.to_string()))
    }

    /// Every node, sorted by name.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, IpamError> {
        let mut nodes: Vec<NodeRecord> = self
            .store
            .list_json::<NodeRecord>("ipam/nodes/")
            .await?
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(nodes)
    }

    /// Which node holds `cidr`, if any.
    pub async fn cidr_holder(&self, cidr: Ipv4Net) -> Result<Option<String>, IpamError> {
        Ok(self
            .store
            .get_json::<String>(&cidr_key(cidr))
            .await?
            .map(|(n, _)| n))
    }

    /// Registers `node` (idempotent): keeps its CIDR if it has one, else takes
    /// `requested` or carves the next free one. The underlay address is updated.
    pub async fn register_node(
        &self,
        node: &str,
        underlay_ip: Ipv4Addr,
        requested: Option<Ipv4Net>,
    ) -> Result<NodeRecord, IpamError> {
        if node.is_empty() {
            return Err(IpamError::Empty {
                field: "node".into(),
            });
        }
        if let Some(cidr) = requested {
            self.config.check_node_cidr("pod_cidr", cidr)?;
        }
        let mut client = self.store.client();
        for _ in 0..MAX_ATTEMPTS {
            let nkey = self.store.key(&node_key(node));
            if let Some((existing, rev)) =
                self.store.get_json::<NodeRecord>(&node_key(node)).await?
            {
                if let Some(req) = requested.filter(|r| *r != existing.pod_cidr) {
                    return Err(IpamError::CidrMismatch {
                        node: node.into(),
                        has: existing.pod_cidr,
                        requested: req,
                    });
                }
                if existing.underlay_ip == underlay_ip {
                    return Ok(existing);
                }
                let updated = NodeRecord {
                    underlay_ip,
                    ..existing
                };
                let txn = Txn::new()
                    .when([Compare::mod_revision(nkey.as_str(), CompareOp::Equal, rev)])
                    .and_then([TxnOp::put(nkey.as_str(), to_json(&updated), None)]);
                if client.txn(txn).await?.succeeded() {
                    return Ok(updated);
                }
                continue;
            }
            let cidr = match requested {
                Some(c) => {
                    if let Some(holder) = self.cidr_holder(c).await? {
                        return Err(IpamError::CidrTaken {
                            node: node.into(),
                            cidr: c,
                            holder,
                        });
                    }
                    c
                }
                None => {
                    let used: BTreeSet<Ipv4Net> = self
                        .store
                        .list_keys("ipam/cidrs/")
                        .await?
                        .iter()
                        .filter_map(|k| k.strip_prefix("ipam/cidrs/"))
                        .filter_map(|k| k.replacen('_', "/", 1).parse().ok())
                        .collect();
                    self.config.carve(&used)?
                }
            };
            let record = NodeRecord {
                name: node.to_string(),
                underlay_ip,
                pod_cidr: cidr,
            };
            let ckey = self.store.key(&cidr_key(cidr));
            let txn = Txn::new()
                .when([
                    Compare::create_revision(nkey.as_str(), CompareOp::Equal, 0),
                    Compare::create_revision(ckey.as_str(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(ckey.as_str(), to_json(&node), None),
                    TxnOp::put(nkey.as_str(), to_json(&record), None),
                ]);
            if client.txn(txn).await?.succeeded() {
                tracing::info!(node = %node, cidr = %cidr, "node registered");
                return Ok(record);
            }
        }
        Err(IpamError::Contention(MAX_ATTEMPTS))
    }

    /// Removes `node` and its CIDR; with `force`, its allocations too.
    pub async fn remove_node(&self, node: &str, force: bool) -> Result<(), IpamError> {
        let rec = self.require_node(node).await?;
        let allocs = self.store.list_keys(&allocs_prefix(node)).await?;
        if !allocs.is_empty() && !force {
            return Err(IpamError::NodeInUse {
                node: node.into(),
                count: allocs.len(),
            });
        }
        let del_prefix = |rel: String| {
            TxnOp::delete(
                self.store.key(&rel),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
        };
        let txn = Txn::new().and_then([
            TxnOp::delete(self.store.key(&node_key(node)), None),
            TxnOp::delete(self.store.key(&cidr_key(rec.pod_cidr)), None),
            del_prefix(allocs_prefix(node)),
            del_prefix(format!("ipam/owners/{node}/")),
        ]);
        self.store.client().txn(txn).await?;
        self.forget_node(node);
        tracing::info!(node = %node, "node removed");
        Ok(())
    }

    /// Allocates an address on `node` for `owner`; the same owner gets the
    /// same address back.
    ///
    /// One round trip when uncontended: a random candidate is written in a
    /// transaction that requires the address and the owner to be free and
    /// the node to be the one cached; when it fails, the same round trip
    /// returns the owner's and the node's keys, telling which case it was.
    /// After a few collisions (a filling pool) the candidate is picked from a
    /// listing of the node's used addresses, which also detects exhaustion.
    pub async fn allocate(
        &self,
        node: &str,
        owner: &str,
    ) -> Result<(AllocRecord, Ipv4Net), IpamError> {
        if owner.is_empty() {
            return Err(IpamError::Empty {
                field: "owner".into(),
            });
        }
        let okey = self.store.key(&owner_key(node, owner));
        let nkey = self.store.key(&node_key(node));
        let mut client = self.store.client();
        let mut cached = self.cached_node(node);
        for attempt in 0..MAX_ATTEMPTS {
            let (rec, node_rev) = match cached.take() {
                Some(c) => c,
                None => self.load_node(node).await?,
            };
            let ip = if attempt < RANDOM_PROBES {
                pool::random_pod_address(rec.pod_cidr, rand::random::<u32>())
            } else {
                let used: BTreeSet<Ipv4Addr> = self
                    .store
                    .list_keys(&allocs_prefix(node))
                    .await?
                    .iter()
                    .filter_map(|k| k.rsplit('/').next()?.parse().ok())
                    .collect();
                pool::pick_free(rec.pod_cidr, &used, rand::random::<u32>()).ok_or_else(|| {
                    IpamError::Exhausted {
                        node: node.into(),
                        cidr: rec.pod_cidr,
                    }
                })?
            };
            let alloc = AllocRecord {
                node: node.into(),
                ip,
                owner: owner.into(),
            };
            let akey = self.store.key(&alloc_key(node, ip));
            let txn = Txn::new()
                .when([
                    Compare::create_revision(akey.as_str(), CompareOp::Equal, 0),
                    Compare::create_revision(okey.as_str(), CompareOp::Equal, 0),
                    // The node we know is still the node (not removed and re-added).
                    Compare::create_revision(nkey.as_str(), CompareOp::Equal, node_rev),
                ])
                .and_then([
                    TxnOp::put(akey.as_str(), to_json(&alloc), None),
                    TxnOp::put(okey.as_str(), to_json(&ip), None),
                ])
                .or_else([
                    TxnOp::get(okey.as_str(), None),
                    TxnOp::get(nkey.as_str(), None),
                ]);
            let resp = client.txn(txn).await?;
            if resp.succeeded() {
                tracing::debug!(node = %node, ip = %ip, owner = %owner, "address allocated");
                return Ok((alloc, rec.pod_cidr));
            }
            let gets: Vec<GetResponse> = resp
                .op_responses()
                .into_iter()
                .filter_map(|r| match r {
                    TxnOpResponse::Get(g) => Some(g),
                    _ => None,
                })
                .collect();
            let [owner_get, node_get] = gets.as_slice() else {
                return Err(IpamError::Store(
                    "transaction returned an unexpected shape".into(),
                ));
            };
            let Some(node_kv) = node_get.kvs().first() else {
                self.forget_node(node);
                return Err(IpamError::UnknownNode(node.to_string()));
            };
            let current: NodeRecord = decode(&nkey, node_kv.value())?;
            if let Some(kv) = owner_get.kvs().first() {
                let ip: Ipv4Addr = decode(&okey, kv.value())?;
                return Ok((
                    AllocRecord {
                        node: node.into(),
                        ip,
                        owner: owner.into(),
                    },
                    current.pod_cidr,
                ));
            }
            // The address was taken, or the node changed: try again with what we now know.
            cached = Some((current, node_kv.create_revision()));
            self.remember_node(node, cached.clone());
        }
        Err(IpamError::Contention(MAX_ATTEMPTS))
    }

    fn cached_node(&self, node: &str) -> Option<(NodeRecord, i64)> {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
    }

    fn remember_node(&self, node: &str, entry: Option<(NodeRecord, i64)>) {
        if let Some(e) = entry {
            self.nodes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node.to_string(), e);
        }
    }

    fn forget_node(&self, node: &str) {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
    }

    async fn load_node(&self, node: &str) -> Result<(NodeRecord, i64), IpamError> {
        let key = self.store.key(&node_key(node));
        let resp = self.store.client().get(key.as_str(), None).await?;
        let kv = resp
            .kvs()
            .first()
            .ok_or_else(|| IpamError::UnknownNode(node.to_string()))?;
        let entry = (
            decode::<NodeRecord>(&key, kv.value())?,
            kv.create_revision(),
        );
        self.remember_node(node, Some(entry.clone()));
        Ok(entry)
    }

    /// Releases `ip` on `node`.
    pub async fn release(&self, node: &str, ip: Ipv4Addr) -> Result<(), IpamError> {
        self.require_node(node).await?;
        let Some((alloc, rev)) = self
            .store
            .get_json::<AllocRecord>(&alloc_key(node, ip))
            .await?
        else {
            return Err(IpamError::NotAllocated {
                node: node.into(),
                ip,
            });
        };
        let akey = self.store.key(&alloc_key(node, ip));
        let okey = self.store.key(&owner_key(node, &alloc.owner));
        let txn = Txn::new()
            .when([Compare::mod_revision(akey.as_str(), CompareOp::Equal, rev)])
            .and_then([
                TxnOp::delete(akey.as_str(), None),
                TxnOp::delete(okey.as_str(), None),
            ]);
        if !self.store.client().txn(txn).await?.succeeded() {
            // Someone else released (or re-allocated) it in between.
            return Err(IpamError::NotAllocated {
                node: node.into(),
                ip,
            });
        }
        tracing::debug!(node = %node, ip = %ip, "address released");
        Ok(())
    }

    /// Allocations, of one node or all.
    pub async fn allocations(&self, node: Option<&str>) -> Result<Vec<AllocRecord>, IpamError> {
        let prefix = match node {
            Some(n) => allocs_prefix(n),
            None => "ipam/allocs/".into(),
        };
        let mut all: Vec<AllocRecord> = self
            .store
            .list_json::<AllocRecord>(&prefix)
            .await?
            .into_iter()
            .map(|(_, a)| a)
            .collect();
        all.sort_by(|a, b| (&a.node, a.ip).cmp(&(&b.node, b.ip)));
        Ok(all)
    }
}
