//! Renewal of leaf certificates before they expire, for a process that can
//! read the CA key.
//!
//! Who runs it: whoever holds the CA key. In a local cluster that is the
//! state directory's `tls/` (written by `membrane up`), so `membrane up` (or
//! a small supervisor next to it) can run [`spawn_renewal`] for every leaf;
//! the components themselves only need [`ReloadingTls`](super::ReloadingTls),
//! which picks the renewed files up. Services never get the CA key.

use std::path::PathBuf;
use std::time::Duration;

use crate::pki::{self, LeafSpec};

/// When and how often to renew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenewalPolicy {
    /// How often the certificates are looked at.
    pub check_every: Duration,
    /// A certificate with less than this left is re-issued.
    pub margin: Duration,
}

impl Default for RenewalPolicy {
    /// Hourly checks; renewal when a third of [`pki::LEAF_VALIDITY`] is left.
    fn default() -> Self {
        Self {
            check_every: Duration::from_secs(60 * 60),
            margin: pki::RENEW_MARGIN,
        }
    }
}

/// Keeps the leaf `leaf` in the PKI directory `dir` renewed with the default
/// [`RenewalPolicy`]: checked at once, then hourly; re-issued from the CA in
/// `dir` when a third of its validity is left (or when it no longer verifies
/// against the CA, or lacks a name).
pub fn spawn_renewal(dir: impl Into<PathBuf>, leaf: LeafSpec) -> tokio::task::JoinHandle<()> {
    spawn_renewal_with(dir, vec![leaf], RenewalPolicy::default())
}

/// [`spawn_renewal`] for several leaves, with an explicit policy.
pub fn spawn_renewal_with(
    dir: impl Into<PathBuf>,
    leaves: Vec<LeafSpec>,
    policy: RenewalPolicy,
) -> tokio::task::JoinHandle<()> {
    let dir = dir.into();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(policy.check_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for leaf in &leaves {
                let (d, l) = (dir.clone(), leaf.clone());
                let renewed =
                    tokio::task::spawn_blocking(move || pki::renew_if_due(&d, &l, policy.margin))
                        .await;
                match renewed {
                    Ok(Ok(true)) => {
                        tracing::info!(leaf = %leaf.name, dir = %dir.display(), "certificate renewed")
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(leaf = %leaf.name, error = %e, "certificate renewal failed; retrying later")
                    }
                    Err(e) => {
                        tracing::warn!(leaf = %leaf.name, error = %e, "certificate renewal task failed")
                    }
                }
            }
        }
    })
}
