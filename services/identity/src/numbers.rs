//! Identity numbers: the reserved ones, the global range this service
//! allocates from, and where node-local CIDR identities start. The same
//! numbers are spelled out in `membrane/identity/v1/identity.proto`
//! (`ReservedIdentity`, `IdentityRange`); a test in [`crate::grpc`] keeps
//! both in step.

use std::collections::BTreeSet;
use std::fmt;

use crate::error::IdentityError;
use crate::labels::{Label, LabelSet};

/// First global identity: everything below is reserved.
pub const GLOBAL_MIN: u32 = 256;
/// Last global identity by default.
pub const GLOBAL_MAX: u32 = 65535;
/// First CIDR identity (`1 << 24`). CIDR identities are node-local: nodes
/// allocate them for the CIDRs their policy selects; this service never
/// allocates, stores or publishes them.
pub const CIDR_BASE: u32 = 1 << 24;

/// The identities with a fixed number and meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reserved {
    /// 0: what a lookup that finds nothing yields.
    Unknown,
    /// 1: the local host.
    Host,
    /// 2: outside the cluster.
    World,
    /// 3: endpoints Membrane does not manage.
    Unmanaged,
    /// 4: health-check endpoints.
    Health,
    /// 5: endpoints whose labels are not known yet.
    Init,
    /// 6: other nodes.
    RemoteNode,
}

// === impl Reserved ===

impl Reserved {
    /// Every reserved identity, by number.
    pub const ALL: [Reserved; 7] = [
        Reserved::Unknown,
        Reserved::Host,
        Reserved::World,
        Reserved::Unmanaged,
        Reserved::Health,
        Reserved::Init,
        Reserved::RemoteNode,
    ];

    /// Its number.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Its name, which is also the key of its label (`reserved:<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Reserved::Unknown => "unknown",
            Reserved::Host => "host",
            Reserved::World => "world",
            Reserved::Unmanaged => "unmanaged",
            Reserved::Health => "health",
            Reserved::Init => "init",
            Reserved::RemoteNode => "remote-node",
        }
    }

    /// Its label set: the single label `reserved:<name>`.
    pub fn labels(self) -> LabelSet {
        LabelSet::from_labels([Label::reserved(self.name())])
    }

    /// The reserved identity with number `id`, if any.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.get(usize::try_from(id).ok()?).copied()
    }
}

/// What kind of number an identity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One of the fixed ones.
    Reserved(Reserved),
    /// Below [`GLOBAL_MIN`] but not assigned a meaning.
    Unassigned,
    /// Cluster-wide, allocated by this service.
    Global,
    /// Node-local CIDR identity.
    Cidr,
}

/// Classifies an identity number.
pub fn kind(id: u32) -> Kind {
    if let Some(r) = Reserved::from_id(id) {
        Kind::Reserved(r)
    } else if id < GLOBAL_MIN {
        Kind::Unassigned
    } else if id < CIDR_BASE {
        Kind::Global
    } else {
        Kind::Cidr
    }
}

/// The numbers this replica allocates global identities from (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    first: u32,
    last: u32,
}

impl Default for IdRange {
    fn default() -> Self {
        Self {
            first: GLOBAL_MIN,
            last: GLOBAL_MAX,
        }
    }
}

impl fmt::Display for IdRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

// === impl IdRange ===

impl IdRange {
    /// A range inside the global space `[GLOBAL_MIN, CIDR_BASE)`.
    pub fn new(first: u32, last: u32) -> Result<Self, IdentityError> {
        if first < GLOBAL_MIN || last >= CIDR_BASE || first > last {
            return Err(IdentityError::InvalidConfig {
                flag: "identity-range".into(),
                value: format!("{first}-{last}"),
                reason: format!(
                    "must be FIRST-LAST with {GLOBAL_MIN} <= FIRST <= LAST < {CIDR_BASE}"
                ),
            });
        }
        Ok(Self { first, last })
    }

    /// Parses `FIRST-LAST`, e.g. `256-65535`.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let invalid = || IdentityError::InvalidConfig {
            flag: "identity-range".into(),
            value: s.into(),
            reason: "must be FIRST-LAST, e.g. 256-65535".into(),
        };
        let (a, b) = s.trim().split_once('-').ok_or_else(invalid)?;
        let first = a.trim().parse().map_err(|_| invalid())?;
        let last = b.trim().parse().map_err(|_| invalid())?;
        Self::new(first, last)
    }

    /// First number.
    pub fn first(&self) -> u32 {
        self.first
    }

    /// Last number.
    pub fn last(&self) -> u32 {
        self.last
    }

    /// How many numbers it holds.
    pub fn len(&self) -> u32 {
        self.last - self.first + 1
    }

    /// Never empty; here for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `id` is in it.
    pub fn contains(&self, id: u32) -> bool {
        (self.first..=self.last).contains(&id)
    }

    /// The number at offset `seed` (wrapping): a random candidate for
    /// callers that probe without listing what is used.
    pub fn nth_wrapping(&self, seed: u32) -> u32 {
        self.first + seed % self.len()
    }

    /// The first number not in `used`, scanning from offset `start`
    /// (callers randomize it so concurrent allocators rarely collide).
    pub fn pick_free(&self, used: &BTreeSet<u32>, start: u32) -> Option<u32> {
        let len = self.len();
        (0..len)
            .map(|i| self.first + start.wrapping_add(i) % len)
            .find(|id| !used.contains(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_identities_have_fixed_numbers_and_labels() {
        let got: Vec<(u32, String)> = Reserved::ALL
            .iter()
            .map(|r| (r.id(), r.labels().canonical()))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, "reserved:unknown".to_string()),
                (1, "reserved:host".into()),
                (2, "reserved:world".into()),
                (3, "reserved:unmanaged".into()),
                (4, "reserved:health".into()),
                (5, "reserved:init".into()),
                (6, "reserved:remote-node".into()),
            ]
        );
        assert_eq!(Reserved::from_id(6), Some(Reserved::RemoteNode));
        assert_eq!(Reserved::from_id(7), None);
    }

    #[test]
    fn numbers_are_classified_by_range() {
        assert_eq!(kind(1), Kind::Reserved(Reserved::Host));
        assert_eq!(kind(7), Kind::Unassigned);
        assert_eq!(kind(255), Kind::Unassigned);
        assert_eq!(kind(256), Kind::Global);
        assert_eq!(kind(CIDR_BASE - 1), Kind::Global);
        assert_eq!(kind(CIDR_BASE), Kind::Cidr);
    }

    #[test]
    fn ranges_stay_inside_the_global_space() {
        assert_eq!(IdRange::default().to_string(), "256-65535");
        assert_eq!(IdRange::default().len(), 65280);
        assert_eq!(IdRange::parse(" 300 - 310 ").expect("valid").len(), 11);
        for bad in ["255-300", "300-299", "300-16777216", "300", "a-b"] {
            assert!(IdRange::parse(bad).is_err(), "{bad}");
        }
        let err = IdRange::parse("10-20").expect_err("reserved overlap");
        assert_eq!(
            err.to_string(),
            "identity-range: invalid value `10-20`: must be FIRST-LAST with 256 <= FIRST <= LAST < 16777216"
        );
    }

    #[test]
    fn free_numbers_are_found_from_any_start_and_exhaustion_is_none() {
        let r = IdRange::new(256, 260).expect("valid");
        let mut used = BTreeSet::new();
        let mut start = 3u32;
        while let Some(id) = r.pick_free(&used, start) {
            assert!(r.contains(id));
            assert!(used.insert(id), "{id} handed out twice");
            start = start.wrapping_mul(7).wrapping_add(1);
        }
        assert_eq!(used.len(), 5);
        assert_eq!(r.pick_free(&used, 0), None);
        assert_eq!(r.nth_wrapping(5), 256);
        assert_eq!(r.nth_wrapping(7), 258);
    }
}
