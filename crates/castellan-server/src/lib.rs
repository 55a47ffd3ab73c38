//! The Castellan control plane: the trust domain's CA, workload registration (join tokens,
//! certify/renew over gRPC), the OAuth2/OIDC token service, and the admin API — one TLS
//! listener, SQLite or PostgreSQL behind `castellan-store`.

pub mod admin;
mod admin_audit;
/// The writer name of the control plane's own audit chain (its admin actions).
pub use admin_audit::WRITER as ADMIN_CHAIN_WRITER;
mod alerts;
mod anomaly;
pub mod api;
mod audit;
pub mod config;
mod dashboard;
mod dist;
mod grpc;
mod http;
mod impact;
pub mod keys;
mod oauth;
mod peer;
mod problem;
mod report;
mod tls;

pub use config::{AlertRule, AnomalyConfig, ConfigError, ExternalIssuer, MayAct, ServerConfig};

use arc_swap::ArcSwap;
use castellan_identity::{
    SpiffeId, SvidValidator, TokenVerifier, TrustBundle, validate_trust_domain,
};
use castellan_store::{ClientRow, Store, StoreError};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use keys::{Kek, KeySet};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::os::unix::fs::DirBuilderExt as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Why the server could not do something, and whose fault it was.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Bad configuration or data directory (the operator's to fix).
    #[error("{0}")]
    Config(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Network or file I/O failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A bug or resource failure on our side.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Name of the setting that fixes the trust domain at init.
const TRUST_DOMAIN_SETTING: &str = "trust_domain";
/// The trust bundle, PEM, written to the data directory for CLIs and proxies.
pub const BUNDLE_FILE: &str = "bundle.pem";
/// Written once the server listens: `{"url": …, "ca_bundle": …}`.
pub const ENDPOINT_FILE: &str = "server.json";
/// How often keys are re-read (rotations made by another replica) and expired state purged.
const RELOAD_EVERY: Duration = Duration::from_secs(10);
/// How long a looked-up OAuth2 client is reused before it is read again.
const CLIENT_CACHE_TTL: Duration = Duration::from_secs(5);
/// Verifiers accept tokens this many seconds past `exp`; a retired key is published that much
/// longer.
const LEEWAY_SECS: i64 = castellan_identity::token::DEFAULT_LEEWAY_SECS;

/// Unix seconds now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Unix time in milliseconds.
pub fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What `castellan server init` produced.
#[derive(Debug)]
pub struct InitOutput {
    /// The first admin credential; shown once, stored only as a hash.
    pub admin_token: String,
    /// The trust domain.
    pub trust_domain: String,
    /// Where the bundle was written.
    pub bundle_path: std::path::PathBuf,
}

/// Creates the data directory, KEK, CA and signing key, and the first admin credential.
pub async fn init(
    cfg: &ServerConfig,
    trust_domain: &str,
    kek_env: Option<String>,
) -> Result<InitOutput, ServerError> {
    validate_trust_domain(trust_domain)
        .map_err(|e| ServerError::Config(format!("trust domain {trust_domain:?}: {e}")))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.data_dir)
        .map_err(|e| ServerError::Config(format!("{}: {e}", cfg.data_dir.display())))?;
    let kek = Kek::load(&cfg.data_dir, kek_env, true)?;
    let store = Store::connect(&cfg.database_url()).await?;
    if let Some(td) = store.setting(TRUST_DOMAIN_SETTING).await? {
        return Err(ServerError::Config(format!(
            "already initialized for trust domain {td:?}"
        )));
    }
    store
        .init_setting(TRUST_DOMAIN_SETTING, trust_domain)
        .await
        .map_err(|e| match e {
            StoreError::Conflict(_) => ServerError::Config("already initialized".to_owned()),
            e => e.into(),
        })?;
    let now = unix_now();
    keys::add_ca(
        &store,
        &kek,
        trust_domain,
        now,
        Duration::from_secs(cfg.ca_ttl_secs as u64),
    )
    .await?;
    keys::add_signing_key(&store, &kek, now).await?;
    let admin_token =
        admin::new_admin_token(&store, &kek, "initial admin", admin::Role::Admin, now).await?;
    admin::mark_admin_tokens_adopted(&store).await?;
    std::fs::write(cfg.data_dir.join("admin-tokens-adopted"), b"1\n")?;
    let issuer = cfg
        .issuer
        .clone()
        .unwrap_or_else(|| format!("https://{}", cfg.listen));
    let ks = keys::load(
        &store,
        &kek,
        trust_domain,
        &issuer,
        now,
        publish_window(cfg),
    )
    .await?;
    let bundle_path = cfg.data_dir.join(BUNDLE_FILE);
    std::fs::write(&bundle_path, keys::pem_bundle(&ks.bundle))?;
    store.close().await;
    Ok(InitOutput {
        admin_token,
        trust_domain: trust_domain.to_owned(),
        bundle_path,
    })
}

fn publish_window(cfg: &ServerConfig) -> i64 {
    cfg.token_ttl_secs + LEEWAY_SECS
}

/// The running control plane's shared state.
pub struct Server {
    store: Store,
    cfg: ServerConfig,
    kek: Kek,
    trust_domain: String,
    issuer: String,
    keys: ArcSwap<KeySet>,
    tls: ArcSwap<rustls::ServerConfig>,
    serving: Mutex<tls::ServingState>,
    auth_failures: DefaultKeyedRateLimiter<String>,
    lockouts: Mutex<HashMap<String, Instant>>,
    clients: Mutex<HashMap<String, (ClientRow, Instant)>>,
    external: Vec<(String, TokenVerifier)>,
    metrics: PrometheusHandle,
    tokens_issued: std::sync::atomic::AtomicU64,
    hub: dist::Hub,
    /// This process's chain of admin actions.
    admin_chain: admin_audit::AdminChain,
    /// Anomaly detection over stored audit batches.
    anomalies: anomaly::Detector,
    /// One policy impact or access report at a time: each reads a whole window.
    scans: tokio::sync::Semaphore,
    /// Signed-in dashboard browsers.
    sessions: dashboard::Sessions,
    /// The dashboard's access reports.
    reports: dashboard::Reports,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("trust_domain", &self.trust_domain)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// The process's Prometheus recorder handle (installed on first use), shared with proxies
/// running in the same process.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (an embedding program's); then ours
            // renders only what it recorded, which is nothing, and that is visible at /metrics.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// A started server: its address, and a way to stop it.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its base URL (`https://…`).
    pub url: String,
    /// Shared state (for in-process embedding and tests).
    pub server: Arc<Server>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting connections and waits for the accept loop to end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Waits until the server stops (it runs until shut down).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

impl Server {
    /// Opens the data directory and database, loads and opens the keys, binds the listener and
    /// starts serving.
    pub async fn start(cfg: ServerConfig, kek_env: Option<String>) -> Result<Running, ServerError> {
        let kek = Kek::load(&cfg.data_dir, kek_env, false)?;
        let store = Store::connect(&cfg.database_url()).await?;
        let trust_domain = store.setting(TRUST_DOMAIN_SETTING).await?.ok_or_else(|| {
            ServerError::Config(
                "database is not initialized: run `castellan server init`".to_owned(),
            )
        })?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| ServerError::Config(format!("listen on {}: {e}", cfg.listen)))?;
        let addr = listener.local_addr()?;
        let url = format!("https://{addr}");
        let issuer = cfg.issuer.clone().unwrap_or_else(|| url.clone());
        let now = unix_now();
        // Adoption of pre-MAC admin credentials happens once per data directory (a file the
        // database cannot touch) and once per database, and only for rows older than the
        // migration that introduced MACs.
        let adopted_marker = cfg.data_dir.join("admin-tokens-adopted");
        if !adopted_marker.exists() {
            admin::adopt_admin_tokens(&store, &kek).await?;
            std::fs::write(&adopted_marker, b"1\n")?;
        }
        let ks = keys::load(
            &store,
            &kek,
            &trust_domain,
            &issuer,
            now,
            publish_window(&cfg),
        )
        .await?;
        let mut external = Vec::new();
        for x in &cfg.external_issuers {
            let text = std::fs::read_to_string(&x.jwks_file)
                .map_err(|e| ServerError::Config(format!("{}: {e}", x.jwks_file.display())))?;
            let jwks = serde_json::from_str(&text)
                .map_err(|e| ServerError::Config(format!("{}: {e}", x.jwks_file.display())))?;
            let v = TokenVerifier::new(&x.issuer, &x.audience, &jwks)
                .map_err(|e| ServerError::Config(format!("{}: {e}", x.jwks_file.display())))?;
            external.push((x.issuer.clone(), v));
        }
        let (serving, tls_cfg) = tls::serving_config(&cfg, &trust_domain, addr, &ks, now)?;
        let per_minute = NonZeroU32::new(cfg.auth_failures_per_minute).unwrap_or(NonZeroU32::MIN);
        let server = Arc::new(Server {
            store,
            trust_domain,
            issuer,
            keys: ArcSwap::from_pointee(ks),
            tls: ArcSwap::from_pointee(tls_cfg),
            serving: Mutex::new(serving),
            auth_failures: RateLimiter::keyed(Quota::per_minute(per_minute)),
            lockouts: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            external,
            metrics: metrics_handle(),
            tokens_issued: std::sync::atomic::AtomicU64::new(0),
            hub: dist::Hub::new(),
            admin_chain: admin_audit::AdminChain::new(),
            anomalies: anomaly::Detector::default(),
            scans: tokio::sync::Semaphore::new(1),
            sessions: dashboard::Sessions::default(),
            reports: dashboard::Reports::default(),
            kek,
            cfg,
        });
        server.write_bundle()?;
        // The first distribution snapshot is read before any proxy can connect.
        match dist::load(&server).await {
            Ok(snap) => {
                server.hub.publish(snap);
            }
            Err(e) => {
                tracing::error!(error = %e, "reading the distribution snapshot failed; watchers wait for the next read")
            }
        }
        let (stop, stop_rx) = watch::channel(false);
        if let Some(addr) = server.cfg.metrics_listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| ServerError::Config(format!("metrics_listen {addr}: {e}")))?;
            tokio::spawn(http::serve_metrics(server.clone(), l, stop_rx.clone()));
        }
        if let Some(d) = &server.cfg.dashboard {
            let tls = tls::dashboard_config(&d.cert_file, &d.key_file)?;
            let l = tokio::net::TcpListener::bind(d.listen)
                .await
                .map_err(|e| ServerError::Config(format!("dashboard.listen {}: {e}", d.listen)))?;
            tokio::spawn(http::serve_dashboard(
                server.clone(),
                l,
                stop_rx.clone(),
                tls,
            ));
        }
        let task = tokio::spawn(http::serve(server.clone(), listener, stop_rx.clone()));
        tokio::spawn(reload_loop(Arc::downgrade(&server), stop_rx.clone()));
        tokio::spawn(dist::run_hub(Arc::downgrade(&server), stop_rx.clone()));
        tokio::spawn(alerts::run(
            Arc::downgrade(&server),
            server.cfg.alerts.clone(),
            stop_rx.clone(),
        ));
        // Histogram samples wait in the recorder until drained; drain them even if nobody scrapes.
        let (handle, mut upkeep_stop) = (server.metrics.clone(), stop_rx);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
                    _ = upkeep_stop.changed() => return,
                }
            }
        });
        let endpoint = serde_json::json!({
            "url": url,
            "ca_bundle": server.cfg.data_dir.join(BUNDLE_FILE),
            "trust_domain": server.trust_domain,
        });
        std::fs::write(
            server.cfg.data_dir.join(ENDPOINT_FILE),
            endpoint.to_string(),
        )?;
        tracing::info!(%url, trust_domain = %server.trust_domain, backend = server.store.backend_name(), "castellan server listening");
        Ok(Running {
            addr,
            url,
            server,
            stop,
            task,
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The `iss` of tokens this server issues.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The current trust bundle.
    pub fn bundle(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        self.keys.load().bundle.clone()
    }

    /// Access tokens issued since start (all grants).
    pub fn tokens_issued(&self) -> u64 {
        self.tokens_issued
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The published JWKS (active and still-live retired keys).
    pub fn jwks(&self) -> jsonwebtoken::jwk::JwkSet {
        self.keys.load().jwks.clone()
    }

    /// Whether `name` is a DNS name or IP address the control plane serves under (and so may
    /// never appear in a workload's SVID).
    pub(crate) fn is_own_name(&self, name: &str) -> bool {
        let addr = match self.serving.lock() {
            Ok(g) => g.addr,
            // Fail closed: treat every name as reserved if the state is unreadable.
            Err(_) => return true,
        };
        tls::is_serving_name(&self.cfg, addr, name)
    }

    /// The server's own SPIFFE ID (its serving certificate names it).
    pub fn spiffe_id(&self) -> Result<SpiffeId, ServerError> {
        SpiffeId::control_plane(&self.trust_domain)
            .map_err(|e| ServerError::Internal(e.to_string()))
    }

    fn write_bundle(&self) -> Result<(), ServerError> {
        let pem = keys::pem_bundle(&self.keys.load().bundle);
        let path = self.cfg.data_dir.join(BUNDLE_FILE);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(pem.as_str()) {
            let tmp = path.with_extension("pem.tmp");
            std::fs::write(&tmp, pem)?;
            std::fs::rename(tmp, path)?;
        }
        Ok(())
    }

    /// Re-reads keys from the store, renews the serving certificate when due, rewrites the
    /// bundle file.
    pub async fn reload(&self) -> Result<(), ServerError> {
        let now = unix_now();
        let ks = keys::load(
            &self.store,
            &self.kek,
            &self.trust_domain,
            &self.issuer,
            now,
            publish_window(&self.cfg),
        )
        .await?;
        let due = {
            let s = self
                .serving
                .lock()
                .map_err(|_| ServerError::Internal("lock poisoned".to_owned()))?;
            s.due(&ks, now)
        };
        if due {
            let addr = self
                .serving
                .lock()
                .map_err(|_| ServerError::Internal("lock poisoned".to_owned()))?
                .addr;
            let (serving, cfg) =
                tls::serving_config(&self.cfg, &self.trust_domain, addr, &ks, now)?;
            self.tls.store(Arc::new(cfg));
            *self
                .serving
                .lock()
                .map_err(|_| ServerError::Internal("lock poisoned".to_owned()))? = serving;
        } else if ks.bundle != self.keys.load().bundle {
            // Same serving certificate, new roots for client certificates.
            let s = self
                .serving
                .lock()
                .map_err(|_| ServerError::Internal("lock poisoned".to_owned()))?;
            self.tls.store(Arc::new(tls::rebuild(&s, &ks)?));
        }
        self.keys.store(Arc::new(ks));
        self.write_bundle()?;
        Ok(())
    }

    /// An SVID validator for the current bundle and every revoked serial, read now.
    async fn svid_validator(&self) -> Result<SvidValidator, ServerError> {
        let bundle = TrustBundle::new(&self.trust_domain, self.bundle())
            .map_err(|e| ServerError::Internal(e.to_string()))?;
        let mut v = SvidValidator::new(bundle);
        for serial in self.store.revoked_serials(unix_now()).await? {
            v.revoke(&serial);
        }
        Ok(v)
    }

    /// The SPIFFE ID of a gRPC caller's SVID (its TLS client certificate), validated with the
    /// bundle and the revocations as of now.
    pub(crate) async fn grpc_caller<T>(
        &self,
        req: &tonic::Request<T>,
    ) -> Result<SpiffeId, tonic::Status> {
        let chain = req
            .extensions()
            .get::<peer::PeerCerts>()
            .and_then(|p| p.0.clone())
            .ok_or_else(|| {
                tonic::Status::unauthenticated("an SVID (TLS client certificate) is required")
            })?;
        let validator = self.svid_validator().await.map_err(|e| {
            tracing::error!(error = %e, "internal error");
            tonic::Status::internal("internal error")
        })?;
        validator
            .validate(
                &chain,
                rustls_pki_types::UnixTime::now(),
                castellan_identity::SvidUsage::Client,
            )
            .map_err(|e| tonic::Status::unauthenticated(format!("client certificate refused: {e}")))
    }

    /// As [`Server::grpc_caller`], for callers that must be an enabled service: its name.
    pub(crate) async fn grpc_service_caller<T>(
        &self,
        req: &tonic::Request<T>,
    ) -> Result<String, tonic::Status> {
        let id = self.grpc_caller(req).await?;
        let service = id
            .service_name()
            .ok_or_else(|| {
                tonic::Status::permission_denied("only service identities may call this")
            })?
            .to_owned();
        match self.store.service(&service).await {
            Ok(r) if r.disabled_at.is_none() => Ok(service),
            Ok(_) => Err(tonic::Status::permission_denied("service is disabled")),
            Err(StoreError::NotFound(_)) => {
                Err(tonic::Status::permission_denied("unknown service"))
            }
            Err(e) => {
                tracing::error!(error = %e, "internal error");
                Err(tonic::Status::internal("internal error"))
            }
        }
    }

    /// An OAuth2 client, from a short-lived cache.
    async fn client(&self, id: &str) -> Result<ClientRow, StoreError> {
        if let Ok(cache) = self.clients.lock()
            && let Some((row, at)) = cache.get(id)
            && at.elapsed() < CLIENT_CACHE_TTL
        {
            return Ok(row.clone());
        }
        let row = self.store.client(id).await?;
        if let Ok(mut cache) = self.clients.lock() {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(id.to_owned(), (row.clone(), Instant::now()));
        }
        Ok(row)
    }

    fn forget_client(&self, id: &str) {
        if let Ok(mut cache) = self.clients.lock() {
            cache.remove(id);
        }
    }
}

async fn reload_loop(server: std::sync::Weak<Server>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RELOAD_EVERY) => {}
            _ = stop.changed() => return,
        }
        let Some(s) = server.upgrade() else { return };
        if let Err(e) = s.reload().await {
            tracing::error!(error = %e, "reloading keys failed; serving with the previous ones");
        }
        s.prune_auth_failures();
        if let Err(e) = s.store.purge_revoked_tokens(unix_now()).await {
            tracing::warn!(error = %e, "purging expired token revocations failed");
        }
    }
}
