//! The dashboard: sign-in, sessions, CSRF and revocation over HTTP, and the pages in a real
//! browser (Debian's chromium driven by playwright-core, `tests/browser/dashboard.mjs`): sign
//! in, see the demo's services and edges, see a denial appear after a scripted denied request,
//! open the edge's decisions, save a screenshot; the page requests nothing from another host.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use castellan::demo::{self, Mesh};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, COOKIE, LOCATION, ORIGIN, SET_COOKIE};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// A request through the gateway: its status.
async fn request(m: &Mesh, req: &str) -> u16 {
    let tls = Arc::new(demo::tls_roots(&m.bundle).unwrap());
    demo::raw(m.gateway.inbound, Some(tls), req.as_bytes())
        .await
        .unwrap()
        .0
}

fn get(path: &str, auth: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n")
}

async fn shipped(m: &Mesh) {
    assert!(
        m.audit_shipped(Duration::from_secs(20)).await,
        "audit records not stored in time"
    );
}

async fn drive(m: &Mesh) {
    let alice = format!("Authorization: Bearer {}\r\n", m.alice_key);
    assert_eq!(request(m, &get("/orders/42", &alice)).await, 200);
    let order = format!(
        "POST /orders HTTP/1.1\r\nHost: localhost\r\n{alice}Content-Type: application/json\r\nContent-Length: 26\r\nConnection: close\r\n\r\n{{\"item_id\":7,\"quantity\":2}}"
    );
    let st = request(m, &order).await;
    assert!((200..300).contains(&st), "{st}");
    shipped(m).await;
}

fn client(m: &Mesh) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(demo::control_plane_tls(&m.bundle).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Signs in; returns the session cookie (`name=value`).
async fn sign_in(m: &Mesh, credential: &str) -> String {
    let r = client(m)
        .post(format!("{}/dashboard/login", m.server.url))
        .form(&[("credential", credential)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let c = r.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(c.contains(attr), "{c}");
    }
    c.split(';').next().unwrap().to_owned()
}

async fn page(m: &Mesh, path: &str, cookie: &str) -> (StatusCode, String, String) {
    let r = client(m)
        .get(format!("{}{path}", m.server.url))
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap();
    let loc = r
        .headers()
        .get(LOCATION)
        .map(|l| l.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (r.status(), loc, r.text().await.unwrap())
}

fn csrf_of(html: &str) -> String {
    let i = html.find("name=\"csrf\" value=\"").unwrap() + "name=\"csrf\" value=\"".len();
    html[i..].split('"').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_csrf_and_revocation() {
    let m = demo::start_mesh().await.unwrap();
    drive(&m).await;
    let http = client(&m);
    let url = |p: &str| format!("{}{p}", m.server.url);

    // Not signed in: sent to sign-in; a wrong credential is refused.
    let r = http.get(url("/dashboard")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[LOCATION], "/dashboard/login");
    let r = http
        .post(url("/dashboard/login"))
        .form(&[("credential", "cadm_not-a-credential")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get(SET_COOKIE).is_none());
    // A forged session id is nobody.
    let (st, loc, _) = page(&m, "/dashboard", "__Host-castellan_session=forged").await;
    assert_eq!(
        (st, loc.as_str()),
        (StatusCode::SEE_OTHER, "/dashboard/login")
    );
    // Cross-site sign-in (login CSRF) is refused.
    let r = http
        .post(url("/dashboard/login"))
        .header("sec-fetch-site", "cross-site")
        .form(&[("credential", m.admin_token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // A viewer signs in and reads every page; pages forbid framing and foreign loads.
    let v: Value = http
        .post(url("/v1/admin-tokens"))
        .bearer_auth(&m.admin_token)
        .json(&serde_json::json!({"name": "auditor", "role": "viewer"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let viewer = v["token"].as_str().unwrap().to_owned();
    let cookie = sign_in(&m, &viewer).await;
    for p in [
        "/dashboard",
        "/dashboard/decisions?decision=allow",
        "/dashboard/fleet",
        "/dashboard/policy",
        "/dashboard/impact",
        "/dashboard/report",
        "/dashboard/anomalies",
    ] {
        let r = http
            .get(url(p))
            .header(COOKIE, &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{p}");
        let csp = r.headers()["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
        let body = r.text().await.unwrap();
        assert!(body.contains("auditor (viewer)"), "{p}: {body}");
        assert!(!body.contains("<script"), "{p}");
    }
    let (_, _, html) = page(&m, "/dashboard", &cookie).await;
    assert!(
        html.contains("data-caller=\"gateway\" data-callee=\"orders\""),
        "{html}"
    );
    assert!(
        html.contains("data-caller=\"orders\" data-callee=\"inventory\""),
        "{html}"
    );
    // The access report is computed in the background, then shown with its findings.
    let t0 = std::time::Instant::now();
    loop {
        let (_, _, html) = page(&m, "/dashboard/report", &cookie).await;
        if html.contains("id=\"findings\"") {
            assert!(html.contains("unused-rule"), "{html}");
            break;
        }
        assert!(html.contains("report-pending"), "{html}");
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the report never came"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, _, fleet) = page(&m, "/dashboard/fleet", &cookie).await;
    assert!(
        fleet.contains("inventory") && fleet.contains("gateway"),
        "{fleet}"
    );

    // The impact preview needs the session's CSRF token and a same-origin request.
    let (_, _, form) = page(&m, "/dashboard/impact", &cookie).await;
    let csrf = csrf_of(&form);
    let orders = std::fs::read_to_string(m.policy_dir.join("orders.yaml")).unwrap();
    let candidate = orders.replace("roles: [admin]", "roles: [superadmin]");
    let post = |csrf: String, origin: Option<&'static str>| {
        let mut b = http
            .post(url("/dashboard/impact"))
            .header(COOKIE, &cookie)
            .form(&[
                ("csrf", csrf),
                ("file", "orders.yaml".to_owned()),
                ("candidate", candidate.clone()),
                ("hours", "1".to_owned()),
            ]);
        if let Some(o) = origin {
            b = b.header(ORIGIN, o);
        }
        b.send()
    };
    let r = post(String::new(), None).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = post("x".repeat(csrf.len()), None).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = post(csrf.clone(), Some("https://evil.example"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = post(csrf.clone(), None).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let html = r.text().await.unwrap();
    assert!(html.contains("id=\"impact-summary\""), "{html}");
    // Policy errors are shown, escaped.
    let r = http
        .post(url("/dashboard/impact"))
        .header(COOKIE, &cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("file", "orders.yaml"),
            ("candidate", "kind: <script>alert(1)</script>"),
        ])
        .send()
        .await
        .unwrap();
    let html = r.text().await.unwrap();
    assert!(html.contains("impact-error"), "{html}");
    assert!(!html.contains("<script>alert"), "{html}");

    // Scripts may send the credential as a bearer token instead (no CSRF: nothing ambient).
    let r = http
        .get(url("/dashboard/decisions?decision=allow"))
        .header(AUTHORIZATION, format!("Bearer {viewer}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("matched-allow"));

    // Revoking the credential ends its sessions at once.
    let tokens: Value = http
        .get(url("/v1/admin-tokens"))
        .bearer_auth(&m.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "auditor")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = http
        .post(url(&format!("/v1/admin-tokens/{id}/revoke")))
        .bearer_auth(&m.admin_token)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{r:?}");
    let (st, loc, _) = page(&m, "/dashboard", &cookie).await;
    assert_eq!(
        (st, loc.as_str()),
        (StatusCode::SEE_OTHER, "/dashboard/login")
    );

    // Signing out ends the session too.
    let cookie = sign_in(&m, &m.admin_token).await;
    let (_, _, html) = page(&m, "/dashboard", &cookie).await;
    let r = http
        .post(url("/dashboard/logout"))
        .header(COOKIE, &cookie)
        .form(&[("csrf", csrf_of(&html))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let (st, _, _) = page(&m, "/dashboard", &cookie).await;
    assert_eq!(st, StatusCode::SEE_OTHER);
}

/// Where the browser test lives, with its node modules (installed by `.ci/run`).
fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/browser")
}

/// Why the browser test cannot run here, if it cannot (outside CI it then skips, saying so).
fn browser_missing() -> Option<String> {
    if !std::path::Path::new("/usr/bin/chromium").exists() {
        return Some("/usr/bin/chromium is not installed (apt-get install chromium)".to_owned());
    }
    if !browser_dir().join("node_modules/playwright-core").exists() {
        return Some("playwright-core is not installed (npm ci --prefix tests/browser)".to_owned());
    }
    None
}

fn browse(m: &Mesh, phase: &str, extra: &[(&str, String)]) -> Value {
    let mut c = Command::new("node");
    c.arg(browser_dir().join("dashboard.mjs"))
        .current_dir(browser_dir())
        .env("BASE", &m.server.url)
        .env("PHASE", phase);
    for (k, v) in extra {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("{}")).unwrap_or_else(|_| {
            panic!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        });
    assert!(
        out.status.success() && v["ok"] == true,
        "{phase}: {v:#}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_real_browser() {
    if let Some(why) = browser_missing() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the browser test must run in CI: {why}"
        );
        eprintln!("SKIPPED dashboard_in_a_real_browser: {why}");
        return;
    }
    let m = demo::start_mesh().await.unwrap();
    drive(&m).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let first = browse(
        &m,
        "login",
        &[
            ("CREDENTIAL", m.admin_token.clone()),
            ("STATE", state.display().to_string()),
            (
                "EDGES",
                "gateway->orders,orders->inventory,orders->payments".to_owned(),
            ),
            ("SERVICES", "gateway,orders,inventory,payments".to_owned()),
        ],
    );
    let before = first["denied"].as_i64().unwrap();

    // A scripted denied request: alice may read only her own orders.
    let alice = format!("Authorization: Bearer {}\r\n", m.alice_key);
    assert_eq!(request(&m, &get("/orders/7", &alice)).await, 403);
    shipped(&m).await;

    let artifacts = std::env::var_os("CASTELLAN_ARTIFACTS").map_or_else(
        || std::env::temp_dir().join("castellan-artifacts"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    let second = browse(
        &m,
        "denial",
        &[
            ("STATE", state.display().to_string()),
            ("DENIED_BEFORE", before.to_string()),
            ("CALLER", "gateway".to_owned()),
            ("CALLEE", "orders".to_owned()),
            ("DENIED_PATH", "/orders/7".to_owned()),
            ("SHOT", shot.display().to_string()),
        ],
    );
    assert!(second["denied"].as_i64().unwrap() > before);
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    eprintln!("dashboard screenshot: {}", shot.display());
}
