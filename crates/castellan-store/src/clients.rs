//! OAuth2 clients.

use crate::{Store, StoreError, conflict_or};

/// An OAuth2 client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRow {
    /// Client id.
    pub client_id: String,
    /// Hash of the secret.
    pub secret_hash: Vec<u8>,
    /// Space-separated scopes it may request.
    pub scopes: String,
    /// The SPIFFE ID it authenticates with over mTLS (`tls_client_auth`), if any.
    pub tls_san_uri: Option<String>,
    /// Disabled time, if disabled.
    pub disabled_at: Option<i64>,
    /// Space-separated audiences it may request tokens for (besides the default one).
    pub audiences: String,
}

/// `(client_id, secret_hash, scopes, tls_san_uri, disabled_at)`.
type ClientTuple = (String, Vec<u8>, String, Option<String>, Option<i64>, String);

impl From<ClientTuple> for ClientRow {
    fn from(
        (client_id, secret_hash, scopes, tls_san_uri, disabled_at, audiences): ClientTuple,
    ) -> Self {
        ClientRow {
            client_id,
            secret_hash,
            scopes,
            tls_san_uri,
            disabled_at,
            audiences,
        }
    }
}

impl Store {
    /// Registers an OAuth2 client.
    pub async fn create_client(&self, c: &ClientRow, now: i64) -> Result<(), StoreError> {
        let sql = "INSERT INTO oauth_clients (client_id, secret_hash, scopes, tls_san_uri, created_at, audiences) VALUES ($1, $2, $3, $4, $5, $6)";
        on_pool!(self, p => sqlx::query(sql).bind(&c.client_id).bind(&c.secret_hash).bind(&c.scopes).bind(&c.tls_san_uri).bind(now).bind(&c.audiences).execute(p).await.map(|r| r.rows_affected()))
            .map_err(|e| conflict_or(e, || format!("client {:?}", c.client_id)))?;
        Ok(())
    }

    /// One OAuth2 client.
    pub async fn client(&self, client_id: &str) -> Result<ClientRow, StoreError> {
        let sql = "SELECT client_id, secret_hash, scopes, tls_san_uri, disabled_at, audiences FROM oauth_clients WHERE client_id = $1";
        let row: Option<ClientTuple> =
            on_pool!(self, p => sqlx::query_as(sql).bind(client_id).fetch_optional(p).await)?;
        row.map(ClientRow::from)
            .ok_or_else(|| StoreError::NotFound(format!("client {client_id:?}")))
    }

    /// Every OAuth2 client, by id.
    pub async fn clients(&self) -> Result<Vec<ClientRow>, StoreError> {
        let sql = "SELECT client_id, secret_hash, scopes, tls_san_uri, disabled_at, audiences FROM oauth_clients ORDER BY client_id";
        let rows: Vec<ClientTuple> = on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(rows.into_iter().map(ClientRow::from).collect())
    }

    /// Disables an OAuth2 client.
    pub async fn disable_client(&self, client_id: &str, now: i64) -> Result<(), StoreError> {
        let sql = "UPDATE oauth_clients SET disabled_at = $1 WHERE client_id = $2 AND disabled_at IS NULL";
        let n = on_pool!(self, p => sqlx::query(sql).bind(now).bind(client_id).execute(p).await.map(|r| r.rows_affected()))?;
        if n == 1 {
            Ok(())
        } else {
            Err(StoreError::NotFound(format!(
                "enabled client {client_id:?}"
            )))
        }
    }

    /// Ids of disabled OAuth2 clients, sorted.
    pub async fn disabled_client_ids(&self) -> Result<Vec<String>, StoreError> {
        let sql =
            "SELECT client_id FROM oauth_clients WHERE disabled_at IS NOT NULL ORDER BY client_id";
        let rows: Vec<(String,)> = on_pool!(self, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(rows.into_iter().map(|(c,)| c).collect())
    }
}
