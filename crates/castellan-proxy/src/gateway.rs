//! Gateway mode: the TLS edge. Authenticates the end user (castellan API key, castellan OAuth2
//! token, or a JWT from a configured OIDC issuer), routes by path prefix, decides locally as the
//! gateway calling that service, mints the user-context token, and forwards over mTLS to the
//! service's sidecar. Client-supplied `x-castellan-*` headers never pass.

use crate::Inner;
use crate::http::{self as h, Body, CONTEXT_HEADER, problem};
use crate::pipeline::{Admitted, Caller, Destination, admit, mint_context};
use crate::sidecar::{Pending, http1_builder};
use bytes::Bytes;
use castellan_identity::TokenVerifier;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

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
    p.finish(&inner, r).await
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
    let (mut parts, body) = req.into_parts();
    let admitted = match admit(
        inner,
        &mut parts,
        Caller::Edge,
        Destination::Routed,
        conn.cert_thumbprint.as_deref(),
        p,
    )
    .await
    {
        Ok(a) => a,
        Err(r) => return r.response(&did),
    };
    let token = match mint_context(inner, &admitted, &did) {
        Ok(t) => t,
        Err(r) => return r.response(&did),
    };
    let Admitted {
        service,
        target,
        permit,
        ..
    } = admitted;
    let body = match h::read_body(body, inner.cfg.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return h::body_error(e, &did),
    };
    if let Err(v) = crate::validate_request(inner, &service, &parts, &target, &body) {
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
    let eps = inner.state.endpoints(&service);
    if eps.is_empty() {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "service unavailable", &did);
    }
    let client = match inner.upstream(&service) {
        Ok(c) => c,
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), &did),
    };
    let idempotent = crate::is_idempotent(&parts.method);
    crate::forward(
        inner,
        permit,
        &service,
        &client,
        idempotent,
        &did,
        |attempt| {
            let ep = eps.get(attempt % eps.len())?;
            let uri = format!("https://{ep}{target}").parse::<hyper::Uri>().ok()?;
            h::upstream_request(&parts, uri, headers.clone(), body.clone()).ok()
        },
    )
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
                inner.bearer_tokens.replace_keys(&inner.castellan_tokens, v);
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
