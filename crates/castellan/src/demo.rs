//! `castellan demo`: the whole product on loopback in one process — a control plane on a
//! temporary SQLite database, the orders, inventory and payments apps each behind a sidecar, and
//! a gateway — then scripted traffic (allowed calls, denied calls, attacks) with a table of what
//! happened. Exits 0 only if every expectation held. `--serve` keeps it running instead.

use crate::demo_apps::{self, Upstreams};
use castellan_proxy::{Mode, ProxyConfig, RunningProxy};
use castellan_server::{Server, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// `value["key"]` without the indexing lint: a missing key is `null`.
trait At {
    fn at(&self, key: &str) -> &Value;
}

impl At for Value {
    fn at(&self, key: &str) -> &Value {
        self.get(key).unwrap_or(&Value::Null)
    }
}

const TRUST_DOMAIN: &str = "demo.castellan";

/// The demo policy, the same in every release (examples/demo/policies).
const POLICIES: &[(&str, &str)] = &[
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
    (
        "orders_test.yaml",
        include_str!("../../../examples/demo/policies/orders_test.yaml"),
    ),
    (
        "eastwest_test.yaml",
        include_str!("../../../examples/demo/policies/eastwest_test.yaml"),
    ),
];

/// Everything the demo started.
#[derive(Debug)]
pub struct Mesh {
    /// Holds every file of the run; removed on drop.
    pub dir: tempfile::TempDir,
    /// The control plane.
    pub server: castellan_server::Running,
    /// The first admin credential.
    pub admin_token: String,
    /// The trust bundle file.
    pub bundle_path: PathBuf,
    /// The demo policies (a copy).
    pub policy_dir: PathBuf,
    /// The trust bundle.
    pub bundle: Vec<CertificateDer<'static>>,
    /// The gateway.
    pub gateway: RunningProxy,
    /// A decision point acting for the gateway's identity, with its routes (ext_authz,
    /// forward-auth, AuthZEN).
    pub decision: RunningProxy,
    /// An OAuth2 client with scope `authzen:evaluate`: (client_id, client_secret).
    pub authzen_client: (String, String),
    /// The demo apps' own addresses (behind their sidecars), by service.
    pub apps: Vec<(&'static str, SocketAddr)>,
    /// The sidecars, by service.
    pub sidecars: Vec<(&'static str, RunningProxy)>,
    /// alice's API key (customer, customer_id 42).
    pub alice_key: String,
    /// bob's API key (admin).
    pub bob_key: String,
}

impl Mesh {
    /// The sidecar of `service`.
    pub fn sidecar(&self, service: &str) -> Option<&RunningProxy> {
        self.sidecars
            .iter()
            .find(|(n, _)| *n == service)
            .map(|(_, p)| p)
    }

    /// Every proxy of the mesh, by name.
    pub fn proxies(&self) -> Vec<(&str, &RunningProxy)> {
        self.sidecars
            .iter()
            .map(|(n, p)| (*n, p))
            .chain([
                ("gateway", &self.gateway),
                ("decision-point", &self.decision),
            ])
            .collect()
    }

    /// Waits (at most `limit`) until every proxy's audit records are stored by the control
    /// plane (a batch is acknowledged once stored); whether they all were.
    pub async fn audit_shipped(&self, limit: Duration) -> bool {
        let t0 = std::time::Instant::now();
        while self.proxies().iter().any(|(_, p)| p.audit_backlog() > 0) {
            if t0.elapsed() >= limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }
}

/// A demo step's failure.
pub type DemoResult<T> = Result<T, String>;

async fn admin(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    path: &str,
    body: Value,
) -> DemoResult<Value> {
    let r = http
        .post(format!("{url}{path}"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("{path}: {e}"))?;
    let status = r.status();
    let v: Value = r.json().await.map_err(|e| format!("{path}: {e}"))?;
    if status.is_success() {
        Ok(v)
    } else {
        Err(format!("{path}: {status}: {v}"))
    }
}

/// The loopback address the demo gateway listens on and its SVID names.
pub const GATEWAY_IP: &str = "127.0.0.2";

/// A TLS client configuration for the control plane of `bundle`'s trust domain, accepted by
/// SPIFFE ID only.
pub fn control_plane_tls(bundle: &[CertificateDer<'static>]) -> DemoResult<rustls::ClientConfig> {
    castellan_proxy::tls::control_plane_client_config(bundle.to_vec(), None, &[])
}

/// A TLS client configuration trusting `bundle` and checking the server's name (what an edge
/// client of the gateway does).
pub fn tls_roots(bundle: &[CertificateDer<'static>]) -> DemoResult<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in bundle {
        roots.add(c.clone()).map_err(|e| e.to_string())?;
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(castellan_proxy::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Settings the demo mesh can be started with (tests).
#[derive(Debug, Clone, Default)]
pub struct MeshOptions {
    /// Every proxy pseudonymises users in its audit records with this key.
    pub pseudonymize_users: Option<castellan_proxy::PseudonymKey>,
}

/// Starts the whole demo mesh and waits until every proxy enforces the policy.
pub async fn start_mesh() -> DemoResult<Mesh> {
    start_mesh_with(&MeshOptions::default()).await
}

/// [`start_mesh`] with options.
pub async fn start_mesh_with(opts: &MeshOptions) -> DemoResult<Mesh> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let policy_dir = dir.path().join("policies");
    std::fs::create_dir_all(&policy_dir).map_err(|e| e.to_string())?;
    for (name, text) in POLICIES {
        std::fs::write(policy_dir.join(name), text).map_err(|e| e.to_string())?;
    }
    let cfg = ServerConfig {
        data_dir: dir.path().join("control-plane"),
        listen: "127.0.0.1:0".parse().map_err(|_| "addr")?,
        ..ServerConfig::default()
    };
    let init = castellan_server::init(&cfg, TRUST_DOMAIN, None)
        .await
        .map_err(|e| e.to_string())?;
    let server = Server::start(cfg, None).await.map_err(|e| e.to_string())?;
    castellan_proxy::use_metrics_handle(castellan_server::metrics_handle());
    let bundle = server.server.bundle();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(control_plane_tls(&bundle)?)
        .build()
        .map_err(|e| e.to_string())?;
    let url = server.url.clone();
    let tok = init.admin_token.clone();
    let mut joins = std::collections::HashMap::new();
    // What each service's proxies are is registered here; the control plane sends each only
    // what it enforces (a sidecar: its own policy and its upstreams' endpoints).
    for (svc, registration) in [
        ("orders", json!({"upstreams": ["inventory", "payments"]})),
        // Inventory may reach payments' sidecar (and is refused there: the demo shows it).
        ("inventory", json!({"upstreams": ["payments"]})),
        ("payments", json!({})),
        // The gateway's SVID names its own loopback address: names the control plane serves
        // under (localhost, 127.0.0.1) are refused for workloads.
        (
            "gateway",
            json!({"kind": "gateway", "dns_names": [GATEWAY_IP],
                   "routes": ["/orders=orders", "/admin=orders"]}),
        ),
    ] {
        let mut body = registration;
        if let Some(o) = body.as_object_mut() {
            o.insert("name".to_owned(), json!(svc));
        }
        let v = admin(&http, &url, &tok, "/v1/services", body).await?;
        joins.insert(
            svc,
            v.at("join_token").as_str().unwrap_or_default().to_owned(),
        );
    }
    let files: serde_json::Map<String, Value> = POLICIES
        .iter()
        .filter(|(n, _)| !n.ends_with("_test.yaml"))
        .map(|(n, t)| ((*n).to_owned(), Value::String((*t).to_owned())))
        .collect();
    admin(
        &http,
        &url,
        &tok,
        "/v1/policy",
        json!({"files": files, "comment": "castellan demo"}),
    )
    .await?;
    // The orders service's OpenAPI document: proxies validate requests to it.
    let spec = include_str!("../../../examples/demo/openapi/orders.yaml");
    let r = http
        .put(format!("{url}/v1/services/orders/spec"))
        .bearer_auth(&tok)
        .body(spec)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("orders spec: {}", r.status()));
    }
    let alice = admin(
        &http,
        &url,
        &tok,
        "/v1/apikeys",
        json!({"user": "alice", "roles": ["customer"], "claims": {"customer_id": "42"}}),
    )
    .await?;
    let bob = admin(
        &http,
        &url,
        &tok,
        "/v1/apikeys",
        json!({"user": "bob", "roles": ["admin"]}),
    )
    .await?;

    let proxy_cfg = |mode, id: &str, svc: &str| {
        let mut c = ProxyConfig::new(
            mode,
            id,
            &url,
            init.bundle_path.clone(),
            dir.path().join("proxies").join(id),
        );
        c.join_token = joins.get(svc).cloned();
        c.pseudonymize_users = opts.pseudonymize_users.clone();
        // The demo is short: sign audit checkpoints every second so its verify shows them.
        c.checkpoint_interval = Duration::from_secs(1);
        c
    };
    let any: SocketAddr = "127.0.0.1:0".parse().map_err(|_| "addr")?;
    let mut sidecars = Vec::new();
    let mut apps = Vec::new();
    for (svc, ups) in [
        ("orders", vec!["inventory", "payments"]),
        ("inventory", vec!["payments"]),
        ("payments", vec![]),
    ] {
        let app = TcpListener::bind(any).await.map_err(|e| e.to_string())?;
        let mut c = proxy_cfg(Mode::Sidecar, &format!("{svc}-sidecar"), svc);
        let app_addr = app.local_addr().map_err(|e| e.to_string())?;
        apps.push((svc, app_addr));
        c.app = Some(app_addr);
        c.upstreams = ups.iter().map(|u| ((*u).to_owned(), any)).collect();
        let p = castellan_proxy::start(c)
            .await
            .map_err(|e| format!("{svc} sidecar: {e}"))?;
        let out = |name: &str| p.outbound.iter().find(|(s, _)| s == name).map(|(_, a)| *a);
        let name: &'static str = svc;
        demo_apps::spawn(
            name,
            app,
            Upstreams {
                inventory: out("inventory"),
                payments: out("payments"),
            },
        );
        sidecars.push((name, p));
    }
    let mut g = proxy_cfg(Mode::Gateway, "gateway", "gateway");
    let g_routes = vec![
        ("/orders".to_owned(), "orders".to_owned()),
        ("/admin".to_owned(), "orders".to_owned()),
    ];
    let gateway_listen = SocketAddr::from((
        GATEWAY_IP.parse::<std::net::IpAddr>().map_err(|_| "addr")?,
        0,
    ));
    g.routes.clone_from(&g_routes);
    g.listen = gateway_listen;
    let gateway = castellan_proxy::start(g)
        .await
        .map_err(|e| format!("gateway: {e}"))?;
    // A decision point for proxies the demo does not run itself (nginx, Caddy, Envoy,
    // AuthZEN callers): the gateway's identity and routes, so one request gets one answer
    // whichever way it is asked. It joins with its own token.
    let join = admin(
        &http,
        &url,
        &tok,
        "/v1/services/gateway/join-token",
        json!({}),
    )
    .await?;
    let mut d = proxy_cfg(Mode::Decision, "decision-point", "gateway");
    d.join_token = join.at("join_token").as_str().map(str::to_owned);
    d.routes.clone_from(&g_routes);
    d.listen = gateway_listen;
    let decision = castellan_proxy::start(d)
        .await
        .map_err(|e| format!("decision point: {e}"))?;
    let client = admin(
        &http,
        &url,
        &tok,
        "/v1/clients",
        json!({"name": "authzen-demo", "scopes": [castellan_proxy::AUTHZEN_SCOPE]}),
    )
    .await?;
    let authzen_client = (
        client
            .at("client_id")
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        client
            .at("client_secret")
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    );
    // Ready: every proxy enforces the policy and knows the endpoints it forwards to.
    for p in sidecars.iter().map(|(_, p)| p).chain([&gateway, &decision]) {
        p.ready(Duration::from_secs(20))
            .await
            .map_err(|e| e.to_string())?;
    }
    let t0 = std::time::Instant::now();
    // Each proxy is sent the endpoints of the services it reaches, and only those.
    let reaches: [(&RunningProxy, &[&str]); 3] = [
        (&gateway, &["orders"]),
        (
            sidecars
                .iter()
                .find(|(n, _)| *n == "orders")
                .map(|(_, p)| p)
                .ok_or("no orders sidecar")?,
            &["inventory", "payments"],
        ),
        (
            sidecars
                .iter()
                .find(|(n, _)| *n == "inventory")
                .map(|(_, p)| p)
                .ok_or("no inventory sidecar")?,
            &["payments"],
        ),
    ];
    while reaches
        .iter()
        .any(|(p, services)| services.iter().any(|s| p.state.endpoints(s).is_empty()))
    {
        if t0.elapsed() > Duration::from_secs(20) {
            return Err("endpoints were not pushed to the proxies".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Mesh {
        bundle,
        bundle_path: init.bundle_path,
        admin_token: init.admin_token,
        policy_dir,
        server,
        gateway,
        decision,
        authzen_client,
        apps,
        sidecars,
        alice_key: alice.at("api_key").as_str().unwrap_or_default().to_owned(),
        bob_key: bob.at("api_key").as_str().unwrap_or_default().to_owned(),
        dir,
    })
}

/// A client TLS configuration presenting `as_`'s SVID and accepting only the SVID of service
/// `to`, validated with `verify_with`'s pushed bundle and revocations (as a sidecar would).
pub fn mtls_client(
    as_: &RunningProxy,
    verify_with: &RunningProxy,
    to: &str,
) -> DemoResult<Arc<rustls::ClientConfig>> {
    let expected =
        castellan_identity::SpiffeId::for_service(TRUST_DOMAIN, to).map_err(|e| e.to_string())?;
    let v = Arc::new(castellan_proxy::tls::SvidServerVerifier::new(
        verify_with.state.clone(),
        expected,
    ));
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(castellan_proxy::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(v)
            .with_client_cert_resolver(as_.identity.clone()),
    ))
}

/// One HTTP/1.1 exchange written byte for byte (attacks must reach the proxy as sent).
pub async fn raw(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    request: &[u8],
) -> DemoResult<(u16, Value)> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    match tls {
        Some(cfg) => {
            let name = ServerName::IpAddress(addr.ip().into());
            let mut s = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            s.write_all(request).await.map_err(|e| e.to_string())?;
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        }
        None => {
            let mut s = tcp;
            s.write_all(request).await.map_err(|e| e.to_string())?;
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP response ({} bytes)", buf.len()))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

#[derive(Clone, Copy, PartialEq)]
enum Want {
    Status(u16),
    /// Refused at the edge with some 4xx, and never reached an app.
    Refused,
}

/// An extra check on the response body.
type Check = fn(&Value) -> Result<(), String>;

struct Case {
    what: String,
    who: &'static str,
    want: Want,
    request: Vec<u8>,
    check: Option<Check>,
    eastwest: bool,
    /// Send the request this many times; the last answer counts.
    repeat: usize,
}

fn get(path: &str, auth: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}{extra}Connection: close\r\n\r\n")
        .into_bytes()
}

fn cases(m: &Mesh) -> Vec<Case> {
    let alice = format!("Authorization: Bearer {}\r\n", m.alice_key);
    let bob = format!("X-API-Key: {}\r\n", m.bob_key);
    let case = |what: &str, who: &'static str, want: Want, request: Vec<u8>| Case {
        what: what.to_owned(),
        who,
        want,
        request,
        check: None,
        eastwest: false,
        repeat: 1,
    };
    let mut v = vec![
        case("GET /orders/42", "alice", Want::Status(200), get("/orders/42", &alice, "")),
        case("GET /orders/43 (someone else's order)", "alice", Want::Status(403), get("/orders/43", &alice, "")),
        case("GET /orders/43", "bob", Want::Status(200), get("/orders/43", &bob, "")),
        Case {
            check: Some(|v| {
                let calls = v.at("calls").as_array().ok_or("no east-west calls")?;
                for c in calls {
                    if c.at("status") != 200 {
                        return Err(format!("{} got {}", c.at("path"), c.at("status")));
                    }
                    if c.at("response").at("headers").at("x-castellan-user") != "alice" || c.at("response").at("headers").at("x-castellan-source") != "spiffe://demo.castellan/svc/orders" {
                        return Err(format!("{}: user context did not travel: {}", c.at("path"), c.at("response").at("headers")));
                    }
                }
                if calls.len() == 2 { Ok(()) } else { Err("expected calls to inventory and payments".to_owned()) }
            }),
            ..case("POST /orders (→ inventory, payments over mTLS)", "alice", Want::Status(201), format!("POST /orders HTTP/1.1\r\nHost: localhost\r\n{alice}Content-Type: application/json\r\nContent-Length: 26\r\nConnection: close\r\n\r\n{{\"item_id\":7,\"quantity\":2}}").into_bytes())
        },
        case("GET /admin/users", "alice", Want::Status(403), get("/admin/users", &alice, "")),
        case("GET /admin/users", "bob", Want::Status(200), get("/admin/users", &bob, "")),
        case("GET /orders/42 without credentials", "-", Want::Status(401), get("/orders/42", "", "")),
        case("GET /orders/42 with a forged API key", "forged", Want::Status(401), get("/orders/42", "X-API-Key: cak_forged.key\r\n", "")),
        Case {
            check: Some(|v| if v.at("headers").at("x-castellan-user") == "alice" { Ok(()) } else { Err(format!("spoofed header reached the app: {}", v.at("headers"))) }),
            ..case("spoofed x-castellan-user: bob, x-castellan-source", "alice", Want::Status(200), get("/orders/42", &alice, "x-castellan-user: bob\r\nx-castellan-source: spiffe://demo.castellan/svc/gateway\r\n"))
        },
    ];
    for p in [
        "//admin/x",
        "/orders/../admin/x",
        "/orders/%2e%2e/admin/x",
        "/%2Fadmin/x",
        "/admin%5Cx",
        "/admin%00",
        "/admin;x=y/users",
        "/admin?/orders/42",
        "/ADMIN/x",
        "/..;/admin/x",
        "/%252e%252e/admin",
        "/orders/%ff%fe",
        "/orders/42#/../../admin",
        "/../../admin/x",
        "/admin\\x",
        "/%2e%2e/%2e%2e/admin/x",
    ] {
        v.push(case(
            &format!("attack: GET {p}"),
            "alice",
            Want::Refused,
            get(p, &alice, ""),
        ));
    }
    let long = format!("/orders/{}", "a".repeat(9000));
    v.push(case(
        "attack: path over 8 KiB",
        "alice",
        Want::Refused,
        get(&long, &alice, ""),
    ));
    v.push(case(
        "attack: lower-case method get",
        "alice",
        Want::Refused,
        format!("get /orders/42 HTTP/1.1\r\nHost: localhost\r\n{alice}Connection: close\r\n\r\n")
            .into_bytes(),
    ));
    for (what, head) in [
        ("smuggling: Content-Length: +3", "Content-Length: +3\r\n"),
        (
            "smuggling: two Content-Length",
            "Content-Length: 2\r\nContent-Length: 3\r\n",
        ),
        (
            "smuggling: Content-Length + Transfer-Encoding",
            "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        ),
        (
            "smuggling: two Transfer-Encoding",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ),
    ] {
        v.push(case(what, "alice", Want::Refused, format!("POST /orders HTTP/1.1\r\nHost: localhost\r\n{alice}{head}Connection: close\r\n\r\n0\r\n\r\n").into_bytes()));
    }
    v.push(case("smuggling: oversized chunk size", "alice", Want::Refused, format!("POST /orders HTTP/1.1\r\nHost: localhost\r\n{alice}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nFFFFFFFFFFFFFFFFFF\r\nx\r\n0\r\n\r\n").into_bytes()));
    v.push(case(
        "oversized headers",
        "alice",
        Want::Refused,
        get(
            "/orders/42",
            &alice,
            &format!("X-Big: {}\r\n", "a".repeat(20_000)),
        ),
    ));
    let bad = r#"{"item_id":7,"quantity":1000}"#;
    v.push(case(
        "validation: POST /orders with quantity 1000 (OpenAPI)",
        "alice",
        Want::Status(400),
        format!("POST /orders HTTP/1.1\r\nHost: localhost\r\n{alice}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{bad}", bad.len()).into_bytes(),
    ));
    v.push(Case {
        repeat: 5,
        ..case(
            "rate limit: 6th admin call within a minute",
            "bob",
            Want::Status(429),
            get("/admin/stats", &bob, ""),
        )
    });
    v.push(Case { eastwest: true, ..case("east-west: inventory → payments POST /charges", "inventory", Want::Status(403), b"POST /charges HTTP/1.1\r\nHost: payments\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_vec()) });
    v
}

fn rule_of(m: &Mesh, body: &Value) -> String {
    let did = body
        .get("decision_id")
        .and_then(Value::as_str)
        .or_else(|| body.at("headers").at("x-castellan-decision-id").as_str());
    let Some(did) = did else {
        return "-".to_owned();
    };
    for p in m
        .sidecars
        .iter()
        .map(|(_, p)| p)
        .chain(std::iter::once(&m.gateway))
    {
        if let Some(d) = p.state.recent_decision(did) {
            return d.rule.unwrap_or(d.reason);
        }
    }
    "-".to_owned()
}

async fn run_script(m: &Mesh, json_out: bool) -> bool {
    let tls = match tls_roots(&m.bundle) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("error: {e}");
            return false;
        }
    };
    let inventory_out = m
        .sidecars
        .iter()
        .find(|(n, _)| *n == "inventory")
        .and_then(|(_, p)| p.outbound.first())
        .map(|(_, a)| *a);
    let mut rows = Vec::new();
    let mut all_ok = true;
    for c in cases(m) {
        for _ in 1..c.repeat {
            let _ = raw(m.gateway.inbound, Some(tls.clone()), &c.request).await;
        }
        let result = if c.eastwest {
            match inventory_out {
                Some(a) => raw(a, None, &c.request).await,
                None => Err("no inventory outbound listener".to_owned()),
            }
        } else {
            raw(m.gateway.inbound, Some(tls.clone()), &c.request).await
        };
        let (got, body) = match result {
            Ok(r) => r,
            Err(e) => (0, json!({"error": e})),
        };
        let reached_app = body.get("service").is_some();
        let mut ok = match c.want {
            Want::Status(s) => got == s,
            Want::Refused => (400..500).contains(&got) && !reached_app,
        };
        let mut note = String::new();
        if ok
            && let Some(check) = c.check
            && let Err(e) = check(&body)
        {
            ok = false;
            note = e;
        }
        all_ok &= ok;
        let expected = match c.want {
            Want::Status(s) => s.to_string(),
            Want::Refused => "4xx".to_owned(),
        };
        rows.push((c.what, c.who, expected, got, rule_of(m, &body), ok, note));
    }
    // The same decision through a proxy teams already run: nginx auth_request asking the
    // decision point.
    let mut skipped = None;
    match nginx_rows(m).await {
        Ok(r) => {
            for row in r {
                all_ok &= row.5;
                rows.push(row);
            }
        }
        Err(note) => skipped = Some(note),
    }
    if json_out {
        let out: Vec<Value> = rows.iter().map(|(w, who, e, g, r, ok, n)| json!({"request": w, "as": who, "expected": e, "got": g, "rule": r, "ok": ok, "note": n})).collect();
        println!("{}", json!({"ok": all_ok, "results": out}));
    } else {
        println!(
            "{:<52} {:<10} {:>8} {:>4}  {:<38} result",
            "request", "as", "expected", "got", "deciding rule"
        );
        for (w, who, e, g, r, ok, n) in &rows {
            let w: String = w.chars().take(52).collect();
            println!(
                "{w:<52} {who:<10} {e:>8} {g:>4}  {r:<38} {}{}",
                if *ok { "ok" } else { "FAIL" },
                if n.is_empty() {
                    String::new()
                } else {
                    format!(" ({n})")
                }
            );
        }
        if let Some(note) = &skipped {
            println!("{note}");
        }
        let failed = rows.iter().filter(|r| !r.5).count();
        println!(
            "\n{} requests, {} as expected, {failed} not",
            rows.len(),
            rows.len() - failed
        );
        println!(
            "control plane: {}  (proxies: castellan proxy list; policy: castellan policy history)",
            m.server.url
        );
    }
    all_ok &= verify_audit(m, json_out).await;
    all_ok
}

/// One row of the demo's table: request, as whom, expected, got, deciding rule, ok, note.
type Row = (String, &'static str, String, u16, String, bool, String);

/// Alice's own order and someone else's through real nginx with `auth_request` to the decision
/// point; `Err` says why the rows were skipped (nginx not installed) or what failed to start.
async fn nginx_rows(m: &Mesh) -> Result<Vec<Row>, String> {
    if !crate::peers::installed("nginx") {
        return Err(
            "nginx is not installed: the nginx auth_request rows were skipped (apt-get install nginx)"
                .to_owned(),
        );
    }
    let app = m
        .apps
        .iter()
        .find(|(n, _)| *n == "orders")
        .map(|(_, a)| *a)
        .ok_or("no orders app")?;
    let d = m.decision.decision.ok_or("no decision point")?;
    let nginx = crate::peers::start_nginx(&m.dir.path().join("nginx"), d.http, app)?;
    let alice = format!("Authorization: Bearer {}\r\n", m.alice_key);
    let mut rows = Vec::new();
    for (path, want) in [("/orders/42", 200), ("/orders/7", 403)] {
        let (got, body) = raw(nginx.addr, None, &get(path, &alice, ""))
            .await
            .unwrap_or((0, Value::Null));
        let mut ok = got == want;
        let mut note = String::new();
        if want == 200 && body.at("headers").at("x-castellan-user").as_str() != Some("alice") {
            ok = false;
            note = "x-castellan-user did not reach the app".to_owned();
        }
        let rule = m
            .decision
            .state
            .last_decision()
            .map_or_else(|| "-".to_owned(), |d| d.rule.unwrap_or(d.reason));
        rows.push((
            format!("nginx auth_request → decision point: GET {path}"),
            "alice",
            want.to_string(),
            got,
            rule,
            ok,
            note,
        ));
    }
    Ok(rows)
}

/// Waits until every proxy's audit spool is stored, then verifies every chain.
async fn verify_audit(m: &Mesh, json_out: bool) -> bool {
    let proxies = m.proxies();
    m.audit_shipped(Duration::from_secs(20)).await;
    let verdict: DemoResult<Value> = async {
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(control_plane_tls(&m.bundle)?)
            .build()
            .map_err(|e| e.to_string())?;
        let r = http
            .get(format!("{}/v1/audit/verify", m.server.url))
            .bearer_auth(&m.admin_token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        r.json::<Value>().await.map_err(|e| e.to_string())
    }
    .await;
    let v = match verdict {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: audit verify: {e}");
            return false;
        }
    };
    let ok = v.at("ok") == &Value::Bool(true);
    if !json_out {
        println!(
            "\naudit verify ({}):",
            if ok {
                "every chain intact"
            } else {
                "PROBLEMS FOUND"
            }
        );
        for (name, p) in &proxies {
            let w = v
                .at("writers")
                .as_array()
                .and_then(|ws| {
                    // This run's chain of the proxy: its id and this start's epoch.
                    let proxy_id = if name == &"gateway" || name == &"decision-point" {
                        (*name).to_owned()
                    } else {
                        format!("{name}-sidecar")
                    };
                    ws.iter().find(|w| {
                        w.at("proxy_id").as_str() == Some(proxy_id.as_str())
                            && w.at("epoch").as_str() == Some(p.audit_epoch())
                    })
                })
                .cloned()
                .unwrap_or(Value::Null);
            println!(
                "  {:<18} wrote {:>3} records, control plane stored {:>3}{}",
                name,
                p.audit_written(),
                w.at("records"),
                w.at("first_error")
                    .as_str()
                    .map(|e| format!(" — {e}"))
                    .unwrap_or_default()
            );
        }
    }
    ok
}

fn write_state(m: &Mesh, file: &Path) -> DemoResult<()> {
    let state = json!({
        "gateway_url": format!("https://{}", m.gateway.inbound),
        "admin_url": m.server.url,
        "dashboard_url": format!("{}/dashboard", m.server.url),
        "ca_bundle": m.bundle_path,
        "admin_token": m.admin_token,
        "policy_dir": m.policy_dir,
        "users": {
            "alice": {"authorization": format!("Bearer {}", m.alice_key)},
            "bob": {"authorization": format!("Bearer {}", m.bob_key)},
        },
        "proxies": m.sidecars.iter().map(|(n, p)| json!({"service": n, "inbound": p.inbound.to_string(), "admin": p.admin.to_string()})).collect::<Vec<_>>(),
        "gateway_admin": m.gateway.admin.to_string(),
        "decision_point": m.decision.decision.map(|d| json!({
            "ext_authz_grpc": d.grpc.to_string(),
            "ext_authz_http": format!("http://{}{}", d.http, castellan_proxy::EXT_AUTHZ_HTTP_PREFIX),
            "forward_auth_url": format!("http://{}{}", d.http, castellan_proxy::FORWARD_AUTH_PATH),
            "authzen_url": format!("https://{}", d.tls),
            "authzen_client": {"client_id": m.authzen_client.0, "client_secret": m.authzen_client.1,
                               "token_url": format!("{}/oauth2/token", m.server.url),
                               "scope": castellan_proxy::AUTHZEN_SCOPE},
            "admin": m.decision.admin.to_string(),
        })),
    });
    let tmp = file.with_extension("tmp");
    // It holds credentials: owner-only.
    let write = || -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(&state).map_err(std::io::Error::other)?)
    };
    write().map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, file).map_err(|e| format!("{}: {e}", file.display()))
}

/// Runs `castellan demo [--serve --state-file FILE]`.
pub fn run(serve: bool, state_file: Option<PathBuf>, json_out: bool) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let mesh = match start_mesh().await {
            Ok(m) => m,
            Err(e) => {
                eprintln!("error: the demo mesh did not start: {e}");
                return ExitCode::FAILURE;
            }
        };
        if serve {
            if let Some(f) = &state_file
                && let Err(e) = write_state(&mesh, f)
            {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            eprintln!(
                "castellan demo is serving; gateway https://{}; dashboard {}/dashboard (sign in with the admin token); interrupt to stop",
                mesh.gateway.inbound, mesh.server.url
            );
            let _ = tokio::signal::ctrl_c().await;
            return ExitCode::SUCCESS;
        }
        if run_script(&mesh, json_out).await {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}
