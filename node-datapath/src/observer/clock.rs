//! Datapath timestamps (`bpf_ktime_get_ns`: `CLOCK_MONOTONIC`) to wall-clock
//! time. The offset between the two clocks is taken once, at start: the
//! monotonic clock does not jump, so a later `settimeofday`/NTP step shows
//! up as flow times off by the step until the agent restarts (as in Hubble).

use std::time::{SystemTime, UNIX_EPOCH};

/// Converts `CLOCK_MONOTONIC` nanoseconds to nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallClock {
    /// `CLOCK_REALTIME - CLOCK_MONOTONIC`, nanoseconds.
    offset_ns: i64,
}

impl WallClock {
    /// Measures the offset now (the smaller of three samples' read gaps wins).
    pub fn measure() -> Self {
        let mut best: Option<(i64, i64)> = None; // (gap, offset)
        for _ in 0..3 {
            let m0 = monotonic_ns();
            let r = realtime_ns();
            let m1 = monotonic_ns();
            let gap = m1 - m0;
            let offset = r - (m0 + gap / 2);
            if best.is_none_or(|(g, _)| gap < g) {
                best = Some((gap, offset));
            }
        }
        Self {
            offset_ns: best.map_or(0, |(_, o)| o),
        }
    }

    /// A clock with a known offset (tests).
    pub fn with_offset(offset_ns: i64) -> Self {
        Self { offset_ns }
    }

    /// Wall-clock nanoseconds for a datapath timestamp.
    pub fn wall_ns(&self, monotonic_ns: u64) -> i64 {
        i64::try_from(monotonic_ns)
            .unwrap_or(i64::MAX)
            .saturating_add(self.offset_ns)
    }
}

/// Nanoseconds since the epoch as a protobuf timestamp.
pub fn timestamp(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

/// A protobuf timestamp as nanoseconds since the epoch (saturating).
pub fn timestamp_ns(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1_000_000_000)
        .saturating_add(i64::from(t.nanos))
}

/// The wall clock now, nanoseconds since the epoch.
pub fn realtime_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock `bpf_ktime_get_ns` reads.
///
/// `std::time::Instant` reads the same clock but never exposes its value,
/// and this crate's `nix` has no `time` feature; hence the one libc call.
pub fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: `ts` is a valid, writable timespec for the duration of the
    // call; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datapath_timestamp_taken_now_converts_to_about_now() {
        let clock = WallClock::measure();
        let wall = clock.wall_ns(monotonic_ns() as u64);
        let diff = (wall - realtime_ns()).abs();
        assert!(diff < 50_000_000, "off by {diff} ns");
    }

    #[test]
    fn timestamps_round_trip_through_protobuf() {
        for ns in [0, 1, 1_700_000_000_123_456_789, -1] {
            assert_eq!(timestamp_ns(&timestamp(ns)), ns);
        }
        assert_eq!(WallClock::with_offset(10).wall_ns(5), 15);
    }
}
