//! Fuzzes policy and policy-test parsing: any bytes give a policy set or located errors, never a
//! panic.
#![no_main]

use castellan_policy::parse::Diagnostic;
use castellan_policy::{LoadError, PolicySet};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match PolicySet::from_sources([("fuzz.yaml", text)]) {
        Ok(set) => {
            let _ = set.rule_count();
        }
        Err(LoadError::Invalid(diags)) => {
            assert!(!diags.is_empty());
            assert!(diags.iter().all(|d| d.pos.line >= 1 && d.pos.col >= 1), "{diags:?}");
        }
        Err(e) => panic!("unexpected error kind: {e}"),
    }
    let mut diags: Vec<Diagnostic> = Vec::new();
    let _ = castellan_policy::testing::parse_test_file(Arc::from("fuzz_test.yaml"), text, &mut diags);
});
