// SPDX-License-Identifier: Apache-2.0
//! The eBPF datapath: loads the C programs of `node-datapath/bpf/`, attaches
//! them with tcx, owns their maps, and reports what they see. This module is
//! the only place with raw aya calls; everything it exposes is plain Rust.
//!
//! Code map:
//! - `abi`: `#[repr(C)]` mirrors of `bpf/lib/common.h` (layout-tested against the C).
//! - `types`: the public, typed view (endpoints, flows, metrics, events).
//! - `policy`: policy rules and their encoding into the policy map (plain Rust).
//! - `datapath`: [`Datapath`]: load, attach/adopt/detach, endpoint map,
//!   ipcache, policy, ct, counters.
//! - `events`: ring buffer readers (blocking and tokio).
//! - `features`: kernel feature probes.
//! - `bpffs`: [`ensure_bpffs`].
//! - `announce`: [`L2Announcer`]: service addresses bpf_host answers ARP for.
//! - `sock`: [`SockLb`]: socket-level service load balancing (`bpf_sock`,
//!   cgroup connect4/sendmsg4/recvmsg4/getpeername4), its maps and pinned
//!   cgroup links.
//! - `batch`: `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` (raw `bpf(2)`;
//!   aya 0.14 has none), used by `sock` for the lb tables.
//!
//! Invariants:
//! - Maps are pinned by name under `<pin_dir>/v<LAYOUT_VERSION>/`: both
//!   objects (lxc, host) share them, and they outlive the agent.
//! - Every tcx link is pinned under `<pin_dir>/links/<hook>_<ingress|egress>_<ifindex>`,
//!   the XDP link under `<pin_dir>/links/xdp_<native|generic>_<ifindex>`;
//!   a new agent swaps its program into the pinned link (`attach_to_link`),
//!   so restarts never leave an interface without a program.
//! - Interface indexes are those of the calling thread's network namespace
//!   (the node's).

mod abi;
mod announce;
mod batch;
mod bpffs;
mod datapath;
mod error;
mod events;
mod features;
mod policy;
mod sock;
mod types;

use std::fmt;

pub use abi::LAYOUT_VERSION;
pub use announce::L2Announcer;
pub use bpffs::{BPFFS_PATH, ensure_bpffs};
pub use datapath::{
    AttachMode, Datapath, DatapathOptions, LoadConfig, PolicyMode, TestRunOutput, XdpTestOutput,
};
pub use error::{AttachError, Error};
pub use events::{AsyncEventReader, EventReader};
pub use features::{Features, probe_features};
pub use policy::{PolicyEntry, PolicyError, PolicyUpdate, PortMatch, Verdict, identity};
pub use sock::{
    LbAlgorithm, LbBackend, LbFrontend, LbProtocol, LbService, MAX_TABLE_SLOTS,
    SOCK_LB_LAYOUT_VERSION, ServiceIds, SockLb, SockLbError, TableBatching,
};
pub use types::{
    Counter, CtDirection, CtEntry, DatapathEvent, Direction, DropReason, EndpointInfo, EventKind,
    Flow, InvalidMac, MacAddr, Metrics, ObservationPoint, TcVerdict, XdpAction, XdpMode,
};

/// An attach point of the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    /// `bpf_lxc` `from_container`: tc ingress of a pod's node-side veth
    /// (traffic leaving the pod).
    Lxc,
    /// `bpf_host`: tc ingress of the node's underlay device.
    Host,
    /// `bpf_lxc` `to_container`: tc egress of a pod's node-side veth
    /// (traffic the node's stack delivers to the pod; its ingress policy).
    LxcEgress,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Lxc => "lxc",
            Self::Host => "host",
            Self::LxcEgress => "lxc egress",
        })
    }
}

/// The compiled objects, built by `build.rs` from `bpf/*.c`.
mod objects {
    pub(super) static LXC: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_lxc.o"));
    pub(super) static HOST: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_host.o"));
    pub(super) static XDP: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_xdp.o"));
    pub(super) static SOCK: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_sock.o"));
    pub(super) static PROBE: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe.o"));
}
