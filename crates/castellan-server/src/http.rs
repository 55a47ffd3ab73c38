//! The one TLS listener: accepts connections, records the client certificate chain (if any) on
//! every request, and serves HTTP/1.1 and HTTP/2 (gRPC included) from one router.

use crate::problem::Problem;
use crate::{Server, grpc, oauth};
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::CertificateDer;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt as _;

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (HTTP/1.1 buffer, HTTP/2 header list).
const MAX_HEADER_BYTES: usize = 32 * 1024;

/// The client's certificate chain as presented in the TLS handshake (verified by rustls against
/// the bundle; SPIFFE rules and revocation are checked by the handler that relies on it).
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerCerts(pub(crate) Option<Arc<Vec<CertificateDer<'static>>>>);

/// The OpenAPI document of the admin and OAuth2 API.
const OPENAPI: &str = include_str!("openapi.json");

pub(crate) fn router(s: Arc<Server>) -> Router {
    let grpc = tonic::service::Routes::new(grpc::service(s.clone()))
        .add_service(crate::dist::service(s.clone()))
        .add_service(crate::audit::service(s.clone()))
        .into_axum_router();
    let max_body = s.cfg.max_body_bytes;
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .merge(oauth::routes())
        .merge(crate::admin::routes())
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(s)
        .merge(grpc)
        // After the merge: replaces tonic's fallback, so unknown paths get problem JSON.
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn(count_requests))
}

async fn count_requests(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let status = r.status();
    metrics::counter!("castellan_server_http_responses_total", "status" => status.as_u16().to_string()).increment(1);
    if status == StatusCode::PAYLOAD_TOO_LARGE && r.headers().get(header::CONTENT_TYPE).is_none() {
        return Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
            .into_response();
    }
    r.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

async fn readyz(State(s): State<Arc<Server>>) -> Response {
    match s.store.ping().await {
        Ok(()) => "ready".into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready: database does not answer");
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
    }
}

async fn prometheus(State(s): State<Arc<Server>>) -> Response {
    let ks = s.keys.load();
    metrics::gauge!("castellan_server_ca_not_after_seconds").set(ks.active_ca.not_after as f64);
    metrics::gauge!("castellan_server_trust_bundle_certificates").set(ks.bundle.len() as f64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

/// Accepts connections until `stop` turns true.
pub(crate) async fn serve(s: Arc<Server>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let app = router(s.clone());
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(s.tls.load_full());
        let app = app.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    metrics::counter!("castellan_server_tls_handshake_failures_total").increment(1);
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let certs = PeerCerts(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())),
            );
            let svc = app.map_request(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(certs.clone());
                req
            });
            let mut b = auto::Builder::new(TokioExecutor::new());
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES.max(8192));
            b.http2()
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_HEADER_BYTES as u32)
                .max_concurrent_streams(256);
            if let Err(e) = b
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc))
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
