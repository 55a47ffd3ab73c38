//! The Castellan data plane: one proxy in two modes. A *sidecar* fronts one service — inbound
//! mTLS with SVIDs, a local decision on every request, forwarding to the app over loopback — and
//! gives the app outbound listeners that reach other services over mTLS. A *gateway* is the
//! edge: TLS, end-user authentication, a user-context token for the hops behind it. Both take
//! policy, keys and revocations pushed by the control plane; nothing on the request path calls
//! out.

mod admin;
pub mod audit;
mod breaker;
mod decision;
mod listener;
pub mod oidc;
mod pipeline;
pub mod ratelimit;
pub use admin::use_metrics_handle;
pub use decision::{
    AUTHZEN_SCOPE, DecisionAddrs, DecisionConfig, EXT_AUTHZ_HTTP_PREFIX, FORWARD_AUTH_PATH,
};
pub use oidc::{OidcIssuer, OidcKeys};
mod framing;
mod gateway;
pub mod http;
pub mod identity;
mod sidecar;
pub mod state;
pub mod tls;

use arc_swap::ArcSwap;
use castellan_identity::TokenVerifier;
use castellan_proto::v1::distribution_client::DistributionClient;
use castellan_proto::v1::{ProxyReport, WatchRequest};
use http::Body;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use identity::CurrentIdentity;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use state::State;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Why the proxy could not start or do something.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Bad configuration (the operator's to fix).
    #[error("{0}")]
    Config(String),
    /// The control plane refused or could not be reached.
    #[error("control plane: {0}")]
    ControlPlane(String),
    /// Our certificate or key.
    #[error("identity: {0}")]
    Identity(String),
    /// Network I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Sidecar, gateway or decision point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// In front of one service.
    Sidecar,
    /// At the edge.
    Gateway,
    /// Answers other proxies' questions (Envoy ext_authz, forward-auth, AuthZEN) with the
    /// gateway's pipeline, instead of forwarding.
    Decision,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Sidecar => "sidecar",
            Mode::Gateway => "gateway",
            Mode::Decision => "decision",
        }
    }
}

/// The key audit records pseudonymise users with (never printed).
#[derive(Clone)]
pub struct PseudonymKey(pub std::sync::Arc<[u8]>);

impl std::fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PseudonymKey(…)")
    }
}

impl PseudonymKey {
    /// Reads a key file: at least 32 bytes, readable by its owner only.
    pub fn from_file(path: &std::path::Path) -> Result<PseudonymKey, String> {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "{}: mode {:o} lets others read the pseudonymisation key (chmod 600)",
                path.display(),
                meta.permissions().mode() & 0o777
            ));
        }
        let key = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if key.len() < 32 {
            return Err(format!(
                "{}: a pseudonymisation key needs at least 32 bytes, got {}",
                path.display(),
                key.len()
            ));
        }
        Ok(PseudonymKey(key.into()))
    }
}

/// Everything a proxy needs.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Sidecar or gateway.
    pub mode: Mode,
    /// Stable id, reported to the control plane.
    pub proxy_id: String,
    /// Control-plane URL.
    pub control_plane: String,
    /// PEM bundle trusted for the control plane until the first push.
    pub ca_bundle: PathBuf,
    /// Single-use join token for the first start.
    pub join_token: Option<String>,
    /// Where the SVID and key are kept.
    pub state_dir: PathBuf,
    /// Inbound listener (sidecar: mTLS; gateway: TLS).
    pub listen: SocketAddr,
    /// Admin listener: /metrics, /healthz, /readyz, /status.
    pub admin_listen: SocketAddr,
    /// Sidecar: the local app.
    pub app: Option<SocketAddr>,
    /// Sidecar: outbound listeners, service → local address (loopback only, unless
    /// `dangerous_outbound_non_loopback`: anyone who can reach such a listener sends requests
    /// with this workload's identity).
    pub upstreams: Vec<(String, SocketAddr)>,
    /// Allows outbound listeners on non-loopback addresses.
    pub dangerous_outbound_non_loopback: bool,
    /// Query parameters whose values are masked in audit records (default:
    /// [`audit::DEFAULT_REDACTED`]).
    pub redact_query: Vec<String>,
    /// When set, audit records keep a keyed pseudonym of the end user instead of the user
    /// (`castellan_audit::pseudonym`).
    pub pseudonymize_users: Option<PseudonymKey>,
    /// Gateway and decision point: path prefix → service.
    pub routes: Vec<(String, String)>,
    /// Gateway and decision point: external OIDC issuers.
    pub oidc: Vec<OidcIssuer>,
    /// Decision point: its endpoints and whom it trusts to ask.
    pub decision: DecisionConfig,
    /// Largest request or response body, bytes.
    pub max_body_bytes: usize,
    /// Sidecar: the service it fronts (filled from the SVID at start).
    pub service_name: Option<String>,
    /// Largest audit spool on disk, bytes; beyond it records are counted as lost (and reported
    /// as a gap in the chain) while the proxy keeps serving.
    pub audit_spool_bytes: u64,
    /// How long the proxy keeps enforcing its last policy without contact with the control
    /// plane; past it, it fails closed (503 to everything).
    pub max_staleness_secs: i64,
    /// Upstream request timeout.
    pub upstream_timeout: Duration,
    /// `redis://…`: rate limits shared by every proxy using the same Redis (local limits when
    /// it is unreachable).
    pub redis_url: Option<String>,
    /// A signed audit checkpoint goes out with the batch that reaches this many records since
    /// the last one…
    pub checkpoint_records: u64,
    /// …or, with any record since the last one, after this long.
    pub checkpoint_interval: Duration,
}

impl ProxyConfig {
    /// Defaults for a proxy of `mode` talking to `control_plane`.
    pub fn new(
        mode: Mode,
        proxy_id: &str,
        control_plane: &str,
        ca_bundle: PathBuf,
        state_dir: PathBuf,
    ) -> ProxyConfig {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        ProxyConfig {
            mode,
            proxy_id: proxy_id.to_owned(),
            control_plane: control_plane.to_owned(),
            ca_bundle,
            join_token: None,
            state_dir,
            listen: any,
            admin_listen: any,
            app: None,
            upstreams: Vec::new(),
            routes: Vec::new(),
            oidc: Vec::new(),
            decision: DecisionConfig::default(),
            max_body_bytes: 1024 * 1024,
            service_name: None,
            audit_spool_bytes: 256 * 1024 * 1024,
            dangerous_outbound_non_loopback: false,
            redact_query: audit::DEFAULT_REDACTED
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            pseudonymize_users: None,
            checkpoint_records: 1000,
            checkpoint_interval: Duration::from_secs(10),
            max_staleness_secs: 24 * 3600,
            upstream_timeout: Duration::from_secs(15),
            redis_url: None,
        }
    }
}

pub(crate) fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

/// TCP for upstream connections, with TCP_NODELAY: a request is written whole, and waiting to
/// coalesce it with the next only adds latency.
fn plain_connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c
}

/// Shared by every task of one proxy.
pub(crate) struct Inner {
    cfg: ProxyConfig,
    state: Arc<State>,
    identity: Arc<CurrentIdentity>,
    app: Client<HttpConnector, Body>,
    upstreams: Mutex<HashMap<String, UpstreamClient>>,
    oidc: Vec<Arc<oidc::Issuer>>,
    castellan_tokens: ArcSwap<Option<TokenVerifier>>,
    inbound_addr: SocketAddr,
    /// This process's audit chain (a new epoch per start).
    audit: castellan_audit::spool::Spool,
    /// Chains of earlier starts whose records were not all shipped; drained first, then
    /// removed.
    audit_leftover: Mutex<Vec<castellan_audit::spool::Spool>>,
    /// Everything pushed so far, merged: persisted after each update so a restart without the
    /// control plane still enforces the last good state.
    snapshot: Mutex<castellan_proto::v1::WatchUpdate>,
    /// Last contact with the control plane (Unix seconds).
    last_sync: std::sync::atomic::AtomicI64,
    stale_logged: std::sync::atomic::AtomicBool,
    breakers: Mutex<HashMap<String, Arc<breaker::Breaker>>>,
    limits: ratelimit::Limits,
    /// API keys used since the last report (key id → Unix seconds), for `apikey list`.
    key_uses: Mutex<HashMap<String, i64>>,
    /// Context tokens minted recently, for reuse.
    context_tokens: pipeline::ContextCache,
    /// Metric handles of the request path.
    metrics: admin::RequestMetrics,
    /// Castellan bearer tokens verified recently.
    bearer_tokens: pipeline::BearerCache,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("proxy_id", &self.cfg.proxy_id)
            .finish_non_exhaustive()
    }
}

/// Sends a request upstream with the upstream timeout, the circuit breaker of `key`, and — for
/// idempotent methods — one retry (`build` gets the attempt number, to pick another endpoint).
/// Only an allowed request has a [`pipeline::Permit`].
pub(crate) async fn forward<C>(
    inner: &Inner,
    _permit: pipeline::Permit,
    key: &str,
    client: &Client<C, Body>,
    idempotent: bool,
    did: &str,
    build: impl Fn(usize) -> Option<hyper::Request<Body>>,
) -> hyper::Response<Body>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    use hyper::StatusCode;
    let breaker = inner.breaker(key);
    if !breaker.allow() {
        metrics::counter!("castellan_proxy_circuit_open_refusals_total", "proxy" => inner.cfg.proxy_id.clone(), "upstream" => key.to_owned()).increment(1);
        return http::problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream unavailable (circuit open)",
            did,
        );
    }
    let attempts = if idempotent { 2 } else { 1 };
    for attempt in 0..attempts {
        let Some(req) = build(attempt) else {
            return http::problem(StatusCode::BAD_REQUEST, "malformed request", did);
        };
        match tokio::time::timeout(inner.cfg.upstream_timeout, client.request(req)).await {
            Ok(Ok(resp)) => {
                breaker.success();
                // The response body is bounded in time too: a slow upstream body cannot hold
                // the request forever.
                return match tokio::time::timeout(
                    inner.cfg.upstream_timeout,
                    http::relay(resp, inner.cfg.max_body_bytes, did),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(upstream = key, "upstream response body timed out");
                        http::problem(
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream response timed out",
                            did,
                        )
                    }
                };
            }
            Ok(Err(e)) => {
                tracing::warn!(upstream = key, attempt, error = %e, "upstream request failed")
            }
            Err(_) => tracing::warn!(upstream = key, attempt, "upstream request timed out"),
        }
        if breaker.failure() {
            tracing::warn!(upstream = key, "circuit opened");
            break;
        }
    }
    metrics::gauge!("castellan_proxy_circuit_open", "proxy" => inner.cfg.proxy_id.clone(), "upstream" => key.to_owned()).set(if breaker.is_open() { 1.0 } else { 0.0 });
    http::problem(StatusCode::SERVICE_UNAVAILABLE, "upstream unavailable", did)
}

/// Validates a request against the destination's OpenAPI document, if it has one.
pub(crate) fn validate_request(
    inner: &Inner,
    service: &str,
    parts: &hyper::http::request::Parts,
    target: &str,
    body: &[u8],
) -> Result<(), castellan_openapi::Violation> {
    let Some(spec) = inner.state.spec(service) else {
        return Ok(());
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let ct = parts
        .headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    spec.check(parts.method.as_str(), path, query, ct, body).inspect_err(|_| {
        metrics::counter!("castellan_proxy_invalid_requests_total", "proxy" => inner.cfg.proxy_id.clone(), "service" => service.to_owned()).increment(1);
    })
}

/// Methods safe to retry.
pub(crate) fn is_idempotent(m: &hyper::Method) -> bool {
    matches!(
        *m,
        hyper::Method::GET
            | hyper::Method::HEAD
            | hyper::Method::OPTIONS
            | hyper::Method::PUT
            | hyper::Method::DELETE
    )
}

const SNAPSHOT_FILE: &str = "snapshot.pb";
const SYNCED_FILE: &str = "synced_at";

impl Inner {
    /// Seconds since the last contact with the control plane, if past the limit.
    pub(crate) fn staleness(&self) -> Option<i64> {
        let age = unix_now() - self.last_sync.load(std::sync::atomic::Ordering::Relaxed);
        let stale = age > self.cfg.max_staleness_secs;
        // Called on every request: the gauge and the log change only on a transition.
        if stale {
            if !self
                .stale_logged
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                metrics::gauge!("castellan_proxy_stale", "proxy" => self.cfg.proxy_id.clone())
                    .set(1.0);
                tracing::error!(
                    age_secs = age,
                    limit_secs = self.cfg.max_staleness_secs,
                    "no contact with the control plane beyond the maximum staleness: failing closed"
                );
            }
            Some(age)
        } else {
            if self
                .stale_logged
                .swap(false, std::sync::atomic::Ordering::Relaxed)
            {
                metrics::gauge!("castellan_proxy_stale", "proxy" => self.cfg.proxy_id.clone())
                    .set(0.0);
                tracing::warn!("control plane reachable again: enforcing");
            }
            None
        }
    }

    fn synced(&self) {
        let now = unix_now();
        self.last_sync
            .store(now, std::sync::atomic::Ordering::Relaxed);
        let _ = identity::write_private(
            &self.cfg.state_dir.join(SYNCED_FILE),
            now.to_string().as_bytes(),
        );
    }

    /// Merges an update into the persisted snapshot and writes it (atomically).
    fn persist(&self, u: &castellan_proto::v1::WatchUpdate) {
        use prost::Message as _;
        let Ok(mut snap) = self.snapshot.lock() else {
            return;
        };
        if u.policy.is_some() {
            snap.policy.clone_from(&u.policy);
        }
        snap.revocations.extend(u.revocations.iter().cloned());
        if u.api_keys.is_some() {
            snap.api_keys.clone_from(&u.api_keys);
        }
        if u.endpoints.is_some() {
            snap.endpoints.clone_from(&u.endpoints);
        }
        if !u.trust_bundle.is_empty() {
            snap.trust_bundle.clone_from(&u.trust_bundle);
        }
        if u.token_revocations.is_some() {
            snap.token_revocations.clone_from(&u.token_revocations);
        }
        if u.api_specs.is_some() {
            snap.api_specs.clone_from(&u.api_specs);
        }
        let path = self.cfg.state_dir.join(SNAPSHOT_FILE);
        if let Err(e) = identity::write_private(&path, &snap.encode_to_vec()) {
            tracing::error!(error = %e, "persisting the pushed state failed");
        }
    }

    /// Notes that an API key was used now (reported to the control plane with the next report).
    pub(crate) fn key_used(&self, key_id: &str) {
        if let Ok(mut m) = self.key_uses.lock()
            && (m.len() < 100_000 || m.contains_key(key_id))
        {
            m.insert(key_id.to_owned(), unix_now());
        }
    }

    /// The circuit breaker of an upstream service.
    pub(crate) fn breaker(&self, service: &str) -> Arc<breaker::Breaker> {
        let Ok(mut m) = self.breakers.lock() else {
            return Arc::new(breaker::Breaker::default());
        };
        m.entry(service.to_owned()).or_default().clone()
    }

    /// An mTLS client that accepts only `service`'s SVID, pooled per service.
    fn upstream(&self, service: &str) -> Result<UpstreamClient, ProxyError> {
        let mut map = self
            .upstreams
            .lock()
            .map_err(|_| ProxyError::Config("lock poisoned".to_owned()))?;
        if let Some(c) = map.get(service) {
            return Ok(c.clone());
        }
        let expected =
            castellan_identity::SpiffeId::for_service(self.state.trust_domain(), service)
                .map_err(|e| ProxyError::Config(e.to_string()))?;
        let verifier = Arc::new(tls::SvidServerVerifier::new(self.state.clone(), expected));
        // hyper-rustls sets ALPN (http/1.1) itself.
        let cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ProxyError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(self.identity.clone());
        let conn = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(cfg)
            .https_only()
            .enable_http1()
            .wrap_connector({
                // TLS is layered on top: the URIs are https.
                let mut c = plain_connector();
                c.enforce_http(false);
                c
            });
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(conn);
        map.insert(service.to_owned(), client.clone());
        Ok(client)
    }
}

/// A started proxy.
#[derive(Debug)]
pub struct RunningProxy {
    /// Inbound listener.
    pub inbound: SocketAddr,
    /// Outbound listeners (sidecar), service → address.
    pub outbound: Vec<(String, SocketAddr)>,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Enforcement state.
    pub state: Arc<State>,
    /// Identity in force.
    pub identity: Arc<CurrentIdentity>,
    /// Decision point: where it answers.
    pub decision: Option<DecisionAddrs>,
    stop: watch::Sender<bool>,
    inner: Arc<Inner>,
}

impl RunningProxy {
    /// Waits until a policy revision is in force.
    pub async fn ready(&self, timeout: Duration) -> Result<i64, ProxyError> {
        let t0 = std::time::Instant::now();
        while self.state.revision() == 0 {
            if t0.elapsed() > timeout {
                return Err(ProxyError::ControlPlane("no policy received".to_owned()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(self.state.revision())
    }

    /// Audit records written and not yet stored by the control plane (this start's chain and
    /// any left by earlier starts).
    pub fn audit_backlog(&self) -> u64 {
        let (written, acked) = self.inner.audit.positions();
        let left: u64 = self.inner.audit_leftover.lock().map_or(0, |l| {
            l.iter()
                .map(|s| {
                    let (w, a) = s.positions();
                    w.saturating_sub(a)
                })
                .sum()
        });
        written.saturating_sub(acked) + left
    }

    /// The epoch (process start) of this proxy's audit chain.
    pub fn audit_epoch(&self) -> &str {
        self.inner.audit.epoch()
    }

    /// Audit records written so far (the chain's last sequence number).
    pub fn audit_written(&self) -> u64 {
        self.inner.audit.positions().0
    }

    /// Stops every listener and task.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn read_bundle(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, ProxyError> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| ProxyError::Config(format!("{}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ProxyError::Config(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ProxyError::Config(format!(
            "{}: no certificates",
            path.display()
        )));
    }
    Ok(certs)
}

/// An error with its sources, `a: b: c` (transport errors say little at the top).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        src = s.source();
    }
    out
}

/// A single-threaded runtime on its own thread for the control tasks. On `stop` it waits (a
/// few seconds at most) for the tasks spawned on it to finish their own stop branches — the
/// audit shipper's last fsync among them — before the runtime goes.
struct Control {
    handle: tokio::runtime::Handle,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Control {
    fn start(stop: watch::Receiver<bool>) -> Result<Control, ProxyError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let pending = tasks.clone();
        std::thread::Builder::new()
            .name("castellan-control".to_owned())
            .spawn(move || {
                let mut stop = stop;
                rt.block_on(async move {
                    let _ = stop.wait_for(|s| *s).await;
                    let tasks = pending.lock().map(|mut t| std::mem::take(&mut *t));
                    for t in tasks.unwrap_or_default() {
                        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
                    }
                });
            })?;
        Ok(Control { handle, tasks })
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let t = self.handle.spawn(task);
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.push(t);
        }
    }
}

/// Starts a proxy: identity, listeners, the watch stream and renewal.
pub async fn start(cfg: ProxyConfig) -> Result<RunningProxy, ProxyError> {
    if cfg.mode == Mode::Sidecar && cfg.app.is_none() {
        return Err(ProxyError::Config(
            "a sidecar needs the app's address".to_owned(),
        ));
    }
    let file_bundle = read_bundle(&cfg.ca_bundle)?;
    let (ident, pushed) = identity::bootstrap(&cfg, &file_bundle).await?;
    let td = ident.id.trust_domain().to_owned();
    let mut cfg = cfg;
    cfg.service_name = ident.id.service_name().map(str::to_owned);
    let state = Arc::new(State::new(&td, pushed.unwrap_or(file_bundle))?);
    let identity = Arc::new(CurrentIdentity::new(ident)?);
    let oidc = oidc::load(&cfg.oidc)?;
    let inbound = TcpListener::bind(cfg.listen).await?;
    let decision_listeners = match cfg.mode {
        Mode::Decision => Some(decision::bind(&cfg.decision).await?),
        _ => None,
    };
    let admin = TcpListener::bind(cfg.admin_listen).await?;
    let mut outbound = Vec::new();
    for (svc, addr) in &cfg.upstreams {
        if !addr.ip().is_loopback() && !cfg.dangerous_outbound_non_loopback {
            return Err(ProxyError::Config(format!(
                "outbound listener for {svc} on {addr}: not a loopback address (whoever reaches it calls with this workload's identity; --dangerous-outbound-non-loopback to allow)"
            )));
        }
        let l = TcpListener::bind(addr).await?;
        outbound.push((svc.clone(), l.local_addr()?, l));
    }
    let (audit, audit_leftover) = audit::open_spools(&cfg)?;
    // The last good pushed state, if any: enforce it at once, even with the control plane down.
    let mut snapshot = castellan_proto::v1::WatchUpdate::default();
    let mut last_sync = unix_now();
    if let Ok(bytes) = std::fs::read(cfg.state_dir.join(SNAPSHOT_FILE)) {
        use prost::Message as _;
        match castellan_proto::v1::WatchUpdate::decode(bytes.as_slice()) {
            Ok(s) => {
                state.apply(s.clone());
                snapshot = s;
                last_sync = std::fs::read_to_string(cfg.state_dir.join(SYNCED_FILE))
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
                    .unwrap_or(0);
                tracing::info!(
                    revision = state.revision(),
                    synced_at = last_sync,
                    "enforcing the persisted policy until the control plane answers"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "persisted state unreadable; waiting for the control plane")
            }
        }
    }
    let inner = Arc::new(Inner {
        snapshot: Mutex::new(snapshot),
        last_sync: std::sync::atomic::AtomicI64::new(last_sync),
        stale_logged: std::sync::atomic::AtomicBool::new(false),
        breakers: Mutex::new(HashMap::new()),
        limits: ratelimit::Limits::new(cfg.redis_url.as_deref())?,
        key_uses: Mutex::new(HashMap::new()),
        context_tokens: pipeline::ContextCache::default(),
        metrics: admin::RequestMetrics::new(&cfg.proxy_id),
        bearer_tokens: pipeline::BearerCache::default(),
        audit,
        audit_leftover: Mutex::new(audit_leftover),
        app: Client::builder(TokioExecutor::new()).build(plain_connector()),
        upstreams: Mutex::new(HashMap::new()),
        oidc,
        castellan_tokens: ArcSwap::from_pointee(None),
        inbound_addr: inbound.local_addr()?,
        state: state.clone(),
        identity: identity.clone(),
        cfg,
    });
    let (stop, stop_rx) = watch::channel(false);
    let running = RunningProxy {
        inbound: inbound.local_addr()?,
        outbound: outbound.iter().map(|(s, a, _)| (s.clone(), *a)).collect(),
        admin: admin.local_addr()?,
        state,
        identity,
        decision: decision_listeners
            .as_ref()
            .map(|l| l.addrs(inner.inbound_addr)),
        stop,
        inner: inner.clone(),
    };
    // The control tasks run on a thread of their own (as linkerd2-proxy and ztunnel keep them
    // apart): encoding an audit batch, syncing the spool to disk or applying a pushed policy
    // never holds up a request, even on one core.
    let control = Control::start(stop_rx.clone())?;
    // Upkeep: drain metric histograms, forget refilled rate-limit keys.
    {
        let (inner, mut stop) = (inner.clone(), stop_rx.clone());
        control.spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {
                        admin::upkeep();
                        inner.limits.prune();
                    }
                    _ = stop.changed() => return,
                }
            }
        });
    }
    control.spawn(watch_loop(inner.clone(), stop_rx.clone()));
    control.spawn(renew_loop(inner.clone(), stop_rx.clone()));
    control.spawn(audit::ship_loop(inner.clone(), stop_rx.clone()));
    tokio::spawn(admin::serve(inner.clone(), admin, stop_rx.clone()));
    match inner.cfg.mode {
        Mode::Sidecar => {
            tokio::spawn(sidecar::serve_inbound(
                inner.clone(),
                inbound,
                stop_rx.clone(),
            ));
            for (svc, _, l) in outbound {
                tokio::spawn(sidecar::serve_outbound(
                    inner.clone(),
                    svc,
                    l,
                    stop_rx.clone(),
                ));
            }
        }
        Mode::Gateway => {
            tokio::spawn(gateway::refresh_castellan_keys(
                inner.clone(),
                stop_rx.clone(),
            ));
            oidc::spawn_refresh(&inner, &stop_rx);
            tokio::spawn(gateway::serve(inner.clone(), inbound, stop_rx.clone()));
        }
        Mode::Decision => {
            tokio::spawn(gateway::refresh_castellan_keys(
                inner.clone(),
                stop_rx.clone(),
            ));
            oidc::spawn_refresh(&inner, &stop_rx);
            if let Some(l) = decision_listeners {
                decision::serve(&inner, inbound, l, &stop_rx);
            }
        }
    }
    tracing::info!(proxy = %inner.cfg.proxy_id, mode = inner.cfg.mode.as_str(), inbound = %running.inbound, admin = %running.admin, "castellan proxy started");
    Ok(running)
}

async fn report(inner: &Inner, client: &mut DistributionClient<tonic::transport::Channel>) {
    let r = ProxyReport {
        proxy_id: inner.cfg.proxy_id.clone(),
        mode: inner.cfg.mode.as_str().to_owned(),
        address: match inner.cfg.mode {
            Mode::Sidecar => inner.inbound_addr.to_string(),
            Mode::Gateway | Mode::Decision => String::new(),
        },
        revision: inner.state.revision(),
        cert_not_after: inner.identity.current().not_after,
        api_keys_used: inner
            .key_uses
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
            .into_iter()
            .collect(),
    };
    match client.report(r).await {
        Ok(_) => inner.synced(),
        Err(e) => tracing::warn!(error = %e.message(), "report to the control plane failed"),
    }
}

/// Holds the watch stream open, applying every update; reconnects with backoff.
async fn watch_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let ident = inner.identity.current();
        let bundle = inner.state.bundle();
        let result: Result<(), String> = async {
            let ch = identity::control_channel(&inner.cfg, &bundle, Some(&ident))
                .await
                .map_err(|e| e.to_string())?;
            let mut client = DistributionClient::new(ch);
            let mut stream = client
                .watch(WatchRequest {
                    proxy_id: inner.cfg.proxy_id.clone(),
                })
                .await
                .map_err(|e| e.message().to_owned())?
                .into_inner();
            let mut tick = tokio::time::interval(Duration::from_secs(15));
            loop {
                tokio::select! {
                    m = stream.message() => match m {
                        Ok(Some(u)) => {
                            backoff = Duration::from_millis(200);
                            inner.persist(&u);
                            inner.state.apply(u);
                            inner.synced();
                            report(&inner, &mut client).await;
                        }
                        Ok(None) => return Err("stream ended".to_owned()),
                        Err(e) => return Err(e.message().to_owned()),
                    },
                    _ = tick.tick() => report(&inner, &mut client).await,
                    _ = stop.changed() => return Ok(()),
                }
            }
        }
        .await;
        match result {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "watch stream to the control plane lost")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Renews the SVID at half-life; retries every few seconds on failure.
async fn renew_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    loop {
        let cur = inner.identity.current();
        // Never more often than every 5 s, whatever the certificate says.
        let wait = (cur.renew_at() - unix_now()).max(5) as u64;
        metrics::gauge!("castellan_proxy_cert_not_after_seconds", "proxy" => inner.cfg.proxy_id.clone()).set(cur.not_after as f64);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(wait)) => {}
            _ = stop.changed() => return,
        }
        match identity::renew(&inner.cfg, &inner.state.bundle(), &cur).await {
            Ok(new) => {
                tracing::info!(not_after = new.not_after, "SVID renewed");
                if let Err(e) = inner.identity.swap(new) {
                    tracing::error!(error = %e, "renewed SVID unusable");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "SVID renewal failed; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}
