//! The lb service's etcd adapter. Every allocation is one transaction whose
//! comparisons fail if another replica got there first; the caller re-reads
//! and tries again, so replicas never hand out the same address or port.
//!
//! Keys (under the cluster prefix):
//! - `lb/config` → [`StoredConfig`] (CIDRs, table size, seed): written once;
//!   every replica must run with the same settings.
//! - `lb/services/<ns>/<name>` → [`Service`] with its allocations.
//! - `lb/alloc/clusterip/<ip>`, `lb/alloc/nodeport/<port>`,
//!   `lb/alloc/lbip/<ip>` → `ns/name` of the holder (uniqueness).
//! - `lb/endpoints/<ns>/<name>`, `lb/endpointslices/<ns>/<name>` → [`EndpointSet`].
//! - `lb/backend-ids/<ip>` → id; `lb/backend-id-next` → next id.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use etcd_client::{Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, WatchOptions};
use ipnet::Ipv4Net;
use membrane_runtime::store::{Store, StoreError, to_json};
use serde::{Deserialize, Serialize};

use crate::maglev::{Seed, TableSize};
use crate::model::{self, Algorithm, EndpointSet, LbConfig, Service};

/// Where nodes following a replica's stream are registered.
const NODES_PREFIX: &str = "lb/nodes/";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    /// etcd unreachable or a value corrupt.
    #[error("{0}")]
    Store(String),
    /// The request conflicts with stored state.
    #[error("{0}")]
    Conflict(String),
    /// The flags differ from what the cluster recorded.
    #[error(
        "lb configuration differs from the one stored in etcd (stored {stored}, flags {flags}); every replica must use the same settings"
    )]
    ConfigMismatch {
        /// What etcd has.
        stored: String,
        /// What the flags say.
        flags: String,
    },
    /// Too many concurrent writers.
    #[error("gave up after {0} conflicting attempts")]
    Contention(usize),
}

impl From<StoreError> for LbError {
    fn from(e: StoreError) -> Self {
        LbError::Store(e.to_string())
    }
}

impl From<etcd_client::Error> for LbError {
    fn from(e: etcd_client::Error) -> Self {
        LbError::Store(format!("etcd unavailable: {e}"))
    }
}

/// The cluster-wide settings as recorded in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredConfig {
    /// Service CIDR.
    pub service_cidr: Ipv4Net,
    /// LoadBalancer pool.
    pub lb_pool: Ipv4Net,
    /// Maglev table size.
    pub table_size: u32,
    /// Maglev seed, base64.
    pub seed: String,
}

/// Everything stored under `lb/`, at one revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// etcd revision.
    pub revision: i64,
    /// Services sorted by key.
    pub services: Vec<Service>,
    /// Endpoint sets sorted by key.
    pub sets: Vec<EndpointSet>,
    /// Backend ids.
    pub ids: BTreeMap<Ipv4Addr, u32>,
    /// Nodes following some replica's stream (`lb/nodes/<node>/<replica>`,
    /// bound to that replica's lease): every replica sees the same set.
    pub nodes: BTreeSet<String>,
}

/// What applying one service did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// New.
    Created,
    /// Changed.
    Configured,
    /// Same as stored.
    Unchanged,
}

const CONFIG: &str = "lb/config";
const ID_NEXT: &str = "lb/backend-id-next";
const MAX_ATTEMPTS: usize = 64;

fn service_key(ns: &str, name: &str) -> String {
    format!("lb/services/{ns}/{name}")
}
fn clusterip_key(ip: Ipv4Addr) -> String {
    format!("lb/alloc/clusterip/{ip}")
}
fn nodeport_key(p: u16) -> String {
    format!("lb/alloc/nodeport/{p}")
}
fn lbip_key(ip: Ipv4Addr) -> String {
    format!("lb/alloc/lbip/{ip}")
}
fn id_key(ip: Ipv4Addr) -> String {
    format!("lb/backend-ids/{ip}")
}

/// The endpoint-set key for `source` (`endpoints/<ns>/<name>` or
/// `endpointslice/<ns>/<name>`).
pub fn set_key(source: &str) -> String {
    match source.split_once('/') {
        Some(("endpointslice", rest)) => format!("lb/endpointslices/{rest}"),
        Some((_, rest)) => format!("lb/endpoints/{rest}"),
        None => format!("lb/endpoints/{source}"),
    }
}

/// Allocation keys a stored service holds.
fn held_keys(svc: &Service) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    keys.extend(svc.cluster_ip.map(clusterip_key));
    if svc.wants_node_ports() {
        keys.extend(
            svc.ports
                .iter()
                .filter_map(|p| p.node_port)
                .map(nodeport_key),
        );
    }
    if svc.kind == model::ServiceType::LoadBalancer {
        keys.extend(svc.load_balancer_ip.map(lbip_key));
    }
    keys
}

/// lb state in etcd.
#[derive(Debug, Clone)]
pub struct LbStore {
    store: Store,
    config: LbConfig,
    seed: Seed,
}

impl LbStore {
    /// Binds to `store`: records the settings (with `seed`, or a fresh random
    /// one) on first use; refuses settings different from those recorded.
    /// Returns the store, whose seed is the cluster's.
    pub async fn open(store: Store, config: LbConfig, seed: Option<Seed>) -> Result<Self, LbError> {
        let wanted = StoredConfig {
            service_cidr: config.service_cidr,
            lb_pool: config.lb_pool,
            table_size: config.table_size.get(),
            seed: seed.unwrap_or_else(Seed::random).to_base64(),
        };
        let key = store.key(CONFIG);
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), to_json(&wanted), None)]);
        store.client().txn(txn).await?;
        let (stored, _) = store
            .get_json::<StoredConfig>(CONFIG)
            .await?
            .ok_or_else(|| LbError::Store("lb configuration vanished".into()))?;
        let seed_differs = seed.is_some() && stored.seed != wanted.seed;
        if stored.service_cidr != wanted.service_cidr
            || stored.lb_pool != wanted.lb_pool
            || stored.table_size != wanted.table_size
            || seed_differs
        {
            let show = |c: &StoredConfig, seed: bool| {
                format!(
                    "service CIDR {}, pool {}, M {}{}",
                    c.service_cidr,
                    c.lb_pool,
                    c.table_size,
                    if seed {
                        format!(", seed {}", c.seed)
                    } else {
                        String::new()
                    }
                )
            };
            return Err(LbError::ConfigMismatch {
                stored: show(&stored, seed_differs),
                flags: show(&wanted, seed_differs),
            });
        }
        let seed = Seed::from_base64("lb/config seed", &stored.seed)
            .map_err(|e| LbError::Store(e.to_string()))?;
        TableSize::new("lb/config table_size", stored.table_size.into())
            .map_err(|e| LbError::Store(e.to_string()))?;
        Ok(Self {
            store,
            config,
            seed,
        })
    }

    /// The settings.
    pub fn config(&self) -> LbConfig {
        self.config
    }

    /// The cluster's Maglev seed.
    pub fn seed(&self) -> Seed {
        self.seed
    }

    /// One stored service.
    pub async fn service(&self, ns: &str, name: &str) -> Result<Option<Service>, LbError> {
        Ok(self
            .store
            .get_json(&service_key(ns, name))
            .await?
            .map(|(s, _)| s))
    }

    /// Everything under `lb/` at one revision.
    pub async fn snapshot(&self) -> Result<Snapshot, LbError> {
        let prefix = self.store.key("lb/");
        let resp = self
            .store
            .client()
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        let mut snap = Snapshot {
            revision: resp.header().map(|h| h.revision()).unwrap_or(0),
            ..Snapshot::default()
        };
        for kv in resp.kvs() {
            let full = String::from_utf8_lossy(kv.key()).into_owned();
            let rel = self.store.rel(&full);
            let corrupt =
                |e: serde_json::Error| LbError::Store(format!("corrupt value at `{full}`: {e}"));
            if rel.starts_with("lb/services/") {
                snap.services
                    .push(serde_json::from_slice(kv.value()).map_err(corrupt)?);
            } else if rel.starts_with("lb/endpoints/") || rel.starts_with("lb/endpointslices/") {
                snap.sets
                    .push(serde_json::from_slice(kv.value()).map_err(corrupt)?);
            } else if let Some(Ok(ip)) = rel.strip_prefix("lb/backend-ids/").map(str::parse) {
                snap.ids
                    .insert(ip, serde_json::from_slice(kv.value()).map_err(corrupt)?);
            } else if let Some((node, _replica)) = rel
                .strip_prefix(NODES_PREFIX)
                .and_then(|r| r.split_once('/'))
            {
                snap.nodes.insert(node.to_string());
            }
        }
        Ok(snap)
    }

    async fn holders(&self, rel_prefix: &str) -> Result<BTreeMap<String, String>, LbError> {
        Ok(self
            .store
            .list_json::<String>(rel_prefix)
            .await?
            .into_iter()
            .collect())
    }

    /// Stores `services` in one transaction, allocating what each lacks:
    /// all or nothing. With `dry_run`, computes the outcome without writing.
    pub async fn apply_services(
        &self,
        services: Vec<Service>,
        dry_run: bool,
    ) -> Result<Vec<(Service, Outcome)>, LbError> {
        let mut client = self.store.client();
        for _ in 0..MAX_ATTEMPTS {
            let mut held = self.holders("lb/alloc/").await?;
            let mut compares = Vec::new();
            let mut ops = Vec::new();
            let mut results = Vec::new();
            for intent in &services {
                let id = intent.id();
                let skey = self
                    .store
                    .key(&service_key(&intent.namespace, &intent.name));
                let existing = self
                    .store
                    .get_json::<Service>(&service_key(&intent.namespace, &intent.name))
                    .await?;
                let merged = self.allocate(intent, existing.as_ref().map(|e| &e.0), &mut held)?;
                let old_keys = existing
                    .as_ref()
                    .map(|e| held_keys(&e.0))
                    .unwrap_or_default();
                let new_keys = held_keys(&merged);
                match &existing {
                    Some((old, rev)) => {
                        compares.push(Compare::mod_revision(skey.as_str(), CompareOp::Equal, *rev));
                        if *old == merged {
                            results.push((merged, Outcome::Unchanged));
                            continue;
                        }
                    }
                    None => {
                        compares.push(Compare::create_revision(skey.as_str(), CompareOp::Equal, 0))
                    }
                }
                for k in new_keys.difference(&old_keys) {
                    let full = self.store.key(k);
                    compares.push(Compare::create_revision(full.as_str(), CompareOp::Equal, 0));
                    ops.push(TxnOp::put(full.as_str(), to_json(&id), None));
                }
                for k in old_keys.difference(&new_keys) {
                    ops.push(TxnOp::delete(self.store.key(k), None));
                }
                ops.push(TxnOp::put(skey.as_str(), to_json(&merged), None));
                let outcome = if existing.is_some() {
                    Outcome::Configured
                } else {
                    Outcome::Created
                };
                results.push((merged, outcome));
            }
            if dry_run || ops.is_empty() {
                return Ok(results);
            }
            if client
                .txn(Txn::new().when(compares).and_then(ops))
                .await?
                .succeeded()
            {
                for (s, o) in &results {
                    tracing::info!(service = %s.id(), cluster_ip = ?s.cluster_ip, outcome = ?o, "service stored");
                }
                return Ok(results);
            }
        }
        Err(LbError::Contention(MAX_ATTEMPTS))
    }

    /// Fills in `intent`'s allocations: kept from `existing`, checked when
    /// requested, picked when absent. `held` (key → holder) is updated with
    /// this batch's choices so services of one file never collide.
    fn allocate(
        &self,
        intent: &Service,
        existing: Option<&Service>,
        held: &mut BTreeMap<String, String>,
    ) -> Result<Service, LbError> {
        let id = intent.id();
        let mut svc = intent.clone();
        // ClusterIP: immutable once allocated.
        let old_ip = existing.and_then(|e| e.cluster_ip);
        let ip = match (intent.cluster_ip, old_ip) {
            (Some(want), Some(has)) if want != has => {
                return Err(LbError::Conflict(format!(
                    "service `{id}`: spec.clusterIP is immutable (has {has}, asked for {want})"
                )));
            }
            (Some(ip), _) | (None, Some(ip)) => ip,
            (None, None) => {
                let used = ips_in(held, "lb/alloc/clusterip/");
                model::pick_free_ip(self.config.service_cidr, &used, rand::random()).ok_or_else(
                    || {
                        LbError::Conflict(format!(
                            "service CIDR {} is exhausted",
                            self.config.service_cidr
                        ))
                    },
                )?
            }
        };
        claim(
            held,
            &id,
            clusterip_key(ip),
            &format!("spec.clusterIP {ip}"),
        )?;
        svc.cluster_ip = Some(ip);

        if svc.wants_node_ports() {
            for (i, p) in svc.ports.iter_mut().enumerate() {
                let kept = existing.and_then(|e| {
                    e.ports
                        .iter()
                        .find(|o| o.name == p.name && o.protocol == p.protocol)
                        .and_then(|o| o.node_port)
                });
                let port = match p.node_port.or(kept) {
                    Some(port) => port,
                    None => {
                        let used: BTreeSet<u16> = held
                            .keys()
                            .filter_map(|k| k.strip_prefix("lb/alloc/nodeport/")?.parse().ok())
                            .collect();
                        model::pick_free_node_port(&used, rand::random()).ok_or_else(|| {
                            LbError::Conflict("NodePort range is exhausted".into())
                        })?
                    }
                };
                claim(
                    held,
                    &id,
                    nodeport_key(port),
                    &format!("spec.ports[{i}].nodePort {port}"),
                )?;
                p.node_port = Some(port);
            }
        } else {
            for p in &mut svc.ports {
                p.node_port = None;
            }
        }

        if svc.kind == model::ServiceType::LoadBalancer {
            let kept = existing.and_then(|e| e.load_balancer_ip);
            let ip = match intent.load_balancer_ip.or(kept) {
                Some(ip) => ip,
                None => {
                    let used = ips_in(held, "lb/alloc/lbip/");
                    model::pick_free_ip(self.config.lb_pool, &used, rand::random()).ok_or_else(
                        || {
                            LbError::Conflict(format!(
                                "LoadBalancer pool {} is exhausted",
                                self.config.lb_pool
                            ))
                        },
                    )?
                }
            };
            claim(
                held,
                &id,
                lbip_key(ip),
                &format!("spec.loadBalancerIP {ip}"),
            )?;
            svc.load_balancer_ip = Some(ip);
        } else {
            svc.load_balancer_ip = None;
        }
        Ok(svc)
    }

    /// Deletes services and what they hold. Returns whether each existed.
    pub async fn delete_services(
        &self,
        ids: &[(String, String)],
        dry_run: bool,
    ) -> Result<Vec<bool>, LbError> {
        let mut found = Vec::new();
        let mut ops = Vec::new();
        for (ns, name) in ids {
            let existing = self.service(ns, name).await?;
            if let Some(svc) = &existing {
                for k in held_keys(svc) {
                    ops.push(TxnOp::delete(self.store.key(&k), None));
                }
                ops.push(TxnOp::delete(self.store.key(&service_key(ns, name)), None));
            }
            found.push(existing.is_some());
        }
        if !dry_run && !ops.is_empty() {
            self.store.client().txn(Txn::new().and_then(ops)).await?;
        }
        Ok(found)
    }

    /// Stores endpoint sets in one transaction. Returns whether each changed.
    pub async fn put_sets(
        &self,
        sets: &[EndpointSet],
        dry_run: bool,
    ) -> Result<Vec<Option<bool>>, LbError> {
        let mut out = Vec::new();
        let mut ops = Vec::new();
        for s in sets {
            let key = set_key(&s.source);
            let old = self
                .store
                .get_json::<EndpointSet>(&key)
                .await?
                .map(|(v, _)| v);
            out.push(old.as_ref().map(|o| o != s));
            if old.as_ref() != Some(s) {
                ops.push(TxnOp::put(self.store.key(&key), to_json(s), None));
            }
        }
        if !dry_run && !ops.is_empty() {
            self.store.client().txn(Txn::new().and_then(ops)).await?;
        }
        Ok(out)
    }

    /// Deletes endpoint sets by source. Returns whether each existed.
    pub async fn delete_sets(
        &self,
        sources: &[String],
        dry_run: bool,
    ) -> Result<Vec<bool>, LbError> {
        let mut found = Vec::new();
        let mut ops = Vec::new();
        for s in sources {
            let key = set_key(s);
            let exists = self.store.get_json::<EndpointSet>(&key).await?.is_some();
            if exists {
                ops.push(TxnOp::delete(self.store.key(&key), None));
            }
            found.push(exists);
        }
        if !dry_run && !ops.is_empty() {
            self.store.client().txn(Txn::new().and_then(ops)).await?;
        }
        Ok(found)
    }

    /// Gives every address in `addrs` a stable id (ids are never reused or
    /// changed; an address keeps its id for the life of the cluster).
    pub async fn ensure_backend_ids(&self, addrs: &BTreeSet<Ipv4Addr>) -> Result<(), LbError> {
        let mut client = self.store.client();
        let next_key = self.store.key(ID_NEXT);
        let mut missing: Vec<Ipv4Addr> = addrs.iter().copied().collect();
        for _ in 0..MAX_ATTEMPTS {
            let ids = self.snapshot().await?.ids;
            missing.retain(|a| !ids.contains_key(a));
            if missing.is_empty() {
                return Ok(());
            }
            let chunk: Vec<Ipv4Addr> = missing.iter().take(100).copied().collect();
            let (next, guard) = match self.store.get_json::<u32>(ID_NEXT).await? {
                Some((n, rev)) => (
                    n,
                    Compare::mod_revision(next_key.as_str(), CompareOp::Equal, rev),
                ),
                None => (
                    1,
                    Compare::create_revision(next_key.as_str(), CompareOp::Equal, 0),
                ),
            };
            let mut compares = vec![guard];
            let mut ops = Vec::new();
            for (i, a) in chunk.iter().enumerate() {
                let k = self.store.key(&id_key(*a));
                compares.push(Compare::create_revision(k.as_str(), CompareOp::Equal, 0));
                ops.push(TxnOp::put(k.as_str(), to_json(&(next + i as u32)), None));
            }
            ops.push(TxnOp::put(
                next_key.as_str(),
                to_json(&(next + chunk.len() as u32)),
                None,
            ));
            if client
                .txn(Txn::new().when(compares).and_then(ops))
                .await?
                .succeeded()
            {
                tracing::debug!(count = chunk.len(), first = next, "backend ids assigned");
            }
        }
        Err(LbError::Contention(MAX_ATTEMPTS))
    }

    /// Keeps `lb/nodes/<node>/<replica>` for every node in `connected`
    /// (the nodes with a stream open to this replica), all bound to one
    /// lease of this replica: a node that disconnects is removed at once, a
    /// replica that dies takes its nodes with it when the lease expires.
    /// Announcers are chosen from these keys, so every replica agrees.
    pub async fn register_nodes(
        self,
        replica: String,
        mut connected: tokio::sync::watch::Receiver<BTreeSet<String>>,
    ) {
        const TTL: i64 = 10;
        let mut client = self.store.client();
        loop {
            let r: Result<(), etcd_client::Error> = async {
                let lease = client.lease_grant(TTL, None).await?.id();
                let (mut keeper, mut renewals) = client.lease_keep_alive(lease).await?;
                let mut written: BTreeSet<String> = BTreeSet::new();
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(3));
                loop {
                    let want = connected.borrow_and_update().clone();
                    for n in want.difference(&written) {
                        let key = self.store.key(&format!("{NODES_PREFIX}{n}/{replica}"));
                        client
                            .put(
                                key,
                                b"1".to_vec(),
                                Some(etcd_client::PutOptions::new().with_lease(lease)),
                            )
                            .await?;
                    }
                    for n in written.difference(&want) {
                        let key = self.store.key(&format!("{NODES_PREFIX}{n}/{replica}"));
                        client.delete(key, None).await?;
                    }
                    written = want;
                    tokio::select! {
                        r = connected.changed() => if r.is_err() { return Ok(()) },
                        _ = tick.tick() => {
                            keeper.keep_alive().await?;
                            // A lease that expired meanwhile (etcd away): start over.
                            match renewals.message().await? {
                                Some(r) if r.ttl() > 0 => {}
                                _ => return Err(etcd_client::Error::LeaseKeepAliveError(
                                    "lease expired".into(),
                                )),
                            }
                        }
                    }
                }
            }
            .await;
            match r {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "node registration interrupted; re-registering");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Sends the revision of every change under `lb/` to `tx`, forever
    /// (re-watching after interruptions; a re-watch also sends).
    pub async fn watch_changes(self, tx: tokio::sync::watch::Sender<i64>) {
        let prefix = self.store.key("lb/");
        loop {
            let r: Result<(), etcd_client::Error> = async {
                let mut client = self.store.client();
                let mut stream = client
                    .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
                    .await?;
                // Changes before the watch started are caught by re-reading.
                tx.send_modify(|v| *v += 1);
                while let Some(resp) = stream.message().await? {
                    if resp.canceled() {
                        break;
                    }
                    if resp
                        .events()
                        .iter()
                        .any(|e| matches!(e.event_type(), EventType::Put | EventType::Delete))
                    {
                        tx.send_modify(|v| *v += 1);
                    }
                }
                Ok(())
            }
            .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "lb watch interrupted; re-watching");
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
}

fn claim(
    held: &mut BTreeMap<String, String>,
    id: &str,
    key: String,
    what: &str,
) -> Result<(), LbError> {
    match held.get(&key) {
        Some(h) if h != id => Err(LbError::Conflict(format!(
            "service `{id}`: {what} is already used by service `{h}`"
        ))),
        _ => {
            held.insert(key, id.to_string());
            Ok(())
        }
    }
}

fn ips_in(held: &BTreeMap<String, String>, prefix: &str) -> BTreeSet<Ipv4Addr> {
    held.keys()
        .filter_map(|k| k.strip_prefix(prefix)?.parse().ok())
        .collect()
}

/// The default algorithm flag value, parsed.
pub fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    s.parse()
}
