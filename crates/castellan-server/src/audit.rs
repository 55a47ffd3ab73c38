//! The audit store: proxies ship their chained records (gRPC `Audit.Ship`); operators query,
//! verify and export them (admin API, `castellan audit …`).

use crate::admin::Caller;
use crate::problem::Problem;
use crate::{Server, unix_now};
use axum::Json;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use castellan_audit::{AuditRecord, ChainVerifier};
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

#[tonic::async_trait]
impl Audit for AuditService {
    async fn ship(&self, req: Request<AuditBatch>) -> Result<GrpcResponse<AuditAck>, Status> {
        let id = self.s.grpc_caller(&req).await?;
        let batch = req.into_inner();
        if batch.records.len() > MAX_BATCH || batch.writer.is_empty() || batch.writer.len() > 128 {
            return Err(Status::invalid_argument(
                "batch too large or writer missing",
            ));
        }
        let mut rows = Vec::with_capacity(batch.records.len());
        for line in &batch.records {
            let r: AuditRecord = serde_json::from_str(line)
                .map_err(|e| Status::invalid_argument(format!("record: {e}")))?;
            if r.writer != batch.writer {
                return Err(Status::invalid_argument("a record of another writer"));
            }
            rows.push(AuditRow {
                writer: r.writer.clone(),
                seq: i64::try_from(r.seq).map_err(|_| Status::invalid_argument("seq"))?,
                record: line.clone(),
                time_ms: r.time_ms,
                source: r.source,
                user_sub: r.user,
                destination: r.destination,
                decision: r.decision,
                rule: r.rule,
            });
        }
        let new = self.s.store.insert_audit(&rows).await.map_err(internal)?;
        let through = self
            .s
            .store
            .audit_high_water(&batch.writer)
            .await
            .map_err(internal)?;
        metrics::counter!("castellan_server_audit_records_stored_total").increment(new);
        tracing::debug!(writer = %batch.writer, shipper = %id, new, through, "audit batch stored");
        Ok(GrpcResponse::new(AuditAck {
            stored_through: u64::try_from(through).unwrap_or(0),
        }))
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
    let mut writers = Vec::new();
    let mut all_ok = true;
    for w in s.store.audit_writers().await? {
        let mut v = ChainVerifier::default();
        let mut from = 1;
        let mut error = None;
        let mut stored = 0;
        loop {
            let rows = s.store.audit_chain(&w, from, PAGE).await?;
            for row in &rows {
                stored += 1;
                if error.is_some() {
                    continue; // still counted, no longer verified
                }
                let res = match serde_json::from_str::<AuditRecord>(&row.record) {
                    Ok(r) if r.seq == u64::try_from(row.seq).unwrap_or(0) => {
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
            match rows.last() {
                Some(last) if rows.len() as i64 == PAGE => from = last.seq + 1,
                _ => break,
            }
        }
        all_ok &= error.is_none();
        writers.push(json!({"writer": w, "records": stored, "verified": v.count(), "ok": error.is_none(), "first_error": error}));
    }
    Ok(Json(
        json!({"ok": all_ok, "writers": writers, "checked_at": unix_now()}),
    ))
}

/// All records, oldest first per writer, as JSON lines (for a SIEM).
pub(crate) async fn export(_c: Caller, State(s): State<Arc<Server>>) -> Result<Response, Problem> {
    let mut out = String::new();
    for w in s.store.audit_writers().await? {
        let mut from = 1;
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
