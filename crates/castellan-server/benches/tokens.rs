//! Token service throughput, in one run: raw ES256 signatures per second (the ceiling),
//! `client_credentials` tokens per second over real TLS with 50 concurrent clients, and SVID
//! issuances per second through gRPC `Renew` over mTLS. Server and clients share the machine.
//!
//! `cargo bench -p castellan-server --bench tokens [-- SECONDS]`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use castellan_identity::SigningKey;
use castellan_proto::v1::identity_client::IdentityClient;
use castellan_proto::v1::{CertifyRequest, RenewRequest};
use castellan_server::{Server, ServerConfig};
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::CertificateDer;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn tls_client(bundle: &[CertificateDer<'static>]) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    for c in bundle {
        roots.add(c.clone()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(cfg)
        .http1_only()
        .build()
        .unwrap()
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(0) as f64 / 1000.0
}

fn raw_signing(secs: f64, threads: usize) -> f64 {
    let key = Arc::new(SigningKey::generate().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let (key, stop, count) = (key.clone(), stop.clone(), count.clone());
            std::thread::spawn(move || {
                let claims = json!({"iss": "https://127.0.0.1:8443", "sub": "billing", "aud": "example.org", "exp": 1, "iat": 1, "jti": "x", "scope": "orders.read"});
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    std::hint::black_box(key.sign_jws(&claims).unwrap());
                    n += 1;
                }
                count.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / secs
}

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5.0);
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("machine: {cores} cores; {secs} s per measurement");
    let one = raw_signing(secs, 1);
    let all = raw_signing(secs, cores);
    println!(
        "raw ES256 JWS signing (aws-lc-rs): {one:.0}/s on 1 thread, {all:.0}/s on {cores} threads"
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ServerConfig { data_dir: dir.path().join("data"), listen: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() };
        let init = castellan_server::init(&cfg, "example.org", None).await.unwrap();
        let running = Server::start(cfg, None).await.unwrap();
        let http = tls_client(&running.server.bundle());
        let r: serde_json::Value = http
            .post(format!("{}/v1/clients", running.url))
            .bearer_auth(&init.admin_token)
            .json(&json!({"name": "billing", "scopes": ["orders.read"]}))
            .send().await.unwrap().json().await.unwrap();
        let secret = r["client_secret"].as_str().unwrap().to_owned();

        // 50 concurrent clients, each its own keep-alive connection, client_secret_basic.
        let stop = Arc::new(AtomicBool::new(false));
        let url = format!("{}/oauth2/token", running.url);
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (c, url, secret, stop) = (tls_client(&running.server.bundle()), url.clone(), secret.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let resp = c.post(&url).basic_auth("billing", Some(&secret)).form(&[("grant_type", "client_credentials")]).send().await;
                    match resp {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                            lat.push(t.elapsed().as_micros() as u64);
                        }
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            }));
        }
        // Warm-up second, then measure.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t0 = Instant::now();
        let before = running.server.tokens_issued();
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        let issued = running.server.tokens_issued() - before;
        let elapsed = t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let mut lat = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await.unwrap();
            lat.extend(l);
            errors += e;
        }
        let rate = issued as f64 / elapsed;
        println!(
            "client_credentials over TLS, 50 concurrent clients: {rate:.0} tokens/s ({:.0}% of raw {cores}-thread signing); latency p50 {:.2} ms, p99 {:.2} ms; errors {errors}",
            100.0 * rate / all,
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99)
        );

        // SVID issuance: gRPC Renew over mTLS, 8 concurrent channels.
        let join: serde_json::Value = http
            .post(format!("{}/v1/services", running.url))
            .bearer_auth(&init.admin_token)
            .json(&json!({"name": "orders"}))
            .send().await.unwrap().json().await.unwrap();
        let bundle_pem = castellan_server::keys::pem_bundle(&running.server.bundle());
        let channel = |ident: Option<(String, String)>| {
            let mut tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(bundle_pem.clone()))
                .domain_name("localhost");
            if let Some((c, k)) = ident {
                tls = tls.identity(tonic::transport::Identity::from_pem(c, k));
            }
            tonic::transport::Channel::from_shared(running.url.replace("127.0.0.1", "localhost")).unwrap().tls_config(tls).unwrap()
        };
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default().serialize_request(&key).unwrap().der().to_vec();
        let svid = IdentityClient::new(channel(None).connect().await.unwrap())
            .certify(CertifyRequest { join_token: join["join_token"].as_str().unwrap().to_owned(), csr_der: csr.clone() })
            .await.unwrap().into_inner();
        let cert_pem = castellan_server::keys::pem_bundle(&[CertificateDer::from(svid.cert_chain[0].clone())]);
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let ch = channel(Some((cert_pem.clone(), key.serialize_pem()))).connect().await.unwrap();
            let (stop, count, csr) = (stop.clone(), count.clone(), csr.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = IdentityClient::new(ch);
                while !stop.load(Ordering::Relaxed) {
                    if c.renew(RenewRequest { csr_der: csr.clone() }).await.is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        let n = count.load(Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        println!(
            "SVID issuance (gRPC Renew over mTLS, CSR check + sign + store on SQLite), 8 concurrent: {:.0}/s",
            n as f64 / t0.elapsed().as_secs_f64()
        );
        running.shutdown().await;
    });
}
