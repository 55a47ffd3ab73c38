//! Join tokens: a workload's first, single-use credential (hashes only).

use crate::{Store, StoreError, conflict_or};

impl Store {
    /// Stores a join token's hash for `service`, valid until `expires_at`.
    pub async fn add_join_token(
        &self,
        hash: &[u8],
        service: &str,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let sql = "INSERT INTO join_tokens (token_hash, service, expires_at) VALUES ($1, $2, $3)";
        on_pool!(self, p => sqlx::query(sql).bind(hash).bind(service).bind(expires_at).execute(p).await.map(|r| r.rows_affected()))
            .map_err(|e| conflict_or(e, || "join token".to_owned()))?;
        Ok(())
    }

    /// Uses a join token: succeeds once, before expiry, for an enabled service; returns the
    /// service. One statement, so two concurrent uses cannot both succeed.
    pub async fn consume_join_token(&self, hash: &[u8], now: i64) -> Result<String, StoreError> {
        let sql = "UPDATE join_tokens SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $1 \
                   AND service IN (SELECT name FROM services WHERE disabled_at IS NULL) RETURNING service";
        let row: Option<(String,)> =
            on_pool!(self, p => sqlx::query_as(sql).bind(now).bind(hash).fetch_optional(p).await)?;
        row.map(|(s,)| s)
            .ok_or_else(|| StoreError::NotFound("unused, unexpired join token".to_owned()))
    }
}
