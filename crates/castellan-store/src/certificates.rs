//! Certificates the CA issued, their revocation and the revocation stream proxies follow.

use crate::{Store, StoreError, conflict_or};

/// A certificate the CA issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRow {
    /// Serial number, big-endian.
    pub serial: Vec<u8>,
    /// The service it identifies.
    pub service: String,
    /// Issue time.
    pub issued_at: i64,
    /// Expiry.
    pub not_after: i64,
    /// Revocation time, if revoked.
    pub revoked_at: Option<i64>,
}

/// `(serial, service, issued_at, not_after, revoked_at)`.
type CertificateTuple = (Vec<u8>, String, i64, i64, Option<i64>);

/// A revocation proxies must learn about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationEvent {
    /// Position in the stream; strictly increasing.
    pub seq: i64,
    /// `service` (a service was disabled) or `certificate` (a serial was revoked, hex).
    pub kind: String,
    /// The service name or serial.
    pub subject: String,
    /// When.
    pub at: i64,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Store {
    /// Records an issued certificate.
    pub async fn record_certificate(&self, c: &CertificateRow) -> Result<(), StoreError> {
        let sql = "INSERT INTO certificates (serial, service, issued_at, not_after) VALUES ($1, $2, $3, $4)";
        on_pool!(self, p => sqlx::query(sql).bind(&c.serial).bind(&c.service).bind(c.issued_at).bind(c.not_after).execute(p).await.map(|r| r.rows_affected()))
            .map_err(|e| conflict_or(e, || format!("certificate {}", hex(&c.serial))))?;
        Ok(())
    }

    /// Revokes a certificate and records the revocation for the proxies, atomically.
    pub async fn revoke_certificate(&self, serial: &[u8], now: i64) -> Result<(), StoreError> {
        let update =
            "UPDATE certificates SET revoked_at = $1 WHERE serial = $2 AND revoked_at IS NULL";
        let event =
            "INSERT INTO revocation_events (kind, subject, at) VALUES ('certificate', $1, $2)";
        let subject = hex(serial);
        let changed = on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let n = sqlx::query(update).bind(now).bind(serial).execute(&mut *tx).await?.rows_affected();
            if n == 1 {
                sqlx::query(event).bind(&subject).bind(now).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            n
        });
        if changed == 1 {
            Ok(())
        } else {
            Err(StoreError::NotFound(format!(
                "unrevoked certificate {subject}"
            )))
        }
    }

    /// Serials revoked and not yet expired at `now`: what a validator must refuse.
    pub async fn revoked_serials(&self, now: i64) -> Result<Vec<Vec<u8>>, StoreError> {
        let sql = "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL AND not_after > $1 ORDER BY serial";
        let rows: Vec<(Vec<u8>,)> =
            on_pool!(self, p => sqlx::query_as(sql).bind(now).fetch_all(p).await)?;
        Ok(rows.into_iter().map(|(s,)| s).collect())
    }

    /// Revocation events after `seq`, in order.
    pub async fn revocations_since(&self, seq: i64) -> Result<Vec<RevocationEvent>, StoreError> {
        let sql =
            "SELECT seq, kind, subject, at FROM revocation_events WHERE seq > $1 ORDER BY seq";
        let rows: Vec<(i64, String, String, i64)> =
            on_pool!(self, p => sqlx::query_as(sql).bind(seq).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|(seq, kind, subject, at)| RevocationEvent {
                seq,
                kind,
                subject,
                at,
            })
            .collect())
    }

    /// Every certificate issued to `service`, newest first.
    pub async fn certificates(&self, service: &str) -> Result<Vec<CertificateRow>, StoreError> {
        let sql = "SELECT serial, service, issued_at, not_after, revoked_at FROM certificates WHERE service = $1 ORDER BY issued_at DESC, serial";
        let rows: Vec<CertificateTuple> =
            on_pool!(self, p => sqlx::query_as(sql).bind(service).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(
                |(serial, service, issued_at, not_after, revoked_at)| CertificateRow {
                    serial,
                    service,
                    issued_at,
                    not_after,
                    revoked_at,
                },
            )
            .collect())
    }
}
