//! Maglev table build time and disruption:
//! `cargo run --release -p membrane-lb --no-default-features --example maglev_bench`.
//!
//! Reference points (NOT same-run baselines: other hardware, other code):
//! Cilium's published 8.2 ms for M = 16381 with 1,000 backends, and the
//! Maglev paper's 1.8 ms for M = 65537. The same-run baseline is a naive
//! table of the same size filled with random backends (what `random`
//! selection would need, and a floor for touching M slots).
//!
//! Disruption: for 100 equal backends, each of `SEEDS` seeds (default 100)
//! and each of the 100 removals, the share of the surviving backends' slots
//! whose owner changes (the removed backend's own slots must move and are
//! not counted); mean and worst over all of them.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use membrane_lb::maglev::{self, Seed, TableSize, Weighted};

fn time<T>(runs: u32, mut f: impl FnMut() -> T) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(f());
        best = best.min(t.elapsed());
    }
    best
}

fn equal(n: u32) -> Vec<Weighted> {
    (0..n)
        .map(|i| Weighted {
            address: Ipv4Addr::from(0x0ac8_0000 + i),
            weight: 1,
        })
        .collect()
}

/// Share of the survivors' slots that moved when `gone` was removed.
fn disruption(before: &[Ipv4Addr], after: &[Ipv4Addr], gone: Ipv4Addr) -> f64 {
    let survivors = before.iter().filter(|a| **a != gone).count();
    let moved = before
        .iter()
        .zip(after)
        .filter(|(b, a)| **b != gone && b != a)
        .count();
    moved as f64 / survivors as f64
}

// No anyhow: it belongs to the `server` feature, and this example builds
// without it.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seed = Seed::random();
    println!(
        "{:>7} {:>9} {:>14} {:>16}",
        "M", "backends", "maglev (best)", "random-fill"
    );
    for m in [16381u64, 65521] {
        let size = TableSize::new("M", m)?;
        for n in [100u32, 1000] {
            let backends = equal(n);
            let mg = time(20, || maglev::build(&backends, seed, size));
            let naive = time(20, || {
                (0..m)
                    .map(|_| rand::random_range(0..n))
                    .collect::<Vec<u32>>()
            });
            println!(
                "{m:>7} {n:>9} {:>11.3} ms {:>13.3} ms",
                mg.as_secs_f64() * 1e3,
                naive.as_secs_f64() * 1e3
            );
        }
    }
    println!(
        "reference (not same-run): Cilium 8.2 ms for M=16381/1,000 backends; Maglev paper 1.8 ms for M=65537"
    );

    let seeds: u32 = std::env::var("SEEDS").map_or(Ok(100), |s| s.parse())?;
    let all = equal(100);
    for m in [16381u64, 65521] {
        let size = TableSize::new("M", m)?;
        let (mut sum, mut worst, mut samples) = (0.0f64, 0.0f64, 0u32);
        for _ in 0..seeds {
            let seed = Seed::random();
            let before = maglev::build(&all, seed, size).addresses();
            for removed in 0..all.len() {
                let mut rest = all.clone();
                let gone = rest.remove(removed).address;
                let d = disruption(&before, &maglev::build(&rest, seed, size).addresses(), gone);
                sum += d;
                worst = worst.max(d);
                samples += 1;
            }
        }
        println!(
            "M={m}: removing one of 100 backends moves {:.3}% (mean) / {:.3}% (worst) of the survivors' slots ({samples} removals, {seeds} seeds)",
            sum / f64::from(samples) * 100.0,
            worst * 100.0
        );
    }
    Ok(())
}
