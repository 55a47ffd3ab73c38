//! Push distribution: a snapshot of everything proxies enforce with (policy revision,
//! revocations, API-key hashes, endpoints, trust bundle), re-read whenever something changes —
//! here, or on another replica (PostgreSQL LISTEN/NOTIFY) — and streamed to every watching proxy
//! as ordered updates.

use crate::{Server, ServerError, unix_now};
use castellan_proto::v1::distribution_server::{Distribution, DistributionServer};
use castellan_proto::v1::{
    ApiKey, ApiKeys, Endpoint, Endpoints, PolicyUpdate, ProxyReport, ReportAck, Revocation,
    WatchRequest, WatchUpdate,
};
use castellan_store::{ApiKeyRow, PolicyRevision, ProxyRow, RevocationEvent, StoreError};
use rustls_pki_types::CertificateDer;
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};
use tonic::{Request, Response, Status};

/// The PostgreSQL channel replicas notify each other on.
const CHANNEL: &str = "castellan_changes";
/// Re-read even without a notification, in case one was lost.
const RESYNC_EVERY: Duration = Duration::from_secs(5);
/// A proxy that has not reported for this long is not an endpoint.
const ENDPOINT_STALE_SECS: i64 = 120;

/// Everything proxies enforce with, as of one read.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Snapshot {
    pub(crate) policy: Option<Arc<PolicyRevision>>,
    pub(crate) revocations: Vec<RevocationEvent>,
    pub(crate) api_keys: Vec<ApiKeyRow>,
    pub(crate) endpoints: Vec<(String, String)>,
    pub(crate) bundle: Vec<CertificateDer<'static>>,
    pub(crate) specs: Vec<(String, String)>,
    /// Revoked, unexpired token ids.
    pub(crate) revoked_tokens: Vec<String>,
    /// Disabled OAuth2 clients.
    pub(crate) disabled_clients: Vec<String>,
}

/// Fans changes out to watchers.
#[derive(Debug)]
pub(crate) struct Hub {
    tx: watch::Sender<Arc<Snapshot>>,
    poke: Notify,
}

impl Hub {
    pub(crate) fn new() -> Hub {
        Hub {
            tx: watch::Sender::new(Arc::new(Snapshot::default())),
            poke: Notify::new(),
        }
    }

    pub(crate) fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }
}

async fn load(s: &Server) -> Result<Snapshot, StoreError> {
    let now = unix_now();
    let mut endpoints: Vec<(String, String)> = s
        .store
        .proxies()
        .await?
        .into_iter()
        .filter(|p| {
            p.mode == "sidecar"
                && now - p.last_contact < ENDPOINT_STALE_SECS
                && !p.address.is_empty()
        })
        .map(|p| (p.service, p.address))
        .collect();
    endpoints.sort();
    endpoints.dedup();
    Ok(Snapshot {
        policy: s.store.latest_policy_revision().await?.map(Arc::new),
        revocations: s.store.revocations_since(0).await?,
        api_keys: s.store.active_api_keys().await?,
        endpoints,
        bundle: s.bundle(),
        specs: s.store.service_specs().await?,
        revoked_tokens: s.store.revoked_token_ids(now).await?,
        disabled_clients: s.store.disabled_client_ids().await?,
    })
}

/// Re-reads the snapshot whenever poked (locally or by another replica) or every few seconds.
pub(crate) async fn run_hub(server: Weak<Server>, mut stop: watch::Receiver<bool>) {
    let pg_listener = match server
        .upgrade()
        .and_then(|s| s.store.postgres_pool().cloned())
    {
        Some(pool) => match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(mut l) => match l.listen(CHANNEL).await {
                Ok(()) => Some(l),
                Err(e) => {
                    tracing::error!(error = %e, "LISTEN failed; changes from other replicas arrive only by resync");
                    None
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "LISTEN connection failed; changes from other replicas arrive only by resync");
                None
            }
        },
        None => None,
    };
    let (note_tx, mut note_rx) = mpsc::channel::<()>(1);
    if let Some(mut l) = pg_listener {
        tokio::spawn(async move {
            loop {
                match l.recv().await {
                    Ok(_) => {
                        let _ = note_tx.try_send(());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                if note_tx.is_closed() {
                    return;
                }
            }
        });
    }
    loop {
        let Some(s) = server.upgrade() else { return };
        match load(&s).await {
            Ok(snap) => {
                s.hub.tx.send_if_modified(|cur| {
                    if **cur == snap {
                        false
                    } else {
                        *cur = Arc::new(snap);
                        true
                    }
                });
            }
            Err(e) => tracing::error!(error = %e, "reading the distribution snapshot failed"),
        }
        // Holding `s` while waiting is fine: a dropped stop sender ends the loop too.
        tokio::select! {
            _ = s.hub.poke.notified() => {}
            _ = note_rx.recv() => {}
            _ = tokio::time::sleep(RESYNC_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

impl Server {
    /// Something proxies must learn changed: re-read now, and tell the other replicas.
    pub(crate) async fn changed(&self) {
        self.hub.poke.notify_one();
        if let Some(pool) = self.store.postgres_pool()
            && let Err(e) = sqlx::query(&format!("NOTIFY {CHANNEL}"))
                .execute(pool)
                .await
        {
            tracing::warn!(error = %e, "NOTIFY failed; other replicas catch up at their next resync");
        }
    }
}

fn policy_update(p: &PolicyRevision) -> PolicyUpdate {
    let files: HashMap<String, String> = serde_json::from_str(&p.files).unwrap_or_default();
    PolicyUpdate {
        revision: p.rev,
        content_hash: p.content_hash.clone(),
        files,
    }
}

fn api_keys(keys: &[ApiKeyRow]) -> ApiKeys {
    ApiKeys {
        keys: keys
            .iter()
            .map(|k| ApiKey {
                key_id: k.key_id.clone(),
                key_hash: k.key_hash.clone(),
                user: k.username.clone(),
                roles: serde_json::from_str(&k.roles).unwrap_or_default(),
                claims: serde_json::from_str::<BTreeMap<String, String>>(&k.claims)
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
            })
            .collect(),
    }
}

/// What `now` adds to what `before` had (everything, for the first update).
fn diff(before: Option<&Snapshot>, now: &Snapshot) -> Option<WatchUpdate> {
    let mut u = WatchUpdate::default();
    let mut any = before.is_none();
    let rev = |s: &Snapshot| s.policy.as_ref().map(|p| p.rev);
    if before.is_none_or(|b| rev(b) != rev(now))
        && let Some(p) = &now.policy
    {
        u.policy = Some(policy_update(p));
        any = true;
    }
    let last_seq = before
        .and_then(|b| b.revocations.last())
        .map_or(0, |r| r.seq);
    u.revocations = now
        .revocations
        .iter()
        .filter(|r| r.seq > last_seq)
        .map(|r| Revocation {
            seq: r.seq,
            kind: r.kind.clone(),
            subject: r.subject.clone(),
        })
        .collect();
    any |= !u.revocations.is_empty();
    if before.is_none_or(|b| b.api_keys != now.api_keys) {
        u.api_keys = Some(api_keys(&now.api_keys));
        any = true;
    }
    if before.is_none_or(|b| b.endpoints != now.endpoints) {
        u.endpoints = Some(Endpoints {
            endpoints: now
                .endpoints
                .iter()
                .map(|(service, address)| Endpoint {
                    service: service.clone(),
                    address: address.clone(),
                })
                .collect(),
        });
        any = true;
    }
    if before.is_none_or(|b| b.specs != now.specs) {
        u.api_specs = Some(castellan_proto::v1::ApiSpecs {
            specs: now.specs.iter().cloned().collect(),
        });
        any = true;
    }
    if before.is_none_or(|b| {
        b.revoked_tokens != now.revoked_tokens || b.disabled_clients != now.disabled_clients
    }) {
        u.token_revocations = Some(castellan_proto::v1::TokenRevocations {
            revoked_jtis: now.revoked_tokens.clone(),
            disabled_clients: now.disabled_clients.clone(),
        });
        any = true;
    }
    if before.is_none_or(|b| b.bundle != now.bundle) {
        u.trust_bundle = now.bundle.iter().map(|c| c.to_vec()).collect();
        any = true;
    }
    any.then_some(u)
}

pub(crate) fn service(s: Arc<Server>) -> DistributionServer<DistributionService> {
    DistributionServer::new(DistributionService { s }).max_decoding_message_size(64 * 1024)
}

pub(crate) struct DistributionService {
    s: Arc<Server>,
}

impl DistributionService {
    /// The calling proxy's service, from its SVID (checked against revocations and disables).
    async fn caller<T>(&self, req: &Request<T>) -> Result<String, Status> {
        self.s.grpc_service_caller(req).await
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal("internal error")
}

type UpdateStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<WatchUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Distribution for DistributionService {
    type WatchStream = UpdateStream;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<UpdateStream>, Status> {
        let service = self.caller(&req).await?;
        let proxy_id = req.into_inner().proxy_id;
        let mut rx = self.s.hub.tx.subscribe();
        let (tx, out) = mpsc::channel(16);
        metrics::gauge!("castellan_server_watchers").increment(1.0);
        tracing::info!(%service, %proxy_id, "proxy watching");
        tokio::spawn(async move {
            let mut last: Option<Arc<Snapshot>> = None;
            let mut sequence = 0u64;
            loop {
                let snap = rx.borrow_and_update().clone();
                if let Some(mut u) = diff(last.as_deref(), &snap) {
                    sequence += 1;
                    u.sequence = sequence;
                    if tx.send(Ok(u)).await.is_err() {
                        break;
                    }
                }
                last = Some(snap);
                tokio::select! {
                    r = rx.changed() => if r.is_err() { break },
                    _ = tx.closed() => break,
                }
            }
            metrics::gauge!("castellan_server_watchers").decrement(1.0);
            tracing::info!(%service, %proxy_id, "proxy stopped watching");
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn report(&self, req: Request<ProxyReport>) -> Result<Response<ReportAck>, Status> {
        let service = self.caller(&req).await?;
        let r = req.into_inner();
        let printable = |s: &str| s.len() <= 128 && !s.chars().any(char::is_control);
        if r.proxy_id.is_empty()
            || !printable(&r.proxy_id)
            || !printable(&r.address)
            || !matches!(r.mode.as_str(), "sidecar" | "gateway")
        {
            return Err(Status::invalid_argument(
                "proxy_id, mode (sidecar|gateway) and address must be short and printable",
            ));
        }
        if !r.address.is_empty() && r.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument("address must be ip:port"));
        }
        // The row is keyed by (the caller's identity, proxy id): a report can only ever touch
        // rows of the identity on the connection. Ids per identity are capped and stale ones
        // expire, so a stolen key cannot flood the registry.
        let now = unix_now();
        self.s
            .store
            .expire_proxies(&service, now - self.s.cfg.proxy_expiry_secs)
            .await
            .map_err(internal)?;
        let (known, count) = self
            .s
            .store
            .proxy_presence(&service, &r.proxy_id)
            .await
            .map_err(internal)?;
        if !known && count >= self.s.cfg.max_proxies_per_identity {
            metrics::counter!("castellan_server_proxy_reports_refused_total", "reason" => "too-many-ids").increment(1);
            tracing::warn!(%service, proxy_id = %r.proxy_id, count, "proxy report refused: too many proxy ids for this identity");
            return Err(Status::resource_exhausted(format!(
                "identity {service} already has {count} proxies registered (max_proxies_per_identity)"
            )));
        }
        let endpoint_new = !self
            .s
            .hub
            .current()
            .endpoints
            .iter()
            .any(|(s, a)| *s == service && *a == r.address);
        self.s
            .store
            .report_proxy(&ProxyRow {
                proxy_id: r.proxy_id,
                service,
                mode: r.mode.clone(),
                address: r.address,
                revision: r.revision,
                cert_not_after: r.cert_not_after,
                last_contact: now,
            })
            .await
            .map_err(internal)?;
        if r.mode == "sidecar" && endpoint_new {
            self.s.changed().await;
        }
        Ok(Response::new(ReportAck {}))
    }
}

/// Hex SHA-256 of the policy files in name order: the revision's content hash.
pub(crate) fn content_hash(files: &BTreeMap<String, String>) -> Result<String, ServerError> {
    let json = serde_json::to_string(files).map_err(|e| ServerError::Internal(e.to_string()))?;
    Ok(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, json.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}
