//! `castellan access report`: what the policy in force grants against what the window's traffic
//! used (`GET /v1/access/report`). Rules never matched; catch-all paths and caller globs used for
//! only a few concrete values; callers and users per rule; services with a policy and no traffic;
//! audit-mode services where policy would have denied. Records are streamed like the impact
//! replay; only enforced traffic counts (not AuthZEN questions).

use crate::Server;
use crate::problem::Problem;
use castellan_policy::PolicySet;
use castellan_policy::principal::ServicePattern;
use castellan_policy::template::Segment;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

/// Distinct values kept per rule and kind.
const MAX_DISTINCT: usize = 200;
/// A wildcard used for at most this many concrete values is reported as over-broad.
const FEW: usize = 3;

#[derive(Debug, Default)]
struct RuleUse {
    allowed: u64,
    denied: u64,
    callers: BTreeSet<String>,
    users: BTreeSet<String>,
    paths: BTreeSet<String>,
    methods: BTreeSet<String>,
}

fn insert_capped(set: &mut BTreeSet<String>, v: &str) {
    if set.len() < MAX_DISTINCT && !v.is_empty() {
        set.insert(v.to_owned());
    }
}

/// The report over the window from `since_ms` for the policy set `set`.
pub async fn report(s: &Server, set: &PolicySet, since_ms: i64) -> Result<Value, Problem> {
    let mut uses: BTreeMap<String, RuleUse> = BTreeMap::new();
    let mut traffic: BTreeMap<String, u64> = BTreeMap::new();
    let mut would_deny: BTreeMap<String, u64> = BTreeMap::new();
    let mut scanned = 0u64;
    crate::impact::scan_window(s, since_ms, "", |r| {
        scanned += 1;
        let Some(r) = r else { return };
        if !r.is_traffic() {
            return;
        }
        *traffic.entry(r.destination.clone()).or_default() += 1;
        if r.mode == "audit" && matches!(r.reason.as_str(), "no-matching-allow" | "matched-deny") {
            *would_deny.entry(r.destination.clone()).or_default() += 1;
        }
        if r.rule.is_empty() || matches!(r.reason.as_str(), "rate-limited") {
            return;
        }
        let u = uses.entry(r.rule.clone()).or_default();
        if r.decision == "allow" {
            u.allowed += 1;
        } else {
            u.denied += 1;
        }
        insert_capped(&mut u.callers, &r.source);
        insert_capped(&mut u.users, &r.user);
        insert_capped(&mut u.paths, r.path.split('?').next().unwrap_or(""));
        insert_capped(&mut u.methods, &r.method);
    })
    .await?;
    let empty = RuleUse::default();
    let mut rules = Vec::new();
    let mut findings = Vec::new();
    for rule in set.rules() {
        let id = rule.id.to_string();
        let u = uses.get(&id).unwrap_or(&empty);
        let matched = u.allowed + u.denied;
        rules.push(json!({
            "rule": id, "effect": rule.effect.to_string(), "matched": matched,
            "allowed": u.allowed, "denied": u.denied,
            "callers": u.callers, "users": u.users.len(), "user_ids": u.users.iter().take(20).collect::<Vec<_>>(),
            "paths": u.paths.iter().take(20).collect::<Vec<_>>(), "methods": u.methods,
        }));
        if matched == 0 {
            findings.push(json!({"kind": "unused-rule", "rule": id,
                "detail": "never matched in the window"}));
            continue;
        }
        let catch_all = rule.to.paths.as_ref().is_some_and(|ts| {
            ts.iter()
                .any(|t| t.segments.iter().any(|s| matches!(s, Segment::CatchAll(_))))
        });
        if (catch_all || rule.to.paths.is_none()) && u.paths.len() <= FEW {
            findings.push(json!({"kind": "wide-path", "rule": id,
                "detail": format!("a path wildcard used for only {} concrete path(s)", u.paths.len()),
                "used": u.paths}));
        }
        let glob_callers = match &rule.from.services {
            None => true,
            Some(ps) => ps.iter().any(|p| {
                matches!(
                    p,
                    ServicePattern::NamePrefix(_) | ServicePattern::SpiffePrefix(_)
                )
            }),
        };
        if glob_callers && u.callers.len() <= FEW {
            findings.push(json!({"kind": "wide-callers", "rule": id,
                "detail": format!("a caller wildcard used by only {} caller(s)", u.callers.len()),
                "used": u.callers}));
        }
    }
    for (svc, mode) in set.services() {
        if traffic.get(svc).copied().unwrap_or(0) == 0 {
            findings.push(json!({"kind": "idle-service", "service": svc,
                "detail": "has a policy and received no traffic in the window"}));
        }
        if let Some(n) = would_deny.get(svc) {
            findings.push(json!({"kind": "audit-would-deny", "service": svc, "mode": mode.to_string(),
                "count": n, "detail": format!("{n} call(s) allowed in audit mode that enforcing would deny")}));
        }
    }
    Ok(json!({
        "since_ms": since_ms, "scanned": scanned,
        "traffic": traffic, "rules": rules, "findings": findings,
    }))
}
