//! The admin REST API (`/v1/…`), authenticated by bearer admin credentials with a role:
//! `admin` may change things, `viewer` may only read.

use crate::keys::{self, credential_hash, random_id};
use crate::problem::Problem;
use crate::{Server, unix_now};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use castellan_identity::SpiffeId;
use castellan_store::ClientRow;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Prefix of admin credentials (recognisable in a leaked-secret scan).
pub const ADMIN_TOKEN_PREFIX: &str = "cadm_";
/// Prefix of join tokens.
pub const JOIN_TOKEN_PREFIX: &str = "cjt_";
/// Prefix of OAuth2 client secrets.
pub const CLIENT_SECRET_PREFIX: &str = "ccs_";

pub(crate) mod auth;
pub(crate) use auth::{Body, Caller, admin_token_mac};
pub use auth::{Role, new_admin_token};
pub(crate) use auth::{adopt_admin_tokens, mark_admin_tokens_adopted};

pub(crate) fn routes() -> Router<Arc<Server>> {
    Router::new()
        .route("/v1/services", get(list_services).post(add_service))
        .route("/v1/services/{name}", axum::routing::put(update_service))
        .route("/v1/services/{name}/join-token", post(new_join_token))
        .route("/v1/services/{name}/disable", post(disable_service))
        .route(
            "/v1/services/{name}/spec",
            axum::routing::put(set_spec)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_POLICY_BYTES)),
        )
        .route("/v1/services/{name}/certificates", get(list_certificates))
        .route("/v1/certificates/{serial}/revoke", post(revoke_certificate))
        .route("/v1/revocations", get(revocations))
        .route("/v1/bundle", get(bundle))
        .route("/v1/ca/rotate", post(rotate_ca))
        .route("/v1/clients", get(list_clients).post(add_client))
        .route("/v1/clients/{id}/disable", post(disable_client))
        .route("/v1/keys", get(list_keys))
        .route("/v1/keys/rotate", post(rotate_keys))
        .route(
            "/v1/admin-tokens",
            get(list_admin_tokens).post(add_admin_token),
        )
        .route("/v1/admin-tokens/{id}/revoke", post(revoke_admin_token))
        .route(
            "/v1/policy",
            get(current_policy)
                .post(apply_policy)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_POLICY_BYTES)),
        )
        .route("/v1/access/report", get(access_report))
        .route(
            "/v1/policy/impact",
            post(policy_impact).layer(axum::extract::DefaultBodyLimit::max(MAX_POLICY_BYTES)),
        )
        .route(
            "/v1/policy/usage",
            post(policy_usage).layer(axum::extract::DefaultBodyLimit::max(MAX_POLICY_BYTES)),
        )
        .route("/v1/policy/history", get(policy_history))
        .route("/v1/policy/rollback/{rev}", post(rollback_policy))
        .route("/v1/proxies", get(list_proxies))
        .route("/v1/apikeys", get(list_api_keys).post(add_api_key))
        .route("/v1/apikeys/{id}/revoke", post(revoke_api_key))
        .route("/v1/audit", get(crate::audit::query))
        .route("/v1/audit/verify", get(crate::audit::verify))
        .route("/v1/audit/export", get(crate::audit::export))
        .route("/v1/audit/heads", get(crate::audit::heads))
        .route("/v1/audit/purge", post(crate::audit::purge))
}

/// Largest policy bundle accepted by `policy apply`.
const MAX_POLICY_BYTES: usize = 4 * 1024 * 1024;
/// Prefix of end-user API keys (product.md §7).
pub const API_KEY_PREFIX: &str = "cak_";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn is_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

fn service_id(s: &Server, name: &str) -> Result<SpiffeId, Problem> {
    if !is_name(name) {
        return Err(Problem::bad_request(
            "service names are 1-63 characters of a-z, 0-9 and '-'",
        ));
    }
    SpiffeId::for_service(&s.trust_domain, name).map_err(|e| Problem::bad_request(e.to_string()))
}

async fn list_services(_c: Caller, State(s): State<Arc<Server>>) -> Result<Json<Value>, Problem> {
    let rows = s.store.services().await?;
    let out: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "spiffe_id": format!("spiffe://{}/svc/{}", s.trust_domain, r.name),
                "created_at": r.created_at,
                "disabled_at": r.disabled_at,
                "dns_names": r.dns_names.split_whitespace().collect::<Vec<_>>(),
                "kind": r.kind,
                "routes": r.routes.split_whitespace().collect::<Vec<_>>(),
                "upstreams": r.upstreams.split_whitespace().collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(Value::Array(out)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewService {
    name: String,
    /// DNS names / IP addresses its SVIDs also carry (for an edge listener such as the gateway's).
    #[serde(default)]
    dns_names: Vec<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    routes: Vec<String>,
    #[serde(default)]
    upstreams: Vec<String>,
}

/// What a service's proxies are: the control plane sends each only what that needs.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServiceRole {
    /// `sidecar` (default), `gateway` or `decision`.
    #[serde(default)]
    kind: Option<String>,
    /// Gateways and decision points: `prefix=service` routes.
    #[serde(default)]
    routes: Vec<String>,
    /// Sidecars: the services it calls.
    #[serde(default)]
    upstreams: Vec<String>,
}

impl ServiceRole {
    /// Checked (kind, routes, upstreams), space-joined as stored.
    fn checked(&self) -> Result<(String, String, String), Problem> {
        let kind = self.kind.as_deref().unwrap_or("sidecar");
        if !matches!(kind, "sidecar" | "gateway" | "decision") {
            return Err(Problem::bad_request(
                "kind must be sidecar, gateway or decision",
            ));
        }
        for r in &self.routes {
            let ok = r.split_once('=').is_some_and(|(prefix, svc)| {
                prefix.starts_with('/') && !prefix.contains(char::is_whitespace) && is_name(svc)
            });
            if !ok {
                return Err(Problem::bad_request(format!(
                    "route {r:?} must be PREFIX=SERVICE, e.g. /orders=orders"
                )));
            }
        }
        if let Some(bad) = self.upstreams.iter().find(|u| !is_name(u)) {
            return Err(Problem::bad_request(format!(
                "upstream {bad:?} is not a service name"
            )));
        }
        if kind == "sidecar" && !self.routes.is_empty() {
            return Err(Problem::bad_request("a sidecar has no routes"));
        }
        Ok((
            kind.to_owned(),
            self.routes.join(" "),
            self.upstreams.join(" "),
        ))
    }
}

async fn update_service(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(name): Path<String>,
    Body(role): Body<ServiceRole>,
) -> Result<Json<Value>, Problem> {
    c.require_admin()?;
    service_id(&s, &name)?;
    let (kind, routes, upstreams) = role.checked()?;
    s.store
        .update_service(&name, &kind, &routes, &upstreams)
        .await?;
    s.changed().await;
    tracing::info!(admin = %c.name, service = %name, %kind, "service registration changed");
    s.record_admin(
        &c.name,
        "service.update",
        &format!("service {name} as {kind}"),
        200,
    )
    .await?;
    Ok(Json(json!({"name": name, "kind": kind,
        "routes": routes.split_whitespace().collect::<Vec<_>>(),
        "upstreams": upstreams.split_whitespace().collect::<Vec<_>>()})))
}

fn is_dns_name_or_ip(n: &str) -> bool {
    n.parse::<std::net::IpAddr>().is_ok()
        || ((1..=253).contains(&n.len())
            && n.split('.').all(|l| {
                (1..=63).contains(&l.len())
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
            }))
}

async fn issue_join_token(s: &Server, name: &str, now: i64) -> Result<(String, i64), Problem> {
    let token = format!("{JOIN_TOKEN_PREFIX}{}", random_id(32)?);
    let expires_at = now + s.cfg.join_token_ttl_secs;
    s.store
        .add_join_token(&credential_hash(&token), name, expires_at)
        .await?;
    Ok((token, expires_at))
}

async fn add_service(
    c: Caller,
    State(s): State<Arc<Server>>,
    Body(b): Body<NewService>,
) -> Result<Response, Problem> {
    c.require_admin()?;
    let id = service_id(&s, &b.name)?;
    if let Some(bad) = b.dns_names.iter().find(|n| !is_dns_name_or_ip(n)) {
        return Err(Problem::bad_request(format!(
            "{bad:?} is not a DNS name or IP address"
        )));
    }
    if let Some(own) = b.dns_names.iter().find(|n| s.is_own_name(n)) {
        return Err(Problem::bad_request(format!(
            "{own:?} is a name the control plane serves under; a workload's certificate may not carry it"
        )));
    }
    let (kind, routes, upstreams) = ServiceRole {
        kind: b.kind.clone(),
        routes: b.routes.clone(),
        upstreams: b.upstreams.clone(),
    }
    .checked()?;
    let now = unix_now();
    s.store
        .create_service_full(
            &b.name,
            &b.dns_names.join(" "),
            &kind,
            &routes,
            &upstreams,
            now,
        )
        .await?;
    s.changed().await;
    let (token, expires_at) = issue_join_token(&s, &b.name, now).await?;
    tracing::info!(admin = %c.name, service = %b.name, "service added; join token issued");
    s.record_admin(&c.name, "service.add", &format!("service {}", b.name), 201)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"name": b.name, "spiffe_id": id.as_str(), "join_token": token, "expires_at": expires_at})),
    )
        .into_response())
}

async fn new_join_token(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    c.require_admin()?;
    service_id(&s, &name)?;
    let svc = s.store.service(&name).await?;
    if svc.disabled_at.is_some() {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            format!("service {name:?} is disabled"),
        ));
    }
    let (token, expires_at) = issue_join_token(&s, &name, unix_now()).await?;
    tracing::info!(admin = %c.name, service = %name, "join token issued");
    s.record_admin(
        &c.name,
        "service.join-token",
        &format!("service {name}"),
        201,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"name": name, "join_token": token, "expires_at": expires_at})),
    )
        .into_response())
}

async fn disable_service(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, Problem> {
    c.require_admin()?;
    service_id(&s, &name)?;
    let now = unix_now();
    s.store.disable_service(&name, now).await?;
    s.changed().await;
    tracing::info!(admin = %c.name, service = %name, "service disabled");
    s.record_admin(&c.name, "service.disable", &format!("service {name}"), 200)
        .await?;
    Ok(Json(json!({"name": name, "disabled_at": now})))
}

async fn list_certificates(
    _c: Caller,
    State(s): State<Arc<Server>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, Problem> {
    service_id(&s, &name)?;
    let rows = s.store.certificates(&name).await?;
    Ok(Json(Value::Array(
        rows.iter()
            .map(|r| json!({"serial": hex(&r.serial), "issued_at": r.issued_at, "not_after": r.not_after, "revoked_at": r.revoked_at}))
            .collect(),
    )))
}

fn parse_serial(s: &str) -> Option<Vec<u8>> {
    let s: String = s.chars().filter(|c| *c != ':').collect();
    if s.is_empty() || s.len() > 64 || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| {
            s.get(i * 2..i * 2 + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect()
}

async fn revoke_certificate(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(serial): Path<String>,
) -> Result<Json<Value>, Problem> {
    c.require_admin()?;
    let bytes = parse_serial(&serial).ok_or_else(|| Problem::bad_request("serial must be hex"))?;
    let now = unix_now();
    s.store.revoke_certificate(&bytes, now).await?;
    s.changed().await;
    tracing::info!(admin = %c.name, serial = %hex(&bytes), "certificate revoked");
    s.record_admin(
        &c.name,
        "certificate.revoke",
        &format!("certificate {}", hex(&bytes)),
        200,
    )
    .await?;
    Ok(Json(json!({"serial": hex(&bytes), "revoked_at": now})))
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    since: i64,
}

async fn revocations(
    _c: Caller,
    State(s): State<Arc<Server>>,
    Query(q): Query<Since>,
) -> Result<Json<Value>, Problem> {
    let rows = s.store.revocations_since(q.since).await?;
    Ok(Json(Value::Array(
        rows.iter()
            .map(|r| json!({"seq": r.seq, "kind": r.kind, "subject": r.subject, "at": r.at}))
            .collect(),
    )))
}

async fn bundle(_c: Caller, State(s): State<Arc<Server>>) -> Json<Value> {
    let certs = s.bundle();
    Json(
        json!({"trust_domain": s.trust_domain, "pem": keys::pem_bundle(&certs), "count": certs.len()}),
    )
}

async fn rotate_ca(c: Caller, State(s): State<Arc<Server>>) -> Result<Json<Value>, Problem> {
    c.require_admin()?;
    let now = unix_now();
    let id = keys::add_ca(
        &s.store,
        &s.kek,
        &s.trust_domain,
        now,
        Duration::from_secs(s.cfg.ca_ttl_secs as u64),
    )
    .await?;
    s.store.retire_ca_keys_except(&id, now).await?;
    s.reload().await?;
    s.changed().await;
    let ks = s.keys.load();
    tracing::info!(admin = %c.name, ca = %id, bundle = ks.bundle.len(), "CA rotated");
    s.record_admin(&c.name, "ca.rotate", &format!("ca {id}"), 201)
        .await?;
    Ok(Json(
        json!({"id": id, "not_after": ks.active_ca.not_after, "bundle_size": ks.bundle.len()}),
    ))
}

fn client_json(r: &ClientRow) -> Value {
    json!({"client_id": r.client_id, "scopes": r.scopes.split_whitespace().collect::<Vec<_>>(),
           "audiences": r.audiences.split_whitespace().collect::<Vec<_>>(),
           "tls_san_uri": r.tls_san_uri, "disabled_at": r.disabled_at})
}

async fn list_clients(_c: Caller, State(s): State<Arc<Server>>) -> Result<Json<Value>, Problem> {
    Ok(Json(Value::Array(
        s.store.clients().await?.iter().map(client_json).collect(),
    )))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewClient {
    name: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    tls_san_uri: Option<String>,
    /// Audiences it may request tokens for (besides the server's default audience).
    #[serde(default)]
    audiences: Vec<String>,
}

/// RFC 6749 §3.3 scope-token.
pub(crate) fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

fn is_client_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

async fn add_client(
    c: Caller,
    State(s): State<Arc<Server>>,
    Body(b): Body<NewClient>,
) -> Result<Response, Problem> {
    c.require_admin()?;
    if !is_client_id(&b.name) {
        return Err(Problem::bad_request(
            "client names are 1-64 characters of A-Z, a-z, 0-9, '-', '_', '.'",
        ));
    }
    if let Some(bad) = b.scopes.iter().find(|x| !is_scope_token(x)) {
        return Err(Problem::bad_request(format!("invalid scope {bad:?}")));
    }
    if let Some(bad) = b.audiences.iter().find(|a| !crate::oauth::is_audience(a)) {
        return Err(Problem::bad_request(format!("invalid audience {bad:?}")));
    }
    if let Some(uri) = &b.tls_san_uri {
        let id =
            SpiffeId::parse(uri).map_err(|e| Problem::bad_request(format!("tls_san_uri: {e}")))?;
        if id.trust_domain() != s.trust_domain {
            return Err(Problem::bad_request(
                "tls_san_uri must be in this trust domain",
            ));
        }
    }
    // A certificate-bound client gets no secret: its only credential is its SVID.
    let secret = match b.tls_san_uri {
        None => Some(format!("{CLIENT_SECRET_PREFIX}{}", random_id(32)?)),
        Some(_) => None,
    };
    let row = ClientRow {
        client_id: b.name.clone(),
        secret_hash: secret.as_deref().map(credential_hash).unwrap_or_default(),
        scopes: b.scopes.join(" "),
        tls_san_uri: b.tls_san_uri,
        disabled_at: None,
        audiences: b.audiences.join(" "),
    };
    s.store.create_client(&row, unix_now()).await?;
    tracing::info!(admin = %c.name, client = %row.client_id, "OAuth2 client added");
    s.record_admin(
        &c.name,
        "client.add",
        &format!("client {}", row.client_id),
        201,
    )
    .await?;
    let mut out = client_json(&row);
    if let (Some(secret), Some(o)) = (secret, out.as_object_mut()) {
        o.insert("client_secret".to_owned(), Value::String(secret));
    }
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn disable_client(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    c.require_admin()?;
    let now = unix_now();
    s.store.disable_client(&id, now).await?;
    s.forget_client(&id);
    s.changed().await;
    tracing::info!(admin = %c.name, client = %id, "OAuth2 client disabled");
    s.record_admin(&c.name, "client.disable", &format!("client {id}"), 200)
        .await?;
    Ok(Json(json!({"client_id": id, "disabled_at": now})))
}

async fn list_keys(_c: Caller, State(s): State<Arc<Server>>) -> Result<Json<Value>, Problem> {
    let active = s.keys.load().signing.kid().to_owned();
    let rows = s.store.signing_keys().await?;
    Ok(Json(Value::Array(
        rows.iter()
            .map(|r| json!({"kid": r.id, "created_at": r.created_at, "retired_at": r.retired_at, "active": r.id == active}))
            .collect(),
    )))
}

async fn rotate_keys(c: Caller, State(s): State<Arc<Server>>) -> Result<Json<Value>, Problem> {
    c.require_admin()?;
    let now = unix_now();
    let kid = keys::add_signing_key(&s.store, &s.kek, now).await?;
    s.store.retire_signing_keys_except(&kid, now).await?;
    s.reload().await?;
    tracing::info!(admin = %c.name, %kid, "token signing key rotated");
    s.record_admin(&c.name, "keys.rotate", &format!("signing key {kid}"), 201)
        .await?;
    Ok(Json(
        json!({"kid": kid, "published": s.keys.load().jwks.keys.len()}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAdminToken {
    name: String,
    role: String,
}

async fn add_admin_token(
    c: Caller,
    State(s): State<Arc<Server>>,
    Body(b): Body<NewAdminToken>,
) -> Result<Response, Problem> {
    c.require_admin()?;
    let role =
        Role::parse(&b.role).ok_or_else(|| Problem::bad_request("role must be admin or viewer"))?;
    if b.name.is_empty() || b.name.len() > 128 || b.name.chars().any(char::is_control) {
        return Err(Problem::bad_request(
            "name must be 1-128 printable characters",
        ));
    }
    let token = new_admin_token(&s.store, &s.kek, &b.name, role, unix_now()).await?;
    tracing::info!(admin = %c.name, name = %b.name, role = role.as_str(), "admin credential created");
    s.record_admin(
        &c.name,
        "admin-token.create",
        &format!("admin credential of {} ({})", b.name, role.as_str()),
        201,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"name": b.name, "role": role.as_str(), "token": token})),
    )
        .into_response())
}

/// The id an admin credential is listed and revoked by: the hex of its hash (the hash of 256
/// random bits; it reveals nothing of the credential).
fn admin_token_id(hash: &[u8]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

async fn list_admin_tokens(
    c: Caller,
    State(s): State<Arc<Server>>,
) -> Result<Json<Value>, Problem> {
    c.require_admin()?;
    let rows = s.store.admin_tokens().await?;
    Ok(Json(Value::Array(
        rows.iter()
            .map(|r| {
                json!({"id": admin_token_id(&r.token_hash), "name": r.name, "role": r.role,
                       "created_at": r.created_at, "revoked_at": r.revoked_at})
            })
            .collect(),
    )))
}

async fn revoke_admin_token(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    c.require_admin()?;
    let now = unix_now();
    let row = s
        .store
        .admin_tokens()
        .await?
        .into_iter()
        .find(|r| r.revoked_at.is_none() && admin_token_id(&r.token_hash) == id)
        .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, "no such active admin credential"))?;
    let mac = admin_token_mac(&s.kek, &row.token_hash, &row.name, &row.role, true);
    s.store
        .revoke_admin_token(&row.token_hash, now, &mac)
        .await?;
    tracing::info!(admin = %c.name, name = %row.name, "admin credential revoked");
    s.record_admin(
        &c.name,
        "admin-token.revoke",
        &format!("admin credential of {}", row.name),
        200,
    )
    .await?;
    Ok(Json(json!({"id": id, "name": row.name, "revoked_at": now})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyPolicy {
    files: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    comment: String,
}

fn is_policy_file_name(n: &str) -> bool {
    (1..=128).contains(&n.len())
        && (n.ends_with(".yaml") || n.ends_with(".yml"))
        && !castellan_policy::is_test_file(std::path::Path::new(n))
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
        && !n
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
}

/// Why a policy revision was not stored.
#[derive(Debug)]
enum RevisionError {
    /// The request is wrong (file names, trust domain, no files).
    Bad(String),
    /// The policies do not load: every diagnostic, `file:line:col: message`.
    Invalid(Vec<String>),
    /// Ours.
    Internal(String),
}

impl From<castellan_store::StoreError> for RevisionError {
    fn from(e: castellan_store::StoreError) -> Self {
        RevisionError::Internal(e.to_string())
    }
}

impl IntoResponse for RevisionError {
    fn into_response(self) -> Response {
        match self {
            RevisionError::Bad(m) => Problem::bad_request(m).into_response(),
            RevisionError::Internal(m) => Problem::internal(m).into_response(),
            RevisionError::Invalid(errors) => {
                let body = json!({"type": "about:blank", "title": "Bad Request", "status": 400,
                                  "detail": format!("{} error(s) in the policy", errors.len()), "errors": errors});
                let mut r = (StatusCode::BAD_REQUEST, body.to_string()).into_response();
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    axum::http::HeaderValue::from_static("application/problem+json"),
                );
                r
            }
        }
    }
}

/// Validates `files` with the engine (the trust domain must be this server's) and stores them
/// as a new revision unless the latest one has the same content: (revision, content hash,
/// rule count, whether a revision was created).
async fn store_revision(
    s: &Server,
    author: &str,
    files: &std::collections::BTreeMap<String, String>,
    comment: &str,
) -> Result<(i64, String, usize, bool), RevisionError> {
    let set = candidate_set(s, files)?;
    let hash =
        crate::dist::content_hash(files).map_err(|e| RevisionError::Internal(e.to_string()))?;
    if let Some(cur) = s.store.latest_policy_revision().await?
        && cur.content_hash == hash
    {
        return Ok((cur.rev, hash, set.rule_count(), false));
    }
    let files_json =
        serde_json::to_string(files).map_err(|e| RevisionError::Internal(e.to_string()))?;
    let rev = s
        .store
        .add_policy_revision(author, unix_now(), &hash, &files_json, comment)
        .await?;
    s.changed().await;
    Ok((rev, hash, set.rule_count(), true))
}

/// `files` compiled as a policy set of this server's trust domain, or every reason it is not
/// one (one per line), for the dashboard.
pub(crate) fn candidate_set_text(
    s: &Server,
    files: &std::collections::BTreeMap<String, String>,
) -> Result<castellan_policy::PolicySet, String> {
    candidate_set(s, files).map_err(|e| match e {
        RevisionError::Bad(m) | RevisionError::Internal(m) => m,
        RevisionError::Invalid(errors) => errors.join("\n"),
    })
}

/// `files` compiled as a policy set of this server's trust domain.
fn candidate_set(
    s: &Server,
    files: &std::collections::BTreeMap<String, String>,
) -> Result<castellan_policy::PolicySet, RevisionError> {
    if files.is_empty() {
        return Err(RevisionError::Bad("no policy files".to_owned()));
    }
    if let Some(bad) = files.keys().find(|n| !is_policy_file_name(n)) {
        return Err(RevisionError::Bad(format!(
            "bad policy file name {bad:?} (relative .yaml path, no test files)"
        )));
    }
    let set = match castellan_policy::PolicySet::from_sources(
        files.iter().map(|(n, t)| (n.as_str(), t.as_str())),
    ) {
        Ok(set) => set,
        Err(castellan_policy::LoadError::Invalid(diags)) => {
            return Err(RevisionError::Invalid(
                diags.iter().map(ToString::to_string).collect(),
            ));
        }
        Err(e) => return Err(RevisionError::Bad(e.to_string())),
    };
    if set.trust_domain() != s.trust_domain {
        return Err(RevisionError::Bad(format!(
            "policy trust domain {:?} is not this server's {:?} (set it in a MeshConfig)",
            set.trust_domain(),
            s.trust_domain
        )));
    }
    Ok(set)
}

#[derive(Debug, Deserialize)]
struct ReportParams {
    /// Window start, Unix milliseconds.
    #[serde(default)]
    since_ms: i64,
}

/// The policy in force against the window's traffic (`crate::report`).
async fn access_report(
    _c: Caller,
    State(s): State<Arc<Server>>,
    Query(q): Query<ReportParams>,
) -> Result<Json<Value>, Problem> {
    let cur = s
        .store
        .latest_policy_revision()
        .await?
        .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, "no policy applied yet"))?;
    let files: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&cur.files).map_err(Problem::internal)?;
    let set = candidate_set(&s, &files).map_err(|e| Problem::internal(format!("{e:?}")))?;
    let _scan = s.scans.try_acquire().map_err(|_| scan_busy())?;
    let mut v = crate::report::report(&s, &set, q.since_ms).await?;
    if let Some(o) = v.as_object_mut() {
        o.insert("revision".to_owned(), json!(cur.rev));
    }
    Ok(Json(v))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImpactRequest {
    files: std::collections::BTreeMap<String, String>,
    /// Window start, Unix milliseconds (0: every stored record).
    #[serde(default)]
    since_ms: i64,
    /// Only this destination service.
    #[serde(default)]
    service: String,
}

/// What the candidate `files` would change on the stored traffic of the window: newly denied,
/// newly allowed, and calls decided by another rule (`crate::impact`).
async fn policy_impact(
    _c: Caller,
    State(s): State<Arc<Server>>,
    Body(b): Body<ImpactRequest>,
) -> Result<Json<Value>, Response> {
    let (set, _scan) = window_scan(&s, &b).map_err(|r| *r)?;
    let t0 = std::time::Instant::now();
    let mut v = crate::impact::replay(&s, &set, b.since_ms, &b.service)
        .await
        .map_err(IntoResponse::into_response)?
        .to_json();
    if let Some(o) = v.as_object_mut() {
        o.insert("since_ms".to_owned(), json!(b.since_ms));
        o.insert(
            "elapsed_ms".to_owned(),
            json!(t0.elapsed().as_millis() as u64),
        );
    }
    Ok(Json(v))
}

/// Which rule of the candidate `files` decides each call the window allowed, with the callers,
/// methods and paths used (`crate::impact::usage`, for `castellan policy suggest`).
async fn policy_usage(
    _c: Caller,
    State(s): State<Arc<Server>>,
    Body(b): Body<ImpactRequest>,
) -> Result<Json<Value>, Response> {
    let (set, _scan) = window_scan(&s, &b).map_err(|r| *r)?;
    crate::impact::usage(&s, &set, b.since_ms, &b.service)
        .await
        .map(Json)
        .map_err(IntoResponse::into_response)
}

/// The candidate of a window-scan request, compiled, and the one scan slot it runs in.
fn window_scan<'a>(
    s: &'a Server,
    b: &ImpactRequest,
) -> Result<
    (
        castellan_policy::PolicySet,
        tokio::sync::SemaphorePermit<'a>,
    ),
    Box<Response>,
> {
    let set = candidate_set(s, &b.files).map_err(|e| Box::new(e.into_response()))?;
    let permit = s
        .scans
        .try_acquire()
        .map_err(|_| Box::new(scan_busy().into_response()))?;
    Ok((set, permit))
}

/// The answer while another window scan runs.
fn scan_busy() -> Problem {
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "a policy impact, usage or access report is running; try again when it is done",
    )
}

/// Stores `files` as a revision (see [`store_revision`]) and, when one was created, records
/// `action` in the admin chain; answers 201 (new revision) or 200 (same content), with `extra`
/// fields added to the body.
async fn revision_response(
    s: &Server,
    who: &str,
    files: &std::collections::BTreeMap<String, String>,
    comment: &str,
    action: &str,
    extra: Value,
) -> Response {
    let (rev, hash, rules, created) = match store_revision(s, who, files, comment).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    tracing::info!(admin = %who, action, revision = rev, %hash, rules, created, "policy revision stored");
    if created
        && let Err(p) = s
            .record_admin(
                who,
                action,
                &format!("revision {rev} ({hash}): {comment}"),
                201,
            )
            .await
    {
        return p.into_response();
    }
    let mut body =
        json!({"revision": rev, "content_hash": hash, "rules": rules, "changed": created});
    if let (Some(o), Value::Object(more)) = (body.as_object_mut(), extra) {
        o.extend(more);
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

async fn apply_policy(
    c: Caller,
    State(s): State<Arc<Server>>,
    Body(b): Body<ApplyPolicy>,
) -> Response {
    if let Err(p) = c.require_admin() {
        return p.into_response();
    }
    revision_response(&s, &c.name, &b.files, &b.comment, "policy.apply", json!({})).await
}

async fn current_policy(_c: Caller, State(s): State<Arc<Server>>) -> Result<Json<Value>, Problem> {
    let cur = s
        .store
        .latest_policy_revision()
        .await?
        .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, "no policy applied yet"))?;
    let files: Value = serde_json::from_str(&cur.files).map_err(Problem::internal)?;
    Ok(Json(
        json!({"revision": cur.rev, "author": cur.author, "created_at": cur.created_at,
                   "content_hash": cur.content_hash, "comment": cur.comment, "files": files}),
    ))
}

async fn policy_history(_c: Caller, State(s): State<Arc<Server>>) -> Result<Json<Value>, Problem> {
    let rows = s.store.policy_history(1000).await?;
    Ok(Json(Value::Array(
        rows.iter()
            .map(|r| json!({"revision": r.rev, "author": r.author, "created_at": r.created_at, "content_hash": r.content_hash, "comment": r.comment}))
            .collect(),
    )))
}

async fn rollback_policy(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(rev): Path<i64>,
) -> Response {
    if let Err(p) = c.require_admin() {
        return p.into_response();
    }
    let old = match s.store.policy_revision(rev).await {
        Ok(r) => r,
        Err(e) => return Problem::from(e).into_response(),
    };
    let files: std::collections::BTreeMap<String, String> = match serde_json::from_str(&old.files) {
        Ok(f) => f,
        Err(e) => return Problem::internal(e).into_response(),
    };
    revision_response(
        &s,
        &c.name,
        &files,
        &format!("rollback to {rev}"),
        "policy.rollback",
        json!({"rolled_back_to": rev}),
    )
    .await
}

async fn list_proxies(_c: Caller, State(s): State<Arc<Server>>) -> Result<Json<Value>, Problem> {
    let now = unix_now();
    let current = s.store.latest_policy_revision().await?.map(|r| r.rev);
    Ok(Json(Value::Array(
        s.store
            .proxies()
            .await?
            .iter()
            .map(|p| json!({"proxy_id": p.proxy_id, "service": p.service, "mode": p.mode, "address": p.address,
                            "revision": p.revision, "up_to_date": Some(p.revision) == current,
                            "cert_not_after": p.cert_not_after, "last_contact": p.last_contact,
                            "seconds_since_contact": now - p.last_contact}))
            .collect(),
    )))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewApiKey {
    user: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    claims: std::collections::BTreeMap<String, String>,
    /// Services it may be used for (empty: any).
    #[serde(default)]
    services: Vec<String>,
    /// Route prefixes it may be used for (empty: any).
    #[serde(default)]
    prefixes: Vec<String>,
    /// Lifetime in seconds (none: until revoked).
    #[serde(default)]
    ttl_secs: Option<i64>,
}

async fn add_api_key(
    c: Caller,
    State(s): State<Arc<Server>>,
    Body(b): Body<NewApiKey>,
) -> Result<Response, Problem> {
    c.require_admin()?;
    let ok = |x: &str| (1..=128).contains(&x.len()) && !x.chars().any(char::is_control);
    if !ok(&b.user)
        || !b.roles.iter().all(|r| ok(r))
        || !b.claims.iter().all(|(k, v)| ok(k) && ok(v))
    {
        return Err(Problem::bad_request(
            "user, roles and claims must be 1-128 printable characters",
        ));
    }
    if let Some(bad) = b.services.iter().find(|x| !is_name(x)) {
        return Err(Problem::bad_request(format!(
            "{bad:?} is not a service name"
        )));
    }
    if let Some(bad) = b
        .prefixes
        .iter()
        .find(|p| !p.starts_with('/') || p.contains(char::is_whitespace) || p.len() > 256)
    {
        return Err(Problem::bad_request(format!(
            "route prefix {bad:?} must start with '/' and hold no spaces"
        )));
    }
    let now = unix_now();
    let expires_at = match b.ttl_secs {
        None => None,
        Some(t) if t > 0 => Some(now.saturating_add(t)),
        Some(_) => return Err(Problem::bad_request("ttl_secs must be positive")),
    };
    let key_id = random_id(9)?;
    let key = format!("{API_KEY_PREFIX}{key_id}.{}", random_id(32)?);
    s.store
        .add_api_key(
            &castellan_store::ApiKeyRow {
                key_id: key_id.clone(),
                key_hash: credential_hash(&key),
                username: b.user.clone(),
                roles: serde_json::to_string(&b.roles).map_err(Problem::internal)?,
                claims: serde_json::to_string(&b.claims).map_err(Problem::internal)?,
                revoked_at: None,
                services: b.services.join(" "),
                prefixes: b.prefixes.join(" "),
                expires_at,
            },
            now,
        )
        .await?;
    s.changed().await;
    tracing::info!(admin = %c.name, %key_id, user = %b.user, "API key created");
    s.record_admin(
        &c.name,
        "apikey.create",
        &format!("API key {key_id} for {}", b.user),
        201,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"key_id": key_id, "user": b.user, "roles": b.roles, "claims": b.claims,
        "services": b.services, "prefixes": b.prefixes, "expires_at": expires_at, "api_key": key}),
        ),
    )
        .into_response())
}

async fn list_api_keys(_c: Caller, State(s): State<Arc<Server>>) -> Result<Json<Value>, Problem> {
    let used: std::collections::HashMap<String, Option<i64>> =
        s.store.api_keys_last_used().await?.into_iter().collect();
    Ok(Json(Value::Array(
        s.store
            .active_api_keys(unix_now())
            .await?
            .iter()
            .map(|k| json!({"key_id": k.key_id, "user": k.username,
                            "roles": serde_json::from_str::<Value>(&k.roles).unwrap_or(Value::Null),
                            "claims": serde_json::from_str::<Value>(&k.claims).unwrap_or(Value::Null),
                            "services": k.services.split_whitespace().collect::<Vec<_>>(),
                            "prefixes": k.prefixes.split_whitespace().collect::<Vec<_>>(),
                            "expires_at": k.expires_at,
                            "last_used_at": used.get(&k.key_id).copied().flatten()}))
            .collect(),
    )))
}

async fn revoke_api_key(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    c.require_admin()?;
    s.store.revoke_api_key(&id, unix_now()).await?;
    s.changed().await;
    tracing::info!(admin = %c.name, key_id = %id, "API key revoked");
    s.record_admin(&c.name, "apikey.revoke", &format!("API key {id}"), 200)
        .await?;
    Ok(Json(json!({"key_id": id, "revoked": true})))
}

async fn set_spec(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(name): Path<String>,
    body: String,
) -> Result<Json<Value>, Problem> {
    c.require_admin()?;
    service_id(&s, &name)?;
    s.store.service(&name).await?;
    let doc = crate::config::yaml_text_to_json(&body)
        .map_err(|e| Problem::bad_request(format!("spec: {e}")))?;
    let version = doc
        .get("openapi")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !version.starts_with("3.") || !doc.get("paths").is_some_and(Value::is_object) {
        return Err(Problem::bad_request(
            "spec: an OpenAPI 3.0/3.1 document with paths is expected",
        ));
    }
    let paths = doc
        .get("paths")
        .and_then(Value::as_object)
        .map_or(0, serde_json::Map::len);
    s.store
        .set_service_spec(&name, &doc.to_string(), unix_now())
        .await?;
    s.changed().await;
    tracing::info!(admin = %c.name, service = %name, paths, "OpenAPI document set");
    s.record_admin(&c.name, "service.spec", &format!("service {name}"), 200)
        .await?;
    Ok(Json(json!({"service": name, "paths": paths})))
}
