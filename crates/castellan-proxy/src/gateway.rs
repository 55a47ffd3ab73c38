//! Gateway mode: the TLS edge. Authenticates the end user (castellan API key, castellan OAuth2
//! token, or a JWT from a configured OIDC issuer), routes by path prefix, decides locally as the
//! gateway calling that service, mints the user-context token, and forwards over mTLS to the
//! service's sidecar. Client-supplied `x-castellan-*` headers never pass.

use crate::http::{self as h, Body, CONTEXT_HEADER, problem};
use crate::sidecar::{Pending, decide, denial, http1_builder, normalized_target, unauthorized};
use crate::{Inner, unix_now};
use bytes::Bytes;
use castellan_identity::TokenVerifier;
use castellan_policy::User;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Map, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Lifetime of minted context tokens.
const CONTEXT_TTL: i64 = 60;
/// Registered claims not passed on as user claims.
const REGISTERED: &[&str] = &[
    "iss",
    "sub",
    "aud",
    "exp",
    "iat",
    "nbf",
    "jti",
    "roles",
    "scope",
    "client_id",
    "cnf",
    "act",
];

/// The end user of a verified token: `sub`, `roles` (a list of strings, or absent), and every
/// other claim in its JSON shape — dropping a claim of an unexpected shape would make a deny
/// rule reading it fail open. `None` (→ 401) when `sub` or `roles` is malformed.
fn user_from_claims(claims: &Map<String, Value>) -> Option<User> {
    let sub = claims.get("sub")?.as_str()?.to_owned();
    let roles = match claims.get("roles") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|r| r.as_str().map(str::to_owned))
            .collect::<Option<Vec<String>>>()?,
        Some(_) => return None,
    };
    let extra = claims
        .iter()
        .filter(|(k, _)| !REGISTERED.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Some(User {
        sub: Some(sub),
        roles,
        claims: extra,
        act: act_chain(claims.get("act"))?,
    })
}

/// The delegation chain of an exchanged token (RFC 8693 §4.1: the outermost `act` is the
/// current actor, nested ones came before), first actor first. `None` (→ 401) if malformed.
fn act_chain(act: Option<&Value>) -> Option<Vec<String>> {
    let mut chain = Vec::new();
    let mut cur = act;
    while let Some(a) = cur {
        let sub = a.get("sub")?.as_str()?;
        chain.push(sub.to_owned());
        if chain.len() > 8 {
            return None;
        }
        cur = a.get("act");
    }
    chain.reverse();
    Some(chain)
}

/// Whether a route `prefix` serves `path` (both normalized): the prefix itself, or anything
/// below it (`/api` serves `/api/x`; `/` and `/api/` serve everything under them).
fn route_matches(prefix: &str, path: &str) -> bool {
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| prefix.ends_with('/') || rest.starts_with('/'))
}

/// The end user, and the API key that authenticated them (if one did: its scope is checked
/// once the route is known).
type Authenticated = (User, Option<Arc<crate::state::ApiKeyUser>>);

/// Who the request's credentials say the user is; `Err` is the 401 to send.
fn authenticate(
    inner: &Inner,
    headers: &hyper::HeaderMap,
    client_cert: Option<&str>,
    did: &str,
) -> Result<Authenticated, Box<Response<Body>>> {
    let api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let cred = match (api_key, bearer) {
        (Some(_), Some(_)) => {
            return Err(Box::new(unauthorized(
                "send one credential, not both X-API-Key and Authorization",
                did,
            )));
        }
        (Some(k), None) | (None, Some(k)) => k,
        (None, None) => return Err(Box::new(unauthorized("credentials required", did))),
    };
    if cred.starts_with(crate::state::API_KEY_PREFIX) {
        let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cred.as_bytes());
        return match inner.state.api_key(hash.as_ref()) {
            Some(u) => Ok((
                User {
                    sub: Some(u.user.clone()),
                    roles: u.roles.clone(),
                    claims: u.claims.clone().into_iter().collect(),
                    act: Vec::new(),
                },
                Some(u),
            )),
            None => Err(Box::new(unauthorized("unknown or revoked API key", did))),
        };
    }
    let now = unix_now();
    if let Some(v) = inner.castellan_tokens.load().as_ref()
        && let Ok(t) = v.verify(cred, now)
    {
        let claim = |k: &str| t.claims.get(k).and_then(Value::as_str);
        // Revocation and disabled clients, as pushed: checked on every request.
        if inner
            .state
            .is_token_revoked(claim("jti"), claim("client_id"))
        {
            return Err(Box::new(unauthorized("token revoked", did)));
        }
        // RFC 8705 §3: a certificate-bound token only with its certificate.
        if let Some(bound) = t
            .claims
            .get("cnf")
            .and_then(|c| c.get("x5t#S256"))
            .and_then(Value::as_str)
            && client_cert != Some(bound)
        {
            return Err(Box::new(unauthorized(
                "certificate-bound token presented without its certificate",
                did,
            )));
        }
        return match user_from_claims(&t.claims) {
            Some(u) => Ok((u, None)),
            None => Err(Box::new(unauthorized("invalid token", did))),
        };
    }
    for v in &inner.oidc {
        if let Ok(t) = v.verify(cred, now)
            && let Some(u) = user_from_claims(&t.claims)
        {
            return Ok((u, None));
        }
    }
    Err(Box::new(unauthorized("invalid token", did)))
}

/// What the edge knows about one client connection.
#[derive(Debug)]
struct EdgeConn {
    /// The client's address.
    ip: std::net::IpAddr,
    /// base64url SHA-256 of the client certificate's DER, when the client sent one (verified
    /// against the bundle in the handshake): what `cnf.x5t#S256` must equal.
    cert_thumbprint: Option<String>,
}

async fn handle(inner: Arc<Inner>, conn: Arc<EdgeConn>, req: Request<Incoming>) -> Response<Body> {
    let mut p = Pending::new(&req, "");
    p.source = inner.identity.current().id.as_str().to_owned();
    let r = handle_inner(&inner, &conn, req, &mut p).await;
    p.finish(&inner, r)
}

async fn handle_inner(
    inner: &Arc<Inner>,
    conn: &EdgeConn,
    req: Request<Incoming>,
    p: &mut Pending,
) -> Response<Body> {
    let did = p.did.clone();
    if let Err(why) = h::check_framing(req.headers()) {
        return problem(StatusCode::BAD_REQUEST, why, &did);
    }
    if let Some(age) = inner.staleness() {
        let why = format!("policy is stale (no control-plane contact for {age} s): failing closed");
        return problem(StatusCode::SERVICE_UNAVAILABLE, &why, &did);
    }
    let (mut parts, body) = req.into_parts();
    if let Err(why) = h::normalize_headers(&mut parts.headers, true) {
        return problem(StatusCode::BAD_REQUEST, &why.to_string(), &did);
    }
    let Some(target) = normalized_target(&parts) else {
        return problem(StatusCode::BAD_REQUEST, "malformed request", &did);
    };
    let path = target.split('?').next().unwrap_or("/");
    let route = inner
        .cfg
        .routes
        .iter()
        .filter(|(prefix, _)| route_matches(prefix, path))
        .max_by_key(|(prefix, _)| prefix.len());
    let Some((_, service)) = route else {
        return problem(StatusCode::NOT_FOUND, "no route", &did);
    };
    p.destination = service.clone();
    p.path = target.clone();
    let (user, api_key) =
        match authenticate(inner, &parts.headers, conn.cert_thumbprint.as_deref(), &did) {
            Ok(u) => u,
            Err(r) => return *r,
        };
    // An API key scoped to services, route prefixes or a lifetime is refused elsewhere.
    if let Some(k) = &api_key {
        if let Some(why) = k.refusal(service, path, unix_now()) {
            p.user = k.user.clone();
            p.refusal = Some("key-out-of-scope");
            return unauthorized(why, &did);
        }
        inner.key_used(&k.key_id);
    }
    let api_key_id = api_key.as_ref().map_or("", |k| k.key_id.as_str());
    let sub = user.sub.clone().unwrap_or_default();
    p.user.clone_from(&sub);
    let me = inner.identity.current().id.clone();
    // The claims as the token carries them (a JSON object).
    let claims: Map<String, Value> = user
        .claims
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let roles = user.roles.clone();
    let act = user.act.clone();
    p.act.clone_from(&act);
    let d = decide(inner, Some(&me), Some(user), service, &parts);
    let denied = (!d.is_allowed()).then(|| denial(&d, &did));
    p.decision = Some(d);
    if let Some(r) = denied {
        return r;
    }
    let who = crate::ratelimit::Who {
        source: &p.source,
        user: &p.user,
        api_key: api_key_id,
    };
    if let Err((limit, wait)) = inner
        .limits
        .check(inner, service, parts.method.as_str(), path, &who)
        .await
    {
        p.rate_limited = Some(limit);
        return crate::sidecar::too_many(wait, &did);
    }
    // The token names its destination: only we (calling it) or it (calling on once) may
    // present it.
    let Ok(aud) = castellan_identity::SpiffeId::for_service(inner.state.trust_domain(), service)
    else {
        return problem(StatusCode::INTERNAL_SERVER_ERROR, "internal error", &did);
    };
    let token = match inner.identity.signer().mint_with_act(
        aud.as_str(),
        &sub,
        &roles,
        &claims,
        &act,
        &did,
        unix_now(),
        CONTEXT_TTL,
    ) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "minting the context token failed");
            return problem(StatusCode::INTERNAL_SERVER_ERROR, "internal error", &did);
        }
    };
    let body = match h::read_body(body, inner.cfg.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return h::body_error(e, &did),
    };
    if let Err(v) = crate::validate_request(inner, service, &parts, &target, &body) {
        p.invalid = true;
        let status = StatusCode::from_u16(v.status).unwrap_or(StatusCode::BAD_REQUEST);
        return problem(status, &v.detail, &did);
    }
    let mut headers = parts.headers.clone();
    h::strip_headers(&mut headers);
    // The credentials the edge consumed never reach the app, in any spelling.
    h::remove_folded(&mut headers, &["authorization", "x-api-key"]);
    if let Ok(v) = HeaderValue::from_str(&token) {
        headers.insert(CONTEXT_HEADER, v);
    }
    // What the edge knows about the client, set by us alone (the client's own were removed).
    let host = parts.headers.get(hyper::header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    if let Ok(v) = HeaderValue::from_str(&conn.ip.to_string()) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    if let Some(v) = host {
        headers.insert("x-forwarded-host", v);
    }
    let eps = inner.state.endpoints(service);
    if eps.is_empty() {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "service unavailable", &did);
    }
    let client = match inner.upstream(service) {
        Ok(c) => c,
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), &did),
    };
    let idempotent = crate::is_idempotent(&parts.method);
    crate::forward(inner, service, &client, idempotent, &did, |attempt| {
        let ep = eps.get(attempt % eps.len())?;
        let uri = format!("https://{ep}{target}").parse::<hyper::Uri>().ok()?;
        h::upstream_request(&parts, uri, headers.clone(), body.clone()).ok()
    })
    .await
}

/// Serves the edge TLS listener.
pub(crate) async fn serve(inner: Arc<Inner>, listener: TcpListener, stop: watch::Receiver<bool>) {
    let cfg = match rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
    {
        Ok(b) => {
            let mut c = b
                .with_client_cert_verifier(Arc::new(crate::tls::OptionalClientCert))
                .with_cert_resolver(inner.identity.clone());
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(c)
        }
        Err(e) => {
            tracing::error!(error = %e, "TLS configuration failed");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let proxy = inner.cfg.proxy_id.clone();
    crate::listener::accept_loop("edge", proxy, listener, stop, move |tcp, peer| {
        let (inner, acceptor) = (inner.clone(), acceptor.clone());
        async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let conn = Arc::new(EdgeConn {
                ip: peer.ip(),
                cert_thumbprint: tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(crate::tls::x5t_s256),
            });
            let audit_inner = inner.clone();
            let svc = service_fn(move |req| {
                let (inner, conn) = (inner.clone(), conn.clone());
                async move { Ok::<_, Infallible>(handle(inner, conn, req).await) }
            });
            if let Err(e) = http1_builder()
                .serve_connection(TokioIo::new(crate::framing::FramingGuard::new(tls)), svc)
                .await
            {
                let me = audit_inner.identity.current().id.as_str().to_owned();
                crate::sidecar::record_unparsed(&audit_inner, &me, "", &e);
            }
        }
    })
    .await;
}

async fn get_json(
    client: &Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    url: &str,
) -> Result<Value, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let resp = client.get(uri).await.map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: {}", resp.status()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("{url}: {e}"))
}

/// Keeps a verifier for castellan-issued OAuth2 tokens (audience: the trust domain) from the
/// control plane's discovery document and JWKS, refreshed every minute.
pub(crate) async fn refresh_castellan_keys(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    loop {
        let result: Result<TokenVerifier, String> = async {
            // The control plane by its SPIFFE ID: a workload SVID that also names the
            // control plane's host must not be able to serve us signing keys.
            // hyper-rustls sets ALPN itself (and refuses a preset one).
            let cfg =
                crate::tls::control_plane_client_config(inner.state.bundle().to_vec(), None, &[])?;
            let conn = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(cfg)
                .https_only()
                .enable_http1()
                .build();
            let client = Client::builder(TokioExecutor::new()).build(conn);
            let base = inner.cfg.control_plane.trim_end_matches('/');
            let meta =
                get_json(&client, &format!("{base}/.well-known/openid-configuration")).await?;
            let issuer = meta
                .get("issuer")
                .and_then(Value::as_str)
                .ok_or("discovery without issuer")?;
            let jwks_uri = meta
                .get("jwks_uri")
                .and_then(Value::as_str)
                .ok_or("discovery without jwks_uri")?;
            let jwks = serde_json::from_value(get_json(&client, jwks_uri).await?)
                .map_err(|e| e.to_string())?;
            TokenVerifier::new(issuer, inner.state.trust_domain(), &jwks).map_err(|e| e.to_string())
        }
        .await;
        let wait = match result {
            Ok(v) => {
                inner.castellan_tokens.store(Arc::new(Some(v)));
                Duration::from_secs(60)
            }
            Err(e) => {
                tracing::warn!(error = %e, "fetching the control plane's token keys failed");
                Duration::from_secs(5)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}
