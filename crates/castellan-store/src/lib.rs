//! Castellan's control-plane persistence: one interface, two real backends — SQLite in the data
//! directory by default, PostgreSQL when one machine is outgrown — with embedded migrations.
//! Secrets arrive here already hashed or sealed; this crate never sees a plaintext credential.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{PgPool, SqlitePool};
use std::str::FromStr;
use std::time::Duration;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A row with this key exists already.
    #[error("{0} already exists")]
    Conflict(String),
    /// No such row (or not in a state that allows the operation).
    #[error("{0} not found")]
    NotFound(String),
    /// The URL is not a supported database URL.
    #[error("unsupported database URL (use sqlite://PATH or postgres://…)")]
    UnsupportedUrl,
    /// The database failed (ours, not the client's).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
}

fn conflict_or(e: sqlx::Error, what: impl FnOnce() -> String) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(what()),
        _ => StoreError::Database(e),
    }
}

#[derive(Debug, Clone)]
enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs the same statement on whichever backend is in use. SQL is written once with `$1, $2, …`
/// in order of first appearance, which SQLite binds by position as PostgreSQL does.
macro_rules! on_pool {
    ($self:expr, $pool:ident => $body:expr) => {
        match &$self.backend {
            $crate::Backend::Sqlite($pool) => $body,
            $crate::Backend::Postgres($pool) => $body,
        }
    };
}

// One module per stored resource, each adding its operations to `Store` (after the macro
// above, which they use).
mod admin_tokens;
mod anomalies;
mod api_keys;
mod audit;
mod certificates;
mod clients;
mod join_tokens;
mod keys;
mod policy_revisions;
mod proxies;
mod revoked_tokens;
mod services;
mod settings;

pub use admin_tokens::AdminTokenRow;
pub use api_keys::ApiKeyRow;
pub use audit::{AuditFilter, AuditRow, CheckpointRow, EdgeRow, MinuteRow};
pub use certificates::{CertificateRow, RevocationEvent};
pub use clients::ClientRow;
pub use keys::KeyRow;
pub use policy_revisions::PolicyRevision;
pub use proxies::ProxyRow;
pub use services::ServiceRow;

/// The control plane's database.
#[derive(Debug, Clone)]
pub struct Store {
    backend: Backend,
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `url`: `sqlite://PATH` or
    /// `postgres://…`.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let backend = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(5));
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(opts)
                .await?;
            sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
            Backend::Sqlite(pool)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let opts = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(opts)
                .await?;
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            Backend::Postgres(pool)
        } else {
            return Err(StoreError::UnsupportedUrl);
        };
        Ok(Store { backend })
    }

    /// Which backend this is: `sqlite` or `postgres`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Closes the pool.
    pub async fn close(&self) {
        on_pool!(self, p => p.close().await)
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(self, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// When migration `version` was applied (Unix seconds), if it was.
    pub async fn migration_time(&self, version: i64) -> Result<Option<i64>, StoreError> {
        let t = match &self.backend {
            Backend::Sqlite(p) => {
                let row: Option<(i64,)> = sqlx::query_as(
                    "SELECT CAST(strftime('%s', installed_on) AS INTEGER) FROM _sqlx_migrations WHERE version = $1",
                )
                .bind(version)
                .fetch_optional(p)
                .await?;
                row.map(|(t,)| t)
            }
            Backend::Postgres(p) => {
                let row: Option<(f64,)> = sqlx::query_as(
                    "SELECT EXTRACT(EPOCH FROM installed_on)::float8 FROM _sqlx_migrations WHERE version = $1",
                )
                .bind(version)
                .fetch_optional(p)
                .await?;
                row.map(|(t,)| t as i64)
            }
        };
        Ok(t)
    }

    /// The PostgreSQL pool, for LISTEN/NOTIFY; `None` on SQLite (one replica only).
    pub fn postgres_pool(&self) -> Option<&PgPool> {
        match &self.backend {
            Backend::Postgres(p) => Some(p),
            Backend::Sqlite(_) => None,
        }
    }
}
