//! Admin credentials (`castellan operator`): creation, listing, revocation.

use super::{Body, Caller, Role, admin_token_mac, new_admin_token};
use crate::api::{AdminTokenCreated, AdminTokenInfo, AdminTokenRevoked, NewAdminToken};
use crate::problem::Problem;
use crate::{Server, unix_now};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

pub(super) async fn add_admin_token(
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
        Json(AdminTokenCreated {
            name: b.name,
            role: role.as_str().to_owned(),
            token,
        }),
    )
        .into_response())
}

/// The id an admin credential is listed and revoked by: the hex of its hash (the hash of 256
/// random bits; it reveals nothing of the credential).
fn admin_token_id(hash: &[u8]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) async fn list_admin_tokens(
    c: Caller,
    State(s): State<Arc<Server>>,
) -> Result<Json<Vec<AdminTokenInfo>>, Problem> {
    c.require_admin()?;
    let rows = s.store.admin_tokens().await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| AdminTokenInfo {
                id: admin_token_id(&r.token_hash),
                name: r.name,
                role: r.role,
                created_at: r.created_at,
                revoked_at: r.revoked_at,
            })
            .collect(),
    ))
}

pub(super) async fn revoke_admin_token(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(id): Path<String>,
) -> Result<Json<AdminTokenRevoked>, Problem> {
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
    Ok(Json(AdminTokenRevoked {
        id,
        name: row.name,
        revoked_at: now,
    }))
}
