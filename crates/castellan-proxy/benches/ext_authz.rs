//! Load generator for a decision point's ext_authz gRPC listener (Envoy's Check), used by
//! `benches/decision.sh`: a tonic client on one HTTP/2 connection.
//!
//!   cargo bench -p castellan-proxy --bench ext_authz -- ADDR STREAMS SECONDS RATE AUTHORIZATION
//!
//! RATE 0: STREAMS concurrent streams as fast as they go (throughput); RATE > 0: that many
//! checks per second in all (latency at a fixed rate). Prints checks, checks/s, allowed, and
//! latency percentiles in µs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use std::time::{Duration, Instant};

fn check(auth: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".to_owned(),
                    path: "/orders/42".to_owned(),
                    host: "shop.test".to_owned(),
                    headers: [("authorization".to_owned(), auth.to_owned())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (addr, streams, secs, rate, auth) = (
        a[0].clone(),
        a[1].parse::<usize>().unwrap(),
        a[2].parse::<u64>().unwrap(),
        a[3].parse::<u64>().unwrap(),
        a[4].clone(),
    );
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    let client = AuthorizationClient::new(ch);
    let req = check(&auth);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    if let Some(period) = 1_000_000_000u64.checked_div(rate) {
        let mut tick = tokio::time::interval(Duration::from_nanos(period));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while Instant::now() < end {
            tick.tick().await;
            let (mut c, req) = (client.clone(), req.clone());
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let r = c.check(req).await.unwrap().into_inner();
                (
                    vec![t.elapsed().as_micros() as u64],
                    u64::from(r.status.is_some_and(|s| s.code == 0)),
                )
            }));
        }
    } else {
        for _ in 0..streams {
            let (mut c, req) = (client.clone(), req.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut allowed = 0u64;
                while Instant::now() < end {
                    let t = Instant::now();
                    let r = c.check(req.clone()).await.unwrap().into_inner();
                    lat.push(t.elapsed().as_micros() as u64);
                    allowed += u64::from(r.status.is_some_and(|s| s.code == 0));
                }
                (lat, allowed)
            }));
        }
    }
    let mut all = Vec::new();
    let mut allowed = 0;
    for t in tasks {
        let (l, a) = t.await.unwrap();
        all.extend(l);
        allowed += a;
    }
    all.sort_unstable();
    let n = all.len() as u64;
    println!(
        "checks={n} checks_per_s={:.0} allowed={allowed} p50_us={} p99_us={} p999_us={} max_us={}",
        n as f64 / secs as f64,
        pct(&all, 0.50),
        pct(&all, 0.99),
        pct(&all, 0.999),
        all.last().copied().unwrap_or(0)
    );
}
