//! Audit records as OCSF events (`castellan audit export --format ocsf`): each decision is an
//! OCSF 1.1 *API Activity* event (class 6003, category 6 Application Activity): the caller is the
//! actor, the destination service the API's service, method and path the HTTP request; allow is
//! status Success, deny Failure. Fields OCSF has no place for (rule, reason, mode, chain
//! position and hashes, origin) are kept under `unmapped`, so the record stays verifiable.

use serde_json::{Value, json};

/// OCSF API Activity.
const CLASS_UID: u64 = 6003;
/// Application Activity.
const CATEGORY_UID: u64 = 6;

/// The OCSF API Activity `activity_id` of an HTTP method.
fn activity(method: &str) -> (u64, &'static str) {
    match method {
        "POST" => (1, "Create"),
        "GET" | "HEAD" => (2, "Read"),
        "PUT" | "PATCH" => (3, "Update"),
        "DELETE" => (4, "Delete"),
        _ => (99, "Other"),
    }
}

/// One stored record (JSON) as an OCSF event; `None` for what is not a record.
pub fn event(record: &Value) -> Option<Value> {
    let s = |k: &str| record.get(k).and_then(Value::as_str).unwrap_or_default();
    let kind = s("kind");
    if kind.is_empty() {
        return None;
    }
    let method = s("method");
    let (activity_id, activity_name) = if kind == "decision" {
        activity(method)
    } else {
        (99, "Other")
    };
    let allowed = s("decision") == "allow";
    let (status_id, status) = if kind != "decision" {
        (99, "Other")
    } else if allowed {
        (1, "Success")
    } else {
        (2, "Failure")
    };
    let path = s("path");
    let (path_only, query) = match path.split_once('?') {
        Some((p, q)) => (p, q),
        None => (path, ""),
    };
    let mut url = json!({"path": path_only});
    if !query.is_empty()
        && let Some(o) = url.as_object_mut()
    {
        o.insert("query_string".to_owned(), json!(query));
    }
    let user = s("user");
    let mut actor = json!({"app_name": s("source")});
    if !user.is_empty()
        && let Some(o) = actor.as_object_mut()
    {
        o.insert(
            "user".to_owned(),
            json!({"uid": user, "name": user, "type_id": 1, "type": "User",
                   "account": {"uid": user, "name": user, "type_id": 99, "type": "Other"}}),
        );
    }
    Some(json!({
        "class_uid": CLASS_UID,
        "class_name": "API Activity",
        "category_uid": CATEGORY_UID,
        "category_name": "Application Activity",
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": CLASS_UID * 100 + activity_id,
        "time": record.get("time_ms").cloned().unwrap_or(Value::Null),
        "severity_id": if allowed || kind != "decision" { 1 } else { 3 },
        "severity": if allowed || kind != "decision" { "Informational" } else { "Medium" },
        "status_id": status_id,
        "status": status,
        "status_code": record.get("status").map(ToString::to_string).unwrap_or_default(),
        "metadata": {
            "version": "1.1.0",
            "uid": s("decision_id"),
            "log_name": s("writer"),
            "sequence": record.get("seq").cloned().unwrap_or(Value::Null),
            "correlation_uid": s("trace_id"),
            "product": {"name": "Castellan", "vendor_name": "Castellan", "version": env!("CARGO_PKG_VERSION")},
        },
        "actor": actor,
        "api": {
            "operation": method,
            "service": {"name": s("destination"), "uid": s("destination"), "version": ""},
            "request": {"uid": s("decision_id")},
        },
        "http_request": {"http_method": method, "url": url},
        "dst_endpoint": {"svc_name": s("destination")},
        "unmapped": {
            "kind": kind, "decision": s("decision"), "rule": s("rule"), "reason": s("reason"),
            "mode": s("mode"), "origin": s("origin"), "asked_by": s("asked_by"), "epoch": s("epoch"),
            "latency_us": record.get("latency_us").cloned().unwrap_or(Value::Null),
            "act": record.get("act").cloned().unwrap_or(json!([])),
            "seq": record.get("seq").cloned().unwrap_or(Value::Null),
            "prev_hash": s("prev_hash"), "hash": s("hash"),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denied_get_is_a_failed_read() {
        let r = json!({"kind": "decision", "writer": "gw", "seq": 3, "decision_id": "d1",
                       "time_ms": 5, "source": "spiffe://td/svc/gateway", "user": "alice",
                       "destination": "orders", "method": "GET", "path": "/orders/7?x=1",
                       "decision": "deny", "status": 403});
        let e = event(&r).unwrap();
        assert_eq!(e["type_uid"], 600302);
        assert_eq!(e["status_id"], 2);
        assert_eq!(e["actor"]["user"]["uid"], "alice");
        assert_eq!(e["http_request"]["url"]["query_string"], "x=1");
        assert_eq!(e["status_code"], "403");
        assert!(event(&json!({})).is_none());
    }
}
