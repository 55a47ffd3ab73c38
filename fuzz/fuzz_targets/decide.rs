//! Fuzzes decisions on the demo policies with arbitrary decision inputs: never panics, and a
//! malformed request is never allowed.
#![no_main]

use castellan_policy::{PolicySet, Reason, Request};
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static SET: LazyLock<PolicySet> = LazyLock::new(|| {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo/policies");
    PolicySet::load_dir(std::path::Path::new(dir)).unwrap_or_else(|e| panic!("{e}"))
});

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<Request>(data) else { return };
    let d = SET.decide(&req);
    if d.reason == Reason::MalformedRequest {
        assert!(!d.is_allowed());
    }
    if d.is_allowed() {
        assert!(d.rule.is_some(), "the demo mesh is in enforce mode: an allow names its rule");
    }
});
