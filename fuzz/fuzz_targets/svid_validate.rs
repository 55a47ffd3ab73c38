//! Fuzzes SVID validation with arbitrary DER as the leaf: never panics, never accepts (the
//! fuzzer cannot produce a certificate signed by the bundle's CA).
#![no_main]

use castellan_identity::{SvidUsage, SvidValidator, TrustBundle};
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::{CertificateDer, UnixTime};
use std::sync::LazyLock;

static VALIDATOR: LazyLock<SvidValidator> = LazyLock::new(|| {
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let ca = p.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
    SvidValidator::new(TrustBundle::new("example.org", vec![ca.der().clone()]).unwrap_or_else(|e| panic!("{e}")))
});

fuzz_target!(|data: &[u8]| {
    let chain = [CertificateDer::from(data.to_vec())];
    let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_795_000_000));
    assert!(VALIDATOR.validate(&chain, now, SvidUsage::Client).is_err());
});
