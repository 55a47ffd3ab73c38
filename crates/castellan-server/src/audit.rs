//! The audit store: proxies ship their chained records (gRPC `Audit.Ship`); operators query,
//! verify and export them (admin API, `castellan audit …`).

use crate::admin::auth::{Body, Caller};
use crate::problem::Problem;
use crate::{Server, unix_now};
use axum::Json;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use castellan_audit::{AuditRecord, ChainVerifier, Head};
use castellan_identity::SpiffeId;
use castellan_proto::v1::audit_server::{Audit, AuditServer};
use castellan_proto::v1::{AuditAck, AuditBatch};
use castellan_store::{AuditFilter, AuditRow};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use tonic::{Request, Response as GrpcResponse, Status};

/// Most records accepted in one batch.
const MAX_BATCH: usize = 5000;
/// Rows read per page while verifying or exporting.
const PAGE: i64 = 10_000;

pub(crate) fn service(s: Arc<Server>) -> AuditServer<AuditService> {
    AuditServer::new(AuditService { s }).max_decoding_message_size(16 * 1024 * 1024)
}

pub(crate) struct AuditService {
    s: Arc<Server>,
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal("internal error")
}

/// The stored key of a chain: the proxy id, the SPIFFE ID of the mTLS identity that shipped
/// it, and the epoch. Neither part may contain a space, so the key splits one way only.
pub(crate) fn chain_key(proxy_id: &str, identity: &SpiffeId, epoch: &str) -> String {
    format!("{proxy_id} {identity} {epoch}")
}

/// A refused batch: logged, counted, and answered with a message naming the chain.
fn refuse(key: &str, reason: &'static str, detail: String) -> Status {
    metrics::counter!("castellan_server_audit_batches_refused_total", "reason" => reason)
        .increment(1);
    tracing::warn!(writer = %key, reason, %detail, "audit batch refused");
    Status::failed_precondition(format!("audit chain {key}: {detail}"))
}

impl AuditService {
    /// The batch's checkpoints, each checked before anything is stored: it covers a record of
    /// this chain stored by now (in this batch or before) with exactly that record's hash, and
    /// its signature verifies with an SVID of the caller's own identity.
    async fn checked_checkpoints(
        &self,
        key: &str,
        id: &SpiffeId,
        batch: &AuditBatch,
        rows: &[AuditRow],
        head: &Head,
    ) -> Result<Vec<castellan_store::CheckpointRow>, Status> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut out = Vec::with_capacity(batch.checkpoints.len());
        if batch.checkpoints.is_empty() {
            return Ok(out);
        }
        let validator = self.s.svid_validator().await.map_err(internal)?;
        for cp in batch.checkpoints.iter().take(16) {
            let bad =
                |what: String| refuse(key, "checkpoint", format!("checkpoint {}: {what}", cp.seq));
            if cp.seq == 0 || cp.seq > head.seq {
                return Err(bad(format!(
                    "covers no stored record (head is {})",
                    head.seq
                )));
            }
            let seq = i64::try_from(cp.seq).map_err(|_| bad("seq out of range".to_owned()))?;
            let stored = match rows.iter().find(|r| r.seq == seq) {
                Some(r) => Some(r.record.clone()),
                None => self
                    .s
                    .store
                    .audit_chain(key, seq, 1)
                    .await
                    .map_err(internal)?
                    .into_iter()
                    .find(|r| r.seq == seq)
                    .map(|r| r.record),
            };
            let stored_hash = stored
                .and_then(|r| serde_json::from_str::<AuditRecord>(&r).ok())
                .map(|r| r.hash);
            if stored_hash.as_deref() != Some(cp.hash.as_str()) {
                return Err(bad("hash differs from the record it covers".to_owned()));
            }
            let chain: Vec<rustls_pki_types::CertificateDer<'static>> = cp
                .cert_chain
                .iter()
                .take(4)
                .map(|c| rustls_pki_types::CertificateDer::from(c.clone()))
                .collect();
            let signer = validator
                .validate(
                    &chain,
                    rustls_pki_types::UnixTime::now(),
                    castellan_identity::SvidUsage::Client,
                )
                .map_err(|e| bad(format!("signing certificate: {e}")))?;
            if signer != *id {
                return Err(bad(format!("signed by {signer}, not by {id}")));
            }
            let statement = castellan_audit::Checkpoint {
                writer: batch.writer.clone(),
                epoch: batch.epoch.clone(),
                seq: cp.seq,
                hash: cp.hash.clone(),
                time_ms: cp.time_ms,
            };
            let leaf = chain
                .first()
                .ok_or_else(|| bad("no certificate".to_owned()))?;
            let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
                .map_err(|_| bad("unparsable certificate".to_owned()))?;
            if !statement.verify(
                id.as_str(),
                &cert.public_key().subject_public_key.data,
                &cp.signature,
            ) {
                return Err(bad("signature does not verify".to_owned()));
            }
            out.push(castellan_store::CheckpointRow {
                writer: key.to_owned(),
                seq,
                hash: cp.hash.clone(),
                time_ms: cp.time_ms,
                signature: b64.encode(&cp.signature),
                cert_chain: serde_json::to_string(
                    &chain
                        .iter()
                        .map(|c| b64.encode(c.as_ref()))
                        .collect::<Vec<_>>(),
                )
                .map_err(internal)?,
            });
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl Audit for AuditService {
    async fn ship(&self, req: Request<AuditBatch>) -> Result<GrpcResponse<AuditAck>, Status> {
        // INVARIANT: the identity half of the chain key comes from the mTLS connection only;
        // whatever the request says, no caller can write, pre-empt or ack another identity's
        // chain.
        let id = self.s.grpc_caller(&req).await?;
        let batch = req.into_inner();
        if batch.records.len() > MAX_BATCH {
            return Err(Status::invalid_argument("batch too large"));
        }
        if batch.writer == crate::admin_audit::WRITER {
            metrics::counter!("castellan_server_audit_batches_refused_total", "reason" => "writer")
                .increment(1);
            return Err(Status::invalid_argument(
                "writer castellan-server is the control plane's own",
            ));
        }
        if !castellan_audit::is_plain_id(&batch.writer) {
            metrics::counter!("castellan_server_audit_batches_refused_total", "reason" => "writer")
                .increment(1);
            return Err(Status::invalid_argument(
                "writer (proxy id) must be 1-128 of [A-Za-z0-9._-]",
            ));
        }
        if !castellan_audit::is_plain_id(&batch.epoch) {
            metrics::counter!("castellan_server_audit_batches_refused_total", "reason" => "format")
                .increment(1);
            tracing::warn!(writer = %batch.writer, identity = %id, "audit batch without an epoch (record format 1) refused");
            return Err(Status::failed_precondition(format!(
                "audit batch of {} without an epoch: record format 1 from a proxy of an earlier release; upgrade the proxy (its spool keeps the records)",
                batch.writer
            )));
        }
        let key = chain_key(&batch.writer, &id, &batch.epoch);
        let mut head = match self.s.store.audit_head(&key).await.map_err(internal)? {
            // Nothing stored: a new chain, or one purged up to its last checkpoint — which is
            // where it continues.
            None => match self
                .s
                .store
                .audit_checkpoints(&key)
                .await
                .map_err(internal)?
                .last()
            {
                Some(cp) => Head {
                    seq: u64::try_from(cp.seq).unwrap_or(0),
                    hash: cp.hash.clone(),
                },
                None => Head::default(),
            },
            Some(json) => {
                let r: AuditRecord = serde_json::from_str(&json).map_err(internal)?;
                Head {
                    seq: r.seq,
                    hash: r.hash,
                }
            }
        };
        let mut rows = Vec::with_capacity(batch.records.len());
        let mut seen = Vec::new();
        let mut rollup = Rollup::default();
        let now_ms = crate::unix_now().saturating_mul(1000);
        for line in &batch.records {
            let r: AuditRecord = serde_json::from_str(line).map_err(|e| {
                refuse(
                    &key,
                    "malformed",
                    format!("after record {}: not a record: {e}", head.seq),
                )
            })?;
            head.accept(&batch.writer, &batch.epoch, &r)
                .map_err(|e| refuse(&key, "chain", e.to_string()))?;
            rollup.add(&r, now_ms);
            if self.s.cfg.anomalies.is_some()
                && let Some(x) = crate::anomaly::Seen::of(&r)
            {
                seen.push(x);
            }
            rows.push(AuditRow {
                writer: key.clone(),
                seq: i64::try_from(r.seq)
                    .map_err(|_| refuse(&key, "malformed", "seq out of range".to_owned()))?,
                record: line.clone(),
                time_ms: r.time_ms,
                source: r.source,
                user_sub: r.user,
                destination: r.destination,
                decision: r.decision,
                rule: r.rule,
            });
        }
        let checkpoints = self
            .checked_checkpoints(&key, &id, &batch, &rows, &head)
            .await?;
        let new = if rows.is_empty() {
            0
        } else {
            self.s.store.insert_audit(&rows).await.map_err(|e| {
                tracing::warn!(writer = %key, error = %e, "audit batch not stored (a concurrent write to the same chain?)");
                Status::aborted(format!("audit chain {key}: not stored; retry"))
            })?
        };
        if !checkpoints.is_empty() {
            self.s
                .store
                .add_audit_checkpoints(&checkpoints)
                .await
                .map_err(internal)?;
            metrics::counter!("castellan_server_audit_checkpoints_stored_total")
                .increment(checkpoints.len() as u64);
        }
        metrics::counter!("castellan_server_audit_records_stored_total").increment(new);
        // A batch stored now (not a retry of one stored before) is checked for anomalies.
        if new as usize == rows.len() {
            crate::anomaly::observe(&self.s, seen).await;
            let (edges, minutes) = rollup.rows();
            if let Err(e) = self.s.store.add_audit_rollups(&edges, &minutes).await {
                // The records are stored; only the dashboard's counts lag.
                metrics::counter!("castellan_server_audit_rollup_failures_total").increment(1);
                tracing::warn!(writer = %key, error = %e, "dashboard rollups not updated for a stored batch");
            }
        }
        tracing::debug!(writer = %key, new, head = head.seq, "audit batch stored");
        Ok(GrpcResponse::new(AuditAck {
            stored_through: head.seq,
        }))
    }
}

/// A batch's enforced traffic, summed for the dashboard's rollups (`audit_edges`,
/// `audit_minutes`): one upsert per distinct key, not per record.
#[derive(Debug, Default)]
struct Rollup {
    edges: std::collections::BTreeMap<(String, String, String), (i64, i64, i64)>,
    minutes: std::collections::BTreeMap<(i64, String), (i64, i64)>,
}

/// Records dated further ahead than this (a writer's clock, or a forgery) do not count in the
/// rollups; an edge's last use is never later than now.
const ROLLUP_FUTURE_MS: i64 = 5 * 60_000;
/// Per-minute counts are kept for records at most this old when stored (the dashboard charts
/// the last hour; late records older than this only add rows).
const ROLLUP_MINUTES_MS: i64 = 2 * 24 * 3_600_000;

impl Rollup {
    fn add(&mut self, r: &AuditRecord, now_ms: i64) {
        if !r.is_traffic() || r.time_ms > now_ms.saturating_add(ROLLUP_FUTURE_MS) {
            return;
        }
        let denied = r.decision != "allow";
        let (a, d) = if denied { (0, 1) } else { (1, 0) };
        let e = self
            .edges
            .entry((r.source.clone(), r.destination.clone(), r.origin.clone()))
            .or_default();
        e.0 += a;
        e.1 += d;
        e.2 = e.2.max(r.time_ms.min(now_ms));
        if r.time_ms < now_ms.saturating_sub(ROLLUP_MINUTES_MS) {
            return;
        }
        let m = self
            .minutes
            .entry((r.time_ms.div_euclid(60_000) * 60_000, r.destination.clone()))
            .or_default();
        m.0 += a;
        m.1 += d;
    }

    fn rows(
        self,
    ) -> (
        Vec<castellan_store::EdgeRow>,
        Vec<castellan_store::MinuteRow>,
    ) {
        let edges = self
            .edges
            .into_iter()
            .map(
                |((source, destination, origin), (allowed, denied, last_ms))| {
                    castellan_store::EdgeRow {
                        source,
                        destination,
                        origin,
                        allowed,
                        denied,
                        last_ms,
                    }
                },
            )
            .collect();
        let minutes = self
            .minutes
            .into_iter()
            .map(
                |((minute_ms, destination), (allowed, denied))| castellan_store::MinuteRow {
                    minute_ms,
                    destination,
                    allowed,
                    denied,
                },
            )
            .collect();
        (edges, minutes)
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct QueryParams {
    #[serde(default)]
    service: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    decision: String,
    #[serde(default)]
    rule: String,
    #[serde(default)]
    since_ms: i64,
    #[serde(default)]
    until_ms: i64,
    #[serde(default)]
    limit: Option<i64>,
}

pub(crate) async fn query(
    _c: Caller,
    State(s): State<Arc<Server>>,
    Query(q): Query<QueryParams>,
) -> Result<Json<Value>, Problem> {
    let f = AuditFilter {
        service: q.service,
        source: q.source,
        source_exact: false,
        user: q.user,
        decision: q.decision,
        rule: q.rule,
        since_ms: q.since_ms,
        until_ms: q.until_ms,
        limit: q.limit.unwrap_or(100).clamp(1, 10_000),
    };
    let rows = s.store.audit_query(&f).await?;
    Ok(Json(Value::Array(
        rows.iter()
            .filter_map(|r| serde_json::from_str(&r.record).ok())
            .collect(),
    )))
}

/// Verifies every writer's chain; names the first bad record of each.
pub(crate) async fn verify(
    _c: Caller,
    State(s): State<Arc<Server>>,
) -> Result<Json<Value>, Problem> {
    // Chains are independent: two are verified at a time (parsing and hashing is the work).
    let mut chains = tokio::task::JoinSet::new();
    let mut writers: Vec<(usize, Value)> = Vec::new();
    for (i, w) in s.store.audit_writers().await?.into_iter().enumerate() {
        if chains.len() >= 2
            && let Some(done) = chains.join_next().await
        {
            writers.push(done.map_err(Problem::internal)??);
        }
        let s = s.clone();
        chains.spawn(async move { verify_chain(&s, w).await.map(|v| (i, v)) });
    }
    while let Some(done) = chains.join_next().await {
        writers.push(done.map_err(Problem::internal)??);
    }
    writers.sort_by_key(|(i, _)| *i);
    let all_ok = writers.iter().all(|(_, w)| w["ok"] == true);
    let writers: Vec<Value> = writers.into_iter().map(|(_, w)| w).collect();
    Ok(Json(
        json!({"ok": all_ok, "writers": writers, "checked_at": unix_now()}),
    ))
}

/// Verifies one stored chain (see [`verify`]).
async fn verify_chain(s: &Server, w: String) -> Result<Value, Problem> {
    let mut v = ChainVerifier::default();
    let mut from = 1;
    let mut error = None;
    let mut stored = 0;
    let mut head = 0;
    // Signed checkpoints, with the hash of the record each covers as stored now: the CLI
    // checks the signatures against the operator's bundle and compares.
    let checkpoints = s.store.audit_checkpoints(&w).await?;
    // The first record no checkpoint covers: the CLI flags old uncovered records (their
    // checkpoints deleted, or never made).
    let last_checkpoint = checkpoints.iter().map(|c| c.seq).max().unwrap_or(0);
    let mut uncovered_from_ms: Option<i64> = None;
    let mut stored_hashes: std::collections::HashMap<i64, String> =
        std::collections::HashMap::new();
    // A chain purged up to a signed checkpoint starts right after it.
    let first = s.store.audit_chain(&w, 1, 1).await?;
    let mut purged_through = 0;
    let resume_at = match first.first() {
        // Purged up to the checkpoint just before its first record.
        Some(start) if start.seq > 1 => checkpoints.iter().find(|c| c.seq == start.seq - 1),
        Some(_) => None,
        // Purged entirely, up to its last checkpoint.
        None => checkpoints.last(),
    };
    if let Some(cp) = resume_at {
        v = ChainVerifier::resume(u64::try_from(cp.seq).unwrap_or(0), &cp.hash);
        from = cp.seq + 1;
        purged_through = cp.seq;
        head = cp.seq;
        stored_hashes.insert(cp.seq, cp.hash.clone());
    }
    let checkpointed: std::collections::HashSet<i64> = checkpoints.iter().map(|c| c.seq).collect();
    // The control plane's chains list the purges they record, so `audit verify` can tell a
    // purge from records deleted behind the API.
    let admin_chain = w.split(' ').next() == Some(crate::admin_audit::WRITER);
    let mut purges = Vec::new();
    // The next page is read while this one is verified.
    let fetch = |from: i64| {
        let (store, w) = (s.store.clone(), w.clone());
        crate::impact::Prefetch(tokio::spawn(async move {
            store.audit_chain(&w, from, PAGE).await
        }))
    };
    let mut pending = fetch(from);
    loop {
        let rows = (&mut pending.0).await.map_err(Problem::internal)??;
        let next = match rows.last() {
            Some(last) if rows.len() as i64 == PAGE => Some(fetch(last.seq + 1)),
            _ => None,
        };
        for row in &rows {
            stored += 1;
            head = row.seq;
            if uncovered_from_ms.is_none() && row.seq > last_checkpoint {
                uncovered_from_ms = Some(row.time_ms);
            }
            if checkpointed.contains(&row.seq)
                && let Ok(r) = serde_json::from_str::<AuditRecord>(&row.record)
            {
                stored_hashes.insert(row.seq, r.hash);
            }
            if error.is_some() {
                continue; // still counted, no longer verified
            }
            let res = match serde_json::from_str::<AuditRecord>(&row.record) {
                Ok(r) if r.seq == u64::try_from(row.seq).unwrap_or(0) => {
                    if admin_chain
                        && r.method == PURGE_ACTION
                        && let Some(before_ms) = purge_before_ms(&r.path)
                    {
                        purges.push(json!({"seq": row.seq, "before_ms": before_ms,
                                           "time_ms": r.time_ms, "status": r.status}));
                    }
                    v.push(&r).map_err(|e| e.to_string())
                }
                Ok(r) => Err(format!(
                    "row {} holds record {} (reordered)",
                    row.seq, r.seq
                )),
                Err(e) => Err(format!("row {} is not a record: {e}", row.seq)),
            };
            if let Err(e) = res {
                error = Some(e);
            }
        }
        match next {
            Some(n) => pending = n,
            None => break,
        }
    }
    // Chain keys are "<proxy id> <SPIFFE ID> <epoch>"; records of format 1 have the
    // proxy id alone.
    let mut parts = w.splitn(3, ' ');
    let (proxy_id, identity, epoch) = (parts.next(), parts.next(), parts.next());
    let checkpoints: Vec<Value> = checkpoints
        .iter()
        .map(|c| {
            json!({"seq": c.seq, "hash": c.hash, "time_ms": c.time_ms, "signature": c.signature,
                   "cert_chain": serde_json::from_str::<Value>(&c.cert_chain).unwrap_or(Value::Null),
                   "stored_hash": stored_hashes.get(&c.seq)})
        })
        .collect();
    Ok(
        json!({"writer": w, "proxy_id": proxy_id, "identity": identity, "epoch": epoch,
        "records": stored, "head": head, "purged_through": purged_through, "uncovered_from_ms": uncovered_from_ms,
        "verified": v.count(), "ok": error.is_none(),
        "first_error": error, "checkpoints": checkpoints, "purges": purges}),
    )
}

/// The admin action a purge is recorded as.
const PURGE_ACTION: &str = "audit.purge";

/// A purge's admin record object: how many records, and its cut (read back by
/// [`purge_before_ms`]).
fn purge_object(records: u64, before_ms: i64) -> String {
    format!("{records} records before {before_ms}")
}

/// The cut of a purge, from its admin record's object ([`purge_object`]).
fn purge_before_ms(object: &str) -> Option<i64> {
    object.rsplit_once(" before ")?.1.parse().ok()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PurgeParams {
    /// Records older than this (Unix ms) may go.
    before_ms: i64,
}

/// Retention: removes each chain's records older than `before_ms`, but only up to its last
/// signed checkpoint among them, so the remaining chain starts right after a signed statement
/// and `verify` keeps proving it. The purge itself is an audited admin action.
pub(crate) async fn purge(
    c: Caller,
    State(s): State<Arc<Server>>,
    Body(p): Body<PurgeParams>,
) -> Result<Json<Value>, Problem> {
    c.require_admin()?;
    // A cut in the future would let `audit verify` accept any later deletion as purged.
    if p.before_ms > crate::unix_now_ms() {
        return Err(Problem::bad_request(
            "before_ms is in the future: only records already written can be purged",
        ));
    }
    let mut total = 0;
    let mut chains = Vec::new();
    for w in s.store.audit_writers().await? {
        // The last checkpoint whose record is older than the cut.
        let mut through = None;
        for cp in s.store.audit_checkpoints(&w).await? {
            if cp.time_ms < p.before_ms {
                through = Some(cp.seq);
            }
        }
        let Some(through) = through else { continue };
        let n = s.store.purge_audit(&w, through).await?;
        if n > 0 {
            total += n;
            chains.push(json!({"writer": w, "purged_through": through, "records": n}));
        }
    }
    tracing::info!(admin = %c.name(), records = total, before_ms = p.before_ms, "audit records purged");
    s.record_admin(
        c.name(),
        PURGE_ACTION,
        &purge_object(total, p.before_ms),
        200,
    )
    .await?;
    Ok(Json(json!({"records": total, "chains": chains})))
}

/// All records, oldest first per writer, as JSON lines (for a SIEM).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExportParams {
    /// Only this chain (as `audit verify` and `/v1/audit/heads` name it)…
    #[serde(default)]
    chain: Option<String>,
    /// …from this sequence number on.
    #[serde(default)]
    from: Option<i64>,
}

/// Every stored record, chain by chain in sequence order (NDJSON, each line as hashed); or one
/// chain from a sequence number (`castellan audit export --follow`).
pub(crate) async fn export(
    _c: Caller,
    State(s): State<Arc<Server>>,
    Query(q): Query<ExportParams>,
) -> Result<Response, Problem> {
    let mut out = String::new();
    let writers = match &q.chain {
        Some(c) => vec![c.clone()],
        None => s.store.audit_writers().await?,
    };
    for w in writers {
        let mut from = q.from.unwrap_or(1).max(1);
        loop {
            let rows = s.store.audit_chain(&w, from, PAGE).await?;
            for r in &rows {
                out.push_str(&r.record);
                out.push('\n');
            }
            match rows.last() {
                Some(last) if rows.len() as i64 == PAGE => from = last.seq + 1,
                _ => break,
            }
        }
    }
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], out).into_response())
}

/// Each chain's last stored sequence number: `[{"chain", "seq"}]`.
pub(crate) async fn heads(
    _c: Caller,
    State(s): State<Arc<Server>>,
) -> Result<Json<Value>, Problem> {
    let mut out = Vec::new();
    for w in s.store.audit_writers().await? {
        if let Some(json) = s.store.audit_head(&w).await?
            && let Ok(r) = serde_json::from_str::<AuditRecord>(&json)
        {
            out.push(json!({"chain": w, "seq": r.seq}));
        }
    }
    Ok(Json(Value::Array(out)))
}
