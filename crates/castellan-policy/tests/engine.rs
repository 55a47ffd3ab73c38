//! Engine semantics through the public API: deny overrides, default deny, audit mode, fail-closed
//! conditions, the unauthenticated-caller exception, identity matching, and revision swaps.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use castellan_policy::{Effect, Engine, LoadError, Mode, PolicySet, Reason, Request};
use serde_json::json;
use std::sync::Arc;

fn set(yaml: &str) -> PolicySet {
    PolicySet::from_sources([("test.yaml", yaml)]).unwrap_or_else(|e| panic!("{e}"))
}

fn req(v: serde_json::Value) -> Request {
    serde_json::from_value(v).unwrap()
}

fn call(src: Option<&str>, roles: &[&str], method: &str, path: &str) -> Request {
    let mut v = json!({"destination": {"service": "orders"},
                       "request": {"method": method, "path": path, "host": "orders"}});
    if let Some(s) = src {
        v["source"] = json!({"service": s});
    }
    if !roles.is_empty() {
        v["user"] = json!({"sub": "u1", "roles": roles, "claims": {"tenant": "t1"}});
    }
    req(v)
}

const BASE: &str = r#"
apiVersion: castellan/v1
kind: AccessPolicy
metadata: {name: p}
spec:
  service: orders
  rules:
    - name: read
      effect: allow
      from: {services: [gateway]}
      to: {methods: [GET], paths: ["/orders/{id}", "/orders"]}
    - name: no-secret
      effect: deny
      to: {paths: ["/orders/secret"]}
    - name: public
      effect: allow
      from: {authenticated: false}
      to: {methods: [GET], paths: ["/health"]}
    - name: files
      effect: allow
      from: {services: [gateway]}
      to: {paths: ["/files/{*rest}"]}
      when: "params.rest.startsWith('pub/')"
    - name: tenant
      effect: allow
      from: {services: [gateway], users: {claims: {tenant: t1}}}
      to: {methods: [PUT], paths: ["/orders/{id}"]}
    - name: cel-error-deny
      effect: deny
      to: {paths: ["/boom"]}
      when: "request.headers['x-missing'] == 'y'"
"#;

#[test]
fn allow_deny_and_default_deny() {
    let s = set(BASE);
    let d = s.decide(&call(Some("gateway"), &[], "GET", "/orders/7"));
    assert_eq!(
        (d.decision, d.reason, d.rule.as_deref()),
        (Effect::Allow, Reason::MatchedAllow, Some("p/read"))
    );
    // Deny overrides allow, and a deny rule without `from` applies to everyone.
    let d = s.decide(&call(Some("gateway"), &[], "GET", "/orders/secret"));
    assert_eq!(
        (d.decision, d.reason, d.rule.as_deref()),
        (Effect::Deny, Reason::MatchedDeny, Some("p/no-secret"))
    );
    let d = s.decide(&call(None, &[], "GET", "/orders/secret"));
    assert_eq!(d.reason, Reason::MatchedDeny);
    // Nothing matches: default deny, no rule.
    let d = s.decide(&call(Some("gateway"), &[], "DELETE", "/orders/7"));
    assert_eq!(
        (d.decision, d.reason, d.rule),
        (Effect::Deny, Reason::NoMatchingAllow, None)
    );
    // A template matches with or without one trailing slash, not two segments.
    assert!(
        s.decide(&call(Some("gateway"), &[], "GET", "/orders/7/"))
            .is_allowed()
    );
    assert!(
        s.decide(&call(Some("gateway"), &[], "GET", "/orders"))
            .is_allowed()
    );
    assert!(
        !s.decide(&call(Some("gateway"), &[], "GET", "/orders/7/8"))
            .is_allowed()
    );
}

#[test]
fn unauthenticated_callers_match_only_rules_that_say_so() {
    let s = set(BASE);
    assert!(s.decide(&call(None, &[], "GET", "/health")).is_allowed());
    assert!(
        s.decide(&call(Some("anyone"), &[], "GET", "/health"))
            .is_allowed()
    );
    let d = s.decide(&call(None, &[], "GET", "/orders/7"));
    assert_eq!(d.reason, Reason::NoMatchingAllow);
}

#[test]
fn catch_all_params_and_conditions() {
    let s = set(BASE);
    assert!(
        s.decide(&call(Some("gateway"), &[], "GET", "/files/pub/a/b.txt"))
            .is_allowed()
    );
    assert!(
        !s.decide(&call(Some("gateway"), &[], "GET", "/files/priv/a"))
            .is_allowed()
    );
    assert!(
        !s.decide(&call(Some("gateway"), &[], "GET", "/files"))
            .is_allowed()
    );
    // Dot segments are resolved before matching, so they cannot smuggle a prefix.
    assert!(
        !s.decide(&call(Some("gateway"), &[], "GET", "/files/pub/../priv/x"))
            .is_allowed()
    );
}

#[test]
fn claims_compare_with_their_json_type() {
    let s = set(BASE);
    assert!(
        s.decide(&call(Some("gateway"), &["x"], "PUT", "/orders/1"))
            .is_allowed()
    );
    let mut r = call(Some("gateway"), &["x"], "PUT", "/orders/1");
    r.user
        .as_mut()
        .unwrap()
        .claims
        .insert("tenant".into(), json!(["t0", "t1"]));
    assert!(
        s.decide(&r).is_allowed(),
        "array claims match by membership"
    );
    r.user
        .as_mut()
        .unwrap()
        .claims
        .insert("tenant".into(), json!({"t1": true}));
    assert!(!s.decide(&r).is_allowed());
    // No user at all: a users clause never matches.
    assert!(
        !s.decide(&call(Some("gateway"), &[], "PUT", "/orders/1"))
            .is_allowed()
    );
}

#[test]
fn condition_errors_fail_closed() {
    let s = set(BASE);
    // A deny rule whose condition errors matches.
    let d = s.decide(&call(Some("gateway"), &[], "GET", "/boom"));
    assert_eq!(
        (d.decision, d.reason, d.rule.as_deref()),
        (
            Effect::Deny,
            Reason::ConditionError,
            Some("p/cel-error-deny")
        )
    );
    // An allow rule whose condition errors does not match.
    let s = set(r#"
apiVersion: castellan/v1
kind: AccessPolicy
metadata: {name: q}
spec:
  service: orders
  rules:
    - name: typed
      effect: allow
      from: {services: [gateway]}
      when: "user.claims.level > 3"
    - name: not-bool
      effect: allow
      from: {services: [gateway]}
      to: {paths: ["/n"]}
      when: "'yes'"
"#);
    let mut r = call(Some("gateway"), &["r"], "GET", "/x");
    r.user
        .as_mut()
        .unwrap()
        .claims
        .insert("level".into(), json!("high"));
    let d = s.decide(&r);
    assert_eq!(
        (d.decision, d.reason, d.rule.as_deref()),
        (Effect::Deny, Reason::ConditionError, Some("q/typed"))
    );
    r.user
        .as_mut()
        .unwrap()
        .claims
        .insert("level".into(), json!(5));
    assert!(s.decide(&r).is_allowed());
    let d = s.decide(&call(Some("gateway"), &[], "GET", "/n"));
    assert_eq!(
        d.reason,
        Reason::ConditionError,
        "a non-boolean result is an error"
    );
}

#[test]
fn audit_mode_allows_would_be_denials_and_says_why() {
    let s = set(&BASE.replace("service: orders", "service: orders\n  mode: audit"));
    let d = s.decide(&call(Some("gateway"), &[], "DELETE", "/orders/7"));
    assert_eq!(
        (d.decision, d.mode, d.reason),
        (Effect::Allow, Mode::Audit, Reason::NoMatchingAllow)
    );
    let d = s.decide(&call(Some("gateway"), &[], "GET", "/orders/secret"));
    assert_eq!(
        (d.decision, d.reason, d.rule.as_deref()),
        (Effect::Allow, Reason::MatchedDeny, Some("p/no-secret"))
    );
    // Malformed requests are refused even in audit mode.
    let d = s.decide(&call(Some("gateway"), &[], "GET", "/%2F"));
    assert_eq!(
        (d.decision, d.reason),
        (Effect::Deny, Reason::MalformedRequest)
    );
}

#[test]
fn mesh_default_mode_applies_to_services_without_policy() {
    let mesh = "apiVersion: castellan/v1\nkind: MeshConfig\nmetadata: {name: m}\nspec: {defaultMode: audit}\n";
    let s = PolicySet::from_sources([("m.yaml", mesh), ("p.yaml", BASE)]).unwrap();
    let mut r = call(Some("gateway"), &[], "GET", "/");
    r.destination.service = "unknown".into();
    let d = s.decide(&r);
    assert_eq!(
        (d.decision, d.mode, d.reason),
        (Effect::Allow, Mode::Audit, Reason::NoMatchingAllow)
    );
    let d = set(BASE).decide(&r);
    assert_eq!((d.decision, d.mode), (Effect::Deny, Mode::Enforce));
}

#[test]
fn identities_of_other_trust_domains_need_full_ids() {
    let s = set(r#"
apiVersion: castellan/v1
kind: AccessPolicy
metadata: {name: ids}
spec:
  service: orders
  rules:
    - name: local
      effect: allow
      from: {services: [gateway]}
      to: {paths: ["/a"]}
    - name: istio
      effect: allow
      from: {services: ["spiffe://cluster.local/ns/shop/sa/*"]}
      to: {paths: ["/b"]}
"#);
    let id = |i: &str, p: &str| {
        req(
            json!({"source": {"spiffe_id": i}, "destination": {"service": "orders"},
                   "request": {"method": "GET", "path": p}}),
        )
    };
    assert!(
        s.decide(&id("spiffe://castellan.local/svc/gateway", "/a"))
            .is_allowed()
    );
    assert!(
        !s.decide(&id("spiffe://other.org/svc/gateway", "/a"))
            .is_allowed()
    );
    assert!(
        s.decide(&id("spiffe://cluster.local/ns/shop/sa/orders", "/b"))
            .is_allowed()
    );
    assert!(
        !s.decide(&id("spiffe://cluster.local/ns/shop/sa/orders/x", "/b"))
            .is_allowed()
    );
    assert!(
        !s.decide(&id("spiffe://cluster.local/ns/shopping/sa/orders", "/b"))
            .is_allowed()
    );
    // A malformed SPIFFE ID is a malformed request, not an anonymous one.
    assert_eq!(
        s.decide(&id("spiffe://Bad/svc/x", "/a")).reason,
        Reason::MalformedRequest
    );
}

#[test]
fn hosts_compare_case_insensitively_without_port() {
    let s = set(r#"
apiVersion: castellan/v1
kind: AccessPolicy
metadata: {name: h}
spec:
  service: orders
  rules:
    - name: host
      effect: allow
      from: {services: [gateway]}
      to: {hosts: [Orders.Example]}
"#);
    let mut r = call(Some("gateway"), &[], "GET", "/");
    for (host, ok) in [
        ("orders.example", true),
        ("ORDERS.EXAMPLE:443", true),
        ("orders.example.", true),
        ("orders.example.evil", false),
        ("", false),
    ] {
        r.request.host = host.into();
        assert_eq!(s.decide(&r).is_allowed(), ok, "{host}");
    }
}

#[test]
fn every_load_error_is_reported_with_its_place() {
    let bad = "apiVersion: castellan/v1\nkind: AccessPolicy\nmetadata: {name: x}\nspec:\n  service: orders\n  extra: 1\n  rules:\n    - {name: a, effect: maybe}\n    - {name: a, effect: allow, to: {paths: ['/x/{id}/{id}']}}\n";
    let Err(LoadError::Invalid(d)) = PolicySet::from_sources([("bad.yaml", bad)]) else {
        panic!()
    };
    let lines: Vec<String> = d.iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), 4, "{lines:#?}");
    assert!(
        lines[0].starts_with("bad.yaml:6:3: unknown field \"extra\""),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("bad.yaml:8:25: unknown effect"),
        "{}",
        lines[1]
    );
    assert!(lines[2].contains("duplicate rule name") || lines[3].contains("duplicate rule name"));
    assert!(lines.iter().any(|l| l.contains("appears twice")));
}

#[test]
fn conflicting_modes_and_bad_yaml_are_rejected() {
    let a = "apiVersion: castellan/v1\nkind: AccessPolicy\nmetadata: {name: a}\nspec: {service: s, mode: audit, rules: [{name: r, effect: allow}]}\n";
    let b = "apiVersion: castellan/v1\nkind: AccessPolicy\nmetadata: {name: b}\nspec: {service: s, rules: [{name: r, effect: allow}]}\n";
    let Err(LoadError::Invalid(d)) = PolicySet::from_sources([("a.yaml", a), ("b.yaml", b)]) else {
        panic!()
    };
    assert!(
        d[0].message
            .contains("all policies of a service must agree"),
        "{:?}",
        d
    );
    let Err(LoadError::Invalid(d)) = PolicySet::from_sources([("c.yaml", "a: [1, 2\n")]) else {
        panic!()
    };
    assert!(d[0].message.starts_with("invalid YAML"));
    let Err(LoadError::Invalid(d)) =
        PolicySet::from_sources([("d.yaml", "apiVersion: v2\nkind: Nope\n")])
    else {
        panic!()
    };
    assert_eq!(d.len(), 2);
}

#[test]
fn revisions_swap_while_other_threads_decide() {
    let engine = Arc::new(Engine::new(set(BASE)));
    let r = call(Some("gateway"), &[], "GET", "/orders/7");
    assert!(engine.decide(&r).is_allowed());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (engine, stop, r) = (engine.clone(), stop.clone(), r.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Each decision sees one whole revision: an allow by `read` or a deny by nothing.
                    let d = engine.decide(&r);
                    assert!(d.rule.as_deref() == Some("p/read") || d.rule.is_none());
                    n += 1;
                }
                n
            })
        })
        .collect();
    for i in 0..50 {
        let next = if i % 2 == 0 {
            PolicySet::empty()
        } else {
            set(BASE)
        };
        engine.swap(next);
    }
    engine.swap(PolicySet::empty());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        assert!(w.join().unwrap() > 0);
    }
    assert!(
        !engine.decide(&r).is_allowed(),
        "the last revision installed is the one used"
    );
}

#[test]
fn overlapping_templates_are_all_considered() {
    let s = set(r#"
apiVersion: castellan/v1
kind: AccessPolicy
metadata: {name: o}
spec:
  service: orders
  rules:
    - name: allow-any-item
      effect: allow
      from: {services: [gateway]}
      to: {paths: ["/items/{id}"]}
    - name: deny-exact
      effect: deny
      to: {paths: ["/items/special"]}
    - name: deny-catch-all
      effect: deny
      to: {paths: ["/items/{*rest}"]}
      when: "params.rest == 'locked'"
"#);
    let d = s.decide(&call(Some("gateway"), &[], "GET", "/items/special"));
    assert_eq!(d.rule.as_deref(), Some("o/deny-exact"));
    let d = s.decide(&call(Some("gateway"), &[], "GET", "/items/locked"));
    assert_eq!(d.rule.as_deref(), Some("o/deny-catch-all"));
    let d = s.decide(&call(Some("gateway"), &[], "GET", "/items/%6cocked"));
    assert_eq!(
        d.rule.as_deref(),
        Some("o/deny-catch-all"),
        "unreserved escapes are decoded before matching"
    );
    assert!(
        s.decide(&call(Some("gateway"), &[], "GET", "/items/7"))
            .is_allowed()
    );
}

#[test]
fn a_header_repeated_with_another_case_is_malformed() {
    let s = set(BASE);
    let mut r = call(Some("gateway"), &[], "GET", "/orders/7");
    r.request.headers.insert("X-Tenant".into(), "a".into());
    assert!(s.decide(&r).is_allowed());
    r.request.headers.insert("x-tenant".into(), "b".into());
    let d = s.decide(&r);
    assert_eq!(
        (d.decision, d.reason),
        (Effect::Deny, Reason::MalformedRequest)
    );
}

#[test]
fn context_issuers_come_from_the_mesh_config() {
    let mesh = "apiVersion: castellan/v1\nkind: MeshConfig\nmetadata: {name: m}\nspec:\n  trustDomain: demo.castellan\n  contextIssuers: [gateway, \"spiffe://other.org/edge*\"]\n";
    let set = castellan_policy::PolicySet::from_sources([("mesh.yaml", mesh)]).unwrap();
    assert!(set.may_mint_context("spiffe://demo.castellan/svc/gateway"));
    assert!(set.may_mint_context("spiffe://other.org/edge-1"));
    assert!(!set.may_mint_context("spiffe://demo.castellan/svc/orders"));
    assert!(!set.may_mint_context("spiffe://evil.org/svc/gateway"));
    assert!(!set.may_mint_context("not a spiffe id"));
    let none = castellan_policy::PolicySet::from_sources([("m.yaml", "apiVersion: castellan/v1\nkind: MeshConfig\nmetadata: {name: m}\nspec: {trustDomain: demo.castellan}\n")]).unwrap();
    assert!(
        !none.may_mint_context("spiffe://demo.castellan/svc/gateway"),
        "nobody by default"
    );
}

#[test]
fn rate_limit_documents_load_and_bad_ones_are_located() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo/policies");
    let set = castellan_policy::PolicySet::load_dir(&dir).unwrap();
    let l = &set.rate_limits()[0];
    assert_eq!(
        (
            l.name.as_str(),
            l.service.as_str(),
            l.key,
            l.rate,
            l.period_ms,
            l.burst
        ),
        (
            "admin-api-per-user",
            "orders",
            castellan_policy::RateKey::User,
            5,
            60_000,
            5
        )
    );
    assert!(l.applies("orders", "GET", "/admin/stats") && l.applies("orders", "GET", "/admin"));
    assert!(
        !l.applies("orders", "GET", "/administrator")
            && !l.applies("orders", "GET", "/orders/1")
            && !l.applies("payments", "GET", "/admin")
    );
    let bad = "apiVersion: castellan/v1\nkind: RateLimit\nmetadata: {name: x}\nspec:\n  service: orders\n  key: ip\n  rate: -1\n  per: 2s\n";
    let e = castellan_policy::PolicySet::from_sources([("rl.yaml", bad)])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rl.yaml:6:") && e.contains("spec.key must be source, user, apikey or route"),
        "{e}"
    );
    assert!(
        e.contains("rl.yaml:7:") && e.contains("spec.rate must be a positive integer"),
        "{e}"
    );
    assert!(
        e.contains("rl.yaml:8:") && e.contains("spec.per must be 1s, 1m or 1h"),
        "{e}"
    );
}

/// The delegation chain reaches policy: `from.users.delegated` and `user.act` in CEL.
#[test]
fn delegation_is_visible_to_rules_and_conditions() {
    let s = set(r#"
apiVersion: castellan/v1
kind: AccessPolicy
metadata: {name: inv}
spec:
  service: orders
  rules:
    - name: direct-reads
      effect: allow
      from: {services: [gateway], users: {delegated: false}}
      to: {methods: [GET]}
    - name: reserve-for-orders-only
      effect: allow
      from: {services: [orders], users: {delegated: true}}
      to: {methods: [POST]}
      when: "'spiffe://example.org/svc/orders' in user.act"
    - name: never-via-inventory
      effect: deny
      when: "user.act.exists(a, a.endsWith('/svc/inventory'))"
"#);
    let engine = Engine::new(s);
    let with = |src: &str, method: &str, act: &[&str]| {
        req(
            json!({"source": {"service": src}, "destination": {"service": "orders"},
                   "user": {"sub": "alice", "act": act},
                   "request": {"method": method, "path": "/x", "host": "orders"}}),
        )
    };
    let d = engine.decide(&with("gateway", "GET", &[]));
    assert!(d.is_allowed(), "{d:?}");
    let d = engine.decide(&with(
        "gateway",
        "GET",
        &["spiffe://example.org/svc/orders"],
    ));
    assert!(
        !d.is_allowed(),
        "a delegated call does not match delegated: false"
    );
    let d = engine.decide(&with(
        "orders",
        "POST",
        &["spiffe://example.org/svc/orders"],
    ));
    assert!(d.is_allowed(), "{d:?}");
    let d = engine.decide(&with("orders", "POST", &[]));
    assert!(
        !d.is_allowed(),
        "a direct call does not match delegated: true"
    );
    let d = engine.decide(&with(
        "orders",
        "POST",
        &["spiffe://example.org/svc/inventory"],
    ));
    assert_eq!(
        d.rule.map(|r| r.to_string()).as_deref(),
        Some("inv/never-via-inventory")
    );
}
