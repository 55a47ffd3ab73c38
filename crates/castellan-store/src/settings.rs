//! Settings fixed at init (such as the trust domain).

use crate::{Store, StoreError, conflict_or};

impl Store {
    /// A setting's value, if set.
    pub async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        let sql = "SELECT value FROM settings WHERE key = $1";
        let row: Option<(String,)> =
            on_pool!(self, p => sqlx::query_as(sql).bind(key).fetch_optional(p).await)?;
        Ok(row.map(|(v,)| v))
    }

    /// Sets a setting once; a second attempt is a conflict (settings fixed at init stay fixed).
    pub async fn init_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let sql = "INSERT INTO settings (key, value) VALUES ($1, $2)";
        on_pool!(self, p => sqlx::query(sql).bind(key).bind(value).execute(p).await.map(|r| r.rows_affected()))
            .map_err(|e| conflict_or(e, || format!("setting {key:?}")))?;
        Ok(())
    }
}
