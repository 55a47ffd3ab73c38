//! The steps every enforcement point runs on a request, in one order: fail closed when stale →
//! normalize the headers and the target → route → authenticate the end user → check the API
//! key's scope → decide → rate-limit. The gateway and the sidecar's inbound side then validate
//! and forward; a decision point answers with the headers to add. A step that refuses says so
//! as a [`Refusal`], which each front end turns into its own response (HTTP problem JSON, an
//! ext_authz `DeniedHttpResponse`). Forwarding takes a [`Permit`], which only [`admit`] hands
//! out with an allowed request (and the sidecar's outbound side, whose destination decides):
//! nothing can forward before deciding.

use crate::http::{self as h, Body, problem};
use crate::sidecar::{Pending, decide, normalized_target};
use crate::{Inner, unix_now};
use castellan_identity::SpiffeId;
use castellan_policy::{Decision, Reason, User};
use hyper::header::{AUTHORIZATION, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Duration;

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

/// Why a request was refused, before the front end shapes the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// 400, 401, 403, 404, 429, 503 …
    pub(crate) status: StatusCode,
    /// The problem's `detail`.
    pub(crate) detail: String,
    /// 429: when to come back.
    pub(crate) retry_after: Option<Duration>,
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, detail: impl Into<String>) -> Refusal {
        Refusal {
            status,
            detail: detail.into(),
            retry_after: None,
        }
    }

    fn unauthorized(detail: &str) -> Refusal {
        Refusal::new(StatusCode::UNAUTHORIZED, detail)
    }

    /// The refusal of a policy denial: 400 for malformed requests, else 403.
    pub(crate) fn of_denial(d: &Decision) -> Refusal {
        if d.reason == Reason::MalformedRequest {
            Refusal::new(StatusCode::BAD_REQUEST, "malformed request")
        } else {
            Refusal::new(StatusCode::FORBIDDEN, "access denied by policy")
        }
    }

    /// Response headers that go with the status: the 401 challenge, the 429 wait.
    pub(crate) fn headers(&self) -> Vec<(hyper::header::HeaderName, HeaderValue)> {
        let mut out = Vec::new();
        if self.status == StatusCode::UNAUTHORIZED {
            out.push((
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"castellan\""),
            ));
        }
        if let Some(wait) = self.retry_after {
            let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                out.push((hyper::header::RETRY_AFTER, v));
            }
        }
        out
    }

    /// As an HTTP problem response.
    pub(crate) fn response(&self, did: &str) -> Response<Body> {
        let mut r = problem(self.status, &self.detail, did);
        for (k, v) in self.headers() {
            r.headers_mut().insert(k, v);
        }
        r
    }
}

/// Who is calling, as the transport established it.
#[derive(Debug, Clone)]
pub(crate) enum Caller {
    /// The edge: the request is decided as coming from this proxy's own identity, and an end
    /// user's credentials are required.
    Edge,
    /// A workload authenticated by mTLS (or named by a trusted proxy): the decision's source;
    /// an end user is authenticated when credentials are present.
    Workload(SpiffeId),
    /// A mesh peer calling a sidecar over mTLS: the decision's source; the end user, if any, is
    /// the one its context token names, accepted only under the token's sender constraint.
    /// What an edge says about the client (`X-Forwarded-*`, `Forwarded`) is kept only from a
    /// peer that may mint user context (MeshConfig `contextIssuers`).
    Peer(SpiffeId),
}

/// Leave to forward one request (consumed by `crate::forward`): only [`admit`] makes one, for
/// an allowed request, and the sidecar's outbound side, whose call the destination's sidecar
/// decides.
#[derive(Debug)]
pub(crate) struct Permit(());

impl Permit {
    /// The outbound hop of a sidecar: the app's call goes out under this workload's SVID, and
    /// the destination's sidecar decides on it.
    pub(crate) fn outbound() -> Permit {
        Permit(())
    }
}

/// The end user of a request, as policy saw it.
#[derive(Debug, Clone)]
pub(crate) struct EndUser {
    pub(crate) sub: String,
    pub(crate) roles: Vec<String>,
    /// The claims as the credential carried them (a JSON object).
    pub(crate) claims: Map<String, Value>,
    /// The delegation chain, first actor first.
    pub(crate) act: Vec<String>,
}

/// A request the pipeline let through.
#[derive(Debug)]
pub(crate) struct Admitted {
    /// Destination service.
    pub(crate) service: String,
    /// The normalized target (path and query) the decision was made on.
    pub(crate) target: String,
    /// The decision's source.
    pub(crate) source: SpiffeId,
    /// The authenticated end user, if any.
    pub(crate) user: Option<EndUser>,
    /// The verified context token a mesh peer presented (passed on to the app, so it can call
    /// on once on the user's behalf).
    pub(crate) context: Option<HeaderValue>,
    /// Leave to forward.
    pub(crate) permit: Permit,
}

/// The end user of a verified token: `sub`, `roles` (a list of strings, or absent), and every
/// other claim in its JSON shape — dropping a claim of an unexpected shape would make a deny
/// rule reading it fail open. `None` (→ 401) when `sub` or `roles` is malformed.
fn user_from_claims(claims: &Map<String, Value>) -> Option<EndUser> {
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
    Some(EndUser {
        sub,
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

/// The service the longest matching route prefix names.
pub(crate) fn route<'a>(inner: &'a Inner, path: &str) -> Option<&'a str> {
    inner
        .cfg
        .routes
        .iter()
        .filter(|(prefix, _)| route_matches(prefix, path))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, s)| s.as_str())
}

/// Whether the request carries an end-user credential.
fn has_credentials(headers: &hyper::HeaderMap) -> bool {
    headers.contains_key("x-api-key") || headers.contains_key(AUTHORIZATION)
}

/// Who the request's credentials say the user is, and the API key that authenticated them
/// (if one did: its scope is checked once the route is known).
fn authenticate(
    inner: &Inner,
    headers: &hyper::HeaderMap,
    client_cert: Option<&str>,
) -> Result<(EndUser, Option<Arc<crate::state::ApiKeyUser>>), Refusal> {
    let api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let cred = match (api_key, bearer) {
        (Some(_), Some(_)) => {
            return Err(Refusal::unauthorized(
                "send one credential, not both X-API-Key and Authorization",
            ));
        }
        (Some(k), None) | (None, Some(k)) => k,
        (None, None) => return Err(Refusal::unauthorized("credentials required")),
    };
    if cred.starts_with(crate::state::API_KEY_PREFIX) {
        let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cred.as_bytes());
        return match inner.state.api_key(hash.as_ref()) {
            Some(u) => Ok((
                EndUser {
                    sub: u.user.clone(),
                    roles: u.roles.clone(),
                    claims: u.claims.clone().into_iter().collect(),
                    act: Vec::new(),
                },
                Some(u),
            )),
            None => Err(Refusal::unauthorized("unknown or revoked API key")),
        };
    }
    let now = unix_now();
    if let Some(t) = castellan_token(inner, cred, client_cert, now) {
        let t = t?;
        return match user_from_claims(&t.claims) {
            Some(u) => Ok((u, None)),
            None => Err(Refusal::unauthorized("invalid token")),
        };
    }
    if let Some(t) = crate::oidc::verify(inner, cred, now) {
        return match user_from_claims(&t.claims) {
            Some(u) => Ok((u, None)),
            None => Err(Refusal::unauthorized("invalid token")),
        };
    }
    Err(Refusal::unauthorized("invalid token"))
}

/// `token` as a Castellan OAuth2 token: `None` when our keys do not verify it (it may be
/// another issuer's); else it is refused when revoked, of a disabled client (both as pushed,
/// checked on every use), or certificate-bound (RFC 8705 §3) to another certificate than
/// `client_cert`.
pub(crate) fn castellan_token(
    inner: &Inner,
    token: &str,
    client_cert: Option<&str>,
    now: i64,
) -> Option<Result<Arc<castellan_identity::VerifiedToken>, Refusal>> {
    let t = inner
        .bearer_tokens
        .verified(&inner.castellan_tokens, token, now)?;
    let claim = |k: &str| t.claims.get(k).and_then(Value::as_str);
    if inner
        .state
        .is_token_revoked(claim("jti"), claim("client_id"))
    {
        return Some(Err(Refusal::unauthorized("token revoked")));
    }
    if let Some(bound) = t
        .claims
        .get("cnf")
        .and_then(|c| c.get("x5t#S256"))
        .and_then(Value::as_str)
        && client_cert != Some(bound)
    {
        return Some(Err(Refusal::unauthorized(
            "certificate-bound token presented without its certificate",
        )));
    }
    Some(Ok(t))
}

/// Where the request goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Destination<'a> {
    /// By the routes (no match → 404).
    Routed,
    /// Named by a trusted caller (ext_authz `context_extensions`).
    Named(&'a str),
}

/// Takes a mesh peer's context token out of the headers (before they are normalized, which
/// removes every `x-castellan-*` field); sent twice → 400.
fn take_context(headers: &mut hyper::HeaderMap) -> Result<Option<HeaderValue>, Refusal> {
    if headers.get_all(h::CONTEXT_HEADER).iter().nth(1).is_some() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "header x-castellan-context sent more than once",
        ));
    }
    Ok(headers.remove(h::CONTEXT_HEADER))
}

/// The end user a mesh peer's context token names: verified (signature, signer's chain and
/// revocation, expiry), signed by a workload that may mint context, and presented by its signer
/// calling us or by its audience making one onward call.
fn context_user(
    inner: &Inner,
    raw: &HeaderValue,
    presenter: &SpiffeId,
    me: &SpiffeId,
) -> Result<EndUser, Refusal> {
    let token = raw
        .to_str()
        .map_err(|_| Refusal::unauthorized("invalid context token"))?;
    let ctx = inner.state.verify_context(token, unix_now()).map_err(|e| {
        tracing::info!(error = %e, "context token refused");
        Refusal::unauthorized("invalid context token")
    })?;
    if !inner
        .state
        .engine
        .current()
        .may_mint_context(ctx.signer.as_str())
    {
        tracing::info!(signer = %ctx.signer, "context token from a workload that may not mint context");
        return Err(Refusal::unauthorized(
            "context token signer may not mint context",
        ));
    }
    // A disabled service's tokens stop with its connections (its SVIDs fail every handshake,
    // but a token it signed may still be presented by its audience on an onward call).
    if ctx
        .signer
        .service_name()
        .is_some_and(|s| inner.state.is_disabled(s))
    {
        tracing::info!(signer = %ctx.signer, "context token signed by a disabled service");
        return Err(Refusal::unauthorized("context token signer is disabled"));
    }
    let act = ctx.presented_by(presenter, me).map_err(|e| {
        tracing::info!(error = %e, "context token refused");
        Refusal::unauthorized("context token may not be presented by this caller")
    })?;
    Ok(EndUser {
        sub: ctx.sub.clone(),
        roles: ctx.roles.clone(),
        claims: ctx.claims.clone(),
        act,
    })
}

/// Runs the steps from staleness to rate limits on `parts` (its headers are normalized in
/// place: what policy saw is what may be passed on). Fills `p` as it learns.
pub(crate) async fn admit(
    inner: &Inner,
    parts: &mut Parts,
    caller: Caller,
    destination: Destination<'_>,
    client_cert: Option<&str>,
    p: &mut Pending,
) -> Result<Admitted, Refusal> {
    if let Some(age) = inner.staleness() {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("policy is stale (no control-plane contact for {age} s): failing closed"),
        ));
    }
    let (context, edge) = match &caller {
        Caller::Peer(id) => (
            take_context(&mut parts.headers)?,
            !inner.state.engine.current().may_mint_context(id.as_str()),
        ),
        Caller::Edge | Caller::Workload(_) => (None, true),
    };
    h::normalize_headers(&mut parts.headers, edge)
        .map_err(|why| Refusal::new(StatusCode::BAD_REQUEST, why.to_string()))?;
    let Some(target) = normalized_target(parts) else {
        p.refusal = Some("malformed-request");
        return Err(Refusal::new(StatusCode::BAD_REQUEST, "malformed request"));
    };
    let path = target.split('?').next().unwrap_or("/");
    let service = match destination {
        Destination::Named(s) => s.to_owned(),
        Destination::Routed => route(inner, path)
            .ok_or_else(|| Refusal::new(StatusCode::NOT_FOUND, "no route"))?
            .to_owned(),
    };
    p.destination.clone_from(&service);
    p.path.clone_from(&target);
    let (source, authenticated) = match caller {
        Caller::Edge => (
            inner.identity.current().id.clone(),
            Some(authenticate(inner, &parts.headers, client_cert)?),
        ),
        Caller::Workload(id) => {
            let a = if has_credentials(&parts.headers) {
                Some(authenticate(inner, &parts.headers, client_cert)?)
            } else {
                None
            };
            (id, a)
        }
        Caller::Peer(id) => {
            let u = match &context {
                Some(raw) => Some((
                    context_user(inner, raw, &id, &inner.identity.current().id)?,
                    None,
                )),
                None => None,
            };
            (id, u)
        }
    };
    p.source = source.as_str().to_owned();
    let (user, api_key) = match authenticated {
        Some((u, k)) => (Some(u), k),
        None => (None, None),
    };
    // An API key scoped to services, route prefixes or a lifetime is refused elsewhere.
    if let Some(k) = &api_key {
        if let Some(why) = k.refusal(&service, path, unix_now()) {
            p.user = k.user.clone();
            p.refusal = Some("key-out-of-scope");
            return Err(Refusal::unauthorized(why));
        }
        inner.key_used(&k.key_id);
    }
    if let Some(u) = &user {
        p.user.clone_from(&u.sub);
        p.act.clone_from(&u.act);
    }
    let d = decide(
        inner,
        Some(&source),
        user.as_ref().map(|u| User {
            sub: Some(u.sub.clone()),
            roles: u.roles.clone(),
            claims: u.claims.clone().into_iter().collect(),
            act: u.act.clone(),
        }),
        &service,
        parts,
        p,
    );
    let refused = (!d.is_allowed()).then(|| Refusal::of_denial(&d));
    p.decision = Some(d);
    if let Some(r) = refused {
        return Err(r);
    }
    let who = crate::ratelimit::Who {
        source: &p.source,
        user: &p.user,
        api_key: api_key.as_ref().map_or("", |k| k.key_id.as_str()),
    };
    if let Err((limit, wait)) = inner
        .limits
        .check(inner, &service, parts.method.as_str(), path, &who)
        .await
    {
        p.rate_limited = Some(limit);
        return Err(Refusal {
            retry_after: Some(wait),
            ..Refusal::new(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded")
        });
    }
    Ok(Admitted {
        service,
        target,
        source,
        user,
        context,
        permit: Permit(()),
    })
}

/// Castellan OAuth2 tokens already verified (signature, issuer, audience, times), by their
/// bytes, until their `exp`: a client reusing its token pays one ES256 verification, not one
/// per request. Emptied whenever the control plane's keys are refreshed; revocation, a
/// disabled client and certificate binding are still checked on every use.
#[derive(Debug, Default)]
pub(crate) struct BearerCache {
    map: std::sync::Mutex<crate::state::VerifiedTokens<castellan_identity::VerifiedToken>>,
}

impl BearerCache {
    /// `token` verified with the keys in `keys` (`None`: they do not verify it).
    fn verified(
        &self,
        keys: &arc_swap::ArcSwap<Option<castellan_identity::TokenVerifier>>,
        token: &str,
        now: i64,
    ) -> Option<Arc<castellan_identity::VerifiedToken>> {
        if let Some(t) = self.map.lock().ok().and_then(|m| m.get(token, now)) {
            return Some(t);
        }
        let verifier = keys.load_full();
        let t = Arc::new(verifier.as_ref().as_ref()?.verify(token, now).ok()?);
        let exp = t.claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
        // INVARIANT: kept only if the keys it was verified with are still the ones in force
        // (`replace_keys` swaps them and empties this map under the same lock).
        if let Ok(mut m) = self.map.lock()
            && Arc::ptr_eq(&verifier, &keys.load())
        {
            // Used while `now < exp` (stricter than the verifier's leeway).
            m.insert(token, t.clone(), exp - 1, now);
        }
        Some(t)
    }

    /// Installs refreshed keys and forgets every token verified with the previous ones.
    pub(crate) fn replace_keys(
        &self,
        keys: &arc_swap::ArcSwap<Option<castellan_identity::TokenVerifier>>,
        new: castellan_identity::TokenVerifier,
    ) {
        match self.map.lock() {
            Ok(mut m) => {
                keys.store(Arc::new(Some(new)));
                m.clear();
            }
            Err(_) => keys.store(Arc::new(Some(new))),
        }
    }
}

/// A token is reused while it has at least this many seconds of its lifetime left.
const CONTEXT_REUSE_LEFT: i64 = CONTEXT_TTL / 2;
/// Most tokens kept for reuse (the cache is emptied beyond).
const CONTEXT_CACHE_MAX: usize = 50_000;

/// Context tokens minted recently, by everything they say: the same user (sub, roles, claims,
/// delegation) calling the same destination through us gets the same token while more than
/// half its lifetime is left — one ES256 signature per user and destination every 30 s, not
/// one per request. The token's `txn` then names the first of those requests; each request's
/// own decision id travels in `x-castellan-decision-id`.
#[derive(Debug, Default)]
pub(crate) struct ContextCache {
    map: std::sync::Mutex<std::collections::HashMap<String, (String, i64, usize)>>,
}

/// The user-context token for the hop to the destination: it names its destination, so only
/// we (calling it) or it (calling on once) may present it.
pub(crate) fn mint_context(inner: &Inner, a: &Admitted, did: &str) -> Result<String, Refusal> {
    let internal = || Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
    let Some(u) = &a.user else {
        return Err(internal());
    };
    let signer = inner.identity.signer();
    // The signer's identity is part of the key: a renewed SVID mints afresh.
    let signer_id = Arc::as_ptr(&signer) as usize;
    let key = format!(
        "{}\u{0}{}\u{0}{:?}\u{0}{}\u{0}{:?}",
        a.service,
        u.sub,
        u.roles,
        serde_json::to_string(&u.claims).unwrap_or_default(),
        u.act
    );
    let now = unix_now();
    if let Ok(m) = inner.context_tokens.map.lock()
        && let Some((t, minted, sid)) = m.get(&key)
        && *sid == signer_id
        && now - minted < CONTEXT_TTL - CONTEXT_REUSE_LEFT
    {
        return Ok(t.clone());
    }
    let aud =
        SpiffeId::for_service(inner.state.trust_domain(), &a.service).map_err(|_| internal())?;
    let token = signer
        .mint_with_act(
            aud.as_str(),
            &u.sub,
            &u.roles,
            &u.claims,
            &u.act,
            did,
            now,
            CONTEXT_TTL,
        )
        .map_err(|e| {
            tracing::error!(error = %e, "minting the context token failed");
            internal()
        })?;
    if let Ok(mut m) = inner.context_tokens.map.lock() {
        if m.len() >= CONTEXT_CACHE_MAX {
            m.clear();
        }
        m.insert(key, (token.clone(), now, signer_id));
    }
    Ok(token)
}

/// The `x-castellan-*` headers an admitted request carries onward: source, decision id, and
/// with an end user, the user and the context token.
pub(crate) fn onward_headers(
    inner: &Inner,
    a: &Admitted,
    did: &str,
) -> Result<Vec<(&'static str, String)>, Refusal> {
    let mut out = vec![
        ("x-castellan-source", a.source.as_str().to_owned()),
        ("x-castellan-decision-id", did.to_owned()),
    ];
    if let Some(u) = &a.user {
        out.push(("x-castellan-user", u.sub.clone()));
        out.push((h::CONTEXT_HEADER, mint_context(inner, a, did)?));
    }
    Ok(out)
}
