//! Decision points asked by the proxies teams already run, each a real peer: nginx
//! `auth_request` and Caddy `forward_auth` (Debian packages), Envoy's generated ext_authz client
//! (PyPI xds-protos + grpcio), AuthZEN over HTTPS, and an OIDC provider that rotates its key.
//! Every answer must be one audit record that `audit verify` accepts, marked with its origin.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use castellan::demo::{self, Mesh};
use serde_json::{Value, json};
use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Whether the peer `cmd` is here; in CI it must be (`.ci/run` installs it).
fn need(cmd: &str) -> bool {
    if castellan::peers::installed(cmd) {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{cmd} is required in CI (.ci/run installs it)"
    );
    eprintln!("SKIPPED: {cmd} is not installed");
    false
}

/// Whether python3 has `modules`; in CI it must.
fn need_python(modules: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 with {modules} is required in CI (.ci/run installs it)"
        );
        eprintln!("SKIPPED: python3 without {modules}");
    }
    ok
}

fn plain() -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(
            rustls::ClientConfig::builder_with_provider(castellan_proxy::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A client for the decision point's TLS listener (the gateway's SVID names 127.0.0.2).
fn tls_client(m: &Mesh) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(demo::tls_roots(&m.bundle).unwrap())
        .build()
        .unwrap()
}

fn admin_http(m: &Mesh) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(demo::control_plane_tls(&m.bundle).unwrap())
        .build()
        .unwrap()
}

/// Every stored record, after every proxy's spool reached the control plane; and the verdict
/// of `audit verify`.
async fn records(m: &Mesh) -> (Vec<Value>, Value) {
    let t0 = std::time::Instant::now();
    while m.decision.audit_backlog() > 0 || m.gateway.audit_backlog() > 0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "audit not shipped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let http = admin_http(m);
    let text = http
        .get(format!("{}/v1/audit/export", m.server.url))
        .bearer_auth(&m.admin_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let recs = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let verdict = http
        .get(format!("{}/v1/audit/verify", m.server.url))
        .bearer_auth(&m.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (recs, verdict)
}

/// A decision point started with `configure`d settings: with `registration`, a new service of
/// kind `decision` named `name` (e.g. one deciding for the mesh's east-west services);
/// without, another proxy of the demo gateway's identity, with id `name`.
async fn decision_point(
    m: &Mesh,
    name: &str,
    registration: Option<Value>,
    configure: impl FnOnce(&mut castellan_proxy::ProxyConfig),
) -> castellan_proxy::RunningProxy {
    let http = admin_http(m);
    let req = match registration {
        Some(mut body) => {
            body["name"] = json!(name);
            body["kind"] = json!("decision");
            http.post(format!("{}/v1/services", m.server.url))
                .json(&body)
        }
        None => http.post(format!("{}/v1/services/gateway/join-token", m.server.url)),
    };
    let r: Value = req
        .bearer_auth(&m.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut c = castellan_proxy::ProxyConfig::new(
        castellan_proxy::Mode::Decision,
        name,
        &m.server.url,
        m.bundle_path.clone(),
        m.dir.path().join(name),
    );
    c.join_token = Some(
        r["join_token"]
            .as_str()
            .unwrap_or_else(|| panic!("{r}"))
            .to_owned(),
    );
    configure(&mut c);
    let dp = castellan_proxy::start(c).await.unwrap();
    dp.ready(Duration::from_secs(20)).await.unwrap();
    dp
}

/// Where the mesh decision point's TLS listener is, and what its SVID names.
const MESH_AUTHZ_IP: &str = "127.0.0.3";

/// A decision point for the mesh's east-west calls (Envoy sidecars asking about calls to
/// inventory and payments): policy is sent only for the services a registration reaches.
async fn mesh_authz(m: &Mesh) -> castellan_proxy::RunningProxy {
    decision_point(
        m,
        "mesh-authz",
        Some(json!({"routes": ["/items=inventory", "/charges=payments"], "dns_names": [MESH_AUTHZ_IP]})),
        |c| {
            c.listen = (MESH_AUTHZ_IP.parse::<std::net::IpAddr>().unwrap(), 0).into();
            c.routes = vec![
                ("/items".to_owned(), "inventory".to_owned()),
                ("/charges".to_owned(), "payments".to_owned()),
            ];
        },
    )
    .await
}

fn by_id<'a>(recs: &'a [Value], did: &str) -> Vec<&'a Value> {
    recs.iter().filter(|r| r["decision_id"] == did).collect()
}

/// The forward-auth cases, through `peer` (nginx or Caddy) in front of the orders app.
async fn forward_auth_cases(m: &Mesh, peer: std::net::SocketAddr, name: &str) -> Vec<String> {
    let http = plain();
    let url = |p: &str| format!("http://{peer}{p}");
    let alice = format!("Bearer {}", m.alice_key);
    let gateway_id = m.gateway.identity.current().id.as_str().to_owned();
    let mut allowed_ids = Vec::new();

    // alice's own order: allowed, and the app sees who she is and which workload asked.
    let r = http
        .get(url("/orders/42"))
        .header("authorization", &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{name}: alice's own order");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["service"], "orders", "{name}: {body}");
    assert_eq!(
        body["headers"]["x-castellan-user"], "alice",
        "{name}: {body}"
    );
    assert_eq!(
        body["headers"]["x-castellan-source"],
        gateway_id.as_str(),
        "{name}: {body}"
    );
    assert!(
        body["headers"].get("x-castellan-context").is_some(),
        "{name}: {body}"
    );
    allowed_ids.push(
        body["headers"]["x-castellan-decision-id"]
            .as_str()
            .unwrap()
            .to_owned(),
    );

    // Someone else's order: 403, and the app never sees it.
    let r = http
        .get(url("/orders/7"))
        .header("authorization", &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "{name}: someone else's order");
    assert!(
        !r.text().await.unwrap().contains("\"service\""),
        "{name}: a denied request reached the app"
    );

    // No credentials: 401 with the challenge.
    let r = http.get(url("/orders/42")).send().await.unwrap();
    assert_eq!(r.status(), 401, "{name}: no credentials");
    assert!(
        r.headers()
            .get("www-authenticate")
            .is_some_and(|v| v.to_str().unwrap().starts_with("Bearer")),
        "{name}: 401 without WWW-Authenticate: {:?}",
        r.headers()
    );

    // Path attacks: refused (400/403), never reaching the app.
    for attack in [
        "/orders/%2e%2e/admin/x",
        "/orders/42%2f..%2f..%2fadmin%2fx",
        "/orders/42/..;/..;/admin/x",
    ] {
        let r = http
            .get(url(attack))
            .header("authorization", &alice)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert!(
            status == 400 || status == 403,
            "{name}: {attack} got {status}: {text}"
        );
        assert!(
            !text.contains("\"service\""),
            "{name}: {attack} reached the app"
        );
    }

    // A client describing another request than the one it sends: its own X-Original-URI /
    // X-Forwarded-Uri (the proxy's family is set by the proxy; a second family is refused), or
    // a method override the app would obey after the decision.
    for (k, v) in [
        ("x-original-uri", "/orders/42"),
        ("x-forwarded-uri", "/orders/42"),
        ("x-http-method-override", "GET"),
        ("x_original_uri", "/orders/42"),
    ] {
        let r = http
            .get(url("/admin/x"))
            .header("authorization", &alice)
            .header(k, v)
            .header("x-original-method", "GET")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert!(
            status == 400 || status == 403,
            "{name}: {k}: {v} on /admin/x got {status}: {text}"
        );
        assert!(!text.contains("\"service\""), "{name}: {k} reached the app");
    }

    // A client that sends our headers itself: 400 (the decision point cannot strip them).
    for forged in ["x-castellan-user", "X-Castellan-Source"] {
        let r = http
            .get(url("/orders/42"))
            .header("authorization", &alice)
            .header(forged, "bob")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, 400, "{name}: forged {forged}: {text}");
        assert!(
            !text.contains("\"service\""),
            "{name}: forged header reached the app"
        );
    }
    allowed_ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_and_caddy_forward_auth_ask_the_decision_point() {
    let (nginx_here, caddy_here) = (need("nginx"), need("caddy"));
    if !nginx_here && !caddy_here {
        return;
    }
    let m = demo::start_mesh().await.unwrap();
    let d = m.decision.decision.unwrap();
    let app = m.apps.iter().find(|(n, _)| *n == "orders").unwrap().1;
    let before = m.decision.audit_written();
    let mut ids = Vec::new();
    let mut peers = Vec::new();
    if nginx_here {
        let nginx =
            castellan::peers::start_nginx(&m.dir.path().join("nginx"), d.http, app).unwrap();
        ids.extend(forward_auth_cases(&m, nginx.addr, "nginx").await);
        peers.push(nginx);
    }
    if caddy_here {
        let caddy =
            castellan::peers::start_caddy(&m.dir.path().join("caddy"), d.http, app).unwrap();
        ids.extend(forward_auth_cases(&m, caddy.addr, "caddy").await);
        peers.push(caddy);
    }
    assert!(m.decision.audit_written() > before);
    let (recs, verdict) = records(&m).await;
    assert_eq!(verdict["ok"], true, "{verdict}");
    for id in &ids {
        let r = by_id(&recs, id);
        assert_eq!(r.len(), 1, "decision {id}: {r:?}");
        assert_eq!(r[0]["origin"], "forward_auth");
        assert_eq!(r[0]["writer"], "decision-point");
        assert_eq!(r[0]["decision"], "allow");
    }
    // Every record of the decision point is of forward-auth traffic, none of an API.
    let dp: Vec<&Value> = recs
        .iter()
        .filter(|r| r["writer"] == "decision-point" && r["kind"] == "decision")
        .collect();
    assert_eq!(dp.len() as u64, m.decision.audit_written());
    assert!(dp.iter().all(|r| r["origin"] == "forward_auth"));
}

/// Runs Envoy's generated client against `target` with `checks`.
fn ext_authz(target: std::net::SocketAddr, checks: Value) -> Vec<Value> {
    ext_authz_with(target, checks, None)
}

/// Runs Envoy's generated client against `target` with `checks`, over mTLS when `tls` names
/// the CA, certificate and key files.
fn ext_authz_with(target: std::net::SocketAddr, checks: Value, tls: Option<&Value>) -> Vec<Value> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/ext_authz_check.py"
    );
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            json!({"target": target.to_string(), "checks": checks, "tls": tls})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "ext_authz client failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_ext_authz_grpc_and_http() {
    let m = demo::start_mesh().await.unwrap();
    let d = m.decision.decision.unwrap();
    let alice = format!("Bearer {}", m.alice_key);
    let td = m.gateway.identity.current().id.trust_domain().to_owned();
    let orders = format!("spiffe://{td}/svc/orders");

    // HTTP mode, with a plain HTTP client: 200 allows (with the headers to add), anything else
    // is what the client gets.
    let http = plain();
    let r = http
        .get(format!("http://{}/ext-authz/orders/42", d.http))
        .header("authorization", &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-castellan-user"], "alice");
    assert!(r.headers().contains_key("x-castellan-context"));
    let http_allowed = r.headers()["x-castellan-decision-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let r = http
        .get(format!("http://{}/ext-authz/orders/7", d.http))
        .header("authorization", &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let problem: Value = r.json().await.unwrap();
    let http_denied = problem["decision_id"].as_str().unwrap().to_owned();
    let r = http
        .get(format!("http://{}/ext-authz/orders/42", d.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    // Forward-auth asked directly: two descriptions of the request, a method override, or an
    // underscore spelling of the proxy's header → 400, before any decision.
    for headers in [
        vec![
            ("x-original-uri", "/orders/42"),
            ("x-forwarded-uri", "/admin/x"),
        ],
        vec![
            ("x-original-uri", "/orders/42"),
            ("x-http-method-override", "DELETE"),
        ],
        vec![
            ("x-forwarded-uri", "/orders/42"),
            ("x_original_uri", "/admin/x"),
        ],
        vec![
            ("x-original-uri", "/orders/42"),
            ("x-rewrite-url", "/admin/x"),
        ],
    ] {
        let mut req = http
            .get(format!("http://{}/forward-auth", d.http))
            .header("authorization", &alice);
        for (k, v) in &headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 400, "{headers:?}");
    }
    // And the honest one is allowed.
    let r = http
        .get(format!("http://{}/forward-auth", d.http))
        .header("authorization", &alice)
        .header("x-original-uri", "/orders/42")
        .header("x-original-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    if !need_python("grpc, envoy.service.auth.v3.external_auth_pb2") {
        return;
    }
    let res = ext_authz(
        d.grpc,
        json!([
            // 0: alice's own order at the edge (no principal): allowed, with headers to add; her
            // forged x-castellan-user (and its underscore spelling) removed.
            {"path": "/orders/42?x=1", "headers": {"authorization": alice, "x-castellan-user": "bob", "x_castellan_user": "bob", "x-original-url": "/admin/x", "x-forwarded-host": "evil.test", "x-http-method-override": "DELETE"}},
            // 1: someone else's order: 403 with problem JSON.
            {"path": "/orders/7", "headers": {"authorization": alice}},
            // 2: no credentials: 401 with the challenge.
            {"path": "/orders/42"},
            // 3: orders' workload (mTLS principal) calling orders: no rule lets it.
            {"principal": orders, "path": "/orders/42", "context_extensions": {"service": "orders"}},
            // 4: an unknown workload: denied.
            {"principal": format!("spiffe://{td}/svc/intruder"), "path": "/orders/42", "headers": {"authorization": alice}},
            // 5: a principal of another trust domain: denied.
            {"principal": "spiffe://evil.test/svc/gateway", "path": "/orders/42", "headers": {"authorization": alice}},
            // 6: no route for the path: 404.
            {"path": "/nothing-here", "headers": {"authorization": alice}},
            // 7: a path attack: 400.
            {"path": "/orders/%2e%2e/admin/x", "headers": {"authorization": alice}},
        ]),
    );
    assert_eq!(res.len(), 8);
    let ok = &res[0];
    assert_eq!(ok["ok"], true, "{ok}");
    assert_eq!(ok["code"], 0);
    assert_eq!(ok["headers"]["x-castellan-user"], "alice");
    assert_eq!(
        ok["headers"]["x-castellan-source"],
        m.gateway.identity.current().id.as_str()
    );
    assert!(ok["headers"]["x-castellan-context"].as_str().unwrap().len() > 20);
    // Overwrite, never append to what the client sent.
    assert!(
        ok["append_actions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a == 2)
    );
    let removed: Vec<&str> = ok["headers_to_remove"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for h in [
        "x-castellan-user",
        "x_castellan_user",
        "x-original-url",
        "x-forwarded-host",
        "x-http-method-override",
    ] {
        assert!(removed.contains(&h), "{h} not removed: {removed:?}");
    }
    let denied = &res[1];
    assert_eq!(denied["ok"], false);
    assert_eq!(denied["code"], 7);
    assert_eq!(denied["status"], 403);
    assert_eq!(
        denied["headers"]["content-type"],
        "application/problem+json"
    );
    assert_eq!(denied["body"]["status"], 403);
    assert!(denied["body"]["decision_id"].as_str().unwrap().len() == 24);
    assert_eq!(res[2]["status"], 401);
    assert_eq!(res[2]["code"], 16);
    assert!(
        res[2]["headers"]["www-authenticate"]
            .as_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert_eq!(res[3]["status"], 403, "{}", res[3]);
    assert_eq!(res[4]["status"], 403, "{}", res[4]);
    assert_eq!(res[5]["status"], 403, "{}", res[5]);
    assert_eq!(res[6]["status"], 404, "{}", res[6]);
    assert!(
        res[7]["status"] == 400 || res[7]["status"] == 403,
        "{}",
        res[7]
    );

    // An Envoy sidecar in the mesh asking about east-west calls: the caller is the mTLS
    // principal, the destination comes from context_extensions (it wins over the routes).
    let mesh = mesh_authz(&m).await;
    let res2 = ext_authz(
        mesh.decision.unwrap().grpc,
        json!([
            {"principal": orders, "method": "POST", "path": "/items/3/reserve", "context_extensions": {"service": "inventory"}},
            {"principal": format!("spiffe://{td}/svc/inventory"), "method": "POST", "path": "/charges", "context_extensions": {"service": "payments"}},
            {"principal": orders, "method": "GET", "path": "/items/3"},
            {"principal": format!("spiffe://{td}/svc/intruder"), "method": "GET", "path": "/items/3"},
            // context_extensions names inventory, whose policy has no /charges rule.
            {"principal": orders, "method": "POST", "path": "/charges", "context_extensions": {"service": "inventory"}},
        ]),
    );
    assert_eq!(res2[0]["ok"], true, "{}", res2[0]);
    assert_eq!(res2[0]["headers"]["x-castellan-source"], orders.as_str());
    assert!(res2[0]["headers"].get("x-castellan-user").is_none());
    assert_eq!(res2[1]["status"], 403, "{}", res2[1]);
    assert_eq!(res2[2]["ok"], true, "{}", res2[2]);
    assert_eq!(res2[3]["status"], 403, "{}", res2[3]);
    assert_eq!(res2[4]["status"], 403, "{}", res2[4]);

    // One record per check, marked as ext_authz traffic, and the chains verify.
    while mesh.audit_backlog() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (recs, verdict) = records(&m).await;
    assert_eq!(verdict["ok"], true, "{verdict}");
    for (id, decision) in [
        (http_allowed.as_str(), "allow"),
        (http_denied.as_str(), "deny"),
        (res[1]["body"]["decision_id"].as_str().unwrap(), "deny"),
        (
            ok["headers"]["x-castellan-decision-id"].as_str().unwrap(),
            "allow",
        ),
    ] {
        let r = by_id(&recs, id);
        assert_eq!(r.len(), 1, "{id}");
        assert_eq!(r[0]["origin"], "ext_authz");
        assert_eq!(r[0]["decision"], decision);
    }
    let dp = recs
        .iter()
        .filter(|r| r["writer"] == "decision-point" && r["kind"] == "decision")
        .count() as u64;
    assert_eq!(dp, m.decision.audit_written());
    assert_eq!(
        dp,
        3 + 5 + 8,
        "3 HTTP-mode questions, 5 forward-auth questions and 8 checks"
    );

    // Envoy asking a remote decision point over mTLS: ext_authz gRPC on the TLS listener,
    // answered only for a trusted SVID, each record naming who asked.
    let gw = m.gateway.identity.current().id.as_str().to_owned();
    let remote = decision_point(&m, "dp-mtls", None, |c| {
        // On the address the gateway's SVID names, as Envoy verifies it.
        c.listen = (demo::GATEWAY_IP.parse::<std::net::IpAddr>().unwrap(), 0).into();
        c.decision.trusted = vec![gw.clone()];
        c.routes = vec![("/orders".to_owned(), "orders".to_owned())];
    })
    .await;
    // Its own SVID files: the gateway's identity, so the trusted one.
    let svid = m.dir.path().join("dp-mtls");
    let tls =
        json!({"ca": m.bundle_path, "cert": svid.join("svid.pem"), "key": svid.join("svid.key")});
    let checks = json!([
        {"path": "/orders/42", "headers": {"authorization": alice}},
        {"path": "/orders/7", "headers": {"authorization": alice}},
    ]);
    let res3 = ext_authz_with(remote.decision.unwrap().tls, checks.clone(), Some(&tls));
    assert_eq!(res3[0]["ok"], true, "{}", res3[0]);
    assert_eq!(res3[0]["headers"]["x-castellan-user"], "alice");
    assert_eq!(res3[1]["status"], 403, "{}", res3[1]);
    // The same SVID where it is not trusted: no answer at all, and the refusal is recorded.
    let res4 = ext_authz_with(d.tls, checks, Some(&tls));
    assert_eq!(res4.len(), 2);
    assert!(
        res4.iter().all(|r| r["rpc_error"] == "PERMISSION_DENIED"),
        "{res4:?}"
    );
    // Without a client certificate the TLS listener does not answer either.
    let res5 = ext_authz_with(
        remote.decision.unwrap().tls,
        json!([{"path": "/orders/42", "headers": {"authorization": alice}}]),
        Some(&json!({"ca": m.bundle_path})),
    );
    assert_eq!(res5[0]["rpc_error"], "PERMISSION_DENIED", "{res5:?}");
    while remote.audit_backlog() > 0 || m.decision.audit_backlog() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (recs, verdict) = records(&m).await;
    assert_eq!(verdict["ok"], true, "{verdict}");
    let r = by_id(
        &recs,
        res3[0]["headers"]["x-castellan-decision-id"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["writer"], "dp-mtls");
    assert_eq!(r[0]["origin"], "ext_authz");
    assert_eq!(r[0]["asked_by"], gw.as_str());
    let refused: Vec<_> = recs
        .iter()
        .filter(|r| r["origin"] == "ext_authz" && r["reason"] == "caller-refused")
        .collect();
    assert_eq!(refused.len(), 3, "{refused:#?}");
    assert!(refused.iter().all(|r| r["status"] == 403), "{refused:#?}");
}

/// A token for the demo's AuthZEN client.
async fn authzen_token(m: &Mesh) -> String {
    let v: Value = admin_http(m)
        .post(format!("{}/oauth2/token", m.server.url))
        .basic_auth(&m.authzen_client.0, Some(&m.authzen_client.1))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", "authzen:evaluate"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_owned()
}

/// `castellan policy eval` on the demo policies.
fn policy_eval(m: &Mesh, input: &Value) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("input.json");
    std::fs::write(&f, input.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_castellan"))
        .args(["policy", "eval", "--policy"])
        .arg(&m.policy_dir)
        .arg("--input")
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authzen_evaluations() {
    let m = demo::start_mesh().await.unwrap();
    let d = m.decision.decision.unwrap();
    let base = format!("https://{}", d.tls);
    let http = tls_client(&m);
    let token = authzen_token(&m).await;

    // Discovery.
    let meta: Value = http
        .get(format!("{base}/.well-known/authzen-configuration"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["policy_decision_point"], base.as_str());
    assert_eq!(
        meta["access_evaluation_endpoint"],
        format!("{base}/access/v1/evaluation")
    );
    assert_eq!(
        meta["access_evaluations_endpoint"],
        format!("{base}/access/v1/evaluations")
    );

    let alice = json!({"type": "user", "id": "alice", "properties": {"roles": ["customer"], "claims": {"customer_id": "42"}}});
    let get = json!({"name": "GET"});
    let own = json!({"type": "route", "id": "/orders/42", "properties": {"service": "orders"}});
    let other = json!({"type": "route", "id": "/orders/7"});
    let eval_url = format!("{base}/access/v1/evaluation");

    // Unauthenticated callers, and tokens without the scope, are refused.
    let r = http
        .post(&eval_url)
        .json(&json!({"subject": alice, "action": get, "resource": own}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let admin_token_as_bearer = http
        .post(&eval_url)
        .bearer_auth(&m.admin_token)
        .json(&json!({"subject": alice, "action": get, "resource": own}))
        .send()
        .await
        .unwrap();
    assert_eq!(admin_token_as_bearer.status(), 401);

    // Single evaluations: allow and deny (deny is 200 with decision false), X-Request-ID echoed,
    // context with the decision id, rule and reason.
    let ask = |body: Value| {
        let (http, url, token) = (http.clone(), eval_url.clone(), token.clone());
        async move {
            let r = http
                .post(url)
                .bearer_auth(token)
                .header("x-request-id", "req-123")
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            assert_eq!(r.headers()["x-request-id"], "req-123");
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (s, v) = ask(json!({"subject": alice, "action": get, "resource": own})).await;
    assert_eq!(s, 200);
    assert_eq!(v["decision"], true, "{v}");
    assert_eq!(v["context"]["rule"], "orders-api/customers-read-own-orders");
    let allow_id = v["context"]["decision_id"].as_str().unwrap().to_owned();
    let (s, v) = ask(json!({"subject": alice, "action": get, "resource": other})).await;
    assert_eq!(s, 200);
    assert_eq!(v["decision"], false, "{v}");
    assert_eq!(v["context"]["reason"], "no-matching-allow");

    // The same answers as `castellan policy eval` on the same inputs.
    let gw = m.gateway.identity.current().id.as_str().to_owned();
    for (path, want) in [("/orders/42", true), ("/orders/7", false)] {
        let e = policy_eval(
            &m,
            &json!({"source": {"spiffe_id": gw}, "user": {"sub": "alice", "roles": ["customer"], "claims": {"customer_id": "42"}},
                    "destination": {"service": "orders"}, "request": {"method": "GET", "path": path, "host": "", "headers": {}}}),
        );
        let (_, v) = ask(
            json!({"subject": alice, "action": get, "resource": {"type": "route", "id": path}}),
        )
        .await;
        assert_eq!(v["decision"], want);
        assert_eq!(
            e["allowed"]
                .as_bool()
                .or(e["decision"].as_str().map(|d| d == "allow")),
            Some(want),
            "{e}"
        );
        assert_eq!(v["context"]["reason"], e["reason"], "{e} vs {v}");
    }
    // A workload subject: the gateway without a user may not read orders; at a decision
    // point for the mesh, orders may reserve items and inventory may not charge.
    let (_, v) = ask(
        json!({"subject": {"type": "workload", "id": "gateway"}, "action": get, "resource": own}),
    )
    .await;
    assert_eq!(v["decision"], false, "{v}");
    let mesh = mesh_authz(&m).await;
    let mesh_url = format!(
        "https://{}/access/v1/evaluation",
        mesh.decision.unwrap().tls
    );
    for (subject, path, service, want) in [
        ("orders", "/items/9/reserve", "inventory", true),
        (
            "spiffe://demo.castellan/svc/orders",
            "/items/9/reserve",
            "inventory",
            true,
        ),
        ("inventory", "/charges", "payments", false),
    ] {
        let v: Value = http
            .post(&mesh_url)
            .bearer_auth(&token)
            .json(&json!({"subject": {"type": "workload", "id": subject}, "action": {"name": "POST"},
                          "resource": {"type": "route", "id": path, "properties": {"service": service}}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["decision"], want, "{subject} {path}: {v}");
    }

    // Errors: missing required fields → 400.
    for bad in [
        json!({"action": get, "resource": own}),
        json!({"subject": {"type": "user"}, "action": get, "resource": own}),
        json!({"subject": alice, "resource": own}),
        json!({"subject": alice, "action": get, "resource": {"type": "route"}}),
        json!({"subject": alice, "action": get, "resource": {"type": "document", "id": "x"}}),
        json!({"subject": alice, "action": {"name": "GET /x"}, "resource": own}),
        json!([1, 2]),
    ] {
        let (s, v) = ask(bad.clone()).await;
        assert_eq!(s, 400, "{bad} → {v}");
    }

    // Boxcar: defaults at the top, overrides per item, each semantic.
    let boxcar = |semantic: Option<&str>| {
        let mut b = json!({
            "subject": alice,
            "action": get,
            "evaluations": [
                {"resource": own},
                {"resource": other},
                {"resource": {"type": "route", "id": "/orders/42"}},
            ]
        });
        if let Some(s) = semantic {
            b["options"] = json!({"evaluations_semantic": s});
        }
        b
    };
    let boxcar_url = format!("{base}/access/v1/evaluations");
    let run = |body: Value| {
        let (http, url, token) = (http.clone(), boxcar_url.clone(), token.clone());
        async move {
            let r = http
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap())
        }
    };
    let decisions = |v: &Value| -> Vec<bool> {
        v["evaluations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["decision"].as_bool().unwrap())
            .collect()
    };
    let (s, v) = run(boxcar(None)).await;
    assert_eq!(s, 200);
    assert_eq!(decisions(&v), [true, false, true]);
    let (_, v) = run(boxcar(Some("execute_all"))).await;
    assert_eq!(decisions(&v), [true, false, true]);
    let (_, v) = run(boxcar(Some("deny_on_first_deny"))).await;
    assert_eq!(decisions(&v), [true, false]);
    let (_, v) = run(boxcar(Some("permit_on_first_permit"))).await;
    assert_eq!(decisions(&v), [true]);
    let (s, _) = run(boxcar(Some("first_applicable"))).await;
    assert_eq!(s, 400);
    // Without `evaluations`, a boxcar request is one evaluation.
    let (s, v) = run(json!({"subject": alice, "action": get, "resource": own})).await;
    assert_eq!((s, v["decision"].clone()), (200, json!(true)));
    // A boxcar of 100 in well under the target.
    let mut many = boxcar(None);
    many["evaluations"] = Value::Array(
        (0..100)
            .map(|i| json!({"resource": {"type": "route", "id": format!("/orders/{i}")}}))
            .collect(),
    );
    let t0 = std::time::Instant::now();
    let (s, v) = run(many).await;
    eprintln!(
        "boxcar of 100 evaluations: {:?} (round trip, debug build)",
        t0.elapsed()
    );
    assert_eq!(s, 200);
    assert_eq!(decisions(&v).iter().filter(|d| **d).count(), 1);

    // Each evaluation is one record, origin authzen (not traffic), and the chain verifies.
    let (recs, verdict) = records(&m).await;
    assert_eq!(verdict["ok"], true, "{verdict}");
    let r = by_id(&recs, &allow_id);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["origin"], "authzen");
    assert_eq!(r[0]["user"], "alice");
    let dp = recs
        .iter()
        .filter(|r| r["writer"] == "decision-point" && r["kind"] == "decision")
        .collect::<Vec<_>>();
    assert!(dp.iter().all(|r| r["origin"] == "authzen"));
    // Every answer names who asked: the OAuth client (or the trusted SVID).
    assert_eq!(r[0]["asked_by"], m.authzen_client.0.as_str(), "{}", r[0]);
    assert!(
        dp.iter()
            .all(|r| r["asked_by"].as_str().is_some_and(|a| !a.is_empty())
                || r["reason"] == "caller-refused"),
        "{dp:#?}"
    );
    // The two refused callers are recorded too (401, no answer given).
    let refused: Vec<_> = dp
        .iter()
        .filter(|r| r["reason"] == "caller-refused")
        .collect();
    assert_eq!(refused.len(), 2, "{refused:#?}");
    assert!(
        refused
            .iter()
            .all(|r| r["status"] == 401 && r["decision"] == "deny")
    );
    // The malformed questions are recorded too (400, nothing decided), naming who asked.
    let malformed: Vec<_> = dp
        .iter()
        .filter(|r| r["reason"] == "malformed-request")
        .collect();
    assert_eq!(malformed.len(), 7 + 1, "{malformed:#?}");
    assert!(
        malformed
            .iter()
            .all(|r| r["status"] == 400 && r["asked_by"] == m.authzen_client.0.as_str()),
        "{malformed:#?}"
    );
    // 2 refused + 2 single + 2 compared + 1 workload + 8 malformed + 3+3+2+1 boxcars + 1 + 100.
    assert_eq!(dp.len(), 2 + 2 + 2 + 1 + 8 + 9 + 1 + 100);
}

/// The OIDC provider: its issuer URL and CA file, and a line-based control channel.
struct Provider {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
    issuer: String,
    ca: String,
}

impl Provider {
    fn start() -> Provider {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/oidc_provider.py");
        let mut child = Command::new("python3")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        Provider {
            child,
            out,
            issuer: v["issuer"].as_str().unwrap().to_owned(),
            ca: v["ca"].as_str().unwrap().to_owned(),
        }
    }

    fn cmd(&mut self, c: &str) -> String {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{c}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_issuer_by_url_rotates_keys() {
    if !need_python("jwt, cryptography") {
        return;
    }
    let mut idp = Provider::start();
    let m = demo::start_mesh().await.unwrap();
    // A decision point that accepts the provider's tokens, keys by URL.
    let (issuer, ca) = (idp.issuer.clone(), idp.ca.clone());
    let dp = decision_point(&m, "dp-oidc", None, move |c| {
        c.routes = vec![("/orders".to_owned(), "orders".to_owned())];
        c.oidc = vec![castellan_proxy::OidcIssuer {
            issuer,
            audience: "shop".to_owned(),
            keys: castellan_proxy::OidcKeys::Discovery {
                ca_file: Some(ca.into()),
                refresh: Duration::from_secs(3600),
            },
        }];
    })
    .await;
    let d = dp.decision.unwrap();
    let http = plain();
    let ask = |token: String| {
        let http = http.clone();
        async move {
            http.get(format!("http://{}/ext-authz/orders/42", d.http))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // The first key, once fetched.
    let t1 = idp.cmd("token alice customer");
    let t0 = std::time::Instant::now();
    while ask(t1.clone()).await != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "first key never fetched"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A token signed by a key the issuer never published: refused.
    assert_eq!(ask(idp.cmd("foreign alice")).await, 401);
    // Rotation: a token with the new kid is refused until the refetch its unknown kid
    // prompts (at most one per 10 s), then accepted; the old key is gone from the JWKS.
    assert_eq!(idp.cmd("rotate"), "rotated");
    let t2 = idp.cmd("token alice customer");
    let t0 = std::time::Instant::now();
    while ask(t2.clone()).await != 200 {
        assert!(
            t0.elapsed() < castellan_proxy::oidc::MIN_REFETCH + Duration::from_secs(10),
            "rotated key never picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("rotated key in force after {:?}", t0.elapsed());
    assert_eq!(ask(t1).await, 401, "the retired key still verifies");
    // Unknown kids do not make us hammer the provider: a burst of them, few fetches.
    let fetches: u64 = idp.cmd("fetches").parse().unwrap();
    for _ in 0..20 {
        assert_eq!(ask(idp.cmd("foreign mallory")).await, 401);
    }
    let after: u64 = idp.cmd("fetches").parse().unwrap();
    assert!(
        after - fetches <= 1,
        "{} fetches for 20 unknown kids",
        after - fetches
    );
}

/// HTTP/2 on the TLS listener (offered for ext_authz gRPC) has no idle timeout of its own: a
/// client that opens connections and sends nothing must not hold them forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_on_the_tls_listener_are_closed() {
    use tokio::io::AsyncReadExt as _;
    let m = demo::start_mesh().await.unwrap();
    let dp = decision_point(&m, "dp-idle", None, |c| {
        c.listen = (demo::GATEWAY_IP.parse::<std::net::IpAddr>().unwrap(), 0).into();
        c.decision.h2_idle = Duration::from_secs(1);
    })
    .await;
    let mut cfg = demo::tls_roots(&m.bundle).unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(dp.decision.unwrap().tls)
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from(demo::GATEWAY_IP.to_owned()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // Nothing sent: the server closes the connection after its idle period, not never.
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // the server's SETTINGS, then GOAWAY
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle HTTP/2 connection was not closed");
}
