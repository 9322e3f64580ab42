// SPDX-License-Identifier: Apache-2.0
//! Socket-level service load balancing: `bpf/bpf_sock.c` (cgroup
//! connect4/sendmsg4/recvmsg4/getpeername4) and its maps (`bpf/lib/lb.h`).
//!
//! [`SockLb`] loads the object (adopting the maps pinned under
//! `<pin_dir>/lb/v<SOCK_LB_LAYOUT_VERSION>/`), attaches its programs to a
//! cgroup v2 with pinned links (`<pin_dir>/links/sock_<hook>_<cgroup inode>`),
//! so the hooks stay when the agent exits, and programs services, backends
//! and per-service tables. A table (Maglev slots, or the backend list for
//! `random`, followed by its sorted member list for session affinity) is a
//! new inner array swapped into `mb_lb_tables` in one update.
//!
//! Programming many tables is dominated by two kernel costs, so both are
//! batched (`batch.rs`) where the kernel allows it ([`TableBatching`],
//! probed at load): an inner array is filled in one `BPF_MAP_UPDATE_BATCH`
//! instead of one update per slot (M = 16381 for a large Maglev table), and
//! [`SockLb::set_tables`] / [`SockLb::remove_tables`] swap many inner
//! arrays into (out of) `mb_lb_tables` per call, because the kernel waits
//! for a `synchronize_rcu()` after every write to a map-of-maps, batch or
//! single element alike (8–16 ms here). Each key of a batch is still
//! one pointer swap: readers see a service's old table or its new one.

use std::{
    collections::BTreeSet,
    fmt, fs, io,
    net::Ipv4Addr,
    os::{
        fd::{AsFd as _, AsRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, HashOfMaps, IterableMap as _, Map, MapData, MapError},
    pin::PinError,
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError,
        links::{FdLink, LinkError, PinnedLink},
    },
};

/// Bump with `SOCK_LB_LAYOUT_VERSION` in `bpf/lib/lb.h`.
pub const SOCK_LB_LAYOUT_VERSION: u32 = 2;

/// `BPF_F_INNER_MAP`: inner arrays of different sizes share one template.
const BPF_F_INNER_MAP: u32 = 1 << 12;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const LB_ALG_RANDOM: u8 = 1;
const LB_ALG_MAGLEV: u8 = 2;
const LB_F_HASH_SADDR_ONLY: u8 = 0x1;
/// The most slots a table may have: the largest Maglev M is 131071 and a
/// `random` table lists at most the 65536 backends `mb_lb_backends` holds,
/// so this only bounds what a caller's bug could ask the kernel to
/// allocate (at most 8 MiB for one inner array: slots and members).
pub const MAX_TABLE_SLOTS: usize = 1 << 20;
/// Tables swapped into `mb_lb_tables` per `BPF_MAP_UPDATE_BATCH`: every
/// batch costs one `synchronize_rcu()`, and until it is made each table
/// holds an open fd (its inner array), while the agent may run with the
/// common soft limit of 1,024 open files.
const TABLES_PER_BATCH: usize = 512;

/// The programs of `bpf_sock`, in attach order.
const PROGRAMS: [&str; 4] = [
    "sock4_connect",
    "sock4_sendmsg",
    "sock4_recvmsg",
    "sock4_getpeername",
];

// === ABI mirrors of bpf/lib/lb.h ===

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ServiceKey {
    address: [u8; 4],
    port: [u8; 2],
    proto: u8,
    pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ServiceValue {
    service_id: u32,
    target_port: [u8; 2],
    algorithm: u8,
    flags: u8,
    affinity_timeout: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct BackendValue {
    address: [u8; 4],
    port: [u8; 2],
    pad: [u8; 2],
}

// SAFETY: plain `#[repr(C)]` structs of integers with explicit padding
// fields (no implicit holes), valid for every bit pattern.
#[allow(unsafe_code, reason = "aya's Pod is an unsafe marker trait")]
mod pod {
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::BackendValue {}
}

// === Public types ===

/// Transport protocol of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LbProtocol {
    /// TCP.
    Tcp,
    /// UDP (connected: connect4; unconnected: sendmsg4/recvmsg4).
    Udp,
}

impl LbProtocol {
    fn ip_proto(self) -> u8 {
        match self {
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
        }
    }
}

/// How a service picks a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LbAlgorithm {
    /// `bpf_get_prandom_u32() % n` over the backend list.
    Random,
    /// The flow hash indexes the service's Maglev table.
    Maglev,
}

/// A service frontend: what a pod connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbFrontend {
    /// The ClusterIP.
    pub address: Ipv4Addr,
    /// The service port.
    pub port: u16,
    /// The protocol.
    pub protocol: LbProtocol,
}

/// What a frontend leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbService {
    /// The table this frontend uses (shared by all frontends of a service).
    pub service_id: u32,
    /// How the backend is picked.
    pub algorithm: LbAlgorithm,
    /// The port on the backend when the backend entry has none (0: the frontend's port).
    pub target_port: u16,
    /// Maglev on the source address only (client stickiness).
    pub hash_source_address_only: bool,
    /// ClientIP session affinity timeout in seconds (0: no affinity): a
    /// client's new connections go to the backend its previous one got
    /// while that was less than this long ago and the backend is still in
    /// the table. The client is the pod (its network namespace) for the
    /// socket hooks, the source address for external frontends at tc.
    pub affinity_timeout_secs: u32,
}

/// A backend as the datapath sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbBackend {
    /// Address.
    pub address: Ipv4Addr,
    /// Port (0: the service's target port).
    pub port: u16,
}

/// Errors of the socket load balancer.
#[derive(Debug, thiserror::Error)]
pub enum SockLbError {
    /// The pin directory could not be created.
    #[error("create pin directory {}", path.display())]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The object did not load.
    #[error("load eBPF object `bpf_sock`")]
    Load(#[source] Box<aya::EbpfError>),
    /// A program is missing or did not load/attach.
    #[error("program `{program}` of `bpf_sock`")]
    Program {
        /// The program.
        program: &'static str,
        /// The cause.
        #[source]
        source: Box<ProgramError>,
    },
    /// A map is missing or has an unexpected type.
    #[error("map `{map}` of `bpf_sock`")]
    Map {
        /// The map.
        map: &'static str,
        /// The cause.
        #[source]
        source: Box<MapError>,
    },
    /// A cgroup could not be opened.
    #[error("open cgroup {}", path.display())]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A link could not be pinned or replaced.
    #[error("pin link {}", path.display())]
    Pin {
        /// The pin.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A table has more than [`MAX_TABLE_SLOTS`] slots.
    #[error("table of service {service_id} has {len} slots (at most {MAX_TABLE_SLOTS})")]
    TableTooLarge {
        /// The service id.
        service_id: u32,
        /// The slots asked for.
        len: usize,
    },
    /// A batch command failed (see [`SockLbError::TablesNotApplied`] for
    /// which tables it left out).
    #[error("{command} on map `{map}`")]
    Batch {
        /// The map.
        map: &'static str,
        /// The `bpf(2)` command.
        command: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// [`SockLb::set_tables`] stopped part-way: the tables before these
    /// services' were swapped in; these services keep the table they had
    /// (or none).
    #[error("tables of {} of {total} services not applied (kept as they were): services {not_applied}", not_applied.0.len())]
    TablesNotApplied {
        /// The services whose table was not swapped in, in the order given.
        not_applied: ServiceIds,
        /// How many tables the call had.
        total: usize,
        /// What stopped it.
        #[source]
        source: Box<SockLbError>,
    },
    /// [`SockLb::remove_tables`] stopped part-way: these services' tables
    /// were not removed (the others were).
    #[error("tables of {} of {total} services not removed: services {not_removed}", not_removed.0.len())]
    TablesNotRemoved {
        /// The services whose table is still there, in the order given.
        not_removed: ServiceIds,
        /// How many tables the call had.
        total: usize,
        /// What stopped it.
        #[source]
        source: Box<SockLbError>,
    },
}

/// Service ids named by an error; shows the first few.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceIds(pub Vec<u32>);

impl fmt::Display for ServiceIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 8;
        for (i, id) in self.0.iter().take(SHOWN).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{id}")?;
        }
        if self.0.len() > SHOWN {
            write!(f, " and {} more", self.0.len() - SHOWN)?;
        }
        Ok(())
    }
}

/// Which batch commands the lb tables use, as probed at load (a kernel
/// without them, before 5.6, gets one update per slot and per table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableBatching {
    /// An inner array is filled with one `BPF_MAP_UPDATE_BATCH`.
    pub fill: bool,
    /// Tables are swapped into `mb_lb_tables` with `BPF_MAP_UPDATE_BATCH`.
    pub swap: bool,
    /// Tables are removed from `mb_lb_tables` with `BPF_MAP_DELETE_BATCH`.
    pub remove: bool,
}

impl TableBatching {
    /// One syscall per slot and per table: what a kernel without batch
    /// commands gets.
    pub const NONE: Self = Self {
        fill: false,
        swap: false,
        remove: false,
    };
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> SockLbError {
    move |e| SockLbError::Map {
        map,
        source: Box::new(e),
    }
}

// === impl SockLb ===

/// The loaded `bpf_sock` object and its maps.
pub struct SockLb {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// Frontends reached from outside the node (NodePort with address
    /// 0.0.0.0 = this node's underlay address, LoadBalancer, externalIPs):
    /// read by bpf_host at tc, never by the socket hooks.
    ext_services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// (backend address, target port, protocol) of services with external
    /// frontends (see `mb_lb_be_ports` in lib/lb.h).
    be_ports: HashMap<MapData, ServiceKey, u32>,
    backends: HashMap<MapData, u32, BackendValue>,
    tables: HashOfMaps<MapData, u32, Array<MapData, u32>>,
    /// A second fd of `mb_lb_tables` for the batch commands (aya's
    /// `HashOfMaps` does not lend its own).
    tables_fd: OwnedFd,
    /// What the kernel supports (probed at load).
    batching_probed: TableBatching,
    /// What is used (at most the probed).
    batching: TableBatching,
}

impl std::fmt::Debug for SockLb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SockLb")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl SockLb {
    /// Loads `bpf_sock`, adopting maps pinned under
    /// `<pin_dir>/lb/v<SOCK_LB_LAYOUT_VERSION>/` (created if missing).
    pub fn load(pin_dir: &Path) -> Result<Self, SockLbError> {
        let map_dir = Self::map_dir_of(pin_dir);
        for dir in [&map_dir, &pin_dir.join("links")] {
            fs::create_dir_all(dir).map_err(|source| SockLbError::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&map_dir)
            .load(super::objects::SOCK)
            .map_err(|e| SockLbError::Load(Box::new(e)))?;
        for program in PROGRAMS {
            program_mut(&mut ebpf, program)?
                .load()
                .map_err(|e| SockLbError::Program {
                    program,
                    source: Box::new(e),
                })?;
        }
        let services = take_map(&mut ebpf, "mb_lb_services", HashMap::try_from)?;
        let ext_services = take_map(&mut ebpf, "mb_lb_ext_services", HashMap::try_from)?;
        let be_ports = take_map(&mut ebpf, "mb_lb_be_ports", HashMap::try_from)?;
        let backends = take_map(&mut ebpf, "mb_lb_backends", HashMap::try_from)?;
        let (tables, tables_fd) = take_map(&mut ebpf, "mb_lb_tables", |map| {
            let fd = match &map {
                Map::HashOfMaps(data) => Some(data.fd().as_fd().try_clone_to_owned()),
                _ => None,
            };
            let tables = HashOfMaps::try_from(map)?;
            // Some: the conversion above rejects every other map type.
            let fd = fd
                .ok_or(MapError::InvalidName {
                    name: "mb_lb_tables".into(),
                })?
                .map_err(|io_error| {
                    MapError::SyscallError(aya::sys::SyscallError {
                        call: "dup",
                        io_error,
                    })
                })?;
            Ok((tables, fd))
        })?;
        let batching_probed = probe_batching(&tables_fd)?;
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            services,
            ext_services,
            be_ports,
            backends,
            tables,
            tables_fd,
            batching_probed,
            batching: batching_probed,
        })
    }

    /// The batch commands the table writes use.
    pub fn table_batching(&self) -> TableBatching {
        self.batching
    }

    /// Limits the batch commands the table writes use (never beyond what
    /// the kernel has): [`TableBatching::NONE`] is the path of kernels
    /// without them, for benchmarks and tests.
    pub fn set_table_batching(&mut self, batching: TableBatching) {
        let p = self.batching_probed;
        self.batching = TableBatching {
            fill: batching.fill && p.fill,
            swap: batching.swap && p.swap,
            remove: batching.remove && p.remove,
        };
    }

    /// Where the maps are pinned.
    pub fn map_dir(&self) -> PathBuf {
        Self::map_dir_of(&self.pin_dir)
    }

    fn map_dir_of(pin_dir: &Path) -> PathBuf {
        lb_map_dir(pin_dir)
    }

    fn link_pin(&self, program: &str, cgroup_ino: u64) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("sock_{program}_{cgroup_ino}"))
    }

    /// Attaches the hooks to the cgroup v2 directory `cgroup`, with
    /// pinned links. A link pinned by an earlier agent is replaced without a
    /// gap: the new link is attached next to it (bpf links on a cgroup are
    /// always multi; `Single` only means no attach flags) before the
    /// old one is unpinned; while both run, the first rewrites and the
    /// second sees a backend address, which is no service, and leaves it.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), SockLbError> {
        let cgroup_err = |source| SockLbError::Cgroup {
            path: cgroup.to_owned(),
            source,
        };
        let file = fs::File::open(cgroup).map_err(cgroup_err)?;
        let ino = file.metadata().map_err(cgroup_err)?.ino();
        for program in PROGRAMS {
            let pin = self.link_pin(program, ino);
            let prog = program_mut(&mut self.ebpf, program)?;
            let prog_err = |e| SockLbError::Program {
                program,
                source: Box::new(e),
            };
            let id = prog
                .attach(&file, CgroupAttachMode::Single)
                .map_err(prog_err)?;
            let link = FdLink::try_from(prog.take_link(id).map_err(prog_err)?).map_err(|e| {
                SockLbError::Pin {
                    path: pin.clone(),
                    source: Box::new(e),
                }
            })?;
            let fresh = pin.with_file_name(format!(
                "{}_new",
                pin.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            ));
            let _ = fs::remove_file(&fresh);
            link.pin(&fresh).map_err(|e: PinError| SockLbError::Pin {
                path: fresh.clone(),
                source: Box::new(e),
            })?;
            // The old link (if any) detaches when its pin goes away.
            unpin(&pin)?;
            fs::rename(&fresh, &pin).map_err(|e| SockLbError::Pin {
                path: pin.clone(),
                source: Box::new(e),
            })?;
        }
        Ok(())
    }

    /// Detaches the hooks from `cgroup` (removes their link pins). Returns
    /// whether anything was attached.
    pub fn detach(&mut self, cgroup: &Path) -> Result<bool, SockLbError> {
        let ino = fs::metadata(cgroup)
            .map_err(|source| SockLbError::Cgroup {
                path: cgroup.to_owned(),
                source,
            })?
            .ino();
        let mut any = false;
        for program in PROGRAMS {
            any |= unpin(&self.link_pin(program, ino))?;
        }
        Ok(any)
    }

    /// Programs `frontend` → `service`.
    pub fn upsert_service(
        &mut self,
        frontend: LbFrontend,
        service: LbService,
    ) -> Result<(), SockLbError> {
        self.services
            .insert(service_key(frontend), service_value(service), 0)
            .map_err(map_err("mb_lb_services"))
    }

    /// Removes `frontend`. Returns whether it was programmed.
    pub fn remove_service(&mut self, frontend: LbFrontend) -> Result<bool, SockLbError> {
        absent_is_false(
            self.services.remove(&service_key(frontend)),
            "mb_lb_services",
        )
    }

    /// The programmed frontends.
    pub fn services(&self) -> Result<Vec<(LbFrontend, LbService)>, SockLbError> {
        list_services(&self.services, "mb_lb_services")
    }

    /// Programs an external frontend (NodePort: address 0.0.0.0) → `service`
    /// for bpf_host (packet-level DNAT at tc).
    pub fn upsert_ext_service(
        &mut self,
        frontend: LbFrontend,
        service: LbService,
    ) -> Result<(), SockLbError> {
        self.ext_services
            .insert(service_key(frontend), service_value(service), 0)
            .map_err(map_err("mb_lb_ext_services"))
    }

    /// Removes an external frontend. Returns whether it was programmed.
    pub fn remove_ext_service(&mut self, frontend: LbFrontend) -> Result<bool, SockLbError> {
        absent_is_false(
            self.ext_services.remove(&service_key(frontend)),
            "mb_lb_ext_services",
        )
    }

    /// Marks a backend (address, target port, protocol) of a service with
    /// external frontends.
    pub fn upsert_backend_port(&mut self, port: LbFrontend) -> Result<(), SockLbError> {
        self.be_ports
            .insert(service_key(port), 1, 0)
            .map_err(map_err("mb_lb_be_ports"))
    }

    /// Unmarks a backend port. Returns whether it was marked.
    pub fn remove_backend_port(&mut self, port: LbFrontend) -> Result<bool, SockLbError> {
        absent_is_false(self.be_ports.remove(&service_key(port)), "mb_lb_be_ports")
    }

    /// The marked backend ports.
    pub fn backend_ports(&self) -> Result<Vec<LbFrontend>, SockLbError> {
        let mut out = Vec::new();
        for k in self.be_ports.keys() {
            let k = k.map_err(map_err("mb_lb_be_ports"))?;
            out.push(LbFrontend {
                address: Ipv4Addr::from(k.address),
                port: u16::from_be_bytes(k.port),
                protocol: if k.proto == IPPROTO_UDP {
                    LbProtocol::Udp
                } else {
                    LbProtocol::Tcp
                },
            });
        }
        out.sort();
        Ok(out)
    }

    /// The programmed external frontends.
    pub fn ext_services(&self) -> Result<Vec<(LbFrontend, LbService)>, SockLbError> {
        list_services(&self.ext_services, "mb_lb_ext_services")
    }

    /// Programs backend `id`.
    pub fn upsert_backend(&mut self, id: u32, backend: LbBackend) -> Result<(), SockLbError> {
        let value = BackendValue {
            address: backend.address.octets(),
            port: backend.port.to_be_bytes(),
            pad: [0; 2],
        };
        self.backends
            .insert(id, value, 0)
            .map_err(map_err("mb_lb_backends"))
    }

    /// Removes backend `id`. Returns whether it was programmed.
    pub fn remove_backend(&mut self, id: u32) -> Result<bool, SockLbError> {
        absent_is_false(self.backends.remove(&id), "mb_lb_backends")
    }

    /// The programmed backends, by id.
    pub fn backends(&self) -> Result<Vec<(u32, LbBackend)>, SockLbError> {
        let mut out = Vec::new();
        for entry in self.backends.iter() {
            let (id, v) = entry.map_err(map_err("mb_lb_backends"))?;
            out.push((
                id,
                LbBackend {
                    address: Ipv4Addr::from(v.address),
                    port: u16::from_be_bytes(v.port),
                },
            ));
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// Swaps in a new table for `service_id`: its Maglev slots (backend id
    /// per slot), or for `random` the backend ids. Empty: the service
    /// rejects connections. Readers see the old or the new table, whole,
    /// with its member list: from then on session affinity never leads to
    /// a backend the table does not list.
    pub fn set_table(&mut self, service_id: u32, backend_ids: &[u32]) -> Result<(), SockLbError> {
        let inner = self.build_table(service_id, backend_ids)?;
        self.tables
            .insert(service_id, &inner, 0)
            .map_err(map_err("mb_lb_tables"))
    }

    /// Swaps in the tables of many services, as [`SockLb::set_table`] does
    /// for one, with one `synchronize_rcu()` per up to 512 tables instead of
    /// one per table. Each service's readers see its old table or its new
    /// one, whole; the services are switched one after the other, in the
    /// order given, not all at once.
    ///
    /// On error ([`SockLbError::TablesNotApplied`]) the tables before the
    /// failing one are swapped in and the failing one and those after it
    /// are not: they keep the table they had.
    pub fn set_tables(&mut self, tables: &[(u32, &[u32])]) -> Result<(), SockLbError> {
        let not_applied = |from: usize, source: SockLbError| SockLbError::TablesNotApplied {
            not_applied: ServiceIds(tables[from..].iter().map(|(id, _)| *id).collect()),
            total: tables.len(),
            source: Box::new(source),
        };
        for (n, chunk) in tables.chunks(TABLES_PER_BATCH).enumerate() {
            let start = n * TABLES_PER_BATCH;
            let mut inners = Vec::with_capacity(chunk.len());
            let mut failed = None;
            for (id, backend_ids) in chunk {
                match self.build_table(*id, backend_ids) {
                    Ok(inner) => inners.push(inner),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            // What was built goes in, so that the tables applied are always
            // the ones before the failure.
            let ids: Vec<u32> = chunk[..inners.len()].iter().map(|(id, _)| *id).collect();
            self.swap_tables(&ids, &inners)
                .map_err(|(applied, e)| not_applied(start + applied, e))?;
            if let Some(e) = failed {
                return Err(not_applied(start + inners.len(), e));
            }
        }
        Ok(())
    }

    /// Points `ids[i]` at `inners[i]`; on error, how many were.
    fn swap_tables(
        &mut self,
        ids: &[u32],
        inners: &[Array<MapData, u32>],
    ) -> Result<(), (usize, SockLbError)> {
        if ids.is_empty() {
            return Ok(());
        }
        if !self.batching.swap {
            for (i, (id, inner)) in ids.iter().zip(inners).enumerate() {
                self.tables
                    .insert(id, inner, 0)
                    .map_err(|e| (i, map_err("mb_lb_tables")(e)))?;
            }
            return Ok(());
        }
        // A map-of-maps takes the inner map's fd as the value. The fds
        // stay open (`inners`) until the call returns.
        let fds: Vec<u32> = inners
            .iter()
            .map(|inner| inner.map().fd().as_fd().as_raw_fd() as u32)
            .collect();
        super::batch::update(self.tables_fd.as_fd(), ids, &fds).map_err(|e| {
            (
                e.applied,
                SockLbError::Batch {
                    map: "mb_lb_tables",
                    command: e.command,
                    source: e.source,
                },
            )
        })
    }

    /// A new inner array holding the table (not referenced yet).
    fn build_table(
        &self,
        service_id: u32,
        backend_ids: &[u32],
    ) -> Result<Array<MapData, u32>, SockLbError> {
        if backend_ids.len() > MAX_TABLE_SLOTS {
            return Err(SockLbError::TableTooLarge {
                service_id,
                len: backend_ids.len(),
            });
        }
        let slots = table_slots(backend_ids);
        // Fits: at most 2 * MAX_TABLE_SLOTS + 2.
        let len = slots.len() as u32;
        let inner_err = map_err("mb_lb_tables (inner)");
        let mut inner = Array::<MapData, u32>::create(len, BPF_F_INNER_MAP).map_err(inner_err)?;
        if self.batching.fill {
            let keys: Vec<u32> = (0..len).collect();
            super::batch::update(inner.map().fd().as_fd(), &keys, &slots).map_err(|e| {
                SockLbError::Batch {
                    map: "mb_lb_tables (inner)",
                    command: e.command,
                    source: e.source,
                }
            })?;
        } else {
            let mut fill = || -> Result<(), MapError> {
                // The count (slot 0) last: a half-filled array is never
                // referenced anyway.
                for (i, v) in slots.iter().enumerate().skip(1) {
                    inner.set(i as u32, v, 0)?;
                }
                inner.set(0, slots[0], 0)
            };
            fill().map_err(map_err("mb_lb_tables (inner)"))?;
        }
        Ok(inner)
    }

    /// The table programmed for `service_id` (backend id per slot).
    pub fn table(&self, service_id: u32) -> Result<Option<Vec<u32>>, SockLbError> {
        let inner = match self.tables.get(&service_id, 0) {
            Ok(inner) => inner,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(map_err("mb_lb_tables")(e)),
        };
        let n = inner.get(&0, 0).map_err(map_err("mb_lb_tables (inner)"))?;
        (1..=n)
            .map(|i| inner.get(&i, 0).map_err(map_err("mb_lb_tables (inner)")))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Removes the table of `service_id`. Returns whether there was one.
    pub fn remove_table(&mut self, service_id: u32) -> Result<bool, SockLbError> {
        absent_is_false(self.tables.remove(&service_id), "mb_lb_tables")
    }

    /// Removes the tables of `service_ids` with one `synchronize_rcu()` for
    /// all (unless some are missing: each missing one costs another).
    /// Returns how many there were. On error
    /// ([`SockLbError::TablesNotRemoved`]) the ones named are still there.
    pub fn remove_tables(&mut self, service_ids: &[u32]) -> Result<usize, SockLbError> {
        let mut removed = 0;
        if !self.batching.remove {
            for (i, id) in service_ids.iter().enumerate() {
                match self.remove_table(*id) {
                    Ok(was) => removed += usize::from(was),
                    Err(e) => return Err(not_removed(service_ids, i, e)),
                }
            }
            return Ok(removed);
        }
        let mut done = 0;
        while done < service_ids.len() {
            let rest = &service_ids[done..];
            match super::batch::delete(self.tables_fd.as_fd(), rest) {
                Ok(()) => {
                    removed += rest.len();
                    done = service_ids.len();
                }
                // The kernel stops at a missing key: skip it, go on after it.
                Err(e) if e.source.raw_os_error() == Some(libc::ENOENT) => {
                    removed += e.applied;
                    done += e.applied + 1;
                }
                Err(e) => {
                    let source = SockLbError::Batch {
                        map: "mb_lb_tables",
                        command: e.command,
                        source: e.source,
                    };
                    return Err(not_removed(service_ids, done + e.applied, source));
                }
            }
        }
        Ok(removed)
    }
}

fn not_removed(service_ids: &[u32], from: usize, source: SockLbError) -> SockLbError {
    SockLbError::TablesNotRemoved {
        not_removed: ServiceIds(service_ids[from..].to_vec()),
        total: service_ids.len(),
        source: Box::new(source),
    }
}

/// Which batch commands the kernel has for the lb tables: on a throwaway
/// inner array (filling) and on `mb_lb_tables` itself (swapping, removing;
/// empty batches, which cost a `synchronize_rcu()` each, once per load).
fn probe_batching(tables: &OwnedFd) -> Result<TableBatching, SockLbError> {
    let inner_err = map_err("mb_lb_tables (inner)");
    let probe_err = |map| {
        move |e: super::batch::BatchError| SockLbError::Batch {
            map,
            command: e.command,
            source: e.source,
        }
    };
    let inner = Array::<MapData, u32>::create(1, BPF_F_INNER_MAP).map_err(inner_err)?;
    let inner_fd = inner.map().fd().as_fd();
    Ok(TableBatching {
        fill: super::batch::probe(inner_fd, true).map_err(probe_err("mb_lb_tables (inner)"))?,
        swap: super::batch::probe(tables.as_fd(), true).map_err(probe_err("mb_lb_tables"))?,
        remove: super::batch::probe(tables.as_fd(), false).map_err(probe_err("mb_lb_tables"))?,
    })
}

/// The inner array of a table (see `mb_lb_tables` in lb.h): the count n,
/// the n slots, then the number k of distinct backends and their ids in
/// ascending order (what `lb_table_has` binary-searches).
fn table_slots(backend_ids: &[u32]) -> Vec<u32> {
    let members: BTreeSet<u32> = backend_ids.iter().copied().collect();
    let mut slots = Vec::with_capacity(backend_ids.len() + members.len() + 2);
    // Lengths fit: the caller rejects tables whose array does not.
    slots.push(backend_ids.len() as u32);
    slots.extend_from_slice(backend_ids);
    slots.push(members.len() as u32);
    slots.extend(members);
    slots
}

fn service_value(service: LbService) -> ServiceValue {
    ServiceValue {
        service_id: service.service_id,
        affinity_timeout: service.affinity_timeout_secs,
        target_port: service.target_port.to_be_bytes(),
        algorithm: match service.algorithm {
            LbAlgorithm::Random => LB_ALG_RANDOM,
            LbAlgorithm::Maglev => LB_ALG_MAGLEV,
        },
        flags: if service.hash_source_address_only {
            LB_F_HASH_SADDR_ONLY
        } else {
            0
        },
    }
}

fn list_services(
    map: &HashMap<MapData, ServiceKey, ServiceValue>,
    name: &'static str,
) -> Result<Vec<(LbFrontend, LbService)>, SockLbError> {
    let mut out = Vec::new();
    for entry in map.iter() {
        let (k, v) = entry.map_err(map_err(name))?;
        let protocol = if k.proto == IPPROTO_UDP {
            LbProtocol::Udp
        } else {
            LbProtocol::Tcp
        };
        out.push((
            LbFrontend {
                address: Ipv4Addr::from(k.address),
                port: u16::from_be_bytes(k.port),
                protocol,
            },
            LbService {
                service_id: v.service_id,
                algorithm: if v.algorithm == LB_ALG_MAGLEV {
                    LbAlgorithm::Maglev
                } else {
                    LbAlgorithm::Random
                },
                target_port: u16::from_be_bytes(v.target_port),
                hash_source_address_only: v.flags & LB_F_HASH_SADDR_ONLY != 0,
                affinity_timeout_secs: v.affinity_timeout,
            },
        ));
    }
    out.sort_by_key(|(f, _)| *f);
    Ok(out)
}

fn service_key(f: LbFrontend) -> ServiceKey {
    ServiceKey {
        address: f.address.octets(),
        port: f.port.to_be_bytes(),
        proto: f.protocol.ip_proto(),
        pad: 0,
    }
}

fn absent_is_false(r: Result<(), MapError>, map: &'static str) -> Result<bool, SockLbError> {
    match r {
        Ok(()) => Ok(true),
        Err(MapError::KeyNotFound) => Ok(false),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(false)
        }
        Err(e) => Err(map_err(map)(e)),
    }
}

/// Removes a link pin (detaching the link unless something else holds it).
fn unpin(pin: &Path) -> Result<bool, SockLbError> {
    match PinnedLink::from_pin(pin) {
        Ok(link) => link.unpin().map(|_| true).map_err(|e| SockLbError::Pin {
            path: pin.to_owned(),
            source: Box::new(e),
        }),
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
            Ok(false)
        }
        Err(e) => Err(SockLbError::Pin {
            path: pin.to_owned(),
            source: Box::new(e),
        }),
    }
}

fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<&'a mut CgroupSockAddr, SockLbError> {
    let err = |e| SockLbError::Program {
        program,
        source: Box::new(e),
    };
    ebpf.program_mut(program)
        .ok_or(ProgramError::NotLoaded)
        .map_err(err)?
        .try_into()
        .map_err(err)
}

fn take_map<T>(
    ebpf: &mut Ebpf,
    map: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, MapError>,
) -> Result<T, SockLbError> {
    let raw = ebpf.take_map(map).ok_or(SockLbError::Map {
        map,
        source: Box::new(MapError::InvalidName { name: map.into() }),
    })?;
    convert(raw).map_err(map_err(map))
}

/// `<pin_dir>/lb/v<SOCK_LB_LAYOUT_VERSION>`: the service LB maps, shared by
/// bpf_sock and the tc programs.
pub(crate) fn lb_map_dir(pin_dir: &Path) -> PathBuf {
    pin_dir
        .join("lb")
        .join(format!("v{SOCK_LB_LAYOUT_VERSION}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes `bpf/lib/lb.h` declares (SOCK_LB_*_SIZE), read from the header.
    fn c_define(name: &str) -> usize {
        let h = include_str!("../../bpf/lib/lb.h");
        h.lines()
            .find_map(|l| {
                let rest = l.strip_prefix("#define ")?.strip_prefix(name)?;
                rest.trim().parse().ok()
            })
            .unwrap_or_else(|| panic!("{name} not in lb.h"))
    }

    #[test]
    fn rust_mirrors_have_the_sizes_lb_h_declares() {
        assert_eq!(
            size_of::<ServiceKey>(),
            c_define("SOCK_LB_SERVICE_KEY_SIZE")
        );
        assert_eq!(size_of::<ServiceValue>(), c_define("SOCK_LB_SERVICE_SIZE"));
        assert_eq!(size_of::<BackendValue>(), c_define("SOCK_LB_BACKEND_SIZE"));
        assert_eq!(
            SOCK_LB_LAYOUT_VERSION as usize,
            c_define("SOCK_LB_LAYOUT_VERSION")
        );
    }

    #[test]
    fn a_table_is_its_count_and_slots_then_its_distinct_backends_in_ascending_order() {
        assert_eq!(
            table_slots(&[7, 3, 7, 5, 3]),
            [5, 7, 3, 7, 5, 3, 3, 3, 5, 7]
        );
        assert_eq!(table_slots(&[]), [0, 0]);
    }

    #[test]
    fn service_keys_carry_address_and_port_in_network_order() {
        let k = service_key(LbFrontend {
            address: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            protocol: LbProtocol::Tcp,
        });
        assert_eq!(k.address, [10, 96, 0, 10]);
        assert_eq!(k.port, [0, 80]);
        assert_eq!(k.proto, 6);
    }
}
