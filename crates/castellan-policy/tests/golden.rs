//! Golden test: the exact diagnostics for a file full of mistakes. Regenerate the expectation with
//! `BLESS=1 cargo test -p castellan-policy --test golden` after an intended change, and review it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use castellan_policy::{LoadError, PolicySet};
use std::path::Path;

#[test]
fn every_error_of_an_invalid_file_is_reported_with_its_place() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let text = std::fs::read_to_string(dir.join("invalid.yaml")).unwrap();
    let Err(LoadError::Invalid(diags)) = PolicySet::from_sources([("invalid.yaml", text.as_str())])
    else {
        panic!("the file must be rejected")
    };
    let got: String = diags.iter().map(|d| format!("{d}\n")).collect();
    let expected_path = dir.join("invalid.errors");
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&expected_path, &got).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
    assert_eq!(
        got, expected,
        "diagnostics changed; rerun with BLESS=1 if intended"
    );
}
