//! CA keys and token-signing keys (sealed), their rotation and retirement.

use crate::{Store, StoreError, conflict_or};

/// A sealed private key with its public part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    /// Key id.
    pub id: String,
    /// For CA keys the certificate DER; for signing keys the public JWK (UTF-8) .
    pub public: Vec<u8>,
    /// The private key, sealed.
    pub sealed_key: Vec<u8>,
    /// Creation time.
    pub created_at: i64,
    /// Retirement time: no longer used to sign, still published until its last token expires.
    pub retired_at: Option<i64>,
}

/// `(kid, public_jwk, sealed_key, created_at, retired_at)`.
type SigningKeyTuple = (String, String, Vec<u8>, i64, Option<i64>);

/// `(id, cert_der, sealed_key, created_at, retired_at)`.
type CaKeyTuple = (String, Vec<u8>, Vec<u8>, i64, Option<i64>);

impl Store {
    /// Stores a CA (certificate DER and sealed key).
    pub async fn add_ca_key(&self, k: &KeyRow) -> Result<(), StoreError> {
        let sql =
            "INSERT INTO ca_keys (id, cert_der, sealed_key, created_at) VALUES ($1, $2, $3, $4)";
        on_pool!(self, p => sqlx::query(sql).bind(&k.id).bind(&k.public).bind(&k.sealed_key).bind(k.created_at).execute(p).await.map(|r| r.rows_affected()))
            .map_err(|e| conflict_or(e, || format!("CA key {:?}", k.id)))?;
        Ok(())
    }

    /// Every CA, oldest first.
    pub async fn ca_keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        let sql = "SELECT id, cert_der, sealed_key, created_at, retired_at FROM ca_keys ORDER BY created_at, id";
        self.keys(sql).await
    }

    /// Retires a CA: it signs nothing more but stays in the bundle until its certificate
    /// expires.
    pub async fn retire_ca_keys_except(&self, keep: &str, now: i64) -> Result<u64, StoreError> {
        let sql = "UPDATE ca_keys SET retired_at = $1 WHERE id <> $2 AND retired_at IS NULL";
        let n = on_pool!(self, p => sqlx::query(sql).bind(now).bind(keep).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n)
    }

    /// Stores a token-signing key (public JWK and sealed private key).
    pub async fn add_signing_key(&self, k: &KeyRow, alg: &str) -> Result<(), StoreError> {
        let jwk = String::from_utf8_lossy(&k.public).into_owned();
        let sql = "INSERT INTO signing_keys (kid, alg, public_jwk, sealed_key, created_at) VALUES ($1, $2, $3, $4, $5)";
        on_pool!(self, p => sqlx::query(sql).bind(&k.id).bind(alg).bind(&jwk).bind(&k.sealed_key).bind(k.created_at).execute(p).await.map(|r| r.rows_affected()))
            .map_err(|e| conflict_or(e, || format!("signing key {:?}", k.id)))?;
        Ok(())
    }

    /// Every signing key, oldest first.
    pub async fn signing_keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        let sql = "SELECT kid, public_jwk, sealed_key, created_at, retired_at FROM signing_keys ORDER BY created_at, kid";
        let rows: Vec<SigningKeyTuple> =
            on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|(id, jwk, sealed_key, created_at, retired_at)| KeyRow {
                id,
                public: jwk.into_bytes(),
                sealed_key,
                created_at,
                retired_at,
            })
            .collect())
    }

    /// Retires every current signing key but `keep`.
    pub async fn retire_signing_keys_except(
        &self,
        keep: &str,
        now: i64,
    ) -> Result<u64, StoreError> {
        let sql = "UPDATE signing_keys SET retired_at = $1 WHERE kid <> $2 AND retired_at IS NULL";
        let n = on_pool!(self, p => sqlx::query(sql).bind(now).bind(keep).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n)
    }

    async fn keys(&self, sql: &'static str) -> Result<Vec<KeyRow>, StoreError> {
        let rows: Vec<CaKeyTuple> = on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|(id, public, sealed_key, created_at, retired_at)| KeyRow {
                id,
                public,
                sealed_key,
                created_at,
                retired_at,
            })
            .collect())
    }
}
