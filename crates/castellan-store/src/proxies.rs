//! The proxy registry: each proxy's last report.

use crate::{Store, StoreError};

/// A proxy's last report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyRow {
    /// Its id (stable across restarts).
    pub proxy_id: String,
    /// The service it fronts (sidecar) or `gateway`.
    pub service: String,
    /// `sidecar` or `gateway`.
    pub mode: String,
    /// Its inbound address (`host:port`), dialled by other proxies.
    pub address: String,
    /// Policy revision it enforces.
    pub revision: i64,
    /// Its certificate's expiry.
    pub cert_not_after: i64,
    /// Last contact.
    pub last_contact: i64,
}

/// `(proxy_id, service, mode, address, revision, cert_not_after, last_contact)`.
type ProxyTuple = (String, String, String, String, i64, i64, i64);

impl Store {
    /// Records a proxy's report (insert or update).
    pub async fn report_proxy(&self, r: &ProxyRow) -> Result<(), StoreError> {
        let sql = "INSERT INTO proxies (proxy_id, service, mode, address, revision, cert_not_after, last_contact) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                   ON CONFLICT (service, proxy_id) DO UPDATE SET mode = excluded.mode, address = excluded.address, \
                   revision = excluded.revision, cert_not_after = excluded.cert_not_after, last_contact = excluded.last_contact";
        on_pool!(self, p => sqlx::query(sql).bind(&r.proxy_id).bind(&r.service).bind(&r.mode).bind(&r.address).bind(r.revision).bind(r.cert_not_after).bind(r.last_contact).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Whether `service` has a proxy `proxy_id` in the registry, and how many proxies it has.
    pub async fn proxy_presence(
        &self,
        service: &str,
        proxy_id: &str,
    ) -> Result<(bool, i64), StoreError> {
        let sql = "SELECT COALESCE(SUM(CASE WHEN proxy_id = $2 THEN 1 ELSE 0 END), 0), COUNT(*) FROM proxies WHERE service = $1";
        let (this, all): (i64, i64) = on_pool!(self, p => sqlx::query_as(sql).bind(service).bind(proxy_id).fetch_one(p).await)?;
        Ok((this > 0, all))
    }

    /// Removes `service`'s proxies last heard from before `before`; returns how many.
    pub async fn expire_proxies(&self, service: &str, before: i64) -> Result<u64, StoreError> {
        let sql = "DELETE FROM proxies WHERE service = $1 AND last_contact < $2";
        on_pool!(self, p => sqlx::query(sql).bind(service).bind(before).execute(p).await.map(|r| r.rows_affected()))
            .map_err(Into::into)
    }

    /// Every proxy, by id.
    pub async fn proxies(&self) -> Result<Vec<ProxyRow>, StoreError> {
        let sql = "SELECT proxy_id, service, mode, address, revision, cert_not_after, last_contact FROM proxies ORDER BY proxy_id";
        let rows: Vec<ProxyTuple> = on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(
                |(proxy_id, service, mode, address, revision, cert_not_after, last_contact)| {
                    ProxyRow {
                        proxy_id,
                        service,
                        mode,
                        address,
                        revision,
                        cert_not_after,
                        last_contact,
                    }
                },
            )
            .collect())
    }
}
