//! Audit ingest: chained records shipped over gRPC (mTLS, batches of 2000, several writers in
//! parallel) into SQLite and into PostgreSQL, then `audit verify` over all of them, then
//! `policy impact` (every record replayed against a candidate) and `access report` over all of
//! them, then the dashboard's pages with all of them stored; and the cost a proxy pays per request to append one record to its disk spool.
//!
//! `cargo bench -p castellan-server --bench audit_ingest [-- RECORDS_PER_WRITER WRITERS]`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use castellan_audit::{Entry, Head, Kind};
use castellan_proto::v1::audit_client::AuditClient;
use castellan_proto::v1::identity_client::IdentityClient;
use castellan_proto::v1::{AuditBatch, CertifyRequest};
use castellan_server::{Server, ServerConfig};
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Instant;

fn entry(i: u64) -> Entry {
    Entry {
        time_ms: 1_800_000_000_000 + i as i64,
        decision_id: format!("{i:024x}"),
        trace_id: String::new(),
        source: "spiffe://demo.castellan/svc/gateway".to_owned(),
        user: "alice".to_owned(),
        destination: "orders".to_owned(),
        method: "GET".to_owned(),
        path: format!("/orders/{}", i % 100),
        decision: if i % 4 == 3 { "deny" } else { "allow" }.to_owned(),
        rule: "orders-api/customers-read-own-orders".to_owned(),
        reason: "matched-allow".to_owned(),
        mode: "enforce".to_owned(),
        status: 200,
        latency_us: 150,
        act: Vec::new(),
        origin: String::new(),
        asked_by: String::new(),
        inputs: Some(castellan_audit::Inputs {
            roles: vec!["customer".to_owned()],
            claims: [("customer_id".to_owned(), json!(format!("{}", i % 100)))]
                .into_iter()
                .collect(),
            ..castellan_audit::Inputs::default()
        }),
    }
}

/// The demo policies, with the admins' rule removed (a candidate with changes to find).
fn candidate_files() -> Value {
    let mut files = serde_json::Map::new();
    for (name, text) in [
        (
            "mesh.yaml",
            include_str!("../../../examples/demo/policies/mesh.yaml"),
        ),
        (
            "orders.yaml",
            include_str!("../../../examples/demo/policies/orders.yaml"),
        ),
        (
            "inventory.yaml",
            include_str!("../../../examples/demo/policies/inventory.yaml"),
        ),
        (
            "payments.yaml",
            include_str!("../../../examples/demo/policies/payments.yaml"),
        ),
        (
            "ratelimits.yaml",
            include_str!("../../../examples/demo/policies/ratelimits.yaml"),
        ),
    ] {
        let text = text.replace(
            "when: \"params.id == user.claims.customer_id\"",
            "when: \"params.id == user.claims.customer_id && params.id != '7'\"",
        );
        files.insert(name.to_owned(), Value::String(text));
    }
    Value::Object(files)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn run(label: &str, database_url: Option<String>, per_writer: u64, writers: usize) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig {
        data_dir: dir.path().join("data"),
        database_url,
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    };
    let init = castellan_server::init(&cfg, "demo.castellan", None)
        .await
        .unwrap();
    let running = Server::start(cfg, None).await.unwrap();
    let bundle = running.server.bundle();
    let bundle_pem = castellan_server::keys::pem_bundle(&bundle);
    let mut roots = rustls::RootCertStore::empty();
    for c in &bundle {
        roots.add(c.clone()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap();
    let j: Value = http
        .post(format!("{}/v1/services", running.url))
        .bearer_auth(&init.admin_token)
        .json(&json!({"name": "gateway"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let ch = |ident: Option<(String, String)>| {
        let mut t = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(bundle_pem.clone()));
        if let Some((c, k)) = ident {
            t = t.identity(tonic::transport::Identity::from_pem(c, k));
        }
        tonic::transport::Channel::from_shared(running.url.clone())
            .unwrap()
            .tls_config(t)
            .unwrap()
    };
    let svid = IdentityClient::new(ch(None).connect().await.unwrap())
        .certify(CertifyRequest {
            join_token: j["join_token"].as_str().unwrap().to_owned(),
            csr_der: csr,
        })
        .await
        .unwrap()
        .into_inner();
    let cert_pem =
        castellan_server::keys::pem_bundle(&[CertificateDer::from(svid.cert_chain[0].clone())]);

    // Records are made (chained) before the clock starts: this measures ingest, not hashing.
    let batches: Vec<Vec<AuditBatch>> = (0..writers)
        .map(|w| {
            let mut head = Head::default();
            let writer = format!("gateway-{w}");
            let lines: Vec<String> = (0..per_writer)
                .map(|i| {
                    serde_json::to_string(&head.chain(&writer, "e1", Kind::Decision, entry(i), 0))
                        .unwrap()
                })
                .collect();
            lines
                .chunks(2000)
                .map(|c| AuditBatch {
                    writer: writer.clone(),
                    epoch: "e1".to_owned(),
                    records: c.to_vec(),
                    checkpoints: Vec::new(),
                })
                .collect()
        })
        .collect();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for bs in batches {
        let channel = ch(Some((cert_pem.clone(), key.serialize_pem())))
            .connect()
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let mut c = AuditClient::new(channel).max_encoding_message_size(64 << 20);
            for b in bs {
                c.ship(b).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = per_writer * writers as u64;
    let secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let v: Value = http
        .get(format!("{}/v1/audit/verify", running.url))
        .bearer_auth(&init.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["ok"], true, "{v}");
    let vsecs = t1.elapsed().as_secs_f64();
    println!(
        "{label}: ingest {total} records ({writers} writers × {per_writer}) in {secs:.2} s = {:.0} records/s; verify all chains {vsecs:.2} s = {:.0} records/s",
        total as f64 / secs,
        total as f64 / vsecs
    );
    // Replay every stored record against a candidate (apply the demo policies first: the
    // report reads the revision in force).
    let r = http
        .post(format!("{}/v1/policy", running.url))
        .bearer_auth(&init.admin_token)
        .json(&json!({"files": candidate_files(), "comment": "bench"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let rss0 = rss_kib();
    let t2 = Instant::now();
    let v: Value = http
        .post(format!("{}/v1/policy/impact", running.url))
        .bearer_auth(&init.admin_token)
        .json(&json!({"files": candidate_files(), "since_ms": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let isecs = t2.elapsed().as_secs_f64();
    assert!(v["scanned"].as_u64() >= Some(total), "{v}");
    let t3 = Instant::now();
    let rep: Value = http
        .get(format!("{}/v1/access/report?since_ms=0", running.url))
        .bearer_auth(&init.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rsecs = t3.elapsed().as_secs_f64();
    assert!(rep["scanned"].as_u64() >= Some(total), "{rep}");
    println!(
        "{label}: policy impact over {total} records {isecs:.2} s = {:.0} records/s (replayed {}, newly denied {}); access report {rsecs:.2} s; RSS {} MiB before, {} MiB after",
        total as f64 / isecs,
        v["replayed"],
        v["newly_denied"],
        rss0 / 1024,
        rss_kib() / 1024
    );
    // Dashboard pages with every record stored: server time (the page's own timer is in the
    // HTML; this is the round trip on loopback, median of 5).
    for path in [
        "/dashboard",
        "/dashboard/decisions",
        "/dashboard/decisions?decision=deny",
        "/dashboard/decisions?source=gateway&destination=orders",
        "/dashboard/fleet",
        "/dashboard/policy",
        "/dashboard/anomalies",
        "/dashboard/report",
    ] {
        // The access report is computed in the background on first view: wait for it.
        let t = Instant::now();
        if path == "/dashboard/report" {
            loop {
                let body = http
                    .get(format!("{}{path}", running.url))
                    .bearer_auth(&init.admin_token)
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                if !body.contains("report-pending") {
                    println!(
                        "{label}: dashboard access report over {total} records computed in the background in {:.1} s",
                        t.elapsed().as_secs_f64()
                    );
                    break;
                }
                assert!(t.elapsed().as_secs() < 120, "the report never came");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        let mut ms = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let r = http
                .get(format!("{}{path}", running.url))
                .bearer_auth(&init.admin_token)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{path}: {}", r.status());
            let _ = r.text().await.unwrap();
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        ms.sort_by(f64::total_cmp);
        println!(
            "{label}: dashboard {path} over {total} records: median {:.1} ms, max {:.1} ms",
            ms[2], ms[4]
        );
    }
    running.shutdown().await;
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let per_writer = args.first().copied().unwrap_or(50_000);
    let writers = args.get(1).copied().unwrap_or(4) as usize;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    // The per-request cost of the audit path: chaining (SHA-256) + one append to the spool.
    let dir = tempfile::tempdir().unwrap();
    let spool = castellan_audit::spool::Spool::open(dir.path(), "bench", "e1", 1 << 30).unwrap();
    let mut lat: Vec<u64> = Vec::with_capacity(100_000);
    for i in 0..100_000 {
        let t = Instant::now();
        spool.append(entry(i)).unwrap();
        lat.push(t.elapsed().as_nanos() as u64);
    }
    lat.sort_unstable();
    println!(
        "spool append (chain + write, no fsync): p50 {:.1} µs, p99 {:.1} µs",
        lat[lat.len() / 2] as f64 / 1000.0,
        lat[lat.len() * 99 / 100] as f64 / 1000.0
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run("SQLite", None, per_writer, writers));
    rt.block_on(async {
        let admin = "postgres://postgres@127.0.0.1:5432/test";
        match <sqlx::PgConnection as sqlx::Connection>::connect(admin).await {
            Ok(mut conn) => {
                let db = format!("castellan_audit_bench_{}", std::process::id());
                sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {db}").as_str())
                    .await
                    .unwrap();
                run(
                    "PostgreSQL",
                    Some(format!("postgres://postgres@127.0.0.1:5432/{db}")),
                    per_writer,
                    writers,
                )
                .await;
                sqlx::Executor::execute(
                    &mut conn,
                    format!("DROP DATABASE {db} WITH (FORCE)").as_str(),
                )
                .await
                .unwrap();
            }
            Err(e) => println!("PostgreSQL: skipped ({e})"),
        }
    });
}
