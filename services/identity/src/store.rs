//! The identity service's etcd adapter. Every decision is one transaction
//! whose comparisons make it fail if another replica (or an expiring lease)
//! got there first; the failure branch reads back what changed, and the
//! caller tries again with that. Uncontended, an allocation is one round trip.
//!
//! Keys (under the cluster prefix):
//! - `identity/ids/<id>` → [`IdentityRecord`]: the master key of an identity
//!   (reserved identities are written once at start-up, too).
//! - `identity/labels/<canonical>` → id: makes the number unique per label
//!   set; `<canonical>` is the label set's canonical form, escaped by
//!   [`labels::escape_key`] (`/` → `%2F`, `%` → `%25`).
//! - `identity/refs/<id>/<node>` → `""`: the node uses the identity; bound
//!   to the node's lease.
//! - `identity/leases/<node>` → lease id: the node's lease, itself bound to
//!   that lease, so it vanishes with it and any replica can keep it alive.
//! - `identity/unused/<id>` → Unix ms: since when the identity has had no
//!   reference (see [`crate::gc`] for the invariant it keeps).
//! - `identity/ipcache/<ip>` → [`IpcacheRecord`]; bound to the recording
//!   node's lease.
//!
//! # Why an `Allocate` can never lose its identity to GC
//!
//! `Allocate` of a known label set reads `labels/<canonical>` (number `N`,
//! create revision `R`) and writes its reference with a transaction that
//! requires `create_revision(labels/<canonical>) == R` and deletes the
//! `unused/N` marker. GC deletes `ids/N`, `labels/<canonical>` and the
//! marker with a transaction that requires that no key exists under
//! `refs/N/` (a range comparison: `version == 0` holds for an empty range
//! and fails for any existing key), that the marker's mod revision is the one
//! it judged old enough, and that `ids/N` is the incarnation it read. etcd
//! applies transactions one at a time, so either
//! - the reference commits first: GC's "no reference" (and marker) guard
//!   fails and the identity stays; or
//! - GC commits first: the label key is gone, `Allocate`'s guard fails, it
//!   reads again, finds no identity and creates a new one (possibly another
//!   number) — it never returns a number whose keys are deleted.
//!
//! The same guards make concurrent GC on several replicas harmless: the
//! second collector's comparisons fail. Two replicas creating the same new
//! label set both require `create_revision(labels/<canonical>) == 0`; the
//! loser's failure branch returns the winner's key and it takes the
//! known-label-set path, so both return one number. Two label sets trying
//! the same number both require `create_revision(ids/<n>) == 0`; the loser
//! tries another number.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, GetResponse, KeyValue, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};
use membrane_runtime::store::{Store, StoreError, to_json};
use serde::{Deserialize, Serialize};

use crate::config::IdentityConfig;
use crate::error::IdentityError;
use crate::gc::{self, Action};
use crate::labels::{self, LabelSet};
use crate::numbers::{self, Kind, Reserved};

/// Stored key prefixes, relative to the cluster prefix.
pub mod keys {
    /// Everything the service stores (and publishes from).
    pub const ROOT: &str = "identity/";
    /// `ids/<id>` → identity record.
    pub const IDS: &str = "identity/ids/";
    /// `labels/<escaped canonical>` → id.
    pub const LABELS: &str = "identity/labels/";
    /// `refs/<id>/<node>`.
    pub const REFS: &str = "identity/refs/";
    /// `leases/<node>` → lease id.
    pub const LEASES: &str = "identity/leases/";
    /// `unused/<id>` → Unix ms.
    pub const UNUSED: &str = "identity/unused/";
    /// `ipcache/<ip>` → ipcache record.
    pub const IPCACHE: &str = "identity/ipcache/";
}

const MAX_ATTEMPTS: usize = 64;
/// Random probes for a free number before listing every used one.
const BLIND_PROBES: usize = 2;

/// An identity as stored at `identity/ids/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRecord {
    /// The number.
    pub id: u32,
    /// The canonical form of its label set.
    pub labels: String,
}

/// An ipcache entry as stored at `identity/ipcache/<ip>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcacheRecord {
    /// The address.
    pub ip: IpAddr,
    /// Its identity.
    pub identity: u32,
    /// The node that recorded it.
    pub node: String,
    /// Pod namespace; empty for node addresses.
    #[serde(default)]
    pub namespace: String,
    /// Pod name; empty for node addresses.
    #[serde(default)]
    pub pod: String,
}

impl IpcacheRecord {
    /// The address as a host prefix (`10.200.0.5/32`, `fd00::5/128`).
    pub fn prefix(&self) -> String {
        let len = if self.ip.is_ipv4() { 32 } else { 128 };
        format!("{}/{len}", self.ip)
    }
}

/// The result of an allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The identity number.
    pub id: u32,
    /// Whether this call created it.
    pub created: bool,
}

/// An identity with its references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityDetail {
    /// The number.
    pub id: u32,
    /// Its labels as sorted `source:key=value` strings.
    pub labels: Vec<String>,
    /// Whether it is reserved (no references are tracked).
    pub reserved: bool,
    /// Nodes referencing it, sorted.
    pub nodes: Vec<String>,
    /// Since when it has been unreferenced (Unix ms), if it is.
    pub unreferenced_since_ms: Option<i64>,
}

/// A node's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLease {
    /// The etcd lease id.
    pub id: i64,
    /// Whether this call granted it.
    pub granted: bool,
    /// Its TTL in seconds.
    pub ttl_secs: i64,
}

/// What one GC round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Identities whose grace period started.
    pub marked: usize,
    /// Identities deleted.
    pub collected: usize,
}

impl From<StoreError> for IdentityError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(e) => e.into(),
            StoreError::Corrupt { key, source } => IdentityError::Corrupt {
                key,
                reason: source.to_string(),
            },
        }
    }
}

impl From<etcd_client::Error> for IdentityError {
    fn from(e: etcd_client::Error) -> Self {
        IdentityError::Unavailable {
            context: String::new(),
            reason: e.to_string(),
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, IdentityError> {
    serde_json::from_slice(kv.value()).map_err(|e| IdentityError::Corrupt {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        reason: e.to_string(),
    })
}

/// The `Get` results of a transaction, in order.
fn gets(resp: &etcd_client::TxnResponse) -> Vec<GetResponse> {
    resp.op_responses()
        .into_iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .collect()
}

fn first_kv(gets: &[GetResponse], i: usize) -> Option<&KeyValue> {
    gets.get(i).and_then(|g| g.kvs().first())
}

/// The end of the key range of everything starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Node names become key segments: no `/`, nothing invisible.
pub fn check_node(field: &str, node: &str) -> Result<(), IdentityError> {
    if node.is_empty() {
        return Err(IdentityError::Empty {
            field: field.into(),
        });
    }
    if let Some(c) = node.chars().find(|c| !c.is_ascii_graphic() || *c == '/') {
        return Err(IdentityError::InvalidNode {
            field: field.into(),
            value: node.into(),
            reason: format!("may not contain {c:?}"),
        });
    }
    Ok(())
}

/// Identity state in etcd.
#[derive(Debug, Clone)]
pub struct IdentityStore {
    store: Store,
    config: Arc<IdentityConfig>,
    /// Last lease id seen per node: saves a read per call. A stale entry
    /// only makes a transaction fail and read the current one.
    leases: Arc<Mutex<HashMap<String, i64>>>,
    /// Last identity seen per canonical label set, with the create revision
    /// of its label key: lets an allocation of a known label set go straight
    /// to the reference transaction, whose guard catches a stale entry.
    known: Arc<Mutex<HashMap<String, (u32, i64)>>>,
}

/// Entries of the known-identities cache before it starts over.
const KNOWN_CACHE_MAX: usize = 100_000;

// === impl IdentityStore ===

impl IdentityStore {
    /// Binds to `store`, writing the reserved identities if they are missing.
    pub async fn open(store: Store, config: IdentityConfig) -> Result<Self, IdentityError> {
        let mut client = store.client();
        for r in Reserved::ALL {
            let labels = r.labels();
            let ikey = store.key(&id_key(r.id()));
            let lkey = store.key(&label_key(&labels));
            let record = IdentityRecord {
                id: r.id(),
                labels: labels.canonical(),
            };
            let txn = Txn::new()
                .when([Compare::create_revision(ikey.as_str(), CompareOp::Equal, 0)])
                .and_then([
                    TxnOp::put(ikey.as_str(), to_json(&record), None),
                    TxnOp::put(lkey.as_str(), to_json(&r.id()), None),
                ]);
            client.txn(txn).await.map_err(|e| {
                IdentityError::from(e).while_doing(|| "writing reserved identities".into())
            })?;
        }
        Ok(Self {
            store,
            config: Arc::new(config),
            leases: Arc::default(),
            known: Arc::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &IdentityConfig {
        &self.config
    }

    /// The shared store handle.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn client(&self) -> Client {
        self.store.client()
    }

    fn cached_lease(&self, node: &str) -> Option<i64> {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .copied()
    }

    fn remember_lease(&self, node: &str, lease: Option<i64>) {
        let mut cache = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        match lease {
            Some(l) => cache.insert(node.to_string(), l),
            None => cache.remove(node),
        };
    }

    fn cached_identity(&self, canonical: &str) -> Option<(u32, i64)> {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(canonical)
            .copied()
    }

    fn remember_identity(&self, canonical: &str, known: Option<(u32, i64)>) {
        let mut cache = self.known.lock().unwrap_or_else(|p| p.into_inner());
        match known {
            Some(k) => {
                if cache.len() >= KNOWN_CACHE_MAX {
                    cache.clear();
                }
                cache.insert(canonical.to_string(), k)
            }
            None => cache.remove(canonical),
        };
    }

    /// The node's live lease (cached, else read).
    async fn lease_of(&self, node: &str) -> Result<i64, IdentityError> {
        if let Some(l) = self.cached_lease(node) {
            return Ok(l);
        }
        match self.store.get_json::<i64>(&lease_key(node)).await? {
            Some((l, _)) => {
                self.remember_lease(node, Some(l));
                Ok(l)
            }
            None => Err(IdentityError::NoLease(node.into())),
        }
    }

    /// Reads the lease from a failed transaction's `Get` of the lease key:
    /// remembers it, or reports that there is none.
    fn lease_from(&self, node: &str, kv: Option<&KeyValue>) -> Result<i64, IdentityError> {
        match kv {
            Some(kv) => {
                let l: i64 = decode(kv)?;
                self.remember_lease(node, Some(l));
                Ok(l)
            }
            None => {
                self.remember_lease(node, None);
                Err(IdentityError::NoLease(node.into()))
            }
        }
    }

    /// Keeps `node`'s lease alive, granting one if it has none.
    pub async fn heartbeat(&self, node: &str) -> Result<NodeLease, IdentityError> {
        check_node("node", node)?;
        self.heartbeat_inner(node)
            .await
            .map_err(|e| e.while_doing(|| format!("renewing the lease of node `{node}`")))
    }

    async fn heartbeat_inner(&self, node: &str) -> Result<NodeLease, IdentityError> {
        let ttl = self.config.lease_ttl_secs;
        let lkey = self.store.key(&lease_key(node));
        let mut client = self.client();
        for _ in 0..MAX_ATTEMPTS {
            let current = client.get(lkey.as_str(), None).await?;
            let guard = match current.kvs().first() {
                Some(kv) => {
                    let lease: i64 = decode(kv)?;
                    match client.lease_keep_alive(lease).await {
                        Ok(_) => {
                            self.remember_lease(node, Some(lease));
                            return Ok(NodeLease {
                                id: lease,
                                granted: false,
                                ttl_secs: ttl,
                            });
                        }
                        // The lease expired under the key: replace it.
                        Err(etcd_client::Error::LeaseKeepAliveError(_)) => Compare::mod_revision(
                            lkey.as_str(),
                            CompareOp::Equal,
                            kv.mod_revision(),
                        ),
                        Err(e) => return Err(e.into()),
                    }
                }
                None => Compare::create_revision(lkey.as_str(), CompareOp::Equal, 0),
            };
            let lease = client.lease_grant(ttl, None).await?.id();
            let txn = Txn::new().when([guard]).and_then([TxnOp::put(
                lkey.as_str(),
                to_json(&lease),
                Some(PutOptions::new().with_lease(lease)),
            )]);
            if client.txn(txn).await?.succeeded() {
                tracing::info!(node = %node, lease, ttl, "node lease granted");
                self.remember_lease(node, Some(lease));
                return Ok(NodeLease {
                    id: lease,
                    granted: true,
                    ttl_secs: ttl,
                });
            }
            // Another replica granted one first: use theirs.
            let _ = client.lease_revoke(lease).await;
        }
        Err(IdentityError::Contention {
            what: format!("the lease of node `{node}`"),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// The identity of `labels`, allocated on first use, with a reference
    /// from `node` recorded. See the module doc for the transactions.
    pub async fn allocate(
        &self,
        labels: &LabelSet,
        node: &str,
    ) -> Result<Allocation, IdentityError> {
        check_node("node", node)?;
        self.allocate_inner(labels, node)
            .await
            .map_err(|e| e.while_doing(|| format!("allocating label set `{labels}`")))
    }

    async fn allocate_inner(
        &self,
        labels: &LabelSet,
        node: &str,
    ) -> Result<Allocation, IdentityError> {
        let canonical = labels.canonical();
        let lkey = self.store.key(&label_key(labels));
        let leasekey = self.store.key(&lease_key(node));
        let range = self.config.range;
        let mut client = self.client();
        let mut lease = self.lease_of(node).await?;
        // The label set's identity and the create revision of its label key.
        let mut known: Option<(u32, i64)> = self.cached_identity(&canonical);
        let mut collisions = 0usize;
        for _ in 0..MAX_ATTEMPTS {
            let lease_alive = Compare::value(leasekey.as_str(), CompareOp::Equal, to_json(&lease));
            let with_lease = || Some(PutOptions::new().with_lease(lease));
            let (txn, id) = match known {
                Some((id, rev)) => {
                    let txn = Txn::new()
                        .when([
                            Compare::create_revision(lkey.as_str(), CompareOp::Equal, rev),
                            lease_alive,
                        ])
                        .and_then([
                            TxnOp::put(self.store.key(&ref_key(id, node)), "", with_lease()),
                            TxnOp::delete(self.store.key(&unused_key(id)), None),
                        ])
                        .or_else([
                            TxnOp::get(lkey.as_str(), None),
                            TxnOp::get(leasekey.as_str(), None),
                        ]);
                    (txn, id)
                }
                None => {
                    let id = if collisions < BLIND_PROBES {
                        range.nth_wrapping(rand::random())
                    } else {
                        let used: BTreeSet<u32> = self
                            .store
                            .list_keys(keys::IDS)
                            .await?
                            .iter()
                            .filter_map(|k| k.strip_prefix(keys::IDS)?.parse().ok())
                            .collect();
                        range.pick_free(&used, rand::random()).ok_or_else(|| {
                            IdentityError::Exhausted {
                                range: range.to_string(),
                                labels: canonical.clone(),
                            }
                        })?
                    };
                    let ikey = self.store.key(&id_key(id));
                    let record = IdentityRecord {
                        id,
                        labels: canonical.clone(),
                    };
                    let txn = Txn::new()
                        .when([
                            Compare::create_revision(lkey.as_str(), CompareOp::Equal, 0),
                            Compare::create_revision(ikey.as_str(), CompareOp::Equal, 0),
                            lease_alive,
                        ])
                        .and_then([
                            TxnOp::put(ikey.as_str(), to_json(&record), None),
                            TxnOp::put(lkey.as_str(), to_json(&id), None),
                            TxnOp::put(self.store.key(&ref_key(id, node)), "", with_lease()),
                            // A marker left from an earlier incarnation of
                            // the number must not start this one's clock.
                            TxnOp::delete(self.store.key(&unused_key(id)), None),
                        ])
                        .or_else([
                            TxnOp::get(lkey.as_str(), None),
                            TxnOp::get(leasekey.as_str(), None),
                            TxnOp::get(ikey.as_str(), Some(GetOptions::new().with_keys_only())),
                        ]);
                    (txn, id)
                }
            };
            let resp = client.txn(txn).await?;
            if resp.succeeded() {
                let created = known.is_none();
                let rev = match known {
                    Some((_, rev)) => rev,
                    // The label key was created by this transaction.
                    None => resp.header().map(|h| h.revision()).unwrap_or(0),
                };
                self.remember_identity(&canonical, Some((id, rev)));
                if created {
                    tracing::info!(id, labels = %canonical, node = %node, "identity allocated");
                } else {
                    tracing::debug!(id, labels = %canonical, node = %node, "identity referenced");
                }
                return Ok(Allocation { id, created });
            }
            let gets = gets(&resp);
            lease = self.lease_from(node, first_kv(&gets, 1))?;
            known = match first_kv(&gets, 0) {
                Some(kv) => Some((decode(kv)?, kv.create_revision())),
                None => None,
            };
            self.remember_identity(&canonical, known);
            if known.is_none() && first_kv(&gets, 2).is_some() {
                collisions += 1;
            }
        }
        Err(IdentityError::Contention {
            what: format!("label set `{canonical}`"),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Drops `node`'s reference to `id`. Dropping the last one starts the
    /// identity's grace period, in the same transaction.
    pub async fn release(&self, id: u32, node: &str) -> Result<(), IdentityError> {
        check_node("node", node)?;
        global_only("id", id)?;
        let rkey = self.store.key(&ref_key(id, node));
        let prefix = self.store.key(&refs_prefix(id));
        let mut after_me = rkey.clone().into_bytes();
        after_me.push(0);
        let txn = Txn::new()
            .when([
                Compare::version(rkey.as_str(), CompareOp::Greater, 0),
                // No other node's reference before or after ours.
                Compare::version(prefix.as_str(), CompareOp::Equal, 0).with_range(rkey.as_str()),
                Compare::version(after_me, CompareOp::Equal, 0).with_range(prefix_end(&prefix)),
            ])
            .and_then([
                TxnOp::delete(rkey.as_str(), None),
                TxnOp::put(self.store.key(&unused_key(id)), to_json(&now_ms()), None),
            ])
            .or_else([TxnOp::delete(rkey.as_str(), None)]);
        let resp = self.client().txn(txn).await.map_err(|e| {
            IdentityError::from(e).while_doing(|| format!("releasing identity {id}"))
        })?;
        let deleted = resp.op_responses().into_iter().any(|r| match r {
            TxnOpResponse::Delete(d) => d.deleted() > 0,
            _ => false,
        });
        if !deleted {
            return Err(IdentityError::NotReferenced {
                id,
                node: node.into(),
            });
        }
        tracing::debug!(id, node = %node, last = resp.succeeded(), "identity released");
        Ok(())
    }

    /// One identity with its references.
    pub async fn get(&self, id: u32) -> Result<IdentityDetail, IdentityError> {
        match numbers::kind(id) {
            Kind::Reserved(r) => return Ok(reserved_detail(r)),
            Kind::Global => {}
            Kind::Unassigned | Kind::Cidr => return Err(IdentityError::NotFound(id)),
        }
        let txn = Txn::new().and_then([
            TxnOp::get(self.store.key(&id_key(id)), None),
            TxnOp::get(
                self.store.key(&refs_prefix(id)),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
            TxnOp::get(self.store.key(&unused_key(id)), None),
        ]);
        let resp =
            self.client().txn(txn).await.map_err(|e| {
                IdentityError::from(e).while_doing(|| format!("reading identity {id}"))
            })?;
        let gets = gets(&resp);
        let record: IdentityRecord = match first_kv(&gets, 0) {
            Some(kv) => decode(kv)?,
            None => return Err(IdentityError::NotFound(id)),
        };
        let nodes = gets
            .get(1)
            .map(|g| {
                g.kvs()
                    .iter()
                    .filter_map(|kv| self.ref_of(kv))
                    .map(|(_, n)| n)
                    .collect()
            })
            .unwrap_or_default();
        let since = first_kv(&gets, 2).map(decode).transpose()?;
        Ok(detail(record, nodes, since))
    }

    /// Every identity: reserved ones, then global ones, by number.
    pub async fn list(&self) -> Result<Vec<IdentityDetail>, IdentityError> {
        let prefix = Some(GetOptions::new().with_prefix());
        let txn = Txn::new().and_then([
            TxnOp::get(self.store.key(keys::IDS), prefix.clone()),
            TxnOp::get(
                self.store.key(keys::REFS),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
            TxnOp::get(self.store.key(keys::UNUSED), prefix),
        ]);
        let resp = self
            .client()
            .txn(txn)
            .await
            .map_err(|e| IdentityError::from(e).while_doing(|| "listing identities".into()))?;
        let gets = gets(&resp);
        let mut nodes: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for kv in gets.get(1).map(GetResponse::kvs).unwrap_or_default() {
            if let Some((id, node)) = self.ref_of(kv) {
                nodes.entry(id).or_default().push(node);
            }
        }
        let mut since: BTreeMap<u32, i64> = BTreeMap::new();
        for kv in gets.get(2).map(GetResponse::kvs).unwrap_or_default() {
            if let Some(id) = self.id_in(kv, keys::UNUSED) {
                since.insert(id, decode(kv)?);
            }
        }
        let mut out: Vec<IdentityDetail> = Reserved::ALL.into_iter().map(reserved_detail).collect();
        let mut global = Vec::new();
        for kv in gets.first().map(GetResponse::kvs).unwrap_or_default() {
            let record: IdentityRecord = decode(kv)?;
            if numbers::kind(record.id) != Kind::Global {
                continue;
            }
            let id = record.id;
            global.push(detail(
                record,
                nodes.remove(&id).unwrap_or_default(),
                since.get(&id).copied(),
            ));
        }
        global.sort_by_key(|d| d.id);
        out.extend(global);
        Ok(out)
    }

    /// Records `ip` as an endpoint of `identity` on `node`, bound to the
    /// node's lease. An entry another node recorded is taken over (addresses
    /// move when pods are rescheduled).
    pub async fn upsert_endpoint(
        &self,
        entry: IpcacheRecord,
    ) -> Result<IpcacheRecord, IdentityError> {
        check_node("node", &entry.node)?;
        match numbers::kind(entry.identity) {
            Kind::Reserved(Reserved::Unknown) => {
                return Err(invalid_identity(entry.identity, "identity 0 means unknown"));
            }
            Kind::Unassigned => {
                return Err(invalid_identity(
                    entry.identity,
                    "no reserved identity has this number",
                ));
            }
            Kind::Cidr => {
                return Err(invalid_identity(
                    entry.identity,
                    "CIDR identities are node-local and never in the shared ipcache",
                ));
            }
            Kind::Reserved(_) | Kind::Global => {}
        }
        let ip = entry.ip;
        self.upsert_inner(entry)
            .await
            .map_err(|e| e.while_doing(|| format!("recording ipcache entry for {ip}")))
    }

    async fn upsert_inner(&self, entry: IpcacheRecord) -> Result<IpcacheRecord, IdentityError> {
        let node = entry.node.as_str();
        let leasekey = self.store.key(&lease_key(node));
        let ikey = self.store.key(&id_key(entry.identity));
        let ckey = self.store.key(&ipcache_key(entry.ip));
        let mut lease = self.lease_of(node).await?;
        let mut client = self.client();
        for _ in 0..MAX_ATTEMPTS {
            let txn = Txn::new()
                .when([
                    Compare::value(leasekey.as_str(), CompareOp::Equal, to_json(&lease)),
                    Compare::create_revision(ikey.as_str(), CompareOp::Greater, 0),
                ])
                .and_then([TxnOp::put(
                    ckey.as_str(),
                    to_json(&entry),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([
                    TxnOp::get(ikey.as_str(), Some(GetOptions::new().with_keys_only())),
                    TxnOp::get(leasekey.as_str(), None),
                ]);
            let resp = client.txn(txn).await?;
            if resp.succeeded() {
                tracing::debug!(ip = %entry.ip, identity = entry.identity, node = %node, "ipcache entry recorded");
                return Ok(entry);
            }
            let gets = gets(&resp);
            if first_kv(&gets, 0).is_none() {
                return Err(IdentityError::NotFound(entry.identity));
            }
            lease = self.lease_from(node, first_kv(&gets, 1))?;
        }
        Err(IdentityError::Contention {
            what: format!("ipcache entry for {}", entry.ip),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Removes the entry for `ip` that `node` recorded.
    pub async fn delete_endpoint(&self, ip: IpAddr, node: &str) -> Result<(), IdentityError> {
        check_node("node", node)?;
        let rel = ipcache_key(ip);
        let ckey = self.store.key(&rel);
        let mut client = self.client();
        let doing = || format!("deleting ipcache entry for {ip}");
        for _ in 0..MAX_ATTEMPTS {
            let Some((rec, rev)) = self
                .store
                .get_json::<IpcacheRecord>(&rel)
                .await
                .map_err(|e| IdentityError::from(e).while_doing(doing))?
            else {
                return Err(IdentityError::IpcacheNotFound(ip));
            };
            if rec.node != node {
                return Err(IdentityError::IpcacheOwner {
                    ip,
                    node: node.into(),
                    owner: rec.node,
                });
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(ckey.as_str(), CompareOp::Equal, rev)])
                .and_then([TxnOp::delete(ckey.as_str(), None)]);
            let resp = client
                .txn(txn)
                .await
                .map_err(|e| IdentityError::from(e).while_doing(doing))?;
            if resp.succeeded() {
                tracing::debug!(ip = %ip, node = %node, "ipcache entry deleted");
                return Ok(());
            }
        }
        Err(IdentityError::Contention {
            what: format!("ipcache entry for {ip}"),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Records `node`'s underlay address with the remote-node identity.
    pub async fn register_node_ip(
        &self,
        node: &str,
        ip: IpAddr,
    ) -> Result<IpcacheRecord, IdentityError> {
        self.upsert_endpoint(IpcacheRecord {
            ip,
            identity: Reserved::RemoteNode.id(),
            node: node.into(),
            namespace: String::new(),
            pod: String::new(),
        })
        .await
    }

    /// Ipcache entries, of one node or all, sorted by address.
    pub async fn ipcache(&self, node: Option<&str>) -> Result<Vec<IpcacheRecord>, IdentityError> {
        let mut all: Vec<IpcacheRecord> = self
            .store
            .list_json::<IpcacheRecord>(keys::IPCACHE)
            .await
            .map_err(|e| IdentityError::from(e).while_doing(|| "listing the ipcache".into()))?
            .into_iter()
            .map(|(_, r)| r)
            .filter(|r| node.is_none_or(|n| r.node == n))
            .collect();
        all.sort_by_key(|r| r.ip);
        Ok(all)
    }

    /// One GC round: reads a snapshot, plans with [`gc::plan`], and carries
    /// out each action as a guarded transaction (see the module doc).
    pub async fn gc_once(&self) -> Result<GcReport, IdentityError> {
        let prefix = || Some(GetOptions::new().with_prefix());
        let txn = Txn::new().and_then([
            TxnOp::get(self.store.key(keys::IDS), prefix()),
            TxnOp::get(
                self.store.key(keys::REFS),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
            TxnOp::get(self.store.key(keys::UNUSED), prefix()),
        ]);
        let mut client = self.client();
        let resp = client.txn(txn).await?;
        let gets = gets(&resp);
        let mut snap = gc::Snapshot::default();
        let mut canonical: BTreeMap<u32, String> = BTreeMap::new();
        for kv in gets.first().map(GetResponse::kvs).unwrap_or_default() {
            let Ok(record) = decode::<IdentityRecord>(kv) else {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "corrupt identity; not collected");
                continue;
            };
            if numbers::kind(record.id) == Kind::Global {
                snap.ids.insert(record.id, kv.create_revision());
                canonical.insert(record.id, record.labels);
            }
        }
        for kv in gets.get(1).map(GetResponse::kvs).unwrap_or_default() {
            if let Some((id, _)) = self.ref_of(kv) {
                *snap.refs.entry(id).or_default() += 1;
            }
        }
        for kv in gets.get(2).map(GetResponse::kvs).unwrap_or_default() {
            if let (Some(id), Ok(since_ms)) = (self.id_in(kv, keys::UNUSED), decode::<i64>(kv)) {
                snap.markers.insert(
                    id,
                    gc::Marker {
                        since_ms,
                        mod_revision: kv.mod_revision(),
                    },
                );
            }
        }
        let grace_ms = i64::try_from(self.config.gc_grace.as_millis()).unwrap_or(i64::MAX);
        let mut report = GcReport::default();
        for action in gc::plan(&snap, now_ms(), grace_ms) {
            let txn = match action {
                Action::Mark {
                    id,
                    create_revision,
                } => Txn::new()
                    .when([
                        self.no_refs(id),
                        Compare::create_revision(
                            self.store.key(&unused_key(id)),
                            CompareOp::Equal,
                            0,
                        ),
                        Compare::create_revision(
                            self.store.key(&id_key(id)),
                            CompareOp::Equal,
                            create_revision,
                        ),
                    ])
                    .and_then([TxnOp::put(
                        self.store.key(&unused_key(id)),
                        to_json(&now_ms()),
                        None,
                    )]),
                Action::Collect {
                    id,
                    create_revision,
                    marker_revision,
                } => {
                    let Some(c) = canonical.get(&id) else {
                        continue;
                    };
                    Txn::new()
                        .when([
                            self.no_refs(id),
                            Compare::mod_revision(
                                self.store.key(&unused_key(id)),
                                CompareOp::Equal,
                                marker_revision,
                            ),
                            Compare::create_revision(
                                self.store.key(&id_key(id)),
                                CompareOp::Equal,
                                create_revision,
                            ),
                        ])
                        .and_then([
                            TxnOp::delete(self.store.key(&id_key(id)), None),
                            TxnOp::delete(
                                self.store.key(&format!(
                                    "{}{}",
                                    keys::LABELS,
                                    labels::escape_key(c)
                                )),
                                None,
                            ),
                            TxnOp::delete(self.store.key(&unused_key(id)), None),
                        ])
                }
                Action::DropMarker {
                    id,
                    marker_revision,
                } => Txn::new()
                    .when([
                        Compare::create_revision(self.store.key(&id_key(id)), CompareOp::Equal, 0),
                        Compare::mod_revision(
                            self.store.key(&unused_key(id)),
                            CompareOp::Equal,
                            marker_revision,
                        ),
                    ])
                    .and_then([TxnOp::delete(self.store.key(&unused_key(id)), None)]),
            };
            if client.txn(txn).await?.succeeded() {
                match action {
                    Action::Mark { id, .. } => {
                        tracing::debug!(id, "identity unreferenced; grace period started");
                        report.marked += 1;
                    }
                    Action::Collect { id, .. } => {
                        tracing::info!(id, labels = %canonical.get(&id).map(String::as_str).unwrap_or(""), "identity collected");
                        report.collected += 1;
                    }
                    Action::DropMarker { .. } => {}
                }
            }
        }
        Ok(report)
    }

    /// Runs [`Self::gc_once`] every `gc_interval`, forever. Safe on every
    /// replica at once.
    pub async fn run_gc(self) {
        let interval = self.config.gc_interval.max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(interval).await;
            if let Err(e) = self.gc_once().await {
                tracing::warn!(error = %e, "identity gc round failed; retrying next round");
            }
        }
    }

    /// "No key under `refs/<id>/`", as a transaction comparison.
    fn no_refs(&self, id: u32) -> Compare {
        Compare::version(self.store.key(&refs_prefix(id)), CompareOp::Equal, 0).with_prefix()
    }

    /// `(id, node)` of a `refs/<id>/<node>` key.
    fn ref_of(&self, kv: &KeyValue) -> Option<(u32, String)> {
        let key = String::from_utf8_lossy(kv.key());
        let rest = self.store.rel(&key).strip_prefix(keys::REFS)?;
        let (id, node) = rest.split_once('/')?;
        Some((id.parse().ok()?, node.to_string()))
    }

    /// The id of a `<prefix><id>` key.
    fn id_in(&self, kv: &KeyValue, prefix: &str) -> Option<u32> {
        let key = String::from_utf8_lossy(kv.key());
        self.store.rel(&key).strip_prefix(prefix)?.parse().ok()
    }
}

fn invalid_identity(id: u32, reason: &str) -> IdentityError {
    IdentityError::InvalidIdentity {
        field: "identity".into(),
        id,
        reason: reason.into(),
    }
}

fn global_only(field: &str, id: u32) -> Result<(), IdentityError> {
    let reason = match numbers::kind(id) {
        Kind::Global => return Ok(()),
        Kind::Reserved(r) => format!(
            "reserved (`reserved:{}`), never allocated or released",
            r.name()
        ),
        Kind::Unassigned => "below the global range and not a reserved identity".into(),
        Kind::Cidr => "a node-local CIDR identity".into(),
    };
    Err(IdentityError::InvalidIdentity {
        field: field.into(),
        id,
        reason,
    })
}

fn reserved_detail(r: Reserved) -> IdentityDetail {
    IdentityDetail {
        id: r.id(),
        labels: r.labels().strings(),
        reserved: true,
        nodes: Vec::new(),
        unreferenced_since_ms: None,
    }
}

fn detail(record: IdentityRecord, mut nodes: Vec<String>, since: Option<i64>) -> IdentityDetail {
    nodes.sort();
    IdentityDetail {
        id: record.id,
        labels: labels::split_canonical(&record.labels),
        reserved: false,
        nodes,
        unreferenced_since_ms: since,
    }
}

fn id_key(id: u32) -> String {
    format!("{}{id}", keys::IDS)
}
fn label_key(labels: &LabelSet) -> String {
    format!(
        "{}{}",
        keys::LABELS,
        labels::escape_key(&labels.canonical())
    )
}
fn refs_prefix(id: u32) -> String {
    format!("{}{id}/", keys::REFS)
}
fn ref_key(id: u32, node: &str) -> String {
    format!("{}{id}/{node}", keys::REFS)
}
fn lease_key(node: &str) -> String {
    format!("{}{node}", keys::LEASES)
}
fn unused_key(id: u32) -> String {
    format!("{}{id}", keys::UNUSED)
}
fn ipcache_key(ip: IpAddr) -> String {
    format!("{}{ip}", keys::IPCACHE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_just_after_the_prefix() {
        assert_eq!(
            prefix_end("/m/identity/refs/300/"),
            b"/m/identity/refs/3000".to_vec()
        );
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }

    #[test]
    fn node_names_must_fit_in_a_key_segment() {
        assert!(check_node("node", "node-1").is_ok());
        assert_eq!(
            check_node("node", "").expect_err("empty").to_string(),
            "node: must not be empty"
        );
        assert_eq!(
            check_node("node", "a/b").expect_err("slash").to_string(),
            "node: invalid node name `a/b`: may not contain '/'"
        );
    }

    #[test]
    fn only_global_identities_are_released() {
        assert!(global_only("id", 300).is_ok());
        assert_eq!(
            global_only("id", 1).expect_err("host").to_string(),
            "id: identity 1 cannot be used here: reserved (`reserved:host`), never allocated or released"
        );
        assert!(global_only("id", 100).is_err());
        assert!(global_only("id", numbers::CIDR_BASE + 1).is_err());
    }

    #[test]
    fn ipcache_prefixes_are_host_routes() {
        let r = |ip: &str| IpcacheRecord {
            ip: ip.parse().expect("ip"),
            identity: 300,
            node: "n".into(),
            namespace: String::new(),
            pod: String::new(),
        };
        assert_eq!(r("10.200.0.5").prefix(), "10.200.0.5/32");
        assert_eq!(r("fd00::5").prefix(), "fd00::5/128");
    }
}
