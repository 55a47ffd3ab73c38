//! Anomaly events, each recorded (and alerted on) once.

use crate::{Store, StoreError};

impl Store {
    /// Records an anomaly event unless it is known: `true` when this call recorded it (so the
    /// caller alone alerts), `false` when it was there already.
    pub async fn claim_anomaly(
        &self,
        kind: &str,
        key: &str,
        at_ms: i64,
        detail: &str,
    ) -> Result<bool, StoreError> {
        let sql = "INSERT INTO anomaly_events (kind, key, at_ms, detail) VALUES ($1, $2, $3, $4) ON CONFLICT (kind, key) DO NOTHING";
        let n = on_pool!(self, p => sqlx::query(sql).bind(kind).bind(key).bind(at_ms).bind(detail).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n == 1)
    }

    /// The latest anomaly events: (kind, key, at_ms, detail JSON), newest first.
    pub async fn anomaly_events(
        &self,
        limit: i64,
    ) -> Result<Vec<(String, String, i64, String)>, StoreError> {
        let sql =
            "SELECT kind, key, at_ms, detail FROM anomaly_events ORDER BY at_ms DESC LIMIT $1";
        Ok(on_pool!(self, p => sqlx::query_as(sql).bind(limit).fetch_all(p).await)?)
    }
}
