//! Token-signing keys: listing and rotation.

use super::Caller;
use crate::api::{KeysRotated, SigningKeyInfo};
use crate::problem::Problem;
use crate::{Server, unix_now};
use axum::Json;
use axum::extract::State;
use std::sync::Arc;

pub(super) async fn list_keys(
    _c: Caller,
    State(s): State<Arc<Server>>,
) -> Result<Json<Vec<SigningKeyInfo>>, Problem> {
    let active = s.keys.load().signing.kid().to_owned();
    let rows = s.store.signing_keys().await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| SigningKeyInfo {
                active: r.id == active,
                kid: r.id,
                created_at: r.created_at,
                retired_at: r.retired_at,
            })
            .collect(),
    ))
}

pub(super) async fn rotate_keys(
    c: Caller,
    State(s): State<Arc<Server>>,
) -> Result<Json<KeysRotated>, Problem> {
    c.require_admin()?;
    let now = unix_now();
    let kid = crate::keys::add_signing_key(&s.store, &s.kek, now).await?;
    s.store.retire_signing_keys_except(&kid, now).await?;
    s.reload().await?;
    tracing::info!(admin = %c.name, %kid, "token signing key rotated");
    s.record_admin(&c.name, "keys.rotate", &format!("signing key {kid}"), 201)
        .await?;
    Ok(Json(KeysRotated {
        kid: kid.to_string(),
        published: s.keys.load().jwks.keys.len(),
    }))
}
