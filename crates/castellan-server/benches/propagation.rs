//! Policy propagation: `policy apply` on the admin API → the new revision in force at N
//! watching proxies (simulated in this process: each holds its own TLS connection and watch
//! stream, and compiles the pushed revision with the engine as a proxy does).
//!
//! `cargo bench -p castellan-server --bench propagation [-- WATCHERS APPLIES]`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use castellan_proto::v1::distribution_client::DistributionClient;
use castellan_proto::v1::identity_client::IdentityClient;
use castellan_proto::v1::{CertifyRequest, WatchRequest};
use castellan_server::{Server, ServerConfig};
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let watchers = args.first().copied().unwrap_or(200);
    let applies = args.get(1).copied().unwrap_or(20);
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ServerConfig { data_dir: dir.path().join("data"), listen: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() };
        let init = castellan_server::init(&cfg, "demo.castellan", None).await.unwrap();
        let running = Server::start(cfg, None).await.unwrap();
        let bundle = running.server.bundle();
        let bundle_pem = castellan_server::keys::pem_bundle(&bundle);
        let mut roots = rustls::RootCertStore::empty();
        for c in &bundle {
            roots.add(c.clone()).unwrap();
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions().unwrap().with_root_certificates(roots).with_no_client_auth();
        let http = reqwest::Client::builder().tls_backend_preconfigured(tls).build().unwrap();
        let admin = |path: &str, body: Value| {
            let (http, url, tok) = (http.clone(), running.url.clone(), init.admin_token.clone());
            let path = path.to_owned();
            async move { http.post(format!("{url}{path}")).bearer_auth(tok).json(&body).send().await.unwrap().json::<Value>().await.unwrap() }
        };
        let j = admin("/v1/services", json!({"name": "orders"})).await;
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default().serialize_request(&key).unwrap().der().to_vec();
        let ch = |ident: Option<(String, String)>| {
            let mut t = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(bundle_pem.clone()));
            if let Some((c, k)) = ident {
                t = t.identity(tonic::transport::Identity::from_pem(c, k));
            }
            tonic::transport::Channel::from_shared(running.url.clone()).unwrap().tls_config(t).unwrap()
        };
        let svid = IdentityClient::new(ch(None).connect().await.unwrap())
            .certify(CertifyRequest { join_token: j["join_token"].as_str().unwrap().to_owned(), csr_der: csr }).await.unwrap().into_inner();
        let cert_pem = castellan_server::keys::pem_bundle(&[CertificateDer::from(svid.cert_chain[0].clone())]);

        let policy_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo/policies");
        let mut files = serde_json::Map::new();
        for e in std::fs::read_dir(&policy_dir).unwrap() {
            let p = e.unwrap().path();
            let n = p.file_name().unwrap().to_str().unwrap().to_owned();
            if n.ends_with(".yaml") && !n.ends_with("_test.yaml") {
                files.insert(n, Value::String(std::fs::read_to_string(&p).unwrap()));
            }
        }
        admin("/v1/policy", json!({"files": files})).await;

        // (revision, received at, enforced at) per watcher.
        let seen: Arc<Mutex<Vec<(i64, Instant, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
        let t_connect = Instant::now();
        for i in 0..watchers {
            let channel = ch(Some((cert_pem.clone(), key.serialize_pem()))).connect().await.unwrap();
            let seen = seen.clone();
            let mut stream = DistributionClient::new(channel).watch(WatchRequest { proxy_id: format!("sim-{i}") }).await.unwrap().into_inner();
            tokio::spawn(async move {
                while let Ok(Some(u)) = stream.message().await {
                    if let Some(p) = u.policy {
                        let received = Instant::now();
                        let files: Vec<(String, String)> = p.files.into_iter().collect();
                        let set = castellan_policy::PolicySet::from_sources(files.iter().map(|(n, t)| (n.as_str(), t.as_str()))).unwrap();
                        std::hint::black_box(set.rule_count());
                        seen.lock().unwrap().push((p.revision, received, Instant::now()));
                    }
                }
            });
        }
        while seen.lock().unwrap().len() < watchers {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!("{watchers} watchers connected and holding the snapshot in {:?}", t_connect.elapsed());

        let (mut recv, mut enforce) = (Vec::new(), Vec::new());
        for k in 0..applies {
            let mut f = files.clone();
            let orders = f["orders.yaml"].as_str().unwrap().to_owned() + &format!("\n# change {k}\n");
            f.insert("orders.yaml".to_owned(), Value::String(orders));
            let t0 = Instant::now();
            let rev = admin("/v1/policy", json!({"files": f})).await["revision"].as_i64().unwrap();
            loop {
                let n = seen.lock().unwrap().iter().filter(|(r, _, _)| *r == rev).count();
                if n == watchers {
                    break;
                }
                assert!(t0.elapsed() < Duration::from_secs(30), "revision {rev} reached only {n} watchers");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            for (_, r, e) in seen.lock().unwrap().iter().filter(|(r, _, _)| *r == rev) {
                recv.push((*r - t0).as_secs_f64() * 1000.0);
                enforce.push((*e - t0).as_secs_f64() * 1000.0);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "policy apply → received by each of {watchers} watchers ({} samples): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            recv.len(), pct(&mut recv, 0.5), pct(&mut recv, 0.99), pct(&mut recv, 1.0)
        );
        println!(
            "policy apply → compiled and in force at each watcher (all {watchers} compile on this machine's cores): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            pct(&mut enforce, 0.5), pct(&mut enforce, 0.99), pct(&mut enforce, 1.0)
        );
        running.shutdown().await;
    });
}
