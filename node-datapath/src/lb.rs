//! Service load balancing from the lb service's stream:
//! `service/<ns>/<name>` → [`ServiceState`] (without backends) and
//! `backend/<ns>/<name>/<address>` → one backend each → frontends, backends
//! and one table per service in the lb maps (see [`crate::bpf::SockLb`]).
//! LoadBalancer and externalIPs addresses whose published announcer is
//! this node are announced on the underlay (answered to ARP).
//!
//! ClusterIP frontends go to `bpf_sock`'s service map (pod → service, at
//! connect/sendmsg time); NodePort (keyed with address 0.0.0.0: this node's
//! underlay address), LoadBalancer and externalIPs frontends go to the
//! external service map that `bpf_host` reads at tc (DNAT, reverse NAT, SNAT
//! to the node for remote backends: `bpf/lib/nodeport.h`), together with the
//! backends' ports (`mb_lb_be_ports`). Same tables and backends for both.
//! For `maglev` the table is built on the node with
//! `membrane_lb::maglev` from what the service published (backends, weights,
//! seed, M): a pure function, so every node programs the same table. For
//! `random` the table is the backends of weight > 0. ClientIP session
//! affinity (`affinity_timeout_seconds`) goes with every frontend of the
//! service; the datapath keeps the per-client choice (`mb_lb_affinity`).
//!
//! Service ids (the key of a service's table) are local to this agent and
//! assigned in order of first sight; a restarted agent re-assigns them and
//! reprograms every frontend, removing what it does not want (tables it
//! finds referenced by programmed frontends included).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use membrane_lb::maglev::{self, Seed, TableSize, Weighted};
use membrane_proto::lb::v1 as proto;
use membrane_runtime::stream::StateSink;
use prost_types::Any;

use crate::bpf::{L2Announcer, LbAlgorithm, LbBackend, LbFrontend, LbProtocol, LbService, SockLb};
use crate::routes::service_routes;

/// The maps the sink programs (the real ones: [`SockLb`]; tests: a fake).
pub trait LbMaps: Send + 'static {
    /// Programmed frontends.
    fn frontends(&mut self) -> Result<Vec<(LbFrontend, LbService)>, String>;
    /// Programmed backends.
    fn backends(&mut self) -> Result<Vec<(u32, LbBackend)>, String>;
    /// A service's programmed table (backend id per slot), if any.
    fn table(&mut self, service_id: u32) -> Result<Option<Vec<u32>>, String>;
    /// Programs a backend.
    fn upsert_backend(&mut self, id: u32, backend: LbBackend) -> Result<(), String>;
    /// Removes a backend.
    fn remove_backend(&mut self, id: u32) -> Result<(), String>;
    /// Swaps in a service's table.
    fn set_table(&mut self, service_id: u32, backend_ids: &[u32]) -> Result<(), String>;
    /// Removes a service's table.
    fn remove_table(&mut self, service_id: u32) -> Result<(), String>;
    /// Swaps in many services' tables, each whole (readers see a service's
    /// old table or its new one). Maps that can, batch them: the real ones
    /// pay the kernel's map-of-maps wait once per batch, not per table. On
    /// error the message names the services whose table was not applied.
    fn set_tables(&mut self, tables: &[(u32, &[u32])]) -> Result<(), String> {
        for (service_id, backend_ids) in tables {
            self.set_table(*service_id, backend_ids)?;
        }
        Ok(())
    }
    /// Removes many services' tables (batched where the maps can).
    fn remove_tables(&mut self, service_ids: &[u32]) -> Result<(), String> {
        for service_id in service_ids {
            self.remove_table(*service_id)?;
        }
        Ok(())
    }
    /// Programs a frontend.
    fn upsert_service(&mut self, frontend: LbFrontend, service: LbService) -> Result<(), String>;
    /// Removes a frontend.
    fn remove_service(&mut self, frontend: LbFrontend) -> Result<(), String>;
    /// Programmed external frontends (NodePort, LoadBalancer, externalIPs;
    /// bpf_host at tc).
    fn ext_frontends(&mut self) -> Result<Vec<(LbFrontend, LbService)>, String> {
        Ok(Vec::new())
    }
    /// Programs an external frontend (NodePort: address 0.0.0.0).
    fn upsert_ext_service(
        &mut self,
        _frontend: LbFrontend,
        _service: LbService,
    ) -> Result<(), String> {
        Ok(())
    }
    /// Removes an external frontend.
    fn remove_ext_service(&mut self, _frontend: LbFrontend) -> Result<(), String> {
        Ok(())
    }
    /// Marked backend ports (address, target port, protocol) of services
    /// with external frontends.
    fn backend_ports(&mut self) -> Result<Vec<LbFrontend>, String> {
        Ok(Vec::new())
    }
    /// Marks a backend port.
    fn upsert_backend_port(&mut self, _port: LbFrontend) -> Result<(), String> {
        Ok(())
    }
    /// Unmarks a backend port.
    fn remove_backend_port(&mut self, _port: LbFrontend) -> Result<(), String> {
        Ok(())
    }
    /// Addresses this node announces on the underlay (answers ARP for).
    fn announced(&mut self) -> Result<Vec<Ipv4Addr>, String> {
        Ok(Vec::new())
    }
    /// Starts announcing an address.
    fn announce(&mut self, _address: Ipv4Addr) -> Result<(), String> {
        Ok(())
    }
    /// Stops announcing an address.
    fn withdraw(&mut self, _address: Ipv4Addr) -> Result<(), String> {
        Ok(())
    }
    /// Service addresses the node's stack treats as local (so a service
    /// without backends is refused at once; see `routes::service_routes`).
    fn local_addresses(&mut self) -> Result<Vec<Ipv4Addr>, String> {
        Ok(Vec::new())
    }
    /// Makes a service address local.
    fn add_local(&mut self, _address: Ipv4Addr) -> Result<(), String> {
        Ok(())
    }
    /// Removes a service address's local route.
    fn remove_local(&mut self, _address: Ipv4Addr) -> Result<(), String> {
        Ok(())
    }
}

/// Applies the lb stream to [`LbMaps`], incrementally: a service whose
/// published bytes did not change is not recomputed (no Maglev build), and
/// only map entries that differ from what this sink programmed are written.
/// The first apply after start reads the maps once, so entries a previous
/// agent left behind are removed.
pub struct LbSink<M> {
    /// This node's name: it announces the addresses whose announcer it is.
    node: String,
    maps: Arc<Mutex<M>>,
    view: LbView,
    /// Per service key: the published bytes it was computed from, and what it wants.
    services: BTreeMap<String, (Vec<u8>, Wanted)>,
    ids: BTreeMap<String, u32>,
    next_id: u32,
    /// What the maps hold, as far as this sink knows (None until read once).
    programmed: Option<Programmed>,
}

/// The map contents this sink is responsible for.
#[derive(Debug, Default, PartialEq)]
struct Programmed {
    frontends: BTreeMap<LbFrontend, LbService>,
    ext_frontends: BTreeMap<LbFrontend, LbService>,
    backends: BTreeMap<u32, LbBackend>,
    /// Tables by service id; `None`: found referenced, contents unknown.
    tables: BTreeMap<u32, Option<Vec<u32>>>,
    backend_ports: BTreeSet<LbFrontend>,
    announced: BTreeSet<Ipv4Addr>,
    /// LoadBalancer and externalIPs addresses (local routes).
    local: BTreeSet<Ipv4Addr>,
}

/// What one service wants programmed.
#[derive(Debug, Clone)]
struct Wanted {
    frontends: Vec<(LbFrontend, LbService)>,
    /// NodePort (address 0.0.0.0), LoadBalancer and externalIPs frontends.
    ext_frontends: Vec<(LbFrontend, LbService)>,
    backends: Vec<(u32, LbBackend)>,
    table: Vec<u32>,
    algorithm: LbAlgorithm,
    /// (address, announcing node) of LoadBalancer and externalIPs frontends.
    announcers: Vec<(Ipv4Addr, String)>,
}

/// Read access to what an [`LbSink`] programmed, for the node API.
#[derive(Clone)]
pub struct LbView {
    maps: Arc<Mutex<dyn LbMaps>>,
    state: Arc<Mutex<ViewState>>,
}

#[derive(Debug, Default)]
struct ViewState {
    version: u64,
    /// `namespace/name` → (service id, algorithm).
    services: BTreeMap<String, (u32, LbAlgorithm)>,
}

/// A service's table as read back from the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgrammedTable {
    /// Version of the lb stream the maps were last reconciled to.
    pub version: u64,
    /// The service's algorithm.
    pub algorithm: LbAlgorithm,
    /// Backend address per slot (empty: no backend, connections refused).
    pub slots: Vec<Ipv4Addr>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data behind the lock: a panic elsewhere leaves it usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// === impl LbView ===

impl LbView {
    /// The table of `service` (`namespace/name`) as the maps hold it;
    /// `Ok(None)` when this node has no such service.
    pub fn table(&self, service: &str) -> Result<Option<ProgrammedTable>, String> {
        let (version, id, algorithm) = {
            let st = lock(&self.state);
            match st.services.get(service) {
                Some((id, alg)) => (st.version, *id, *alg),
                None => return Ok(None),
            }
        };
        let mut maps = lock(&self.maps);
        let ids = maps.table(id)?.unwrap_or_default();
        let backends: BTreeMap<u32, LbBackend> = maps.backends()?.into_iter().collect();
        let slots = ids
            .iter()
            .map(|b| {
                backends.get(b).map(|be| be.address).ok_or_else(|| {
                    format!("slot points to backend id {b}, which is not in the backend map")
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(ProgrammedTable {
            version,
            algorithm,
            slots,
        }))
    }
}

impl std::fmt::Debug for LbView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LbView").finish_non_exhaustive()
    }
}

// === impl LbSink ===

impl<M: LbMaps> LbSink<M> {
    /// A sink over `maps` for the node called `node`.
    pub fn new(node: impl Into<String>, maps: M) -> Self {
        let maps = Arc::new(Mutex::new(maps));
        let view = LbView {
            maps: maps.clone(),
            state: Arc::default(),
        };
        Self {
            node: node.into(),
            maps,
            view,
            services: BTreeMap::new(),
            ids: BTreeMap::new(),
            next_id: 1,
            programmed: None,
        }
    }

    /// Read access for the node API.
    pub fn view(&self) -> LbView {
        self.view.clone()
    }

    /// The maps (for tests and inspection).
    pub fn maps(&self) -> std::sync::MutexGuard<'_, M> {
        lock(&self.maps)
    }

    /// Makes the maps match `state` (every `service/…` key with its
    /// `backend/…` keys; backends inside the `ServiceState` count too).
    pub fn reconcile(&mut self, state: &BTreeMap<String, Any>) -> Result<(), String> {
        // What every service wants; unchanged services are not recomputed.
        let mut services = BTreeMap::new();
        for (key, any) in state.range("service/".to_owned()..) {
            if !key.starts_with("service/") {
                break;
            }
            // The service's backends travel as their own resources
            // (`backend/<ns>/<name>/<address>`); its fingerprint is its
            // bytes and theirs.
            let prefix = format!("backend/{}/", &key["service/".len()..]);
            let backends: Vec<(&String, &Any)> = state
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .collect();
            let mut bytes = any.value.clone();
            for (k, b) in &backends {
                bytes.extend_from_slice(k.as_bytes());
                bytes.extend_from_slice(&b.value);
            }
            if let Some((cached, w)) = self.services.remove(key)
                && cached == bytes
            {
                services.insert(key.clone(), (cached, w));
                continue;
            }
            let id = match self.ids.get(key) {
                Some(id) => *id,
                None => {
                    let id = self.next_id;
                    self.next_id += 1;
                    self.ids.insert(key.clone(), id);
                    id
                }
            };
            let mut svc: proto::ServiceState =
                any.to_msg().map_err(|e| format!("decode `{key}`: {e}"))?;
            for (k, b) in backends {
                svc.backends
                    .push(b.to_msg().map_err(|e| format!("decode `{k}`: {e}"))?);
            }
            services.insert(key.clone(), (bytes, want(key, id, &svc)?));
        }
        // Nothing is half-applied on a bad service: every service decoded
        // before the maps are touched. Its id is kept for the retry.
        self.services = services;
        self.ids.retain(|k, _| self.services.contains_key(k));

        let desired = self.desired();
        let mut maps = lock(&self.maps);
        let programmed = match self.programmed.take() {
            Some(p) => p,
            None => read_programmed(&mut *maps)?,
        };
        // On error the maps are in between: read them again next time.
        sync(&mut *maps, &programmed, &desired)?;
        self.programmed = Some(desired);
        drop(maps);
        let mut view = lock(&self.view.state);
        view.services = self
            .services
            .iter()
            .map(|(k, (_, w))| {
                let name = k.strip_prefix("service/").unwrap_or(k).to_string();
                (name, (self.ids[k], w.algorithm))
            })
            .collect();
        Ok(())
    }

    /// The map contents every service together wants.
    fn desired(&self) -> Programmed {
        let mut p = Programmed::default();
        for (key, (_, w)) in &self.services {
            let id = self.ids[key];
            p.backends.extend(w.backends.iter().copied());
            p.tables.insert(id, Some(w.table.clone()));
            p.frontends.extend(w.frontends.iter().copied());
            p.ext_frontends.extend(w.ext_frontends.iter().copied());
            p.local.extend(
                w.ext_frontends
                    .iter()
                    .map(|(f, _)| f.address)
                    .filter(|a| !a.is_unspecified()),
            );
            p.announced.extend(
                w.announcers
                    .iter()
                    .filter(|(_, n)| *n == self.node)
                    .map(|(a, _)| *a),
            );
            // Backend ports of services with external frontends (for
            // requests another node SNATed to them: lib/nodeport.h).
            for (f, s) in &w.ext_frontends {
                for (_, b) in &w.backends {
                    p.backend_ports.insert(LbFrontend {
                        address: b.address,
                        port: if b.port != 0 { b.port } else { s.target_port },
                        protocol: f.protocol,
                    });
                }
            }
        }
        p
    }
}

/// What the maps hold now (tables only as referenced ids).
fn read_programmed<M: LbMaps + ?Sized>(maps: &mut M) -> Result<Programmed, String> {
    let mut p = Programmed::default();
    for (f, s) in maps.frontends()? {
        p.tables.insert(s.service_id, None);
        p.frontends.insert(f, s);
    }
    for (f, s) in maps.ext_frontends()? {
        p.tables.insert(s.service_id, None);
        p.ext_frontends.insert(f, s);
    }
    for (id, b) in maps.backends()? {
        p.backends.insert(id, b);
    }
    p.backend_ports = maps.backend_ports()?.into_iter().collect();
    p.announced = maps.announced()?.into_iter().collect();
    p.local = maps.local_addresses()?.into_iter().collect();
    Ok(p)
}

/// Writes the difference between `have` and `want`: backends and tables
/// first, then the frontends that use them; removals last.
fn sync<M: LbMaps + ?Sized>(
    maps: &mut M,
    have: &Programmed,
    want: &Programmed,
) -> Result<(), String> {
    for (id, b) in &want.backends {
        if have.backends.get(id) != Some(b) {
            maps.upsert_backend(*id, *b)?;
        }
    }
    // One batch: the kernel waits for readers once per batch of tables.
    let tables: Vec<(u32, &[u32])> = want
        .tables
        .iter()
        .filter(|(id, t)| have.tables.get(id) != Some(t))
        .map(|(id, t)| (*id, t.as_deref().unwrap_or_default()))
        .collect();
    if !tables.is_empty() {
        maps.set_tables(&tables)?;
    }
    for (f, s) in &want.frontends {
        if have.frontends.get(f) != Some(s) {
            maps.upsert_service(*f, *s)?;
        }
    }
    for (f, s) in &want.ext_frontends {
        if have.ext_frontends.get(f) != Some(s) {
            maps.upsert_ext_service(*f, *s)?;
        }
    }
    for p in want.backend_ports.difference(&have.backend_ports) {
        maps.upsert_backend_port(*p)?;
    }
    for p in have.backend_ports.difference(&want.backend_ports) {
        maps.remove_backend_port(*p)?;
    }
    for a in want.local.difference(&have.local) {
        maps.add_local(*a)?;
    }
    for a in have.local.difference(&want.local) {
        maps.remove_local(*a)?;
    }
    // Announced only once the frontend is programmed, withdrawn before it goes.
    for a in want.announced.difference(&have.announced) {
        maps.announce(*a)?;
    }
    for a in have.announced.difference(&want.announced) {
        maps.withdraw(*a)?;
    }
    for f in have.ext_frontends.keys() {
        if !want.ext_frontends.contains_key(f) {
            maps.remove_ext_service(*f)?;
        }
    }
    for f in have.frontends.keys() {
        if !want.frontends.contains_key(f) {
            maps.remove_service(*f)?;
        }
    }
    let gone: Vec<u32> = have
        .tables
        .keys()
        .filter(|id| !want.tables.contains_key(id))
        .copied()
        .collect();
    if !gone.is_empty() {
        maps.remove_tables(&gone)?;
    }
    for id in have.backends.keys() {
        if !want.backends.contains_key(id) {
            maps.remove_backend(*id)?;
        }
    }
    Ok(())
}

impl<M: LbMaps> StateSink for LbSink<M> {
    async fn apply(
        &mut self,
        version: u64,
        state: &BTreeMap<String, Any>,
        _changed: &[String],
    ) -> Result<(), String> {
        self.reconcile(state)?;
        lock(&self.view.state).version = version;
        tracing::debug!(version, services = self.ids.len(), "service lb reconciled");
        Ok(())
    }
}

fn want(key: &str, id: u32, svc: &proto::ServiceState) -> Result<Wanted, String> {
    let algorithm = match proto::Algorithm::try_from(svc.algorithm) {
        Ok(proto::Algorithm::Random) => LbAlgorithm::Random,
        _ => LbAlgorithm::Maglev,
    };
    let mut backends = Vec::new();
    let mut weighted = Vec::new();
    for b in &svc.backends {
        let address: Ipv4Addr = b
            .address
            .parse()
            .map_err(|_| format!("`{key}`: backend address `{}`", b.address))?;
        backends.push((b.id, LbBackend { address, port: 0 }));
        weighted.push((
            b.id,
            Weighted {
                address,
                weight: b.weight,
            },
        ));
    }
    let table = match algorithm {
        LbAlgorithm::Random => weighted
            .iter()
            .filter(|(_, w)| w.weight > 0)
            .map(|(id, _)| *id)
            .collect(),
        LbAlgorithm::Maglev => {
            let params = svc.maglev.clone().unwrap_or_default();
            let m = if params.table_size == 0 {
                TableSize::default()
            } else {
                TableSize::new(
                    &format!("{key}: maglev.table_size"),
                    params.table_size.into(),
                )
                .map_err(|e| e.to_string())?
            };
            let seed = Seed::from_base64(&format!("{key}: maglev.seed"), &params.seed)
                .map_err(|e| e.to_string())?;
            let w: Vec<Weighted> = weighted.iter().map(|(_, w)| *w).collect();
            let t = maglev::build(&w, seed, m);
            let by_addr: BTreeMap<Ipv4Addr, u32> =
                weighted.iter().map(|(id, w)| (w.address, *id)).collect();
            t.slots
                .iter()
                .map(|i| by_addr[&t.backends[*i as usize].address])
                .collect()
        }
    };
    let mut frontends = Vec::new();
    let mut ext_frontends = Vec::new();
    let mut announcers = Vec::new();
    for f in &svc.frontends {
        let external = match proto::FrontendKind::try_from(f.kind) {
            Ok(proto::FrontendKind::ClusterIp) => false,
            Ok(
                proto::FrontendKind::NodePort
                | proto::FrontendKind::LoadBalancer
                | proto::FrontendKind::ExternalIp,
            ) => true,
            _ => continue,
        };
        let address: Ipv4Addr =
            if f.kind == proto::FrontendKind::NodePort as i32 && f.address.is_empty() {
                Ipv4Addr::UNSPECIFIED // every node: bpf_host matches its own address
            } else {
                f.address
                    .parse()
                    .map_err(|_| format!("`{key}`: frontend address `{}`", f.address))?
            };
        let protocol = if f.protocol == proto::Protocol::Udp as i32 {
            LbProtocol::Udp
        } else {
            LbProtocol::Tcp
        };
        let port = u16::try_from(f.port).map_err(|_| format!("`{key}`: port {}", f.port))?;
        let target = u16::try_from(f.target_port)
            .map_err(|_| format!("`{key}`: target port {}", f.target_port))?;
        if !f.announcer.is_empty() && !address.is_unspecified() {
            announcers.push((address, f.announcer.clone()));
        }
        let entry = (
            LbFrontend {
                address,
                port,
                protocol,
            },
            LbService {
                service_id: id,
                algorithm,
                target_port: if target == 0 { port } else { target },
                hash_source_address_only: svc.hash_source_address_only,
                affinity_timeout_secs: svc.affinity_timeout_seconds,
            },
        );
        // Pods reach LoadBalancer and external addresses at the socket too
        // (as Cilium does): their connects never leave the node untranslated.
        if !external || !address.is_unspecified() {
            frontends.push(entry);
        }
        if external {
            ext_frontends.push(entry);
        }
    }
    Ok(Wanted {
        frontends,
        ext_frontends,
        backends,
        table,
        algorithm,
        announcers,
    })
}

/// The node's lb maps: `bpf_sock`'s and the shared ones ([`SockLb`]), and
/// the underlay's announced addresses ([`L2Announcer`]).
#[derive(Debug)]
pub struct NodeLbMaps {
    /// Services, backends, tables.
    pub sock: SockLb,
    /// ARP answers on the underlay.
    pub l2: L2Announcer,
}

impl LbMaps for NodeLbMaps {
    fn frontends(&mut self) -> Result<Vec<(LbFrontend, LbService)>, String> {
        self.sock.frontends()
    }
    fn backends(&mut self) -> Result<Vec<(u32, LbBackend)>, String> {
        LbMaps::backends(&mut self.sock)
    }
    fn table(&mut self, service_id: u32) -> Result<Option<Vec<u32>>, String> {
        LbMaps::table(&mut self.sock, service_id)
    }
    fn upsert_backend(&mut self, id: u32, backend: LbBackend) -> Result<(), String> {
        LbMaps::upsert_backend(&mut self.sock, id, backend)
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), String> {
        LbMaps::remove_backend(&mut self.sock, id)
    }
    fn set_table(&mut self, service_id: u32, backend_ids: &[u32]) -> Result<(), String> {
        LbMaps::set_table(&mut self.sock, service_id, backend_ids)
    }
    fn remove_table(&mut self, service_id: u32) -> Result<(), String> {
        LbMaps::remove_table(&mut self.sock, service_id)
    }
    fn set_tables(&mut self, tables: &[(u32, &[u32])]) -> Result<(), String> {
        LbMaps::set_tables(&mut self.sock, tables)
    }
    fn remove_tables(&mut self, service_ids: &[u32]) -> Result<(), String> {
        LbMaps::remove_tables(&mut self.sock, service_ids)
    }
    fn upsert_service(&mut self, frontend: LbFrontend, service: LbService) -> Result<(), String> {
        LbMaps::upsert_service(&mut self.sock, frontend, service)
    }
    fn remove_service(&mut self, frontend: LbFrontend) -> Result<(), String> {
        LbMaps::remove_service(&mut self.sock, frontend)
    }
    fn ext_frontends(&mut self) -> Result<Vec<(LbFrontend, LbService)>, String> {
        self.sock.ext_frontends()
    }
    fn upsert_ext_service(
        &mut self,
        frontend: LbFrontend,
        service: LbService,
    ) -> Result<(), String> {
        LbMaps::upsert_ext_service(&mut self.sock, frontend, service)
    }
    fn remove_ext_service(&mut self, frontend: LbFrontend) -> Result<(), String> {
        LbMaps::remove_ext_service(&mut self.sock, frontend)
    }
    fn backend_ports(&mut self) -> Result<Vec<LbFrontend>, String> {
        LbMaps::backend_ports(&mut self.sock)
    }
    fn upsert_backend_port(&mut self, port: LbFrontend) -> Result<(), String> {
        LbMaps::upsert_backend_port(&mut self.sock, port)
    }
    fn remove_backend_port(&mut self, port: LbFrontend) -> Result<(), String> {
        LbMaps::remove_backend_port(&mut self.sock, port)
    }
    fn announced(&mut self) -> Result<Vec<Ipv4Addr>, String> {
        self.l2.announced().map_err(|e| format!("{e:#}"))
    }
    fn announce(&mut self, address: Ipv4Addr) -> Result<(), String> {
        self.l2.announce(address).map_err(|e| format!("{e:#}"))
    }
    fn withdraw(&mut self, address: Ipv4Addr) -> Result<(), String> {
        self.l2
            .withdraw(address)
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    }
    fn local_addresses(&mut self) -> Result<Vec<Ipv4Addr>, String> {
        service_routes::list().map_err(|e| e.to_string())
    }
    fn add_local(&mut self, address: Ipv4Addr) -> Result<(), String> {
        service_routes::add(address).map_err(|e| e.to_string())
    }
    fn remove_local(&mut self, address: Ipv4Addr) -> Result<(), String> {
        service_routes::remove(address).map_err(|e| e.to_string())
    }
}

// === impl LbMaps for SockLb ===

impl LbMaps for SockLb {
    fn frontends(&mut self) -> Result<Vec<(LbFrontend, LbService)>, String> {
        self.services().map_err(|e| format!("{e:#}"))
    }
    fn backends(&mut self) -> Result<Vec<(u32, LbBackend)>, String> {
        SockLb::backends(self).map_err(|e| format!("{e:#}"))
    }
    fn table(&mut self, service_id: u32) -> Result<Option<Vec<u32>>, String> {
        SockLb::table(self, service_id).map_err(|e| format!("{e:#}"))
    }
    fn upsert_backend(&mut self, id: u32, backend: LbBackend) -> Result<(), String> {
        SockLb::upsert_backend(self, id, backend).map_err(|e| format!("{e:#}"))
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), String> {
        SockLb::remove_backend(self, id)
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    }
    fn set_table(&mut self, service_id: u32, backend_ids: &[u32]) -> Result<(), String> {
        SockLb::set_table(self, service_id, backend_ids).map_err(|e| format!("{e:#}"))
    }
    fn remove_table(&mut self, service_id: u32) -> Result<(), String> {
        SockLb::remove_table(self, service_id)
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    }
    fn set_tables(&mut self, tables: &[(u32, &[u32])]) -> Result<(), String> {
        SockLb::set_tables(self, tables).map_err(|e| error_chain(&e))
    }
    fn remove_tables(&mut self, service_ids: &[u32]) -> Result<(), String> {
        SockLb::remove_tables(self, service_ids)
            .map(drop)
            .map_err(|e| error_chain(&e))
    }
    fn upsert_service(&mut self, frontend: LbFrontend, service: LbService) -> Result<(), String> {
        SockLb::upsert_service(self, frontend, service).map_err(|e| format!("{e:#}"))
    }
    fn remove_service(&mut self, frontend: LbFrontend) -> Result<(), String> {
        SockLb::remove_service(self, frontend)
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    }
    fn ext_frontends(&mut self) -> Result<Vec<(LbFrontend, LbService)>, String> {
        self.ext_services().map_err(|e| format!("{e:#}"))
    }
    fn upsert_ext_service(
        &mut self,
        frontend: LbFrontend,
        service: LbService,
    ) -> Result<(), String> {
        SockLb::upsert_ext_service(self, frontend, service).map_err(|e| format!("{e:#}"))
    }
    fn remove_ext_service(&mut self, frontend: LbFrontend) -> Result<(), String> {
        SockLb::remove_ext_service(self, frontend)
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    }
    fn backend_ports(&mut self) -> Result<Vec<LbFrontend>, String> {
        SockLb::backend_ports(self).map_err(|e| format!("{e:#}"))
    }
    fn upsert_backend_port(&mut self, port: LbFrontend) -> Result<(), String> {
        SockLb::upsert_backend_port(self, port).map_err(|e| format!("{e:#}"))
    }
    fn remove_backend_port(&mut self, port: LbFrontend) -> Result<(), String> {
        SockLb::remove_backend_port(self, port)
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    }
}

/// `e: its source: …`: which tables a batch left out, and why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct FakeMaps {
        services: BTreeMap<LbFrontend, LbService>,
        backends: BTreeMap<u32, LbBackend>,
        tables: BTreeMap<u32, Vec<u32>>,
        writes: usize,
        /// Calls of `set_tables` and `remove_tables`, with their sizes.
        table_batches: Vec<(&'static str, usize)>,
    }

    impl LbMaps for FakeMaps {
        fn frontends(&mut self) -> Result<Vec<(LbFrontend, LbService)>, String> {
            Ok(self.services.iter().map(|(f, s)| (*f, *s)).collect())
        }
        fn backends(&mut self) -> Result<Vec<(u32, LbBackend)>, String> {
            Ok(self.backends.iter().map(|(i, b)| (*i, *b)).collect())
        }
        fn table(&mut self, id: u32) -> Result<Option<Vec<u32>>, String> {
            Ok(self.tables.get(&id).cloned())
        }
        fn upsert_backend(&mut self, id: u32, b: LbBackend) -> Result<(), String> {
            self.writes += 1;
            self.backends.insert(id, b);
            Ok(())
        }
        fn remove_backend(&mut self, id: u32) -> Result<(), String> {
            self.backends.remove(&id);
            Ok(())
        }
        fn set_table(&mut self, id: u32, ids: &[u32]) -> Result<(), String> {
            self.writes += 1;
            self.tables.insert(id, ids.to_vec());
            Ok(())
        }
        fn remove_table(&mut self, id: u32) -> Result<(), String> {
            self.tables.remove(&id);
            Ok(())
        }
        fn set_tables(&mut self, tables: &[(u32, &[u32])]) -> Result<(), String> {
            self.table_batches.push(("set", tables.len()));
            for (id, ids) in tables {
                self.set_table(*id, ids)?;
            }
            Ok(())
        }
        fn remove_tables(&mut self, ids: &[u32]) -> Result<(), String> {
            self.table_batches.push(("remove", ids.len()));
            for id in ids {
                self.remove_table(*id)?;
            }
            Ok(())
        }
        fn upsert_service(&mut self, f: LbFrontend, s: LbService) -> Result<(), String> {
            self.writes += 1;
            self.services.insert(f, s);
            Ok(())
        }
        fn remove_service(&mut self, f: LbFrontend) -> Result<(), String> {
            self.services.remove(&f);
            Ok(())
        }
    }

    fn service(backends: &[(u32, &str)]) -> (String, Any) {
        named("web", "10.96.0.10", backends, 0)
    }

    fn service_with_affinity(backends: &[(u32, &str)], timeout_secs: u32) -> (String, Any) {
        named("web", "10.96.0.10", backends, timeout_secs)
    }

    fn named(
        name: &str,
        cluster_ip: &str,
        backends: &[(u32, &str)],
        timeout_secs: u32,
    ) -> (String, Any) {
        let msg = proto::ServiceState {
            namespace: "default".into(),
            name: name.into(),
            frontends: vec![proto::Frontend {
                kind: proto::FrontendKind::ClusterIp as i32,
                address: cluster_ip.into(),
                port: 80,
                protocol: proto::Protocol::Tcp as i32,
                port_name: String::new(),
                target_port: 8080,
                announcer: String::new(),
            }],
            algorithm: proto::Algorithm::Maglev as i32,
            hash_source_address_only: false,
            affinity_timeout_seconds: timeout_secs,
            backends: backends
                .iter()
                .map(|(id, a)| proto::Backend {
                    id: *id,
                    address: (*a).into(),
                    weight: 1,
                    source: String::new(),
                })
                .collect(),
            maglev: Some(proto::MaglevParams {
                table_size: 251,
                seed: Seed::from_bytes(*b"membrane-lb!").to_base64(),
            }),
        };
        (
            format!("service/default/{name}"),
            Any::from_msg(&msg).expect("encode"),
        )
    }

    #[test]
    fn a_cluster_ip_service_programs_its_frontend_backends_and_maglev_table() {
        let mut sink = LbSink::new("node-1", FakeMaps::default());
        let state = BTreeMap::from([service(&[(1, "10.244.1.5"), (2, "10.244.2.7")])]);
        sink.reconcile(&state).expect("reconcile");
        let maps = sink.maps();
        let (f, s) = maps.services.iter().next().expect("frontend");
        assert_eq!(
            (f.address, f.port, s.target_port),
            (Ipv4Addr::new(10, 96, 0, 10), 80, 8080)
        );
        let table = &maps.tables[&s.service_id];
        assert_eq!(table.len(), 251);
        assert!(table.contains(&1) && table.contains(&2));
        assert_eq!(maps.backends.len(), 2);
    }

    #[test]
    fn a_client_ip_affinity_timeout_is_programmed_on_the_frontend_and_zero_means_none() {
        let mut sink = LbSink::new("node-1", FakeMaps::default());
        let backends = [(1, "10.244.1.5")];
        sink.reconcile(&BTreeMap::from([service_with_affinity(&backends, 10800)]))
            .expect("reconcile");
        let timeouts = |sink: &LbSink<FakeMaps>| {
            sink.maps()
                .services
                .values()
                .map(|s| s.affinity_timeout_secs)
                .collect::<Vec<_>>()
        };
        assert_eq!(timeouts(&sink), [10800]);
        sink.reconcile(&BTreeMap::from([service(&backends)]))
            .expect("reconcile");
        assert_eq!(timeouts(&sink), [0]);
    }

    #[test]
    fn a_removed_backend_leaves_the_table_and_the_backend_map_and_a_removed_service_everything() {
        let mut sink = LbSink::new("node-1", FakeMaps::default());
        sink.reconcile(&BTreeMap::from([service(&[
            (1, "10.244.1.5"),
            (2, "10.244.2.7"),
        ])]))
        .expect("reconcile");
        sink.reconcile(&BTreeMap::from([service(&[(1, "10.244.1.5")])]))
            .expect("reconcile");
        let maps = sink.maps();
        assert!(maps.tables.values().all(|t| t.iter().all(|id| *id == 1)));
        assert_eq!(maps.backends.keys().copied().collect::<Vec<_>>(), vec![1]);
        drop(maps);
        sink.reconcile(&BTreeMap::new()).expect("reconcile");
        let maps = sink.maps();
        assert!(maps.services.is_empty() && maps.tables.is_empty() && maps.backends.is_empty());
    }

    #[test]
    fn a_change_to_one_service_rewrites_only_that_service_and_the_view_reads_the_maps_back() {
        let mut sink = LbSink::new("node-1", FakeMaps::default());
        let web = service(&[(1, "10.244.1.5"), (2, "10.244.2.7")]);
        let db = named("db", "10.96.0.11", &[(3, "10.244.1.9")], 0);
        sink.reconcile(&BTreeMap::from([web.clone(), db.clone()]))
            .expect("reconcile");
        let before = sink.maps().writes;
        sink.reconcile(&BTreeMap::from([web.clone(), db.clone()]))
            .expect("reconcile");
        assert_eq!(
            sink.maps().writes,
            before,
            "nothing changed, nothing written"
        );
        let db2 = named(
            "db",
            "10.96.0.11",
            &[(3, "10.244.1.9"), (4, "10.244.2.3")],
            0,
        );
        sink.reconcile(&BTreeMap::from([web, db2]))
            .expect("reconcile");
        // One backend and one table: the web service is not touched.
        assert_eq!(sink.maps().writes, before + 2);
        let table = sink
            .view()
            .table("default/db")
            .expect("read")
            .expect("programmed");
        assert_eq!(table.slots.len(), 251);
        let owners: BTreeSet<Ipv4Addr> = table.slots.iter().copied().collect();
        assert_eq!(
            owners,
            BTreeSet::from([Ipv4Addr::new(10, 244, 1, 9), Ipv4Addr::new(10, 244, 2, 3)])
        );
        assert_eq!(sink.view().table("default/nope").expect("read"), None);
    }

    #[test]
    fn leftovers_of_a_previous_agent_are_removed_on_the_first_apply() {
        let mut maps = FakeMaps::default();
        let stale = LbFrontend {
            address: Ipv4Addr::new(10, 96, 9, 9),
            port: 53,
            protocol: LbProtocol::Udp,
        };
        maps.services.insert(
            stale,
            LbService {
                service_id: 40,
                algorithm: LbAlgorithm::Random,
                target_port: 53,
                hash_source_address_only: false,
                affinity_timeout_secs: 0,
            },
        );
        maps.tables.insert(40, vec![9]);
        maps.backends.insert(
            9,
            LbBackend {
                address: Ipv4Addr::new(10, 244, 9, 9),
                port: 0,
            },
        );
        let mut sink = LbSink::new("node-1", maps);
        sink.reconcile(&BTreeMap::from([service(&[(1, "10.244.1.5")])]))
            .expect("reconcile");
        let maps = sink.maps();
        assert!(!maps.services.contains_key(&stale));
        assert!(!maps.tables.contains_key(&40));
        assert_eq!(maps.backends.keys().copied().collect::<Vec<_>>(), vec![1]);
    }

    /// `(key, any)` of a service split as the lb service publishes it.
    fn split((key, any): (String, Any)) -> Vec<(String, Any)> {
        let mut svc: proto::ServiceState = any.to_msg().expect("decode");
        let name = key
            .strip_prefix("service/")
            .expect("service key")
            .to_string();
        let backends = std::mem::take(&mut svc.backends);
        let mut out = vec![(key, Any::from_msg(&svc).expect("encode"))];
        for b in backends {
            out.push((
                format!("backend/{name}/{}", b.address),
                Any::from_msg(&b).expect("encode"),
            ));
        }
        out
    }

    #[test]
    fn backends_published_as_their_own_resources_join_their_service() {
        let mut sink = LbSink::new("node-1", FakeMaps::default());
        let two = split(service(&[(1, "10.244.1.5"), (2, "10.244.2.7")]));
        let mut state: BTreeMap<String, Any> = two.into_iter().collect();
        // A service whose name extends "web" must not take web's backends.
        state.extend(split(named("web2", "10.96.0.12", &[(5, "10.244.5.5")], 0)));
        sink.reconcile(&state).expect("reconcile");
        let owners = |sink: &LbSink<FakeMaps>, svc: &str| -> BTreeSet<Ipv4Addr> {
            let t = sink.view().table(svc).expect("read").expect("programmed");
            t.slots.into_iter().collect()
        };
        assert_eq!(
            owners(&sink, "default/web"),
            BTreeSet::from([Ipv4Addr::new(10, 244, 1, 5), Ipv4Addr::new(10, 244, 2, 7)])
        );
        assert_eq!(
            owners(&sink, "default/web2"),
            BTreeSet::from([Ipv4Addr::new(10, 244, 5, 5)])
        );
        let before = sink.maps().writes;
        state.remove("backend/default/web/10.244.2.7");
        sink.reconcile(&state).expect("reconcile");
        assert_eq!(
            owners(&sink, "default/web"),
            BTreeSet::from([Ipv4Addr::new(10, 244, 1, 5)])
        );
        assert_eq!(
            sink.maps().writes,
            before + 1,
            "one table swapped, nothing else written"
        );
    }

    #[test]
    fn a_reconcile_swaps_every_changed_table_in_one_batch_and_removes_the_gone_ones_in_another() {
        let mut sink = LbSink::new("node-1", FakeMaps::default());
        let services = |names: &[&str]| -> BTreeMap<String, Any> {
            names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let ip = format!("10.96.1.{}", i + 1);
                    let backend = format!("10.244.1.{}", i + 1);
                    named(name, &ip, &[(i as u32 + 1, backend.as_str())], 0)
                })
                .collect()
        };
        sink.reconcile(&services(&["a", "b", "c", "d"]))
            .expect("reconcile");
        assert_eq!(sink.maps().table_batches, [("set", 4)]);
        assert_eq!(sink.maps().tables.len(), 4);

        sink.maps().table_batches.clear();
        sink.reconcile(&services(&["a", "b"])).expect("reconcile");
        assert_eq!(sink.maps().table_batches, [("remove", 2)]);
        assert_eq!(sink.maps().tables.len(), 2);

        sink.maps().table_batches.clear();
        sink.reconcile(&services(&["a", "b"])).expect("reconcile");
        assert!(
            sink.maps().table_batches.is_empty(),
            "nothing changed: no batch at all"
        );
    }
}
