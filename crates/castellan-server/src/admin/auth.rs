//! Admin credentials: roles, issuance (hashed, with a MAC under a KEK-derived key), the
//! extractor that authenticates every admin API call, and problem-JSON request bodies.

use crate::keys::{Kek, credential_hash, random_id};
use crate::problem::Problem;
use crate::{Server, ServerError};
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use castellan_store::Store;
use serde::de::DeserializeOwned;
use std::sync::Arc;

/// Prefix of admin credentials (recognisable in a leaked-secret scan).
pub const ADMIN_TOKEN_PREFIX: &str = "cadm_";

/// What an admin credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read and change.
    Admin,
    /// Read only.
    Viewer,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// The seal label of admin credential MACs.
const ADMIN_TOKEN_MAC: &str = "castellan admin token";

/// What an admin credential's MAC covers: its hash, holder, role and whether it was revoked
/// (so clearing `revoked_at` in the database does not bring a credential back).
fn admin_token_mac_input(hash: &[u8], name: &str, role: &str, revoked: bool) -> Vec<u8> {
    let mut d = Vec::with_capacity(hash.len() + name.len() + role.len() + 4);
    d.extend_from_slice(hash);
    d.push(0);
    d.extend_from_slice(name.as_bytes());
    d.push(0);
    d.extend_from_slice(role.as_bytes());
    d.push(0);
    d.push(u8::from(revoked));
    d
}

/// The MAC an admin credential row must carry.
pub(crate) fn admin_token_mac(
    kek: &Kek,
    hash: &[u8],
    name: &str,
    role: &str,
    revoked: bool,
) -> Vec<u8> {
    kek.mac(
        ADMIN_TOKEN_MAC,
        &admin_token_mac_input(hash, name, role, revoked),
    )
}

/// Creates and stores (hashed, with its MAC) a new admin credential; returns it — the only
/// time it is seen.
pub async fn new_admin_token(
    store: &Store,
    kek: &Kek,
    name: &str,
    role: Role,
    now: i64,
) -> Result<String, ServerError> {
    let token = format!("{ADMIN_TOKEN_PREFIX}{}", random_id(32)?);
    let hash = credential_hash(&token);
    let mac = admin_token_mac(kek, &hash, name, role.as_str(), false);
    store
        .add_admin_token(&hash, name, role.as_str(), now, &mac)
        .await?;
    Ok(token)
}

/// The setting recording that admin credentials of the release before MACs were adopted.
const ADOPTED_SETTING: &str = "admin_token_macs";

/// Records that every admin credential row carries a MAC (at init: nothing to adopt).
pub(crate) async fn mark_admin_tokens_adopted(store: &Store) -> Result<(), ServerError> {
    match store.init_setting(ADOPTED_SETTING, "1").await {
        Ok(()) | Err(castellan_store::StoreError::Conflict(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Once, on the first start after the upgrade that introduced MACs: gives the credentials that
/// existed then their MAC. The marker is itself a MAC (a KEK holder wrote it); an insider who
/// deletes it gets adoption again, so the marker also records when adoption happened and rows
/// created after that time are never adopted.
pub(crate) async fn adopt_admin_tokens(store: &Store, kek: &Kek) -> Result<(), ServerError> {
    if store.setting(ADOPTED_SETTING).await?.is_some() {
        return Ok(());
    }
    // Only rows older than the migration that added the MAC column can need adoption.
    let migrated_at = store.migration_time(9).await?.unwrap_or(i64::MIN);
    let mut n = 0;
    for row in store.admin_tokens().await? {
        if row.mac.is_none() && row.created_at < migrated_at {
            let mac = admin_token_mac(
                kek,
                &row.token_hash,
                &row.name,
                &row.role,
                row.revoked_at.is_some(),
            );
            store.set_admin_token_mac(&row.token_hash, &mac).await?;
            n += 1;
        }
    }
    mark_admin_tokens_adopted(store).await?;
    if n > 0 {
        tracing::warn!(
            credentials = n,
            "admin credentials of an earlier release adopted (MACs added once)"
        );
    }
    Ok(())
}

/// An authenticated admin caller.
#[derive(Debug)]
pub(crate) struct Caller {
    pub(crate) name: String,
    role: Role,
}

impl Caller {
    /// Who the admin credential belongs to.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// What it may do.
    pub(crate) fn role(&self) -> Role {
        self.role
    }

    pub(crate) fn require_admin(&self) -> Result<(), Problem> {
        match self.role {
            Role::Admin => Ok(()),
            Role::Viewer => Err(Problem::forbidden("this operation needs the admin role")),
        }
    }
}

impl FromRequestParts<Arc<Server>> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, s: &Arc<Server>) -> Result<Caller, Problem> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| Problem::unauthorized("admin credential required"))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .filter(|t| t.starts_with(ADMIN_TOKEN_PREFIX) && t.len() < 256)
            .ok_or_else(|| Problem::unauthorized("expected Authorization: Bearer cadm_…"))?;
        authenticate(s, &credential_hash(token)).await
    }
}

/// The admin caller whose credential hashes to `hash`: a stored, unrevoked credential whose
/// row carries its MAC (checked on every request, so revoking a credential takes effect at once,
/// for dashboard sessions too).
pub(crate) async fn authenticate(s: &Server, hash: &[u8]) -> Result<Caller, Problem> {
    match s.store.admin_token(hash).await {
        Ok(row) => {
            // INVARIANT: a row is honoured only with the MAC only KEK holders can make; a
            // credential inserted straight into the database is refused.
            let authentic = row.mac.as_deref().is_some_and(|mac| {
                s.kek.verify_mac(
                    ADMIN_TOKEN_MAC,
                    &admin_token_mac_input(&row.token_hash, &row.name, &row.role, false),
                    mac,
                )
            });
            if !authentic {
                metrics::counter!("castellan_server_admin_auth_failures_total").increment(1);
                tracing::error!(name = %row.name, "admin credential refused: its row fails the integrity check (written outside the API?)");
                return Err(Problem::unauthorized("unknown or revoked admin credential"));
            }
            let role = Role::parse(&row.role)
                .ok_or_else(|| Problem::internal("stored role is unknown"))?;
            Ok(Caller {
                name: row.name,
                role,
            })
        }
        Err(castellan_store::StoreError::NotFound(_)) => {
            metrics::counter!("castellan_server_admin_auth_failures_total").increment(1);
            Err(Problem::unauthorized("unknown or revoked admin credential"))
        }
        Err(e) => Err(e.into()),
    }
}

/// A JSON request body whose rejections are problem JSON.
pub(crate) struct Body<T>(pub(crate) T);

impl<T: DeserializeOwned> FromRequest<Arc<Server>> for Body<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, s: &Arc<Server>) -> Result<Body<T>, Problem> {
        match Json::<T>::from_request(req, s).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(JsonRejection::BytesRejection(e)) => Err(Problem::new(e.status(), e.body_text())),
            Err(e) => Err(Problem::new(e.status(), e.body_text())),
        }
    }
}
