//! CSR checks: possession of the key, key strength, and no name but the workload's own.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use castellan_identity::{CsrError, SpiffeId, check_csr};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, SanType};

fn id() -> SpiffeId {
    SpiffeId::parse("spiffe://example.org/svc/orders").unwrap()
}

fn csr(key: &KeyPair, sans: Vec<SanType>) -> Vec<u8> {
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans;
    p.serialize_request(key).unwrap().der().to_vec()
}

fn own() -> Vec<SanType> {
    vec![SanType::URI(
        "spiffe://example.org/svc/orders".try_into().unwrap(),
    )]
}

#[test]
fn a_csr_for_the_own_id_with_a_good_key_passes() {
    for key in [
        KeyPair::generate().unwrap(),
        KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap(),
        KeyPair::generate_for(&PKCS_ED25519).unwrap(),
    ] {
        let checked = check_csr(&csr(&key, own()), &id()).unwrap();
        assert!(checked.public_key_spki.ends_with(key.public_key_raw()));
    }
    // No requested names at all is fine: the CA puts the ID in.
    assert!(check_csr(&csr(&KeyPair::generate().unwrap(), vec![]), &id()).is_ok());
    let rsa = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/rsa2048.csr.der"
    ))
    .unwrap();
    assert!(check_csr(&rsa, &id()).is_ok());
}

#[test]
fn weak_rsa_keys_are_refused() {
    let rsa = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/rsa1024.csr.der"
    ))
    .unwrap();
    assert_eq!(
        check_csr(&rsa, &id()),
        Err(CsrError::WeakKey("RSA 1024 bits".into()))
    );
}

#[test]
fn a_bad_signature_is_refused() {
    let mut der = csr(&KeyPair::generate().unwrap(), own());
    let last = der.len() - 1;
    der[last] ^= 0x01;
    assert_eq!(check_csr(&der, &id()), Err(CsrError::BadSignature));
}

#[test]
fn names_other_than_the_own_id_are_refused() {
    let key = KeyPair::generate().unwrap();
    for sans in [
        vec![SanType::URI(
            "spiffe://example.org/svc/payments".try_into().unwrap(),
        )],
        vec![SanType::URI(
            "spiffe://other.org/svc/orders".try_into().unwrap(),
        )],
        [
            own(),
            vec![SanType::URI(
                "spiffe://example.org/svc/admin".try_into().unwrap(),
            )],
        ]
        .concat(),
        [
            own(),
            vec![SanType::DnsName("payments.example.org".try_into().unwrap())],
        ]
        .concat(),
        vec![SanType::Rfc822Name(
            "spiffe://example.org/svc/orders".try_into().unwrap(),
        )],
    ] {
        assert!(
            matches!(
                check_csr(&csr(&key, sans.clone()), &id()),
                Err(CsrError::ForeignName { .. })
            ),
            "{sans:?}"
        );
    }
}

#[test]
fn garbage_is_refused() {
    assert!(matches!(
        check_csr(b"not a csr", &id()),
        Err(CsrError::Malformed(_))
    ));
    let mut der = csr(&KeyPair::generate().unwrap(), own());
    der.push(0);
    assert!(matches!(
        check_csr(&der, &id()),
        Err(CsrError::Malformed(_))
    ));
}
