//! Per-decision latency percentiles (median, p99) for Castellan, cedar-policy and regorus over the
//! same generated policies; prints the markdown table kept in docs/benchmarks.md.
//! `cargo bench -p castellan-policy --bench percentiles`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod workload;

use std::hint::black_box;
use std::time::{Duration, Instant};
use workload::*;

/// Times each call separately, round-robin over the inputs, until `budget` is spent or `max` calls.
fn sample<T>(
    inputs: &[T],
    budget: Duration,
    max: usize,
    mut f: impl FnMut(&T) -> bool,
) -> (Vec<u64>, usize) {
    // Warm up: one pass, at most a tenth of the budget.
    let warm = Instant::now();
    for x in inputs {
        black_box(f(x));
        if warm.elapsed() > budget / 10 {
            break;
        }
    }
    let mut out = Vec::with_capacity(max.min(1 << 20));
    let mut allowed = 0;
    let start = Instant::now();
    let mut i = 0;
    while out.len() < max && start.elapsed() < budget {
        let x = &inputs[i % inputs.len()];
        let t = Instant::now();
        let a = black_box(f(x));
        out.push(t.elapsed().as_nanos() as u64);
        allowed += usize::from(a);
        i += 1;
    }
    out.sort_unstable();
    (out, allowed)
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn fmt(ns: u64) -> String {
    if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else if ns >= 1_000 {
        format!("{:.2} µs", ns as f64 / 1e3)
    } else {
        format!("{ns} ns")
    }
}

fn main() {
    // `cargo bench` passes `--bench`; an optional number scales the time budget (seconds/engine/size).
    let secs: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3.0);
    let budget = Duration::from_secs_f64(secs);
    println!("| rules | engine | median | p99 | mean | decisions timed | allowed |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    let mut medians: Vec<(usize, &str, u64)> = Vec::new();
    // BENCH_SIZES=10000 (comma-separated) limits the sizes.
    let sizes: Vec<usize> = std::env::var("BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_else(|| vec![10, 100, 1000, 10_000]);
    for size in sizes {
        let rules = generate_rules(size, size as u64);
        let reqs = generate_requests(&rules, 1024, size as u64);
        let mut e = Engines::build(&rules);
        let ours: Vec<_> = reqs.iter().map(castellan_request).collect();
        let cedar: Vec<_> = reqs.iter().map(cedar_request).collect();
        let rego: Vec<_> = reqs.iter().map(rego_value).collect();
        // BENCH_ENGINES=castellan (comma-separated) limits the run, e.g. for profiling.
        let only = std::env::var("BENCH_ENGINES").unwrap_or_default();
        let want = |n: &str| only.is_empty() || only.split(',').any(|o| n.starts_with(o));
        let mut runs: Vec<(&str, (Vec<u64>, usize))> = Vec::new();
        if want("castellan") {
            runs.push((
                "castellan",
                sample(&ours, budget, 5_000_000, |r| {
                    e.castellan.decide(r).is_allowed()
                }),
            ));
        }
        if want("cedar-policy") {
            runs.push((
                "cedar-policy",
                sample(&cedar, budget, 5_000_000, |r| {
                    e.cedar
                        .is_authorized(r, &e.cedar_policies, &e.cedar_entities)
                        .decision()
                        == cedar_policy::Decision::Allow
                }),
            ));
        }
        if want("regorus") {
            runs.push((
                "regorus",
                sample(&rego, budget, 5_000_000, |r| rego_allows(&mut e.rego, r)),
            ));
        }
        for (name, (t, allowed)) in &runs {
            let mean = t.iter().sum::<u64>() / t.len().max(1) as u64;
            println!(
                "| {size} | {name} | {} | {} | {} | {} | {:.0}% |",
                fmt(pct(t, 0.5)),
                fmt(pct(t, 0.99)),
                fmt(mean),
                t.len(),
                100.0 * *allowed as f64 / t.len().max(1) as f64
            );
            medians.push((size, name, pct(t, 0.5)));
        }
    }
    println!();
    let med = |s: usize, n: &str| {
        medians
            .iter()
            .find(|m| m.0 == s && m.1 == n)
            .map_or(0, |m| m.2)
            .max(1)
    };
    println!(
        "At 1,000 rules: cedar-policy median / castellan median = {:.1}x; regorus / castellan = {:.1}x",
        med(1000, "cedar-policy") as f64 / med(1000, "castellan") as f64,
        med(1000, "regorus") as f64 / med(1000, "castellan") as f64
    );
    println!(
        "Castellan median growth from 10 to 10,000 rules: {:.2}x",
        med(10_000, "castellan") as f64 / med(10, "castellan") as f64
    );
}
