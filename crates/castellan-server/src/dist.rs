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
    /// False only for the placeholder before the first read: never sent to a proxy (it would
    /// wipe the API keys, endpoints and specs a proxy holds).
    pub(crate) loaded: bool,
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
    /// Every service's registration: what its proxies are sent is decided from it.
    pub(crate) services: Vec<castellan_store::ServiceRow>,
    /// The policy revision's files split into documents with their kind and service, parsed
    /// once here rather than per watcher.
    pub(crate) policy_docs: Vec<(String, Vec<PolicyDoc>)>,
}

/// One YAML document of a policy file: its text, `kind` and `spec.service`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PolicyDoc {
    text: String,
    kind: Option<String>,
    service: Option<String>,
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

    /// Makes `snap` current if it differs; watchers are woken.
    pub(crate) fn publish(&self, snap: Snapshot) {
        self.tx.send_if_modified(|cur| {
            if **cur == snap {
                false
            } else {
                *cur = Arc::new(snap);
                true
            }
        });
    }

    pub(crate) fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }
}

pub(crate) async fn load(s: &Server) -> Result<Snapshot, StoreError> {
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
    let policy = s.store.latest_policy_revision().await?.map(Arc::new);
    Ok(Snapshot {
        loaded: true,
        revocations: s.store.revocations_since(0).await?,
        api_keys: s.store.active_api_keys(now).await?,
        endpoints,
        bundle: s.bundle(),
        specs: s.store.service_specs().await?,
        revoked_tokens: s.store.revoked_token_ids(now).await?,
        disabled_clients: s.store.disabled_client_ids().await?,
        services: s.store.services().await?,
        policy_docs: policy_docs_of(policy.as_deref()),
        policy,
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
            Ok(snap) => s.hub.publish(snap),
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
                services: k.services.split_whitespace().map(str::to_owned).collect(),
                prefixes: k.prefixes.split_whitespace().map(str::to_owned).collect(),
                expires_at: k.expires_at.unwrap_or(0),
            })
            .collect(),
    }
}

/// A policy file's YAML documents, split at `---` lines (at column 0, where YAML puts document
/// markers), each with its `kind` and `spec.service`.
fn policy_documents(text: &str) -> Vec<PolicyDoc> {
    let mut docs: Vec<String> = vec![String::new()];
    for line in text.split_inclusive('\n') {
        let is_marker = (line.starts_with("---") || line.starts_with("..."))
            && line
                .get(3..)
                .unwrap_or_default()
                .chars()
                .next()
                .is_none_or(char::is_whitespace);
        if is_marker && docs.last().is_some_and(|d| !d.trim().is_empty()) {
            // The marker is dropped (documents are re-joined with one); what follows it on
            // its line belongs to the new document.
            docs.push(line.get(3..).unwrap_or_default().to_owned());
            continue;
        }
        if let Some(d) = docs.last_mut() {
            d.push_str(line);
        }
    }
    docs.into_iter()
        .filter(|d| !d.trim().is_empty() && d.trim() != "---")
        .map(|d| {
            let parsed = yaml_rust2::YamlLoader::load_from_str(&d).ok();
            let doc = parsed.as_ref().and_then(|v| v.first());
            let kind = doc.and_then(|y| y["kind"].as_str()).map(str::to_owned);
            let service = doc
                .and_then(|y| y["spec"]["service"].as_str())
                .map(str::to_owned);
            PolicyDoc {
                text: d,
                kind,
                service,
            }
        })
        .collect()
}

fn policy_docs_of(p: Option<&PolicyRevision>) -> Vec<(String, Vec<PolicyDoc>)> {
    let Some(p) = p else { return Vec::new() };
    let files: BTreeMap<String, String> = serde_json::from_str(&p.files).unwrap_or_default();
    files
        .into_iter()
        .map(|(name, text)| {
            let docs = policy_documents(&text);
            (name, docs)
        })
        .collect()
}

/// The policy files a proxy of `me` enforces with: the mesh config, and the documents of the
/// services it decides for. Other services' rules never leave the control plane.
fn policy_view(
    p: &PolicyRevision,
    docs: &[(String, Vec<PolicyDoc>)],
    decides_for: &dyn Fn(&str) -> bool,
) -> PolicyUpdate {
    let mut out = HashMap::new();
    for (name, file_docs) in docs {
        let kept: Vec<&str> = file_docs
            .iter()
            .filter(|d| match d.kind.as_deref() {
                Some("MeshConfig") => true,
                _ => d.service.as_deref().is_some_and(decides_for),
            })
            .map(|d| d.text.as_str())
            .collect();
        if !kept.is_empty() {
            out.insert(name.clone(), kept.join("\n---\n"));
        }
    }
    PolicyUpdate {
        revision: p.rev,
        content_hash: p.content_hash.clone(),
        files: out,
    }
}

/// What the proxies of service `me` are sent, decided from its registration (never from what
/// a proxy says about itself): a sidecar gets its own service's policy and spec, the endpoints
/// of its upstreams, and no credentials; a gateway or decision point gets the policies, specs
/// and endpoints of the services it routes to, API-key hashes and token revocations.
fn view_for(s: &Snapshot, me: &str) -> View {
    let reg = s.services.iter().find(|r| r.name == me);
    let edge = reg.is_some_and(|r| matches!(r.kind.as_str(), "gateway" | "decision"));
    let reaches: Vec<String> = reg
        .map(|r| r.reaches().into_iter().map(str::to_owned).collect())
        .unwrap_or_default();
    let decides_for = |svc: &str| svc == me || (edge && reaches.iter().any(|r| r == svc));
    View {
        policy: s
            .policy
            .as_ref()
            .map(|p| policy_view(p, &s.policy_docs, &decides_for)),
        revocations: s.revocations.clone(),
        api_keys: if edge { s.api_keys.clone() } else { Vec::new() },
        endpoints: s
            .endpoints
            .iter()
            .filter(|(svc, _)| reaches.iter().any(|r| r == svc))
            .cloned()
            .collect(),
        bundle: s.bundle.clone(),
        specs: s
            .specs
            .iter()
            .filter(|(svc, _)| decides_for(svc))
            .cloned()
            .collect(),
        revoked_tokens: if edge {
            s.revoked_tokens.clone()
        } else {
            Vec::new()
        },
        disabled_clients: if edge {
            s.disabled_clients.clone()
        } else {
            Vec::new()
        },
    }
}

/// One proxy's share of a [`Snapshot`].
#[derive(Debug, Default, PartialEq)]
struct View {
    policy: Option<PolicyUpdate>,
    revocations: Vec<RevocationEvent>,
    api_keys: Vec<ApiKeyRow>,
    endpoints: Vec<(String, String)>,
    bundle: Vec<CertificateDer<'static>>,
    specs: Vec<(String, String)>,
    revoked_tokens: Vec<String>,
    disabled_clients: Vec<String>,
}

/// What `now` adds to what `before` had (everything, for the first update).
fn diff(before: Option<&View>, now: &View) -> Option<WatchUpdate> {
    let mut u = WatchUpdate::default();
    let mut any = before.is_none();
    if before.is_none_or(|b| b.policy != now.policy)
        && let Some(p) = &now.policy
    {
        u.policy = Some(p.clone());
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
            let mut last: Option<View> = None;
            let mut sequence = 0u64;
            // A watcher that arrives before the first read waits for it.
            if rx.wait_for(|s| s.loaded).await.is_err() {
                metrics::gauge!("castellan_server_watchers").decrement(1.0);
                return;
            }
            loop {
                let snap = rx.borrow_and_update().clone();
                let view = view_for(&snap, &service);
                if let Some(mut u) = diff(last.as_ref(), &view) {
                    sequence += 1;
                    u.sequence = sequence;
                    if tx.send(Ok(u)).await.is_err() {
                        break;
                    }
                }
                last = Some(view);
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
                service: service.clone(),
                mode: r.mode.clone(),
                address: r.address,
                revision: r.revision,
                cert_not_after: r.cert_not_after,
                last_contact: now,
            })
            .await
            .map_err(internal)?;
        // Only proxies registered to hold API keys can have seen them used.
        let edge = self
            .s
            .hub
            .current()
            .services
            .iter()
            .any(|x| x.name == service && matches!(x.kind.as_str(), "gateway" | "decision"));
        if edge && !r.api_keys_used.is_empty() {
            let uses: Vec<(String, i64)> = r
                .api_keys_used
                .iter()
                .take(10_000)
                .map(|(k, t)| (k.clone(), (*t).min(now)))
                .collect();
            self.s.store.api_keys_used(&uses).await.map_err(internal)?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_files_split_into_documents_by_service() {
        let text = "# orders and payments\napiVersion: castellan/v1\nkind: AccessPolicy\nmetadata: {name: a}\nspec:\n  service: orders\n  rules: []\n---\napiVersion: castellan/v1\nkind: AccessPolicy\nmetadata: {name: b}\nspec: {service: payments, rules: []}\n--- \nkind: MeshConfig\nspec: {trustDomain: x}\n";
        let docs = policy_documents(text);
        let summary: Vec<(Option<&str>, Option<&str>)> = docs
            .iter()
            .map(|d| (d.kind.as_deref(), d.service.as_deref()))
            .collect();
        assert_eq!(
            summary,
            [
                (Some("AccessPolicy"), Some("orders")),
                (Some("AccessPolicy"), Some("payments")),
                (Some("MeshConfig"), None)
            ]
        );
        assert!(docs.iter().all(|d| !d.text.trim_start().starts_with("---")));
        assert!(!docs[0].text.contains("service: payments"));
        // A document end marker followed by a bare document splits too (yaml-rust2 accepts
        // that), so no document is ever classified by its neighbour.
        let ended =
            "kind: AccessPolicy\nspec: {service: a}\n...\nkind: AccessPolicy\nspec: {service: b}\n";
        let services: Vec<Option<String>> = policy_documents(ended)
            .into_iter()
            .map(|d| d.service)
            .collect();
        assert_eq!(services, [Some("a".to_owned()), Some("b".to_owned())]);
    }
}
