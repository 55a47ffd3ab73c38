//! The proxy side of the audit trail: every decision is appended to the disk spool before the
//! response is sent, and a shipper sends the spool to the control plane in batches, dropping
//! only what the control plane says it stored. A full spool keeps the proxy serving; what it
//! could not keep is counted and becomes an explicit gap record.

use crate::{Inner, ProxyConfig, ProxyError, identity};
use castellan_audit::Entry;
use castellan_audit::spool::Spool;
use castellan_proto::v1::audit_client::AuditClient;
use castellan_proto::v1::{AuditBatch, AuditCheckpoint};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Records per shipped batch.
const BATCH: usize = 2000;
/// How long the shipper lets records gather after shipping a partial batch.
const GATHER: Duration = Duration::from_millis(50);

/// Query parameters whose values never reach an audit record, unless configured otherwise.
pub const DEFAULT_REDACTED: &[&str] = &[
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "api_key",
    "apikey",
    "key",
    "password",
    "passwd",
    "secret",
    "client_secret",
    "code",
    "signature",
    "sig",
];

/// `target` with the values of query parameters named in `names` (compared case-insensitively,
/// after percent-decoding the name) replaced by `REDACTED`. A target without a query is
/// returned as it is.
pub(crate) fn redact_target(target: &str, names: &[String]) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_owned();
    };
    let mut out = String::with_capacity(target.len());
    out.push_str(path);
    out.push('?');
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = castellan_policy::percent_decode_lossy(name).to_ascii_lowercase();
        if names.iter().any(|n| n.eq_ignore_ascii_case(&decoded)) && !value.is_empty() {
            out.push_str(name);
            out.push_str("=REDACTED");
        } else {
            out.push_str(pair);
        }
    }
    out
}

/// Chains one record into the spool's next group; its sequence number is what to wait for
/// ([`written`]) before the response leaves. `None`: the record was lost (counted, and a gap
/// record says so in the chain).
pub(crate) fn write(inner: &Inner, mut e: Entry) -> Option<u64> {
    if let Some(k) = &inner.cfg.pseudonymize_users
        && !e.user.is_empty()
    {
        e.user = castellan_audit::pseudonym(&k.0, &e.user);
    }
    match inner.audit.enqueue(e) {
        Ok(seq) => Some(seq),
        Err(e) => {
            lost(inner, &e);
            None
        }
    }
}

/// Waits until the record `seq` (and every one before it) is in the spool file.
pub(crate) async fn written(inner: &Inner, seq: Option<u64>) {
    if let Some(seq) = seq
        && let Err(e) = inner.audit.written(seq).await
    {
        lost(inner, &e);
    }
}

fn lost(inner: &Inner, e: &castellan_audit::spool::SpoolError) {
    metrics::counter!("castellan_proxy_audit_records_lost_total", "proxy" => inner.cfg.proxy_id.clone()).increment(1);
    if !matches!(e, castellan_audit::spool::SpoolError::Full) {
        tracing::error!(error = %e, "audit record could not be written");
    }
}

/// Opens this start's spool (a new epoch under `STATE/audit/`) and the spools earlier starts
/// left with records not yet stored.
pub(crate) fn open_spools(cfg: &ProxyConfig) -> Result<(Spool, Vec<Spool>), ProxyError> {
    let root = cfg.state_dir.join("audit");
    let err = |e: String| ProxyError::Config(format!("{}: {e}", root.display()));
    castellan_audit::spool::private_dir(&root).map_err(|e| err(e.to_string()))?;
    let mut leftover = Vec::new();
    let mut legacy = 0;
    for entry in std::fs::read_dir(&root).map_err(|e| err(e.to_string()))? {
        let path = entry.map_err(|e| err(e.to_string()))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if path.is_dir() && castellan_audit::is_plain_id(&name) {
            let s = Spool::open(&path, &cfg.proxy_id, &name, cfg.audit_spool_bytes)
                .map_err(|e| err(e.to_string()))?;
            if s.drained() {
                let _ = std::fs::remove_dir_all(&path);
            } else {
                leftover.push(s);
            }
        } else if name.starts_with("seg-") {
            legacy += 1;
        }
    }
    if legacy > 0 {
        // Format-1 segments of the previous release: the control plane refuses that format,
        // so they are kept for the operator, never deleted or shipped silently.
        tracing::error!(dir = %root.display(), segments = legacy, "audit spool segments of record format 1 found; they are kept but not shipped (export them with the previous release)");
    }
    // Epoch names start with the start time in hex: oldest first.
    leftover.sort_by(|a, b| a.epoch().cmp(b.epoch()));
    let epoch = castellan_audit::new_epoch(crate::unix_now_ms());
    let current = Spool::open(
        &root.join(&epoch),
        &cfg.proxy_id,
        &epoch,
        cfg.audit_spool_bytes,
    )
    .map_err(|e| err(e.to_string()))?;
    tracing::info!(epoch = %epoch, earlier_chains = leftover.len(), "audit chain opened");
    Ok((current, leftover))
}

/// Why one shipping round failed.
enum ShipError {
    /// The control plane says the batch does not continue its stored head.
    Refused(String),
    /// Anything else (unreachable, internal): retry as is.
    Other(String),
}

/// Where signed checkpoints of this start's chain stand.
struct Checkpoints {
    /// The last record covered by a checkpoint the control plane accepted.
    covered: u64,
    /// When that was.
    at: std::time::Instant,
}

/// A signed checkpoint of `spool`'s record `seq` (whose hash is `hash`), with the SVID in force.
fn sign_checkpoint(
    inner: &Inner,
    spool: &Spool,
    seq: u64,
    hash: &str,
) -> Result<AuditCheckpoint, ShipError> {
    let ident = inner.identity.current();
    let statement = castellan_audit::Checkpoint {
        writer: spool.writer().to_owned(),
        epoch: spool.epoch().to_owned(),
        seq,
        hash: hash.to_owned(),
        time_ms: crate::unix_now_ms(),
    };
    let signature = inner
        .identity
        .signer()
        .sign_detached(&statement.signed_bytes(ident.id.as_str()))
        .map_err(|e| ShipError::Other(e.to_string()))?;
    Ok(AuditCheckpoint {
        seq,
        hash: statement.hash,
        time_ms: statement.time_ms,
        signature,
        cert_chain: ident.chain.iter().map(|c| c.to_vec()).collect(),
    })
}

/// Ships one batch of `spool` (resynchronising with the stored head when refused), with a
/// signed checkpoint of its last record when one is due (`cps`: this start's chain; `None`:
/// an earlier start's, always checkpointed). Returns how many records went out.
async fn ship_round(
    inner: &Inner,
    spool: &Spool,
    client: &mut Option<AuditClient<tonic::transport::Channel>>,
    rewind: bool,
    cps: Option<&mut Checkpoints>,
) -> Result<usize, ShipError> {
    let batch = spool
        .next_batch(BATCH, rewind)
        .map_err(|e| ShipError::Other(format!("audit spool unreadable: {e}")))?;
    let n = batch.len();
    // What the checkpoint (if any) covers: the batch's last record, or — idle, everything
    // stored — the head, once the interval has passed.
    let last = match batch.last() {
        Some(line) => serde_json::from_str::<castellan_audit::AuditRecord>(line)
            .ok()
            .map(|r| (r.seq, r.hash)),
        None => {
            let head = spool.head();
            let (_, acked) = spool.positions();
            (head.seq > 0 && acked == head.seq).then_some((head.seq, head.hash))
        }
    };
    let due = match (&cps, &last) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(c), Some((seq, _))) => {
            *seq > c.covered
                && (n > 0 && seq - c.covered >= inner.cfg.checkpoint_records
                    || c.at.elapsed() >= inner.cfg.checkpoint_interval)
        }
    };
    if n == 0 && !due {
        return Ok(0);
    }
    let checkpoint = match (&last, due) {
        (Some((seq, hash)), true) => Some(sign_checkpoint(inner, spool, *seq, hash)?),
        _ => None,
    };
    if client.is_none() {
        let ch = identity::control_channel(
            &inner.cfg,
            &inner.state.bundle(),
            Some(&inner.identity.current()),
        )
        .await
        .map_err(|e| ShipError::Other(e.to_string()))?;
        *client = Some(AuditClient::new(ch));
    }
    let c = client
        .as_mut()
        .ok_or_else(|| ShipError::Other("no client".to_owned()))?;
    let ship = |records: Vec<String>, checkpoints: Vec<AuditCheckpoint>| AuditBatch {
        writer: spool.writer().to_owned(),
        epoch: spool.epoch().to_owned(),
        records,
        checkpoints,
    };
    let covered = checkpoint.as_ref().map(|c| c.seq);
    // The most an answer may acknowledge: what this batch (or, idle, the head) covers. A
    // stored head beyond it (a row planted in the database) must not drop unshipped records.
    let ceiling = last
        .as_ref()
        .map_or_else(|| spool.positions().1, |(seq, _)| *seq);
    match c.ship(ship(batch, checkpoint.into_iter().collect())).await {
        Ok(ack) => {
            let stored = ack.into_inner().stored_through;
            if stored > ceiling {
                tracing::error!(
                    epoch = spool.epoch(),
                    stored,
                    shipped = ceiling,
                    "the control plane acknowledged records that were not shipped"
                );
            }
            spool
                .ack(stored.min(ceiling))
                .map_err(|e| ShipError::Other(e.to_string()))?;
            if let (Some(seq), Some(c)) = (covered, cps) {
                c.covered = seq;
                c.at = std::time::Instant::now();
            }
            Ok(n)
        }
        Err(st) if st.code() == tonic::Code::FailedPrecondition => {
            // Our batch does not continue the stored head (an earlier batch was stored but its
            // ack was lost): learn the head and go on from there.
            let head = c
                .ship(ship(Vec::new(), Vec::new()))
                .await
                .map_err(|e| ShipError::Other(e.message().to_owned()))?
                .into_inner()
                .stored_through;
            let (written, _) = spool.positions();
            if head > written {
                tracing::error!(
                    epoch = spool.epoch(),
                    stored = head,
                    written,
                    "the control plane holds more records of this chain than were written"
                );
            }
            spool
                .ack(head.min(written))
                .map_err(|e| ShipError::Other(e.to_string()))?;
            Err(ShipError::Refused(st.message().to_owned()))
        }
        Err(st) => Err(ShipError::Other(st.message().to_owned())),
    }
}

/// Writes the records chained and not yet written (those no request waits for, such as
/// hyper's own refusals), then fsyncs.
fn flush_and_sync(spool: &Spool) -> Result<(), castellan_audit::spool::SpoolError> {
    spool.flush()?;
    spool.sync()
}

/// Ships the spools (earlier starts' chains first); syncs the current one every 100 ms.
pub(crate) async fn ship_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut client: Option<AuditClient<tonic::transport::Channel>> = None;
    let mut rewind = true;
    let mut backoff = Duration::from_millis(100);
    let proxy = inner.cfg.proxy_id.clone();
    let mut cps = Checkpoints {
        covered: 0,
        at: std::time::Instant::now(),
    };
    loop {
        // On the blocking pool: the watch stream shares this thread, and a revocation must not
        // wait for the disk.
        let syncing = inner.clone();
        match tokio::task::spawn_blocking(move || flush_and_sync(&syncing.audit)).await {
            Ok(Err(e)) => tracing::error!(error = %e, "audit spool sync failed"),
            Err(e) => tracing::error!(error = %e, "audit spool sync task failed"),
            Ok(Ok(())) => {}
        }
        // INVARIANT: one spool is shipped at a time, oldest chain first, and a leftover spool
        // is removed only once the control plane has acknowledged all of it.
        let leftover = inner
            .audit_leftover
            .lock()
            .ok()
            .and_then(|mut l| (!l.is_empty()).then(|| l.remove(0)));
        let result = match leftover.as_ref() {
            Some(old) => ship_round(&inner, old, &mut client, rewind, None).await,
            None => ship_round(&inner, &inner.audit, &mut client, rewind, Some(&mut cps)).await,
        };
        rewind = false;
        if let Some(old) = leftover {
            if old.drained() {
                tracing::info!(epoch = old.epoch(), "earlier audit chain fully stored");
                let _ = std::fs::remove_dir_all(old.dir());
                rewind = true;
            } else if let Ok(mut l) = inner.audit_leftover.lock() {
                l.insert(0, old);
            }
        }
        let (written, acked) = inner.audit.positions();
        metrics::gauge!("castellan_proxy_audit_spool_records", "proxy" => proxy.clone())
            .set((written - acked.min(written)) as f64);
        metrics::gauge!("castellan_proxy_audit_spool_bytes", "proxy" => proxy.clone())
            .set(inner.audit.depth_bytes() as f64);
        match result {
            Ok(0) => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    _ = stop.changed() => { let _ = flush_and_sync(&inner.audit); return }
                }
            }
            Ok(n) => {
                metrics::counter!("castellan_proxy_audit_records_shipped_total", "proxy" => proxy.clone()).increment(n as u64);
                backoff = Duration::from_millis(100);
                // Group commit: a partial batch means we are caught up; let records gather
                // for a moment, so the fsync, the read-back and the round trip are paid per
                // batch, not per record.
                if n < BATCH {
                    tokio::select! {
                        _ = tokio::time::sleep(GATHER) => {}
                        _ = stop.changed() => { let _ = flush_and_sync(&inner.audit); return }
                    }
                }
            }
            Err(ShipError::Refused(e)) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "audit batch refused; resynchronised with the stored head");
                rewind = true;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(ShipError::Other(e)) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_the_query_are_masked_in_any_spelling() {
        let names: Vec<String> = DEFAULT_REDACTED.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(
            redact_target("/a?x=1&access_token=abc&Password=p%20w&%74oken=t&y", &names),
            "/a?x=1&access_token=REDACTED&Password=REDACTED&%74oken=REDACTED&y"
        );
        assert_eq!(redact_target("/a/token=b", &names), "/a/token=b");
        assert_eq!(redact_target("/a?tokens=1", &names), "/a?tokens=1");
    }
}
