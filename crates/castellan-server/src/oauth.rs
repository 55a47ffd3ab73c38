//! The OAuth2 authorization server: discovery (RFC 8414), JWKS, `/oauth2/token` with
//! `client_credentials` and token exchange (RFC 8693), introspection (RFC 7662) and revocation
//! (RFC 7009). Clients authenticate with `client_secret_basic`, `client_secret_post` or
//! `tls_client_auth` (RFC 8705; the token is then bound to the certificate).

use crate::keys::credential_hash;
use crate::peer::{PeerAddr, PeerCerts};
use crate::problem::OAuthError;
use crate::{Server, unix_now};
use axum::extract::{Form, FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use castellan_identity::{SvidUsage, issue_token};
use castellan_store::{ClientRow, StoreError};
use rustls_pki_types::UnixTime;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

const GRANT_CLIENT_CREDENTIALS: &str = "client_credentials";
const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
const TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// The scope that lets a client introspect tokens issued to other clients.
const INTROSPECTION_SCOPE: &str = "introspection";

pub(crate) fn routes() -> Router<Arc<Server>> {
    Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/.well-known/oauth-authorization-server", get(discovery))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/oauth2/token", post(token))
        .route("/oauth2/introspect", post(introspect))
        .route("/oauth2/revoke", post(revoke))
}

async fn discovery(State(s): State<Arc<Server>>) -> Json<Value> {
    let i = &s.issuer;
    Json(json!({
        "issuer": i,
        "jwks_uri": format!("{i}/.well-known/jwks.json"),
        "token_endpoint": format!("{i}/oauth2/token"),
        "introspection_endpoint": format!("{i}/oauth2/introspect"),
        "revocation_endpoint": format!("{i}/oauth2/revoke"),
        "grant_types_supported": [GRANT_CLIENT_CREDENTIALS, GRANT_TOKEN_EXCHANGE],
        "response_types_supported": ["token"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "tls_client_auth"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "tls_client_auth"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "tls_client_auth"],
        "token_endpoint_auth_signing_alg_values_supported": ["ES256"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "subject_types_supported": ["public"],
        "tls_client_certificate_bound_access_tokens": true,
        "scopes_supported": [],
    }))
}

async fn jwks(State(s): State<Arc<Server>>) -> Response {
    let body = s.keys.load().jwks_json.clone();
    (
        [
            (header::CONTENT_TYPE, "application/jwk-set+json"),
            (header::CACHE_CONTROL, "max-age=60"),
        ],
        body,
    )
        .into_response()
}

/// Form parameters; each may appear once (RFC 6749 §3.1).
struct Params(HashMap<String, String>);

impl FromRequest<Arc<Server>> for Params {
    type Rejection = OAuthError;

    async fn from_request(req: Request, s: &Arc<Server>) -> Result<Params, OAuthError> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !ct
            .to_ascii_lowercase()
            .starts_with("application/x-www-form-urlencoded")
        {
            return Err(OAuthError::bad(
                "invalid_request",
                "expected application/x-www-form-urlencoded",
            ));
        }
        let Form(pairs): Form<Vec<(String, String)>> =
            Form::from_request(req, s).await.map_err(|e| {
                OAuthError::bad(
                    "invalid_request",
                    format!("unreadable form: {}", e.status()),
                )
            })?;
        let mut map = HashMap::with_capacity(pairs.len());
        for (k, v) in pairs {
            if map.contains_key(&k) {
                return Err(OAuthError::bad(
                    "invalid_request",
                    format!("parameter {k:?} repeated"),
                ));
            }
            map.insert(k, v);
        }
        Ok(Params(map))
    }
}

impl Params {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }
}

/// An authenticated client, and the thumbprint of its certificate if it used one.
struct Client {
    row: ClientRow,
    x5t_s256: Option<String>,
}

fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, OAuthError> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || OAuthError::invalid_client("malformed Basic credentials");
    let v = v.to_str().map_err(|_| bad())?;
    let Some(b64) = v.strip_prefix("Basic ") else {
        return Err(bad());
    };
    let raw = STANDARD.decode(b64.trim()).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (id, secret) = text.split_once(':').ok_or_else(bad)?;
    // RFC 6749 §2.3.1: both are form-urlencoded before Base64.
    Ok(Some((
        form_decode(id).ok_or_else(bad)?,
        form_decode(secret).ok_or_else(bad)?,
    )))
}

/// Percent-decodes one form-urlencoded component (`+` is a space).
fn form_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'+' => out.push(b' '),
            b'%' => {
                let h = b.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// What failed authentications are counted against: the client id *and* the source address,
/// so nobody can lock a client out from elsewhere, and unknown ids are counted like known ones.
fn failure_key(id: &str, source: std::net::IpAddr) -> String {
    format!("{id}\u{0}{source}")
}

impl Server {
    /// Refuses a (client, source) locked out after too many failures. The answer is the same
    /// whether the client exists or not.
    fn check_lockout(&self, key: &str) -> Result<(), OAuthError> {
        if let Ok(mut l) = self.lockouts.lock()
            && let Some(until) = l.get(key).copied()
        {
            let now = Instant::now();
            if until > now {
                return Err(OAuthError::locked_out((until - now).as_secs() + 1));
            }
            l.remove(key);
        }
        Ok(())
    }

    /// Counts a failed authentication of `(client, source)`; past the per-minute allowance
    /// that pair is locked out until the allowance refills.
    fn auth_failed(&self, key: &str, id: &str, why: &'static str) -> OAuthError {
        metrics::counter!("castellan_server_client_auth_failures_total", "reason" => why)
            .increment(1);
        tracing::info!(client = %id, reason = why, "client authentication failed");
        if let Err(not_until) = self.auth_failures.check_key(&key.to_owned()) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            if let Ok(mut l) = self.lockouts.lock() {
                if l.len() >= 100_000 {
                    let now = Instant::now();
                    l.retain(|_, until| *until > now);
                }
                l.insert(key.to_owned(), Instant::now() + wait);
            }
            return OAuthError::locked_out(wait.as_secs() + 1);
        }
        OAuthError::invalid_client("client authentication failed")
    }

    /// Forgets failure counts that have refilled (called periodically).
    pub(crate) fn prune_auth_failures(&self) {
        self.auth_failures.retain_recent();
        if let Ok(mut l) = self.lockouts.lock() {
            let now = Instant::now();
            l.retain(|_, until| *until > now);
        }
    }

    async fn authenticate(
        &self,
        headers: &HeaderMap,
        p: &Params,
        peer: &PeerCerts,
        source: &PeerAddr,
    ) -> Result<Client, OAuthError> {
        let basic = basic_credentials(headers)?;
        let post_secret = p.get("client_secret");
        let (id, secret) = match (basic, post_secret) {
            (Some(_), Some(_)) => {
                return Err(OAuthError::bad(
                    "invalid_request",
                    "use one client authentication method",
                ));
            }
            (Some((id, secret)), None) => {
                if p.get("client_id").is_some_and(|c| c != id) {
                    return Err(OAuthError::bad(
                        "invalid_request",
                        "client_id differs from the Basic credentials",
                    ));
                }
                (id, Some(secret))
            }
            (None, secret) => {
                let id = p
                    .get("client_id")
                    .ok_or_else(|| OAuthError::invalid_client("client authentication required"))?;
                (id.to_owned(), secret.map(str::to_owned))
            }
        };
        let key = failure_key(&id, source.0.ip());
        // A secret attempt from a locked-out (client, source) is refused before anything is
        // looked up; a certificate proof is never refused for failed secrets.
        if secret.is_some() {
            self.check_lockout(&key)?;
        }
        let row = match self.client(&id).await {
            Ok(r) => r,
            Err(StoreError::NotFound(_)) => {
                return Err(self.auth_failed(&key, &id, "unknown-client"));
            }
            Err(e) => return Err(OAuthError::internal(e)),
        };
        if row.disabled_at.is_some() {
            return Err(self.auth_failed(&key, &id, "disabled"));
        }
        match secret {
            Some(secret) => {
                let ok = !row.secret_hash.is_empty()
                    && aws_lc_rs::constant_time::verify_slices_are_equal(
                        &credential_hash(&secret),
                        &row.secret_hash,
                    )
                    .is_ok();
                if !ok {
                    return Err(self.auth_failed(&key, &id, "bad-secret"));
                }
                Ok(Client {
                    row,
                    x5t_s256: None,
                })
            }
            None => {
                // tls_client_auth: the SVID the client presented in this TLS handshake.
                let (Some(want), Some(chain)) = (row.tls_san_uri.as_deref(), peer.0.as_deref())
                else {
                    return Err(OAuthError::invalid_client("client authentication failed"));
                };
                let validator = self.svid_validator().await.map_err(OAuthError::internal)?;
                let now = UnixTime::now();
                match validator.validate(chain, now, SvidUsage::Client) {
                    Ok(got) if got.as_str() == want => {}
                    // Certificates cannot be guessed: failures are counted in metrics but
                    // never charged to the lockout allowance.
                    Ok(_) | Err(_) => {
                        metrics::counter!("castellan_server_client_auth_failures_total", "reason" => "certificate").increment(1);
                        tracing::info!(client = %id, "client certificate refused");
                        return Err(OAuthError::invalid_client("client authentication failed"));
                    }
                }
                let leaf = chain
                    .first()
                    .ok_or_else(|| OAuthError::internal("empty chain"))?;
                let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref());
                Ok(Client {
                    row,
                    x5t_s256: Some(URL_SAFE_NO_PAD.encode(digest.as_ref())),
                })
            }
        }
    }

    fn sign(
        &self,
        sub: &str,
        aud: &str,
        ttl: i64,
        extra: &Map<String, Value>,
        now: i64,
    ) -> Result<String, OAuthError> {
        let key = self.keys.load().signing.clone();
        let t = issue_token(&key, &self.issuer, sub, aud, now, ttl, extra)
            .map_err(OAuthError::internal)?;
        self.tokens_issued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(t)
    }

    /// Verifies one of our own tokens and that it was not revoked.
    async fn verify_own(&self, token: &str, now: i64) -> Option<Map<String, Value>> {
        let v = self.keys.load().verifier.verify(token, now).ok()?;
        let jti = v.claims.get("jti").and_then(Value::as_str)?;
        match self.store.is_token_revoked(jti).await {
            Ok(false) => Some(v.claims),
            Ok(true) => None,
            Err(e) => {
                tracing::error!(error = %e, "revocation lookup failed; treating token as inactive");
                None
            }
        }
    }
}

fn scopes_of(s: &str) -> Vec<&str> {
    s.split_whitespace().collect()
}

/// The scopes to grant: those requested (all must be allowed), or every allowed one.
fn grant_scopes<'a>(
    requested: Option<&'a str>,
    allowed: &[&'a str],
) -> Result<Vec<&'a str>, OAuthError> {
    match requested {
        None => Ok(allowed.to_vec()),
        Some(r) => {
            let want = scopes_of(r);
            if let Some(bad) = want
                .iter()
                .find(|w| !is_scope_token(w) || !allowed.contains(w))
            {
                return Err(OAuthError::bad(
                    "invalid_scope",
                    format!("scope {bad:?} is not allowed"),
                ));
            }
            Ok(want)
        }
    }
}

/// RFC 6749 §3.3 scope-token.
pub(crate) fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

/// Whether `a` is a well-formed audience: one printable value without spaces.
pub(crate) fn is_audience(a: &str) -> bool {
    (1..=256).contains(&a.len()) && !a.chars().any(|c| c.is_control() || c == ' ')
}

/// The audience requested (or `default`), which the client must be allowed to request: the
/// server's default audience, or one of the client's registered audiences.
fn audience<'a>(
    p: &'a Params,
    default: &'a str,
    client: &Client,
    server_default: &str,
) -> Result<&'a str, OAuthError> {
    let aud = p.get("audience").or(p.get("resource")).unwrap_or(default);
    if !is_audience(aud) {
        return Err(OAuthError::bad(
            "invalid_target",
            "audience must be one printable value without spaces",
        ));
    }
    if aud != server_default && !client.row.audiences.split_whitespace().any(|a| a == aud) {
        return Err(OAuthError::bad(
            "invalid_target",
            format!("this client may not request tokens for audience {aud:?}"),
        ));
    }
    Ok(aud)
}

fn token_response(token: String, ttl: i64, scopes: &[&str], exchanged: bool) -> Response {
    let mut body = json!({"access_token": token, "token_type": "Bearer", "expires_in": ttl});
    if let Some(o) = body.as_object_mut() {
        if !scopes.is_empty() {
            o.insert("scope".to_owned(), Value::String(scopes.join(" ")));
        }
        if exchanged {
            o.insert(
                "issued_token_type".to_owned(),
                Value::String(TYPE_ACCESS_TOKEN.to_owned()),
            );
        }
    }
    let mut r = Json(body).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut()
        .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

async fn token(
    State(s): State<Arc<Server>>,
    Extension(peer): Extension<PeerCerts>,
    Extension(source): Extension<PeerAddr>,
    headers: HeaderMap,
    p: Params,
) -> Result<Response, OAuthError> {
    let client = s.authenticate(&headers, &p, &peer, &source).await?;
    match p.get("grant_type") {
        Some(GRANT_CLIENT_CREDENTIALS) => client_credentials(&s, client, &p),
        Some(GRANT_TOKEN_EXCHANGE) => token_exchange(&s, client, &p).await,
        Some(_) => Err(OAuthError::bad(
            "unsupported_grant_type",
            "supported: client_credentials, token exchange",
        )),
        None => Err(OAuthError::bad("invalid_request", "grant_type is required")),
    }
}

fn base_claims(client: &Client, scopes: &[&str]) -> Map<String, Value> {
    let mut extra = Map::new();
    if !scopes.is_empty() {
        extra.insert("scope".to_owned(), Value::String(scopes.join(" ")));
    }
    extra.insert(
        "client_id".to_owned(),
        Value::String(client.row.client_id.clone()),
    );
    if let Some(t) = &client.x5t_s256 {
        extra.insert("cnf".to_owned(), json!({"x5t#S256": t}));
    }
    extra
}

fn client_credentials(s: &Server, client: Client, p: &Params) -> Result<Response, OAuthError> {
    let allowed = scopes_of(&client.row.scopes);
    let scopes = grant_scopes(p.get("scope"), &allowed)?;
    let default_aud = s.cfg.default_audience.as_deref().unwrap_or(&s.trust_domain);
    let aud = audience(p, default_aud, &client, default_aud)?;
    let now = unix_now();
    let ttl = s.cfg.token_ttl_secs;
    let token = s.sign(
        &client.row.client_id,
        aud,
        ttl,
        &base_claims(&client, &scopes),
        now,
    )?;
    metrics::counter!("castellan_server_tokens_issued_total", "grant" => "client_credentials")
        .increment(1);
    tracing::debug!(client = %client.row.client_id, %aud, "client_credentials token issued");
    Ok(token_response(token, ttl, &scopes, false))
}

/// The `iss` of a token, read before verification only to choose the verifier (which then
/// checks it again).
fn unverified_issuer(token: &str) -> Option<String> {
    if token.len() > castellan_identity::token::MAX_TOKEN_LEN {
        return None;
    }
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss")?.as_str().map(str::to_owned)
}

async fn token_exchange(s: &Server, client: Client, p: &Params) -> Result<Response, OAuthError> {
    let subject = p
        .get("subject_token")
        .ok_or_else(|| OAuthError::bad("invalid_request", "subject_token is required"))?;
    match p.get("subject_token_type") {
        Some(TYPE_ACCESS_TOKEN | TYPE_JWT) => {}
        _ => {
            return Err(OAuthError::bad(
                "invalid_request",
                "subject_token_type must be access_token or jwt",
            ));
        }
    }
    if !matches!(
        p.get("requested_token_type"),
        None | Some(TYPE_ACCESS_TOKEN | TYPE_JWT)
    ) {
        return Err(OAuthError::bad(
            "invalid_request",
            "only access tokens are issued",
        ));
    }
    if p.get("actor_token").is_some() {
        return Err(OAuthError::bad(
            "invalid_request",
            "actor_token is not supported; the client is the actor",
        ));
    }
    let Some(aud) = p.get("audience").or(p.get("resource")) else {
        return Err(OAuthError::bad(
            "invalid_target",
            "audience is required: exchanged tokens are audience-restricted",
        ));
    };
    let default_aud = s.cfg.default_audience.as_deref().unwrap_or(&s.trust_domain);
    let aud = audience(p, aud, &client, default_aud)?;
    let now = unix_now();
    let invalid = || OAuthError::bad("invalid_request", "subject_token is invalid");
    let iss = unverified_issuer(subject).ok_or_else(invalid)?;
    let claims = if iss == s.issuer {
        s.verify_own(subject, now).await.ok_or_else(invalid)?
    } else {
        let (_, v) = s
            .external
            .iter()
            .find(|(i, _)| *i == iss)
            .ok_or_else(invalid)?;
        v.verify(subject, now).map_err(|_| invalid())?.claims
    };
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(invalid)?;
    // Only the client the subject token was issued for (or one configured to act for that
    // audience) may exchange it: a token a client merely saw is not its to trade.
    let subject_aud: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let me = client.row.client_id.as_str();
    let may_act = subject_aud.iter().any(|a| {
        *a == me
            || s.cfg
                .may_act
                .iter()
                .any(|m| m.audience == *a && m.clients.iter().any(|c| c == me))
    });
    if !may_act {
        tracing::info!(client = %me, audience = ?subject_aud, "token exchange refused: subject token not issued for this client");
        return Err(OAuthError::bad(
            "invalid_request",
            "subject_token was not issued for this client",
        ));
    }
    // A certificate-bound subject token can only be exchanged by the holder of that certificate.
    if let Some(bound) = claims
        .get("cnf")
        .and_then(|c| c.get("x5t#S256"))
        .and_then(Value::as_str)
        && client.x5t_s256.as_deref() != Some(bound)
    {
        return Err(OAuthError::bad(
            "invalid_request",
            "subject_token is bound to another certificate",
        ));
    }
    // Down-scoping: never more than the subject token had, nor than this client may hold.
    let client_scopes = scopes_of(&client.row.scopes);
    let allowed: Vec<&str> = match claims.get("scope").and_then(Value::as_str) {
        Some(subject_scopes) => {
            let ss = scopes_of(subject_scopes);
            client_scopes
                .iter()
                .copied()
                .filter(|c| ss.contains(c))
                .collect()
        }
        // A subject without scopes grants none: never the exchanging client's own.
        None => Vec::new(),
    };
    let scopes = grant_scopes(p.get("scope"), &allowed)?;
    // Never outlive the subject token.
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or_else(invalid)?;
    let ttl = s.cfg.token_ttl_secs.min(exp - now);
    if ttl <= 0 {
        return Err(invalid());
    }
    let mut extra = base_claims(&client, &scopes);
    let mut act = json!({"sub": client.row.client_id});
    if let (Some(prior), Some(o)) = (claims.get("act"), act.as_object_mut()) {
        o.insert("act".to_owned(), prior.clone());
    }
    extra.insert("act".to_owned(), act);
    if iss != s.issuer {
        extra.insert("subject_issuer".to_owned(), Value::String(iss));
    }
    let token = s.sign(sub, aud, ttl, &extra, now)?;
    metrics::counter!("castellan_server_tokens_issued_total", "grant" => "token_exchange")
        .increment(1);
    tracing::debug!(client = %client.row.client_id, %aud, "token exchanged");
    Ok(token_response(token, ttl, &scopes, true))
}

async fn introspect(
    State(s): State<Arc<Server>>,
    Extension(peer): Extension<PeerCerts>,
    Extension(source): Extension<PeerAddr>,
    headers: HeaderMap,
    p: Params,
) -> Result<Response, OAuthError> {
    let client = s.authenticate(&headers, &p, &peer, &source).await?;
    let token = p
        .get("token")
        .ok_or_else(|| OAuthError::bad("invalid_request", "token is required"))?;
    // A client learns only about its own tokens, unless it holds the introspection scope.
    let may_see = |claims: &Map<String, Value>| {
        claims.get("client_id").and_then(Value::as_str) == Some(client.row.client_id.as_str())
            || scopes_of(&client.row.scopes).contains(&INTROSPECTION_SCOPE)
    };
    let body = match s.verify_own(token, unix_now()).await {
        Some(mut claims) if may_see(&claims) => {
            claims.insert("active".to_owned(), Value::Bool(true));
            claims.insert("token_type".to_owned(), Value::String("Bearer".to_owned()));
            Value::Object(claims)
        }
        _ => json!({"active": false}),
    };
    let mut r = Json(body).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

async fn revoke(
    State(s): State<Arc<Server>>,
    Extension(peer): Extension<PeerCerts>,
    Extension(source): Extension<PeerAddr>,
    headers: HeaderMap,
    p: Params,
) -> Result<Response, OAuthError> {
    let client = s.authenticate(&headers, &p, &peer, &source).await?;
    let token = p
        .get("token")
        .ok_or_else(|| OAuthError::bad("invalid_request", "token is required"))?;
    // Invalid or expired tokens need nothing done (RFC 7009 §2.2).
    if let Some(claims) = s.verify_own(token, unix_now()).await {
        if claims.get("client_id").and_then(Value::as_str) != Some(client.row.client_id.as_str()) {
            return Err(OAuthError::bad(
                "unauthorized_client",
                "the token was not issued to this client",
            ));
        }
        let (Some(jti), Some(exp)) = (
            claims.get("jti").and_then(Value::as_str),
            claims.get("exp").and_then(Value::as_i64),
        ) else {
            return Err(OAuthError::internal("own token without jti/exp"));
        };
        s.store
            .revoke_token(jti, exp)
            .await
            .map_err(OAuthError::internal)?;
        // Gateways and decision points learn it with the next push.
        s.changed().await;
        metrics::counter!("castellan_server_tokens_revoked_total").increment(1);
        tracing::info!(client = %client.row.client_id, %jti, "access token revoked");
    }
    Ok(axum::http::StatusCode::OK.into_response())
}
