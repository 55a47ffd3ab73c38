//! The control plane is known by its SPIFFE ID, never by a name: a workload SVID that names the
//! control plane's host serves TLS on loopback, and the CLI and a proxy both refuse it before
//! sending any credential; names the control plane serves under are refused at `service add`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use castellan::demo::control_plane_tls;
use castellan_proxy::{Mode, ProxyConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::AsyncReadExt as _;

/// A TLS server presenting `chain`/`key` that counts the application bytes it receives (a
/// credential sent to it would arrive as such bytes).
async fn impostor(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let cfg = rustls::ServerConfig::builder_with_provider(castellan_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let mut cfg = cfg;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (bytes, conns) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (b, c) = (bytes.clone(), conns.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let (acceptor, b) = (acceptor.clone(), b.clone());
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        b.fetch_add(n, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    (addr, bytes, conns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_svid_naming_the_control_plane_host_is_refused_by_cli_and_proxy() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    // The control plane serves as cp.test and 127.0.0.1, so registering "localhost" for a
    // workload is allowed here — the situation the review found (any name the client dials
    // that a workload may carry).
    let cfg = castellan_server::ServerConfig {
        data_dir: dir.path().join("cp"),
        listen: "127.0.0.1:0".parse().unwrap(),
        hostnames: vec!["cp.test".to_owned()],
        ..castellan_server::ServerConfig::default()
    };
    let init = castellan_server::init(&cfg, "demo.castellan", None)
        .await
        .unwrap();
    let server = castellan_server::Server::start(cfg, None).await.unwrap();
    let bundle = server.server.bundle();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(control_plane_tls(&bundle).unwrap())
        .build()
        .unwrap();
    let add = |body: Value| {
        let (http, url, tok) = (http.clone(), server.url.clone(), init.admin_token.clone());
        async move {
            let r = http
                .post(format!("{url}/v1/services"))
                .bearer_auth(tok)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };

    // Names the control plane serves under are refused for workloads, in any case.
    for name in ["cp.test", "CP.Test", "127.0.0.1"] {
        let (status, body) = add(json!({"name": "evil", "dns_names": [name]})).await;
        assert_eq!(status, 400, "{name}: {body}");
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("control plane serves under"),
            "{body}"
        );
    }

    // A workload whose SVID names "localhost" (not a control-plane name here) certifies.
    let (status, svc) = add(json!({"name": "edge", "dns_names": ["localhost"]})).await;
    assert_eq!(status, 201, "{svc}");
    let state = dir.path().join("edge");
    let mut c = ProxyConfig::new(
        Mode::Gateway,
        "edge",
        &server.url,
        init.bundle_path.clone(),
        state.clone(),
    );
    c.join_token = Some(svc["join_token"].as_str().unwrap().to_owned());
    let edge = castellan_proxy::start(c).await.unwrap();
    edge.shutdown();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(state.join("svid.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(state.join("svid.key")).unwrap();

    // Its holder serves TLS on loopback with it. A client checking names only would accept it
    // as https://localhost:PORT under the mesh CA.
    let (addr, received, conns) = impostor(chain, key).await;
    let evil_url = format!("https://localhost:{}", addr.port());
    let name_only = reqwest::Client::builder()
        .tls_backend_preconfigured(castellan::demo::tls_roots(&bundle).unwrap())
        .build()
        .unwrap();
    assert!(
        name_only
            .get(format!("{evil_url}/healthz"))
            .timeout(std::time::Duration::from_secs(2))
            .send()
            .await
            .is_err_and(|e| !e.is_connect()),
        "the impostor should pass a name-only check (the hole) and then fail at HTTP"
    );
    let baseline = received.load(Ordering::SeqCst);
    assert!(baseline > 0, "the name-only client sent its request");

    // The CLI refuses it and sends nothing.
    let conns_before = conns.load(Ordering::SeqCst);
    let out = tokio::task::spawn_blocking({
        let (url, bundle_path) = (evil_url.clone(), init.bundle_path.clone());
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_castellan"))
                .args(["service", "list"])
                .env("CASTELLAN_SERVER", url)
                .env("CASTELLAN_TOKEN", "cadm_stolen-if-sent")
                .env("CASTELLAN_CA_BUNDLE", bundle_path)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        conns.load(Ordering::SeqCst) > conns_before,
        "the CLI dialled"
    );
    assert_eq!(
        received.load(Ordering::SeqCst),
        baseline,
        "the CLI sent application data (its admin token) to the impostor: {err}"
    );

    // A proxy refuses it too: its join token never leaves.
    let conns_before = conns.load(Ordering::SeqCst);
    let mut c = ProxyConfig::new(
        Mode::Sidecar,
        "victim",
        &evil_url,
        init.bundle_path.clone(),
        dir.path().join("victim"),
    );
    c.app = Some("127.0.0.1:9".parse().unwrap());
    c.join_token = Some("cjt_stolen-if-sent".to_owned());
    let e = castellan_proxy::start(c).await.unwrap_err().to_string();
    assert!(
        e.contains("spiffe://demo.castellan/castellan/server"),
        "the refusal names the expected control plane: {e}"
    );
    assert!(
        conns.load(Ordering::SeqCst) > conns_before,
        "the proxy dialled"
    );
    assert_eq!(
        received.load(Ordering::SeqCst),
        baseline,
        "the proxy sent application data (its join token) to the impostor"
    );

    // The real control plane is still accepted by the same pinned clients.
    let r = http
        .get(format!("{}/v1/services", server.url))
        .bearer_auth(&init.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    server.shutdown().await;
}
