//! Fuzzes request-target normalization: never panics, and every accepted target normalizes to a
//! canonical path (idempotent, no `//`, dot segments, encoded separators or NUL).
#![no_main]

use castellan_policy::{normalize_path, normalize_target};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else { return };
    let Ok(t) = normalize_target(target) else { return };
    let p = t.path.as_ref();
    assert!(p.starts_with('/'));
    for bad in ["//", "/./", "/../", "%2F", "%2f", "%5C", "%5c", "%00", "\0", ";", "\\", "#", "?"] {
        assert!(!p.contains(bad), "{target:?} -> {p:?} contains {bad:?}");
    }
    assert!(!p.ends_with("/.") && !p.ends_with("/.."), "{p:?}");
    let again = normalize_path(p).map(|c| c.into_owned());
    assert_eq!(again.as_deref(), Ok(p), "not idempotent: {target:?}");
});
