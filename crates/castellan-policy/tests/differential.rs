//! Differential test: Castellan, cedar-policy and regorus give the same decision on every
//! benchmark request, over the same generated policies (see `benches/workload`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../benches/workload/mod.rs"]
mod workload;

use workload::*;

fn check(size: usize, requests: usize) {
    let rules = generate_rules(size, size as u64);
    let reqs = generate_requests(&rules, requests, size as u64);
    let mut e = Engines::build(&rules);
    let mut allowed = 0;
    for (i, q) in reqs.iter().enumerate() {
        let ours = e.castellan.decide(&castellan_request(q));
        let cedar = e
            .cedar
            .is_authorized(&cedar_request(q), &e.cedar_policies, &e.cedar_entities);
        let cedar_allows = cedar.decision() == cedar_policy::Decision::Allow;
        assert!(
            cedar.diagnostics().errors().next().is_none(),
            "cedar evaluation errors at request {i}: {:?}",
            cedar.diagnostics().errors().collect::<Vec<_>>()
        );
        let rego_allows = rego_allows(&mut e.rego, &rego_value(q));
        assert_eq!(
            (ours.is_allowed(), ours.is_allowed()),
            (cedar_allows, rego_allows),
            "size {size}, request {i}: {q:?}\ncastellan: {ours:?}\ncedar: {:?}",
            cedar.diagnostics().reason().collect::<Vec<_>>()
        );
        allowed += usize::from(ours.is_allowed());
    }
    // The workload must exercise both outcomes, or agreement means little.
    assert!(
        allowed > requests / 20 && allowed < requests * 19 / 20,
        "size {size}: {allowed}/{requests} allowed"
    );
}

#[test]
fn engines_agree_at_10_rules() {
    check(10, 2000);
}

#[test]
fn engines_agree_at_100_rules() {
    check(100, 2000);
}

#[test]
fn engines_agree_at_1000_rules() {
    check(1000, 1000);
}

#[test]
fn engines_agree_at_10000_rules() {
    check(10_000, 40);
}
