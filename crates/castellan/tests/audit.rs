//! The audit trail end to end: tampering with stored records is detected and named, and a
//! control plane killed with SIGKILL mid-traffic loses nothing — proxies keep enforcing the last
//! policy, spool, and drain when it returns.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use castellan::demo::{raw, start_mesh, tls_roots};
use castellan_proxy::{Mode, ProxyConfig, RunningProxy};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn drained(proxies: &[&RunningProxy], limit: Duration) {
    let t0 = Instant::now();
    while proxies.iter().any(|p| p.audit_backlog() > 0) {
        assert!(t0.elapsed() < limit, "audit spools did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a signed checkpoint covers the head of the demo gateway's chain (the demo signs
/// every second); returns that chain as `GET /v1/audit/verify` lists it.
async fn gateway_checkpointed(m: &castellan::demo::Mesh) -> Value {
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(castellan::demo::control_plane_tls(&m.bundle).unwrap())
        .build()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let v: Value = http
            .get(format!("{}/v1/audit/verify", m.server.url))
            .bearer_auth(&m.admin_token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let gw = v["writers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["proxy_id"] == "gateway")
            .cloned()
            .unwrap();
        if gw["checkpoints"]
            .as_array()
            .and_then(|c| c.last())
            .is_some_and(|c| c["seq"] == gw["head"])
        {
            return gw;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no checkpoint: {gw}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn cli(url: &str, token: &str, bundle: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_castellan"))
        .args(args)
        .env("CASTELLAN_SERVER", url)
        .env("CASTELLAN_TOKEN", token)
        .env("CASTELLAN_CA_BUNDLE", bundle)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_altered_deleted_and_swapped_records() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let m = start_mesh().await.unwrap();
    let tls = Arc::new(tls_roots(&m.bundle).unwrap());
    let req = format!("GET /orders/42 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", m.alice_key).into_bytes();
    for _ in 0..8 {
        assert_eq!(
            raw(m.gateway.inbound, Some(tls.clone()), &req)
                .await
                .unwrap()
                .0,
            200
        );
    }
    drained(
        &[&m.gateway, m.sidecar("orders").unwrap()],
        Duration::from_secs(10),
    )
    .await;
    let url = m.server.url.clone();
    let (tok, bundle) = (m.admin_token.clone(), m.bundle_path.clone());
    let verify = move || cli(&url, &tok, &bundle, &["audit", "verify"]);
    let out = tokio::task::spawn_blocking(verify.clone()).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Chains are named "<proxy id> <SPIFFE ID> <epoch>".
    assert!(
        text.lines().any(
            |l| l.starts_with("gateway spiffe://demo.castellan/svc/gateway ")
                && l.ends_with(": 8 records, chain intact")
        ),
        "{text}"
    );

    // Query and export see the same records.
    let q = tokio::task::spawn_blocking({
        let (u, t, b) = (
            m.server.url.clone(),
            m.admin_token.clone(),
            m.bundle_path.clone(),
        );
        move || {
            cli(
                &u,
                &t,
                &b,
                &[
                    "audit",
                    "query",
                    "--user",
                    "alice",
                    "--decision",
                    "allow",
                    "-o",
                    "json",
                ],
            )
        }
    })
    .await
    .unwrap();
    let rows: Value = serde_json::from_slice(&q.stdout).unwrap();
    assert_eq!(
        rows.as_array().unwrap().len(),
        16,
        "8 at the gateway, 8 at the orders sidecar"
    );
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .all(|r| r["path"] == "/orders/42"
                && r["user"] == "alice"
                && r["rule"] == "orders-api/customers-read-own-orders")
    );
    let x = tokio::task::spawn_blocking({
        let (u, t, b) = (
            m.server.url.clone(),
            m.admin_token.clone(),
            m.bundle_path.clone(),
        );
        move || cli(&u, &t, &b, &["audit", "export", "--format", "jsonl"])
    })
    .await
    .unwrap();
    // The 16 decision records (and the control plane's own admin-action records).
    assert_eq!(
        String::from_utf8_lossy(&x.stdout)
            .lines()
            .filter(|l| !l.contains("\"kind\":\"admin\""))
            .count(),
        16
    );

    // Tamper with the stored records directly in the database.
    let db = format!(
        "sqlite://{}",
        m.dir.path().join("control-plane/castellan.db").display()
    );
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&db)
        .await
        .unwrap();
    let get = |seq: i64| {
        format!("SELECT record FROM audit_records WHERE writer LIKE 'gateway %' AND seq = {seq}")
    };
    let (r3,): (String,) = sqlx::query_as(&get(3)).fetch_one(&mut conn).await.unwrap();
    let (gw_chain,): (String,) =
        sqlx::query_as("SELECT DISTINCT writer FROM audit_records WHERE writer LIKE 'gateway %'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    let set = |seq: i64, rec: &str| {
        sqlx::query(
            "UPDATE audit_records SET record = $1 WHERE writer LIKE 'gateway %' AND seq = $2",
        )
        .bind(rec.to_owned())
        .bind(seq)
    };

    // 1. Altered: a denial turned into… anything else.
    set(3, &r3.replace("\"status\":200", "\"status\":204"))
        .execute(&mut conn)
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking(verify.clone()).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "{gw_chain}: 8 records, FIRST BAD RECORD: record 3 was altered"
        )),
        "{text}"
    );
    set(3, &r3).execute(&mut conn).await.unwrap();

    // 2. Deleted.
    let (r5,): (String,) = sqlx::query_as(&get(5)).fetch_one(&mut conn).await.unwrap();
    sqlx::query("DELETE FROM audit_records WHERE writer LIKE 'gateway %' AND seq = 5")
        .execute(&mut conn)
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking(verify.clone()).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.contains("records 5..5 are missing (deleted) before record 6"),
        "{text}"
    );
    sqlx::query("INSERT INTO audit_records (writer, seq, record, time_ms, source, user_sub, destination, decision, rule) VALUES ($2, 5, $1, 0, '', '', '', '', '')")
        .bind(&r5).bind(&gw_chain).execute(&mut conn).await.unwrap();

    // 3. Swapped: two records exchange places.
    let (r2,): (String,) = sqlx::query_as(&get(2)).fetch_one(&mut conn).await.unwrap();
    let (r4,): (String,) = sqlx::query_as(&get(4)).fetch_one(&mut conn).await.unwrap();
    set(2, &r4).execute(&mut conn).await.unwrap();
    set(4, &r2).execute(&mut conn).await.unwrap();
    let out = tokio::task::spawn_blocking(verify.clone()).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.contains("FIRST BAD RECORD: row 2 holds record 4 (reordered)"),
        "{text}"
    );
    set(2, &r2).execute(&mut conn).await.unwrap();
    set(4, &r4).execute(&mut conn).await.unwrap();
    let out = tokio::task::spawn_blocking(verify).await.unwrap();
    assert!(
        out.status.success(),
        "restored: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A `castellan server` child process on a fresh data directory.
struct ControlPlane {
    child: std::process::Child,
    data: std::path::PathBuf,
    port: u16,
    url: String,
    token: String,
    bundle_path: std::path::PathBuf,
    certs: Vec<rustls_pki_types::CertificateDer<'static>>,
    http: reqwest::Client,
}

impl ControlPlane {
    async fn start(dir: &std::path::Path) -> ControlPlane {
        use rustls_pki_types::pem::PemObject as _;
        let data = dir.join("cp");
        let init = std::process::Command::new(env!("CARGO_BIN_EXE_castellan"))
            .args([
                "server",
                "init",
                "--trust-domain",
                "demo.castellan",
                "--data-dir",
                data.to_str().unwrap(),
                "-o",
                "json",
            ])
            .output()
            .unwrap();
        let init: Value = serde_json::from_slice(&init.stdout).unwrap();
        let port = free_port();
        let child = spawn_server(&data, port);
        let bundle_path = data.join("bundle.pem");
        let certs: Vec<_> =
            rustls_pki_types::CertificateDer::pem_slice_iter(&std::fs::read(&bundle_path).unwrap())
                .map(Result::unwrap)
                .collect();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_roots(&certs).unwrap())
            .build()
            .unwrap();
        let url = format!("https://127.0.0.1:{port}");
        wait_healthy(&http, &url).await;
        ControlPlane {
            child,
            data,
            port,
            url,
            token: init["admin_token"].as_str().unwrap().to_owned(),
            bundle_path,
            certs,
            http,
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_server(data: &std::path::Path, port: u16) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_castellan"))
        .args([
            "server",
            "run",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("CASTELLAN_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_healthy(http: &reqwest::Client, url: &str) {
    let t0 = Instant::now();
    while !http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .map(|r| r.status().is_success())
        .unwrap_or(false)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "server did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The control plane dies with SIGKILL while traffic flows; proxies keep enforcing the last
/// policy and keep every record; after the restart `audit verify` shows every record, no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_control_plane_loses_no_audit_record() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path()).await;
    let (url, token, bundle_path, certs, http) = (
        cp.url.clone(),
        cp.token.clone(),
        cp.bundle_path.clone(),
        cp.certs.clone(),
        cp.http.clone(),
    );
    let (data, port) = (cp.data.clone(), cp.port);
    let mut server = cp.child;
    let post = |path: &str, body: Value| {
        let (http, url, token, path) = (http.clone(), url.clone(), token.clone(), path.to_owned());
        async move {
            http.post(format!("{url}{path}"))
                .bearer_auth(token)
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
    let j_gw = post(
        "/v1/services",
        json!({"name": "gateway", "kind": "gateway", "routes": ["/orders=orders"], "dns_names": [castellan::demo::GATEWAY_IP]}),
    )
    .await;
    let policy_dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo/policies");
    let files: serde_json::Map<String, Value> = ["mesh.yaml", "orders.yaml"]
        .iter()
        .map(|n| {
            (
                (*n).to_owned(),
                Value::String(std::fs::read_to_string(policy_dir.join(n)).unwrap()),
            )
        })
        .collect();
    post("/v1/policy", json!({"files": files})).await;
    let alice = post(
        "/v1/apikeys",
        json!({"user": "alice", "roles": ["customer"], "claims": {"customer_id": "42"}}),
    )
    .await;
    let key = alice["api_key"].as_str().unwrap().to_owned();

    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut c = ProxyConfig::new(
        Mode::Sidecar,
        "orders-1",
        &url,
        bundle_path.clone(),
        dir.path().join("orders"),
    );
    c.join_token = j_orders["join_token"].as_str().map(str::to_owned);
    c.app = Some(app.local_addr().unwrap());
    castellan::demo_apps::spawn("orders", app, castellan::demo_apps::Upstreams::default());
    let orders = castellan_proxy::start(c).await.unwrap();
    let mut g = ProxyConfig::new(
        Mode::Gateway,
        "gateway-1",
        &url,
        bundle_path.clone(),
        dir.path().join("gw"),
    );
    g.join_token = j_gw["join_token"].as_str().map(str::to_owned);
    g.routes = vec![("/orders".to_owned(), "orders".to_owned())];
    g.listen = (
        castellan::demo::GATEWAY_IP
            .parse::<std::net::IpAddr>()
            .unwrap(),
        0,
    )
        .into();
    let gw = castellan_proxy::start(g).await.unwrap();
    orders.ready(Duration::from_secs(10)).await.unwrap();
    gw.ready(Duration::from_secs(10)).await.unwrap();
    let t0 = Instant::now();
    while gw.state.endpoints("orders").is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The API key reaches the gateway by push too: wait for it, not for a fixed time.
    let key_hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.as_bytes());
    while gw.state.api_key(key_hash.as_ref()).is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the API key never reached the gateway"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let tls = Arc::new(tls_roots(&certs).unwrap());
    let allowed = format!("GET /orders/42 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n").into_bytes();
    let denied = format!("GET /orders/43 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n").into_bytes();
    let mut sent = 0u64;
    let send_some = |n: usize| {
        let (tls, allowed, denied, addr) =
            (tls.clone(), allowed.clone(), denied.clone(), gw.inbound);
        async move {
            for i in 0..n {
                let (req, want) = if i % 4 == 3 {
                    (&denied, 403)
                } else {
                    (&allowed, 200)
                };
                let (st, body) = raw(addr, Some(tls.clone()), req).await.unwrap();
                assert_eq!(st, want, "request {i}: {body}");
            }
            n as u64
        }
    };
    sent += send_some(40).await;
    // SIGKILL the control plane mid-traffic.
    server.kill().unwrap();
    server.wait().unwrap();
    // Traffic continues and is still enforced with the last policy (the 403s above are asserted).
    sent += send_some(60).await;
    assert!(
        gw.audit_backlog() > 0 || orders.audit_backlog() > 0,
        "records wait in the spools while the server is down"
    );
    // Restart on the same data directory and port.
    let mut server = spawn_server(&data, port);
    wait_healthy(&http, &url).await;
    sent += send_some(20).await;
    drained(&[&gw, &orders], Duration::from_secs(30)).await;

    let v: Value = http
        .get(format!("{url}/v1/audit/verify"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["ok"], true, "{v}");
    let count = |w: &str| {
        v["writers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["proxy_id"] == w)
            .map(|x| x["records"].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(
        count("gateway-1"),
        sent,
        "one gateway record per request: {v}"
    );
    assert_eq!(
        count("orders-1"),
        sent * 3 / 4,
        "the allowed ones reached the sidecar: {v}"
    );
    let _ = server.kill();
    let _ = server.wait();
}

fn mtls_to(as_: &RunningProxy, verify_with: &RunningProxy, to: &str) -> Arc<rustls::ClientConfig> {
    castellan::demo::mtls_client(as_, verify_with, to).unwrap()
}

/// A failing app opens the circuit (503 at once) and a healthy one closes it; a proxy restarted
/// while the control plane is down enforces its persisted policy, and past the maximum
/// staleness it fails closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_persisted_policy_and_staleness() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path()).await;
    let (url, token, bundle_path, http) = (
        cp.url.clone(),
        cp.token.clone(),
        cp.bundle_path.clone(),
        cp.http.clone(),
    );
    let mut server = cp.child;
    let post = |path: &str, body: Value| {
        let (http, url, token, path) = (http.clone(), url.clone(), token.clone(), path.to_owned());
        async move {
            http.post(format!("{url}{path}"))
                .bearer_auth(token)
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
    let policy_dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo/policies");
    let files: serde_json::Map<String, Value> = ["mesh.yaml", "orders.yaml"]
        .iter()
        .map(|n| {
            (
                (*n).to_owned(),
                Value::String(std::fs::read_to_string(policy_dir.join(n)).unwrap()),
            )
        })
        .collect();
    post("/v1/policy", json!({"files": files})).await;

    // The app's port: nothing listens there yet.
    let app_port = free_port();
    let app_addr: std::net::SocketAddr = format!("127.0.0.1:{app_port}").parse().unwrap();
    let orders_dir = dir.path().join("orders");
    let mut c = ProxyConfig::new(
        Mode::Sidecar,
        "orders-1",
        &url,
        bundle_path.clone(),
        orders_dir.clone(),
    );
    c.join_token = j_orders["join_token"].as_str().map(str::to_owned);
    c.app = Some(app_addr);
    let orders = castellan_proxy::start(c.clone()).await.unwrap();
    let mut g = ProxyConfig::new(
        Mode::Gateway,
        "gw",
        &url,
        bundle_path.clone(),
        dir.path().join("gw"),
    );
    g.join_token = j_gw["join_token"].as_str().map(str::to_owned);
    let gw = castellan_proxy::start(g).await.unwrap();
    orders.ready(Duration::from_secs(10)).await.unwrap();
    gw.ready(Duration::from_secs(10)).await.unwrap();
    let claims = {
        let mut m = serde_json::Map::new();
        m.insert("customer_id".to_owned(), json!("42"));
        m
    };
    let req = |path: &str| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let ctx = gw
            .identity
            .signer()
            .mint(
                "spiffe://demo.castellan/svc/orders",
                "alice",
                &["customer".to_owned()],
                &claims,
                "t",
                now,
                60,
            )
            .unwrap();
        format!("GET {path} HTTP/1.1\r\nHost: orders\r\nx-castellan-context: {ctx}\r\nConnection: close\r\n\r\n").into_bytes()
    };

    // The app is down: 503s; after five consecutive failures the circuit opens.
    let tls = mtls_to(&gw, &orders, "orders");
    let mut details = Vec::new();
    for _ in 0..4 {
        let (st, body) = raw(orders.inbound, Some(tls.clone()), &req("/orders/42"))
            .await
            .unwrap();
        assert_eq!(st, 503);
        details.push(body["detail"].as_str().unwrap().to_owned());
    }
    assert!(
        details.last().unwrap().contains("circuit open"),
        "{details:?}"
    );
    // The app comes up; after the open period one probe closes the circuit.
    let app = tokio::net::TcpListener::bind(app_addr).await.unwrap();
    castellan::demo_apps::spawn("orders", app, castellan::demo_apps::Upstreams::default());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        raw(orders.inbound, Some(tls.clone()), &req("/orders/42"))
            .await
            .unwrap()
            .0,
        200,
        "probe closes the circuit"
    );
    assert_eq!(
        raw(orders.inbound, Some(tls.clone()), &req("/orders/42"))
            .await
            .unwrap()
            .0,
        200
    );

    // Restart the sidecar while the control plane is down: it enforces the persisted policy.
    orders.shutdown();
    drop(orders);
    server.kill().unwrap();
    server.wait().unwrap();
    let mut c2 = c.clone();
    c2.join_token = None;
    c2.max_staleness_secs = 4;
    let orders = castellan_proxy::start(c2).await.unwrap();
    assert!(
        orders.state.revision() > 0,
        "persisted policy in force at once"
    );
    let tls = mtls_to(&gw, &orders, "orders");
    assert_eq!(
        raw(orders.inbound, Some(tls.clone()), &req("/orders/42"))
            .await
            .unwrap()
            .0,
        200,
        "allowed by the persisted policy"
    );
    assert_eq!(
        raw(orders.inbound, Some(tls.clone()), &req("/orders/43"))
            .await
            .unwrap()
            .0,
        403,
        "denied by the persisted policy"
    );
    // Past the maximum staleness it fails closed.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (st, body) = raw(orders.inbound, Some(tls.clone()), &req("/orders/42"))
        .await
        .unwrap();
    assert_eq!(st, 503, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("stale"), "{body}");
    let metrics = reqwest::get(format!("http://{}/metrics", orders.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("castellan_proxy_stale{proxy=\"orders-1\"} 1"),
        "{metrics}"
    );
}

/// Every process start opens a new epoch: a second live process given the same proxy id, and a
/// restart with an empty state directory, each write their own chain, and no record of any of
/// them is lost or refused. State files are owner-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_and_shared_ids_open_new_epochs_and_lose_nothing() {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let m = start_mesh().await.unwrap();
    let tls = Arc::new(tls_roots(&m.bundle).unwrap());
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(castellan::demo::control_plane_tls(&m.bundle).unwrap())
        .build()
        .unwrap();
    // Another process with the demo gateway's id "gateway", on an empty state directory.
    let gateway_like = |dir: &str| {
        let (http, url, tok, bundle, state) = (
            http.clone(),
            m.server.url.clone(),
            m.admin_token.clone(),
            m.bundle_path.clone(),
            m.dir.path().join(dir),
        );
        async move {
            let j: Value = http
                .post(format!("{url}/v1/services/gateway/join-token"))
                .bearer_auth(tok)
                .json(&json!({}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let mut g = ProxyConfig::new(Mode::Gateway, "gateway", &url, bundle, state);
            g.join_token = j["join_token"].as_str().map(str::to_owned);
            g.routes = vec![("/orders".to_owned(), "orders".to_owned())];
            g.listen = (
                castellan::demo::GATEWAY_IP
                    .parse::<std::net::IpAddr>()
                    .unwrap(),
                0,
            )
                .into();
            let p = castellan_proxy::start(g).await.unwrap();
            p.ready(Duration::from_secs(10)).await.unwrap();
            while p.state.endpoints("orders").is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            p
        }
    };
    let req = format!("GET /orders/42 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", m.alice_key).into_bytes();
    let send = |p: &RunningProxy, n: usize| {
        let (addr, tls, req) = (p.inbound, tls.clone(), req.clone());
        async move {
            for _ in 0..n {
                assert_eq!(raw(addr, Some(tls.clone()), &req).await.unwrap().0, 200);
            }
        }
    };
    let twin = gateway_like("twin").await;
    send(&m.gateway, 3).await;
    send(&twin, 4).await;
    send(&m.gateway, 2).await;
    assert_ne!(twin.audit_epoch(), m.gateway.audit_epoch());
    // Spool, snapshot and key files: owner-only, in owner-only directories.
    let state = m.dir.path().join("twin");
    for (path, want) in [
        (state.clone(), 0o700),
        (state.join("audit"), 0o700),
        (state.join("audit").join(twin.audit_epoch()), 0o700),
        (state.join("svid.key"), 0o600),
        (state.join("svid.pem"), 0o600),
        (state.join("snapshot.pb"), 0o600),
    ] {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want, "{}", path.display());
    }
    let seg = std::fs::read_dir(state.join("audit").join(twin.audit_epoch()))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .unwrap();
    assert_eq!(
        std::fs::metadata(&seg).unwrap().permissions().mode() & 0o777,
        0o600
    );
    drained(&[&m.gateway, &twin], Duration::from_secs(10)).await;
    let first_twin_epoch = twin.audit_epoch().to_owned();
    // Killed, and restarted with an empty state directory and the same id.
    twin.shutdown();
    drop(twin);
    let reborn = gateway_like("reborn").await;
    send(&reborn, 5).await;
    drained(&[&m.gateway, &reborn], Duration::from_secs(10)).await;

    let url = m.server.url.clone();
    let (tok, bundle) = (m.admin_token.clone(), m.bundle_path.clone());
    let out = tokio::task::spawn_blocking(move || cli(&url, &tok, &bundle, &["audit", "verify"]))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    let line = |epoch: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("gateway spiffe://demo.castellan/svc/gateway ") && l.contains(epoch)
            })
            .unwrap_or_else(|| panic!("no chain for epoch {epoch}: {text}"))
            .to_owned()
    };
    assert!(
        line(m.gateway.audit_epoch()).ends_with(": 5 records, chain intact"),
        "{text}"
    );
    assert!(
        line(&first_twin_epoch).ends_with(": 4 records, chain intact"),
        "{text}"
    );
    assert!(
        line(reborn.audit_epoch()).ends_with(": 5 records, chain intact"),
        "{text}"
    );
    reborn.shutdown();
}

/// Writers sign checkpoints with their SVID key; `audit verify` checks them against the
/// operator's bundle. An insider who edits a record and recomputes the rest of the chain, or
/// deletes the last records, leaves a consistent chain — and a signature it cannot match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_checkpoints_catch_a_recomputed_chain_and_a_cut_tail() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let m = start_mesh().await.unwrap();
    let tls = Arc::new(tls_roots(&m.bundle).unwrap());
    let req = format!("GET /orders/42 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", m.alice_key).into_bytes();
    for _ in 0..8 {
        assert_eq!(
            raw(m.gateway.inbound, Some(tls.clone()), &req)
                .await
                .unwrap()
                .0,
            200
        );
    }
    drained(&[&m.gateway], Duration::from_secs(10)).await;
    gateway_checkpointed(&m).await;
    let heads = m.dir.path().join("heads.jsonl");
    let (url, tok, bundle) = (
        m.server.url.clone(),
        m.admin_token.clone(),
        m.bundle_path.clone(),
    );
    let verify = {
        let heads = heads.clone();
        move |extra: Vec<String>| {
            let (url, tok, bundle, heads) =
                (url.clone(), tok.clone(), bundle.clone(), heads.clone());
            async move {
                tokio::task::spawn_blocking(move || {
                    let mut args = vec![
                        "audit".to_owned(),
                        "verify".to_owned(),
                        "--export-heads".to_owned(),
                        heads.display().to_string(),
                    ];
                    args.extend(extra);
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let out = cli(&url, &tok, &bundle, &args);
                    (
                        out.status.code(),
                        String::from_utf8_lossy(&out.stdout).into_owned(),
                    )
                })
                .await
                .unwrap()
            }
        }
    };
    let (code, text) = verify(vec![]).await;
    assert_eq!(code, Some(0), "{text}");
    let gw_line = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("gateway "))
            .unwrap_or_else(|| panic!("{text}"))
            .to_owned()
    };
    assert!(
        gw_line(&text).ends_with("chain intact, signed through record 8"),
        "{text}"
    );
    let exported = std::fs::read_to_string(&heads).unwrap();
    assert!(
        exported
            .lines()
            .any(|l| l.contains("\"proxy_id\":\"gateway\"") && l.contains("\"seq\":8")),
        "{exported}"
    );
    // The auditor keeps these heads elsewhere; the database as it is now still proves them.
    let saved = m.dir.path().join("heads-kept-elsewhere.jsonl");
    std::fs::copy(&heads, &saved).unwrap();
    let with_saved = || vec!["--heads".to_owned(), saved.display().to_string()];
    let (code, text) = verify(with_saved()).await;
    assert_eq!(code, Some(0), "{text}");

    let db = format!(
        "sqlite://{}",
        m.dir.path().join("control-plane/castellan.db").display()
    );
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&db)
        .await
        .unwrap();
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT seq, record FROM audit_records WHERE writer LIKE 'gateway %' ORDER BY seq",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(rows.len(), 8);
    let set = |seq: i64, rec: String| {
        sqlx::query(
            "UPDATE audit_records SET record = $1 WHERE writer LIKE 'gateway %' AND seq = $2",
        )
        .bind(rec)
        .bind(seq)
    };

    // 1. Record 3 edited and the chain recomputed from there: the chain is consistent, the
    //    signed checkpoint is not.
    let mut prev = String::new();
    for (seq, text) in &rows {
        let mut r: castellan_audit::AuditRecord = serde_json::from_str(text).unwrap();
        if *seq >= 3 {
            if *seq == 3 {
                r.status = 204;
            }
            r.prev_hash = prev.clone();
            r.hash = r.compute_hash();
            set(*seq, serde_json::to_string(&r).unwrap())
                .execute(&mut conn)
                .await
                .unwrap();
        }
        prev = r.hash;
    }
    let (code, text) = verify(vec![]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(
        gw_line(&text).contains("BAD CHECKPOINT")
            && gw_line(&text).contains("does not match its signed checkpoint"),
        "{text}"
    );
    for (seq, text) in &rows {
        set(*seq, text.clone()).execute(&mut conn).await.unwrap();
    }
    assert_eq!(verify(vec![]).await.0, Some(0), "restored");

    // 2. The last two records deleted: a shorter, consistent chain — cut after a checkpoint.
    sqlx::query("DELETE FROM audit_records WHERE writer LIKE 'gateway %' AND seq >= 7")
        .execute(&mut conn)
        .await
        .unwrap();
    let (code, text) = verify(vec![]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(
        gw_line(&text)
            .contains("tail truncated after checkpoint 8: the stored chain ends at record 6"),
        "{text}"
    );
    // 2b. ...and the checkpoint with them: the database rolled back to record 6. Nothing
    //     stored contradicts it any more; the heads the auditor kept do.
    sqlx::query("DELETE FROM audit_checkpoints WHERE writer LIKE 'gateway %' AND seq >= 7")
        .execute(&mut conn)
        .await
        .unwrap();
    let (code, text) = verify(with_saved()).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("rolled back: the exported head is record 8, the database ends at record 6"),
        "{text}"
    );

    // 3. Checked against a bundle that does not hold the mesh's CA: nothing signed is trusted.
    let other = castellan_identity::CertificateAuthority::generate(
        "demo.castellan",
        0,
        Duration::from_secs(3600 * 24 * 3650),
    )
    .unwrap();
    let other_pem = m.dir.path().join("other-ca.pem");
    std::fs::write(
        &other_pem,
        castellan_server::keys::pem_bundle(&[other.cert().clone()]),
    )
    .unwrap();
    let (code, text) = verify(vec!["--bundle".to_owned(), other_pem.display().to_string()]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("not trusted by the bundle given"), "{text}");

    // 4. The chain rewritten (backdated ten minutes) and every checkpoint of it deleted: no
    //    signature contradicts it any more, but records that old must be covered by one.
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT seq, record FROM audit_records WHERE writer LIKE 'gateway %' ORDER BY seq",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let mut prev = castellan_audit::GENESIS.to_owned();
    for (seq, text) in &rows {
        let mut r: castellan_audit::AuditRecord = serde_json::from_str(text).unwrap();
        r.time_ms -= 600_000;
        r.prev_hash = prev.clone();
        r.hash = r.compute_hash();
        prev = r.hash.clone();
        sqlx::query("UPDATE audit_records SET record = $1, time_ms = $2 WHERE writer LIKE 'gateway %' AND seq = $3")
            .bind(serde_json::to_string(&r).unwrap())
            .bind(r.time_ms)
            .bind(seq)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    sqlx::query("DELETE FROM audit_checkpoints WHERE writer LIKE 'gateway %'")
        .execute(&mut conn)
        .await
        .unwrap();
    let (code, text) = verify(vec![]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(
        gw_line(&text).contains("covered by no signed checkpoint"),
        "{text}"
    );
}

/// A credential in a query string never reaches the spool, the database, the export or the
/// query output: its value is masked before the record is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_query_strings_never_reach_a_record() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let m = start_mesh().await.unwrap();
    let tls = Arc::new(tls_roots(&m.bundle).unwrap());
    let secret = "S3cr3tQu3ryV4lu3";
    for q in [
        format!("access_token={secret}"),
        format!("page=2&Password={secret}"),
        format!("%74oken={secret}"),
    ] {
        let req = format!("GET /orders/42?{q} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", m.alice_key).into_bytes();
        let (st, _) = raw(m.gateway.inbound, Some(tls.clone()), &req)
            .await
            .unwrap();
        assert_eq!(st, 200, "{q}");
    }
    drained(
        &[&m.gateway, m.sidecar("orders").unwrap()],
        Duration::from_secs(10),
    )
    .await;
    let (url, tok, bundle) = (
        m.server.url.clone(),
        m.admin_token.clone(),
        m.bundle_path.clone(),
    );
    let export = tokio::task::spawn_blocking(move || {
        let x = cli(
            &url,
            &tok,
            &bundle,
            &["audit", "export", "--format", "jsonl"],
        );
        let q = cli(&url, &tok, &bundle, &["audit", "query", "--user", "alice"]);
        (
            String::from_utf8_lossy(&x.stdout).into_owned(),
            String::from_utf8_lossy(&q.stdout).into_owned(),
        )
    })
    .await
    .unwrap();
    assert!(export.0.contains("access_token=REDACTED"), "{}", export.0);
    assert!(
        export.0.contains("page=2&Password=REDACTED"),
        "{}",
        export.0
    );
    assert!(!export.0.contains(secret) && !export.1.contains(secret));
    // Nothing on disk either: spools, snapshots, the database (and its WAL).
    fn walk(dir: &std::path::Path, secret: &[u8]) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, secret);
            } else if let Ok(bytes) = std::fs::read(&p) {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret),
                    "the secret is in {}",
                    p.display()
                );
            }
        }
    }
    walk(m.dir.path(), secret.as_bytes());
}

/// Admin actions are records of the control plane's own chain, signed with its SVID key:
/// `audit query` shows them, `audit verify` checks them, and a tampered one fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_are_audited_signed_and_verified() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let m = start_mesh().await.unwrap();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(castellan::demo::control_plane_tls(&m.bundle).unwrap())
        .build()
        .unwrap();
    let r = http
        .post(format!("{}/v1/admin-tokens", m.server.url))
        .bearer_auth(&m.admin_token)
        .json(&json!({"name": "auditor", "role": "viewer"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let (url, tok, bundle) = (
        m.server.url.clone(),
        m.admin_token.clone(),
        m.bundle_path.clone(),
    );
    let run = move |args: &'static [&'static str]| {
        let (url, tok, bundle) = (url.clone(), tok.clone(), bundle.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let out = cli(&url, &tok, &bundle, args);
                (
                    out.status.code(),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                )
            })
            .await
            .unwrap()
        }
    };
    let (code, text) = run(&[
        "audit",
        "query",
        "--service",
        "castellan-server",
        "-o",
        "json",
    ])
    .await;
    assert_eq!(code, Some(0), "{text}");
    let rows: Value = serde_json::from_str(&text).unwrap();
    let actions: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["method"].as_str().unwrap())
        .collect();
    // The demo's own set-up, and the credential created here (newest first).
    assert_eq!(actions.first(), Some(&"admin-token.create"), "{text}");
    for a in [
        "service.add",
        "policy.apply",
        "apikey.create",
        "service.spec",
    ] {
        assert!(actions.contains(&a), "{a} missing: {actions:?}");
    }
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .all(|r| r["user"] == "initial admin" && r["kind"] == "admin")
    );
    let (code, text) = run(&["audit", "verify"]).await;
    assert_eq!(code, Some(0), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("castellan-server spiffe://demo.castellan/castellan/server "))
        .unwrap_or_else(|| panic!("{text}"))
        .to_owned();
    let n = actions.len();
    assert!(
        line.ends_with(&format!(
            "{n} records, chain intact, signed through record {n}"
        )),
        "{line}"
    );

    // The credential's record rewritten to name someone else, the chain recomputed.
    let db = format!(
        "sqlite://{}",
        m.dir.path().join("control-plane/castellan.db").display()
    );
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&db)
        .await
        .unwrap();
    let (seq, text): (i64, String) = sqlx::query_as(
        "SELECT seq, record FROM audit_records WHERE writer LIKE 'castellan-server %' ORDER BY seq DESC LIMIT 1",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let mut r: castellan_audit::AuditRecord = serde_json::from_str(&text).unwrap();
    r.user = "someone else".to_owned();
    r.hash = r.compute_hash();
    sqlx::query(
        "UPDATE audit_records SET record = $1 WHERE writer LIKE 'castellan-server %' AND seq = $2",
    )
    .bind(serde_json::to_string(&r).unwrap())
    .bind(seq)
    .execute(&mut conn)
    .await
    .unwrap();
    let (code, text) = run(&["audit", "verify"]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "record {seq} does not match its signed checkpoint"
        )),
        "{text}"
    );
}

/// Retention: `audit purge` removes old records up to a signed checkpoint; `verify` keeps
/// proving the rest from it. Records deleted any other way are still reported missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_keeps_verify_working_from_the_signed_checkpoint() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let m = start_mesh().await.unwrap();
    let tls = Arc::new(tls_roots(&m.bundle).unwrap());
    let req = format!("GET /orders/42 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", m.alice_key).into_bytes();
    for _ in 0..5 {
        assert_eq!(
            raw(m.gateway.inbound, Some(tls.clone()), &req)
                .await
                .unwrap()
                .0,
            200
        );
    }
    drained(&[&m.gateway], Duration::from_secs(10)).await;
    gateway_checkpointed(&m).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cut = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    tokio::time::sleep(Duration::from_millis(20)).await;
    for _ in 0..3 {
        assert_eq!(
            raw(m.gateway.inbound, Some(tls.clone()), &req)
                .await
                .unwrap()
                .0,
            200
        );
    }
    drained(&[&m.gateway], Duration::from_secs(10)).await;
    let (url, tok, bundle) = (
        m.server.url.clone(),
        m.admin_token.clone(),
        m.bundle_path.clone(),
    );
    let run = move |args: Vec<String>| {
        let (url, tok, bundle) = (url.clone(), tok.clone(), bundle.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let out = cli(&url, &tok, &bundle, &args);
                (
                    out.status.code(),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                )
            })
            .await
            .unwrap()
        }
    };
    let (code, text) = run(vec![
        "audit".into(),
        "purge".into(),
        "--before".into(),
        cut.to_string(),
    ])
    .await;
    assert_eq!(code, Some(0), "{text}");
    let db = format!(
        "sqlite://{}",
        m.dir.path().join("control-plane/castellan.db").display()
    );
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&db)
        .await
        .unwrap();
    let (first,): (i64,) =
        sqlx::query_as("SELECT MIN(seq) FROM audit_records WHERE writer LIKE 'gateway %'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(
        first > 1,
        "nothing of the gateway's chain was purged: {text}"
    );
    // The auditor exports the signed heads now, and keeps them elsewhere.
    let heads = m.dir.path().join("heads-before-the-second-purge.jsonl");
    let (code, text) = run(vec![
        "audit".into(),
        "verify".into(),
        "--export-heads".into(),
        heads.display().to_string(),
    ])
    .await;
    assert_eq!(code, Some(0), "verify works from the checkpoint: {text}");
    // A cut in the future is refused: it would make any later deletion look purged.
    let future = (std::time::SystemTime::now() + Duration::from_secs(86_400))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let (code, text) = run(vec![
        "audit".into(),
        "purge".into(),
        "--before".into(),
        future,
    ])
    .await;
    assert_ne!(code, Some(0), "{text}");
    // Purged all the way to its head (once a checkpoint covers the head), the chain goes on
    // from that checkpoint: the proxy keeps shipping.
    gateway_checkpointed(&m).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let all = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let (code, text) = run(vec![
        "audit".into(),
        "purge".into(),
        "--before".into(),
        all.to_string(),
    ])
    .await;
    assert_eq!(code, Some(0), "{text}");
    let (left,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM audit_records WHERE writer LIKE 'gateway %'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(left, 0, "the gateway's chain purged to its head");
    for _ in 0..2 {
        assert_eq!(
            raw(m.gateway.inbound, Some(tls.clone()), &req)
                .await
                .unwrap()
                .0,
            200
        );
    }
    drained(
        &[&m.gateway, m.sidecar("orders").unwrap()],
        Duration::from_secs(10),
    )
    .await;
    let (code, text) = run(vec!["audit".into(), "verify".into()]).await;
    assert_eq!(code, Some(0), "{text}");
    // Deleting the next record by hand is not a purge: reported.
    let (first,): (i64,) =
        sqlx::query_as("SELECT MIN(seq) FROM audit_records WHERE writer LIKE 'gateway %'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    sqlx::query("DELETE FROM audit_records WHERE writer LIKE 'gateway %' AND seq = $1")
        .bind(first)
        .execute(&mut conn)
        .await
        .unwrap();
    let (code, text) = run(vec!["audit".into(), "verify".into()]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("missing"), "{text}");
    // An insider deleting a chain's records up to a signed checkpoint makes it look purged;
    // no signed purge allows it (every audited cut is older), so verify says so.
    for _ in 0..2 {
        assert_eq!(
            raw(m.gateway.inbound, Some(tls.clone()), &req)
                .await
                .unwrap()
                .0,
            200
        );
    }
    drained(&[&m.gateway], Duration::from_secs(10)).await;
    let head = gateway_checkpointed(&m).await["head"].as_i64().unwrap();
    // As a purge would: the records through the checkpoint, and the checkpoints before it.
    sqlx::query("DELETE FROM audit_records WHERE writer LIKE 'gateway %' AND seq <= $1")
        .bind(head)
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM audit_checkpoints WHERE writer LIKE 'gateway %' AND seq < $1")
        .bind(head)
        .execute(&mut conn)
        .await
        .unwrap();
    let (code, text) = run(vec!["audit".into(), "verify".into()]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "records through {head} deleted without an audited purge"
        )),
        "{text}"
    );
    // A whole chain deleted, checkpoints and all, whose exported head is older than the
    // audited cut: a purge never removes a chain whole (it keeps the checkpoint it purged
    // through), so the heads kept elsewhere still catch it.
    sqlx::query("DELETE FROM audit_records WHERE writer LIKE 'orders-sidecar %'")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM audit_checkpoints WHERE writer LIKE 'orders-sidecar %'")
        .execute(&mut conn)
        .await
        .unwrap();
    let (code, text) = run(vec![
        "audit".into(),
        "verify".into(),
        "--heads".into(),
        heads.display().to_string(),
    ])
    .await;
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("EXPORTED HEAD: orders-sidecar ") && l.contains("is gone")),
        "{text}"
    );
}

/// Proxies given a key record a keyed pseudonym of each user instead of the user: the same
/// user maps to the same pseudonym (an auditor with the key finds them with `audit
/// pseudonym`), the name reaches no record, and a candidate policy matching on user ids counts
/// those records as indeterminate instead of guessing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_pseudonymised_with_a_keyed_hmac() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("pseudonym.key");
    std::fs::write(&key_file, [7u8; 32]).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = castellan_proxy::PseudonymKey::from_file(&key_file).unwrap_err();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let key = castellan_proxy::PseudonymKey::from_file(&key_file).unwrap();
    let m = castellan::demo::start_mesh_with(&castellan::demo::MeshOptions {
        pseudonymize_users: Some(key),
    })
    .await
    .unwrap();
    let tls = Arc::new(tls_roots(&m.bundle).unwrap());
    for (path, want) in [("/orders/42", 200), ("/orders/42", 200), ("/orders/7", 403)] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", m.alice_key).into_bytes();
        let (st, _) = raw(m.gateway.inbound, Some(tls.clone()), &req)
            .await
            .unwrap();
        assert_eq!(st, want, "{path}");
    }
    drained(
        &[&m.gateway, m.sidecar("orders").unwrap()],
        Duration::from_secs(10),
    )
    .await;
    let (url, tok, bundle, kf) = (
        m.server.url.clone(),
        m.admin_token.clone(),
        m.bundle_path.clone(),
        key_file.clone(),
    );
    let (export, pseudonym) = tokio::task::spawn_blocking(move || {
        let x = cli(&url, &tok, &bundle, &["audit", "export"]);
        let p = cli(
            &url,
            &tok,
            &bundle,
            &[
                "audit",
                "pseudonym",
                "--key-file",
                kf.to_str().unwrap(),
                "alice",
            ],
        );
        assert!(p.status.success(), "{p:?}");
        (
            String::from_utf8_lossy(&x.stdout).into_owned(),
            String::from_utf8_lossy(&p.stdout).trim().to_owned(),
        )
    })
    .await
    .unwrap();
    assert_eq!(pseudonym, castellan_audit::pseudonym(&[7u8; 32], "alice"));
    assert!(pseudonym.starts_with("hmac:") && pseudonym.len() == 5 + 32);
    let users: Vec<String> = export
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["kind"] == "decision" && r["destination"] == "orders")
        .map(|r| r["user"].as_str().unwrap_or_default().to_owned())
        .collect();
    // The gateway records the three calls, the sidecar the two it was sent (the gateway
    // denied the third), all under one pseudonym.
    assert!(users.len() >= 5, "{export}");
    assert!(users.iter().all(|u| *u == pseudonym), "{users:?}");
    assert!(!export.contains("\"alice\""), "{export}");
    // Replay: a candidate matching on the user id cannot judge these records.
    let cand = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&m.policy_dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_owned();
        if name.ends_with("_test.yaml") {
            continue;
        }
        let mut text = std::fs::read_to_string(&p).unwrap();
        if name == "orders.yaml" {
            text = text.replacen("roles: [customer]", "subjects: [alice]", 1);
        }
        std::fs::write(cand.path().join(&name), text).unwrap();
    }
    let (url, tok, bundle) = (
        m.server.url.clone(),
        m.admin_token.clone(),
        m.bundle_path.clone(),
    );
    let cand_dir = cand.path().to_str().unwrap().to_owned();
    let impact = tokio::task::spawn_blocking(move || {
        cli(
            &url,
            &tok,
            &bundle,
            &["-o", "json", "policy", "impact", &cand_dir, "--since", "1h"],
        )
    })
    .await
    .unwrap();
    assert!(impact.status.success(), "{impact:?}");
    let v: Value = serde_json::from_slice(&impact.stdout).unwrap();
    assert!(v["indeterminate"].as_u64().unwrap() >= 5, "{v:#}");
    assert_eq!(v["newly_denied"], 0, "{v:#}");
}
