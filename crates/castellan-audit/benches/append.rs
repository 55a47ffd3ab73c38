//! The audit work a request pays: chain (serialize + SHA-256) one record into the spool's
//! group and wait until the group holding it is written, while other threads append and a
//! shipper reads, acknowledges and fsyncs as a proxy's does.
//!
//! `cargo bench -p castellan-audit --bench append -- [RECORDS_PER_THREAD] [THREADS] [TASKS]`
//! (default 200000 2 16). Rows: blocking appends (one request at a time per thread), then each
//! thread a tokio runtime with TASKS tasks appending and awaiting their records, as a proxy's
//! request threads do with concurrent requests. CPU is the appending threads' own
//! (`/proc/thread-self/schedstat`): they also write the groups.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stdout
)]

use castellan_audit::spool::Spool;
use castellan_audit::{Entry, Inputs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A record like a gateway's: a user, roles, a claim a condition read, a query.
fn entry(i: u64) -> Entry {
    Entry {
        time_ms: 1_764_500_000_000 + i as i64,
        decision_id: format!("{i:024x}"),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".to_owned(),
        source: "spiffe://demo.castellan/svc/gateway".to_owned(),
        user: "alice".to_owned(),
        destination: "orders".to_owned(),
        method: "GET".to_owned(),
        path: format!("/orders/{}?page=2", i % 100),
        decision: "allow".to_owned(),
        rule: "orders-api/customers-read-own-orders".to_owned(),
        reason: "allowed".to_owned(),
        mode: "enforce".to_owned(),
        status: 200,
        latency_us: 180,
        inputs: Some(Inputs {
            roles: vec!["customer".to_owned()],
            ..Inputs::default()
        }),
        ..Entry::default()
    }
}

/// CPU time of the calling thread, in ns.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn pct(v: &[u64], p: usize) -> f64 {
    v.get(v.len() * p / 100).copied().unwrap_or(0) as f64 / 1000.0
}

/// Which way the appending threads wait.
#[derive(Clone, Copy)]
enum Waiting {
    /// `Spool::append`: one record at a time per thread.
    Blocking,
    /// This many tasks per thread, each awaiting its record.
    Tasks(u64),
}

/// Appends `n` records on each of `threads` threads, with a shipper when `ship`.
fn run(n: u64, threads: u64, ship: bool, waiting: Waiting) {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), "bench", "e1", 1 << 34).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let shipper = ship.then(|| {
        let (spool, stop) = (spool.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last_sync = Instant::now();
            let mut shipped = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let batch = spool.next_batch(1000, false).unwrap();
                if let Some(last) = batch.last() {
                    shipped += batch.len() as u64;
                    let seq = serde_json::from_str::<serde_json::Value>(last).unwrap()["seq"]
                        .as_u64()
                        .unwrap();
                    spool.ack(seq).unwrap();
                } else {
                    std::thread::sleep(Duration::from_millis(1));
                }
                if last_sync.elapsed() > Duration::from_millis(100) {
                    spool.sync().unwrap();
                    last_sync = Instant::now();
                }
            }
            shipped
        })
    });
    let t0 = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let spool = spool.clone();
            std::thread::spawn(move || {
                let entries: Vec<Entry> = (0..n).map(|i| entry(t * n + i)).collect();
                let cpu0 = thread_cpu_ns();
                let lat = match waiting {
                    Waiting::Blocking => {
                        let mut lat = Vec::with_capacity(n as usize);
                        for e in entries {
                            let s = Instant::now();
                            spool.append(e).unwrap();
                            lat.push(s.elapsed().as_nanos() as u64);
                        }
                        lat
                    }
                    Waiting::Tasks(k) => {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .build()
                            .unwrap();
                        let queue = Arc::new(std::sync::Mutex::new(entries));
                        rt.block_on(async {
                            let tasks: Vec<_> = (0..k)
                                .map(|_| {
                                    let (spool, queue) = (spool.clone(), queue.clone());
                                    tokio::spawn(async move {
                                        let mut lat = Vec::new();
                                        loop {
                                            let Some(e) = queue.lock().unwrap().pop() else {
                                                return lat;
                                            };
                                            let s = Instant::now();
                                            let seq = spool.enqueue(e).unwrap();
                                            spool.written(seq).await.unwrap();
                                            lat.push(s.elapsed().as_nanos() as u64);
                                            // Other requests' work between two records.
                                            tokio::task::yield_now().await;
                                        }
                                    })
                                })
                                .collect();
                            let mut lat = Vec::with_capacity(n as usize);
                            for t in tasks {
                                lat.extend(t.await.unwrap());
                            }
                            lat
                        })
                    }
                };
                (thread_cpu_ns() - cpu0, lat)
            })
        })
        .collect();
    let mut cpu = 0;
    let mut lat = Vec::new();
    for w in workers {
        let (c, l) = w.join().unwrap();
        cpu += c;
        lat.extend(l);
    }
    let wall = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let shipped = shipper.map(|s| s.join().unwrap());
    lat.sort_unstable();
    let total = n * threads;
    println!(
        "{threads} thread(s), {}{}: {:.2} µs CPU per record (the appending threads, which also write), wait for the write p50 {:.1} µs p99 {:.1} µs p99.9 {:.1} µs max {:.1} µs, {:.1} records per write, {:.0} records/s{}",
        match waiting {
            Waiting::Blocking => "blocking".to_owned(),
            Waiting::Tasks(k) => format!("{k} tasks each"),
        },
        if ship { " + shipper" } else { "" },
        cpu as f64 / total as f64 / 1000.0,
        pct(&lat, 50),
        pct(&lat, 99),
        lat.get(lat.len() * 999 / 1000).copied().unwrap_or(0) as f64 / 1000.0,
        lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        total as f64 / spool.groups().max(1) as f64,
        total as f64 / wall.as_secs_f64(),
        shipped.map_or(String::new(), |s| format!(", {s} shipped meanwhile")),
    );
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(200_000);
    let threads = args.get(1).copied().unwrap_or(2);
    let tasks = args.get(2).copied().unwrap_or(16);
    run(n, 1, false, Waiting::Blocking);
    run(n, threads, true, Waiting::Blocking);
    run(n, threads, true, Waiting::Tasks(tasks));
}
