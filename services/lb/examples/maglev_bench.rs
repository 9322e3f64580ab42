//! Maglev table build time: `cargo run --release -p membrane-lb --example maglev_bench`.
//!
//! Reference points (NOT same-run baselines: other hardware, other code):
//! Cilium's published 8.2 ms for M = 16381 with 1,000 backends, and the
//! Maglev paper's 1.8 ms for M = 65537. The same-run baseline is a naive
//! table of the same size filled with random backends (what `random`
//! selection would need, and a floor for touching M slots).

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

fn main() -> anyhow::Result<()> {
    let seed = Seed::random();
    println!(
        "{:>7} {:>9} {:>14} {:>16}",
        "M", "backends", "maglev (best)", "random-fill"
    );
    for m in [16381u64, 65521] {
        let size = TableSize::new("M", m)?;
        for n in [100u32, 1000] {
            let backends: Vec<Weighted> = (0..n)
                .map(|i| Weighted {
                    address: Ipv4Addr::from(0x0ac8_0000 + i),
                    weight: 1,
                })
                .collect();
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
    Ok(())
}
