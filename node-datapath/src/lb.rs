//! Socket-level service load balancing from the lb service's stream:
//! `service/<ns>/<name>` → [`ServiceState`] → frontends, backends and one
//! table per service in `bpf_sock`'s maps (see [`crate::bpf::SockLb`]).
//!
//! ClusterIP frontends go to `bpf_sock`'s service map (pod → service, at
//! connect/sendmsg time); NodePort (keyed with address 0.0.0.0: this node's
//! underlay address), LoadBalancer and externalIPs frontends go to the
//! external service map that `bpf_host` reads at tc (DNAT, reverse NAT, SNAT
//! to the node for remote backends: `bpf/lib/nodeport.h`), together with the
//! backends' ports (`mb_lb_be_ports`). Same tables and backends for both. For `maglev` the table is built on the node with
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

use membrane_lb::maglev::{self, Seed, TableSize, Weighted};
use membrane_proto::lb::v1 as proto;
use membrane_runtime::stream::StateSink;
use prost_types::Any;

use crate::bpf::{LbAlgorithm, LbBackend, LbFrontend, LbProtocol, LbService, SockLb};

/// The maps the sink programs (the real ones: [`SockLb`]; tests: a fake).
pub trait LbMaps: Send + 'static {
    /// Programmed frontends and the service id each uses.
    fn frontends(&mut self) -> Result<Vec<(LbFrontend, u32)>, String>;
    /// Programmed backend ids.
    fn backend_ids(&mut self) -> Result<Vec<u32>, String>;
    /// Programs a backend.
    fn upsert_backend(&mut self, id: u32, backend: LbBackend) -> Result<(), String>;
    /// Removes a backend.
    fn remove_backend(&mut self, id: u32) -> Result<(), String>;
    /// Swaps in a service's table.
    fn set_table(&mut self, service_id: u32, backend_ids: &[u32]) -> Result<(), String>;
    /// Removes a service's table.
    fn remove_table(&mut self, service_id: u32) -> Result<(), String>;
    /// Programs a frontend.
    fn upsert_service(&mut self, frontend: LbFrontend, service: LbService) -> Result<(), String>;
    /// Removes a frontend.
    fn remove_service(&mut self, frontend: LbFrontend) -> Result<(), String>;
    /// Programmed external frontends (NodePort, LoadBalancer, externalIPs;
    /// bpf_host at tc) and the service id each uses.
    fn ext_frontends(&mut self) -> Result<Vec<(LbFrontend, u32)>, String> {
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
}

/// Applies the lb stream to [`LbMaps`].
#[derive(Debug)]
pub struct LbSink<M> {
    maps: M,
    ids: BTreeMap<String, u32>,
    next_id: u32,
    tables: BTreeMap<u32, Vec<u32>>,
}

/// What one service wants programmed.
struct Wanted {
    frontends: Vec<(LbFrontend, LbService)>,
    /// NodePort (address 0.0.0.0), LoadBalancer and externalIPs frontends.
    ext_frontends: Vec<(LbFrontend, LbService)>,
    backends: Vec<(u32, LbBackend)>,
    table: Vec<u32>,
}

impl<M: LbMaps> LbSink<M> {
    /// A sink over `maps`.
    pub fn new(maps: M) -> Self {
        Self {
            maps,
            ids: BTreeMap::new(),
            next_id: 1,
            tables: BTreeMap::new(),
        }
    }

    /// The maps (for tests and inspection).
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// Makes the maps match `state` (every `service/…` key).
    pub fn reconcile(&mut self, state: &BTreeMap<String, Any>) -> Result<(), String> {
        let mut wanted = BTreeMap::new();
        for (key, any) in state.range("service/".to_owned()..) {
            if !key.starts_with("service/") {
                break;
            }
            let svc: proto::ServiceState =
                any.to_msg().map_err(|e| format!("decode `{key}`: {e}"))?;
            let id = match self.ids.get(key) {
                Some(id) => *id,
                None => {
                    let id = self.next_id;
                    self.next_id += 1;
                    self.ids.insert(key.clone(), id);
                    id
                }
            };
            wanted.insert(id, want(key, id, &svc)?);
        }
        self.ids.retain(|_, id| wanted.contains_key(id));

        let programmed = self.maps.frontends()?;
        let programmed_ext = self.maps.ext_frontends()?;
        // Backends and tables first, then the frontends that use them.
        let backends: BTreeMap<u32, LbBackend> = wanted
            .values()
            .flat_map(|w| w.backends.iter().copied())
            .collect();
        for (id, b) in &backends {
            self.maps.upsert_backend(*id, *b)?;
        }
        for (id, w) in &wanted {
            if self.tables.get(id) != Some(&w.table) {
                self.maps.set_table(*id, &w.table)?;
                self.tables.insert(*id, w.table.clone());
            }
        }
        let mut keep = BTreeSet::new();
        for w in wanted.values() {
            for (f, s) in &w.frontends {
                self.maps.upsert_service(*f, *s)?;
                keep.insert(*f);
            }
        }
        let mut keep_ext = BTreeSet::new();
        for w in wanted.values() {
            for (f, s) in &w.ext_frontends {
                self.maps.upsert_ext_service(*f, *s)?;
                keep_ext.insert(*f);
            }
        }
        // Backend ports of services with external frontends (for requests
        // another node SNATed to them: lib/nodeport.h).
        let mut be_ports = BTreeSet::new();
        for w in wanted.values() {
            for (f, s) in &w.ext_frontends {
                for (_, b) in &w.backends {
                    be_ports.insert(LbFrontend {
                        address: b.address,
                        port: if b.port != 0 { b.port } else { s.target_port },
                        protocol: f.protocol,
                    });
                }
            }
        }
        for p in &be_ports {
            self.maps.upsert_backend_port(*p)?;
        }
        for p in self.maps.backend_ports()? {
            if !be_ports.contains(&p) {
                self.maps.remove_backend_port(p)?;
            }
        }
        let mut stale_tables: BTreeSet<u32> = self.tables.keys().copied().collect();
        for (f, id) in programmed_ext {
            stale_tables.insert(id);
            if !keep_ext.contains(&f) {
                self.maps.remove_ext_service(f)?;
            }
        }
        for (f, id) in programmed {
            stale_tables.insert(id);
            if !keep.contains(&f) {
                self.maps.remove_service(f)?;
            }
        }
        for id in stale_tables {
            if !wanted.contains_key(&id) {
                self.maps.remove_table(id)?;
                self.tables.remove(&id);
            }
        }
        for id in self.maps.backend_ids()? {
            if !backends.contains_key(&id) {
                self.maps.remove_backend(id)?;
            }
        }
        Ok(())
    }
}

impl<M: LbMaps> StateSink for LbSink<M> {
    async fn apply(
        &mut self,
        version: u64,
        state: &BTreeMap<String, Any>,
        _changed: &[String],
    ) -> Result<(), String> {
        self.reconcile(state)?;
        tracing::debug!(version, services = self.ids.len(), "socket lb reconciled");
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
        let list = if external {
            &mut ext_frontends
        } else {
            &mut frontends
        };
        list.push((
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
        ));
    }
    Ok(Wanted {
        frontends,
        ext_frontends,
        backends,
        table,
    })
}

// === impl LbMaps for SockLb ===

impl LbMaps for SockLb {
    fn frontends(&mut self) -> Result<Vec<(LbFrontend, u32)>, String> {
        Ok(self
            .services()
            .map_err(|e| format!("{e:#}"))?
            .into_iter()
            .map(|(f, s)| (f, s.service_id))
            .collect())
    }
    fn backend_ids(&mut self) -> Result<Vec<u32>, String> {
        Ok(self
            .backends()
            .map_err(|e| format!("{e:#}"))?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
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
    fn upsert_service(&mut self, frontend: LbFrontend, service: LbService) -> Result<(), String> {
        SockLb::upsert_service(self, frontend, service).map_err(|e| format!("{e:#}"))
    }
    fn remove_service(&mut self, frontend: LbFrontend) -> Result<(), String> {
        SockLb::remove_service(self, frontend)
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    }
    fn ext_frontends(&mut self) -> Result<Vec<(LbFrontend, u32)>, String> {
        Ok(self
            .ext_services()
            .map_err(|e| format!("{e:#}"))?
            .into_iter()
            .map(|(f, s)| (f, s.service_id))
            .collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct FakeMaps {
        services: BTreeMap<LbFrontend, LbService>,
        backends: BTreeMap<u32, LbBackend>,
        tables: BTreeMap<u32, Vec<u32>>,
    }

    impl LbMaps for FakeMaps {
        fn frontends(&mut self) -> Result<Vec<(LbFrontend, u32)>, String> {
            Ok(self
                .services
                .iter()
                .map(|(f, s)| (*f, s.service_id))
                .collect())
        }
        fn backend_ids(&mut self) -> Result<Vec<u32>, String> {
            Ok(self.backends.keys().copied().collect())
        }
        fn upsert_backend(&mut self, id: u32, b: LbBackend) -> Result<(), String> {
            self.backends.insert(id, b);
            Ok(())
        }
        fn remove_backend(&mut self, id: u32) -> Result<(), String> {
            self.backends.remove(&id);
            Ok(())
        }
        fn set_table(&mut self, id: u32, ids: &[u32]) -> Result<(), String> {
            self.tables.insert(id, ids.to_vec());
            Ok(())
        }
        fn remove_table(&mut self, id: u32) -> Result<(), String> {
            self.tables.remove(&id);
            Ok(())
        }
        fn upsert_service(&mut self, f: LbFrontend, s: LbService) -> Result<(), String> {
            self.services.insert(f, s);
            Ok(())
        }
        fn remove_service(&mut self, f: LbFrontend) -> Result<(), String> {
            self.services.remove(&f);
            Ok(())
        }
    }

    fn service(backends: &[(u32, &str)]) -> (String, Any) {
        service_with_affinity(backends, 0)
    }

    fn service_with_affinity(backends: &[(u32, &str)], timeout_secs: u32) -> (String, Any) {
        let msg = proto::ServiceState {
            namespace: "default".into(),
            name: "web".into(),
            frontends: vec![proto::Frontend {
                kind: proto::FrontendKind::ClusterIp as i32,
                address: "10.96.0.10".into(),
                port: 80,
                protocol: proto::Protocol::Tcp as i32,
                port_name: String::new(),
                target_port: 8080,
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
            "service/default/web".into(),
            Any::from_msg(&msg).expect("encode"),
        )
    }

    #[test]
    fn a_cluster_ip_service_programs_its_frontend_backends_and_maglev_table() {
        let mut sink = LbSink::new(FakeMaps::default());
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
        let mut sink = LbSink::new(FakeMaps::default());
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
        let mut sink = LbSink::new(FakeMaps::default());
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
        sink.reconcile(&BTreeMap::new()).expect("reconcile");
        let maps = sink.maps();
        assert!(maps.services.is_empty() && maps.tables.is_empty() && maps.backends.is_empty());
    }
}
