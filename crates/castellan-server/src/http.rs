//! The one TLS listener: accepts connections, records the client certificate chain (if any) on
//! every request, and serves HTTP/1.1 and HTTP/2 (gRPC included) from one router.

use crate::peer::{PeerAddr, PeerCerts};
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
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt as _;

/// Request headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (HTTP/1.1 buffer, HTTP/2 header list).
const MAX_HEADER_BYTES: usize = 32 * 1024;

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
        .merge(crate::dashboard::routes())
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(s)
        .merge(grpc)
        // After the merge: replaces tonic's fallback, so unknown paths get problem JSON.
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn(count_requests))
        .layer(middleware::from_fn(track_activity))
}

/// How busy one connection is: requests (streaming responses included) in flight, and when
/// the last one ended. The listener closes connections idle for too long.
#[derive(Debug)]
pub(crate) struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        }
    }

    /// How long nothing has been in flight (`None` while something is).
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        self.last.lock().ok().map(|l| l.elapsed())
    }
}

/// One request in flight; dropped with the last byte of its response.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn enter(a: &Arc<Activity>) -> InFlight {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut l) = self.0.last.lock() {
            *l = Instant::now();
        }
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn track_activity(req: Request, next: Next) -> Response {
    let guard = req.extensions().get::<Arc<Activity>>().map(InFlight::enter);
    let resp = next.run(req).await;
    match guard {
        None => resp,
        Some(guard) => {
            let (parts, body) = resp.into_parts();
            // The response body (a gRPC stream may last for hours) holds the guard.
            let body = axum::body::Body::new(http_body_util::BodyExt::map_frame(body, move |f| {
                let _in_flight = &guard;
                f
            }));
            Response::from_parts(parts, body)
        }
    }
}

/// Connection slots: a total cap and a cap per source address.
#[derive(Debug, Default)]
struct Slots {
    total: AtomicUsize,
    per_source: Mutex<HashMap<IpAddr, usize>>,
}

/// One taken slot, given back on drop.
struct Slot(Arc<Slots>, IpAddr);

impl Slots {
    fn take(self: &Arc<Self>, ip: IpAddr, max_total: usize, max_per_source: usize) -> Option<Slot> {
        let mut per = self.per_source.lock().ok()?;
        let n = per.entry(ip).or_insert(0);
        if *n >= max_per_source || self.total.load(Ordering::Acquire) >= max_total {
            if *n == 0 {
                per.remove(&ip);
            }
            return None;
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::AcqRel);
        Some(Slot(self.clone(), ip))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut per) = self.0.per_source.lock()
            && let Some(n) = per.get_mut(&self.1)
        {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.1);
            }
        }
        self.0.total.fetch_sub(1, Ordering::AcqRel);
    }
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

/// `/metrics` on the main listener: an admin or viewer credential is required (metrics name
/// services, clients and rules). Without one it is served only on `metrics_listen`.
async fn prometheus(_c: crate::admin::auth::Caller, State(s): State<Arc<Server>>) -> Response {
    metrics_body(&s)
}

/// The Prometheus text exposition.
pub(crate) fn metrics_body(s: &Server) -> Response {
    let ks = s.keys.load();
    metrics::gauge!("castellan_server_ca_not_after_seconds").set(ks.active_ca.not_after as f64);
    metrics::gauge!("castellan_server_trust_bundle_certificates").set(ks.bundle.len() as f64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

/// Serves `/metrics` (only) without credentials on the separate `metrics_listen` address, for
/// a scraper on a network the operator chose; everything else there is 404.
pub(crate) async fn serve_metrics(
    s: Arc<Server>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<Arc<Server>>| async move { metrics_body(&s) }),
        )
        .with_state(s);
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc = TowerToHyperService::new(app);
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let _ = b.serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

/// After a graceful close was asked for, a connection gets this long to finish.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

fn secs(v: i64) -> Duration {
    Duration::from_secs(u64::try_from(v).unwrap_or(1))
}

/// Accepts connections until `stop` turns true. Every connection is bounded: a slot (total and
/// per source), a handshake deadline, an idle timeout, a maximum age.
pub(crate) async fn serve(s: Arc<Server>, listener: TcpListener, stop: watch::Receiver<bool>) {
    let app = router(s.clone());
    serve_with(s, listener, stop, app, None).await;
}

/// The dashboard alone, on its own listener with the operator's certificate.
pub(crate) async fn serve_dashboard(
    s: Arc<Server>,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
    tls: Arc<rustls::ServerConfig>,
) {
    let app = crate::dashboard::routes()
        .with_state(s.clone())
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn(track_activity));
    serve_with(s, listener, stop, app, Some(tls)).await;
}

/// Accepts TLS connections (with the control plane's serving configuration, or `tls`) and
/// serves `app` on them.
async fn serve_with(
    s: Arc<Server>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let slots = Arc::new(Slots::default());
    let max_total = usize::try_from(s.cfg.max_connections).unwrap_or(usize::MAX);
    let max_per = usize::try_from(s.cfg.max_connections_per_source).unwrap_or(usize::MAX);
    let mut backoff = Duration::from_millis(10);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => {
                    backoff = Duration::from_millis(10);
                    c
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; existing connections
                    // finish and free descriptors.
                    if backoff == Duration::from_millis(10) {
                        tracing::warn!(error = %e, "accept failed; backing off");
                    }
                    metrics::counter!("castellan_server_accept_errors_total").increment(1);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Some(slot) = slots.take(peer.ip(), max_total, max_per) else {
            metrics::counter!("castellan_server_connections_refused_total").increment(1);
            tracing::debug!(%peer, "connection refused: connection cap reached");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor =
            tokio_rustls::TlsAcceptor::from(tls.clone().unwrap_or_else(|| s.tls.load_full()));
        let app = app.clone();
        let (handshake, idle, max_age) = (
            secs(s.cfg.handshake_timeout_secs),
            secs(s.cfg.idle_timeout_secs),
            secs(s.cfg.max_connection_age_secs),
        );
        tokio::spawn(async move {
            let _slot = slot;
            let born = Instant::now();
            let tls = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    metrics::counter!("castellan_server_tls_handshake_failures_total").increment(1);
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    metrics::counter!("castellan_server_tls_handshake_failures_total").increment(1);
                    return;
                }
            };
            let certs = PeerCerts(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())),
            );
            let activity = Arc::new(Activity::new());
            let svc_activity = activity.clone();
            let svc = app.map_request(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(certs.clone());
                req.extensions_mut().insert(PeerAddr(peer));
                req.extensions_mut().insert(svc_activity.clone());
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
                .max_concurrent_streams(256)
                .keep_alive_interval(Some(idle.max(Duration::from_secs(2)) / 2))
                .keep_alive_timeout(Duration::from_secs(10));
            let conn = b.serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc));
            tokio::pin!(conn);
            let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
            let mut closing: Option<Instant> = None;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = tokio::time::sleep(tick) => {
                        let now = Instant::now();
                        if let Some(deadline) = closing {
                            if now >= deadline {
                                tracing::debug!(%peer, "connection dropped: did not close in time");
                                break;
                            }
                            continue;
                        }
                        let reason = if activity.idle_for().is_some_and(|d| d >= idle) {
                            "idle"
                        } else if born.elapsed() >= max_age {
                            "max-age"
                        } else {
                            continue;
                        };
                        metrics::counter!("castellan_server_connections_closed_total", "reason" => reason).increment(1);
                        tracing::debug!(%peer, reason, "closing connection");
                        conn.as_mut().graceful_shutdown();
                        closing = Some(now + CLOSE_GRACE.min(idle));
                    }
                }
            }
        });
    }
}
