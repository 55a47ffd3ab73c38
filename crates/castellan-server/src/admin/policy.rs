//! Policy revisions (apply, history, rollback, the one in force) and the window scans over
//! stored traffic: impact, usage, access report.

use super::{Body, Caller};
use crate::api::{ApplyPolicy, ImpactRequest, PolicyInForce, PolicyRevisionInfo, RevisionStored};
use crate::problem::Problem;
use crate::{Server, unix_now};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

/// Largest policy bundle accepted by `policy apply`.
pub(super) const MAX_POLICY_BYTES: usize = 4 * 1024 * 1024;

fn is_policy_file_name(n: &str) -> bool {
    (1..=128).contains(&n.len())
        && (n.ends_with(".yaml") || n.ends_with(".yml"))
        && !castellan_policy::is_test_file(std::path::Path::new(n))
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
        && !n
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
}

/// Why a policy revision was not stored.
#[derive(Debug)]
enum RevisionError {
    /// The request is wrong (file names, trust domain, no files).
    Bad(String),
    /// The policies do not load: every diagnostic, `file:line:col: message`.
    Invalid(Vec<String>),
    /// Ours.
    Internal(String),
}

impl From<castellan_store::StoreError> for RevisionError {
    fn from(e: castellan_store::StoreError) -> Self {
        RevisionError::Internal(e.to_string())
    }
}

impl IntoResponse for RevisionError {
    fn into_response(self) -> Response {
        match self {
            RevisionError::Bad(m) => Problem::bad_request(m).into_response(),
            RevisionError::Internal(m) => Problem::internal(m).into_response(),
            RevisionError::Invalid(errors) => {
                let body = json!({"type": "about:blank", "title": "Bad Request", "status": 400,
                                  "detail": format!("{} error(s) in the policy", errors.len()), "errors": errors});
                let mut r = (StatusCode::BAD_REQUEST, body.to_string()).into_response();
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    axum::http::HeaderValue::from_static("application/problem+json"),
                );
                r
            }
        }
    }
}

/// Validates `files` with the engine (the trust domain must be this server's) and stores them
/// as a new revision unless the latest one has the same content: (revision, content hash,
/// rule count, whether a revision was created).
async fn store_revision(
    s: &Server,
    author: &str,
    files: &std::collections::BTreeMap<String, String>,
    comment: &str,
) -> Result<(i64, String, usize, bool), RevisionError> {
    let set = candidate_set(s, files)?;
    let hash =
        crate::dist::content_hash(files).map_err(|e| RevisionError::Internal(e.to_string()))?;
    if let Some(cur) = s.store.latest_policy_revision().await?
        && cur.content_hash == hash
    {
        return Ok((cur.rev, hash, set.rule_count(), false));
    }
    let files_json =
        serde_json::to_string(files).map_err(|e| RevisionError::Internal(e.to_string()))?;
    let rev = s
        .store
        .add_policy_revision(author, unix_now(), &hash, &files_json, comment)
        .await?;
    s.changed().await;
    Ok((rev, hash, set.rule_count(), true))
}

/// `files` compiled as a policy set of this server's trust domain, or every reason it is not
/// one (one per line), for the dashboard.
pub(crate) fn candidate_set_text(
    s: &Server,
    files: &std::collections::BTreeMap<String, String>,
) -> Result<castellan_policy::PolicySet, String> {
    candidate_set(s, files).map_err(|e| match e {
        RevisionError::Bad(m) | RevisionError::Internal(m) => m,
        RevisionError::Invalid(errors) => errors.join("\n"),
    })
}

/// `files` compiled as a policy set of this server's trust domain.
fn candidate_set(
    s: &Server,
    files: &std::collections::BTreeMap<String, String>,
) -> Result<castellan_policy::PolicySet, RevisionError> {
    if files.is_empty() {
        return Err(RevisionError::Bad("no policy files".to_owned()));
    }
    if let Some(bad) = files.keys().find(|n| !is_policy_file_name(n)) {
        return Err(RevisionError::Bad(format!(
            "bad policy file name {bad:?} (relative .yaml path, no test files)"
        )));
    }
    let set = match castellan_policy::PolicySet::from_sources(
        files.iter().map(|(n, t)| (n.as_str(), t.as_str())),
    ) {
        Ok(set) => set,
        Err(castellan_policy::LoadError::Invalid(diags)) => {
            return Err(RevisionError::Invalid(
                diags.iter().map(ToString::to_string).collect(),
            ));
        }
        Err(e) => return Err(RevisionError::Bad(e.to_string())),
    };
    if set.trust_domain() != s.trust_domain {
        return Err(RevisionError::Bad(format!(
            "policy trust domain {:?} is not this server's {:?} (set it in a MeshConfig)",
            set.trust_domain(),
            s.trust_domain
        )));
    }
    Ok(set)
}

#[derive(Debug, Deserialize)]
pub(super) struct ReportParams {
    /// Window start, Unix milliseconds.
    #[serde(default)]
    since_ms: i64,
}

/// The policy in force against the window's traffic (`crate::report`).
pub(super) async fn access_report(
    _c: Caller,
    State(s): State<Arc<Server>>,
    Query(q): Query<ReportParams>,
) -> Result<Json<Value>, Problem> {
    let cur = s
        .store
        .latest_policy_revision()
        .await?
        .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, "no policy applied yet"))?;
    let files: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&cur.files).map_err(Problem::internal)?;
    let set = candidate_set(&s, &files).map_err(|e| Problem::internal(format!("{e:?}")))?;
    let _scan = s.scans.try_acquire().map_err(|_| scan_busy())?;
    let mut v = crate::report::report(&s, &set, q.since_ms).await?;
    if let Some(o) = v.as_object_mut() {
        o.insert("revision".to_owned(), json!(cur.rev));
    }
    Ok(Json(v))
}

/// What the candidate `files` would change on the stored traffic of the window: newly denied,
/// newly allowed, and calls decided by another rule (`crate::impact`).
pub(super) async fn policy_impact(
    _c: Caller,
    State(s): State<Arc<Server>>,
    Body(b): Body<ImpactRequest>,
) -> Result<Json<Value>, Response> {
    let (set, _scan) = window_scan(&s, &b).map_err(|r| *r)?;
    let t0 = std::time::Instant::now();
    let mut v = crate::impact::replay(&s, &set, b.since_ms, &b.service)
        .await
        .map_err(IntoResponse::into_response)?
        .to_json();
    if let Some(o) = v.as_object_mut() {
        o.insert("since_ms".to_owned(), json!(b.since_ms));
        o.insert(
            "elapsed_ms".to_owned(),
            json!(t0.elapsed().as_millis() as u64),
        );
    }
    Ok(Json(v))
}

/// Which rule of the candidate `files` decides each call the window allowed, with the callers,
/// methods and paths used (`crate::impact::usage`, for `castellan policy suggest`).
pub(super) async fn policy_usage(
    _c: Caller,
    State(s): State<Arc<Server>>,
    Body(b): Body<ImpactRequest>,
) -> Result<Json<Value>, Response> {
    let (set, _scan) = window_scan(&s, &b).map_err(|r| *r)?;
    crate::impact::usage(&s, &set, b.since_ms, &b.service)
        .await
        .map(Json)
        .map_err(IntoResponse::into_response)
}

/// The candidate of a window-scan request, compiled, and the one scan slot it runs in.
fn window_scan<'a>(
    s: &'a Server,
    b: &ImpactRequest,
) -> Result<
    (
        castellan_policy::PolicySet,
        tokio::sync::SemaphorePermit<'a>,
    ),
    Box<Response>,
> {
    let set = candidate_set(s, &b.files).map_err(|e| Box::new(e.into_response()))?;
    let permit = s
        .scans
        .try_acquire()
        .map_err(|_| Box::new(scan_busy().into_response()))?;
    Ok((set, permit))
}

/// The answer while another window scan runs.
fn scan_busy() -> Problem {
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "a policy impact, usage or access report is running; try again when it is done",
    )
}

/// Stores `files` as a revision (see [`store_revision`]) and, when one was created, records
/// `action` in the admin chain; answers 201 (new revision) or 200 (same content), naming the
/// revision rolled back to when there was one.
async fn revision_response(
    s: &Server,
    who: &str,
    files: &std::collections::BTreeMap<String, String>,
    comment: &str,
    action: &str,
    rolled_back_to: Option<i64>,
) -> Response {
    let (rev, hash, rules, created) = match store_revision(s, who, files, comment).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    tracing::info!(admin = %who, action, revision = rev, %hash, rules, created, "policy revision stored");
    if created
        && let Err(p) = s
            .record_admin(
                who,
                action,
                &format!("revision {rev} ({hash}): {comment}"),
                201,
            )
            .await
    {
        return p.into_response();
    }
    let body = RevisionStored {
        revision: rev,
        content_hash: hash,
        rules,
        changed: created,
        rolled_back_to,
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

pub(super) async fn apply_policy(
    c: Caller,
    State(s): State<Arc<Server>>,
    Body(b): Body<ApplyPolicy>,
) -> Response {
    if let Err(p) = c.require_admin() {
        return p.into_response();
    }
    revision_response(&s, &c.name, &b.files, &b.comment, "policy.apply", None).await
}

pub(super) async fn current_policy(
    _c: Caller,
    State(s): State<Arc<Server>>,
) -> Result<Json<PolicyInForce>, Problem> {
    let cur = s
        .store
        .latest_policy_revision()
        .await?
        .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, "no policy applied yet"))?;
    let files = serde_json::from_str(&cur.files).map_err(Problem::internal)?;
    Ok(Json(PolicyInForce {
        revision: cur.rev,
        author: cur.author,
        created_at: cur.created_at,
        content_hash: cur.content_hash,
        comment: cur.comment,
        files,
    }))
}

pub(super) async fn policy_history(
    _c: Caller,
    State(s): State<Arc<Server>>,
) -> Result<Json<Vec<PolicyRevisionInfo>>, Problem> {
    let rows = s.store.policy_history(1000).await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| PolicyRevisionInfo {
                revision: r.rev,
                author: r.author,
                created_at: r.created_at,
                content_hash: r.content_hash,
                comment: r.comment,
            })
            .collect(),
    ))
}

pub(super) async fn rollback_policy(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(rev): Path<i64>,
) -> Response {
    if let Err(p) = c.require_admin() {
        return p.into_response();
    }
    let old = match s.store.policy_revision(rev).await {
        Ok(r) => r,
        Err(e) => return Problem::from(e).into_response(),
    };
    let files: std::collections::BTreeMap<String, String> = match serde_json::from_str(&old.files) {
        Ok(f) => f,
        Err(e) => return Problem::internal(e).into_response(),
    };
    revision_response(
        &s,
        &c.name,
        &files,
        &format!("rollback to {rev}"),
        "policy.rollback",
        Some(rev),
    )
    .await
}
