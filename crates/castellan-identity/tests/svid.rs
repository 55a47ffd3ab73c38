//! X.509-SVID validation, one test per rejection, with certificates made at test start by rcgen.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use castellan_identity::{SvidError, SvidUsage, SvidValidator, TrustBundle};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, date_time_ymd,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use std::time::Duration;

const TD: &str = "example.org";
const ID: &str = "spiffe://example.org/svc/orders";

fn at(y: i32, m: u8, d: u8) -> UnixTime {
    let t = date_time_ymd(y, m, d);
    UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(t.unix_timestamp()).unwrap(),
    ))
}

fn now() -> UnixTime {
    at(2026, 6, 1)
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = date_time_ymd(2026, 1, 1);
    p.not_after = date_time_ymd(2028, 1, 1);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn leaf_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(ID.try_into().unwrap())];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.is_ca = IsCa::ExplicitNoCa;
    p.not_before = date_time_ymd(2026, 1, 1);
    p.not_after = date_time_ymd(2027, 1, 1);
    p.serial_number = Some(vec![0x01, 0x23].into());
    p
}

fn sign(
    p: CertificateParams,
    issuer: &Issuer<'_, impl rcgen::SigningKey>,
) -> CertificateDer<'static> {
    p.signed_by(&KeyPair::generate().unwrap(), issuer)
        .unwrap()
        .der()
        .clone()
}

fn leaf(
    issuer: &CertifiedIssuer<'_, KeyPair>,
    edit: impl FnOnce(&mut CertificateParams),
) -> CertificateDer<'static> {
    let mut p = leaf_params();
    edit(&mut p);
    sign(p, issuer)
}

fn validator(root: &CertifiedIssuer<'_, KeyPair>) -> SvidValidator {
    SvidValidator::new(TrustBundle::new(TD, vec![root.der().clone()]).unwrap())
}

fn check(
    root: &CertifiedIssuer<'_, KeyPair>,
    cert: CertificateDer<'static>,
    usage: SvidUsage,
) -> Result<String, SvidError> {
    validator(root)
        .validate(&[cert], now(), usage)
        .map(|id| id.to_string())
}

#[test]
fn a_valid_svid_yields_its_spiffe_id_for_both_usages() {
    let root = ca("root");
    let cert = leaf(&root, |_| {});
    assert_eq!(check(&root, cert.clone(), SvidUsage::Client).unwrap(), ID);
    assert_eq!(check(&root, cert, SvidUsage::Server).unwrap(), ID);
    // DNS SANs beside the one URI SAN are allowed by the SPIFFE standard.
    let cert = leaf(&root, |p| {
        p.subject_alt_names
            .push(SanType::DnsName("orders.example.org".try_into().unwrap()))
    });
    assert_eq!(check(&root, cert, SvidUsage::Server).unwrap(), ID);
}

#[test]
fn more_than_one_uri_san_is_refused() {
    let root = ca("root");
    let cert = leaf(&root, |p| {
        p.subject_alt_names.push(SanType::URI(
            "spiffe://example.org/svc/admin".try_into().unwrap(),
        ))
    });
    assert_eq!(
        check(&root, cert, SvidUsage::Client),
        Err(SvidError::MultipleUriSans(2))
    );
}

#[test]
fn a_non_spiffe_uri_is_refused() {
    let root = ca("root");
    let cert = leaf(&root, |p| {
        p.subject_alt_names = vec![SanType::URI(
            "https://example.org/svc/orders".try_into().unwrap(),
        )]
    });
    assert!(matches!(
        check(&root, cert, SvidUsage::Client),
        Err(SvidError::NotSpiffe(_))
    ));
}

#[test]
fn san_type_confusion_is_refused() {
    let root = ca("root");
    // A SPIFFE ID in an e-mail or DNS SAN is not a URI SAN.
    let cert = leaf(&root, |p| {
        p.subject_alt_names = vec![SanType::Rfc822Name(ID.try_into().unwrap())]
    });
    assert_eq!(
        check(&root, cert, SvidUsage::Client),
        Err(SvidError::NoUriSan)
    );
    let cert = leaf(&root, |p| p.subject_alt_names = vec![]);
    assert_eq!(
        check(&root, cert, SvidUsage::Client),
        Err(SvidError::NoUriSan)
    );
}

#[test]
fn another_trust_domain_is_refused() {
    let root = ca("root");
    let cert = leaf(&root, |p| {
        p.subject_alt_names = vec![SanType::URI(
            "spiffe://other.org/svc/orders".try_into().unwrap(),
        )]
    });
    assert!(matches!(
        check(&root, cert, SvidUsage::Client),
        Err(SvidError::WrongTrustDomain { .. })
    ));
}

#[test]
fn nul_and_control_bytes_in_the_san_are_refused() {
    let root = ca("root");
    for bad in [
        "spiffe://example.org/svc/orders\0.evil",
        "spiffe://example.org/svc/ord\u{1}ers",
        "spiffe://example.org/svc/orders\n",
    ] {
        let cert = leaf(&root, |p| {
            p.subject_alt_names = vec![SanType::URI(bad.try_into().unwrap())]
        });
        assert_eq!(
            check(&root, cert, SvidUsage::Client),
            Err(SvidError::ControlCharacter),
            "{bad:?}"
        );
    }
}

#[test]
fn a_ca_leaf_or_a_signing_leaf_is_refused() {
    let root = ca("root");
    let cert = leaf(&root, |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
    });
    assert_eq!(
        check(&root, cert, SvidUsage::Client),
        Err(SvidError::CaLeaf)
    );
    let cert = leaf(&root, |p| p.key_usages.push(KeyUsagePurpose::KeyCertSign));
    assert_eq!(
        check(&root, cert, SvidUsage::Client),
        Err(SvidError::CaLeaf)
    );
    let cert = leaf(&root, |p| p.key_usages.push(KeyUsagePurpose::CrlSign));
    assert_eq!(
        check(&root, cert, SvidUsage::Client),
        Err(SvidError::CaLeaf)
    );
}

#[test]
fn missing_digital_signature_is_refused() {
    let root = ca("root");
    let cert = leaf(&root, |p| {
        p.key_usages = vec![KeyUsagePurpose::KeyEncipherment]
    });
    assert_eq!(
        check(&root, cert, SvidUsage::Client),
        Err(SvidError::NoDigitalSignature)
    );
    let cert = leaf(&root, |p| p.key_usages = vec![]);
    assert_eq!(
        check(&root, cert, SvidUsage::Client),
        Err(SvidError::NoDigitalSignature)
    );
}

#[test]
fn extended_key_usage_is_enforced() {
    let root = ca("root");
    let server_only = leaf(&root, |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]
    });
    assert_eq!(
        check(&root, server_only.clone(), SvidUsage::Client),
        Err(SvidError::WrongExtendedKeyUsage("clientAuth"))
    );
    assert!(check(&root, server_only, SvidUsage::Server).is_ok());
    let client_only = leaf(&root, |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth]
    });
    assert_eq!(
        check(&root, client_only, SvidUsage::Server),
        Err(SvidError::WrongExtendedKeyUsage("serverAuth"))
    );
    let none = leaf(&root, |p| p.extended_key_usages = vec![]);
    assert_eq!(
        check(&root, none, SvidUsage::Client),
        Err(SvidError::WrongExtendedKeyUsage("clientAuth"))
    );
}

#[test]
fn validity_period_is_enforced() {
    let root = ca("root");
    let cert = leaf(&root, |_| {});
    let v = validator(&root);
    assert_eq!(
        v.validate(
            std::slice::from_ref(&cert),
            at(2027, 6, 1),
            SvidUsage::Client
        ),
        Err(SvidError::Expired)
    );
    assert_eq!(
        v.validate(&[cert], at(2025, 6, 1), SvidUsage::Client),
        Err(SvidError::NotYetValid)
    );
}

#[test]
fn a_chain_to_another_ca_is_refused() {
    let root = ca("root");
    let rogue = ca("rogue");
    let cert = leaf(&rogue, |_| {});
    assert!(matches!(
        check(&root, cert, SvidUsage::Client),
        Err(SvidError::Chain(_))
    ));
}

#[test]
fn revoked_serials_are_refused() {
    let root = ca("root");
    let cert = leaf(&root, |_| {});
    let mut v = validator(&root);
    assert!(
        v.validate(std::slice::from_ref(&cert), now(), SvidUsage::Client)
            .is_ok()
    );
    v.revoke(&[0x00, 0x01, 0x23]);
    assert_eq!(
        v.validate(&[cert], now(), SvidUsage::Client),
        Err(SvidError::Revoked("0123".into()))
    );
}

#[test]
fn intermediates_and_rotated_roots_verify() {
    let old = ca("old root");
    let new = ca("new root");
    let bundle = TrustBundle::new(TD, vec![old.der().clone(), new.der().clone()]).unwrap();
    let v = SvidValidator::new(bundle);
    assert!(
        v.validate(&[leaf(&old, |_| {})], now(), SvidUsage::Client)
            .is_ok()
    );
    assert!(
        v.validate(&[leaf(&new, |_| {})], now(), SvidUsage::Client)
            .is_ok()
    );
    // leaf <- intermediate <- new root
    let mut ip = CertificateParams::default();
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ip.not_before = date_time_ymd(2026, 1, 1);
    ip.not_after = date_time_ymd(2028, 1, 1);
    let inter = CertifiedIssuer::signed_by(ip, KeyPair::generate().unwrap(), &new).unwrap();
    let cert = leaf(&inter, |_| {});
    assert!(
        v.validate(
            &[cert.clone(), inter.der().clone()],
            now(),
            SvidUsage::Client
        )
        .is_ok()
    );
    assert!(
        matches!(
            v.validate(&[cert], now(), SvidUsage::Client),
            Err(SvidError::Chain(_))
        ),
        "the intermediate is needed"
    );
}

#[test]
fn garbage_is_a_clear_error() {
    let root = ca("root");
    let v = validator(&root);
    assert_eq!(
        v.validate(&[], now(), SvidUsage::Client),
        Err(SvidError::Empty)
    );
    let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01]);
    assert!(matches!(
        v.validate(&[junk], now(), SvidUsage::Client),
        Err(SvidError::Malformed(_))
    ));
    assert!(TrustBundle::new("Bad TD", vec![root.der().clone()]).is_err());
    assert!(TrustBundle::new(TD, vec![]).is_err());
}
