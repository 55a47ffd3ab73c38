//! Services registered in the trust domain, and their OpenAPI documents.

use crate::{Store, StoreError, conflict_or};

/// A service registered in the trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRow {
    /// Its name.
    pub name: String,
    /// When it was added (Unix seconds).
    pub created_at: i64,
    /// When it was disabled, if it was.
    pub disabled_at: Option<i64>,
    /// DNS names / IP addresses its SVIDs also carry, space-separated.
    pub dns_names: String,
    /// `sidecar`, `gateway` or `decision`.
    pub kind: String,
    /// Gateways and decision points: `prefix=service` routes, space-separated.
    pub routes: String,
    /// Sidecars: the services it calls, space-separated.
    pub upstreams: String,
}

type ServiceTuple = (String, i64, Option<i64>, String, String, String, String);

impl From<ServiceTuple> for ServiceRow {
    fn from(
        (name, created_at, disabled_at, dns_names, kind, routes, upstreams): ServiceTuple,
    ) -> Self {
        ServiceRow {
            name,
            created_at,
            disabled_at,
            dns_names,
            kind,
            routes,
            upstreams,
        }
    }
}

impl ServiceRow {
    /// The services whose traffic this service's proxies handle beyond their own: a gateway's
    /// (or decision point's) route targets, a sidecar's upstreams.
    pub fn reaches(&self) -> Vec<&str> {
        match self.kind.as_str() {
            "gateway" | "decision" => self
                .routes
                .split_whitespace()
                .filter_map(|r| r.split_once('=').map(|(_, s)| s))
                .collect(),
            _ => self.upstreams.split_whitespace().collect(),
        }
    }
}

impl Store {
    /// Registers a service.
    pub async fn create_service(&self, name: &str, now: i64) -> Result<(), StoreError> {
        self.create_service_with_names(name, "", now).await
    }

    /// Registers a service whose SVIDs also carry `dns_names` (space-separated DNS names/IPs).
    pub async fn create_service_with_names(
        &self,
        name: &str,
        dns_names: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.create_service_full(name, dns_names, "sidecar", "", "", now)
            .await
    }

    /// Registers a service with its kind, routes and upstreams.
    pub async fn create_service_full(
        &self,
        name: &str,
        dns_names: &str,
        kind: &str,
        routes: &str,
        upstreams: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let sql = "INSERT INTO services (name, created_at, dns_names, kind, routes, upstreams) VALUES ($1, $2, $3, $4, $5, $6)";
        on_pool!(self, p => sqlx::query(sql).bind(name).bind(now).bind(dns_names).bind(kind).bind(routes).bind(upstreams).execute(p).await.map(|r| r.rows_affected()))
            .map_err(|e| conflict_or(e, || format!("service {name:?}")))?;
        Ok(())
    }

    /// Changes a service's kind, routes and upstreams.
    pub async fn update_service(
        &self,
        name: &str,
        kind: &str,
        routes: &str,
        upstreams: &str,
    ) -> Result<(), StoreError> {
        let sql = "UPDATE services SET kind = $1, routes = $2, upstreams = $3 WHERE name = $4";
        let n = on_pool!(self, p => sqlx::query(sql).bind(kind).bind(routes).bind(upstreams).bind(name).execute(p).await.map(|r| r.rows_affected()))?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("service {name:?}")));
        }
        Ok(())
    }

    /// One service.
    pub async fn service(&self, name: &str) -> Result<ServiceRow, StoreError> {
        let sql = "SELECT name, created_at, disabled_at, dns_names, kind, routes, upstreams FROM services WHERE name = $1";
        let row: Option<ServiceTuple> =
            on_pool!(self, p => sqlx::query_as(sql).bind(name).fetch_optional(p).await)?;
        row.map(ServiceRow::from)
            .ok_or_else(|| StoreError::NotFound(format!("service {name:?}")))
    }

    /// Every service, by name.
    pub async fn services(&self) -> Result<Vec<ServiceRow>, StoreError> {
        let sql = "SELECT name, created_at, disabled_at, dns_names, kind, routes, upstreams FROM services ORDER BY name";
        let rows: Vec<ServiceTuple> = on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(rows.into_iter().map(ServiceRow::from).collect())
    }

    /// Disables a service and records the revocation for the proxies, atomically.
    pub async fn disable_service(&self, name: &str, now: i64) -> Result<(), StoreError> {
        let update = "UPDATE services SET disabled_at = $1 WHERE name = $2 AND disabled_at IS NULL";
        let event = "INSERT INTO revocation_events (kind, subject, at) VALUES ('service', $1, $2)";
        let changed = on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let n = sqlx::query(update).bind(now).bind(name).execute(&mut *tx).await?.rows_affected();
            if n == 1 {
                sqlx::query(event).bind(name).bind(now).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            n
        });
        if changed == 1 {
            Ok(())
        } else {
            Err(StoreError::NotFound(format!("enabled service {name:?}")))
        }
    }

    /// Sets (replaces) a service's OpenAPI document.
    pub async fn set_service_spec(
        &self,
        service: &str,
        spec: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let sql = "INSERT INTO service_specs (service, spec, updated_at) VALUES ($1, $2, $3) \
                   ON CONFLICT (service) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at";
        on_pool!(self, p => sqlx::query(sql).bind(service).bind(spec).bind(now).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Every service's OpenAPI document, by service.
    pub async fn service_specs(&self) -> Result<Vec<(String, String)>, StoreError> {
        let sql = "SELECT service, spec FROM service_specs ORDER BY service";
        let rows: Vec<(String, String)> =
            on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(rows)
    }
}
