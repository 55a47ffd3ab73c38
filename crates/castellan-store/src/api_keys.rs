//! End-user API keys (hashes only) and when gateways saw them used.

use crate::{Store, StoreError, conflict_or};

/// An end-user API key, as proxies receive it (hash only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRow {
    /// Public id (also the key's prefix after `cak_`).
    pub key_id: String,
    /// SHA-256 of the whole key.
    pub key_hash: Vec<u8>,
    /// The user it authenticates.
    pub username: String,
    /// Roles, JSON array.
    pub roles: String,
    /// Extra claims, JSON object.
    pub claims: String,
    /// Revocation time, if revoked.
    pub revoked_at: Option<i64>,
    /// Services it may be used for, space-separated (empty: any).
    pub services: String,
    /// Route prefixes it may be used for, space-separated (empty: any).
    pub prefixes: String,
    /// Expiry (Unix seconds), if any.
    pub expires_at: Option<i64>,
}

/// `(key_id, key_hash, username, roles, claims, revoked_at, services, prefixes, expires_at)`.
type ApiKeyTuple = (
    String,
    Vec<u8>,
    String,
    String,
    String,
    Option<i64>,
    String,
    String,
    Option<i64>,
);

impl Store {
    /// Stores an API key's hash and identity.
    pub async fn add_api_key(&self, k: &ApiKeyRow, now: i64) -> Result<(), StoreError> {
        let sql = "INSERT INTO api_keys (key_id, key_hash, username, roles, claims, created_at, services, prefixes, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
        on_pool!(self, p => sqlx::query(sql).bind(&k.key_id).bind(&k.key_hash).bind(&k.username).bind(&k.roles).bind(&k.claims).bind(now).bind(&k.services).bind(&k.prefixes).bind(k.expires_at).execute(p).await.map(|r| r.rows_affected()))
            .map_err(|e| conflict_or(e, || format!("API key {:?}", k.key_id)))?;
        Ok(())
    }

    /// Revokes an API key.
    pub async fn revoke_api_key(&self, key_id: &str, now: i64) -> Result<(), StoreError> {
        let sql = "UPDATE api_keys SET revoked_at = $1 WHERE key_id = $2 AND revoked_at IS NULL";
        let n = on_pool!(self, p => sqlx::query(sql).bind(now).bind(key_id).execute(p).await.map(|r| r.rows_affected()))?;
        if n == 1 {
            Ok(())
        } else {
            Err(StoreError::NotFound(format!("active API key {key_id:?}")))
        }
    }

    /// Every API key that is neither revoked nor expired at `now`.
    pub async fn active_api_keys(&self, now: i64) -> Result<Vec<ApiKeyRow>, StoreError> {
        let sql = "SELECT key_id, key_hash, username, roles, claims, revoked_at, services, prefixes, expires_at FROM api_keys \
                   WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $1) ORDER BY key_id";
        let rows: Vec<ApiKeyTuple> =
            on_pool!(self, p => sqlx::query_as(sql).bind(now).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(
                |(
                    key_id,
                    key_hash,
                    username,
                    roles,
                    claims,
                    revoked_at,
                    services,
                    prefixes,
                    expires_at,
                )| ApiKeyRow {
                    key_id,
                    key_hash,
                    username,
                    roles,
                    claims,
                    revoked_at,
                    services,
                    prefixes,
                    expires_at,
                },
            )
            .collect())
    }

    /// Records that gateways saw API keys used (key id → Unix seconds); keeps the latest.
    pub async fn api_keys_used(&self, uses: &[(String, i64)]) -> Result<(), StoreError> {
        let sql = "UPDATE api_keys SET last_used_at = $1 WHERE key_id = $2 AND (last_used_at IS NULL OR last_used_at < $1)";
        for (id, at) in uses {
            on_pool!(self, p => sqlx::query(sql).bind(*at).bind(id).execute(p).await.map(|r| r.rows_affected()))?;
        }
        Ok(())
    }

    /// When each API key was last used, as gateways reported it.
    pub async fn api_keys_last_used(&self) -> Result<Vec<(String, Option<i64>)>, StoreError> {
        let sql = "SELECT key_id, last_used_at FROM api_keys ORDER BY key_id";
        let rows: Vec<(String, Option<i64>)> =
            on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(rows)
    }
}
