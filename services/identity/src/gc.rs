//! Garbage collection of identities nobody references, decided as plain
//! Rust over a consistent snapshot of the store; [`crate::store`] carries the
//! decisions out, each as one guarded transaction.
//!
//! An identity is unreferenced when no `refs/<id>/<node>` key exists (nodes
//! release them, or their lease expires and etcd deletes them). The marker
//! `unused/<id>` records since when (wall-clock milliseconds of the replica
//! that wrote it). Invariant: **a marker exists only if no reference was
//! added since its timestamp**, because
//! - it is only written by a transaction that checks that no reference
//!   exists (`Release` of the last reference, or [`Action::Mark`]), and
//! - `Allocate` deletes it in the same transaction that adds a reference.
//!
//! So an identity whose marker is older than the grace period has been
//! unreferenced for the whole grace period, and [`Action::Collect`] may
//! delete it, guarded by: still no reference, the marker unchanged, the
//! identity the same incarnation. See [`crate::store`] for why that guard
//! makes it impossible for an `Allocate` to lose its identity.

use std::collections::BTreeMap;

/// A marker as read: since when (Unix ms) and its etcd mod revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// When the identity was seen losing its last reference, Unix ms.
    pub since_ms: i64,
    /// The marker key's mod revision (the guard for acting on it).
    pub mod_revision: i64,
}

/// A snapshot of what GC needs, all read at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Global identities: number → create revision of `ids/<id>`.
    pub ids: BTreeMap<u32, i64>,
    /// Number of node references per identity (absent = none).
    pub refs: BTreeMap<u32, usize>,
    /// Markers per identity.
    pub markers: BTreeMap<u32, Marker>,
}

/// One GC decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The identity has no references and no marker (its last node's lease
    /// expired): start its grace period now.
    Mark {
        /// The identity.
        id: u32,
        /// Create revision of `ids/<id>` as read.
        create_revision: i64,
    },
    /// Unreferenced for longer than the grace period: delete it.
    Collect {
        /// The identity.
        id: u32,
        /// Create revision of `ids/<id>` as read.
        create_revision: i64,
        /// Mod revision of its marker as read.
        marker_revision: i64,
    },
    /// A marker whose identity no longer exists.
    DropMarker {
        /// The identity number.
        id: u32,
        /// Mod revision of the marker as read.
        marker_revision: i64,
    },
}

/// What to do, given `snap` at time `now_ms` with a grace period of `grace_ms`.
pub fn plan(snap: &Snapshot, now_ms: i64, grace_ms: i64) -> Vec<Action> {
    let mut actions = Vec::new();
    for (&id, &create_revision) in &snap.ids {
        if snap.refs.get(&id).copied().unwrap_or(0) > 0 {
            continue;
        }
        match snap.markers.get(&id) {
            None => actions.push(Action::Mark {
                id,
                create_revision,
            }),
            Some(m) if now_ms.saturating_sub(m.since_ms) >= grace_ms => {
                actions.push(Action::Collect {
                    id,
                    create_revision,
                    marker_revision: m.mod_revision,
                })
            }
            Some(_) => {}
        }
    }
    for (&id, m) in &snap.markers {
        if !snap.ids.contains_key(&id) {
            actions.push(Action::DropMarker {
                id,
                marker_revision: m.mod_revision,
            });
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(ids: &[u32], refs: &[(u32, usize)], markers: &[(u32, i64)]) -> Snapshot {
        Snapshot {
            ids: ids.iter().map(|&i| (i, i64::from(i) * 10)).collect(),
            refs: refs.iter().copied().collect(),
            markers: markers
                .iter()
                .map(|&(i, since_ms)| {
                    (
                        i,
                        Marker {
                            since_ms,
                            mod_revision: i64::from(i) * 100,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn referenced_identities_are_left_alone() {
        assert!(plan(&snap(&[300, 301], &[(300, 1), (301, 3)], &[]), 0, 1000).is_empty());
    }

    #[test]
    fn an_unreferenced_identity_without_a_marker_starts_its_grace_period() {
        assert_eq!(
            plan(&snap(&[300], &[], &[]), 5_000, 1000),
            vec![Action::Mark {
                id: 300,
                create_revision: 3000
            }]
        );
    }

    #[test]
    fn an_identity_is_collected_only_once_its_grace_period_is_over() {
        let s = snap(&[300, 301], &[], &[(300, 1_000), (301, 4_500)]);
        assert_eq!(
            plan(&s, 5_000, 4_000),
            vec![Action::Collect {
                id: 300,
                create_revision: 3000,
                marker_revision: 30_000
            }]
        );
        // A clock that went backwards never collects early.
        assert!(plan(&s, 0, 4_000).is_empty());
    }

    #[test]
    fn markers_of_vanished_identities_are_dropped() {
        assert_eq!(
            plan(&snap(&[], &[], &[(300, 0)]), 5_000, 1_000),
            vec![Action::DropMarker {
                id: 300,
                marker_revision: 30_000
            }]
        );
    }
}
