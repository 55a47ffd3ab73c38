//! End-user API keys (product.md §7): creation, listing, revocation.

use super::{Body, Caller, is_name, words};
use crate::api::{ApiKeyCreated, ApiKeyInfo, ApiKeyRevoked, NewApiKey};
use crate::keys::{credential_hash, random_id};
use crate::problem::Problem;
use crate::{Server, unix_now};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// Prefix of end-user API keys (product.md §7).
pub const API_KEY_PREFIX: &str = "cak_";

pub(super) async fn add_api_key(
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
        Json(ApiKeyCreated {
            key_id,
            user: b.user,
            roles: b.roles,
            claims: b.claims,
            services: b.services,
            prefixes: b.prefixes,
            expires_at,
            api_key: key,
        }),
    )
        .into_response())
}

pub(super) async fn list_api_keys(
    _c: Caller,
    State(s): State<Arc<Server>>,
) -> Result<Json<Vec<ApiKeyInfo>>, Problem> {
    let used: std::collections::HashMap<String, Option<i64>> =
        s.store.api_keys_last_used().await?.into_iter().collect();
    Ok(Json(
        s.store
            .active_api_keys(unix_now())
            .await?
            .into_iter()
            .map(|k| ApiKeyInfo {
                last_used_at: used.get(&k.key_id).copied().flatten(),
                roles: serde_json::from_str(&k.roles).ok(),
                claims: serde_json::from_str(&k.claims).ok(),
                services: words(&k.services),
                prefixes: words(&k.prefixes),
                expires_at: k.expires_at,
                key_id: k.key_id,
                user: k.username,
            })
            .collect(),
    ))
}

pub(super) async fn revoke_api_key(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(id): Path<String>,
) -> Result<Json<ApiKeyRevoked>, Problem> {
    c.require_admin()?;
    s.store.revoke_api_key(&id, unix_now()).await?;
    s.changed().await;
    tracing::info!(admin = %c.name, key_id = %id, "API key revoked");
    s.record_admin(&c.name, "apikey.revoke", &format!("API key {id}"), 200)
        .await?;
    Ok(Json(ApiKeyRevoked {
        key_id: id,
        revoked: true,
    }))
}
