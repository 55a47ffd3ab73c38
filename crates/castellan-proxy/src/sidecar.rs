//! Sidecar mode. Inbound: mTLS with the caller's SVID, a local decision, the app over loopback
//! with `x-castellan-source`, `x-castellan-user`, `x-castellan-decision-id` (and the verified
//! context token, so the app can pass it on). Outbound: a plain listener per upstream on
//! loopback, forwarded over mTLS to that service, whose SVID must be the one expected.

use crate::http::{self as h, Body, CONTEXT_HEADER, problem};
use crate::pipeline::{Caller, Permit, admit};
use crate::{Inner, unix_now};
use castellan_identity::SpiffeId;
use castellan_policy::{
    Decision, Destination, HttpRequest, Request as PolicyRequest, Source, User,
};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Largest request head; bigger gets 431 from hyper.
pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;

/// An HTTP/1.1 connection builder with our limits.
pub(crate) fn http1_builder() -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(100);
    b
}

/// Headers a record never keeps, whatever a policy reads.
const UNRECORDED_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
];

/// What a decision read, as its audit record keeps it for replay.
fn inputs_of(req: &PolicyRequest, reads: &castellan_policy::Reads) -> castellan_audit::Inputs {
    let (roles, claims) = match &req.user {
        Some(u) => (
            u.roles.clone(),
            u.claims
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        None => (Vec::new(), serde_json::Map::new()),
    };
    let mut headers = BTreeMap::new();
    let read_headers = if reads.any_header {
        for (k, v) in &req.request.headers {
            if !UNRECORDED_HEADERS.contains(&k.as_str()) {
                headers.insert(k.clone(), v.clone());
            }
        }
        vec!["*".to_owned()]
    } else {
        for n in &reads.headers {
            if let Some(v) = req.request.headers.get(n)
                && !UNRECORDED_HEADERS.contains(&n.as_str())
            {
                headers.insert(n.clone(), v.clone());
            }
        }
        reads
            .headers
            .iter()
            .filter(|n| !UNRECORDED_HEADERS.contains(&n.as_str()))
            .cloned()
            .collect()
    };
    castellan_audit::Inputs {
        roles,
        claims,
        host: req.request.host.clone(),
        read_headers,
        headers,
    }
}

/// Decides on a request, and notes in `p` what the decision read.
pub(crate) fn decide(
    inner: &Inner,
    source: Option<&SpiffeId>,
    user: Option<User>,
    destination: &str,
    parts: &hyper::http::request::Parts,
    p: &mut Pending,
) -> Decision {
    // INVARIANT: the headers went through `http::normalize_headers`: one field per name, UTF-8,
    // no `x-castellan-*` from the client — exactly what the app will receive.
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in &parts.headers {
        if k.as_str().starts_with(h::CASTELLAN_PREFIX) {
            continue;
        }
        if let Ok(v) = std::str::from_utf8(v.as_bytes()) {
            headers.insert(k.as_str().to_owned(), v.to_owned());
        }
    }
    let host = parts
        .headers
        .get(hyper::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let req = PolicyRequest {
        source: source.map(|s| Source {
            service: None,
            spiffe_id: Some(s.as_str().to_owned()),
        }),
        user,
        destination: Destination {
            service: destination.to_owned(),
        },
        request: HttpRequest {
            method: parts.method.as_str().to_owned(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
            host,
            headers,
        },
        time: None,
    };
    let set = inner.state.engine.current();
    let d = set.decide(&req);
    p.inputs = Some(inputs_of(&req, set.reads()));
    d
}

/// What one request's audit record will say, filled in as the request is handled; every
/// response passes through [`Pending::finish`], so every request yields exactly one record.
pub(crate) struct Pending {
    pub(crate) did: String,
    t0: Instant,
    pub(crate) source: String,
    pub(crate) user: String,
    pub(crate) destination: String,
    method: String,
    pub(crate) path: String,
    trace_id: String,
    pub(crate) decision: Option<Decision>,
    /// Set when a rate limit refused the request (its name).
    pub(crate) rate_limited: Option<String>,
    /// Set when the request did not fit the service's OpenAPI document.
    pub(crate) invalid: bool,
    /// Who acted on the user's behalf (the delegation chain policy saw).
    pub(crate) act: Vec<String>,
    /// Set when the request was refused before a decision for a reason worth naming in the
    /// audit record (e.g. `key-out-of-scope`).
    pub(crate) refusal: Option<&'static str>,
    /// Where the decision was asked (the audit record's `origin`; empty: our own traffic).
    pub(crate) origin: &'static str,
    /// Who asked, for decisions asked through an API (the record's `asked_by`).
    pub(crate) asked_by: String,
    /// What the decision read, for replay (set by [`decide`]).
    pub(crate) inputs: Option<castellan_audit::Inputs>,
}

/// A request hyper refused before it reached us (unparsable framing, head too large): hyper
/// answered 400/431; this gives it its audit record all the same.
pub(crate) fn record_unparsed(inner: &Inner, source: &str, destination: &str, e: &hyper::Error) {
    let too_large = e.is_parse_too_large();
    if !(e.is_parse() || too_large) {
        return;
    }
    metrics::counter!("castellan_proxy_decisions_total", "proxy" => inner.cfg.proxy_id.clone(), "decision" => "deny", "rule" => "-").increment(1);
    crate::audit::write(
        inner,
        castellan_audit::Entry {
            time_ms: crate::unix_now_ms(),
            decision_id: h::decision_id(),
            source: source.to_owned(),
            destination: destination.to_owned(),
            method: "-".to_owned(),
            path: "-".to_owned(),
            decision: "deny".to_owned(),
            reason: "malformed-http".to_owned(),
            status: if too_large { 431 } else { 400 },
            ..castellan_audit::Entry::default()
        },
    );
}

impl Pending {
    pub(crate) fn new(req: &Request<Incoming>, destination: &str) -> Pending {
        Pending::start(req.method(), req.uri(), req.headers(), destination)
    }

    /// A record for a request known by its method, target and headers.
    pub(crate) fn start(
        method: &hyper::Method,
        uri: &hyper::Uri,
        headers: &hyper::HeaderMap,
        destination: &str,
    ) -> Pending {
        let trace_id = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split('-').nth(1))
            .filter(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
            .unwrap_or("")
            .to_owned();
        let raw = uri.path_and_query().map_or("/", |p| p.as_str());
        Pending {
            did: h::decision_id(),
            t0: Instant::now(),
            source: String::new(),
            user: String::new(),
            destination: destination.to_owned(),
            method: method.as_str().chars().take(32).collect(),
            path: raw.chars().take(1024).collect(),
            trace_id,
            decision: None,
            rate_limited: None,
            invalid: false,
            act: Vec::new(),
            refusal: None,
            origin: "",
            asked_by: String::new(),
            inputs: None,
        }
    }

    /// Writes the record (metrics, recent decisions, the audit spool) and returns `resp` once
    /// the record is in the spool file.
    pub(crate) async fn finish(self, inner: &Inner, resp: Response<Body>) -> Response<Body> {
        let seq = self.record(inner, resp.status());
        crate::audit::written(inner, seq).await;
        resp
    }

    /// Writes the record of a request answered with `status`; returns its sequence number in
    /// the spool, for [`crate::audit::written`] before the answer leaves.
    #[must_use = "the answer waits until its record is written"]
    pub(crate) fn record(self, inner: &Inner, status: StatusCode) -> Option<u64> {
        let (decision, rule, reason, mode) = match &self.decision {
            Some(d) => (
                if d.is_allowed() { "allow" } else { "deny" },
                d.rule.as_ref().map(|r| r.to_string()).unwrap_or_default(),
                d.reason.as_str(),
                d.mode.to_string(),
            ),
            // Refused before a decision (framing, credentials, routing).
            None => (
                "deny",
                String::new(),
                self.refusal.unwrap_or("refused-before-decision"),
                String::new(),
            ),
        };
        let (decision, rule, reason) = match &self.rate_limited {
            Some(limit) => ("deny", limit.clone(), "rate-limited"),
            None if self.invalid => ("deny", rule, "invalid-request"),
            None => (decision, rule, reason),
        };
        inner
            .metrics
            .decision(decision == "allow", &rule, self.t0.elapsed().as_secs_f64());
        tracing::debug!(decision_id = %self.did, decision, %rule, reason, status = status.as_u16(), "decision");
        inner.state.remember(crate::state::RecentDecision {
            decision_id: self.did.clone(),
            decision: decision.to_owned(),
            rule: (!rule.is_empty()).then(|| rule.clone()),
            reason: reason.to_owned(),
            status: status.as_u16(),
        });
        let entry = castellan_audit::Entry {
            time_ms: crate::unix_now_ms(),
            decision_id: self.did,
            trace_id: self.trace_id,
            source: self.source,
            user: self.user,
            destination: self.destination,
            method: self.method,
            // Secrets in the query (token=, password=, …) never reach the record.
            path: crate::audit::redact_target(&self.path, &inner.cfg.redact_query),
            decision: decision.to_owned(),
            rule,
            reason: reason.to_owned(),
            mode,
            status: status.as_u16(),
            latency_us: u64::try_from(self.t0.elapsed().as_micros()).unwrap_or(u64::MAX),
            act: self.act,
            origin: self.origin.to_owned(),
            asked_by: self.asked_by,
            inputs: self.inputs,
        };
        crate::audit::write(inner, entry)
    }
}

/// The normalized target the decision was made on (what the app receives).
pub(crate) fn normalized_target(parts: &hyper::http::request::Parts) -> Option<String> {
    let raw = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let t = castellan_policy::normalize_target(raw).ok()?;
    Some(match t.query {
        Some(q) => format!("{}?{q}", t.path),
        None => t.path.into_owned(),
    })
}

async fn inbound(inner: Arc<Inner>, peer: Arc<Peer>, req: Request<Incoming>) -> Response<Body> {
    let mut p = Pending::new(&req, &inner.cfg.proxy_service());
    p.source = peer.id.as_str().to_owned();
    let r = match peer.still_valid(&inner.state) {
        Ok(()) => inbound_inner(&inner, peer.id.clone(), req, &mut p).await,
        Err(why) => {
            tracing::info!(peer = %peer.id, %why, "request from a peer no longer valid");
            let mut r = problem(
                StatusCode::FORBIDDEN,
                "peer certificate revoked, disabled or expired",
                &p.did,
            );
            r.headers_mut()
                .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
    };
    p.finish(&inner, r).await
}

async fn inbound_inner(
    inner: &Arc<Inner>,
    source: SpiffeId,
    req: Request<Incoming>,
    p: &mut Pending,
) -> Response<Body> {
    let did = p.did.clone();
    if let Err(why) = h::check_framing(req.headers()) {
        return problem(StatusCode::BAD_REQUEST, why, &did);
    }
    let (mut parts, body) = req.into_parts();
    let service = inner.cfg.proxy_service();
    let admitted = match admit(
        inner,
        &mut parts,
        Caller::Peer(source),
        crate::pipeline::Destination::Named(&service),
        None,
        p,
    )
    .await
    {
        Ok(a) => a,
        Err(r) => return r.response(&did),
    };
    let body = match h::read_body(body, inner.cfg.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return h::body_error(e, &did),
    };
    let target = &admitted.target;
    if let Err(v) = crate::validate_request(inner, &service, &parts, target, &body) {
        p.invalid = true;
        let status = StatusCode::from_u16(v.status).unwrap_or(StatusCode::BAD_REQUEST);
        return problem(status, &v.detail, &did);
    }
    let Some(app) = inner.cfg.app else {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "no app configured", &did);
    };
    let Ok(uri) = format!("http://{app}{target}").parse::<hyper::Uri>() else {
        return problem(StatusCode::BAD_REQUEST, "malformed request", &did);
    };
    let mut headers = std::mem::take(&mut parts.headers);
    h::strip_headers(&mut headers);
    let set = |headers: &mut hyper::HeaderMap, k: &'static str, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            headers.insert(k, v);
        }
    };
    set(&mut headers, "x-castellan-source", admitted.source.as_str());
    set(&mut headers, "x-castellan-decision-id", &did);
    if let (Some(u), Some(raw)) = (&admitted.user, &admitted.context) {
        set(&mut headers, "x-castellan-user", &u.sub);
        headers.insert(CONTEXT_HEADER, raw.clone());
    }
    let idempotent = crate::is_idempotent(&parts.method);
    crate::forward(
        inner,
        admitted.permit,
        "app",
        &inner.app,
        idempotent,
        &did,
        |_| h::upstream_request(&parts, uri.clone(), headers.clone(), body.clone()).ok(),
    )
    .await
}

impl crate::ProxyConfig {
    /// The service this sidecar fronts (from its SVID's name in the proxy id's stead).
    pub(crate) fn proxy_service(&self) -> String {
        self.service_name.clone().unwrap_or_default()
    }
}

/// Serves the inbound mTLS listener.
pub(crate) async fn serve_inbound(
    inner: Arc<Inner>,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
) {
    let verifier = Arc::new(crate::tls::SvidClientVerifier {
        state: inner.state.clone(),
    });
    let cfg = match rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
    {
        Ok(b) => {
            let mut c = b
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(inner.identity.clone());
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            // No resumption: rustls does not run the client verifier on a resumed session, so a
            // peer revoked or disabled since would get back in with its ticket.
            c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            c.send_tls13_tickets = 0;
            Arc::new(c)
        }
        Err(e) => {
            tracing::error!(error = %e, "TLS configuration failed");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let proxy = inner.cfg.proxy_id.clone();
    crate::listener::accept_loop("inbound", proxy, listener, stop, move |tcp, peer| {
        let (inner, acceptor) = (inner.clone(), acceptor.clone());
        async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "inbound TLS refused");
                    metrics::counter!("castellan_proxy_tls_refused_total", "proxy" => inner.cfg.proxy_id.clone()).increment(1);
                    return;
                }
                Err(_) => return,
            };
            let certs: Vec<rustls_pki_types::CertificateDer<'static>> = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            let Some(peer) = Peer::new(&inner.state, certs) else {
                return;
            };
            let peer = Arc::new(peer);
            let (audit_inner, audit_source) = (inner.clone(), peer.id.as_str().to_owned());
            let svc_inner = inner.clone();
            let svc_peer = peer.clone();
            let svc = service_fn(move |req| {
                let (inner, peer) = (svc_inner.clone(), svc_peer.clone());
                async move { Ok::<_, Infallible>(inbound(inner, peer, req).await) }
            });
            let conn = http1_builder()
                .serve_connection(TokioIo::new(crate::framing::FramingGuard::new(tls)), svc);
            tokio::pin!(conn);
            // The connection lives only as long as its peer's credentials: a revocation, a
            // disabled service or the SVID's expiry closes it (after the request in flight).
            let mut changes = inner.state.subscribe();
            let (mut watching, mut expired) = (true, false);
            let expiry = tokio::time::sleep(Duration::from_secs(
                u64::try_from(peer.not_after - unix_now()).unwrap_or(0),
            ));
            tokio::pin!(expiry);
            let result = loop {
                tokio::select! {
                    r = conn.as_mut() => break r,
                    c = changes.changed(), if watching => match c {
                        Err(_) => watching = false,
                        Ok(()) => if let Err(why) = peer.still_valid(&inner.state) {
                            tracing::info!(peer = %peer.id, %why, "closing the connection of a peer no longer valid");
                            metrics::counter!("castellan_proxy_connections_closed_total", "proxy" => inner.cfg.proxy_id.clone(), "reason" => "peer-invalid").increment(1);
                            conn.as_mut().graceful_shutdown();
                            watching = false;
                        },
                    },
                    () = &mut expiry, if !expired => {
                        expired = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            };
            if let Err(e) = result {
                record_unparsed(
                    &audit_inner,
                    &audit_source,
                    &audit_inner.cfg.proxy_service(),
                    &e,
                );
            }
        }
    })
    .await;
}

/// The authenticated peer of one inbound connection, re-checked whenever the bundle or the
/// revocations change and refused once its SVID expires.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) id: SpiffeId,
    certs: Vec<rustls_pki_types::CertificateDer<'static>>,
    not_after: i64,
    /// The state generation it was last found valid at.
    checked: std::sync::atomic::AtomicU64,
}

impl Peer {
    pub(crate) fn new(
        state: &crate::state::State,
        certs: Vec<rustls_pki_types::CertificateDer<'static>>,
    ) -> Option<Peer> {
        let generation = state.generation();
        let id = crate::tls::check_client(state, &certs, rustls_pki_types::UnixTime::now()).ok()?;
        let (_, leaf) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
        Some(Peer {
            id,
            not_after: leaf.validity().not_after.timestamp(),
            certs,
            checked: std::sync::atomic::AtomicU64::new(generation),
        })
    }

    /// Whether the peer's SVID is still acceptable. One atomic load and a clock read per
    /// request while nothing changed; a full re-check after a change.
    pub(crate) fn still_valid(&self, state: &crate::state::State) -> Result<(), String> {
        if unix_now() >= self.not_after {
            return Err(format!("{}'s SVID expired", self.id));
        }
        let generation = state.generation();
        if self.checked.load(Ordering::Acquire) == generation {
            return Ok(());
        }
        crate::tls::check_client(state, &self.certs, rustls_pki_types::UnixTime::now())?;
        self.checked.store(generation, Ordering::Release);
        Ok(())
    }
}

async fn outbound(
    inner: Arc<Inner>,
    service: Arc<str>,
    next: Arc<AtomicUsize>,
    req: Request<Incoming>,
) -> Response<Body> {
    let did = h::decision_id();
    if let Err(why) = h::check_framing(req.headers()) {
        return problem(StatusCode::BAD_REQUEST, why, &did);
    }
    let (parts, body) = req.into_parts();
    let body = match h::read_body(body, inner.cfg.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return h::body_error(e, &did),
    };
    let context = parts.headers.get(CONTEXT_HEADER).cloned();
    let mut headers = parts.headers.clone();
    h::strip_headers(&mut headers);
    if let Some(c) = context {
        headers.insert(CONTEXT_HEADER, c);
    }
    let eps = inner.state.endpoints(&service);
    if eps.is_empty() {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "no endpoint for the upstream service",
            &did,
        );
    }
    let start = next.fetch_add(1, Ordering::Relaxed);
    let client = match inner.upstream(&service) {
        Ok(c) => c,
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), &did),
    };
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let idempotent = crate::is_idempotent(&parts.method);
    crate::forward(
        &inner,
        Permit::outbound(),
        &service,
        &client,
        idempotent,
        &did,
        |attempt| {
            // A retry goes to the next endpoint.
            let ep = eps.get((start + attempt) % eps.len())?;
            let uri = format!("https://{ep}{target}").parse::<hyper::Uri>().ok()?;
            h::upstream_request(&parts, uri, headers.clone(), body.clone()).ok()
        },
    )
    .await
}

/// Serves one outbound listener (loopback, plain HTTP from the app).
pub(crate) async fn serve_outbound(
    inner: Arc<Inner>,
    service: String,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
) {
    let service: Arc<str> = Arc::from(service);
    let next = Arc::new(AtomicUsize::new(0));
    let proxy = inner.cfg.proxy_id.clone();
    crate::listener::accept_loop("outbound", proxy, listener, stop, move |tcp, _| {
        let (inner, service, next) = (inner.clone(), service.clone(), next.clone());
        async move {
            let svc = service_fn(move |req| {
                let (inner, service, next) = (inner.clone(), service.clone(), next.clone());
                async move { Ok::<_, Infallible>(outbound(inner, service, next, req).await) }
            });
            let _ = http1_builder()
                .serve_connection(TokioIo::new(crate::framing::FramingGuard::new(tcp)), svc)
                .await;
        }
    })
    .await;
}
