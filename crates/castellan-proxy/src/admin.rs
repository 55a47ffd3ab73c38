//! The proxy's admin port: `/healthz`, `/readyz` (a policy revision is in force and the SVID is
//! valid), `/metrics` (Prometheus), `/status` (revision, certificate expiry, identity).

use crate::http::{Body, problem};
use crate::{Inner, unix_now};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use tokio::net::TcpListener;
use tokio::sync::watch;

static METRICS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Uses `handle` for `/metrics` (when another component of the process installed the recorder);
/// otherwise the first proxy installs one.
pub fn use_metrics_handle(handle: PrometheusHandle) {
    let _ = METRICS.set(Some(handle));
}

/// Metric handles of the request path, resolved once: looking a metric up by name and labels
/// allocates the labels and hashes them, per request.
pub(crate) struct RequestMetrics {
    proxy: String,
    decision_seconds: metrics::Histogram,
    /// `castellan_proxy_decisions_total` by rule (`-`: none): allow, deny.
    decisions: std::sync::RwLock<std::collections::HashMap<String, [metrics::Counter; 2]>>,
}

/// Most rules with their own counters kept (policies are bounded; this bounds a bug).
const MAX_RULE_COUNTERS: usize = 10_000;

impl RequestMetrics {
    /// Handles for `proxy`'s metrics (installs the recorder first, if nobody did).
    pub(crate) fn new(proxy: &str) -> RequestMetrics {
        let _ = metrics_handle();
        RequestMetrics {
            proxy: proxy.to_owned(),
            decision_seconds: metrics::histogram!("castellan_proxy_decision_seconds", "proxy" => proxy.to_owned()),
            decisions: std::sync::RwLock::new(std::collections::HashMap::new()),
        }
    }

    /// Counts one decision (`rule` empty: none).
    pub(crate) fn decision(&self, allowed: bool, rule: &str, seconds: f64) {
        self.decision_seconds.record(seconds);
        let rule = if rule.is_empty() { "-" } else { rule };
        let i = usize::from(!allowed);
        if let Ok(m) = self.decisions.read()
            && let Some(c) = m.get(rule).and_then(|c| c.get(i))
        {
            c.increment(1);
            return;
        }
        let pair = ["allow", "deny"].map(|d| {
            metrics::counter!("castellan_proxy_decisions_total", "proxy" => self.proxy.clone(), "decision" => d, "rule" => rule.to_owned())
        });
        if let Some(c) = pair.get(i) {
            c.increment(1);
        }
        if let Ok(mut m) = self.decisions.write()
            && m.len() < MAX_RULE_COUNTERS
        {
            m.insert(rule.to_owned(), pair);
        }
    }
}

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMetrics").finish_non_exhaustive()
    }
}

fn metrics_handle() -> Option<&'static PrometheusHandle> {
    METRICS
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .ok()
        })
        .as_ref()
}

fn text(status: StatusCode, ct: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ct),
    );
    r
}

fn route(inner: &Inner, req: &Request<Incoming>) -> Response<Body> {
    let ident = inner.identity.current();
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok".to_owned()),
        "/readyz" => {
            if inner.state.revision() > 0 && ident.not_after > unix_now() {
                text(StatusCode::OK, "text/plain", "ready".to_owned())
            } else {
                problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no policy revision in force yet, or certificate expired",
                    "-",
                )
            }
        }
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics_handle()
                .map(PrometheusHandle::render)
                .unwrap_or_default(),
        ),
        "/status" => {
            let body = serde_json::json!({
                "proxy_id": inner.cfg.proxy_id, "mode": inner.cfg.mode.as_str(), "spiffe_id": ident.id.as_str(),
                "policy_revision": inner.state.revision(), "cert_not_after": ident.not_after,
            });
            text(StatusCode::OK, "application/json", body.to_string())
        }
        _ => problem(StatusCode::NOT_FOUND, "no such endpoint", "-"),
    }
}

pub(crate) async fn serve(inner: Arc<Inner>, listener: TcpListener, stop: watch::Receiver<bool>) {
    let _ = metrics_handle();
    let proxy = inner.cfg.proxy_id.clone();
    crate::listener::accept_loop("admin", proxy, listener, stop, move |tcp, _| {
        let inner = inner.clone();
        async move {
            let svc = service_fn(move |req| {
                let r = route(&inner, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = crate::sidecar::http1_builder()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        }
    })
    .await;
}

/// Drains metric histograms (samples wait in the recorder until drained, so an unscraped
/// process would grow) every few seconds.
pub(crate) fn upkeep() {
    if let Some(h) = metrics_handle() {
        h.run_upkeep();
    }
}
