// SPDX-License-Identifier: Apache-2.0
//! Errors of the datapath module. Messages name the object and the step;
//! the cause is the `source()` (print with `{:#}` through anyhow for the chain).

use std::{io, net::Ipv4Addr, path::PathBuf};

use aya::{
    maps::MapError,
    pin::PinError,
    programs::{ProgramError, links::LinkError},
};

use ipnet::Ipv4Net;

use super::{Hook, PolicyError, XdpMode};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mount bpffs at {}", path.display())]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },

    #[error("create pin directory {}", path.display())]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("load eBPF object `{object}`")]
    LoadObject {
        object: &'static str,
        #[source]
        source: Box<aya::EbpfError>,
    },

    #[error("program `{program}` is missing from eBPF object `{object}`")]
    MissingProgram {
        object: &'static str,
        program: &'static str,
    },

    #[error("load program `{program}` into the kernel")]
    LoadProgram {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },

    #[error("map `{map}` is missing from eBPF object `{object}`")]
    MissingMap {
        object: &'static str,
        map: &'static str,
    },

    #[error("open map `{map}`")]
    OpenMap {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },

    #[error("read map `{map}`")]
    ReadMap {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },

    #[error("{op} endpoint {ip}")]
    Endpoint {
        op: &'static str,
        ip: Ipv4Addr,
        #[source]
        source: Box<MapError>,
    },

    #[error("{op} service address {addr} on the underlay")]
    Announce {
        op: &'static str,
        addr: Ipv4Addr,
        #[source]
        source: Box<MapError>,
    },

    #[error("SNAT port range {start}..={end} is empty")]
    EmptySnatPorts { start: u16, end: u16 },

    #[error("record the MAC of underlay device {ifindex}")]
    L2Device {
        ifindex: u32,
        #[source]
        source: Box<MapError>,
    },

    #[error("endpoint {ip} is not in the endpoint map")]
    EndpointNotFound { ip: Ipv4Addr },

    #[error("{op} ipcache entry {prefix}")]
    Ipcache {
        op: &'static str,
        prefix: Ipv4Net,
        #[source]
        source: Box<MapError>,
    },

    #[error("policy of endpoint {endpoint_id}")]
    Policy {
        endpoint_id: u32,
        #[source]
        source: PolicyError,
    },

    #[error("{op} policy map entries of endpoint {endpoint_id}")]
    PolicyMap {
        op: &'static str,
        endpoint_id: u32,
        #[source]
        source: Box<MapError>,
    },

    #[error("attach {hook} program to ifindex {ifindex}")]
    Attach {
        hook: Hook,
        ifindex: u32,
        #[source]
        source: AttachError,
    },

    #[error("attach bpf_xdp ({mode}) to ifindex {ifindex}")]
    AttachXdp {
        mode: XdpMode,
        ifindex: u32,
        #[source]
        source: AttachError,
    },

    #[error("detach bpf_xdp from ifindex {ifindex}")]
    DetachXdp {
        ifindex: u32,
        #[source]
        source: AttachError,
    },

    #[error("test run of bpf_xdp")]
    TestRunXdp(#[source] Box<ProgramError>),

    #[error("detach {hook} program from ifindex {ifindex}")]
    Detach {
        hook: Hook,
        ifindex: u32,
        #[source]
        source: AttachError,
    },

    #[error("list pinned links in {}", path.display())]
    ListLinks {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("the event ring buffer was already taken by another reader")]
    EventsTaken,

    #[error("wait for datapath events")]
    Events(#[source] io::Error),

    #[error("test run of the {hook} program")]
    TestRun {
        hook: Hook,
        #[source]
        source: Box<ProgramError>,
    },

    #[error("probe kernel feature `{feature}`")]
    Probe {
        feature: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
}

/// The step of an attach/detach that failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("resolve interface name")]
    Interface(#[source] nix::Error),
    #[error("program")]
    Program(#[source] Box<ProgramError>),
    #[error("pinned link")]
    Link(#[source] LinkError),
    #[error("pin link")]
    Pin(#[source] PinError),
    #[error("pin file")]
    Io(#[source] io::Error),
}

impl From<ProgramError> for AttachError {
    fn from(e: ProgramError) -> Self {
        Self::Program(Box::new(e))
    }
}
