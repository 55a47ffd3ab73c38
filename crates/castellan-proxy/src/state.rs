//! What a proxy enforces with, as last pushed by the control plane: the policy engine and its
//! revision, the trust bundle and revocations (inside the SVID validator), API-key hashes and
//! service endpoints. Every field swaps atomically; readers never wait.

use arc_swap::ArcSwap;
use castellan_identity::{SvidValidator, TrustBundle};
use castellan_policy::{Engine, PolicySet};
use castellan_proto::v1::WatchUpdate;
use rustls_pki_types::CertificateDer;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

/// Most bytes of verified tokens one cache keeps.
const VERIFIED_TOKENS_BYTES: usize = 2 * 1024 * 1024;

/// Tokens already verified, by their bytes, each with the last second it may be used: the
/// context tokens a sidecar accepted, the bearer tokens a gateway or decision point accepted.
/// Whoever fills it empties it when what the tokens were verified with changes.
#[derive(Debug)]
pub(crate) struct VerifiedTokens<T> {
    map: HashMap<String, (Arc<T>, i64)>,
    bytes: usize,
}

impl<T> Default for VerifiedTokens<T> {
    fn default() -> Self {
        VerifiedTokens {
            map: HashMap::new(),
            bytes: 0,
        }
    }
}

impl<T> VerifiedTokens<T> {
    /// The verified token, if kept and still usable at `now`.
    pub(crate) fn get(&self, token: &str, now: i64) -> Option<Arc<T>> {
        self.map
            .get(token)
            .filter(|(_, until)| now <= *until)
            .map(|(t, _)| t.clone())
    }

    pub(crate) fn insert(&mut self, token: &str, verified: Arc<T>, until: i64, now: i64) {
        if self.bytes + token.len() > VERIFIED_TOKENS_BYTES {
            // Expired tokens go first; if that is not enough, everything (re-verified on use).
            self.map.retain(|_, (_, u)| *u >= now);
            self.bytes = self.map.keys().map(String::len).sum();
            if self.bytes + token.len() > VERIFIED_TOKENS_BYTES {
                self.clear();
            }
        }
        if self
            .map
            .insert(token.to_owned(), (verified, until))
            .is_none()
        {
            self.bytes += token.len();
        }
    }

    pub(crate) fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }
}

/// Prefix of end-user API keys.
pub const API_KEY_PREFIX: &str = "cak_";

/// An end user an API key authenticates.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeyUser {
    /// Key id.
    pub key_id: String,
    /// The user.
    pub user: String,
    /// Roles.
    pub roles: Vec<String>,
    /// Claims.
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// Services it may be used for (empty: any).
    pub services: Vec<String>,
    /// Route prefixes it may be used for (empty: any).
    pub prefixes: Vec<String>,
    /// Expiry, Unix seconds (0: none).
    pub expires_at: i64,
}

impl ApiKeyUser {
    /// Why the key may not be used for `service` at normalized `path` at `now`, if it may not.
    pub fn refusal(&self, service: &str, path: &str, now: i64) -> Option<&'static str> {
        if self.expires_at > 0 && now >= self.expires_at {
            return Some("API key expired");
        }
        if !self.services.is_empty() && !self.services.iter().any(|s| s == service) {
            return Some("API key not valid for this service");
        }
        let under = |p: &String| {
            path == p
                || path
                    .strip_prefix(p.as_str())
                    .is_some_and(|rest| p.ends_with('/') || rest.starts_with('/'))
        };
        if !self.prefixes.is_empty() && !self.prefixes.iter().any(under) {
            return Some("API key not valid for this path");
        }
        None
    }
}

/// Castellan tokens that must be refused though their signature is good.
#[derive(Debug, Default)]
struct TokenRevocations {
    jtis: HashSet<String>,
    clients: HashSet<String>,
}

/// The enforcement state.
#[derive(Debug)]
pub struct State {
    trust_domain: String,
    /// The policy engine.
    pub engine: Engine,
    revision: AtomicI64,
    validator: ArcSwap<SvidValidator>,
    bundle: ArcSwap<Vec<CertificateDer<'static>>>,
    revoked: Mutex<Vec<Vec<u8>>>,
    disabled: ArcSwap<HashSet<String>>,
    api_keys: ArcSwap<HashMap<Vec<u8>, Arc<ApiKeyUser>>>,
    /// Revoked (unexpired) castellan token ids and disabled OAuth2 clients.
    token_revocations: ArcSwap<TokenRevocations>,
    endpoints: ArcSwap<HashMap<String, Vec<SocketAddr>>>,
    specs: ArcSwap<HashMap<String, Arc<castellan_openapi::ApiSpec>>>,
    recent: Mutex<std::collections::VecDeque<RecentDecision>>,
    /// Context-token signers already validated, by token header; emptied with every bundle or
    /// revocation change.
    context_signers: Mutex<HashMap<String, castellan_identity::ValidatedSigner>>,
    /// Context tokens already verified, by their bytes: a token reused by its signer (for half
    /// its lifetime) is verified once, not per request. Emptied with `context_signers` on any
    /// bundle or revocation change; who presents a token is still checked on every request.
    verified_contexts: Mutex<VerifiedTokens<castellan_identity::UserContext>>,
    /// Bumped with every bundle or revocation change: open connections re-check their peer.
    changes: tokio::sync::watch::Sender<u64>,
}

/// A decision this proxy made, kept briefly for operators and the demo (the audit trail is the
/// durable record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentDecision {
    /// Its id (also in the response and the problem JSON).
    pub decision_id: String,
    /// allow or deny.
    pub decision: String,
    /// The deciding rule, if any.
    pub rule: Option<String>,
    /// Why (matched-allow, no-matching-allow, …).
    pub reason: String,
    /// Status sent.
    pub status: u16,
}

/// How many recent decisions are kept.
const RECENT: usize = 4096;

impl State {
    /// Empty state (deny everything) trusting `bundle`.
    pub(crate) fn new(
        trust_domain: &str,
        bundle: Vec<CertificateDer<'static>>,
    ) -> Result<State, crate::ProxyError> {
        let v = SvidValidator::new(
            TrustBundle::new(trust_domain, bundle.clone())
                .map_err(|e| crate::ProxyError::Identity(e.to_string()))?,
        );
        Ok(State {
            trust_domain: trust_domain.to_owned(),
            engine: Engine::new(PolicySet::empty()),
            revision: AtomicI64::new(0),
            validator: ArcSwap::from_pointee(v),
            bundle: ArcSwap::from_pointee(bundle),
            revoked: Mutex::new(Vec::new()),
            disabled: ArcSwap::from_pointee(HashSet::new()),
            api_keys: ArcSwap::from_pointee(HashMap::new()),
            token_revocations: ArcSwap::from_pointee(TokenRevocations::default()),
            endpoints: ArcSwap::from_pointee(HashMap::new()),
            specs: ArcSwap::from_pointee(HashMap::new()),
            recent: Mutex::new(std::collections::VecDeque::with_capacity(RECENT)),
            context_signers: Mutex::new(HashMap::new()),
            verified_contexts: Mutex::new(VerifiedTokens::default()),
            changes: tokio::sync::watch::Sender::new(0),
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// A receiver told of every bundle or revocation change (its value is a generation
    /// number).
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The current generation of the bundle and revocations.
    pub(crate) fn generation(&self) -> u64 {
        *self.changes.borrow()
    }

    /// The SVID validator in force (bundle + revocations).
    pub fn validator(&self) -> Arc<SvidValidator> {
        self.validator.load_full()
    }

    /// The bundle in force.
    pub fn bundle(&self) -> Arc<Vec<CertificateDer<'static>>> {
        self.bundle.load_full()
    }

    /// The policy revision in force (0: none yet, everything denied).
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Whether a service was disabled.
    pub fn is_disabled(&self, service: &str) -> bool {
        self.disabled.load().contains(service)
    }

    /// The user an API key (its SHA-256) authenticates.
    pub fn api_key(&self, hash: &[u8]) -> Option<Arc<ApiKeyUser>> {
        self.api_keys.load().get(hash).cloned()
    }

    /// Whether a castellan token (its `jti`, its `client_id`) was revoked or its client
    /// disabled, as of the last push.
    pub fn is_token_revoked(&self, jti: Option<&str>, client_id: Option<&str>) -> bool {
        let r = self.token_revocations.load();
        jti.is_some_and(|j| r.jtis.contains(j)) || client_id.is_some_and(|c| r.clients.contains(c))
    }

    /// A service's compiled OpenAPI document, if it registered one.
    pub fn spec(&self, service: &str) -> Option<Arc<castellan_openapi::ApiSpec>> {
        self.specs.load().get(service).cloned()
    }

    /// Endpoints of a service.
    pub fn endpoints(&self, service: &str) -> Vec<SocketAddr> {
        self.endpoints
            .load()
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    /// Verifies a user-context token, validating each signer's chain once per bundle and
    /// revocation state, and each token once until it expires or the bundle or revocations
    /// change.
    pub fn verify_context(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Arc<castellan_identity::UserContext>, castellan_identity::ContextError> {
        if let Some(ctx) = self
            .verified_contexts
            .lock()
            .ok()
            .and_then(|c| c.get(token, now))
        {
            return Ok(ctx);
        }
        let validator = self.validator();
        let header = castellan_identity::context_header(token)?;
        let cached = self
            .context_signers
            .lock()
            .ok()
            .and_then(|c| c.get(header).cloned());
        let signer = match cached {
            Some(s) => s,
            None => {
                let s = castellan_identity::validate_context_signer(token, &validator, now)?;
                if let Ok(mut c) = self.context_signers.lock()
                    && Arc::ptr_eq(&validator, &self.validator.load())
                {
                    if c.len() >= 1024 {
                        c.clear();
                    }
                    c.insert(header.to_owned(), s.clone());
                }
                s
            }
        };
        let ctx = Arc::new(castellan_identity::verify_context_signed_by(
            token,
            &signer,
            &self.trust_domain,
            now,
        )?);
        // Kept only for a signer that may mint context: any workload can sign a token with
        // its own SVID, and those are refused on every use — they must not fill the cache.
        // INVARIANT: kept only if the validator it was checked under is still the one in force
        // (`rebuild_validator` installs a new one before it empties this cache).
        if self.engine.current().may_mint_context(ctx.signer.as_str())
            && let Ok(mut c) = self.verified_contexts.lock()
            && Arc::ptr_eq(&validator, &self.validator.load())
        {
            c.insert(token, ctx.clone(), ctx.usable_until(&signer), now);
        }
        Ok(ctx)
    }

    pub(crate) fn remember(&self, d: RecentDecision) {
        if let Ok(mut r) = self.recent.lock() {
            if r.len() == RECENT {
                r.pop_front();
            }
            r.push_back(d);
        }
    }

    /// The latest decision this proxy made, if any.
    pub fn last_decision(&self) -> Option<RecentDecision> {
        self.recent.lock().ok()?.back().cloned()
    }

    /// A recent decision by id.
    pub fn recent_decision(&self, decision_id: &str) -> Option<RecentDecision> {
        self.recent
            .lock()
            .ok()?
            .iter()
            .rev()
            .find(|d| d.decision_id == decision_id)
            .cloned()
    }

    fn rebuild_validator(&self) {
        let bundle = self.bundle.load_full();
        match TrustBundle::new(&self.trust_domain, bundle.to_vec()) {
            Ok(b) => {
                let mut v = SvidValidator::new(b);
                if let Ok(r) = self.revoked.lock() {
                    for s in r.iter() {
                        v.revoke(s);
                    }
                }
                // INVARIANT: cleared under the same change that installs the new validator, so a
                // signer revoked by this update is validated again (and refused).
                if let Ok(mut c) = self.context_signers.lock() {
                    self.validator.store(Arc::new(v));
                    c.clear();
                }
                if let Ok(mut c) = self.verified_contexts.lock() {
                    c.clear();
                }
                self.changes.send_modify(|g| *g += 1);
            }
            Err(e) => {
                tracing::error!(error = %e, "pushed trust bundle refused; keeping the previous one")
            }
        }
    }

    /// Applies one pushed update; returns whether the policy revision changed.
    pub(crate) fn apply(&self, u: WatchUpdate) -> bool {
        let mut validator_dirty = false;
        if !u.trust_bundle.is_empty() {
            self.bundle.store(Arc::new(
                u.trust_bundle
                    .into_iter()
                    .map(CertificateDer::from)
                    .collect(),
            ));
            validator_dirty = true;
        }
        if !u.revocations.is_empty() {
            let mut disabled = (**self.disabled.load()).clone();
            if let Ok(mut r) = self.revoked.lock() {
                for ev in &u.revocations {
                    match ev.kind.as_str() {
                        "certificate" => match castellan_audit::unhex(&ev.subject) {
                            Some(serial) => r.push(serial),
                            None => {
                                tracing::error!(subject = %ev.subject, "unparsable revoked serial")
                            }
                        },
                        "service" => {
                            disabled.insert(ev.subject.clone());
                        }
                        other => tracing::warn!(kind = other, "unknown revocation kind"),
                    }
                }
            }
            // INVARIANT: stored before the validator is rebuilt, which announces the change:
            // connections re-checking on that announcement see the new disabled set.
            self.disabled.store(Arc::new(disabled));
            validator_dirty = true;
            tracing::info!(count = u.revocations.len(), "revocations received");
        }
        if validator_dirty {
            self.rebuild_validator();
        }
        if let Some(keys) = u.api_keys {
            let map = keys
                .keys
                .into_iter()
                .map(|k| {
                    let claims = k
                        .claims
                        .into_iter()
                        .map(|(n, v)| (n, serde_json::Value::String(v)))
                        .collect();
                    (
                        k.key_hash,
                        Arc::new(ApiKeyUser {
                            key_id: k.key_id,
                            user: k.user,
                            roles: k.roles,
                            claims,
                            services: k.services,
                            prefixes: k.prefixes,
                            expires_at: k.expires_at,
                        }),
                    )
                })
                .collect();
            self.api_keys.store(Arc::new(map));
        }
        if let Some(eps) = u.endpoints {
            let mut map: HashMap<String, Vec<SocketAddr>> = HashMap::new();
            for e in eps.endpoints {
                if let Ok(a) = e.address.parse() {
                    map.entry(e.service).or_default().push(a);
                }
            }
            self.endpoints.store(Arc::new(map));
        }
        if let Some(t) = u.token_revocations {
            self.token_revocations.store(Arc::new(TokenRevocations {
                jtis: t.revoked_jtis.into_iter().collect(),
                clients: t.disabled_clients.into_iter().collect(),
            }));
        }
        if let Some(specs) = u.api_specs {
            let mut map = HashMap::new();
            for (service, text) in specs.specs {
                match serde_json::from_str(&text)
                    .map_err(|e| e.to_string())
                    .and_then(|doc| castellan_openapi::ApiSpec::compile(&doc))
                {
                    Ok(spec) => {
                        map.insert(service, Arc::new(spec));
                    }
                    Err(e) => {
                        tracing::error!(%service, error = %e, "pushed OpenAPI document refused; requests to it are not validated")
                    }
                }
            }
            self.specs.store(Arc::new(map));
        }
        let mut changed = false;
        if let Some(p) = u.policy {
            let mut files: Vec<(String, String)> = p.files.into_iter().collect();
            files.sort();
            match PolicySet::from_sources(files.iter().map(|(n, t)| (n.as_str(), t.as_str()))) {
                Ok(set) if set.trust_domain() == self.trust_domain => {
                    self.engine.swap(set);
                    self.revision.store(p.revision, Ordering::Release);
                    metrics::gauge!("castellan_proxy_policy_revision").set(p.revision as f64);
                    tracing::info!(revision = p.revision, hash = %p.content_hash, "policy revision in force");
                    changed = true;
                }
                Ok(set) => tracing::error!(
                    revision = p.revision,
                    trust_domain = set.trust_domain(),
                    "pushed policy is for another trust domain; keeping the previous revision"
                ),
                Err(e) => {
                    tracing::error!(revision = p.revision, error = %e, "pushed policy does not load; keeping the previous revision")
                }
            }
        }
        changed
    }
}
