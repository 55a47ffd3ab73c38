//! The CA: issued SVIDs follow the SPIFFE X.509-SVID standard, verify with our validator and with
//! `openssl verify`, and CA keys survive sealing for storage.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use base64::Engine as _;
use castellan_identity::ca::{open, seal};
use castellan_identity::{
    CaError, CertificateAuthority, CsrError, SpiffeId, SvidError, SvidUsage, SvidValidator,
    TrustBundle,
};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, UnixTime};
use std::process::Command;
use std::time::Duration;

const NOW: i64 = 1_795_000_000;
const HOUR: Duration = Duration::from_secs(3600);

fn id(name: &str) -> SpiffeId {
    SpiffeId::for_service("example.org", name).unwrap()
}

fn csr_for(uri: &str) -> Vec<u8> {
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    p.serialize_request(&KeyPair::generate().unwrap())
        .unwrap()
        .der()
        .to_vec()
}

fn at(unix: i64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(unix as u64))
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn ca() -> CertificateAuthority {
    CertificateAuthority::generate("example.org", NOW, Duration::from_secs(365 * 86400)).unwrap()
}

#[test]
fn issued_svids_validate_for_both_usages_and_expire_after_the_ttl() {
    let ca = ca();
    let svid = ca
        .issue_svid(
            &csr_for("spiffe://example.org/svc/orders"),
            &id("orders"),
            NOW,
            HOUR,
        )
        .unwrap();
    assert_eq!(svid.not_after, NOW + 3600);
    let v = SvidValidator::new(TrustBundle::new("example.org", vec![ca.cert().clone()]).unwrap());
    for usage in [SvidUsage::Client, SvidUsage::Server] {
        assert_eq!(
            v.validate(std::slice::from_ref(&svid.cert), at(NOW), usage)
                .unwrap(),
            id("orders")
        );
    }
    assert_eq!(
        v.validate(
            std::slice::from_ref(&svid.cert),
            at(NOW + 3601),
            SvidUsage::Client
        ),
        Err(SvidError::Expired)
    );
    // A CSR without any SAN gets the ID from the CA.
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![];
    let bare = p
        .serialize_request(&KeyPair::generate().unwrap())
        .unwrap()
        .der()
        .to_vec();
    let svid = ca.issue_svid(&bare, &id("orders"), NOW, HOUR).unwrap();
    assert_eq!(
        v.validate(&[svid.cert], at(NOW), SvidUsage::Client)
            .unwrap(),
        id("orders")
    );
}

#[test]
fn a_csr_asking_for_another_identity_is_refused() {
    let ca = ca();
    let err = ca
        .issue_svid(
            &csr_for("spiffe://example.org/svc/payments"),
            &id("orders"),
            NOW,
            HOUR,
        )
        .unwrap_err();
    assert!(
        matches!(err, CaError::Csr(CsrError::ForeignName { .. })),
        "{err:?}"
    );
    let other_td = SpiffeId::parse("spiffe://other.org/svc/orders").unwrap();
    assert!(
        ca.issue_svid(
            &csr_for("spiffe://other.org/svc/orders"),
            &other_td,
            NOW,
            HOUR
        )
        .is_err()
    );
}

#[test]
fn openssl_verifies_the_svid_and_sees_the_spiffe_uri() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let ca =
        CertificateAuthority::generate("example.org", now, Duration::from_secs(86400)).unwrap();
    let svid = ca
        .issue_svid(
            &csr_for("spiffe://example.org/svc/orders"),
            &id("orders"),
            now,
            HOUR,
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    let leaf = dir.path().join("leaf.pem");
    std::fs::write(&bundle, pem("CERTIFICATE", ca.cert())).unwrap();
    std::fs::write(&leaf, pem("CERTIFICATE", &svid.cert)).unwrap();
    for purpose in ["sslclient", "sslserver"] {
        let out = Command::new("openssl")
            .args(["verify", "-purpose", purpose, "-CAfile"])
            .arg(&bundle)
            .arg(&leaf)
            .output()
            .expect("openssl must be installed (Debian package openssl)");
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&leaf)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("URI:spiffe://example.org/svc/orders"),
        "{text}"
    );
    assert_eq!(text.matches("URI:").count(), 1, "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(!text.contains("Certificate Sign"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication")
            && text.contains("TLS Web Client Authentication"),
        "{text}"
    );
}

#[test]
fn sealed_ca_keys_open_only_with_the_same_key_and_label() {
    let ca = ca();
    let kek = [7u8; 32];
    let sealed = seal(&kek, "ca-key", &ca.key_pkcs8()).unwrap();
    assert!(
        !sealed
            .windows(16)
            .any(|w| ca.key_pkcs8().windows(16).any(|k| k == w)),
        "no plaintext in the blob"
    );
    let opened = open(&kek, "ca-key", &sealed).unwrap();
    assert_eq!(open(&[8u8; 32], "ca-key", &sealed), Err(CaError::Unseal));
    assert_eq!(open(&kek, "signing-key", &sealed), Err(CaError::Unseal));
    let mut altered = sealed.clone();
    altered[20] ^= 1;
    assert_eq!(open(&kek, "ca-key", &altered), Err(CaError::Unseal));
    assert_eq!(open(&kek, "ca-key", &sealed[..5]), Err(CaError::Unseal));
    // The reopened key signs certificates the same bundle accepts.
    let restored =
        CertificateAuthority::from_parts("example.org", ca.cert().clone(), &opened).unwrap();
    let svid = restored
        .issue_svid(
            &csr_for("spiffe://example.org/svc/orders"),
            &id("orders"),
            NOW,
            HOUR,
        )
        .unwrap();
    let v = SvidValidator::new(TrustBundle::new("example.org", vec![ca.cert().clone()]).unwrap());
    assert!(v.validate(&[svid.cert], at(NOW), SvidUsage::Client).is_ok());
}

#[test]
fn during_a_rotation_the_bundle_holds_both_cas() {
    let old = ca();
    let new = ca();
    let both =
        TrustBundle::new("example.org", vec![old.cert().clone(), new.cert().clone()]).unwrap();
    let only_new = TrustBundle::new("example.org", vec![new.cert().clone()]).unwrap();
    let from_old: CertificateDer<'static> = old
        .issue_svid(&csr_for("spiffe://example.org/svc/a"), &id("a"), NOW, HOUR)
        .unwrap()
        .cert;
    assert!(
        SvidValidator::new(both)
            .validate(std::slice::from_ref(&from_old), at(NOW), SvidUsage::Client)
            .is_ok()
    );
    assert!(matches!(
        SvidValidator::new(only_new).validate(&[from_old], at(NOW), SvidUsage::Client),
        Err(SvidError::Chain(_))
    ));
}
