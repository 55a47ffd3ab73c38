//! Rate limits shared through the real Redis: two gateways, one limit; and a Redis of our own
//! stopped and started mid-test (the machine's Redis on 6379 is never stopped).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use castellan::demo::{Mesh, raw, start_mesh, tls_roots};
use castellan_proxy::{Mode, ProxyConfig, RunningProxy};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn post(m: &Mesh, path: &str, body: Value) -> Value {
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls_roots(&m.bundle).unwrap())
        .build()
        .unwrap();
    http.post(format!("{}{path}", m.server.url))
        .bearer_auth(&m.admin_token)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn gateway(m: &Mesh, id: &str, redis: &str) -> RunningProxy {
    let j = post(m, "/v1/services/gateway/join-token", json!({})).await;
    let mut g = ProxyConfig::new(
        Mode::Gateway,
        id,
        &m.server.url,
        m.bundle_path.clone(),
        m.dir.path().join(id),
    );
    g.join_token = j["join_token"].as_str().map(str::to_owned);
    g.routes = vec![("/admin".to_owned(), "orders".to_owned())];
    g.redis_url = Some(redis.to_owned());
    g.listen = (
        castellan::demo::GATEWAY_IP
            .parse::<std::net::IpAddr>()
            .unwrap(),
        0,
    )
        .into();
    let p = castellan_proxy::start(g).await.unwrap();
    p.ready(Duration::from_secs(10)).await.unwrap();
    let t0 = Instant::now();
    while p.state.endpoints("orders").is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p
}

/// A fresh admin user, so limits from earlier runs (kept in Redis for a minute) do not count.
async fn fresh_admin(m: &Mesh) -> (String, String) {
    let user = format!(
        "admin-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let k = post(m, "/v1/apikeys", json!({"user": user, "roles": ["admin"]})).await;
    (user, k["api_key"].as_str().unwrap().to_owned())
}

async fn known_to(gws: &[&RunningProxy], key: &str) {
    let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.as_bytes());
    let t0 = Instant::now();
    while gws.iter().any(|g| g.state.api_key(hash.as_ref()).is_none()) {
        assert!(t0.elapsed() < Duration::from_secs(10), "API key not pushed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn redis_keys(port: u16, pattern: &str) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--raw", "keys", pattern])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn redis_up(port: u16) -> bool {
    std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "ping"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_limit_through_redis() {
    if !redis_up(6379) {
        if std::env::var_os("CI").is_some() {
            panic!("Redis on 127.0.0.1:6379 is required in CI");
        }
        eprintln!("SKIPPED two_gateways_share_one_limit_through_redis: no Redis on 127.0.0.1:6379");
        return;
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let m = start_mesh().await.unwrap();
    let a = gateway(&m, "edge-a", "redis://127.0.0.1:6379").await;
    let b = gateway(&m, "edge-b", "redis://127.0.0.1:6379").await;
    let (user, key) = fresh_admin(&m).await;
    known_to(&[&a, &b], &key).await;
    let tls = Arc::new(tls_roots(&m.bundle).unwrap());
    let req = format!("GET /admin/stats HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n").into_bytes();
    let mut codes = Vec::new();
    for i in 0..8 {
        let gw = if i % 2 == 0 { &a } else { &b };
        codes.push(raw(gw.inbound, Some(tls.clone()), &req).await.unwrap().0);
    }
    assert_eq!(
        codes,
        [200, 200, 200, 200, 200, 429, 429, 429],
        "5 per minute across both gateways"
    );
    assert!(
        redis_keys(6379, &format!("castellan:rl:admin-api-per-user:{user}")).contains(&user),
        "the limit lives in Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_falls_back_to_local_limits_and_recovers() {
    if std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var_os("CI").is_some() {
            panic!("redis-server is required in CI");
        }
        eprintln!("SKIPPED redis_outage_falls_back_to_local_limits_and_recovers: no redis-server");
        return;
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start_redis = || {
        let c = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while !redis_up(port) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "our redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        c
    };
    let mut redis = start_redis();
    let m = start_mesh().await.unwrap();
    let gw = gateway(&m, "edge-r", &format!("redis://127.0.0.1:{port}")).await;
    let tls = Arc::new(tls_roots(&m.bundle).unwrap());
    let (user, key) = fresh_admin(&m).await;
    known_to(&[&gw], &key).await;
    let req = format!("GET /admin/stats HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n").into_bytes();
    assert_eq!(
        raw(gw.inbound, Some(tls.clone()), &req).await.unwrap().0,
        200
    );
    assert!(redis_keys(port, "castellan:rl:*").contains(&user));

    // Redis stops: the gateway keeps serving on its local limits — no 500, still limited.
    redis.kill().unwrap();
    redis.wait().unwrap();
    let mut codes = Vec::new();
    for _ in 0..7 {
        codes.push(raw(gw.inbound, Some(tls.clone()), &req).await.unwrap().0);
    }
    assert!(codes.iter().all(|c| *c == 200 || *c == 429), "{codes:?}");
    assert!(
        codes.contains(&200) && codes.contains(&429),
        "local limits decide: {codes:?}"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", gw.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("castellan_proxy_ratelimit_redis_fallbacks_total"),
        "fallback counted"
    );

    // Redis returns (empty): after the back-off the gateway uses it again.
    let mut redis = start_redis();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (user2, key2) = fresh_admin(&m).await;
    known_to(&[&gw], &key2).await;
    let req2 = format!("GET /admin/stats HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key2}\r\nConnection: close\r\n\r\n").into_bytes();
    let t0 = Instant::now();
    loop {
        assert_eq!(
            raw(gw.inbound, Some(tls.clone()), &req2).await.unwrap().0,
            200
        );
        if redis_keys(port, "castellan:rl:*").contains(&user2) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the gateway did not return to Redis"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = redis.kill();
    let _ = redis.wait();
}
