//! Anomaly signals from the audit stream, checked as batches are stored: a caller→callee edge
//! never seen before, a user first seen on a service, and a deny spike per source or per user
//! (more denies in a minute than both a floor and a multiple of the previous minutes' average).
//! Each event is claimed in the store (one row per event: with several replicas on PostgreSQL
//! only the first to claim it alerts), then sent to the anomaly webhook (retried with backoff),
//! logged and counted, with the decision ids that triggered it. Questions asked through an API
//! (AuthZEN) are not traffic and are left out.

use crate::Server;
use crate::config::AnomalyConfig;
use castellan_audit::AuditRecord;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

/// Minutes of deny counts kept as the baseline of a spike.
const BASELINE_MINUTES: usize = 10;
/// Most keys remembered as already seen (edges, users per service) before the cache is emptied
/// (the store still knows them).
const MAX_SEEN: usize = 100_000;
/// Most keys whose deny counts are kept.
const MAX_COUNTED: usize = 50_000;

/// What one traffic record contributes.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    time_ms: i64,
    decision_id: String,
    source: String,
    user: String,
    destination: String,
    denied: bool,
}

impl Seen {
    /// The fields anomalies look at, for enforced traffic only.
    pub(crate) fn of(r: &AuditRecord) -> Option<Seen> {
        r.is_traffic().then(|| Seen {
            time_ms: r.time_ms,
            decision_id: r.decision_id.clone(),
            source: r.source.clone(),
            user: r.user.clone(),
            destination: r.destination.clone(),
            denied: r.decision == "deny",
        })
    }
}

/// Deny counts of one key: the current minute and the minutes before it.
#[derive(Debug, Default)]
struct Counts {
    minute: i64,
    count: u64,
    ids: Vec<String>,
    history: VecDeque<u64>,
}

/// The detector's memory (per replica; events are deduplicated in the store).
#[derive(Debug, Default)]
pub(crate) struct Detector {
    seen: Mutex<HashSet<String>>,
    denies: Mutex<HashMap<String, Counts>>,
}

/// An event to claim and send.
#[derive(Debug)]
struct Event {
    kind: &'static str,
    key: String,
    body: Value,
}

impl Detector {
    /// The events a stored batch raises (before they are claimed).
    fn events(&self, cfg: &AnomalyConfig, batch: &[Seen]) -> Vec<Event> {
        let mut out = Vec::new();
        if let Ok(mut seen) = self.seen.lock() {
            if seen.len() > MAX_SEEN {
                seen.clear();
            }
            for r in batch {
                if r.source.is_empty() || r.destination.is_empty() {
                    continue;
                }
                let edge = format!("{} -> {}", r.source, r.destination);
                if seen.insert(format!("edge\0{edge}")) {
                    out.push(Event {
                        kind: "new-edge",
                        key: edge,
                        body: json!({"source": r.source, "destination": r.destination,
                                     "decision_ids": [r.decision_id], "at_ms": r.time_ms}),
                    });
                }
                if !r.user.is_empty() && seen.insert(format!("user\0{}\0{}", r.destination, r.user))
                {
                    out.push(Event {
                        kind: "new-user-on-service",
                        key: format!("{} @ {}", r.user, r.destination),
                        body: json!({"user": r.user, "service": r.destination,
                                     "decision_ids": [r.decision_id], "at_ms": r.time_ms}),
                    });
                }
            }
        }
        if let Ok(mut denies) = self.denies.lock() {
            if denies.len() > MAX_COUNTED {
                denies.clear();
            }
            for r in batch.iter().filter(|r| r.denied) {
                let minute = r.time_ms.div_euclid(60_000);
                for (what, who) in [("source", &r.source), ("user", &r.user)] {
                    if who.is_empty() {
                        continue;
                    }
                    let c = denies.entry(format!("{what}\0{who}")).or_default();
                    if minute < c.minute {
                        // A late record of a closed minute (a spool catching up): it neither
                        // resets nor inflates the current minute.
                        continue;
                    }
                    if c.minute != minute {
                        // Close the minutes between (zeros for quiet ones).
                        let gap = (minute - c.minute).clamp(0, BASELINE_MINUTES as i64);
                        if c.minute != 0 {
                            c.history.push_back(c.count);
                            for _ in 1..gap {
                                c.history.push_back(0);
                            }
                        }
                        while c.history.len() > BASELINE_MINUTES {
                            c.history.pop_front();
                        }
                        c.minute = minute;
                        c.count = 0;
                        c.ids.clear();
                    }
                    c.count += 1;
                    if c.ids.len() < 20 {
                        c.ids.push(r.decision_id.clone());
                    }
                    let baseline = if c.history.is_empty() {
                        0.0
                    } else {
                        c.history.iter().sum::<u64>() as f64 / c.history.len() as f64
                    };
                    let threshold =
                        (cfg.deny_spike_over as f64).max(baseline * cfg.deny_spike_factor as f64);
                    // Fires on the crossing only; the store makes it once per key and minute.
                    if c.count as f64 > threshold && (c.count - 1) as f64 <= threshold {
                        out.push(Event {
                            kind: "deny-spike",
                            key: format!("{what} {who} minute {minute}"),
                            body: json!({what: who, "denies_this_minute": c.count,
                                         "baseline_per_minute": baseline, "threshold": threshold,
                                         "decision_ids": c.ids, "at_ms": r.time_ms}),
                        });
                    }
                }
            }
        }
        out
    }
}

/// Checks a stored batch; claims and sends the events it raises.
pub(crate) async fn observe(s: &Server, batch: Vec<Seen>) {
    let Some(cfg) = s.cfg.anomalies.as_ref() else {
        return;
    };
    if batch.is_empty() {
        return;
    }
    for e in s.anomalies.events(cfg, &batch) {
        let at = e.body.get("at_ms").and_then(Value::as_i64).unwrap_or(0);
        match s
            .store
            .claim_anomaly(e.kind, &e.key, at, &e.body.to_string())
            .await
        {
            Ok(true) => {}
            Ok(false) => continue, // another replica (or an earlier start) had it
            Err(err) => {
                tracing::warn!(error = %err, "anomaly not recorded");
                continue;
            }
        }
        metrics::counter!("castellan_server_anomalies_total", "kind" => e.kind).increment(1);
        tracing::warn!(kind = e.kind, key = %e.key, "anomaly");
        let mut body = e.body;
        if let Some(o) = body.as_object_mut() {
            o.insert("alert".to_owned(), json!("anomaly"));
            o.insert("kind".to_owned(), json!(e.kind));
            o.insert("key".to_owned(), json!(e.key));
        }
        crate::alerts::send(&cfg.webhook, cfg.ca_file.as_deref(), body.to_string());
    }
}
