//! Admin credentials (hashes and their MACs, never the credentials).

use crate::{Store, StoreError, conflict_or};

/// An admin credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTokenRow {
    /// SHA-256 of the credential (its id when listed, never the credential).
    pub token_hash: Vec<u8>,
    /// Who it belongs to.
    pub name: String,
    /// `admin` or `viewer`.
    pub role: String,
    /// Creation time.
    pub created_at: i64,
    /// Revocation time, if revoked.
    pub revoked_at: Option<i64>,
    /// MAC binding hash, name and role under a key the database does not hold.
    pub mac: Option<Vec<u8>>,
}

type AdminTokenTuple = (Vec<u8>, String, String, i64, Option<i64>, Option<Vec<u8>>);

impl From<AdminTokenTuple> for AdminTokenRow {
    fn from((token_hash, name, role, created_at, revoked_at, mac): AdminTokenTuple) -> Self {
        AdminTokenRow {
            token_hash,
            name,
            role,
            created_at,
            revoked_at,
            mac,
        }
    }
}

impl Store {
    /// Stores an admin credential's hash and its MAC.
    pub async fn add_admin_token(
        &self,
        hash: &[u8],
        name: &str,
        role: &str,
        now: i64,
        mac: &[u8],
    ) -> Result<(), StoreError> {
        let sql = "INSERT INTO admin_tokens (token_hash, name, role, created_at, mac) VALUES ($1, $2, $3, $4, $5)";
        on_pool!(self, p => sqlx::query(sql).bind(hash).bind(name).bind(role).bind(now).bind(mac).execute(p).await.map(|r| r.rows_affected()))
            .map_err(|e| conflict_or(e, || "admin token".to_owned()))?;
        Ok(())
    }

    /// The admin credential with this hash, if it exists and is not revoked.
    pub async fn admin_token(&self, hash: &[u8]) -> Result<AdminTokenRow, StoreError> {
        let sql = "SELECT token_hash, name, role, created_at, revoked_at, mac FROM admin_tokens WHERE token_hash = $1 AND revoked_at IS NULL";
        let row: Option<AdminTokenTuple> =
            on_pool!(self, p => sqlx::query_as(sql).bind(hash).fetch_optional(p).await)?;
        row.map(AdminTokenRow::from)
            .ok_or_else(|| StoreError::NotFound("admin token".to_owned()))
    }

    /// Every admin credential (hashes only), oldest first.
    pub async fn admin_tokens(&self) -> Result<Vec<AdminTokenRow>, StoreError> {
        let sql = "SELECT token_hash, name, role, created_at, revoked_at, mac FROM admin_tokens ORDER BY created_at, name";
        let rows: Vec<AdminTokenTuple> =
            on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(rows.into_iter().map(AdminTokenRow::from).collect())
    }

    /// Sets the MAC of a credential that has none (adoption of rows from before MACs).
    pub async fn set_admin_token_mac(&self, hash: &[u8], mac: &[u8]) -> Result<(), StoreError> {
        let sql = "UPDATE admin_tokens SET mac = $1 WHERE token_hash = $2 AND mac IS NULL";
        on_pool!(self, p => sqlx::query(sql).bind(mac).bind(hash).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Revokes the admin credential with this hash; returns whether one was revoked.
    pub async fn revoke_admin_token(
        &self,
        hash: &[u8],
        now: i64,
        mac: &[u8],
    ) -> Result<u64, StoreError> {
        let sql = "UPDATE admin_tokens SET revoked_at = $1, mac = $3 WHERE token_hash = $2 AND revoked_at IS NULL";
        let n = on_pool!(self, p => sqlx::query(sql).bind(now).bind(hash).bind(mac).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n)
    }
}
