// SPDX-License-Identifier: Apache-2.0
//! Kernel feature probes: load a tiny program that calls the helper and let
//! the verifier answer. Nothing is attached; nothing is assumed from the
//! kernel version (distributions backport, and configs differ).

use std::io;

use aya::{
    Ebpf,
    programs::{ProgramError, SchedClassifier},
};

use super::{Error, objects};

/// What the running kernel supports, as far as the datapath cares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// `bpf_redirect_peer` (5.10+): deliver to a veth's peer without a backlog hop.
    pub redirect_peer: bool,
    /// `bpf_redirect_neigh` (5.10+): transmit with the neighbour subsystem filling L2.
    pub redirect_neigh: bool,
}

/// Probes the running kernel. Needs the same privileges as loading the datapath.
pub fn probe_features() -> Result<Features, Error> {
    let mut ebpf = Ebpf::load(objects::PROBE).map_err(|e| Error::LoadObject {
        object: "probe",
        source: Box::new(e),
    })?;
    Ok(Features {
        redirect_peer: probe(&mut ebpf, "probe_rdr_peer", "bpf_redirect_peer")?,
        redirect_neigh: probe(&mut ebpf, "probe_rdr_neigh", "bpf_redirect_neigh")?,
    })
}

fn probe(ebpf: &mut Ebpf, program: &'static str, feature: &'static str) -> Result<bool, Error> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(program)
        .ok_or(Error::MissingProgram {
            object: "probe",
            program,
        })?
        .try_into()
        .map_err(|e| Error::Probe {
            feature,
            source: Box::new(e),
        })?;
    match prog.load() {
        Ok(()) => Ok(true),
        // The verifier rejects unknown helpers with EINVAL. Anything else
        // (EPERM, ENOMEM...) says nothing about the helper: report it.
        Err(ProgramError::LoadError { io_error, .. })
            if io_error.kind() == io::ErrorKind::InvalidInput =>
        {
            Ok(false)
        }
        Err(e) => Err(Error::Probe {
            feature,
            source: Box::new(e),
        }),
    }
}
