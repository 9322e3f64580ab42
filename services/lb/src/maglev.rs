//! Maglev-style consistent hashing (after Eisenbud et al., NSDI 2016), as
//! plain Rust.
//!
//! The lookup table is a pure function of (backends sorted by address, their
//! weights, the seed, M): every node and every replica computes the same
//! table, before and after any restart, so only those inputs travel.
//!
//! - **Table size** M is one of [`TABLE_SIZES`] (primes, so every skip is
//!   coprime with M and each backend's permutation visits every slot).
//! - **Quotas**: a backend of weight w owns exactly its share M·w/W (W the
//!   total weight) rounded down, plus one slot for the largest remainders
//!   (equal remainders go by the backend's rank hash). With N equal weights
//!   that is ⌊M/N⌋ or ⌈M/N⌉ for every backend; weight 0 (drain) owns
//!   nothing.
//! - **Preferences**: as in Maglev, each backend has its own permutation of
//!   the slots, `slot(j) = (offset + skip·g(j)) mod M`. Unlike Maglev, `g`
//!   is a seeded shuffle of 0..M shared by all backends rather than the
//!   identity: with `g(j) = j`, two backends that draw the same skip walk
//!   the same line a few steps apart and keep colliding; such pairs gave
//!   the worst removals (2.3% of the survivors' slots with the round-robin
//!   fill, 1.01% with the assignment below, against means of 1.35% and
//!   0.64%).
//! - **Assignment**: a slot belongs to the backend that reaches it earliest
//!   in its permutation (ties by rank hash, then address), except that no
//!   backend takes more than its quota. Equivalently, it is the unique
//!   stable matching between backends (proposing in permutation order) and
//!   slots (preferring the earliest proposer), computed by deferred
//!   acceptance; being unique, it does not depend on who proposes first.
//!   The paper's round-robin fill (each backend takes its next free slot in
//!   turn) is not used: removing one of 100 backends at M = 16381 moved
//!   1.35% of the surviving backends' slots on average with it (the same
//!   with ideal random permutations, so inherent to round-robin at
//!   M/N ≈ 164) and 0.66% with this assignment (docs/benchmarks.md).
//! - **Hashes**: the 12-byte seed is split into keys (bytes 0..8 and
//!   4..12, each run through the splitmix64 finalizer with distinct
//!   constants). Each key drives [`keyed_hash`], a 64-bit multiply/xor-shift
//!   mix (the murmur3/splitmix `fmix64` finalizer) over the backend's
//!   address octets: `offset = h(k_offset) mod M`,
//!   `skip = h(k_skip) mod (M-1) + 1`, `rank = h(k_rank)`; a splitmix64
//!   stream from `k_shuffle` drives the Fisher–Yates shuffle `g`. It is not
//!   a cryptographic MAC; it only needs to be well spread and identical
//!   everywhere.

use std::net::Ipv4Addr;

use base64::Engine as _;

/// Supported table sizes (primes), as in Cilium.
pub const TABLE_SIZES: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
];
/// Default table size.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;
/// Seed length in bytes.
pub const SEED_LEN: usize = 12;

/// Invalid Maglev parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    /// M is not one of the supported primes.
    #[error(
        "{field}: table size {value} is not supported (use one of {})",
        sizes()
    )]
    TableSize {
        /// The field or flag.
        field: String,
        /// The value given.
        value: u64,
    },
    /// The seed is not base64.
    #[error("{field}: seed is not valid base64: {reason}")]
    SeedEncoding {
        /// The field or flag.
        field: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// The seed does not decode to 12 bytes.
    #[error("{field}: seed must be base64 of exactly {SEED_LEN} bytes, got {len} bytes")]
    SeedLength {
        /// The field or flag.
        field: String,
        /// Decoded length.
        len: usize,
    },
}

fn sizes() -> String {
    TABLE_SIZES
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A validated table size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TableSize(u32);

impl TableSize {
    /// Accepts `value` if it is one of [`TABLE_SIZES`]; `field` names it in errors.
    pub fn new(field: &str, value: u64) -> Result<Self, MaglevError> {
        TABLE_SIZES
            .iter()
            .find(|m| u64::from(**m) == value)
            .map(|m| Self(*m))
            .ok_or_else(|| MaglevError::TableSize {
                field: field.into(),
                value,
            })
    }

    /// M.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for TableSize {
    fn default() -> Self {
        Self(DEFAULT_TABLE_SIZE)
    }
}

/// A validated 12-byte seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Seed([u8; SEED_LEN]);

impl Seed {
    /// Parses base64 (standard alphabet, padded); `field` names it in errors.
    pub fn from_base64(field: &str, text: &str) -> Result<Self, MaglevError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| MaglevError::SeedEncoding {
                field: field.into(),
                reason: e.to_string(),
            })?;
        let arr: [u8; SEED_LEN] =
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| MaglevError::SeedLength {
                    field: field.into(),
                    len: bytes.len(),
                })?;
        Ok(Self(arr))
    }

    /// A seed from raw bytes.
    pub fn from_bytes(bytes: [u8; SEED_LEN]) -> Self {
        Self(bytes)
    }

    /// A fresh random seed.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// The seed as base64.
    pub fn to_base64(self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// The hash keys derived from the seed.
    fn keys(self) -> Keys {
        let mut a = [0u8; 8];
        a.copy_from_slice(&self.0[0..8]);
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[4..12]);
        let (a, b) = (u64::from_le_bytes(a), u64::from_le_bytes(b));
        Keys {
            offset: fmix64(a ^ 0x9e37_79b9_7f4a_7c15),
            skip: fmix64(b ^ 0xc2b2_ae3d_27d4_eb4f),
            rank: fmix64(a ^ 0x1656_67b1_9e37_79f9),
            shuffle: fmix64(b ^ 0x85eb_ca77_c2b2_ae63),
        }
    }
}

/// The per-purpose hash keys of a seed (see the module doc).
#[derive(Debug, Clone, Copy)]
struct Keys {
    offset: u64,
    skip: u64,
    rank: u64,
    shuffle: u64,
}

/// One backend as Maglev sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weighted {
    /// Address (the sort key and the hash input).
    pub address: Ipv4Addr,
    /// Weight; 0 drains.
    pub weight: u32,
}

/// The lookup table: slot → index into the address-sorted backend list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Backends sorted by address (the indices in `slots` refer to these).
    pub backends: Vec<Weighted>,
    /// Slot owners; empty when no backend has a weight above 0.
    pub slots: Vec<u32>,
}

impl Table {
    /// Slots owned per backend, in `backends` order.
    pub fn counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.backends.len()];
        for s in &self.slots {
            c[*s as usize] += 1;
        }
        c
    }

    /// The address owning each slot.
    pub fn addresses(&self) -> Vec<Ipv4Addr> {
        self.slots
            .iter()
            .map(|s| self.backends[*s as usize].address)
            .collect()
    }
}

/// `fmix64` from murmur3: a bijective 64-bit mix.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The keyed 64-bit hash of `data` (see the module doc).
pub fn keyed_hash(key: u64, data: &[u8]) -> u64 {
    let mut h = key ^ (data.len() as u64).wrapping_mul(0x8764_8a5f_4b2f_3c91);
    for chunk in data.chunks(8) {
        let mut buf = [0u8; 8];
        buf[..chunk.len()].copy_from_slice(chunk);
        h = fmix64(h ^ u64::from_le_bytes(buf)).rotate_left(27);
    }
    fmix64(h)
}

/// One backend's preferences: its permutation of the slots and its rank.
#[derive(Debug, Clone, Copy)]
struct Preference {
    offset: u64,
    skip: u64,
    /// Breaks ties between backends reaching a slot at the same position,
    /// and between equal remainders when rounding quotas.
    rank: u64,
}

impl Preference {
    fn new(keys: Keys, address: Ipv4Addr, m: u64) -> Self {
        let o = address.octets();
        Self {
            offset: keyed_hash(keys.offset, &o) % m,
            skip: keyed_hash(keys.skip, &o) % (m - 1) + 1,
            rank: keyed_hash(keys.rank, &o),
        }
    }

    /// The slot at position `j` of this backend's permutation, given
    /// `g(j)` (the shared shuffle).
    fn slot(self, g_j: u32, m: u64) -> usize {
        ((self.offset + self.skip * u64::from(g_j)) % m) as usize
    }
}

/// Builds the table for `backends` (sorted by address here; a duplicate
/// address keeps its first weight).
pub fn build(backends: &[Weighted], seed: Seed, m: TableSize) -> Table {
    let mut backends = backends.to_vec();
    backends.sort_by_key(|b| b.address);
    backends.dedup_by_key(|b| b.address);
    if backends.iter().all(|b| b.weight == 0) {
        return Table {
            backends,
            slots: Vec::new(),
        };
    }
    let m = m.get();
    let keys = seed.keys();
    let prefs: Vec<Preference> = backends
        .iter()
        .map(|b| Preference::new(keys, b.address, u64::from(m)))
        .collect();
    let quotas = quotas(&backends, &prefs, m);
    let g = shuffle(keys.shuffle, m);
    let slots = deferred_acceptance(&prefs, &quotas, &g, m);
    Table { backends, slots }
}

/// Each backend's slot count: ⌊M·w/W⌋, plus one for the largest remainders
/// (largest-remainder apportionment), so the counts sum to M exactly and
/// none is more than one slot from its exact share. At least one weight is
/// above 0.
fn quotas(backends: &[Weighted], prefs: &[Preference], m: u32) -> Vec<u32> {
    let m = u64::from(m);
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    // M < 2^17 and a weight < 2^32, so M·w fits in a u64.
    let share = |i: usize| m * u64::from(backends[i].weight);
    let mut quotas: Vec<u32> = (0..backends.len())
        .map(|i| (share(i) / total) as u32)
        .collect();
    let short = m - quotas.iter().map(|q| u64::from(*q)).sum::<u64>();
    let mut by_remainder: Vec<usize> = (0..backends.len())
        .filter(|i| backends[*i].weight > 0)
        .collect();
    by_remainder.sort_by_key(|i| (std::cmp::Reverse(share(*i) % total), prefs[*i].rank, *i));
    for i in by_remainder.into_iter().take(short as usize) {
        quotas[i] += 1;
    }
    quotas
}

/// A Fisher–Yates shuffle of 0..M driven by splitmix64 from `key` (our own
/// generator, so the shuffle never changes with a dependency's version).
fn shuffle(key: u64, m: u32) -> Vec<u32> {
    let mut state = key;
    let mut g: Vec<u32> = (0..m).collect();
    for i in (1..g.len()).rev() {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        // Multiply-shift maps the 64-bit draw onto 0..=i.
        let k = ((u128::from(fmix64(state)) * (i as u128 + 1)) >> 64) as usize;
        g.swap(i, k);
    }
    g
}

/// Deferred acceptance (Gale–Shapley with capacities): each backend below
/// its quota proposes to the next slot of its permutation; a slot keeps the
/// proposer that reached it earliest (position, then rank, then address)
/// and sends the one it drops back to proposing. The result is the unique
/// stable matching, whatever the order of proposals.
fn deferred_acceptance(prefs: &[Preference], quotas: &[u32], g: &[u32], m: u32) -> Vec<u32> {
    const EMPTY: u32 = u32::MAX;
    let mut owner = vec![EMPTY; m as usize];
    // Position of each slot in its owner's permutation.
    let mut owner_pos = vec![0u32; m as usize];
    let mut next = vec![0u32; prefs.len()];
    let mut held = vec![0u32; prefs.len()];
    let mut proposing: Vec<usize> = (0..prefs.len()).rev().collect();
    let m64 = u64::from(m);
    while let Some(b) = proposing.pop() {
        let p = prefs[b];
        // Never runs past position M - 1: a backend short of its quota after
        // proposing to every slot would mean every slot is held by someone
        // while the holdings sum to less than the quotas, that is to M.
        while held[b] < quotas[b] {
            let j = next[b];
            next[b] += 1;
            let s = p.slot(g[j as usize], m64);
            let h = owner[s];
            let wins = h == EMPTY || {
                let hp = prefs[h as usize];
                (j, p.rank, b) < (owner_pos[s], hp.rank, h as usize)
            };
            if wins {
                if h != EMPTY {
                    held[h as usize] -= 1;
                    proposing.push(h as usize);
                }
                owner[s] = b as u32;
                owner_pos[s] = j;
                held[b] += 1;
            }
        }
    }
    owner
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> Seed {
        Seed::from_bytes(*b"membrane-lb!")
    }

    fn equal(n: u32) -> Vec<Weighted> {
        (0..n)
            .map(|i| Weighted {
                address: Ipv4Addr::from(0x0ac8_0000 + i * 7 + 1),
                weight: 1,
            })
            .collect()
    }

    #[test]
    fn with_n_equal_backends_every_backend_owns_floor_or_ceil_of_m_over_n_slots() {
        for &(m, n) in &[
            (251, 7),
            (16381, 100),
            (16381, 3),
            (65521, 1000),
            (1021, 1021),
        ] {
            let t = build(&equal(n), seed(), TableSize::new("m", m).expect("m"));
            let (lo, hi) = (m as usize / n as usize, (m as usize).div_ceil(n as usize));
            for c in t.counts() {
                assert!(c == lo || c == hi, "M={m} N={n}: {c} not in [{lo},{hi}]");
            }
        }
    }

    /// The share of the surviving backends' slots that change owner when
    /// `gone` is removed (its own slots must move; those do not count).
    fn disruption(before: &Table, after: &Table, gone: Ipv4Addr) -> f64 {
        let (before, after) = (before.addresses(), after.addresses());
        let survivors = before.iter().filter(|a| **a != gone).count();
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != gone && b != a)
            .count();
        moved as f64 / survivors as f64
    }

    /// The bound. Measured in release over 100 seeds x 100 removals
    /// (docs/benchmarks.md): mean 0.66%, worst 0.88% at M = 16381; the
    /// paper's round-robin fill was at 1.35% / 2.31% there.
    #[test]
    fn removing_any_one_of_100_backends_moves_at_most_1_percent_of_the_survivors_slots() {
        let all = equal(100);
        for (m, seeds, removals) in [(16381u64, 4u8, 0..100usize), (65521, 1, 0..5)] {
            let m = TableSize::new("m", m).expect("m");
            for seed_byte in 0..seeds {
                let seed = Seed::from_bytes([seed_byte.wrapping_mul(37); SEED_LEN]);
                let before = build(&all, seed, m);
                for removed in removals.clone().step_by(4) {
                    let mut rest = all.clone();
                    let gone = rest.remove(removed).address;
                    let d = disruption(&before, &build(&rest, seed, m), gone);
                    assert!(
                        d <= 0.01,
                        "M={} seed {seed_byte}: removing #{removed} moved {:.2}% of the survivors' slots",
                        m.get(),
                        d * 100.0
                    );
                }
            }
        }
    }

    #[test]
    fn no_backend_and_slot_would_both_rather_be_matched_to_each_other() {
        // Stability: if backend b reaches slot s before the last slot b
        // owns, s's owner must have reached s earlier still (or tied and
        // won on rank), otherwise b and s would both prefer each other.
        let m = 1021u32;
        let t = build(
            &equal(30),
            seed(),
            TableSize::new("m", m.into()).expect("m"),
        );
        let keys = seed().keys();
        let g = shuffle(keys.shuffle, m);
        let prefs: Vec<Preference> = t
            .backends
            .iter()
            .map(|b| Preference::new(keys, b.address, m.into()))
            .collect();
        // pos[b][s]: where slot s comes in backend b's permutation.
        let pos: Vec<Vec<u32>> = prefs
            .iter()
            .map(|p| {
                let mut pos = vec![0u32; m as usize];
                for (j, g_j) in g.iter().enumerate() {
                    pos[p.slot(*g_j, m.into())] = j as u32;
                }
                pos
            })
            .collect();
        for b in 0..prefs.len() {
            let last = (0..m as usize)
                .filter(|s| t.slots[*s] as usize == b)
                .map(|s| pos[b][s])
                .max()
                .expect("every backend owns a slot");
            for (s, owner) in t.slots.iter().enumerate() {
                let h = *owner as usize;
                if h != b && pos[b][s] < last {
                    assert!(
                        (pos[h][s], prefs[h].rank, h) < (pos[b][s], prefs[b].rank, b),
                        "backend {b} and slot {s} block the matching"
                    );
                }
            }
        }
    }

    #[test]
    fn the_same_inputs_in_any_order_give_the_identical_table() {
        let m = TableSize::default();
        let mut b = equal(50);
        let t1 = build(&b, seed(), m);
        b.reverse();
        assert_eq!(build(&b, seed(), m), t1);
        let other = build(&b, Seed::from_bytes([7; 12]), m);
        assert_ne!(other.slots, t1.slots, "the seed changes the table");
    }

    #[test]
    fn weights_are_respected_to_within_one_slot_and_weight_zero_drains() {
        let m = TableSize::default();
        let weights = [1u32, 2, 3, 4, 0, 10, u32::MAX / 4];
        let backends: Vec<Weighted> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Weighted {
                address: Ipv4Addr::new(10, 0, 0, i as u8 + 1),
                weight: *w,
            })
            .collect();
        let t = build(&backends, seed(), m);
        assert_eq!(t.slots.len(), m.get() as usize);
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        for (b, c) in t.backends.iter().zip(t.counts()) {
            let exact = u64::from(m.get()) * u64::from(b.weight);
            let (lo, hi) = (exact / total, exact.div_ceil(total));
            assert!(
                (lo..=hi).contains(&(c as u64)),
                "{}: weight {} owns {c}, want {lo} or {hi}",
                b.address,
                b.weight
            );
        }
        let drained = backends
            .iter()
            .map(|b| Weighted { weight: 0, ..*b })
            .collect::<Vec<_>>();
        assert!(build(&drained, seed(), m).slots.is_empty());
        assert!(build(&[], seed(), m).slots.is_empty());
    }

    #[test]
    fn more_backends_than_slots_gives_each_slot_a_distinct_backend() {
        let m = TableSize::new("m", 251).expect("m");
        let t = build(&equal(300), seed(), m);
        let counts = t.counts();
        assert_eq!(counts.iter().filter(|c| **c == 1).count(), 251);
        assert!(counts.iter().all(|c| *c <= 1));
    }

    #[test]
    fn bad_parameters_are_rejected_naming_the_field() {
        let e = TableSize::new("spec.m", 16383).expect_err("not in list");
        assert!(
            e.to_string()
                .starts_with("spec.m: table size 16383 is not supported"),
            "{e}"
        );
        let e = Seed::from_base64("--maglev-seed", "AAAA").expect_err("3 bytes");
        assert_eq!(
            e.to_string(),
            "--maglev-seed: seed must be base64 of exactly 12 bytes, got 3 bytes"
        );
        let e = Seed::from_base64("--maglev-seed", "not base64!").expect_err("encoding");
        assert!(
            e.to_string()
                .starts_with("--maglev-seed: seed is not valid base64"),
            "{e}"
        );
        let s = Seed::random();
        assert_eq!(Seed::from_base64("x", &s.to_base64()), Ok(s));
    }
}
