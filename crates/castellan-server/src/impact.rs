//! What a candidate policy set would change: the stored decisions of a window, replayed against
//! it (`POST /v1/policy/impact`, `castellan policy impact`, `policy apply --dry-run`).
//!
//! Only enforced traffic is replayed: decision records (not gaps or admin actions), not asked
//! through an API (`origin: authzen`), of a policy decision (not refused before one: framing,
//! credentials, routing), carrying their inputs. A record whose inputs lack something the
//! candidate can read (a header it did not keep, a query value that was masked) is counted as
//! *indeterminate*, never guessed. Records are streamed page by page; memory is bounded by the
//! number of distinct changes (each keeps capped caller and user sets and a few examples).

use crate::Server;
use crate::problem::Problem;
use castellan_audit::{AuditRecord, Kind};
use castellan_policy::{Decision, Destination, HttpRequest, PolicySet, Request, Source, User};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

/// Records fetched per page.
const PAGE: i64 = 5000;
/// Distinct callers / users kept per change (counts beyond are reported as at least this).
const MAX_DISTINCT: usize = 1000;
/// Examples kept per change.
const MAX_EXAMPLES: usize = 5;

/// Reasons of decisions the policy made (others are refusals around it).
const POLICY_REASONS: &[&str] = &[
    "matched-allow",
    "matched-deny",
    "no-matching-allow",
    "malformed-request",
    "condition-error",
];

/// How a replayed decision differs from the recorded one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// Allowed then, denied by the candidate.
    NewlyDenied,
    /// Denied then, allowed by the candidate.
    NewlyAllowed,
    /// Same outcome, another deciding rule.
    RuleChanged,
}

impl Change {
    /// As printed and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::NewlyDenied => "newly-denied",
            Change::NewlyAllowed => "newly-allowed",
            Change::RuleChanged => "rule-changed",
        }
    }
}

/// One group of changed calls: same service, change and rules.
#[derive(Debug, Default)]
struct Group {
    count: u64,
    callers: BTreeSet<String>,
    users: BTreeSet<String>,
    examples: Vec<Value>,
}

/// The outcome of a replay.
#[derive(Debug, Default)]
pub struct Report {
    /// Records read in the window.
    pub scanned: u64,
    /// Records replayed (enforced-traffic policy decisions with their inputs).
    pub replayed: u64,
    /// Replayed with the same outcome and rule.
    pub unchanged: u64,
    /// Records the candidate cannot be replayed on (inputs missing, masked or never kept).
    pub indeterminate: u64,
    /// Records not of enforced-traffic policy decisions (API questions, refusals before a
    /// decision, gaps, admin actions).
    pub skipped: u64,
    groups: BTreeMap<(String, Change, String, String), Group>,
}

/// Why a record cannot be replayed on a candidate, if it cannot.
fn indeterminate(r: &AuditRecord, candidate: &PolicySet) -> Option<&'static str> {
    let inputs = r.inputs.as_ref()?;
    let reads = candidate.reads();
    let all = inputs.read_headers.iter().any(|h| h == "*");
    if reads.any_header && !all {
        return Some("the candidate reads headers the record did not keep");
    }
    for h in &reads.headers {
        let kept = inputs.read_headers.iter().any(|k| k == h)
            || (all
                && !matches!(
                    h.as_str(),
                    "authorization" | "proxy-authorization" | "cookie" | "x-api-key"
                ));
        if !kept {
            return Some("the candidate reads a header the record did not keep");
        }
    }
    if reads.user_sub && r.user.starts_with(castellan_audit::PSEUDONYM_PREFIX) {
        return Some("the candidate reads the user's id, which the record pseudonymised");
    }
    if reads.query && r.path.contains("=REDACTED") {
        return Some("the candidate reads the query, whose values the record masked");
    }
    None
}

/// The policy request a record's decision was made on.
fn request_of(r: &AuditRecord) -> Option<Request> {
    let inputs = r.inputs.as_ref()?;
    let user = (!r.user.is_empty()).then(|| User {
        sub: Some(r.user.clone()),
        roles: inputs.roles.clone(),
        claims: inputs
            .claims
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        act: r.act.clone(),
    });
    Some(Request {
        source: (!r.source.is_empty()).then(|| Source {
            service: None,
            spiffe_id: Some(r.source.clone()),
        }),
        user,
        destination: Destination {
            service: r.destination.clone(),
        },
        request: HttpRequest {
            method: r.method.clone(),
            path: r.path.clone(),
            host: inputs.host.clone(),
            headers: inputs.headers.clone().into_iter().collect(),
        },
        time: chrono::DateTime::from_timestamp_millis(r.time_ms).map(|t| t.fixed_offset()),
    })
}

fn rule_of(d: &Decision) -> String {
    d.rule.as_ref().map(ToString::to_string).unwrap_or_default()
}

impl Report {
    /// Replays one stored record.
    pub fn add(&mut self, r: &AuditRecord, candidate: &PolicySet) {
        self.scanned += 1;
        // Enforced traffic with a policy decision: the record kept its inputs; refusals before
        // a decision and after it (rate limits, request validation) are not the policy's.
        if !r.is_traffic() || matches!(r.reason.as_str(), "rate-limited" | "invalid-request") {
            self.skipped += 1;
            return;
        }
        if r.inputs.is_none() {
            // A policy decision written before records kept their inputs cannot be judged;
            // a refusal before any decision is not the policy's.
            if r.kind == Kind::Decision && POLICY_REASONS.contains(&r.reason.as_str()) {
                self.indeterminate += 1;
            } else {
                self.skipped += 1;
            }
            return;
        }
        // What made a request malformed (a bad header name, say) may not be in its inputs.
        if r.reason == "malformed-request" || indeterminate(r, candidate).is_some() {
            self.indeterminate += 1;
            return;
        }
        let Some(req) = request_of(r) else {
            self.indeterminate += 1;
            return;
        };
        self.replayed += 1;
        let d = candidate.decide(&req);
        let was_allowed = r.decision == "allow";
        let new_rule = rule_of(&d);
        let change = match (was_allowed, d.is_allowed()) {
            (true, false) => Change::NewlyDenied,
            (false, true) => Change::NewlyAllowed,
            _ if new_rule != r.rule => Change::RuleChanged,
            _ => {
                self.unchanged += 1;
                return;
            }
        };
        let g = self
            .groups
            .entry((r.destination.clone(), change, r.rule.clone(), new_rule))
            .or_default();
        g.count += 1;
        if g.callers.len() < MAX_DISTINCT {
            g.callers.insert(r.source.clone());
        }
        if g.users.len() < MAX_DISTINCT && !r.user.is_empty() {
            g.users.insert(r.user.clone());
        }
        if g.examples.len() < MAX_EXAMPLES {
            g.examples.push(json!({
                "decision_id": r.decision_id, "source": r.source, "user": r.user,
                "method": r.method, "path": r.path, "reason": d.reason.as_str(),
            }));
        }
    }

    /// How many calls would change this way.
    pub fn count(&self, change: Change) -> u64 {
        self.groups
            .iter()
            .filter(|((_, c, _, _), _)| *c == change)
            .map(|(_, g)| g.count)
            .sum()
    }

    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        let changes: Vec<Value> = self
            .groups
            .iter()
            .map(|((service, change, from, to), g)| {
                json!({
                    "service": service, "change": change.as_str(),
                    "from_rule": from, "to_rule": to, "count": g.count,
                    "callers": g.callers.len(), "users": g.users.len(),
                    "caller_ids": g.callers.iter().take(10).collect::<Vec<_>>(),
                    "examples": g.examples,
                })
            })
            .collect();
        json!({
            "scanned": self.scanned, "replayed": self.replayed, "unchanged": self.unchanged,
            "indeterminate": self.indeterminate, "skipped": self.skipped,
            "newly_denied": self.count(Change::NewlyDenied),
            "newly_allowed": self.count(Change::NewlyAllowed),
            "rule_changed": self.count(Change::RuleChanged),
            "changes": changes,
        })
    }
}

/// A page being read while the previous one is processed; dropped (a request given up), it
/// stops reading.
pub(crate) struct Prefetch<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for Prefetch<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Calls `f` with every stored record of the window (`since_ms` on, of `service` when not
/// empty) in (time, writer, seq) order, page by page; `None` for a row that is not a record.
/// The next page is read while this one is parsed and replayed (two cores: the database's
/// worker and this task).
pub(crate) async fn scan_window(
    s: &Server,
    since_ms: i64,
    service: &str,
    mut f: impl FnMut(Option<AuditRecord>),
) -> Result<(), Problem> {
    let fetch = |cursor: Option<(i64, String, i64)>| {
        let (store, service) = (s.store.clone(), service.to_owned());
        Prefetch(tokio::spawn(async move {
            store
                .audit_window(
                    since_ms,
                    &service,
                    cursor.as_ref().map(|(t, w, q)| (*t, w.as_str(), *q)),
                    PAGE,
                )
                .await
        }))
    };
    let mut pending = fetch(None);
    loop {
        let rows = (&mut pending.0).await.map_err(Problem::internal)??;
        let next = match rows.last() {
            Some(last) if rows.len() as i64 == PAGE => {
                Some(fetch(Some((last.time_ms, last.writer.clone(), last.seq))))
            }
            _ => None,
        };
        for row in &rows {
            f(serde_json::from_str::<AuditRecord>(&row.record).ok());
        }
        match next {
            Some(n) => pending = n,
            None => return Ok(()),
        }
    }
}

/// Replays the window's stored records (`since_ms` on, of `service` when not empty) against
/// `candidate`.
pub async fn replay(
    s: &Server,
    candidate: &PolicySet,
    since_ms: i64,
    service: &str,
) -> Result<Report, Problem> {
    let mut report = Report::default();
    scan_window(s, since_ms, service, |r| match r {
        Some(r) => report.add(&r, candidate),
        None => {
            report.scanned += 1;
            report.indeterminate += 1;
        }
    })
    .await?;
    Ok(report)
}

/// Distinct callers / paths kept per rule by [`usage`]; past this a rule is reported truncated
/// (and `policy suggest` leaves that part of it as written).
const MAX_USED: usize = 1000;

/// What the window's allowed traffic used of one candidate rule.
#[derive(Debug, Default)]
struct RuleUsage {
    calls: u64,
    callers: BTreeSet<String>,
    no_caller: bool,
    methods: BTreeSet<String>,
    paths: BTreeSet<String>,
    truncated: bool,
    indeterminate: u64,
}

/// Which candidate rule decides each call the window allowed, and what those calls were
/// (callers, methods, paths without query): the evidence `castellan policy suggest` narrows a
/// policy set to. Calls that cannot be replayed are counted against the rule that allowed them
/// then (or their service, when the candidate has no such rule), so suggest leaves those alone.
pub async fn usage(
    s: &Server,
    candidate: &PolicySet,
    since_ms: i64,
    service: &str,
) -> Result<Value, Problem> {
    let known: BTreeSet<&str> = candidate.rules().iter().map(|r| &*r.id).collect();
    let mut rules: BTreeMap<String, RuleUsage> = BTreeMap::new();
    let mut services: BTreeMap<String, u64> = BTreeMap::new();
    let mut scanned = 0u64;
    let mut replayed = 0u64;
    scan_window(s, since_ms, service, |r| {
        scanned += 1;
        let Some(r) = r else { return };
        // Only calls that were served count as used.
        if !r.is_traffic() || r.decision != "allow" || r.reason != "matched-allow" {
            return;
        }
        let req = if r.inputs.is_none() || indeterminate(&r, candidate).is_some() {
            None
        } else {
            request_of(&r)
        };
        let Some(req) = req else {
            if known.contains(r.rule.as_str()) {
                rules.entry(r.rule.clone()).or_default().indeterminate += 1;
            } else {
                *services.entry(r.destination.clone()).or_default() += 1;
            }
            return;
        };
        replayed += 1;
        let d = candidate.decide(&req);
        let (true, Some(rule)) = (d.is_allowed(), d.rule.as_deref()) else {
            return;
        };
        let u = rules.entry(rule.to_owned()).or_default();
        u.calls += 1;
        if r.source.is_empty() {
            u.no_caller = true;
        } else if u.callers.len() < MAX_USED {
            u.callers.insert(r.source.clone());
        } else if !u.callers.contains(&r.source) {
            u.truncated = true;
        }
        u.methods.insert(r.method.clone());
        // The path as the engine matched it (a record's raw path is the writer's word).
        let Ok(target) = castellan_policy::normalize_target(&r.path) else {
            u.truncated = true;
            return;
        };
        let path: &str = &target.path;
        if u.paths.len() < MAX_USED {
            u.paths.insert(path.to_owned());
        } else if !u.paths.contains(path) {
            u.truncated = true;
        }
    })
    .await?;
    let rules: BTreeMap<String, Value> = rules
        .into_iter()
        .map(|(id, u)| {
            let v = json!({
                "calls": u.calls, "callers": u.callers, "no_caller": u.no_caller,
                "methods": u.methods, "paths": u.paths, "truncated": u.truncated,
                "indeterminate": u.indeterminate,
            });
            (id, v)
        })
        .collect();
    Ok(json!({
        "since_ms": since_ms, "scanned": scanned, "replayed": replayed,
        "rules": rules, "indeterminate_services": services,
    }))
}
