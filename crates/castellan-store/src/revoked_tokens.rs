//! Revoked access tokens (RFC 7009), kept until they would have expired.

use crate::{Store, StoreError};

impl Store {
    /// Records that the token with `jti` is revoked until it would have expired anyway.
    pub async fn revoke_token(&self, jti: &str, expires_at: i64) -> Result<(), StoreError> {
        let sql = "INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, $2) ON CONFLICT (jti) DO NOTHING";
        on_pool!(self, p => sqlx::query(sql).bind(jti).bind(expires_at).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Whether the token with `jti` was revoked.
    pub async fn is_token_revoked(&self, jti: &str) -> Result<bool, StoreError> {
        let sql = "SELECT jti FROM revoked_tokens WHERE jti = $1";
        let row: Option<(String,)> =
            on_pool!(self, p => sqlx::query_as(sql).bind(jti).fetch_optional(p).await)?;
        Ok(row.is_some())
    }

    /// Ids of revoked tokens that have not expired by `now`, sorted.
    pub async fn revoked_token_ids(&self, now: i64) -> Result<Vec<String>, StoreError> {
        let sql = "SELECT jti FROM revoked_tokens WHERE expires_at > $1 ORDER BY jti";
        let rows: Vec<(String,)> =
            on_pool!(self, p => sqlx::query_as(sql).bind(now).fetch_all(p).await)?;
        Ok(rows.into_iter().map(|(j,)| j).collect())
    }

    /// Forgets revocations of tokens that have expired by `now`.
    pub async fn purge_revoked_tokens(&self, now: i64) -> Result<u64, StoreError> {
        let sql = "DELETE FROM revoked_tokens WHERE expires_at <= $1";
        let n = on_pool!(self, p => sqlx::query(sql).bind(now).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n)
    }
}
