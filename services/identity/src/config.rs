//! The service's configuration, validated: the range it allocates from, the
//! label filter, lease and GC timing. Flags parse into this (see `main.rs`).

use std::time::Duration;

use crate::error::IdentityError;
use crate::labels::LabelFilter;
use crate::numbers::IdRange;

/// How the identity service behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    /// Numbers for global identities.
    pub range: IdRange,
    /// Labels that do not count towards an identity.
    pub filter: LabelFilter,
    /// TTL of each node's lease, in seconds (etcd leases have whole seconds).
    pub lease_ttl_secs: i64,
    /// How long an identity stays after losing its last reference.
    pub gc_grace: Duration,
    /// How often each replica looks for identities to collect.
    pub gc_interval: Duration,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            range: IdRange::default(),
            filter: LabelFilter::default(),
            lease_ttl_secs: 30,
            gc_grace: Duration::from_secs(60),
            gc_interval: Duration::from_secs(10),
        }
    }
}

/// Parses a duration: a number with a unit `ms`, `s`, `m` or `h`
/// (`500ms`, `2s`, `1.5s`, `1m`); a bare number means seconds.
pub fn parse_duration(flag: &str, s: &str) -> Result<Duration, IdentityError> {
    let invalid = |reason: &str| IdentityError::InvalidConfig {
        flag: flag.into(),
        value: s.into(),
        reason: reason.into(),
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| invalid("expected a number with a unit, e.g. 500ms, 2s, 1m"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(invalid("the unit must be ms, s, m or h")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| invalid("out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_humans_write_them() {
        let d = |s| parse_duration("gc-grace", s).expect("valid");
        assert_eq!(d("500ms"), Duration::from_millis(500));
        assert_eq!(d("2s"), Duration::from_secs(2));
        assert_eq!(d("1.5s"), Duration::from_millis(1500));
        assert_eq!(d("60"), Duration::from_secs(60));
        assert_eq!(d("1m"), Duration::from_secs(60));
        let err = parse_duration("gc-grace", "5 parsecs").expect_err("bad unit");
        assert_eq!(
            err.to_string(),
            "gc-grace: invalid value `5 parsecs`: the unit must be ms, s, m or h"
        );
        assert!(parse_duration("gc-grace", "").is_err());
    }
}
