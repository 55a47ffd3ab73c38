//! Criterion benchmark: time per decision for Castellan, cedar-policy and regorus over the same
//! generated policies at 10, 100, 1,000 and 10,000 rules. `cargo bench -p castellan-policy --bench decide`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod workload;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;
use workload::*;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(20);
    for size in [10usize, 100, 1000, 10_000] {
        let rules = generate_rules(size, size as u64);
        let reqs = generate_requests(&rules, 512, size as u64);
        let mut e = Engines::build(&rules);
        let ours: Vec<_> = reqs.iter().map(castellan_request).collect();
        let cedar: Vec<_> = reqs.iter().map(cedar_request).collect();
        let rego: Vec<_> = reqs.iter().map(rego_value).collect();
        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::new("castellan", size), &size, |b, _| {
            b.iter(|| {
                i = (i + 1) % ours.len();
                black_box(e.castellan.decide(&ours[i]))
            })
        });
        group.bench_with_input(BenchmarkId::new("cedar", size), &size, |b, _| {
            b.iter(|| {
                i = (i + 1) % cedar.len();
                black_box(
                    e.cedar
                        .is_authorized(&cedar[i], &e.cedar_policies, &e.cedar_entities),
                )
            })
        });
        group.bench_with_input(BenchmarkId::new("regorus", size), &size, |b, _| {
            b.iter(|| {
                i = (i + 1) % rego.len();
                black_box(rego_allows(&mut e.rego, &rego[i]))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
