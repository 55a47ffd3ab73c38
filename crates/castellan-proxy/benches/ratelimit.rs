//! The cost of a rate-limit check: local GCRA (governor, keyed by user), and the Redis GCRA
//! script (one round trip) next to a plain Redis PING on the same connection.
//!
//! `cargo bench -p castellan-proxy --bench ratelimit` (Redis on 127.0.0.1:6379 for the second part)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

fn pct(v: &mut [u64], p: f64) -> f64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p) as usize] as f64
}

fn main() {
    // Local: 10,000 users, a generous limit (every check allowed, the common case).
    let limiter = RateLimiter::keyed(
        Quota::per_second(NonZeroU32::new(1_000_000).unwrap())
            .allow_burst(NonZeroU32::new(1_000_000).unwrap()),
    );
    let users: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
    for u in &users {
        let _ = limiter.check_key(u);
    }
    let n = 2_000_000;
    let t0 = Instant::now();
    for i in 0..n {
        // As the proxy does: the key is built per request.
        let key = users[i % users.len()].clone();
        std::hint::black_box(limiter.check_key(&key).is_ok());
    }
    println!(
        "local GCRA check (governor, 10k keys, key cloned per check): {:.0} ns/check",
        t0.elapsed().as_nanos() as f64 / n as f64
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let Ok(client) = redis::Client::open("redis://127.0.0.1:6379") else { return };
        let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_secs(2), redis::aio::ConnectionManager::new(client)).await else {
            println!("Redis: skipped (nothing on 127.0.0.1:6379)");
            return;
        };
        let script = redis::Script::new(castellan_proxy::ratelimit::GCRA);
        let (mut ping, mut gcra) = (Vec::new(), Vec::new());
        for i in 0..20_000 {
            let t = Instant::now();
            let _: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
            ping.push(t.elapsed().as_nanos() as u64);
            let t = Instant::now();
            let mut inv = script.key(format!("castellan:bench:{}", i % 1000));
            inv.arg(1).arg(1_000_000);
            let _: (i64, i64) = inv.invoke_async(&mut conn).await.unwrap();
            gcra.push(t.elapsed().as_nanos() as u64);
        }
        println!(
            "Redis round trip (PING): p50 {:.1} µs, p99 {:.1} µs; Redis GCRA check (EVALSHA, one round trip): p50 {:.1} µs, p99 {:.1} µs",
            pct(&mut ping, 0.5) / 1000.0, pct(&mut ping, 0.99) / 1000.0, pct(&mut gcra, 0.5) / 1000.0, pct(&mut gcra, 0.99) / 1000.0
        );
    });
}
