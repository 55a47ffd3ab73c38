//! Castellan OAuth2 tokens at the gateway: a revoked token and a disabled client's token stop
//! working within one push (not at expiry), and a certificate-bound token (RFC 8705) is
//! accepted only over a connection that presents its certificate.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use castellan::demo::{GATEWAY_IP, control_plane_tls, tls_roots};
use castellan_proxy::{Mode, ProxyConfig, RunningProxy};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

const POLICY: &str = r#"
apiVersion: castellan/v1
kind: AccessPolicy
metadata:
  name: machines
spec:
  service: orders
  rules:
    - name: known-clients
      effect: allow
      from:
        services: [gateway]
        users:
          subjects: [billing, worker, frontend]
    - name: delegated-calls-skip-order-43
      effect: deny
      from:
        users:
          delegated: true
      to:
        paths: ["/orders/43"]
      when: "'billing' in user.act"
"#;

struct Mesh {
    _dir: tempfile::TempDir,
    server: castellan_server::Running,
    admin_token: String,
    http: reqwest::Client,
    gateway: RunningProxy,
    orders: RunningProxy,
    worker_cert: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    bundle: Vec<CertificateDer<'static>>,
}

async fn post(m_http: &reqwest::Client, url: &str, tok: &str, body: Value) -> Value {
    let r = m_http
        .post(url)
        .bearer_auth(tok)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{url}: {}", r.status());
    r.json().await.unwrap()
}

async fn mesh() -> Mesh {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let cfg = castellan_server::ServerConfig {
        data_dir: dir.path().join("cp"),
        listen: "127.0.0.1:0".parse().unwrap(),
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
    let url = |p: &str| format!("{}{p}", server.url);
    let tok = init.admin_token.clone();
    let j_orders = post(&http, &url("/v1/services"), &tok, json!({"name": "orders"})).await;
    let j_gw = post(
        &http,
        &url("/v1/services"),
        &tok,
        json!({"name": "gateway", "kind": "gateway", "routes": ["/orders=orders"], "dns_names": [GATEWAY_IP]}),
    )
    .await;
    let j_worker = post(&http, &url("/v1/services"), &tok, json!({"name": "worker"})).await;
    let mesh_yaml = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo/policies/mesh.yaml"),
    )
    .unwrap();
    post(
        &http,
        &url("/v1/policy"),
        &tok,
        json!({"files": {"mesh.yaml": mesh_yaml, "machines.yaml": POLICY}}),
    )
    .await;

    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut c = ProxyConfig::new(
        Mode::Sidecar,
        "orders-1",
        &server.url,
        init.bundle_path.clone(),
        dir.path().join("o"),
    );
    c.join_token = j_orders["join_token"].as_str().map(str::to_owned);
    c.app = Some(app.local_addr().unwrap());
    castellan::demo_apps::spawn("orders", app, castellan::demo_apps::Upstreams::default());
    let orders = castellan_proxy::start(c).await.unwrap();
    // The worker's SVID (its proxy certifies it), used for tls_client_auth.
    let mut w = ProxyConfig::new(
        Mode::Sidecar,
        "worker-1",
        &server.url,
        init.bundle_path.clone(),
        dir.path().join("w"),
    );
    w.join_token = j_worker["join_token"].as_str().map(str::to_owned);
    w.app = Some("127.0.0.1:9".parse().unwrap());
    let worker = castellan_proxy::start(w).await.unwrap();
    worker.shutdown();
    let worker_cert = (
        CertificateDer::pem_file_iter(dir.path().join("w/svid.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap(),
        PrivateKeyDer::from_pem_file(dir.path().join("w/svid.key")).unwrap(),
    );
    let mut g = ProxyConfig::new(
        Mode::Gateway,
        "gw",
        &server.url,
        init.bundle_path.clone(),
        dir.path().join("g"),
    );
    g.join_token = j_gw["join_token"].as_str().map(str::to_owned);
    g.routes = vec![("/orders".to_owned(), "orders".to_owned())];
    g.listen = (GATEWAY_IP.parse::<std::net::IpAddr>().unwrap(), 0).into();
    let gateway = castellan_proxy::start(g).await.unwrap();
    orders.ready(Duration::from_secs(10)).await.unwrap();
    gateway.ready(Duration::from_secs(10)).await.unwrap();
    let t0 = Instant::now();
    while gateway.state.endpoints("orders").is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Mesh {
        _dir: dir,
        server,
        admin_token: init.admin_token,
        http,
        gateway,
        orders,
        worker_cert,
        bundle,
    }
}

impl Mesh {
    fn url(&self, p: &str) -> String {
        format!("{}{p}", self.server.url)
    }

    /// A client of the gateway, optionally presenting the worker's certificate.
    fn edge_client(&self, with_cert: bool) -> reqwest::Client {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.bundle {
            roots.add(c.clone()).unwrap();
        }
        let b = rustls::ClientConfig::builder_with_provider(castellan_proxy::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let cfg = if with_cert {
            b.with_client_auth_cert(self.worker_cert.0.clone(), self.worker_cert.1.clone_key())
                .unwrap()
        } else {
            b.with_no_client_auth()
        };
        reqwest::Client::builder()
            .tls_backend_preconfigured(cfg)
            .build()
            .unwrap()
    }

    /// The control plane's token endpoint, as the worker (mTLS) or with a secret.
    async fn token(&self, form: &[(&str, &str)], secret: Option<(&str, &str)>) -> String {
        let client = match secret {
            Some(_) => self.http.clone(),
            None => reqwest::Client::builder()
                .tls_backend_preconfigured(
                    castellan_proxy::tls::control_plane_client_config(
                        self.bundle.clone(),
                        Some((
                            self.worker_cert.0.clone(),
                            self.worker_cert.1.secret_der().to_vec(),
                        )),
                        &[],
                    )
                    .unwrap(),
                )
                .build()
                .unwrap(),
        };
        let mut req = client.post(self.url("/oauth2/token")).form(form);
        if let Some((id, s)) = secret {
            req = req.basic_auth(id, Some(s));
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        v["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"))
            .to_owned()
    }

    async fn get(&self, client: &reqwest::Client, token: &str) -> u16 {
        self.get_path(client, token, "/orders/42").await
    }

    async fn get_path(&self, client: &reqwest::Client, token: &str, path: &str) -> u16 {
        client
            .get(format!("https://{}{path}", self.gateway.inbound))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Waits until `cond` holds at the gateway; returns how long the push took.
    async fn pushed(&self, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
        let t0 = Instant::now();
        while !cond() {
            assert!(t0.elapsed() < Duration::from_secs(15), "no push: {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        t0.elapsed()
    }
}

async fn wait_for_castellan_keys(m: &Mesh, client: &reqwest::Client, token: &str) {
    // The gateway fetches the control plane's JWKS at start; until then tokens are unknown.
    let t0 = Instant::now();
    while m.get(client, token).await == 401 {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "gateway never accepted the token"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_and_disabled_clients_are_refused_within_one_push() {
    let m = mesh().await;
    let add = post(
        &m.http,
        &m.url("/v1/clients"),
        &m.admin_token,
        json!({"name": "billing", "scopes": ["orders.read"]}),
    )
    .await;
    let secret = add["client_secret"].as_str().unwrap().to_owned();
    let edge = m.edge_client(false);
    let form = [("grant_type", "client_credentials")];
    let t1 = m.token(&form, Some(("billing", &secret))).await;
    let t2 = m.token(&form, Some(("billing", &secret))).await;
    wait_for_castellan_keys(&m, &edge, &t1).await;
    assert_eq!(m.get(&edge, &t1).await, 200);
    assert_eq!(m.get(&edge, &t2).await, 200);

    // Revoke t1 through RFC 7009: refused at the gateway after one push, t2 still works.
    let r = m
        .http
        .post(m.url("/oauth2/revoke"))
        .basic_auth("billing", Some(&secret))
        .form(&[("token", t1.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let jti = {
        use base64::Engine as _;
        let p = t1.split('.').nth(1).unwrap();
        let c: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .unwrap(),
        )
        .unwrap();
        c["jti"].as_str().unwrap().to_owned()
    };
    let took = m
        .pushed("token revocation", || {
            m.gateway.state.is_token_revoked(Some(&jti), None)
        })
        .await;
    eprintln!("revoke → known at the gateway: {took:?}");
    assert_eq!(m.get(&edge, &t1).await, 401, "revoked token");
    assert_eq!(m.get(&edge, &t2).await, 200, "another token of the client");

    // Disable the client: all its tokens refused after one push.
    post(
        &m.http,
        &m.url("/v1/clients/billing/disable"),
        &m.admin_token,
        json!({}),
    )
    .await;
    let took = m
        .pushed("client disable", || {
            m.gateway.state.is_token_revoked(None, Some("billing"))
        })
        .await;
    eprintln!("client disable → known at the gateway: {took:?}");
    assert_eq!(m.get(&edge, &t2).await, 401, "a disabled client's token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_bound_tokens_need_their_certificate() {
    let m = mesh().await;
    post(
        &m.http,
        &m.url("/v1/clients"),
        &m.admin_token,
        json!({"name": "worker", "scopes": ["orders.read"], "tls_san_uri": "spiffe://demo.castellan/svc/worker"}),
    )
    .await;
    let bound = m
        .token(
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "worker"),
            ],
            None,
        )
        .await;
    let with_cert = m.edge_client(true);
    wait_for_castellan_keys(&m, &with_cert, &bound).await;
    assert_eq!(m.get(&with_cert, &bound).await, 200, "with its certificate");
    // The same token without a certificate, or with another one: 401.
    assert_eq!(
        m.get(&m.edge_client(false), &bound).await,
        401,
        "bearer use"
    );
    let other = {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["mallory".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in &m.bundle {
            roots.add(c.clone()).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(castellan_proxy::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        reqwest::Client::builder()
            .tls_backend_preconfigured(cfg)
            .build()
            .unwrap()
    };
    assert_eq!(m.get(&other, &bound).await, 401, "another certificate");
    let _ = tls_roots(&m.bundle);
}

/// A token exchanged by billing on the frontend's behalf carries `act`: the gateway hands the
/// chain to policy (`user.act`, `delegated`) and writes it into the audit record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delegation_chain_reaches_policy_and_audit() {
    let m = mesh().await;
    let add = |name: &str, audiences: &[&str]| {
        let body = json!({"name": name, "scopes": ["orders.read"], "audiences": audiences});
        let (http, url, tok) = (m.http.clone(), m.url("/v1/clients"), m.admin_token.clone());
        async move {
            post(&http, &url, &tok, body).await["client_secret"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let front = add("frontend", &["billing"]).await;
    let billing = add("billing", &[]).await;
    let direct = m
        .token(
            &[("grant_type", "client_credentials")],
            Some(("frontend", &front)),
        )
        .await;
    let for_billing = m
        .token(
            &[
                ("grant_type", "client_credentials"),
                ("audience", "billing"),
            ],
            Some(("frontend", &front)),
        )
        .await;
    let exchanged = m
        .token(
            &[
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:token-exchange",
                ),
                ("subject_token", &for_billing),
                (
                    "subject_token_type",
                    "urn:ietf:params:oauth:token-type:access_token",
                ),
                ("audience", "demo.castellan"),
            ],
            Some(("billing", &billing)),
        )
        .await;
    let edge = m.edge_client(false);
    wait_for_castellan_keys(&m, &edge, &direct).await;
    assert_eq!(
        m.get_path(&edge, &direct, "/orders/43").await,
        200,
        "direct call"
    );
    assert_eq!(
        m.get_path(&edge, &exchanged, "/orders/42").await,
        200,
        "delegated call"
    );
    assert_eq!(
        m.get_path(&edge, &exchanged, "/orders/43").await,
        403,
        "the rule on delegated calls holds"
    );
    // The audit record of the delegated calls names the actor.
    let t0 = Instant::now();
    while m.gateway.audit_backlog() > 0 || m.orders.audit_backlog() > 0 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rows: Value = m
        .http
        .get(m.url("/v1/audit?user=frontend"))
        .bearer_auth(&m.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let gw_rows: Vec<&Value> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["writer"] == "gw")
        .collect();
    // Two direct calls (one while waiting for the gateway's keys), two delegated ones.
    assert_eq!(gw_rows.len(), 4, "{rows}");
    let delegated = gw_rows
        .iter()
        .filter(|r| r["act"] == json!(["billing"]))
        .count();
    assert_eq!(delegated, 2, "{rows}");
    // The context token carried the chain to the sidecar too (the allowed delegated call).
    let at_sidecar = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["writer"] == "orders-1" && r["act"] == json!(["billing"]))
        .count();
    assert_eq!(at_sidecar, 1, "{rows}");
}

/// API keys scoped as the seeds ask: a key limited to a service and route prefixes, or with an
/// expiry, is refused elsewhere (401, audit reason `key-out-of-scope`); `apikey list` shows the
/// scope, the expiry and when a gateway last saw the key used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_api_keys_are_refused_out_of_scope_and_their_use_is_listed() {
    let m = mesh().await;
    let key = |body: Value| {
        let (http, url, tok) = (m.http.clone(), m.url("/v1/apikeys"), m.admin_token.clone());
        async move { post(&http, &url, &tok, body).await }
    };
    let scoped =
        key(json!({"user": "worker", "services": ["orders"], "prefixes": ["/orders/42"]})).await;
    let other_service = key(json!({"user": "worker", "services": ["payments"]})).await;
    let expiring = key(json!({"user": "worker", "ttl_secs": 1})).await;
    let secret = |v: &Value| v["api_key"].as_str().unwrap().to_owned();
    // Wait for the keys to be pushed to the gateway.
    let hash = |k: &str| aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, k.as_bytes());
    let t0 = Instant::now();
    while [&scoped, &other_service, &expiring]
        .iter()
        .any(|k| m.gateway.state.api_key(hash(&secret(k)).as_ref()).is_none())
    {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let edge = m.edge_client(false);
    assert_eq!(m.get_path(&edge, &secret(&scoped), "/orders/42").await, 200);
    assert_eq!(
        m.get_path(&edge, &secret(&scoped), "/orders/42/").await,
        200
    );
    assert_eq!(
        m.get_path(&edge, &secret(&scoped), "/orders/43").await,
        401,
        "outside its route prefixes"
    );
    assert_eq!(
        m.get_path(&edge, &secret(&scoped), "/orders/420").await,
        401,
        "a prefix is a path prefix, not a string prefix"
    );
    assert_eq!(
        m.get_path(&edge, &secret(&other_service), "/orders/42")
            .await,
        401,
        "outside its services"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        m.get_path(&edge, &secret(&expiring), "/orders/42").await,
        401,
        "expired"
    );
    // The refusals are recorded with their reason.
    let t0 = Instant::now();
    while m.gateway.audit_backlog() > 0 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rows: Value = m
        .http
        .get(m.url("/v1/audit?user=worker&decision=deny"))
        .bearer_auth(&m.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let reasons: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["writer"] == "gw")
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["key-out-of-scope"; 4], "{rows}");
    // apikey list: scope, expiry and last use (reported by the gateway with its next report;
    // a new key triggers a push and so a report).
    key(json!({"user": "nobody"})).await;
    let t0 = Instant::now();
    let listed = loop {
        let v: Value = m
            .http
            .get(m.url("/v1/apikeys"))
            .bearer_auth(&m.admin_token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let k = v
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["key_id"] == scoped["key_id"])
            .cloned()
            .unwrap();
        if k["last_used_at"].is_i64() {
            break k;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no last use: {k}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(listed["services"], json!(["orders"]));
    assert_eq!(listed["prefixes"], json!(["/orders/42"]));
    assert!(listed["expires_at"].is_null());
}

/// A sidecar's outbound listeners call with its identity: they may listen on loopback only,
/// unless explicitly allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_listeners_are_loopback_only() {
    let m = mesh().await;
    let v = post(
        &m.http,
        &m.url("/v1/services/orders/join-token"),
        &m.admin_token,
        json!({}),
    )
    .await;
    let mut c = ProxyConfig::new(
        Mode::Sidecar,
        "orders-wide",
        &m.server.url,
        m._dir.path().join("cp/bundle.pem"),
        m._dir.path().join("wide"),
    );
    c.join_token = v["join_token"].as_str().map(str::to_owned);
    c.app = Some("127.0.0.1:9".parse().unwrap());
    c.upstreams = vec![("payments".to_owned(), "0.0.0.0:0".parse().unwrap())];
    let e = castellan_proxy::start(c).await.unwrap_err().to_string();
    assert!(e.contains("not a loopback address"), "{e}");
}
