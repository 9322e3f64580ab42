// SPDX-License-Identifier: Apache-2.0
//! [`L2Announcer`]: which service addresses (LoadBalancer, externalIPs) this
//! node answers ARP for on its underlay (`mb_lb_announce`, read by
//! `bpf/lib/arp.h` in bpf_host).
//!
//! The announcer is a handle of its own on the pinned map, not a borrow of
//! the [`super::Datapath`]: the load balancer's reconciler can own one and
//! update it without taking the datapath's lock. Which node announces which
//! address is decided above this layer (one node per address, or the L2
//! sees two MACs for it).

use std::{io, net::Ipv4Addr, path::Path};

use aya::maps::{HashMap, Map, MapData, MapError};

use super::{Error, abi};

pub(super) const MAP_ANNOUNCE: &str = "mb_lb_announce";

/// The announced addresses of one node.
pub struct L2Announcer {
    map: HashMap<MapData, [u8; 4], u32>,
}

impl std::fmt::Debug for L2Announcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L2Announcer").finish_non_exhaustive()
    }
}

// === impl L2Announcer ===

impl L2Announcer {
    /// Opens the map pinned at `pin` (by a loaded [`super::Datapath`]).
    pub(super) fn open(pin: &Path) -> Result<Self, Error> {
        let open_err = |e| Error::OpenMap {
            map: MAP_ANNOUNCE,
            source: Box::new(e),
        };
        let data = MapData::from_pin(pin).map_err(open_err)?;
        let map = HashMap::try_from(Map::HashMap(data)).map_err(open_err)?;
        Ok(Self { map })
    }

    /// Answers ARP requests for `addr` from now on (idempotent).
    pub fn announce(&mut self, addr: Ipv4Addr) -> Result<(), Error> {
        self.map
            .insert(addr.octets(), abi::LB_ANNOUNCE_F_ARP, 0)
            .map_err(|e| Error::Announce {
                op: "announce",
                addr,
                source: Box::new(e),
            })
    }

    /// Stops answering for `addr`. Returns whether it was announced.
    pub fn withdraw(&mut self, addr: Ipv4Addr) -> Result<bool, Error> {
        match self.map.remove(&addr.octets()) {
            Ok(()) => Ok(true),
            Err(e) if not_found(&e) => Ok(false),
            Err(e) => Err(Error::Announce {
                op: "withdraw",
                addr,
                source: Box::new(e),
            }),
        }
    }

    /// The announced addresses, sorted.
    pub fn announced(&self) -> Result<Vec<Ipv4Addr>, Error> {
        let mut out = Vec::new();
        for key in self.map.keys() {
            match key {
                Ok(k) => out.push(Ipv4Addr::from(k)),
                // Withdrawn by another handle while iterating.
                Err(e) if not_found(&e) => {}
                Err(e) => {
                    return Err(Error::ReadMap {
                        map: MAP_ANNOUNCE,
                        source: Box::new(e),
                    });
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

fn not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.kind() == io::ErrorKind::NotFound,
        _ => false,
    }
}
