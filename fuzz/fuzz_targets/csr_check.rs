//! Fuzzes CSR checking with arbitrary DER: never panics.
#![no_main]

use castellan_identity::{SpiffeId, check_csr};
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static ID: LazyLock<SpiffeId> =
    LazyLock::new(|| SpiffeId::parse("spiffe://example.org/svc/orders").unwrap_or_else(|e| panic!("{e}")));

fuzz_target!(|data: &[u8]| {
    let _ = check_csr(data, &ID);
});
