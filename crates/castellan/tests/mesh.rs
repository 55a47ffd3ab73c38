//! The data plane end to end: the demo mesh in-process (real TLS, real HTTP, SQLite), and the
//! `castellan demo` binary as a user runs it.
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

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn admin_client(m: &Mesh) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls_roots(&m.bundle).unwrap())
        .build()
        .unwrap()
}

async fn post(m: &Mesh, path: &str, body: Value) -> Value {
    let r = admin_client(m)
        .post(format!("{}{path}", m.server.url))
        .bearer_auth(&m.admin_token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json().await.unwrap()
}

/// An mTLS client presenting `as_`'s SVID, accepting only `to`'s.
fn mtls(as_: &RunningProxy, verifying_with: &RunningProxy, to: &str) -> Arc<rustls::ClientConfig> {
    castellan::demo::mtls_client(as_, verifying_with, to).unwrap()
}

fn get(path: &str, context: Option<&str>) -> Vec<u8> {
    let ctx = context
        .map(|c| format!("x-castellan-context: {c}\r\n"))
        .unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: orders\r\n{ctx}Connection: close\r\n\r\n").into_bytes()
}

fn claims42() -> serde_json::Map<String, Value> {
    let mut c = serde_json::Map::new();
    c.insert("customer_id".to_owned(), json!("42"));
    c
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_check_identity_context_revocation_and_follow_policy_changes() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let m = start_mesh().await.unwrap();
    let orders = m.sidecar("orders").unwrap();
    let inventory = m.sidecar("inventory").unwrap();

    // A second workload with the gateway's identity (as an attacker holding a stolen SVID
    // would be), started as a proxy so we hold its key only through its signer.
    let j = post(&m, "/v1/services/gateway/join-token", json!({})).await;
    let mut cfg = ProxyConfig::new(
        Mode::Gateway,
        "gateway-2",
        &m.server.url,
        m.bundle_path.clone(),
        m.dir.path().join("gw2"),
    );
    cfg.join_token = Some(j["join_token"].as_str().unwrap().to_owned());
    let gw2 = castellan_proxy::start(cfg).await.unwrap();
    gw2.ready(Duration::from_secs(10)).await.unwrap();
    let as_gw = mtls(&gw2, orders, "orders");
    let as_inventory = mtls(inventory, orders, "orders");
    let signer = gw2.identity.signer();
    let good = signer
        .mint(
            "spiffe://demo.castellan/svc/orders",
            "alice",
            &["customer".to_owned()],
            &claims42(),
            "t1",
            now(),
            60,
        )
        .unwrap();

    // Positive control: the gateway's SVID and a fresh context → allowed, headers set by the sidecar.
    let (st, body) = raw(
        orders.inbound,
        Some(as_gw.clone()),
        &get("/orders/42", Some(&good)),
    )
    .await
    .unwrap();
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["headers"]["x-castellan-user"], "alice");
    assert_eq!(
        body["headers"]["x-castellan-source"],
        "spiffe://demo.castellan/svc/gateway"
    );

    // A valid SVID of the wrong service is denied.
    let (st, _) = raw(
        orders.inbound,
        Some(as_inventory.clone()),
        &get("/orders/42", None),
    )
    .await
    .unwrap();
    assert_eq!(st, 403, "inventory may not call orders");
    // Context tokens are sender-constrained (aud = orders): anyone but the signer (calling
    // orders) or orders (calling on once) presenting it is refused.
    let payments = m.sidecar("payments").unwrap();
    let (st, _) = raw(
        orders.inbound,
        Some(as_inventory.clone()),
        &get("/orders/42", Some(&good)),
    )
    .await
    .unwrap();
    assert_eq!(st, 401, "replayed by inventory at orders");
    for (who, client) in [
        (
            "the signer at another service",
            mtls(&gw2, payments, "payments"),
        ),
        ("a second hop", mtls(inventory, payments, "payments")),
    ] {
        let (st, _) = raw(
            payments.inbound,
            Some(client),
            &get("/charges", Some(&good)),
        )
        .await
        .unwrap();
        assert_eq!(st, 401, "{who}");
    }
    // Orders making one onward call on the user's behalf: accepted (the policy decides).
    let as_orders = mtls(orders, inventory, "inventory");
    let (st, body) = raw(
        inventory.inbound,
        Some(as_orders),
        &get("/items/7", Some(&good)),
    )
    .await
    .unwrap();
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["headers"]["x-castellan-user"], "alice");
    // A context token signed by a workload that may not mint context.
    let forged = inventory
        .identity
        .signer()
        .mint(
            "spiffe://demo.castellan/svc/orders",
            "alice",
            &["admin".to_owned()],
            &claims42(),
            "t2",
            now(),
            60,
        )
        .unwrap();
    let (st, _) = raw(
        orders.inbound,
        Some(as_gw.clone()),
        &get("/orders/43", Some(&forged)),
    )
    .await
    .unwrap();
    assert_eq!(st, 401, "context signed by inventory");
    // An expired context token, and one for another trust domain.
    let expired = signer
        .mint(
            "spiffe://demo.castellan/svc/orders",
            "alice",
            &["customer".to_owned()],
            &claims42(),
            "t3",
            now() - 400,
            60,
        )
        .unwrap();
    let (st, _) = raw(
        orders.inbound,
        Some(as_gw.clone()),
        &get("/orders/42", Some(&expired)),
    )
    .await
    .unwrap();
    assert_eq!(st, 401, "expired context");
    let other_aud = signer
        .mint(
            "other.org",
            "alice",
            &["customer".to_owned()],
            &claims42(),
            "t4",
            now(),
            60,
        )
        .unwrap();
    let (st, _) = raw(
        orders.inbound,
        Some(as_gw.clone()),
        &get("/orders/42", Some(&other_aud)),
    )
    .await
    .unwrap();
    assert_eq!(st, 401, "context for another audience");
    // No client certificate: the handshake fails.
    let no_cert = Arc::new(tls_roots(&m.bundle).unwrap());
    assert!(
        raw(orders.inbound, Some(no_cert), &get("/orders/42", None))
            .await
            .is_err()
    );
    // The outbound side refuses a server that is not the expected service.
    let wrong = mtls(&gw2, orders, "payments");
    assert!(
        raw(orders.inbound, Some(wrong), &get("/orders/42", Some(&good)))
            .await
            .is_err(),
        "orders' SVID is not payments'"
    );

    // The real gateway forwarding gateway-2's context: fine while gateway-2 is valid (and its
    // validated chain is now cached at the sidecar)...
    let as_real_gw = mtls(&m.gateway, orders, "orders");
    let (st, _) = raw(
        orders.inbound,
        Some(as_real_gw.clone()),
        &get("/orders/42", Some(&good)),
    )
    .await
    .unwrap();
    assert_eq!(st, 200);

    // Revocation: refused after one push.
    let leaf = gw2.identity.current().chain[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    let serial: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let t0 = Instant::now();
    post(&m, &format!("/v1/certificates/{serial}/revoke"), json!({})).await;
    let chain = gw2.identity.current().chain.clone();
    let took = wait_for("the revocation to reach the orders sidecar", || {
        orders
            .state
            .validator()
            .validate(
                &chain,
                rustls_pki_types::UnixTime::now(),
                castellan_identity::SvidUsage::Client,
            )
            .is_err()
    })
    .await;
    eprintln!(
        "revocation → enforced at the sidecar: {:?} (API call included: {:?})",
        took,
        t0.elapsed()
    );
    assert!(
        raw(
            orders.inbound,
            Some(as_gw.clone()),
            &get("/orders/42", Some(&good))
        )
        .await
        .is_err(),
        "revoked SVID refused in the handshake"
    );

    // A policy change takes effect without restart.
    let gw = &m.gateway;
    let tls = Arc::new(tls_roots(&m.bundle).unwrap());
    let alice_get = format!("GET /orders/42 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", m.alice_key).into_bytes();
    assert_eq!(
        raw(gw.inbound, Some(tls.clone()), &alice_get)
            .await
            .unwrap()
            .0,
        200
    );
    let mut files = serde_json::Map::new();
    for e in std::fs::read_dir(&m.policy_dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_owned();
        if !name.ends_with("_test.yaml") {
            let mut text = std::fs::read_to_string(&p).unwrap();
            if name == "orders.yaml" {
                assert!(text.contains("when: \"params.id == user.claims.customer_id\""));
                text = text.replace(
                    "when: \"params.id == user.claims.customer_id\"",
                    "when: \"params.id == 'nobody'\"",
                );
            }
            files.insert(name, Value::String(text));
        }
    }
    let before = orders.state.revision();
    let t0 = Instant::now();
    let applied = post(
        &m,
        "/v1/policy",
        json!({"files": files, "comment": "close reads"}),
    )
    .await;
    let rev = applied["revision"].as_i64().unwrap();
    assert!(rev > before);
    let took = wait_for("the new revision at every proxy", || {
        orders.state.revision() == rev && gw.state.revision() == rev
    })
    .await;
    eprintln!(
        "policy apply → in force at gateway and sidecar: {:?} (API call included: {:?})",
        took,
        t0.elapsed()
    );
    let (st, _) = raw(gw.inbound, Some(tls.clone()), &alice_get)
        .await
        .unwrap();
    assert_eq!(st, 403, "the rule is gone");
    let v: Value = admin_client(&m)
        .get(format!("{}/v1/proxies", m.server.url))
        .bearer_auth(&m.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v.as_array().unwrap().len(),
        5,
        "4 demo proxies and gateway-2: {v}"
    );
}

#[test]
fn demo_binary_runs_the_script_and_serves_a_state_file() {
    let bin = env!("CARGO_BIN_EXE_castellan");
    let out = std::process::Command::new(bin)
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("as expected, 0 not"), "{stdout}");
    assert!(stdout.contains("orders-api/customers-read-own-orders"));

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let mut child = std::process::Command::new(bin)
        .args(["demo", "--serve", "--state-file", state.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !state.exists() {
        assert!(t0.elapsed() < Duration::from_secs(60), "no state file");
        std::thread::sleep(Duration::from_millis(50));
    }
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        use rustls_pki_types::pem::PemObject as _;
        let pem = std::fs::read(s["ca_bundle"].as_str().unwrap()).unwrap();
        let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
            .map(Result::unwrap)
            .collect();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_roots(&certs).unwrap())
            .build()
            .unwrap();
        let gw = s["gateway_url"].as_str().unwrap();
        let r = client
            .get(format!("{gw}/orders/42"))
            .header(
                "authorization",
                s["users"]["alice"]["authorization"].as_str().unwrap(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let echo: Value = r.json().await.unwrap();
        assert_eq!(
            (
                echo["path"].as_str(),
                echo["headers"]["x-castellan-user"].as_str()
            ),
            (Some("/orders/42"), Some("alice"))
        );
        let r = client
            .get(format!("{gw}/orders/43"))
            .header(
                "authorization",
                s["users"]["bob"]["authorization"].as_str().unwrap(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "bob is admin");
        let r = client.get(format!("{gw}/orders/42")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert!(r.headers().contains_key("www-authenticate"));
        let problem: Value = r.json().await.unwrap();
        assert!(
            problem["decision_id"].is_string() && problem["status"] == 401,
            "{problem}"
        );
        let proxies: Value = client
            .get(format!("{}/v1/proxies", s["admin_url"].as_str().unwrap()))
            .bearer_auth(s["admin_token"].as_str().unwrap())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let list = proxies.as_array().unwrap();
        assert_eq!(list.len(), 4, "{proxies}");
        assert!(list.iter().all(|p| p["up_to_date"] == true), "{proxies}");
        assert!(
            std::path::Path::new(s["policy_dir"].as_str().unwrap())
                .join("orders.yaml")
                .exists()
        );
    });
    let _ = child.kill();
    let _ = child.wait();
}

/// Renewal at half-life swaps the certificate for new handshakes without dropping a connection
/// that is open. SVIDs live 60 s here, so this test waits about 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_at_half_life_keeps_open_connections() {
    use http_body_util::{BodyExt as _, Empty};
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let cfg = castellan_server::ServerConfig {
        data_dir: dir.path().join("cp"),
        listen: "127.0.0.1:0".parse().unwrap(),
        svid_ttl_secs: 60,
        ..castellan_server::ServerConfig::default()
    };
    let init = castellan_server::init(&cfg, "demo.castellan", None)
        .await
        .unwrap();
    let server = castellan_server::Server::start(cfg, None).await.unwrap();
    let bundle = server.server.bundle();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls_roots(&bundle).unwrap())
        .build()
        .unwrap();
    let post = |path: &str, body: Value| {
        let (http, url, tok, path) = (
            http.clone(),
            server.url.clone(),
            init.admin_token.clone(),
            path.to_owned(),
        );
        async move {
            http.post(format!("{url}{path}"))
                .bearer_auth(tok)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let j_orders = post("/v1/services", json!({"name": "orders"})).await;
    let j_gw = post("/v1/services", json!({"name": "gateway"})).await;
    let files: serde_json::Map<String, Value> = ["mesh.yaml", "orders.yaml"]
        .iter()
        .map(|n| {
            (
                (*n).to_owned(),
                Value::String(
                    std::fs::read_to_string(
                        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                            .join("../../examples/demo/policies")
                            .join(n),
                    )
                    .unwrap(),
                ),
            )
        })
        .collect();
    post("/v1/policy", json!({"files": files})).await;
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut c = ProxyConfig::new(
        Mode::Sidecar,
        "orders-r",
        &server.url,
        init.bundle_path.clone(),
        dir.path().join("o"),
    );
    c.join_token = j_orders["join_token"].as_str().map(str::to_owned);
    c.app = Some(app.local_addr().unwrap());
    castellan::demo_apps::spawn("orders", app, castellan::demo_apps::Upstreams::default());
    let orders = castellan_proxy::start(c).await.unwrap();
    let mut g = ProxyConfig::new(
        Mode::Gateway,
        "gw-r",
        &server.url,
        init.bundle_path.clone(),
        dir.path().join("g"),
    );
    g.join_token = j_gw["join_token"].as_str().map(str::to_owned);
    let gw = castellan_proxy::start(g).await.unwrap();
    orders.ready(Duration::from_secs(10)).await.unwrap();
    gw.ready(Duration::from_secs(10)).await.unwrap();

    // One keep-alive connection, opened before the renewal.
    let tls = mtls(&gw, &orders, "orders");
    let tcp = tokio::net::TcpStream::connect(orders.inbound)
        .await
        .unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let first_cert = stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = |signer: &castellan_identity::ContextSigner| {
        let tok = signer
            .mint(
                "spiffe://demo.castellan/svc/orders",
                "alice",
                &["customer".to_owned()],
                &claims42(),
                "r",
                now(),
                60,
            )
            .unwrap();
        hyper::Request::get("/orders/42")
            .header("host", "orders")
            .header("x-castellan-context", tok)
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    send.ready().await.unwrap();
    let r = send
        .send_request(request(&gw.identity.signer()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.into_body().collect().await;

    // Keep using the connection (idle keep-alives are closed after 10 s) until the renewal.
    let before = orders.identity.current().not_after;
    let t0 = Instant::now();
    while orders.identity.current().not_after == before {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no renewal within 60 s"
        );
        send.ready().await.unwrap();
        let r = send
            .send_request(request(&gw.identity.signer()))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.into_body().collect().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!("sidecar renewed its SVID after {:?}", t0.elapsed());
    // The open connection still works; a new one sees the new certificate.
    send.ready().await.unwrap();
    let r = send
        .send_request(request(&gw.identity.signer()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "open connection survived the renewal");
    let tcp = tokio::net::TcpStream::connect(orders.inbound)
        .await
        .unwrap();
    // A fresh client configuration: a resumed session would not show a certificate at all.
    drop(tls);
    let fresh = mtls(&gw, &orders, "orders");
    let stream = tokio_rustls::TlsConnector::from(fresh)
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let new_cert = stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned();
    assert_ne!(first_cert, new_cert, "new handshakes use the renewed SVID");
    assert_eq!(new_cert, orders.identity.current().chain[0]);
    server.shutdown().await;
}

/// A keep-alive connection to a sidecar: the TLS session (to read how it was established) and
/// a request sender.
async fn keep_alive(
    cfg: Arc<rustls::ClientConfig>,
    to: std::net::SocketAddr,
) -> Result<
    (
        rustls::HandshakeKind,
        hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    ),
    String,
> {
    let tcp = tokio::net::TcpStream::connect(to).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls_pki_types::ServerName::try_from("sidecar").unwrap(),
            tcp,
        )
        .await
        .map_err(|e| e.to_string())?;
    let kind = stream.get_ref().1.handshake_kind().unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    // TLS 1.3 reports a failed client certificate only on the first read: one request tells.
    Ok((kind, send))
}

/// Status of one GET over an open connection; `None` when the connection was closed.
async fn get_on(
    send: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    path: &str,
) -> Option<u16> {
    use http_body_util::BodyExt as _;
    send.ready().await.ok()?;
    let r = send
        .send_request(
            hyper::Request::get(path)
                .header("host", "inventory")
                .body(http_body_util::Empty::new())
                .unwrap(),
        )
        .await
        .ok()?;
    let st = r.status().as_u16();
    let _ = r.into_body().collect().await;
    Some(st)
}

/// A peer revoked or disabled after it connected keeps neither its open keep-alive connection
/// nor a way back in through TLS session resumption.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_or_disabled_peers_lose_open_connections_and_resumed_sessions() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let m = start_mesh().await.unwrap();
    let inventory = m.sidecar("inventory").unwrap();

    // ---- certificate revoked: a second orders proxy, whose SVID alone is revoked ----------
    let j = post(&m, "/v1/services/orders/join-token", json!({})).await;
    let mut cfg = ProxyConfig::new(
        Mode::Sidecar,
        "orders-2",
        &m.server.url,
        m.bundle_path.clone(),
        m.dir.path().join("orders-2"),
    );
    cfg.join_token = Some(j["join_token"].as_str().unwrap().to_owned());
    cfg.app = Some("127.0.0.1:9".parse().unwrap());
    let orders2 = castellan_proxy::start(cfg).await.unwrap();
    orders2.ready(Duration::from_secs(10)).await.unwrap();
    let as_orders2 = mtls(&orders2, inventory, "inventory");
    let (_, mut open) = keep_alive(as_orders2.clone(), inventory.inbound)
        .await
        .unwrap();
    assert_eq!(get_on(&mut open, "/items/1").await, Some(200));
    // A second connection with the same client session cache is a full handshake: the
    // sidecar offers no resumption, so every connection meets the verifier.
    let (kind, mut second) = keep_alive(as_orders2.clone(), inventory.inbound)
        .await
        .unwrap();
    assert_eq!(kind, rustls::HandshakeKind::Full);
    assert_eq!(get_on(&mut second, "/items/1").await, Some(200));

    let serial: String =
        x509_parser::parse_x509_certificate(orders2.identity.current().chain[0].as_ref())
            .unwrap()
            .1
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
    post(&m, &format!("/v1/certificates/{serial}/revoke"), json!({})).await;
    let chain = orders2.identity.current().chain.clone();
    wait_for("the revocation at the inventory sidecar", || {
        inventory
            .state
            .validator()
            .validate(
                &chain,
                rustls_pki_types::UnixTime::now(),
                castellan_identity::SvidUsage::Client,
            )
            .is_err()
    })
    .await;
    assert_ne!(
        get_on(&mut open, "/items/1").await,
        Some(200),
        "the keep-alive connection opened before the revocation is refused"
    );
    let again = match keep_alive(as_orders2.clone(), inventory.inbound).await {
        Err(_) => None,
        Ok((_, mut s)) => get_on(&mut s, "/items/1").await,
    };
    assert_eq!(
        again, None,
        "no new (or resumed) session for a revoked SVID"
    );

    // ---- service disabled: the demo's orders sidecar --------------------------------------
    let orders = m.sidecar("orders").unwrap();
    let as_orders = mtls(orders, inventory, "inventory");
    let (_, mut open) = keep_alive(as_orders.clone(), inventory.inbound)
        .await
        .unwrap();
    assert_eq!(get_on(&mut open, "/items/1").await, Some(200));
    post(&m, "/v1/services/orders/disable", json!({})).await;
    wait_for("the disable at the inventory sidecar", || {
        inventory.state.is_disabled("orders")
    })
    .await;
    assert_ne!(get_on(&mut open, "/items/1").await, Some(200));
    let again = match keep_alive(as_orders, inventory.inbound).await {
        Err(_) => None,
        Ok((_, mut s)) => get_on(&mut s, "/items/1").await,
    };
    assert_eq!(
        again, None,
        "no new (or resumed) session for a disabled service"
    );
    orders2.shutdown();
}
