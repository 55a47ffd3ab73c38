//! The proxy side of the audit trail: every decision is appended to the disk spool before the
//! response is sent, and a shipper sends the spool to the control plane in batches, dropping
//! only what the control plane says it stored. A full spool keeps the proxy serving; what it
//! could not keep is counted and becomes an explicit gap record.

use crate::{Inner, identity};
use castellan_audit::Entry;
use castellan_proto::v1::AuditBatch;
use castellan_proto::v1::audit_client::AuditClient;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Records per shipped batch.
const BATCH: usize = 2000;

/// Appends one record to the spool.
pub(crate) fn write(inner: &Inner, e: Entry) {
    match inner.audit.append(e) {
        Ok(_) => {}
        Err(castellan_audit::spool::SpoolError::Full) => {
            metrics::counter!("castellan_proxy_audit_records_lost_total", "proxy" => inner.cfg.proxy_id.clone()).increment(1);
        }
        Err(e) => {
            metrics::counter!("castellan_proxy_audit_records_lost_total", "proxy" => inner.cfg.proxy_id.clone()).increment(1);
            tracing::error!(error = %e, "audit record could not be written");
        }
    }
}

/// Ships the spool; syncs it to disk every 100 ms.
pub(crate) async fn ship_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut client: Option<AuditClient<tonic::transport::Channel>> = None;
    let mut rewind = true;
    let mut backoff = Duration::from_millis(100);
    loop {
        if let Err(e) = inner.audit.sync() {
            tracing::error!(error = %e, "audit spool sync failed");
        }
        let batch = match inner.audit.next_batch(BATCH, rewind) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "audit spool unreadable");
                Vec::new()
            }
        };
        rewind = false;
        let (written, acked) = inner.audit.positions();
        metrics::gauge!("castellan_proxy_audit_spool_records", "proxy" => inner.cfg.proxy_id.clone()).set((written - acked.min(written)) as f64);
        metrics::gauge!("castellan_proxy_audit_spool_bytes", "proxy" => inner.cfg.proxy_id.clone())
            .set(inner.audit.depth_bytes() as f64);
        if batch.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                _ = stop.changed() => { let _ = inner.audit.sync(); return }
            }
        }
        let n = batch.len();
        let result = async {
            if client.is_none() {
                let pem: String = inner
                    .state
                    .bundle()
                    .iter()
                    .map(|c| identity::pem("CERTIFICATE", c.as_ref()))
                    .collect();
                let ch =
                    identity::control_channel(&inner.cfg, &pem, Some(&inner.identity.current()))
                        .await
                        .map_err(|e| e.to_string())?;
                client = Some(AuditClient::new(ch));
            }
            let c = client.as_mut().ok_or("no client")?;
            let ack = c
                .ship(AuditBatch {
                    writer: inner.cfg.proxy_id.clone(),
                    records: batch,
                })
                .await
                .map_err(|e| e.message().to_owned())?
                .into_inner();
            inner
                .audit
                .ack(ack.stored_through)
                .map_err(|e| e.to_string())?;
            Ok::<u64, String>(ack.stored_through)
        }
        .await;
        match result {
            Ok(_) => {
                metrics::counter!("castellan_proxy_audit_records_shipped_total", "proxy" => inner.cfg.proxy_id.clone()).increment(n as u64);
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "shipping audit records failed; they stay in the spool");
                client = None;
                rewind = true;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
