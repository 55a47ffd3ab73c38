//! The operators' dashboard, served by the control plane under `/dashboard`: server-rendered
//! HTML with one stylesheet and inline SVG, no script, nothing fetched from another host.
//!
//! Pages: overview (service graph from the traffic rollups, denials per minute, audit chain
//! heads), decisions (audit search; an edge's decisions), fleet, policy revisions with diffs,
//! impact preview of a candidate file, access report, anomalies.
//!
//! Sign-in exchanges an admin or viewer credential for a session cookie (`__Host-` prefixed,
//! HttpOnly, Secure, SameSite=Strict); scripts may send `Authorization: Bearer` on any page
//! instead. The session keeps only the credential's hash, and the credential is checked again
//! on every request, so revoking it ends its sessions. Every POST needs the session's CSRF
//! token (bearer callers are exempt: nothing ambient) and a same-origin `Sec-Fetch-Site`/
//! `Origin` when the browser sends one. Every page is read-only: viewers see all of it.

use crate::Server;
use crate::admin::Caller;
use crate::admin::auth::authenticate;
use crate::keys::{credential_hash, random_id};
use axum::Router;
use axum::extract::{Form, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use castellan_store::AuditFilter;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The session cookie (the `__Host-` prefix: Secure, Path=/, no Domain).
const COOKIE: &str = "__Host-castellan_session";
/// A session ends this long after sign-in…
const SESSION_MAX: Duration = Duration::from_secs(8 * 3600);
/// …or after this long unused.
const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
/// Most sessions kept at once (the oldest go first)…
const MAX_SESSIONS: usize = 10_000;
/// …and per credential (its own oldest go first: one credential cannot end others' sessions).
const MAX_SESSIONS_PER_CREDENTIAL: usize = 16;
/// Rows per decisions page.
const DECISIONS: i64 = 100;

const STYLE: &str = include_str!("dashboard.css");

/// What every dashboard response carries: nothing loads from elsewhere, nothing frames it.
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// One signed-in browser.
#[derive(Debug)]
struct Session {
    credential_hash: Vec<u8>,
    csrf: String,
    born: Instant,
    used: Instant,
}

/// The dashboard's sessions (per replica: a browser signs in again on another replica).
#[derive(Debug, Default)]
pub(crate) struct Sessions(Mutex<HashMap<String, Session>>);

impl Sessions {
    fn open(&self, credential_hash: Vec<u8>) -> Option<(String, String)> {
        let id = random_id(32).ok()?;
        let csrf = random_id(24).ok()?;
        let mut m = self.0.lock().ok()?;
        let now = Instant::now();
        m.retain(|_, s| live(s, now));
        let own = m
            .values()
            .filter(|s| s.credential_hash == credential_hash)
            .count();
        let evict = if own >= MAX_SESSIONS_PER_CREDENTIAL {
            m.iter()
                .filter(|(_, s)| s.credential_hash == credential_hash)
                .min_by_key(|(_, s)| s.born)
        } else if m.len() >= MAX_SESSIONS {
            m.iter().min_by_key(|(_, s)| s.born)
        } else {
            None
        };
        if let Some(k) = evict.map(|(k, _)| k.clone()) {
            m.remove(&k);
        }
        m.insert(
            id.clone(),
            Session {
                credential_hash,
                csrf: csrf.clone(),
                born: now,
                used: now,
            },
        );
        Some((id, csrf))
    }

    /// The session's credential hash and CSRF token, if it is live (and marks it used).
    fn get(&self, id: &str) -> Option<(Vec<u8>, String)> {
        let mut m = self.0.lock().ok()?;
        let now = Instant::now();
        let s = m.get_mut(id)?;
        if !live(s, now) {
            m.remove(id);
            return None;
        }
        s.used = now;
        Some((s.credential_hash.clone(), s.csrf.clone()))
    }

    fn close(&self, id: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(id);
        }
    }
}

fn live(s: &Session, now: Instant) -> bool {
    now.duration_since(s.born) < SESSION_MAX && now.duration_since(s.used) < SESSION_IDLE
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .filter(|v| !v.is_empty() && v.len() < 128)
        .map(str::to_owned)
}

/// A signed-in dashboard user.
pub(crate) struct Viewer {
    caller: Caller,
    /// The session's CSRF token; `None` for bearer callers.
    csrf: Option<String>,
    session: Option<String>,
}

impl Viewer {
    /// Whether a state-changing request carries what it must.
    fn check_csrf(&self, given: &str) -> bool {
        match &self.csrf {
            None => true,
            Some(want) => {
                want.len() == given.len()
                    && want
                        .bytes()
                        .zip(given.bytes())
                        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                        == 0
            }
        }
    }
}

impl FromRequestParts<Arc<Server>> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &Arc<Server>) -> Result<Viewer, Response> {
        if parts.headers.contains_key(header::AUTHORIZATION) {
            return Caller::from_request_parts(parts, s)
                .await
                .map(|caller| Viewer {
                    caller,
                    csrf: None,
                    session: None,
                })
                .map_err(IntoResponse::into_response);
        }
        let to_login = || Redirect::to("/dashboard/login").into_response();
        let id = session_id(&parts.headers).ok_or_else(to_login)?;
        let (hash, csrf) = s.sessions.get(&id).ok_or_else(to_login)?;
        match authenticate(s, &hash).await {
            Ok(caller) => Ok(Viewer {
                caller,
                csrf: Some(csrf),
                session: Some(id),
            }),
            Err(_) => {
                // Revoked (or otherwise gone): the session ends with it.
                s.sessions.close(&id);
                Err(to_login())
            }
        }
    }
}

/// Refuses a cross-site POST when the browser says it is one. `authority` is the request's
/// (HTTP/2 `:authority`), used when there is no `Host` header.
fn same_origin(headers: &HeaderMap, authority: Option<&str>) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return matches!(site, "same-origin" | "none");
    }
    match (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or(authority),
    ) {
        (Some(origin), Some(host)) => origin.strip_prefix("https://") == Some(host),
        (Some(_), None) => false,
        (None, _) => true,
    }
}

pub(crate) fn routes() -> Router<Arc<Server>> {
    Router::new()
        .route("/dashboard", get(overview))
        .route("/dashboard/", get(|| async { Redirect::to("/dashboard") }))
        .route("/dashboard/login", get(login_page).post(login))
        .route("/dashboard/logout", axum::routing::post(logout))
        .route("/dashboard/decisions", get(decisions))
        .route("/dashboard/fleet", get(fleet))
        .route("/dashboard/policy", get(policy))
        .route("/dashboard/impact", get(impact_page).post(impact))
        .route("/dashboard/report", get(report))
        .route("/dashboard/anomalies", get(anomalies))
        .route(
            "/dashboard/style.css",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/css; charset=utf-8"),
                        (header::CACHE_CONTROL, "max-age=300"),
                    ],
                    STYLE,
                )
            }),
        )
        .layer(axum::middleware::map_response(secure_headers))
}

async fn secure_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

/// HTML-escapes text for element content and quoted attributes.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query value.
fn qv(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

fn now_ms() -> i64 {
    crate::unix_now().saturating_mul(1000)
}

/// A service's display name: the local name of `spiffe://TD/svc/NAME`, else the ID.
fn display_name(s: &Server, id: &str) -> String {
    if id.is_empty() {
        return "(no workload)".to_owned();
    }
    id.strip_prefix("spiffe://")
        .and_then(|r| r.strip_prefix(s.trust_domain.as_str()))
        .and_then(|r| r.strip_prefix("/svc/"))
        .filter(|n| !n.contains('/'))
        .map_or_else(|| id.to_owned(), str::to_owned)
}

const PAGES: &[(&str, &str)] = &[
    ("/dashboard", "Overview"),
    ("/dashboard/decisions", "Decisions"),
    ("/dashboard/fleet", "Fleet"),
    ("/dashboard/policy", "Policy"),
    ("/dashboard/impact", "Impact preview"),
    ("/dashboard/report", "Access report"),
    ("/dashboard/anomalies", "Anomalies"),
];

fn page(v: &Viewer, title: &str, body: &str) -> Response {
    let mut nav = String::new();
    for (href, name) in PAGES {
        let cur = if *name == title {
            " aria-current=\"page\""
        } else {
            ""
        };
        let _ = write!(nav, "<a href=\"{href}\"{cur}>{name}</a>");
    }
    let logout = match (&v.csrf, &v.session) {
        (Some(csrf), Some(_)) => format!(
            "<form method=\"post\" action=\"/dashboard/logout\" class=\"inline\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button type=\"submit\">Sign out</button></form>",
            esc(csrf)
        ),
        _ => String::new(),
    };
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t} · Castellan</title>\
         <link rel=\"stylesheet\" href=\"/dashboard/style.css\"></head><body>\
         <header><strong>Castellan</strong><nav>{nav}</nav><span class=\"who\">{who} ({role}) {logout}</span></header>\
         <main><h1>{t}</h1>{body}</main></body></html>",
        t = esc(title),
        who = esc(v.caller.name()),
        role = v.caller.role().as_str(),
    );
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

fn error_page(status: StatusCode, msg: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Castellan</title>\
         <link rel=\"stylesheet\" href=\"/dashboard/style.css\"></head><body><main><h1>{}</h1><p class=\"error\">{}</p>\
         <p><a href=\"/dashboard\">Back</a></p></main></body></html>",
        status.as_u16(),
        esc(msg)
    );
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "dashboard page failed");
    error_page(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the page could not be built; see the control plane's log",
    )
}

// ---- sign-in -------------------------------------------------------------------------------

fn login_form(msg: &str) -> Response {
    let err = if msg.is_empty() {
        String::new()
    } else {
        format!("<p class=\"error\" role=\"alert\">{}</p>", esc(msg))
    };
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sign in · Castellan</title>\
         <link rel=\"stylesheet\" href=\"/dashboard/style.css\"></head><body><main class=\"login\">\
         <h1>Castellan</h1>{err}<form method=\"post\" action=\"/dashboard/login\">\
         <label for=\"credential\">Admin or viewer credential</label>\
         <input id=\"credential\" name=\"credential\" type=\"password\" autocomplete=\"off\" required>\
         <button type=\"submit\">Sign in</button></form></main></body></html>"
    );
    let status = if msg.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    };
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response()
}

async fn login_page() -> Response {
    login_form("")
}

#[derive(Deserialize)]
struct LoginForm {
    credential: String,
}

async fn login(
    State(s): State<Arc<Server>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Form(f): Form<LoginForm>,
) -> Response {
    if !same_origin(&headers, uri.authority().map(|a| a.as_str())) {
        return error_page(StatusCode::FORBIDDEN, "cross-site sign-in refused");
    }
    let cred = f.credential.trim();
    if !cred.starts_with(crate::admin::ADMIN_TOKEN_PREFIX) || cred.len() >= 256 {
        return login_form("unknown or revoked credential");
    }
    let hash = credential_hash(cred);
    if authenticate(&s, &hash).await.is_err() {
        return login_form("unknown or revoked credential");
    }
    let Some((id, _)) = s.sessions.open(hash) else {
        return internal("no session");
    };
    let cookie = format!("{COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict");
    let mut r = Redirect::to("/dashboard").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(s): State<Arc<Server>>,
    v: Viewer,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Form(f): Form<CsrfForm>,
) -> Response {
    if !same_origin(&headers, uri.authority().map(|a| a.as_str())) || !v.check_csrf(&f.csrf) {
        return error_page(StatusCode::FORBIDDEN, "missing or wrong CSRF token");
    }
    if let Some(id) = &v.session {
        s.sessions.close(id);
    }
    let mut r = Redirect::to("/dashboard/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "__Host-castellan_session=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

// ---- overview ------------------------------------------------------------------------------

/// The service graph as SVG: services on a circle, one arrow per edge (red when it had
/// denials), each a link to its decisions.
fn graph_svg(s: &Server, edges: &[castellan_store::EdgeRow]) -> String {
    let mut nodes: BTreeSet<String> = BTreeSet::new();
    for e in edges {
        nodes.insert(display_name(s, &e.source));
        nodes.insert(e.destination.clone());
    }
    let nodes: Vec<String> = nodes.into_iter().collect();
    let n = nodes.len().max(1) as f64;
    let (cx, cy, r) = (260.0, 200.0, 150.0);
    let pos: HashMap<&str, (f64, f64)> = nodes
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let a = std::f64::consts::TAU * i as f64 / n - std::f64::consts::FRAC_PI_2;
            (name.as_str(), (cx + r * a.cos(), cy + r * a.sin()))
        })
        .collect();
    let mut svg = String::from(
        "<svg class=\"graph\" viewBox=\"0 0 520 400\" role=\"img\" aria-label=\"service graph\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\">\
         <path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"#555\"/></marker></defs>",
    );
    for e in edges {
        let from = display_name(s, &e.source);
        let (Some(&(x1, y1)), Some(&(x2, y2))) =
            (pos.get(from.as_str()), pos.get(e.destination.as_str()))
        else {
            continue;
        };
        let (dx, dy) = (x2 - x1, y2 - y1);
        let len = (dx * dx + dy * dy).sqrt();
        if len < 1.0 {
            continue;
        }
        let k = 26.0 / len;
        let colour = if e.denied > 0 { "#c0392b" } else { "#2e7d32" };
        let _ = write!(
            svg,
            "<a href=\"/dashboard/decisions?exact=1&amp;source={}&amp;destination={}\"><line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-width=\"2\" marker-end=\"url(#arrow)\"><title>{} → {}: {} allowed, {} denied</title></line></a>",
            qv(&e.source),
            qv(&e.destination),
            x1 + dx * k,
            y1 + dy * k,
            x2 - dx * k,
            y2 - dy * k,
            esc(&from),
            esc(&e.destination),
            e.allowed,
            e.denied
        );
    }
    for (name, (x, y)) in &pos {
        let _ = write!(
            svg,
            "<g class=\"node\"><circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"22\"/><text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text></g>",
            y + 38.0,
            esc(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Denials and allows per minute over the last hour, as SVG bars.
fn minutes_svg(rows: &[castellan_store::MinuteRow], since: i64) -> String {
    let max = rows
        .iter()
        .map(|r| r.allowed + r.denied)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let mut svg = String::from(
        "<svg class=\"chart\" viewBox=\"0 0 610 120\" role=\"img\" aria-label=\"decisions per minute, last hour\">",
    );
    for r in rows {
        let i = ((r.minute_ms - since) / 60_000) as f64;
        let x = i * 10.0;
        let ha = 100.0 * r.allowed as f64 / max;
        let hd = 100.0 * r.denied as f64 / max;
        let _ = write!(
            svg,
            "<rect x=\"{x:.0}\" y=\"{:.1}\" width=\"8\" height=\"{ha:.1}\" fill=\"#2e7d32\"><title>{}: {} allowed</title></rect>\
             <rect x=\"{x:.0}\" y=\"{:.1}\" width=\"8\" height=\"{hd:.1}\" fill=\"#c0392b\"><title>{}: {} denied</title></rect>",
            110.0 - ha - hd,
            when(r.minute_ms),
            r.allowed,
            110.0 - hd,
            when(r.minute_ms),
            r.denied
        );
    }
    svg.push_str("<line x1=\"0\" y1=\"110\" x2=\"610\" y2=\"110\" stroke=\"#999\"/></svg>");
    svg
}

async fn overview(State(s): State<Arc<Server>>, v: Viewer) -> Response {
    let t0 = Instant::now();
    let edges = match s.store.audit_edges().await {
        Ok(e) => e,
        Err(e) => return internal(e),
    };
    let hour_ago = now_ms() - 3_600_000;
    let since = hour_ago - hour_ago.rem_euclid(60_000);
    let minutes = match s.store.audit_minutes(since, since + 61 * 60_000).await {
        Ok(m) => m,
        Err(e) => return internal(e),
    };
    let denied: i64 = minutes.iter().map(|m| m.denied).sum();
    let allowed: i64 = minutes.iter().map(|m| m.allowed).sum();
    let mut b = String::new();
    let _ = write!(
        b,
        "<section><h2>Last hour</h2><p><span class=\"stat\">Allowed <b id=\"allowed-hour\">{allowed}</b></span>\
         <span class=\"stat deny\">Denied <b id=\"denied-hour\">{denied}</b></span>\
         <a href=\"/dashboard/decisions?decision=deny\">latest denials</a></p>{}</section>",
        minutes_svg(&minutes, since)
    );
    let _ = write!(
        b,
        "<section><h2>Service graph</h2><p class=\"hint\">From the audit store: every caller→callee edge \
         with its decisions; green only allowed, red had denials. Click an edge for its decisions.</p>{}",
        graph_svg(&s, &edges)
    );
    b.push_str(
        "<table id=\"edges\"><thead><tr><th>Caller</th><th>Callee</th><th>Transport</th><th>Allowed</th><th>Denied</th><th>Last seen (UTC)</th><th></th></tr></thead><tbody>",
    );
    for e in &edges {
        let transport = match e.origin.as_str() {
            "" if e.source.starts_with("spiffe://") => "mTLS".to_owned(),
            "" => "edge".to_owned(),
            o => format!("via {}", esc(o)),
        };
        let _ = write!(
            b,
            "<tr class=\"edge\" data-caller=\"{caller}\" data-callee=\"{callee}\"><td title=\"{src}\">{caller}</td><td>{callee}</td><td>{transport}</td>\
             <td>{}</td><td class=\"{}\">{}</td><td>{}</td><td><a class=\"edge-link\" href=\"/dashboard/decisions?exact=1&amp;source={}&amp;destination={}\">decisions</a></td></tr>",
            e.allowed,
            if e.denied > 0 { "deny" } else { "" },
            e.denied,
            when(e.last_ms),
            qv(&e.source),
            qv(&e.destination),
            caller = esc(&display_name(&s, &e.source)),
            callee = esc(&e.destination),
            src = esc(&e.source),
        );
    }
    if edges.is_empty() {
        b.push_str("<tr><td colspan=\"7\">No traffic recorded yet.</td></tr>");
    }
    b.push_str("</tbody></table></section>");
    // Chain status: each chain's stored head and its latest signed checkpoint.
    b.push_str("<section><h2>Audit chains</h2><table id=\"chains\"><thead><tr><th>Chain</th><th>Head</th><th>Last record (UTC)</th><th>Last signed checkpoint</th></tr></thead><tbody>");
    let writers = match s.store.audit_writers().await {
        Ok(w) => w,
        Err(e) => return internal(e),
    };
    for w in writers.iter().take(200) {
        let head = s
            .store
            .audit_head(w)
            .await
            .ok()
            .flatten()
            .and_then(|j| serde_json::from_str::<castellan_audit::AuditRecord>(&j).ok());
        let cp = s.store.audit_last_checkpoint(w).await.ok().flatten();
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(w),
            head.as_ref().map_or(0, |h| h.seq),
            head.as_ref().map(|h| when(h.time_ms)).unwrap_or_default(),
            cp.map(|(q, t)| format!("#{q} at {}", when(t)))
                .unwrap_or_else(|| "none".to_owned())
        );
    }
    let _ = write!(
        b,
        "</tbody></table><p class=\"hint\">Full verification: <code>castellan audit verify</code>. \
         Built in {} ms.</p></section>",
        t0.elapsed().as_millis()
    );
    page(&v, "Overview", &b)
}

// ---- decisions -----------------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct Search {
    #[serde(default)]
    source: String,
    #[serde(default)]
    destination: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    decision: String,
    #[serde(default)]
    rule: String,
    /// `1`: `source` is the whole SPIFFE ID (empty: no calling workload), as edges link.
    #[serde(default)]
    exact: u8,
}

async fn decisions(State(s): State<Arc<Server>>, v: Viewer, Query(q): Query<Search>) -> Response {
    let t0 = Instant::now();
    let f = AuditFilter {
        service: q.destination.clone(),
        source: q.source.clone(),
        user: q.user.clone(),
        decision: q.decision.clone(),
        rule: q.rule.clone(),
        source_exact: q.exact == 1,
        since_ms: 0,
        until_ms: 0,
        limit: DECISIONS,
    };
    let rows = match s.store.audit_query(&f).await {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let field = |name: &str, label: &str, val: &str| {
        format!(
            "<label>{label} <input name=\"{name}\" value=\"{}\"></label>",
            esc(val)
        )
    };
    let mut b = format!(
        "<form method=\"get\" action=\"/dashboard/decisions\" class=\"search\">{}{}{}{}{}{}<button type=\"submit\">Search</button></form>",
        if q.exact == 1 {
            "<input type=\"hidden\" name=\"exact\" value=\"1\">"
        } else {
            ""
        },
        field("source", "Caller (part of its SPIFFE ID)", &q.source),
        field("destination", "Callee", &q.destination),
        field("user", "User", &q.user),
        field("decision", "Decision (allow/deny)", &q.decision),
        field("rule", "Rule", &q.rule),
    );
    b.push_str("<table id=\"decisions\"><thead><tr><th>Time (UTC)</th><th>Decision id</th><th>Caller</th><th>User</th><th>Callee</th><th>Request</th><th>Decision</th><th>Rule</th><th>Reason</th><th>Status</th></tr></thead><tbody>");
    let mut n = 0;
    for row in &rows {
        let Ok(r) = serde_json::from_str::<castellan_audit::AuditRecord>(&row.record) else {
            continue;
        };
        n += 1;
        let _ = write!(
            b,
            "<tr class=\"{}\"><td>{}</td><td><code>{}</code></td><td title=\"{}\">{}</td><td>{}</td><td>{}</td><td><code>{} {}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.decision),
            when(r.time_ms),
            esc(&r.decision_id),
            esc(&r.source),
            esc(&display_name(&s, &r.source)),
            esc(&r.user),
            esc(&r.destination),
            esc(&r.method),
            esc(&r.path),
            esc(&r.decision),
            esc(&r.rule),
            esc(&r.reason),
            r.status
        );
    }
    if n == 0 {
        b.push_str("<tr><td colspan=\"10\">No matching decisions.</td></tr>");
    }
    let _ = write!(
        b,
        "</tbody></table><p class=\"hint\">Newest {DECISIONS} shown. Built in {} ms.</p>",
        t0.elapsed().as_millis()
    );
    page(&v, "Decisions", &b)
}

// ---- fleet ---------------------------------------------------------------------------------

async fn fleet(State(s): State<Arc<Server>>, v: Viewer) -> Response {
    let proxies = match s.store.proxies().await {
        Ok(p) => p,
        Err(e) => return internal(e),
    };
    let current = match s.store.latest_policy_revision().await {
        Ok(r) => r.map(|r| r.rev),
        Err(e) => return internal(e),
    };
    let now = crate::unix_now();
    let mut b = format!(
        "<p>Current policy revision: <b>{}</b></p><table id=\"fleet\"><thead><tr><th>Proxy</th><th>Service</th><th>Mode</th><th>Address</th><th>Revision</th><th>Up to date</th><th>Certificate expires</th><th>Last contact</th></tr></thead><tbody>",
        current.map_or("none".to_owned(), |r| r.to_string())
    );
    for p in &proxies {
        let ago = now - p.last_contact;
        let left = p.cert_not_after - now;
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td class=\"{}\">{} (in {} min)</td><td class=\"{}\">{ago} s ago</td></tr>",
            esc(&p.proxy_id),
            esc(&p.service),
            esc(&p.mode),
            esc(&p.address),
            p.revision,
            if Some(p.revision) == current {
                ""
            } else {
                "deny"
            },
            if Some(p.revision) == current {
                "yes"
            } else {
                "no"
            },
            if left < 600 { "deny" } else { "" },
            when(p.cert_not_after.saturating_mul(1000)),
            left / 60,
            if ago > 120 { "deny" } else { "" },
        );
    }
    if proxies.is_empty() {
        b.push_str("<tr><td colspan=\"8\">No proxy has reported.</td></tr>");
    }
    b.push_str("</tbody></table>");
    page(&v, "Fleet", &b)
}

// ---- policy revisions ----------------------------------------------------------------------

/// A line diff (longest common subsequence) of two texts: lines prefixed ' ', '-' or '+'.
fn diff_lines(a: &str, b: &str) -> Vec<(char, String)> {
    let a: Vec<&str> = a.lines().collect();
    let b: Vec<&str> = b.lines().collect();
    if a.len().saturating_mul(b.len()) > 4_000_000 {
        return vec![('!', "too large to compare line by line".to_owned())];
    }
    let (n, m) = (a.len(), b.len());
    let mut t = vec![0u32; (n + 1) * (m + 1)];
    let at = |i: usize, j: usize| i * (m + 1) + j;
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            let v = if a.get(i) == b.get(j) {
                t.get(at(i + 1, j + 1)).copied().unwrap_or(0) + 1
            } else {
                let x = t.get(at(i + 1, j)).copied().unwrap_or(0);
                let y = t.get(at(i, j + 1)).copied().unwrap_or(0);
                x.max(y)
            };
            if let Some(c) = t.get_mut(at(i, j)) {
                *c = v;
            }
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < n || j < m {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                out.push((' ', (*x).to_owned()));
                i += 1;
                j += 1;
            }
            (Some(x), Some(_))
                if t.get(at(i + 1, j)).copied().unwrap_or(0)
                    >= t.get(at(i, j + 1)).copied().unwrap_or(0) =>
            {
                out.push(('-', (*x).to_owned()));
                i += 1;
            }
            (_, Some(y)) => {
                out.push(('+', (*y).to_owned()));
                j += 1;
            }
            (Some(x), None) => {
                out.push(('-', (*x).to_owned()));
                i += 1;
            }
            (None, None) => break,
        }
    }
    out
}

#[derive(Deserialize, Default)]
struct RevQuery {
    rev: Option<i64>,
}

fn files_of(r: &castellan_store::PolicyRevision) -> BTreeMap<String, String> {
    serde_json::from_str(&r.files).unwrap_or_default()
}

async fn policy(State(s): State<Arc<Server>>, v: Viewer, Query(q): Query<RevQuery>) -> Response {
    let history = match s.store.policy_history(50).await {
        Ok(h) => h,
        Err(e) => return internal(e),
    };
    let mut b = String::from(
        "<table id=\"revisions\"><thead><tr><th>Revision</th><th>When (UTC)</th><th>By</th><th>Comment</th><th>Content</th></tr></thead><tbody>",
    );
    for r in &history {
        let _ = write!(
            b,
            "<tr><td><a href=\"/dashboard/policy?rev={0}\">{0}</a></td><td>{1}</td><td>{2}</td><td>{3}</td><td><code>{4}</code></td></tr>",
            r.rev,
            when(r.created_at.saturating_mul(1000)),
            esc(&r.author),
            esc(&r.comment),
            esc(r.content_hash.get(..12).unwrap_or_default())
        );
    }
    b.push_str("</tbody></table>");
    let shown = q.rev.or_else(|| history.first().map(|r| r.rev));
    if let Some(rev) = shown {
        let cur = match s.store.policy_revision(rev).await {
            Ok(r) => r,
            Err(castellan_store::StoreError::NotFound(_)) => {
                return error_page(StatusCode::NOT_FOUND, "no such revision");
            }
            Err(e) => return internal(e),
        };
        let prev = if rev > 1 {
            s.store.policy_revision(rev - 1).await.ok()
        } else {
            None
        };
        let (new, old) = (
            files_of(&cur),
            prev.as_ref().map(files_of).unwrap_or_default(),
        );
        let _ = write!(
            b,
            "<h2>Revision {rev} against {}</h2>",
            if rev > 1 {
                format!("revision {}", rev - 1)
            } else {
                "nothing".to_owned()
            }
        );
        let names: BTreeSet<&String> = new.keys().chain(old.keys()).collect();
        for name in names {
            let (o, n) = (
                old.get(name).map_or("", String::as_str),
                new.get(name).map_or("", String::as_str),
            );
            if o == n {
                continue;
            }
            let _ = write!(b, "<h3>{}</h3><pre class=\"diff\">", esc(name));
            for (k, line) in diff_lines(o, n) {
                let class = match k {
                    '+' => "add",
                    '-' => "del",
                    _ => "ctx",
                };
                let _ = writeln!(b, "<span class=\"{class}\">{k} {}</span>", esc(&line));
            }
            b.push_str("</pre>");
        }
    }
    page(&v, "Policy", &b)
}

// ---- impact preview ------------------------------------------------------------------------

async fn impact_form(s: &Server, v: &Viewer, file: &str, text: &str, hours: i64) -> String {
    let files = match s.store.latest_policy_revision().await {
        Ok(Some(r)) => files_of(&r),
        _ => BTreeMap::new(),
    };
    let mut opts = String::new();
    for name in files.keys() {
        let sel = if name == file { " selected" } else { "" };
        let _ = write!(opts, "<option{sel}>{}</option>", esc(name));
    }
    format!(
        "<p>Replace (or add) one file of the policy in force with a candidate, and see what it would \
         change on the stored traffic — before anything is applied.</p>\
         <form method=\"post\" action=\"/dashboard/impact\" class=\"impact\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <label>File <input name=\"file\" list=\"files\" value=\"{}\" required></label><datalist id=\"files\">{opts}</datalist>\
         <label>Window (hours) <input name=\"hours\" type=\"number\" min=\"1\" max=\"2160\" value=\"{hours}\"></label>\
         <label for=\"candidate\">Candidate YAML</label><textarea id=\"candidate\" name=\"candidate\" rows=\"18\" required>{}</textarea>\
         <button type=\"submit\">Preview impact</button></form>",
        esc(v.csrf.as_deref().unwrap_or_default()),
        esc(file),
        esc(text)
    )
}

async fn impact_page(State(s): State<Arc<Server>>, v: Viewer) -> Response {
    let b = impact_form(&s, &v, "", "", 24).await;
    page(&v, "Impact preview", &b)
}

#[derive(Deserialize)]
struct ImpactForm {
    #[serde(default)]
    csrf: String,
    file: String,
    candidate: String,
    #[serde(default)]
    hours: Option<i64>,
}

async fn impact(
    State(s): State<Arc<Server>>,
    v: Viewer,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Form(f): Form<ImpactForm>,
) -> Response {
    if !same_origin(&headers, uri.authority().map(|a| a.as_str())) || !v.check_csrf(&f.csrf) {
        return error_page(StatusCode::FORBIDDEN, "missing or wrong CSRF token");
    }
    let hours = f.hours.unwrap_or(24).clamp(1, 2160);
    let mut b = impact_form(&s, &v, &f.file, &f.candidate, hours).await;
    let mut files = match s.store.latest_policy_revision().await {
        Ok(Some(r)) => files_of(&r),
        Ok(None) => BTreeMap::new(),
        Err(e) => return internal(e),
    };
    files.insert(f.file.clone(), f.candidate.replace("\r\n", "\n"));
    let set = match crate::admin::candidate_set_text(&s, &files) {
        Ok(set) => set,
        Err(m) => {
            let _ = write!(
                b,
                "<h2>The candidate does not load</h2><pre class=\"error\" id=\"impact-error\">{}</pre>",
                esc(&m)
            );
            return page(&v, "Impact preview", &b);
        }
    };
    let Ok(_scan) = s.scans.try_acquire() else {
        b.push_str("<p class=\"error\">Another impact or report scan is running; try again when it is done.</p>");
        return page(&v, "Impact preview", &b);
    };
    let since = now_ms() - hours * 3_600_000;
    let r = match crate::impact::replay(&s, &set, since, "").await {
        Ok(r) => r.to_json(),
        Err(e) => return e.into_response(),
    };
    let n = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
    let _ = write!(
        b,
        "<h2>Impact over the last {hours} h</h2><p id=\"impact-summary\"><span class=\"stat deny\">Newly denied <b>{}</b></span>\
         <span class=\"stat\">Newly allowed <b>{}</b></span><span class=\"stat\">Rule changed <b>{}</b></span>\
         <span class=\"stat\">Replayed {} · indeterminate {} · skipped {}</span></p>",
        n("newly_denied"),
        n("newly_allowed"),
        n("rule_changed"),
        n("replayed"),
        n("indeterminate"),
        n("skipped")
    );
    b.push_str("<table id=\"impact\"><thead><tr><th>Callee</th><th>Change</th><th>Rule then</th><th>Rule now</th><th>Calls</th><th>Callers</th><th>Users</th><th>Example</th></tr></thead><tbody>");
    for c in r
        .get("changes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let st = |k: &str| esc(c.get(k).and_then(Value::as_str).unwrap_or_default());
        let ex = c
            .get("examples")
            .and_then(|e| e.get(0))
            .map(|e| {
                let g = |k: &str| esc(e.get(k).and_then(Value::as_str).unwrap_or_default());
                format!(
                    "{} {} {} <code>{}</code>",
                    g("user"),
                    g("method"),
                    g("path"),
                    g("decision_id")
                )
            })
            .unwrap_or_default();
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{ex}</td></tr>",
            st("service"),
            st("change"),
            st("from_rule"),
            st("to_rule"),
            c.get("count").and_then(Value::as_u64).unwrap_or(0),
            c.get("callers").and_then(Value::as_u64).unwrap_or(0),
            c.get("users").and_then(Value::as_u64).unwrap_or(0),
        );
    }
    b.push_str("</tbody></table>");
    page(&v, "Impact preview", &b)
}

// ---- access report, anomalies --------------------------------------------------------------

#[derive(Deserialize, Default)]
struct HoursQuery {
    hours: Option<i64>,
}

/// Access reports computed for the dashboard, per window, with the revision and time they were
/// computed at: the page renders the last one at once and refreshes it in the background (a
/// report scans the window: seconds per million records).
#[derive(Debug, Default)]
pub(crate) struct Reports(Mutex<Reports0>);

#[derive(Debug, Default)]
struct Reports0 {
    done: HashMap<i64, (i64, i64, Value)>,
    running: BTreeSet<i64>,
}

/// A report older than this is recomputed (shown meanwhile).
const REPORT_FRESH_MS: i64 = 5 * 60_000;

/// Computes the report of `hours` for the revision in force and keeps it.
async fn compute_report(s: Arc<Server>, hours: i64) {
    let result = async {
        let rev = s
            .store
            .latest_policy_revision()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no policy applied yet")?;
        let set = crate::admin::candidate_set_text(&s, &files_of(&rev))?;
        let _scan = s.scans.acquire().await.map_err(|e| e.to_string())?;
        let r = crate::report::report(&s, &set, now_ms() - hours * 3_600_000)
            .await
            .map_err(|e| format!("{e:?}"))?;
        Ok::<_, String>((rev.rev, r))
    }
    .await;
    if let Ok(mut m) = s.reports.0.lock() {
        m.running.remove(&hours);
        match result {
            Ok((rev, r)) => {
                m.done.insert(hours, (now_ms(), rev, r));
            }
            Err(e) => tracing::warn!(error = %e, "dashboard access report failed"),
        }
    }
}

async fn report(State(s): State<Arc<Server>>, v: Viewer, Query(q): Query<HoursQuery>) -> Response {
    let hours = q.hours.unwrap_or(24).clamp(1, 2160);
    let current = match s.store.latest_policy_revision().await {
        Ok(Some(r)) => r.rev,
        Ok(None) => return page(&v, "Access report", "<p>No policy applied yet.</p>"),
        Err(e) => return internal(e),
    };
    let (cached, start) = {
        let Ok(mut m) = s.reports.0.lock() else {
            return internal("report cache poisoned");
        };
        let cached = m.done.get(&hours).cloned();
        let stale = cached
            .as_ref()
            .is_none_or(|(at, rev, _)| *rev != current || now_ms() - at > REPORT_FRESH_MS);
        let start = stale && m.running.insert(hours);
        (cached, start)
    };
    if start {
        tokio::spawn(compute_report(s.clone(), hours));
    }
    let Some((at, rev, r)) = cached else {
        return page(
            &v,
            "Access report",
            "<meta http-equiv=\"refresh\" content=\"2\"><p id=\"report-pending\">Computing the report over the window \
             (it scans the stored records); this page reloads.</p>",
        );
    };
    let note = if rev == current && now_ms() - at <= REPORT_FRESH_MS {
        String::new()
    } else {
        " <em>(refreshing in the background; reload for the new one)</em>".to_owned()
    };
    let mut b = format!(
        "<p>Revision {rev} against the last {hours} h of traffic ({} records), computed {} UTC{note}. \
         <a href=\"/dashboard/report?hours=168\">7 days</a>. \
         <code>castellan policy suggest</code> writes a tightened policy from the same evidence.</p>\
         <table id=\"findings\"><thead><tr><th>Finding</th><th>Rule / service</th><th>Detail</th><th>Used</th></tr></thead><tbody>",
        r.get("scanned").and_then(Value::as_u64).unwrap_or(0),
        when(at)
    );
    for f in r
        .get("findings")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let st = |k: &str| esc(f.get(k).and_then(Value::as_str).unwrap_or_default());
        let used = f
            .get("used")
            .and_then(Value::as_array)
            .map(|u| {
                u.iter()
                    .filter_map(Value::as_str)
                    .map(esc)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}{}</td><td>{}</td><td>{used}</td></tr>",
            st("kind"),
            st("rule"),
            st("service"),
            st("detail")
        );
    }
    b.push_str("</tbody></table>");
    page(&v, "Access report", &b)
}

async fn anomalies(State(s): State<Arc<Server>>, v: Viewer) -> Response {
    let events = match s.store.anomaly_events(200).await {
        Ok(e) => e,
        Err(e) => return internal(e),
    };
    let mut b = String::from(
        "<table id=\"anomalies\"><thead><tr><th>When (UTC)</th><th>Kind</th><th>Key</th><th>Decisions</th></tr></thead><tbody>",
    );
    for (kind, key, at, detail) in &events {
        let ids = serde_json::from_str::<Value>(detail)
            .ok()
            .and_then(|d| d.get("decision_ids").cloned())
            .and_then(|d| {
                d.as_array().map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(esc)
                        .collect::<Vec<_>>()
                        .join(" ")
                })
            })
            .unwrap_or_default();
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{ids}</code></td></tr>",
            when(*at),
            esc(kind),
            esc(key)
        );
    }
    if events.is_empty() {
        b.push_str("<tr><td colspan=\"4\">None recorded (anomaly detection is configured with <code>anomalies:</code>).</td></tr>");
    }
    b.push_str("</tbody></table>");
    page(&v, "Anomalies", &b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn escapes_markup_and_controls() {
        assert_eq!(
            esc("<script>\"x\"&'y'\u{1b}[2J"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;\u{fffd}[2J"
        );
    }

    #[test]
    fn diffs_lines() {
        let d = diff_lines("a\nb\nc\n", "a\nc\nd\n");
        let s: Vec<String> = d.iter().map(|(k, l)| format!("{k}{l}")).collect();
        assert_eq!(s, vec![" a", "-b", " c", "+d"]);
    }

    #[test]
    fn cross_site_posts_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("cp:8443"));
        assert!(same_origin(&h, None));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&h, None));
        h.insert(header::ORIGIN, HeaderValue::from_static("https://cp:8443"));
        assert!(same_origin(&h, None));
        // HTTP/2: no Host header, the request's authority instead.
        h.remove(header::HOST);
        assert!(same_origin(&h, Some("cp:8443")));
        assert!(!same_origin(&h, Some("other:8443")));
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_origin(&h, Some("cp:8443")));
    }

    #[test]
    fn session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; __Host-castellan_session=abc; b=2"),
        );
        assert_eq!(session_id(&h).as_deref(), Some("abc"));
    }
}
