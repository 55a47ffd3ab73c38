//! Decision-point mode: the gateway's pipeline ([`crate::pipeline`]) answering the proxies
//! teams already run, instead of forwarding. Each question yields one chained audit record.
//!
//! - Envoy ext_authz v3 over gRPC (`envoy.service.auth.v3.Authorization/Check`), plain HTTP/2
//!   on a loopback listener (Envoy, Istio `CUSTOM`, Envoy Gateway, gRPC's filter).
//! - ext_authz HTTP mode (`/ext-authz` + the request's path) and forward-auth (`/forward-auth`:
//!   nginx `auth_request`, Caddy `forward_auth`, Traefik ForwardAuth), plain HTTP/1.1 on a
//!   loopback listener — and both on the TLS listener for proxies whose SVID is trusted.
//! - OpenID AuthZEN 1.0 on the TLS listener, for callers with a trusted SVID or a Castellan
//!   token with scope `authzen:evaluate`; its records say `origin: authzen` (not traffic).
//!
//! Who may ask is fixed by the transport: loopback on the plain listeners (other peers are
//! dropped at accept), a trusted SVID or a scoped token on the TLS listener.

use crate::http::{self as h, Body, problem};
use crate::pipeline::{Caller, Destination, Refusal, admit, onward_headers};
use crate::sidecar::{Pending, decide, http1_builder, normalized_target};
use crate::{Inner, ProxyError, unix_now};
use castellan_identity::SpiffeId;
use castellan_policy::User;
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse,
    HeaderAppendAction, HeaderValue as EnvoyHeader, HeaderValueOption, HttpResponse, HttpStatus,
    OkHttpResponse,
};
use hyper::body::Incoming;
use hyper::header::{HOST, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Map, Value, json};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Audit `origin` of questions asked through ext_authz.
const ORIGIN_EXT_AUTHZ: &str = "ext_authz";
/// Audit `origin` of questions asked through forward-auth.
const ORIGIN_FORWARD_AUTH: &str = "forward_auth";
/// The scope a Castellan OAuth2 token needs to ask AuthZEN questions.
pub const AUTHZEN_SCOPE: &str = "authzen:evaluate";
/// Path of the forward-auth endpoint.
pub const FORWARD_AUTH_PATH: &str = "/forward-auth";
/// Path prefix of ext_authz HTTP mode (Envoy's `path_prefix`).
pub const EXT_AUTHZ_HTTP_PREFIX: &str = "/ext-authz";
/// Most evaluations in one AuthZEN boxcar.
const MAX_EVALUATIONS: usize = 1000;

/// Where a decision point answers, and whom it trusts.
#[derive(Debug, Clone)]
pub struct DecisionConfig {
    /// ext_authz gRPC, plain HTTP/2 (loopback addresses only).
    pub grpc_listen: SocketAddr,
    /// forward-auth and ext_authz HTTP, plain HTTP/1.1 (loopback addresses only).
    pub http_listen: SocketAddr,
    /// SPIFFE IDs trusted on the TLS listener: as proxies asking forward-auth and ext_authz
    /// HTTP questions, and as AuthZEN callers.
    pub trusted: Vec<String>,
    /// Whether the trusted proxies pass the client's certificate in `Client-Cert` (RFC 9440),
    /// so that certificate-bound tokens can be accepted; off, such tokens are refused.
    pub client_cert_header: bool,
    /// An HTTP/2 connection on the TLS listener with no request for this long is closed.
    pub h2_idle: Duration,
}

impl Default for DecisionConfig {
    fn default() -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        DecisionConfig {
            grpc_listen: any,
            http_listen: any,
            trusted: Vec::new(),
            client_cert_header: false,
            h2_idle: Duration::from_secs(30),
        }
    }
}

/// Where a running decision point answers.
#[derive(Debug, Clone, Copy)]
pub struct DecisionAddrs {
    /// ext_authz gRPC (plain HTTP/2).
    pub grpc: SocketAddr,
    /// forward-auth (`/forward-auth`) and ext_authz HTTP (`/ext-authz/…`), plain HTTP/1.1.
    pub http: SocketAddr,
    /// TLS: AuthZEN, and forward-auth / ext_authz HTTP for trusted SVIDs.
    pub tls: SocketAddr,
}

/// The decision point's plain listeners, bound before start returns.
#[derive(Debug)]
pub(crate) struct Listeners {
    grpc: TcpListener,
    http: TcpListener,
}

impl Listeners {
    pub(crate) fn addrs(&self, tls: SocketAddr) -> DecisionAddrs {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        DecisionAddrs {
            grpc: self.grpc.local_addr().unwrap_or(any),
            http: self.http.local_addr().unwrap_or(any),
            tls,
        }
    }
}

/// Binds the plain listeners; refuses non-loopback addresses (whoever reaches them could ask
/// about any request and be told the answer, and would be trusted to describe it).
pub(crate) async fn bind(cfg: &DecisionConfig) -> Result<Listeners, ProxyError> {
    for (what, a) in [
        ("ext_authz gRPC", cfg.grpc_listen),
        ("HTTP", cfg.http_listen),
    ] {
        if !a.ip().is_loopback() {
            return Err(ProxyError::Config(format!(
                "decision {what} listener {a}: plain listeners must be on loopback (remote proxies ask over the TLS listener with a trusted SVID)"
            )));
        }
    }
    Ok(Listeners {
        grpc: TcpListener::bind(cfg.grpc_listen).await?,
        http: TcpListener::bind(cfg.http_listen).await?,
    })
}

/// Starts every listener of the decision point.
pub(crate) fn serve(
    inner: &Arc<Inner>,
    tls: TcpListener,
    l: Listeners,
    stop: &watch::Receiver<bool>,
) {
    tokio::spawn(serve_grpc(inner.clone(), l.grpc, stop.clone()));
    tokio::spawn(serve_http(inner.clone(), l.http, stop.clone()));
    tokio::spawn(serve_tls(inner.clone(), tls, stop.clone()));
}

// ---------------------------------------------------------------------------------------------
// One question, whatever the protocol.

/// A request another proxy asks about.
struct Asked {
    parts: hyper::http::request::Parts,
    caller: Caller,
    destination: Option<String>,
    client_cert: Option<String>,
}

/// The headers to add to an admitted request, or the refusal.
async fn answer(
    inner: &Inner,
    asked: Asked,
    p: &mut Pending,
) -> Result<Vec<(&'static str, String)>, Refusal> {
    let Asked {
        mut parts,
        caller,
        destination,
        client_cert,
    } = asked;
    let dest = match &destination {
        Some(d) => Destination::Named(d),
        None => Destination::Routed,
    };
    let a = admit(inner, &mut parts, caller, dest, client_cert.as_deref(), p).await?;
    onward_headers(inner, &a, &p.did)
}

/// base64url SHA-256 of the first certificate of a PEM text: its `x5t#S256`.
fn thumbprint_of_pem(pem: &str) -> Option<String> {
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    Some(crate::tls::x5t_s256(&der))
}

/// The `x5t#S256` of an RFC 9440 `Client-Cert` value (`:base64 DER:`).
fn thumbprint_of_client_cert(v: &str) -> Option<String> {
    use base64::Engine as _;
    let b64 = v.trim().strip_prefix(':')?.strip_suffix(':')?;
    let der = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Some(crate::tls::x5t_s256(
        &rustls_pki_types::CertificateDer::from(der),
    ))
}

// ---------------------------------------------------------------------------------------------
// Forward-auth and ext_authz HTTP.

/// Headers a forward-auth request uses to describe the original request; they are not the
/// original request's own.
const FORWARD_META: &[&str] = &[
    "x-original-uri",
    "x-original-method",
    "x-original-url",
    "x-forwarded-method",
    "x-forwarded-uri",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-for",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-real-ip",
    "forwarded",
    "client-cert",
    "client-cert-chain",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "host",
];

/// Which HTTP question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HttpKind {
    /// `/forward-auth`: the original request in `X-Original-*` / `X-Forwarded-*`.
    ForwardAuth,
    /// `/ext-authz/…`: the original request's method, path and headers, as Envoy sends them.
    ExtAuthz,
}

/// The original request a forward-auth or ext_authz HTTP request describes.
fn described(
    req: &Request<Incoming>,
    kind: HttpKind,
) -> Result<hyper::http::request::Parts, Refusal> {
    let bad = |d: &str| Refusal::new(StatusCode::BAD_REQUEST, d);
    let hdr = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    // We cannot strip headers from the request we are asked about: one that carries our
    // headers (any spelling) would reach the app with the client's values; one that carries a
    // rewrite or method override would be decided as one request and run as another.
    // Forward-auth's own description of the request comes in one family (nginx: X-Original-*;
    // Caddy, Traefik: X-Forwarded-Method/-Uri), set by the proxy: a second family, or any
    // other spelling of these names, can only come from the client.
    const NGINX_META: &[&str] = &["x-original-uri", "x-original-method"];
    const FORWARDED_META: &[&str] = &["x-forwarded-uri", "x-forwarded-method"];
    let (mut nginx_meta, mut forwarded_meta) = (false, false);
    for name in req.headers().keys() {
        let raw = name.as_str();
        let f = h::folded(raw);
        if f.starts_with(h::CASTELLAN_PREFIX) {
            return Err(bad(
                "the request carries x-castellan-* headers, which a decision point cannot strip: refused",
            ));
        }
        let meta = kind == HttpKind::ForwardAuth
            && (NGINX_META.contains(&f.as_ref()) || FORWARDED_META.contains(&f.as_ref()));
        if meta && raw == f.as_ref() {
            nginx_meta |= NGINX_META.contains(&raw);
            forwarded_meta |= FORWARDED_META.contains(&raw);
        } else if h::REWRITE_HEADERS.contains(&f.as_ref()) {
            return Err(bad(&format!(
                "the request carries {raw}, which rewrites the request after the decision: refused"
            )));
        }
    }
    if nginx_meta && forwarded_meta {
        return Err(bad(
            "both X-Original-* and X-Forwarded-Method/-Uri describe the request: refused",
        ));
    }
    let (method, target) = match kind {
        HttpKind::ForwardAuth => {
            let method = hdr("x-original-method")
                .or_else(|| hdr("x-forwarded-method"))
                .unwrap_or_else(|| req.method().as_str().to_owned());
            let target = hdr("x-original-uri")
                .or_else(|| hdr("x-forwarded-uri"))
                .ok_or_else(|| {
                    bad("forward-auth request without X-Original-URI or X-Forwarded-Uri")
                })?;
            (method, target)
        }
        HttpKind::ExtAuthz => {
            let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let rest = pq.strip_prefix(EXT_AUTHZ_HTTP_PREFIX).unwrap_or("/");
            let rest = if rest.starts_with('/') {
                rest.to_owned()
            } else {
                format!("/{rest}")
            };
            (req.method().as_str().to_owned(), rest)
        }
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| bad("malformed method"))?;
    let uri: hyper::Uri = target
        .parse()
        .map_err(|_| bad("malformed request target"))?;
    if uri.scheme().is_some() || uri.authority().is_some() {
        return Err(bad("the described target must be a path"));
    }
    // Envoy's HTTP mode passes the client's own X-Forwarded-Host: only Host there.
    let host = match kind {
        HttpKind::ForwardAuth => hdr("x-forwarded-host").or_else(|| hdr("host")),
        HttpKind::ExtAuthz => hdr("host"),
    };
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(host) = host {
        b = b.header(HOST, host);
    }
    for (k, v) in req.headers() {
        if FORWARD_META.contains(&k.as_str()) {
            continue;
        }
        b = b.header(k, v);
    }
    b.body(())
        .map(|r| r.into_parts().0)
        .map_err(|_| bad("malformed request"))
}

/// Answers one forward-auth or ext_authz HTTP question.
async fn http_question(
    inner: Arc<Inner>,
    req: Request<Incoming>,
    kind: HttpKind,
    caller: Caller,
    trusted_proxy: bool,
) -> Response<Body> {
    let parts = match described(&req, kind) {
        Ok(p) => p,
        Err(r) => {
            let mut p = Pending::new(&req, "");
            p.origin = origin_of(kind);
            p.source = inner.identity.current().id.as_str().to_owned();
            let resp = r.response(&p.did);
            return p.finish(&inner, resp).await;
        }
    };
    let mut p = Pending::start(&parts.method, &parts.uri, &parts.headers, "");
    p.origin = origin_of(kind);
    // `Client-Cert` only from a proxy we authenticated (a client could send its own, and
    // certificates are public).
    let client_cert = if inner.cfg.decision.client_cert_header && trusted_proxy {
        req.headers()
            .get("client-cert")
            .and_then(|v| v.to_str().ok())
            .and_then(thumbprint_of_client_cert)
    } else {
        None
    };
    let asked = Asked {
        parts,
        caller,
        destination: None,
        client_cert,
    };
    let resp = match answer(&inner, asked, &mut p).await {
        Ok(headers) => {
            let mut r = Response::new(Body::default());
            for (k, v) in headers {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    r.headers_mut().insert(k, v);
                }
            }
            r
        }
        Err(refusal) => refusal.response(&p.did),
    };
    p.finish(&inner, resp).await
}

fn origin_of(kind: HttpKind) -> &'static str {
    match kind {
        HttpKind::ForwardAuth => ORIGIN_FORWARD_AUTH,
        HttpKind::ExtAuthz => ORIGIN_EXT_AUTHZ,
    }
}

/// Which HTTP question a path asks, if any.
fn http_kind(path: &str) -> Option<HttpKind> {
    if path == FORWARD_AUTH_PATH {
        Some(HttpKind::ForwardAuth)
    } else if path == EXT_AUTHZ_HTTP_PREFIX
        || path
            .strip_prefix(EXT_AUTHZ_HTTP_PREFIX)
            .is_some_and(|r| r.starts_with('/'))
    {
        Some(HttpKind::ExtAuthz)
    } else {
        None
    }
}

async fn serve_http(inner: Arc<Inner>, listener: TcpListener, stop: watch::Receiver<bool>) {
    let proxy = inner.cfg.proxy_id.clone();
    crate::listener::accept_loop("decision-http", proxy, listener, stop, move |tcp, peer| {
        let inner = inner.clone();
        async move {
            if !peer.ip().is_loopback() {
                return;
            }
            let svc = service_fn(move |req: Request<Incoming>| {
                let inner = inner.clone();
                async move {
                    let resp = match http_kind(req.uri().path()) {
                        Some(kind) => http_question(inner, req, kind, Caller::Edge, false).await,
                        None => {
                            problem(StatusCode::NOT_FOUND, "no such endpoint", &h::decision_id())
                        }
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = http1_builder()
                .serve_connection(TokioIo::new(crate::framing::FramingGuard::new(tcp)), svc)
                .await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Envoy ext_authz v3, gRPC.

/// The ext_authz service of one listener: `pep` is the trusted SVID asking over mTLS (named in
/// each record's `asked_by`), empty on the loopback listener.
#[derive(Debug, Clone)]
struct ExtAuthz {
    inner: Arc<Inner>,
    pep: Arc<str>,
}

fn envoy_header(k: &str, v: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(EnvoyHeader {
            key: k.to_owned(),
            value: v.to_owned(),
            ..EnvoyHeader::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..HeaderValueOption::default()
    }
}

/// gRPC status codes (google.rpc.Code).
const GRPC_OK: i32 = 0;
const GRPC_INVALID_ARGUMENT: i32 = 3;
const GRPC_PERMISSION_DENIED: i32 = 7;
const GRPC_RESOURCE_EXHAUSTED: i32 = 8;
const GRPC_UNAVAILABLE: i32 = 14;
const GRPC_UNAUTHENTICATED: i32 = 16;

fn denied(refusal: &Refusal, did: &str) -> CheckResponse {
    let code = match refusal.status {
        StatusCode::UNAUTHORIZED => GRPC_UNAUTHENTICATED,
        StatusCode::TOO_MANY_REQUESTS => GRPC_RESOURCE_EXHAUSTED,
        StatusCode::BAD_REQUEST => GRPC_INVALID_ARGUMENT,
        StatusCode::SERVICE_UNAVAILABLE => GRPC_UNAVAILABLE,
        _ => GRPC_PERMISSION_DENIED,
    };
    let mut headers = vec![envoy_header("content-type", "application/problem+json")];
    for (k, v) in refusal.headers() {
        if let Ok(v) = v.to_str() {
            headers.push(envoy_header(k.as_str(), v));
        }
    }
    headers.push(envoy_header("x-castellan-decision-id", did));
    CheckResponse {
        status: Some(envoy_types::pb::google::rpc::Status {
            code,
            message: refusal.detail.clone(),
            ..Default::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(refusal.status.as_u16()),
            }),
            headers,
            body: h::problem_json(refusal.status, &refusal.detail, did),
        })),
        ..CheckResponse::default()
    }
}

impl ExtAuthz {
    /// The request a CheckRequest describes, who asks, and the client headers Envoy must
    /// remove before forwarding (ours in any spelling, and URL-rewrite headers).
    fn asked(&self, req: &CheckRequest) -> Result<(Asked, Vec<String>), Refusal> {
        let bad = |d: &str| Refusal::new(StatusCode::BAD_REQUEST, d);
        let attrs = req
            .attributes
            .as_ref()
            .ok_or_else(|| bad("CheckRequest without attributes"))?;
        let http = attrs
            .request
            .as_ref()
            .and_then(|r| r.http.as_ref())
            .ok_or_else(|| bad("CheckRequest without an HTTP request"))?;
        let me = self.inner.identity.current().id.clone();
        let source = attrs.source.as_ref();
        let principal = source.map_or("", |s| s.principal.as_str());
        let caller = if principal.is_empty() {
            Caller::Edge
        } else {
            match SpiffeId::parse(principal) {
                Ok(id) if id == me => Caller::Edge,
                Ok(id)
                    if id
                        .service_name()
                        .is_some_and(|s| self.inner.state.is_disabled(s)) =>
                {
                    return Err(Refusal::new(
                        StatusCode::FORBIDDEN,
                        "source principal is a disabled service",
                    ));
                }
                Ok(id) if id.trust_domain() == me.trust_domain() => Caller::Workload(id),
                _ => {
                    return Err(Refusal::new(
                        StatusCode::FORBIDDEN,
                        "source principal is not a SPIFFE ID of this trust domain",
                    ));
                }
            }
        };
        let client_cert = source
            .map(|s| s.certificate.as_str())
            .filter(|c| !c.is_empty())
            .and_then(|c| {
                let pem = percent_decode(c)?;
                thumbprint_of_pem(&pem)
            });
        let method =
            Method::from_bytes(http.method.as_bytes()).map_err(|_| bad("malformed method"))?;
        let path = if http.path.is_empty() {
            "/"
        } else {
            http.path.as_str()
        };
        let uri: hyper::Uri = path.parse().map_err(|_| bad("malformed request target"))?;
        let mut b = Request::builder().method(method).uri(uri);
        if !http.host.is_empty() {
            b = b.header(HOST, http.host.as_str());
        }
        let mut remove = Vec::new();
        let mut add = |k: &str, v: &[u8], b: hyper::http::request::Builder| {
            if k.starts_with(':') || k.eq_ignore_ascii_case("host") {
                return b;
            }
            let f = h::folded(k);
            // Ours, rewrites, and what only an edge may say about the client (Envoy sets
            // X-Forwarded-For/-Proto itself).
            if f.starts_with(h::CASTELLAN_PREFIX)
                || h::REWRITE_HEADERS.contains(&f.as_ref())
                || matches!(
                    f.as_ref(),
                    "x-forwarded-host" | "forwarded" | "x-real-ip" | "x-forwarded-port"
                )
            {
                remove.push(k.to_ascii_lowercase());
            }
            b.header(k, v)
        };
        match http.header_map.as_ref().filter(|m| !m.headers.is_empty()) {
            Some(m) => {
                for hv in &m.headers {
                    let v = if hv.raw_value.is_empty() {
                        hv.value.as_bytes()
                    } else {
                        hv.raw_value.as_slice()
                    };
                    b = add(&hv.key, v, b);
                }
            }
            None => {
                for (k, v) in &http.headers {
                    b = add(k, v.as_bytes(), b);
                }
            }
        }
        let parts = b
            .body(())
            .map_err(|_| bad("malformed request headers"))?
            .into_parts()
            .0;
        let destination = attrs
            .context_extensions
            .get("service")
            .filter(|s| !s.is_empty())
            .cloned();
        Ok((
            Asked {
                parts,
                caller,
                destination,
                client_cert,
            },
            remove,
        ))
    }
}

/// Decodes Envoy's URL-encoded PEM (`source.certificate`).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let inner = &self.inner;
        let req = request.into_inner();
        let (asked, remove) = match self.asked(&req) {
            Ok(a) => a,
            Err(r) => {
                let mut p = Pending::start(
                    &Method::GET,
                    &hyper::Uri::from_static("/"),
                    &hyper::HeaderMap::new(),
                    "",
                );
                p.origin = ORIGIN_EXT_AUTHZ;
                p.asked_by = self.pep.to_string();
                p.source = inner.identity.current().id.as_str().to_owned();
                let out = denied(&r, &p.did);
                crate::audit::written(inner, p.record(inner, r.status)).await;
                return Ok(tonic::Response::new(out));
            }
        };
        let mut p = Pending::start(
            &asked.parts.method,
            &asked.parts.uri,
            &asked.parts.headers,
            "",
        );
        p.origin = ORIGIN_EXT_AUTHZ;
        p.asked_by = self.pep.to_string();
        let (out, seq) = match answer(inner, asked, &mut p).await {
            Ok(headers) => {
                let seq = p.record(inner, StatusCode::OK);
                let out = CheckResponse {
                    status: Some(envoy_types::pb::google::rpc::Status {
                        code: GRPC_OK,
                        ..Default::default()
                    }),
                    http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                        headers: headers.iter().map(|(k, v)| envoy_header(k, v)).collect(),
                        headers_to_remove: remove,
                        ..OkHttpResponse::default()
                    })),
                    ..CheckResponse::default()
                };
                (out, seq)
            }
            Err(r) => {
                let out = denied(&r, &p.did);
                (out, p.record(inner, r.status))
            }
        };
        crate::audit::written(inner, seq).await;
        Ok(tonic::Response::new(out))
    }
}

async fn serve_grpc(inner: Arc<Inner>, listener: TcpListener, stop: watch::Receiver<bool>) {
    let svc = AuthorizationServer::new(ExtAuthz {
        inner: inner.clone(),
        pep: Arc::from(""),
    });
    let proxy = inner.cfg.proxy_id.clone();
    crate::listener::accept_loop("decision-grpc", proxy, listener, stop, move |tcp, peer| {
        let svc = svc.clone();
        async move {
            if !peer.ip().is_loopback() {
                return;
            }
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(hyper_util::rt::TokioTimer::new())
                .max_concurrent_streams(1024)
                .keep_alive_interval(Duration::from_secs(30));
            let _ = b
                .serve_connection(
                    TokioIo::new(tcp),
                    hyper_util::service::TowerToHyperService::new(svc),
                )
                .await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The TLS listener: AuthZEN, and HTTP questions from trusted proxies.

/// Who is on the other end of a TLS connection.
#[derive(Debug)]
struct TlsPeer {
    /// The client's SVID, when it sent a valid one (re-checked per request: a revoked or
    /// disabled caller loses its trust on an open connection too).
    svid: Option<crate::sidecar::Peer>,
    /// The listener's own address (the AuthZEN PDP identifier).
    local: SocketAddr,
}

fn trusted(inner: &Inner, peer: &TlsPeer) -> bool {
    peer.svid.as_ref().is_some_and(|p| {
        p.still_valid(&inner.state).is_ok()
            && inner
                .cfg
                .decision
                .trusted
                .iter()
                .any(|t| t == p.id.as_str())
    })
}

/// Whether the caller may ask AuthZEN questions: a trusted SVID, or a Castellan token (not
/// revoked) with scope `authzen:evaluate`.
fn authzen_caller(
    inner: &Inner,
    peer: &TlsPeer,
    headers: &hyper::HeaderMap,
) -> Result<String, Refusal> {
    if trusted(inner, peer)
        && let Some(p) = &peer.svid
    {
        return Ok(p.id.as_str().to_owned());
    }
    let unauth = |d: &str| Refusal::new(StatusCode::UNAUTHORIZED, d);
    let token = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            unauth("AuthZEN callers present a trusted SVID or a token with scope authzen:evaluate")
        })?;
    let t = crate::pipeline::castellan_token(inner, token, None, unix_now())
        .ok_or_else(|| unauth("invalid token"))??;
    let claim = |k: &str| t.claims.get(k).and_then(Value::as_str);
    if !claim("scope").is_some_and(|s| s.split(' ').any(|x| x == AUTHZEN_SCOPE)) {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "the token lacks scope authzen:evaluate",
        ));
    }
    Ok(claim("client_id")
        .or(claim("sub"))
        .unwrap_or_default()
        .to_owned())
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Body::from(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

async fn tls_request(
    inner: Arc<Inner>,
    peer: Arc<TlsPeer>,
    req: Request<Incoming>,
) -> Response<Body> {
    let request_id = req.headers().get("x-request-id").cloned();
    let path = req.uri().path().to_owned();
    let mut resp = if let Some(kind) = http_kind(&path) {
        match (&peer.svid, trusted(&inner, &peer)) {
            // A trusted proxy asks on behalf of its clients: decided as for the decision
            // point's own identity, like on the plain listener.
            (Some(_), true) => http_question(inner.clone(), req, kind, Caller::Edge, true).await,
            _ => problem(
                StatusCode::FORBIDDEN,
                "only proxies with a trusted SVID may ask here",
                &h::decision_id(),
            ),
        }
    } else {
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/.well-known/authzen-configuration") => {
                let base = format!("https://{}", peer.local);
                json_response(
                    StatusCode::OK,
                    &json!({
                        "policy_decision_point": base,
                        "access_evaluation_endpoint": format!("{base}/access/v1/evaluation"),
                        "access_evaluations_endpoint": format!("{base}/access/v1/evaluations"),
                    }),
                )
            }
            (Method::POST, "/access/v1/evaluation" | "/access/v1/evaluations") => {
                authzen(&inner, &peer, req, path == "/access/v1/evaluations").await
            }
            (_, "/access/v1/evaluation" | "/access/v1/evaluations") => problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "POST only",
                &h::decision_id(),
            ),
            _ => problem(StatusCode::NOT_FOUND, "no such endpoint", &h::decision_id()),
        }
    };
    if let Some(id) = request_id {
        resp.headers_mut().insert("x-request-id", id);
    }
    resp
}

// ---------------------------------------------------------------------------------------------
// AuthZEN 1.0.

/// One evaluation's inputs after defaults were applied.
struct Evaluation<'a> {
    subject: Option<&'a Value>,
    action: Option<&'a Value>,
    resource: Option<&'a Value>,
    context: Option<&'a Value>,
}

fn field<'a>(v: Option<&'a Value>, k: &str) -> Option<&'a Value> {
    v.and_then(|v| v.get(k))
}

fn str_field<'a>(v: Option<&'a Value>, k: &str) -> Option<&'a str> {
    field(v, k).and_then(Value::as_str)
}

/// A service name or SPIFFE ID of this trust domain, as a SPIFFE ID.
fn workload_id(inner: &Inner, s: &str) -> Option<SpiffeId> {
    if s.starts_with("spiffe://") {
        SpiffeId::parse(s)
            .ok()
            .filter(|id| id.trust_domain() == inner.state.trust_domain())
    } else {
        SpiffeId::for_service(inner.state.trust_domain(), s).ok()
    }
}

/// Evaluates one request (AuthZEN §6, mapped as product.md §7 fixes): `Err` is a 400.
/// With the answer, its record's sequence number in the spool.
fn evaluate(inner: &Inner, e: &Evaluation<'_>, pep: &str) -> Result<(Value, Option<u64>), String> {
    Ok(decide_prepared(inner, prepare(inner, e)?, pep))
}

/// An evaluation checked and mapped, not yet decided (nor recorded).
struct Prepared {
    parts: hyper::http::request::Parts,
    source: SpiffeId,
    user: Option<User>,
    service: Option<String>,
}

/// Checks and maps one evaluation; `Err` is the 400's detail.
fn prepare(inner: &Inner, e: &Evaluation<'_>) -> Result<Prepared, String> {
    let subject_type = str_field(e.subject, "type").ok_or("subject.type is required")?;
    let subject_id = str_field(e.subject, "id").ok_or("subject.id is required")?;
    let action = str_field(e.action, "name").ok_or("action.name is required")?;
    let resource_type = str_field(e.resource, "type").ok_or("resource.type is required")?;
    let resource_id = str_field(e.resource, "id").ok_or("resource.id is required")?;
    if resource_type != "route" {
        return Err(format!(
            "resource.type {resource_type:?}: only \"route\" (a request path) is understood"
        ));
    }
    let method = Method::from_bytes(action.as_bytes())
        .map_err(|_| format!("action.name {action:?} is not an HTTP method"))?;
    let me = inner.identity.current().id.clone();
    let (source, user) = match subject_type {
        "workload" => (
            workload_id(inner, subject_id).ok_or_else(|| {
                format!("subject.id {subject_id:?} is not a workload of this trust domain")
            })?,
            None,
        ),
        "user" => {
            let props = field(e.subject, "properties");
            let roles = match field(props, "roles") {
                None => Vec::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|r| r.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("subject.properties.roles must be a list of strings")?,
                Some(_) => {
                    return Err("subject.properties.roles must be a list of strings".to_owned());
                }
            };
            let claims: Map<String, Value> = match field(props, "claims") {
                None => Map::new(),
                Some(Value::Object(o)) => o.clone(),
                Some(_) => return Err("subject.properties.claims must be an object".to_owned()),
            };
            let source = match str_field(e.context, "source") {
                None => me.clone(),
                Some(s) => workload_id(inner, s).ok_or_else(|| {
                    format!("context.source {s:?} is not a workload of this trust domain")
                })?,
            };
            (
                source,
                Some(User {
                    sub: Some(subject_id.to_owned()),
                    roles,
                    claims: claims.into_iter().collect(),
                    act: Vec::new(),
                }),
            )
        }
        other => return Err(format!("subject.type {other:?}: \"user\" or \"workload\"")),
    };
    let uri: hyper::Uri = resource_id
        .parse()
        .map_err(|_| format!("resource.id {resource_id:?} is not a request path"))?;
    if uri.scheme().is_some() || !resource_id.starts_with('/') {
        return Err(format!("resource.id {resource_id:?} is not a request path"));
    }
    let parts = Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .map_err(|e| e.to_string())?
        .into_parts()
        .0;
    let service = str_field(field(e.resource, "properties"), "service").map(str::to_owned);
    Ok(Prepared {
        parts,
        source,
        user,
        service,
    })
}

/// Decides a prepared evaluation and writes its record (its sequence number comes with the
/// answer).
fn decide_prepared(inner: &Inner, prep: Prepared, pep: &str) -> (Value, Option<u64>) {
    let Prepared {
        parts,
        source,
        user,
        service,
    } = prep;
    let mut p = Pending::start(&parts.method, &parts.uri, &parts.headers, "");
    p.origin = castellan_audit::ORIGIN_API;
    p.asked_by = pep.to_owned();
    p.source = source.as_str().to_owned();
    if let Some(u) = &user {
        p.user = u.sub.clone().unwrap_or_default();
    }
    let did = p.did.clone();
    let target = normalized_target(&parts);
    let path = target
        .as_deref()
        .map(|t| t.split('?').next().unwrap_or("/"));
    let service = service.or_else(|| {
        path.and_then(|p| crate::pipeline::route(inner, p))
            .map(str::to_owned)
    });
    let out = match (target, service) {
        (None, _) => {
            p.refusal = Some("malformed-request");
            json!({"decision": false, "context": {"decision_id": did, "reason": "malformed-request"}})
        }
        (Some(_), None) => {
            p.refusal = Some("no-route");
            json!({"decision": false, "context": {"decision_id": did, "reason": "no-route"}})
        }
        (Some(t), Some(service)) => {
            p.destination.clone_from(&service);
            p.path = t;
            let d = decide(inner, Some(&source), user, &service, &parts, &mut p);
            let mut ctx = Map::new();
            ctx.insert("decision_id".to_owned(), json!(did));
            if let Some(r) = &d.rule {
                ctx.insert("rule".to_owned(), json!(r.to_string()));
            }
            ctx.insert("reason".to_owned(), json!(d.reason.as_str()));
            let allowed = d.is_allowed();
            p.decision = Some(d);
            json!({"decision": allowed, "context": ctx})
        }
    };
    let seq = p.record(inner, StatusCode::OK);
    (out, seq)
}

async fn authzen(
    inner: &Inner,
    peer: &TlsPeer,
    req: Request<Incoming>,
    boxcar: bool,
) -> Response<Body> {
    let did = h::decision_id();
    let (parts, body) = req.into_parts();
    // A refused caller, a question refused because policy is stale, and a malformed question
    // are recorded too: who asked, and why they got no answer.
    let refused = async |status: StatusCode, reason: &'static str, asked_by: &str| {
        let mut p = Pending::start(&parts.method, &parts.uri, &parts.headers, "");
        p.did.clone_from(&did);
        p.origin = castellan_audit::ORIGIN_API;
        asked_by.clone_into(&mut p.asked_by);
        p.refusal = Some(reason);
        crate::audit::written(inner, p.record(inner, status)).await;
    };
    let pep = match authzen_caller(inner, peer, &parts.headers) {
        Ok(pep) => pep,
        Err(r) => {
            let who = peer.svid.as_ref().map_or("", |p| p.id.as_str());
            refused(r.status, "caller-refused", who).await;
            return r.response(&did);
        }
    };
    if let Some(age) = inner.staleness() {
        refused(StatusCode::SERVICE_UNAVAILABLE, "policy-stale", &pep).await;
        let why = format!("policy is stale (no control-plane contact for {age} s): failing closed");
        return problem(StatusCode::SERVICE_UNAVAILABLE, &why, &did);
    }
    let body = match h::read_body(body, inner.cfg.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => {
            let resp = h::body_error(e, &did);
            refused(resp.status(), "malformed-request", &pep).await;
            return resp;
        }
    };
    match authzen_answer(inner, &body, boxcar, &pep) {
        Ok((v, seq)) => {
            // Every evaluation's record is in the spool before the answer leaves.
            crate::audit::written(inner, seq).await;
            json_response(StatusCode::OK, &v)
        }
        Err(why) => {
            refused(StatusCode::BAD_REQUEST, "malformed-request", &pep).await;
            problem(StatusCode::BAD_REQUEST, &why, &did)
        }
    }
}

/// The answer to an AuthZEN request body (each evaluation decided and recorded; with the last
/// record's sequence number), or why the request is malformed (nothing decided).
fn authzen_answer(
    inner: &Inner,
    body: &[u8],
    boxcar: bool,
    pep: &str,
) -> Result<(Value, Option<u64>), String> {
    let v = serde_json::from_slice::<Value>(body).map_err(|_| "the body is not JSON")?;
    if !v.is_object() {
        return Err("the body must be a JSON object".to_owned());
    }
    let top = Evaluation {
        subject: v.get("subject"),
        action: v.get("action"),
        resource: v.get("resource"),
        context: v.get("context"),
    };
    let items = v
        .get("evaluations")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty());
    let (Some(items), true) = (items, boxcar) else {
        // A single evaluation (or a boxcar without `evaluations`, which AuthZEN answers as one).
        return evaluate(inner, &top, pep);
    };
    if items.len() > MAX_EVALUATIONS {
        return Err(format!("at most {MAX_EVALUATIONS} evaluations per request"));
    }
    let semantic = str_field(v.get("options"), "evaluations_semantic").unwrap_or("execute_all");
    let stop_on = match semantic {
        "execute_all" => None,
        "deny_on_first_deny" => Some(false),
        "permit_on_first_permit" => Some(true),
        other => {
            return Err(format!(
                "options.evaluations_semantic {other:?}: execute_all, deny_on_first_deny or permit_on_first_permit"
            ));
        }
    };
    // Every item is checked and mapped before any is decided (and recorded).
    let mut prepared = Vec::with_capacity(items.len());
    for (n, i) in items.iter().enumerate() {
        let e = Evaluation {
            subject: i.get("subject").or(top.subject),
            action: i.get("action").or(top.action),
            resource: i.get("resource").or(top.resource),
            context: i.get("context").or(top.context),
        };
        prepared.push(prepare(inner, &e).map_err(|why| format!("evaluations[{n}]: {why}"))?);
    }
    let mut out = Vec::with_capacity(prepared.len());
    let mut last = None;
    for p in prepared {
        let (r, seq) = decide_prepared(inner, p, pep);
        last = seq.max(last);
        let decision = r.get("decision").and_then(Value::as_bool).unwrap_or(false);
        out.push(r);
        if stop_on == Some(decision) {
            break;
        }
    }
    Ok((json!({ "evaluations": out }), last))
}

async fn serve_tls(inner: Arc<Inner>, listener: TcpListener, stop: watch::Receiver<bool>) {
    let cfg = match rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
    {
        Ok(b) => {
            let mut c = b
                .with_client_cert_verifier(Arc::new(crate::tls::OptionalClientCert))
                .with_cert_resolver(inner.identity.clone());
            // h2 for ext_authz gRPC from trusted SVIDs (Envoy over mTLS); both for the rest.
            c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            // The client's SVID is judged per connection below; no resumption around it.
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
    let local = inner.inbound_addr;
    let proxy = inner.cfg.proxy_id.clone();
    crate::listener::accept_loop("decision-tls", proxy, listener, stop, move |tcp, _| {
        let (inner, acceptor) = (inner.clone(), acceptor.clone());
        async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let certs: Vec<rustls_pki_types::CertificateDer<'static>> = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            let svid = (!certs.is_empty())
                .then(|| crate::sidecar::Peer::new(&inner.state, certs))
                .flatten();
            let peer = Arc::new(TlsPeer { svid, local });
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                serve_tls_h2(inner, peer, tls).await;
                return;
            }
            let svc = service_fn(move |req| {
                let (inner, peer) = (inner.clone(), peer.clone());
                async move { Ok::<_, Infallible>(tls_request(inner, peer, req).await) }
            });
            let _ = http1_builder()
                .serve_connection(TokioIo::new(crate::framing::FramingGuard::new(tls)), svc)
                .await;
        }
    })
    .await;
}

/// Path prefix of the ext_authz gRPC service.
const EXT_AUTHZ_GRPC_PREFIX: &str = "/envoy.service.auth.v3.Authorization/";

/// One HTTP/2 connection on the TLS listener: ext_authz gRPC, answered only for a trusted SVID
/// (re-checked per call, like every question here), and the HTTP/1.1 endpoints.
async fn serve_tls_h2(
    inner: Arc<Inner>,
    peer: Arc<TlsPeer>,
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tower::Service as _;
    let pep: Arc<str> = Arc::from(peer.svid.as_ref().map_or("", |p| p.id.as_str()));
    // Requests begun and finished: a connection with none open and none begun for a whole
    // idle period is closed (HTTP/2 has no idle timeout of its own, and keep-alive pings only
    // find dead peers, not idle ones).
    let begun = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let (begun_svc, finished_svc) = (begun.clone(), finished.clone());
    let idle = inner.cfg.decision.h2_idle;
    let grpc = AuthorizationServer::new(ExtAuthz {
        inner: inner.clone(),
        pep: pep.clone(),
    });
    let svc = service_fn(move |req: Request<Incoming>| {
        let (inner, peer, mut grpc, pep) = (inner.clone(), peer.clone(), grpc.clone(), pep.clone());
        begun_svc.fetch_add(1, Ordering::Relaxed);
        let done = Finished(finished_svc.clone());
        async move {
            let _done = done;
            if !req.uri().path().starts_with(EXT_AUTHZ_GRPC_PREFIX) {
                let resp = tls_request(inner, peer, req).await;
                return Ok(resp.map(tonic::body::Body::new));
            }
            if trusted(&inner, &peer) {
                return grpc.call(req).await;
            }
            // Whoever else asks learns nothing, and is recorded as refused.
            let mut p = Pending::start(req.method(), req.uri(), req.headers(), "");
            p.origin = ORIGIN_EXT_AUTHZ;
            p.asked_by = pep.to_string();
            p.refusal = Some("caller-refused");
            crate::audit::written(&inner, p.record(&inner, StatusCode::FORBIDDEN)).await;
            Ok(tonic::Status::permission_denied(
                "only proxies with a trusted SVID may ask ext_authz questions here",
            )
            .into_http())
        }
    });
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Duration::from_secs(30));
    let conn = b.serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            () = tokio::time::sleep(idle) => {
                let now = begun.load(Ordering::Relaxed);
                if now == seen && finished.load(Ordering::Relaxed) == now {
                    // GOAWAY, then at most one more idle period for it to go out (a client
                    // that never sent its preface does not end the connection itself).
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(idle, conn.as_mut()).await;
                    return;
                }
                seen = now;
            }
        }
    }
}

/// Counts a request as finished when dropped (answered, or abandoned by the client).
struct Finished(Arc<std::sync::atomic::AtomicU64>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_cert_header_and_envoy_pem_give_the_same_thumbprint() {
        use base64::Engine as _;
        let cert = rcgen::generate_simple_self_signed(vec!["a".to_owned()]).unwrap();
        let der = cert.cert.der().to_vec();
        let want = crate::tls::x5t_s256(&rustls_pki_types::CertificateDer::from(der.clone()));
        let header = format!(
            ":{}:",
            base64::engine::general_purpose::STANDARD.encode(&der)
        );
        assert_eq!(thumbprint_of_client_cert(&header), Some(want.clone()));
        let pem = cert.cert.pem();
        let encoded: String = pem
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        assert_eq!(
            thumbprint_of_pem(&percent_decode(&encoded).unwrap()),
            Some(want)
        );
        assert_eq!(thumbprint_of_client_cert("no-colons"), None);
    }

    #[test]
    fn http_kinds() {
        assert_eq!(http_kind("/forward-auth"), Some(HttpKind::ForwardAuth));
        assert_eq!(http_kind("/ext-authz/orders/1"), Some(HttpKind::ExtAuthz));
        assert_eq!(http_kind("/ext-authz"), Some(HttpKind::ExtAuthz));
        assert_eq!(http_kind("/ext-authzx"), None);
        assert_eq!(http_kind("/forward-auth/x"), None);
    }
}
