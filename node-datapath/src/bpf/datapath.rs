// SPDX-License-Identifier: Apache-2.0
//! [`Datapath`]: the loaded programs, their pinned maps and their pinned
//! tcx links.

use std::{
    collections::BTreeMap,
    fs, io,
    net::Ipv4Addr,
    ops::RangeInclusive,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp,
        XdpMode as AyaXdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
    sys::SyscallError,
};

use ipnet::Ipv4Net;

use super::{
    AttachError, Error, Hook, L2Announcer, LAYOUT_VERSION,
    abi::{
        self, CtEntryRaw, CtKeyRaw, EndpointInfoRaw, EpDropKeyRaw, IpcacheValueRaw, L2DevRaw,
        MetricValueRaw, PolicyKeyData, PolicyValueRaw,
    },
    announce,
    events::EventReader,
    features::Features,
    objects,
    policy::{self, MapKey, MapValue, PolicyDiff, PolicyEntry, PolicyUpdate},
    types::{
        Counter, CtEntry, Direction, DropReason, EndpointInfo, Flow, MacAddr, Metrics, TcVerdict,
        XdpAction, XdpMode,
    },
};

const MAP_ENDPOINTS: &str = "mb_endpoints";
const MAP_CT: &str = "mb_ct4";
const MAP_METRICS: &str = "mb_metrics";
const MAP_EVENTS: &str = "mb_events";
const MAP_IPCACHE: &str = "mb_ipcache";
const MAP_POLICY: &str = "mb_policy";
const MAP_EP_DROPS: &str = "mb_ep_drops";
const MAP_L2_DEV: &str = "mb_l2_dev";

/// Load-time switches, baked into the programs as constants (so the verifier
/// prunes disabled paths and a kernel lacking a helper still loads them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathOptions {
    /// Deliver to local pods with `bpf_redirect_peer` (bpf_lxc and bpf_host).
    pub redirect_peer: bool,
    /// Let bpf_host fall back to `bpf_redirect_neigh` when peer is off.
    pub redirect_neigh: bool,
}

/// Whether the programs contain network policy at all. A load-time constant
/// (like [`DatapathOptions`]): the verifier removes the policy code from
/// programs loaded with [`PolicyMode::CompiledOut`], so "off" costs nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PolicyMode {
    /// ipcache and policy lookups on every packet of a connection's
    /// original direction. Without policy entries and enforcement flags this
    /// allows everything.
    #[default]
    Enforced,
    /// No policy code: everything is allowed, maps are ignored.
    CompiledOut,
}

/// Load-time settings beyond [`DatapathOptions`] (constants in the programs
/// too), for [`Datapath::load_with`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadConfig {
    /// Whether the programs contain network policy.
    pub policy: PolicyMode,
    /// The source ports a NodePort/LoadBalancer flow to a backend on another
    /// node is SNATed to when the client's own port is taken towards that
    /// backend (`bpf/lib/nodeport.h`). Default: 32768..=60999.
    pub snat_ports: RangeInclusive<u16>,
    /// Drop what a pod sends from an address that is not its own
    /// (`CONFIG_VERIFY_SOURCE`, bpf_lxc). Default off: a program under
    /// BPF_PROG_TEST_RUN has no real veth; the agent turns it on.
    pub verify_source: bool,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            policy: PolicyMode::Enforced,
            snat_ports: 32768..=60999,
            verify_source: false,
        }
    }
}

/// How [`Datapath::attach`] got the program onto the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// No pinned link existed: a new tcx link was created and pinned.
    Fresh,
    /// A pinned link existed (a previous agent): the program was swapped in
    /// atomically, without a moment where the interface had no program.
    Adopted,
    /// A pinned link existed but its interface was gone (the index now names
    /// another interface): the stale pin was replaced by a new link.
    ReplacedSevered,
}

/// The result of running one packet through a program with `BPF_PROG_TEST_RUN`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRunOutput {
    pub verdict: TcVerdict,
    /// The packet as the program left it (rewrites included).
    pub packet: Vec<u8>,
    /// `skb->mark` as the program left it.
    pub mark: u32,
}

/// The result of running one frame through `bpf_xdp` with `BPF_PROG_TEST_RUN`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpTestOutput {
    pub action: XdpAction,
    /// The frame as the program left it.
    pub packet: Vec<u8>,
}

/// `struct __sk_buff`: `mark` is its third u32 (uapi, stable). The kernel
/// accepts a shorter context in (the rest zero) and needs room for all of it
/// out (192 bytes on 6.x; more leaves room for growth).
const SKB_CTX_MARK_OFFSET: usize = 8;
const SKB_CTX_OUT_LEN: usize = 512;

/// The loaded datapath. Dropping it unloads nothing that traffic depends on:
/// links and maps are pinned, so the kernel keeps running the programs until
/// the next agent adopts the links (or [`Datapath::detach`] removes them).
pub struct Datapath {
    map_dir: PathBuf,
    link_dir: PathBuf,
    lxc: Ebpf,
    host: Ebpf,
    /// `bpf_xdp`: loaded always (cheap), attached on request ([`Datapath::attach_xdp`]).
    xdp: Ebpf,
    endpoints: HashMap<MapData, [u8; 4], EndpointInfoRaw>,
    ct: HashMap<MapData, CtKeyRaw, CtEntryRaw>,
    metrics: PerCpuArray<MapData, MetricValueRaw>,
    events: Option<RingBuf<MapData>>,
    ipcache: LpmTrie<MapData, [u8; 4], IpcacheValueRaw>,
    policy: LpmTrie<MapData, PolicyKeyData, PolicyValueRaw>,
    /// The policy map's entries per endpoint, as this datapath last wrote
    /// them. Read from the kernel once, at the first policy change after the
    /// load (so a previous agent's entries are known and their stale ones
    /// deleted); from then on kept in step with every write, because walking
    /// the whole trie to find one endpoint's entries costs ~1 µs per entry
    /// of *every* endpoint. Sound because this is the map's only writer.
    programmed_policy: Option<BTreeMap<u32, BTreeMap<MapKey, MapValue>>>,
    ep_drops: PerCpuHashMap<MapData, EpDropKeyRaw, MetricValueRaw>,
}

struct Object {
    name: &'static str,
    kind: ProgramKind,
    programs: &'static [&'static str],
    bytes: &'static [u8],
}

#[derive(Clone, Copy)]
enum ProgramKind {
    Tc,
    Xdp,
}

const LXC: Object = Object {
    name: "bpf_lxc",
    kind: ProgramKind::Tc,
    programs: &[PROG_FROM_CONTAINER, PROG_TO_CONTAINER],
    bytes: objects::LXC,
};
const HOST: Object = Object {
    name: "bpf_host",
    kind: ProgramKind::Tc,
    programs: &[PROG_FROM_NETDEV],
    bytes: objects::HOST,
};
const XDP: Object = Object {
    name: "bpf_xdp",
    kind: ProgramKind::Xdp,
    programs: &[PROG_XDP],
    bytes: objects::XDP,
};
const PROG_XDP: &str = "xdp_underlay";
const PROG_FROM_CONTAINER: &str = "from_container";
const PROG_TO_CONTAINER: &str = "to_container";
const PROG_FROM_NETDEV: &str = "from_netdev";

// === impl DatapathOptions ===

impl DatapathOptions {
    /// Everything the kernel supports.
    pub fn from_features(features: &Features) -> Self {
        Self {
            redirect_peer: features.redirect_peer,
            redirect_neigh: features.redirect_neigh,
        }
    }

    fn feature_bits(&self) -> u32 {
        let mut bits = 0;
        if self.redirect_peer {
            bits |= abi::FEATURE_REDIRECT_PEER;
        }
        if self.redirect_neigh {
            bits |= abi::FEATURE_REDIRECT_NEIGH;
        }
        bits
    }
}

// === impl Datapath ===

impl Datapath {
    /// Loads the programs into the kernel (without attaching them) and
    /// opens their maps, reusing maps already pinned under `pin_dir` by a
    /// previous agent. `pin_dir` must be on a mounted bpffs (see
    /// [`super::ensure_bpffs`]); it is created if missing. Network policy is
    /// compiled in ([`PolicyMode::Enforced`]).
    pub fn load(pin_dir: &Path, opts: &DatapathOptions) -> Result<Self, Error> {
        Self::load_with_policy(pin_dir, opts, PolicyMode::Enforced)
    }

    /// [`Datapath::load`], choosing whether the programs contain policy.
    pub fn load_with_policy(
        pin_dir: &Path,
        opts: &DatapathOptions,
        policy: PolicyMode,
    ) -> Result<Self, Error> {
        let config = LoadConfig {
            policy,
            ..LoadConfig::default()
        };
        Self::load_with(pin_dir, opts, &config)
    }

    /// [`Datapath::load`] with every load-time setting given.
    pub fn load_with(
        pin_dir: &Path,
        opts: &DatapathOptions,
        config: &LoadConfig,
    ) -> Result<Self, Error> {
        if config.snat_ports.is_empty() {
            return Err(Error::EmptySnatPorts {
                start: *config.snat_ports.start(),
                end: *config.snat_ports.end(),
            });
        }
        let map_dir = pin_dir.join(format!("v{LAYOUT_VERSION}"));
        let link_dir = pin_dir.join("links");
        for dir in [&map_dir, &link_dir] {
            fs::create_dir_all(dir).map_err(|source| Error::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        // The service LB maps bpf_host/bpf_lxc share with bpf_sock (NodePort,
        // LoadBalancer, externalIPs: lib/nodeport.h) live in bpf_sock's directory.
        let lb_dir = super::sock::lb_map_dir(pin_dir);
        fs::create_dir_all(&lb_dir).map_err(|source| Error::PinDir {
            path: lb_dir.clone(),
            source,
        })?;
        let consts = Constants {
            features: opts.feature_bits(),
            policy_enabled: u32::from(config.policy == PolicyMode::Enforced),
            snat_port_min: *config.snat_ports.start(),
            snat_port_max: *config.snat_ports.end(),
            verify_source: u32::from(config.verify_source),
        };
        let mut lxc = load_object(&LXC, &map_dir, &lb_dir, &consts)?;
        let host = load_object(&HOST, &map_dir, &lb_dir, &consts)?;
        let xdp = load_object(&XDP, &map_dir, &lb_dir, &consts)?;

        // Both objects share the pinned maps: open them once, from bpf_lxc.
        let endpoints = typed_map(&mut lxc, MAP_ENDPOINTS, HashMap::try_from)?;
        let ct = typed_map(&mut lxc, MAP_CT, HashMap::try_from)?;
        let metrics = typed_map(&mut lxc, MAP_METRICS, PerCpuArray::try_from)?;
        let events = typed_map(&mut lxc, MAP_EVENTS, RingBuf::try_from)?;
        let ipcache = typed_map(&mut lxc, MAP_IPCACHE, LpmTrie::try_from)?;
        let policy = typed_map(&mut lxc, MAP_POLICY, LpmTrie::try_from)?;
        let ep_drops = typed_map(&mut lxc, MAP_EP_DROPS, PerCpuHashMap::try_from)?;

        Ok(Self {
            map_dir,
            link_dir,
            lxc,
            host,
            xdp,
            endpoints,
            ct,
            metrics,
            events: Some(events),
            ipcache,
            policy,
            programmed_policy: None,
            ep_drops,
        })
    }

    /// Where the maps are pinned (`<pin_dir>/v<LAYOUT_VERSION>`).
    pub fn map_pin_dir(&self) -> &Path {
        &self.map_dir
    }

    /// Attaches `bpf_lxc` to tcx ingress of a pod's node-side veth.
    pub fn attach_lxc(&mut self, ifindex: u32) -> Result<AttachMode, Error> {
        self.attach(Hook::Lxc, ifindex)
    }

    /// Tells bpf_host this node's underlay address: NodePort frontends
    /// (keyed with address 0) match packets addressed to it, and it is the
    /// SNAT address towards backends on other nodes. [`Datapath::attach`]
    /// of [`Hook::Host`] sets it from the device's first IPv4 address.
    pub fn set_node_address(&mut self, ip: Ipv4Addr) -> Result<(), Error> {
        let map = self.host.map_mut("mb_lb_node").ok_or(Error::MissingMap {
            object: HOST.name,
            map: "mb_lb_node",
        })?;
        let mut array: Array<&mut MapData, [u8; 4]> =
            Array::try_from(map).map_err(|e| Error::OpenMap {
                map: "mb_lb_node",
                source: Box::new(e),
            })?;
        array.set(0, ip.octets(), 0).map_err(|e| Error::OpenMap {
            map: "mb_lb_node",
            source: Box::new(e),
        })
    }

    /// Tells bpf_host the MAC of underlay device `ifindex`: ARP replies for
    /// announced addresses arriving there carry it (and only devices listed
    /// this way answer). [`Datapath::attach`] of [`Hook::Host`] sets it from
    /// the device.
    pub fn set_l2_device(&mut self, ifindex: u32, mac: MacAddr) -> Result<(), Error> {
        let map = self.host.map_mut(MAP_L2_DEV).ok_or(Error::MissingMap {
            object: HOST.name,
            map: MAP_L2_DEV,
        })?;
        let err = |e| Error::L2Device {
            ifindex,
            source: Box::new(e),
        };
        let mut devs: HashMap<&mut MapData, u32, L2DevRaw> = HashMap::try_from(map).map_err(err)?;
        let value = L2DevRaw {
            mac: mac.0,
            pad: [0; 2],
        };
        devs.insert(ifindex, value, 0).map_err(err)
    }

    /// A handle on the service addresses bpf_host answers ARP for (see
    /// [`L2Announcer`]); each call opens a new handle on the same pinned map.
    pub fn l2_announcer(&self) -> Result<L2Announcer, Error> {
        L2Announcer::open(&self.map_dir.join(announce::MAP_ANNOUNCE))
    }

    /// Attaches `bpf_host` to tcx ingress of the node's underlay device.
    pub fn attach_host(&mut self, ifindex: u32) -> Result<AttachMode, Error> {
        self.attach(Hook::Host, ifindex)
    }

    /// Attaches `to_container` to tcx egress of a pod's node-side veth, so
    /// what the node's stack delivers to the pod passes its ingress policy.
    pub fn attach_lxc_egress(&mut self, ifindex: u32) -> Result<AttachMode, Error> {
        self.attach(Hook::LxcEgress, ifindex)
    }

    /// Attaches `hook`'s program to tcx ingress (egress for
    /// [`Hook::LxcEgress`]) of `ifindex` (in the calling thread's network
    /// namespace) and pins the link. If a previous agent pinned a link
    /// there, this program replaces the old one atomically.
    pub fn attach(&mut self, hook: Hook, ifindex: u32) -> Result<AttachMode, Error> {
        if hook == Hook::Host
            && let Some(ip) = device_ipv4(ifindex)
        {
            // Best effort: without it NodePort frontends just never match.
            if let Err(e) = self.set_node_address(ip) {
                tracing::warn!(error = %e, "cannot record the node address for NodePort");
            }
        }
        if hook == Hook::Host
            && let Some(mac) = device_mac(ifindex)
        {
            // Best effort: without it no announced address is answered for.
            if let Err(e) = self.set_l2_device(ifindex, mac) {
                tracing::warn!(error = %e, "cannot record the underlay MAC for ARP replies");
            }
        }
        let pin = self.link_pin_path(hook, ifindex);
        let prog = program_mut(self.object_mut(hook), hook).map_err(|source| Error::Attach {
            hook,
            ifindex,
            source,
        })?;
        attach_pinned(&mut TcxAttach(prog, attach_type(hook)), ifindex, &pin).map_err(|source| {
            Error::Attach {
                hook,
                ifindex,
                source,
            }
        })
    }

    /// Detaches `hook`'s program from `ifindex` by removing its link pin.
    /// Returns false if nothing was attached. Safe after the interface is gone.
    pub fn detach(&mut self, hook: Hook, ifindex: u32) -> Result<bool, Error> {
        // Unpinned and dropped: the last reference closes and the kernel detaches.
        unpin_link(&self.link_pin_path(hook, ifindex)).map_err(|source| Error::Detach {
            hook,
            ifindex,
            source,
        })
    }

    /// Attaches `bpf_xdp` to the underlay device `ifindex` in `mode` and
    /// pins the link (`links/xdp_<mode>_<ifindex>`). A link a previous agent
    /// pinned in the same mode gets this program swapped in atomically; one
    /// in the other mode is detached first (a device runs one XDP mode at a
    /// time), leaving tc alone to handle the traffic for that moment.
    /// Fails if the driver refuses the mode (native on a device without
    /// native XDP): the caller may fall back to [`XdpMode::Generic`].
    pub fn attach_xdp(&mut self, ifindex: u32, mode: XdpMode) -> Result<AttachMode, Error> {
        let err = |source| Error::AttachXdp {
            mode,
            ifindex,
            source,
        };
        let other = match mode {
            XdpMode::Native => XdpMode::Generic,
            XdpMode::Generic => XdpMode::Native,
        };
        unpin_link(&self.xdp_pin_path(other, ifindex)).map_err(err)?;
        let pin = self.xdp_pin_path(mode, ifindex);
        let prog = xdp_program_mut(&mut self.xdp).map_err(err)?;
        attach_pinned(&mut XdpAttach(prog, mode), ifindex, &pin).map_err(err)
    }

    /// Detaches `bpf_xdp` from `ifindex` (whatever its mode). Returns false
    /// if it was not attached. Safe after the interface is gone.
    pub fn detach_xdp(&mut self, ifindex: u32) -> Result<bool, Error> {
        let mut any = false;
        for mode in [XdpMode::Native, XdpMode::Generic] {
            any |= unpin_link(&self.xdp_pin_path(mode, ifindex))
                .map_err(|source| Error::DetachXdp { ifindex, source })?;
        }
        Ok(any)
    }

    /// The mode `bpf_xdp` is attached to `ifindex` in, by its pinned link
    /// (e.g. left by a previous agent); `None` if it is not attached.
    pub fn xdp_attachment(&self, ifindex: u32) -> Option<XdpMode> {
        [XdpMode::Native, XdpMode::Generic]
            .into_iter()
            .find(|mode| self.xdp_pin_path(*mode, ifindex).exists())
    }

    /// Runs one Ethernet frame through `bpf_xdp` with `BPF_PROG_TEST_RUN`,
    /// as if it arrived on `ingress_ifindex` (of the calling thread's
    /// network namespace; its routes and neighbours answer the program's
    /// FIB lookup). Maps are the real ones.
    pub fn test_run_xdp(&self, frame: &[u8], ingress_ifindex: u32) -> Result<XdpTestOutput, Error> {
        let err = |e| Error::TestRunXdp(Box::new(e));
        let prog: &Xdp = self
            .xdp
            .program(PROG_XDP)
            .ok_or(ProgramError::NotLoaded)
            .and_then(TryInto::try_into)
            .map_err(err)?;
        let len = u32::try_from(frame.len()).map_err(|_| {
            err(ProgramError::SyscallError(SyscallError {
                call: "bpf_prog_test_run",
                io_error: io::Error::from_raw_os_error(libc::E2BIG),
            }))
        })?;
        // `struct xdp_md`: data, data_end (must be the frame's length),
        // data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let mut ctx_in = [0u8; 24];
        ctx_in[4..8].copy_from_slice(&len.to_ne_bytes());
        ctx_in[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ..TestRunOptions::default()
            })
            .map_err(err)?;
        out.truncate(result.data_size_out as usize);
        Ok(XdpTestOutput {
            action: XdpAction::from_code(result.return_value),
            packet: out,
        })
    }

    /// The (hook, ifindex) pairs with a pinned link, e.g. left by a previous
    /// agent, so a restarted agent can adopt or detach them.
    pub fn pinned_attachments(&self) -> Result<Vec<(Hook, u32)>, Error> {
        let entries = fs::read_dir(&self.link_dir).map_err(|source| Error::ListLinks {
            path: self.link_dir.clone(),
            source,
        })?;
        let mut out: Vec<(Hook, u32)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| parse_link_pin_name(&e.file_name().to_string_lossy()))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Adds or replaces the endpoint for a local pod IP.
    pub fn upsert_endpoint(&mut self, ip: Ipv4Addr, info: &EndpointInfo) -> Result<(), Error> {
        self.endpoints
            .insert(ip.octets(), EndpointInfoRaw::from(info), 0)
            .map_err(|e| Error::Endpoint {
                op: "upsert",
                ip,
                source: Box::new(e),
            })
    }

    /// Removes the endpoint for `ip`; false if there was none.
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<bool, Error> {
        match self.endpoints.remove(&ip.octets()) {
            Ok(()) => Ok(true),
            Err(e) if map_not_found(&e) => Ok(false),
            Err(e) => Err(Error::Endpoint {
                op: "remove",
                ip,
                source: Box::new(e),
            }),
        }
    }

    /// The endpoint entry of `ip`, if any.
    pub fn endpoint(&self, ip: Ipv4Addr) -> Result<Option<EndpointInfo>, Error> {
        match self.endpoints.get(&ip.octets(), 0) {
            Ok(info) => Ok(Some(EndpointInfo::from(info))),
            Err(e) if map_not_found(&e) => Ok(None),
            Err(e) => Err(Error::ReadMap {
                map: MAP_ENDPOINTS,
                source: Box::new(e),
            }),
        }
    }

    /// Every endpoint in the map, sorted by IP.
    pub fn endpoints(&self) -> Result<Vec<(Ipv4Addr, EndpointInfo)>, Error> {
        let mut out = Vec::new();
        for item in self.endpoints.iter() {
            let (ip, info) = item.map_err(|e| Error::ReadMap {
                map: MAP_ENDPOINTS,
                source: Box::new(e),
            })?;
            out.push((Ipv4Addr::from(ip), EndpointInfo::from(info)));
        }
        out.sort_by_key(|(ip, _)| *ip);
        Ok(out)
    }

    /// Sets the enforcement bits of the endpoint for `ip` (default deny in
    /// that direction), keeping the rest of its entry. Note that
    /// [`Datapath::upsert_endpoint`] writes `flags` as given: callers that
    /// re-upsert an endpoint must carry the bits (see
    /// [`EndpointInfo::enforcement_flags`]).
    pub fn set_endpoint_enforcement(
        &mut self,
        ip: Ipv4Addr,
        ingress: bool,
        egress: bool,
    ) -> Result<(), Error> {
        let mut info = match self.endpoints.get(&ip.octets(), 0) {
            Ok(info) => info,
            Err(e) if map_not_found(&e) => return Err(Error::EndpointNotFound { ip }),
            Err(e) => {
                return Err(Error::Endpoint {
                    op: "read",
                    ip,
                    source: Box::new(e),
                });
            }
        };
        let mask = EndpointInfo::INGRESS_ENFORCED | EndpointInfo::EGRESS_ENFORCED;
        info.flags = (info.flags & !mask) | EndpointInfo::enforcement_flags(ingress, egress);
        // Not BPF_EXIST-guarded: a concurrent remove would be re-created, but
        // endpoints have one writer (the agent's endpoint manager).
        self.endpoints
            .insert(ip.octets(), info, 0)
            .map_err(|e| Error::Endpoint {
                op: "update enforcement of",
                ip,
                source: Box::new(e),
            })
    }

    /// Maps every address in `prefix` to `identity` (the longest prefix
    /// covering an address wins; addresses no prefix covers are
    /// [`super::identity::WORLD`]).
    pub fn upsert_ipcache(&mut self, prefix: Ipv4Net, identity: u32) -> Result<(), Error> {
        let prefix = prefix.trunc();
        let value = IpcacheValueRaw { identity, flags: 0 };
        self.ipcache
            .insert(&ipcache_key(prefix), value, 0)
            .map_err(|e| Error::Ipcache {
                op: "upsert",
                prefix,
                source: Box::new(e),
            })
    }

    /// Removes the ipcache entry for exactly `prefix`; false if there was none.
    pub fn remove_ipcache(&mut self, prefix: Ipv4Net) -> Result<bool, Error> {
        let prefix = prefix.trunc();
        match self.ipcache.remove(&ipcache_key(prefix)) {
            Ok(()) => Ok(true),
            Err(e) if map_not_found(&e) => Ok(false),
            Err(e) => Err(Error::Ipcache {
                op: "remove",
                prefix,
                source: Box::new(e),
            }),
        }
    }

    /// Every ipcache entry, sorted by prefix.
    pub fn ipcache(&self) -> Result<Vec<(Ipv4Net, u32)>, Error> {
        let mut out = Vec::new();
        for item in self.ipcache.iter() {
            let (key, value) = item.map_err(|e| Error::ReadMap {
                map: MAP_IPCACHE,
                source: Box::new(e),
            })?;
            // The kernel only accepts prefix lengths 0..=32 into this trie.
            let prefix =
                Ipv4Net::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8).map_err(|_| {
                    Error::ReadMap {
                        map: MAP_IPCACHE,
                        source: Box::new(MapError::InvalidName {
                            name: format!("prefix length {}", key.prefix_len()),
                        }),
                    }
                })?;
            out.push((prefix, value.identity));
        }
        out.sort();
        Ok(out)
    }

    /// Replaces the whole policy of `endpoint_id` (both directions) with
    /// `entries`, which must all name that endpoint; returns how many map
    /// entries it wrote and deleted (none when nothing changed).
    ///
    /// The entries are resolved into map entries (see `policy.rs`: deny wins
    /// within each (peer, protocol) group, port ranges become prefixes) and
    /// compared with what this datapath programmed for the endpoint (read
    /// from the kernel once, then kept in memory): new and changed map
    /// entries are written, then the endpoint's stale ones are deleted. In
    /// between (one map update per entry), a packet may be judged by a mix
    /// of old and new entries: per group it gets either the old or the new
    /// verdict for its port, and an old allow that the new policy drops
    /// keeps working until its entry is deleted. Writing first means a port
    /// allowed by both policies is never dropped on the way. A failed write
    /// leaves the record matching the kernel, so the next call repairs it.
    pub fn replace_endpoint_policy(
        &mut self,
        endpoint_id: u32,
        entries: &[PolicyEntry],
    ) -> Result<PolicyUpdate, Error> {
        let desired = policy::encode(endpoint_id, entries).map_err(|source| Error::Policy {
            endpoint_id,
            source,
        })?;
        if self.programmed_policy.is_none() {
            self.programmed_policy = Some(self.policy_map_walk(None, endpoint_id)?);
        }
        let programmed = self.programmed_policy.get_or_insert_default();
        let current = programmed.entry(endpoint_id).or_default();
        let map_err = |op| {
            move |e| Error::PolicyMap {
                op,
                endpoint_id,
                source: Box::new(e),
            }
        };
        let PolicyDiff { writes, deletes } = policy::diff(current, &desired);
        let mut update = PolicyUpdate::default();
        let result = (|| {
            for (key, value) in writes {
                self.policy
                    .insert(&policy_key(&key), value.to_raw(), 0)
                    .map_err(map_err("write"))?;
                current.insert(key, value);
                update.written += 1;
            }
            for key in deletes {
                match self.policy.remove(&policy_key(&key)) {
                    Ok(()) => {}
                    Err(e) if map_not_found(&e) => {}
                    Err(e) => return Err(map_err("delete stale")(e)),
                }
                current.remove(&key);
                update.deleted += 1;
            }
            Ok(())
        })();
        if current.is_empty() {
            programmed.remove(&endpoint_id);
        }
        result.map(|()| update)
    }

    /// The policy map's entries for `endpoint_id`, decoded: one
    /// [`PolicyEntry`] per map entry (a port range appears as the
    /// power-of-two blocks it was written as, after deny-wins resolution).
    pub fn policy_entries(&self, endpoint_id: u32) -> Result<Vec<PolicyEntry>, Error> {
        Ok(self
            .policy_map_entries(endpoint_id)?
            .into_iter()
            .map(|(k, v)| k.to_entry(v))
            .collect())
    }

    /// Policy drops per (endpoint id, reason, direction), packets summed over CPUs.
    pub fn endpoint_drops(&self) -> Result<BTreeMap<(u32, DropReason, Direction), u64>, Error> {
        let mut out = BTreeMap::new();
        for item in self.ep_drops.iter() {
            let (key, per_cpu) = match item {
                Ok(kv) => kv,
                Err(e) if map_not_found(&e) => continue,
                Err(e) => {
                    return Err(Error::ReadMap {
                        map: MAP_EP_DROPS,
                        source: Box::new(e),
                    });
                }
            };
            let Some(direction) = Direction::from_code(key.direction) else {
                continue;
            };
            let packets: u64 = per_cpu.iter().map(|v| v.packets).sum();
            let reason = DropReason::from_code(u16::from(key.reason));
            *out.entry((key.endpoint_id, reason, direction)).or_default() += packets;
        }
        Ok(out)
    }

    /// A snapshot of the connection tracking table. Entries evicted while
    /// iterating are skipped.
    pub fn conntrack(&self) -> Result<Vec<(Flow, CtEntry)>, Error> {
        let mut out = Vec::new();
        for item in self.ct.iter() {
            match item {
                Ok((k, v)) => out.push((Flow::from(k), CtEntry::from(v))),
                Err(e) if map_not_found(&e) => {}
                Err(e) => {
                    return Err(Error::ReadMap {
                        map: MAP_CT,
                        source: Box::new(e),
                    });
                }
            }
        }
        out.sort_by_key(|(f, _)| *f);
        Ok(out)
    }

    /// Counters, summed over CPUs.
    pub fn metrics(&self) -> Result<Metrics, Error> {
        let mut slots = Vec::with_capacity(abi::METRIC_MAX as usize);
        for idx in 0..abi::METRIC_MAX {
            let per_cpu = self.metrics.get(&idx, 0).map_err(|e| Error::ReadMap {
                map: MAP_METRICS,
                source: Box::new(e),
            })?;
            let mut sum = Counter::default();
            for v in per_cpu.iter() {
                sum += Counter::from(*v);
            }
            slots.push(sum);
        }
        Ok(Metrics::from_slots(&slots))
    }

    /// The reader of the event ring buffer. There is one per `Datapath`.
    pub fn events(&mut self) -> Result<EventReader, Error> {
        self.events
            .take()
            .map(EventReader::new)
            .ok_or(Error::EventsTaken)
    }

    /// Runs one Ethernet frame through `hook`'s program with
    /// `BPF_PROG_TEST_RUN` (nothing needs to be attached; maps are the real
    /// ones, so endpoints, ct, counters and events all take part).
    pub fn test_run(&self, hook: Hook, frame: &[u8]) -> Result<TestRunOutput, Error> {
        self.run_prog(hook, frame, 1, 0).map(|(out, _)| out)
    }

    /// [`Datapath::test_run`] with `skb->mark` preset, e.g. to show how a
    /// program treats a packet another program already marked.
    pub fn test_run_with_mark(
        &self,
        hook: Hook,
        frame: &[u8],
        mark: u32,
    ) -> Result<TestRunOutput, Error> {
        self.run_prog(hook, frame, 1, mark).map(|(out, _)| out)
    }

    /// Runs `frame` through `hook`'s program `repeat` times in the kernel
    /// (for benchmarks). Returns the last run's output and the kernel's mean
    /// time per run. Each run starts from `frame` as given, while map state
    /// (ct, counters) carries over from run to run.
    pub fn test_run_repeat(
        &self,
        hook: Hook,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(TestRunOutput, Duration), Error> {
        self.run_prog(hook, frame, repeat, 0)
    }

    fn run_prog(
        &self,
        hook: Hook,
        frame: &[u8],
        repeat: u32,
        mark: u32,
    ) -> Result<(TestRunOutput, Duration), Error> {
        let err = |source| Error::TestRun {
            hook,
            source: Box::new(source),
        };
        let ebpf = match hook {
            Hook::Lxc | Hook::LxcEgress => &self.lxc,
            Hook::Host => &self.host,
        };
        let prog: &SchedClassifier = ebpf
            .program(program_name(hook))
            .ok_or(ProgramError::NotLoaded)
            .and_then(TryInto::try_into)
            .map_err(err)?;
        // Room for helpers that grow the packet (none today).
        let mut out = vec![0u8; frame.len() + 256];
        let mut ctx_in = [0u8; SKB_CTX_MARK_OFFSET + 4];
        ctx_in[SKB_CTX_MARK_OFFSET..].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = vec![0u8; SKB_CTX_OUT_LEN];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                repeat: repeat.max(1),
                ..TestRunOptions::default()
            })
            .map_err(err)?;
        out.truncate(result.data_size_out as usize);
        let mut mark_out = [0u8; 4];
        mark_out.copy_from_slice(&ctx_out[SKB_CTX_MARK_OFFSET..SKB_CTX_MARK_OFFSET + 4]);
        let output = TestRunOutput {
            // The kernel returns the program's int return value in a u32.
            verdict: TcVerdict::from_code(result.return_value as i32),
            packet: out,
            mark: u32::from_ne_bytes(mark_out),
        };
        Ok((output, result.duration))
    }

    /// The endpoint's policy map entries, keyed as `policy.rs` encodes them,
    /// read from the kernel (one walk of the whole map).
    fn policy_map_entries(&self, endpoint_id: u32) -> Result<BTreeMap<MapKey, MapValue>, Error> {
        Ok(self
            .policy_map_walk(Some(endpoint_id), endpoint_id)?
            .remove(&endpoint_id)
            .unwrap_or_default())
    }

    /// One walk of the policy map, grouped by endpoint (only `only`'s when
    /// given); errors name `endpoint_id`, the endpoint the walk is for.
    /// Entries this build cannot decode (none are written) are skipped.
    fn policy_map_walk(
        &self,
        only: Option<u32>,
        endpoint_id: u32,
    ) -> Result<BTreeMap<u32, BTreeMap<MapKey, MapValue>>, Error> {
        let mut out: BTreeMap<u32, BTreeMap<MapKey, MapValue>> = BTreeMap::new();
        for item in self.policy.iter() {
            let (key, value) = match item {
                Ok(kv) => kv,
                // Deleted by a concurrent writer while iterating.
                Err(e) if map_not_found(&e) => continue,
                Err(e) => {
                    return Err(Error::PolicyMap {
                        op: "read",
                        endpoint_id,
                        source: Box::new(e),
                    });
                }
            };
            let data = key.data();
            if only.is_some_and(|id| id != data.endpoint_id) {
                continue;
            }
            if let (Some(k), Some(v)) = (
                MapKey::from_raw(key.prefix_len(), data),
                MapValue::from_raw(value),
            ) {
                out.entry(k.endpoint_id).or_default().insert(k, v);
            }
        }
        Ok(out)
    }

    fn object_mut(&mut self, hook: Hook) -> &mut Ebpf {
        match hook {
            Hook::Lxc | Hook::LxcEgress => &mut self.lxc,
            Hook::Host => &mut self.host,
        }
    }

    fn link_pin_path(&self, hook: Hook, ifindex: u32) -> PathBuf {
        self.link_dir.join(link_pin_name(hook, ifindex))
    }

    /// `xdp_<native|generic>_<ifindex>`: the mode is in the name because a
    /// pinned XDP link does not tell it, and a swap cannot change it.
    fn xdp_pin_path(&self, mode: XdpMode, ifindex: u32) -> PathBuf {
        self.link_dir.join(format!("xdp_{mode}_{ifindex}"))
    }
}

fn ipcache_key(prefix: Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(prefix.prefix_len()), prefix.network().octets())
}

fn policy_key(key: &MapKey) -> Key<PolicyKeyData> {
    Key::new(key.prefix_len(), key.to_raw())
}

fn program_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Lxc => PROG_FROM_CONTAINER,
        Hook::LxcEgress => PROG_TO_CONTAINER,
        Hook::Host => PROG_FROM_NETDEV,
    }
}

fn attach_type(hook: Hook) -> TcAttachType {
    match hook {
        Hook::Lxc | Hook::Host => TcAttachType::Ingress,
        Hook::LxcEgress => TcAttachType::Egress,
    }
}

/// `<hook>_<ingress|egress>_<ifindex>`. No dots: BPF_OBJ_PIN rejects them
/// (see shared/STACK.md).
fn link_pin_name(hook: Hook, ifindex: u32) -> String {
    match hook {
        Hook::Lxc => format!("lxc_ingress_{ifindex}"),
        Hook::Host => format!("host_ingress_{ifindex}"),
        Hook::LxcEgress => format!("lxc_egress_{ifindex}"),
    }
}

/// The first IPv4 address of the interface `ifindex` (calling thread's namespace).
fn device_ipv4(ifindex: u32) -> Option<Ipv4Addr> {
    device_address(ifindex, |a| a.as_sockaddr_in().map(|s| s.ip()))
}

/// The MAC of the interface `ifindex` (calling thread's namespace).
fn device_mac(ifindex: u32) -> Option<MacAddr> {
    device_address(ifindex, |a| {
        a.as_link_addr().and_then(|l| l.addr()).map(MacAddr)
    })
}

/// The first address of the interface `ifindex` that `pick` accepts.
fn device_address<T>(
    ifindex: u32,
    pick: impl Fn(&nix::sys::socket::SockaddrStorage) -> Option<T>,
) -> Option<T> {
    let name = nix::net::if_::if_indextoname(ifindex).ok()?;
    let name = name.to_str().ok()?.to_owned();
    nix::ifaddrs::getifaddrs()
        .ok()?
        .filter(|ifa| ifa.interface_name == name)
        .find_map(|ifa| ifa.address.as_ref().and_then(&pick))
}

fn parse_link_pin_name(name: &str) -> Option<(Hook, u32)> {
    let (hook, ifindex) = if let Some((hook, ifindex)) = name.split_once("_ingress_") {
        let hook = match hook {
            "lxc" => Hook::Lxc,
            "host" => Hook::Host,
            _ => return None,
        };
        (hook, ifindex)
    } else {
        let (hook, ifindex) = name.split_once("_egress_")?;
        match hook {
            "lxc" => (Hook::LxcEgress, ifindex),
            _ => return None,
        }
    };
    Some((hook, ifindex.parse().ok()?))
}

/// Maps of `lib/lb.h` that the tc programs use: pinned in the service LB's
/// directory, shared with `bpf_sock` (and so with [`super::SockLb`]).
const LB_SHARED_MAPS: &[&str] = &[
    "mb_lb_services",
    "mb_lb_backends",
    "mb_lb_tables",
    "mb_lb_revnat",
    "mb_lb_ext_services",
    "mb_lb_node",
    "mb_lb_nat4",
    "mb_lb_be_ports",
    "mb_lb_affinity",
];

/// The `volatile const` globals every object gets patched (config.h, nodeport.h).
struct Constants {
    features: u32,
    policy_enabled: u32,
    snat_port_min: u16,
    snat_port_max: u16,
    verify_source: u32,
}

fn load_object(
    object: &Object,
    map_dir: &Path,
    lb_dir: &Path,
    consts: &Constants,
) -> Result<Ebpf, Error> {
    let mut loader = EbpfLoader::new();
    for name in LB_SHARED_MAPS {
        loader.map_pin_path(name, lb_dir.join(name));
    }
    let mut ebpf = loader
        .default_map_pin_directory(map_dir)
        .override_global("CONFIG_FEATURES", &consts.features, true)
        .override_global("CONFIG_POLICY_ENABLED", &consts.policy_enabled, true)
        .override_global("CONFIG_SNAT_PORT_MIN", &consts.snat_port_min, true)
        .override_global("CONFIG_SNAT_PORT_MAX", &consts.snat_port_max, true)
        .override_global("CONFIG_VERIFY_SOURCE", &consts.verify_source, true)
        .load(object.bytes)
        .map_err(|e| Error::LoadObject {
            object: object.name,
            source: Box::new(e),
        })?;
    for &program in object.programs {
        let prog = ebpf.program_mut(program).ok_or(Error::MissingProgram {
            object: object.name,
            program,
        })?;
        let loaded = match object.kind {
            ProgramKind::Tc => <&mut SchedClassifier>::try_from(prog).and_then(|p| p.load()),
            ProgramKind::Xdp => <&mut Xdp>::try_from(prog).and_then(|p| p.load()),
        };
        loaded.map_err(|e| Error::LoadProgram {
            program,
            source: Box::new(e),
        })?;
    }
    Ok(ebpf)
}

fn typed_map<T>(
    ebpf: &mut Ebpf,
    map: &'static str,
    convert: impl FnOnce(Map) -> Result<T, MapError>,
) -> Result<T, Error> {
    let raw = ebpf.take_map(map).ok_or(Error::MissingMap {
        object: LXC.name,
        map,
    })?;
    convert(raw).map_err(|e| Error::OpenMap {
        map,
        source: Box::new(e),
    })
}

fn xdp_program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, AttachError> {
    Ok(ebpf
        .program_mut(PROG_XDP)
        .ok_or(ProgramError::NotLoaded)?
        .try_into()?)
}

fn program_mut(ebpf: &mut Ebpf, hook: Hook) -> Result<&mut SchedClassifier, AttachError> {
    Ok(ebpf
        .program_mut(program_name(hook))
        .ok_or(ProgramError::NotLoaded)?
        .try_into()?)
}

/// A program that can take over a pinned link or make a new one: the tcx
/// and XDP attachments share [`attach_pinned`].
trait PinnableAttach {
    /// Swaps this program into `link` (the kernel keeps the link, and with
    /// it the interface's hook, across the swap).
    fn adopt(&mut self, link: FdLink) -> Result<(), AttachError>;
    /// A new link on `ifindex`.
    fn fresh(&mut self, ifindex: u32) -> Result<FdLink, AttachError>;
}

struct TcxAttach<'a>(&'a mut SchedClassifier, TcAttachType);

impl PinnableAttach for TcxAttach<'_> {
    fn adopt(&mut self, link: FdLink) -> Result<(), AttachError> {
        let link = SchedClassifierLink::try_from(link).map_err(AttachError::Link)?;
        let id = self.0.attach_to_link(link)?;
        drop(self.0.take_link(id)?);
        Ok(())
    }

    fn fresh(&mut self, ifindex: u32) -> Result<FdLink, AttachError> {
        let name = nix::net::if_::if_indextoname(ifindex).map_err(AttachError::Interface)?;
        let name = name
            .to_str()
            .map_err(|_| AttachError::Interface(nix::Error::EINVAL))?;
        let id = self.0.attach_with_options(
            name,
            self.1,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )?;
        FdLink::try_from(self.0.take_link(id)?).map_err(AttachError::Link)
    }
}

struct XdpAttach<'a>(&'a mut Xdp, XdpMode);

impl PinnableAttach for XdpAttach<'_> {
    fn adopt(&mut self, link: FdLink) -> Result<(), AttachError> {
        let link = XdpLink::try_from(link).map_err(AttachError::Link)?;
        let id = self.0.attach_to_link(link)?;
        drop(self.0.take_link(id)?);
        Ok(())
    }

    fn fresh(&mut self, ifindex: u32) -> Result<FdLink, AttachError> {
        let flags = match self.1 {
            XdpMode::Native => AyaXdpMode::Driver,
            XdpMode::Generic => AyaXdpMode::Skb,
        };
        let id = self.0.attach_to_if_index(ifindex, flags)?;
        FdLink::try_from(self.0.take_link(id)?).map_err(AttachError::Link)
    }
}

/// Adopt the link pinned at `pin` if there is a live one, else create a
/// link on `ifindex` and pin it. Our own handle to the link is dropped either
/// way: the pin alone keeps it, so unpinning really detaches.
fn attach_pinned(
    prog: &mut impl PinnableAttach,
    ifindex: u32,
    pin: &Path,
) -> Result<AttachMode, AttachError> {
    let mut mode = AttachMode::Fresh;
    match PinnedLink::from_pin(pin) {
        // Converting keeps the pin file; it stays the link's anchor.
        Ok(pinned) => match prog.adopt(FdLink::from(pinned)) {
            Ok(()) => return Ok(AttachMode::Adopted),
            // ENOLINK "Link has been severed": its interface was deleted.
            Err(AttachError::Program(e))
                if matches!(&*e, ProgramError::SyscallError(SyscallError { io_error, .. })
                    if io_error.raw_os_error() == Some(libc::ENOLINK)) =>
            {
                fs::remove_file(pin).map_err(AttachError::Io)?;
                mode = AttachMode::ReplacedSevered;
            }
            Err(e) => return Err(e),
        },
        Err(e) if link_not_found(&e) => {}
        Err(e) => return Err(AttachError::Link(e)),
    }
    let link = prog.fresh(ifindex)?;
    link.pin(pin).map_err(AttachError::Pin)?;
    Ok(mode)
}

/// Removes a link pin (so the link detaches). Returns false if there was none.
fn unpin_link(pin: &Path) -> Result<bool, AttachError> {
    match PinnedLink::from_pin(pin) {
        Ok(link) => link.unpin().map(|_| true).map_err(AttachError::Io),
        Err(e) if link_not_found(&e) => Ok(false),
        Err(e) => Err(AttachError::Link(e)),
    }
}

fn link_not_found(e: &LinkError) -> bool {
    matches!(e, LinkError::SyscallError(SyscallError { io_error, .. }) if io_error.kind() == io::ErrorKind::NotFound)
}

fn map_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(SyscallError { io_error, .. }) => {
            io_error.kind() == io::ErrorKind::NotFound
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_parse_back_into_hook_and_ifindex() {
        assert_eq!(parse_link_pin_name("lxc_ingress_7"), Some((Hook::Lxc, 7)));
        assert_eq!(parse_link_pin_name("host_ingress_2"), Some((Hook::Host, 2)));
        assert_eq!(
            parse_link_pin_name("lxc_egress_7"),
            Some((Hook::LxcEgress, 7))
        );
        assert_eq!(parse_link_pin_name("host_egress_2"), None);
        for hook in [Hook::Lxc, Hook::Host, Hook::LxcEgress] {
            assert_eq!(
                parse_link_pin_name(&link_pin_name(hook, 42)),
                Some((hook, 42))
            );
        }
        assert_eq!(parse_link_pin_name("xdp_ingress_2"), None);
        assert_eq!(parse_link_pin_name("lxc_ingress_x"), None);
    }

    #[test]
    fn options_turn_into_the_feature_bits_the_c_side_tests() {
        let all = DatapathOptions {
            redirect_peer: true,
            redirect_neigh: true,
        };
        assert_eq!(
            all.feature_bits(),
            abi::FEATURE_REDIRECT_PEER | abi::FEATURE_REDIRECT_NEIGH
        );
        assert_eq!(DatapathOptions::default().feature_bits(), 0);
    }
}
