//! The trust domain's certificate authority: issues X.509-SVIDs from checked CSRs (the workload's
//! private key never leaves it), and seals CA private keys for storage at rest.

use crate::csr::check_csr;
use crate::spiffe::SpiffeId;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;
use std::time::Duration;
use time::OffsetDateTime;

/// How far back `notBefore` is set, for peers whose clocks run a little behind.
const BACKDATE: Duration = Duration::from_secs(60);

/// Why the CA could not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaError {
    /// The CSR was refused (the requester's fault).
    #[error(transparent)]
    Csr(#[from] crate::csr::CsrError),
    /// Certificate generation failed (ours).
    #[error("certificate generation failed: {0}")]
    Generate(String),
    /// A sealed key could not be opened: wrong key-encryption key or altered data.
    #[error("sealed key cannot be opened (wrong key-encryption key or altered data)")]
    Unseal,
    /// A time outside the certificate range.
    #[error("time out of range")]
    Time,
}

/// An issued SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedSvid {
    /// The certificate, DER.
    pub cert: CertificateDer<'static>,
    /// Its serial number, big-endian.
    pub serial: Vec<u8>,
    /// `notAfter`, seconds since the Unix epoch.
    pub not_after: i64,
}

/// A signing CA of one trust domain.
pub struct CertificateAuthority {
    trust_domain: String,
    cert: CertificateDer<'static>,
    key: KeyPair,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn at(unix: i64) -> Result<OffsetDateTime, CaError> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(|_| CaError::Time)
}

fn random_serial() -> Result<Vec<u8>, CaError> {
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial)
        .map_err(|_| CaError::Generate("no randomness".to_owned()))?;
    // Positive and without a leading zero byte, as RFC 5280 wants.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial.to_vec())
}

fn gen_err(e: rcgen::Error) -> CaError {
    CaError::Generate(e.to_string())
}

impl CertificateAuthority {
    /// A new self-signed ECDSA P-256 CA for `trust_domain`, valid from `now` for `validity`.
    pub fn generate(
        trust_domain: &str,
        now: i64,
        validity: Duration,
    ) -> Result<CertificateAuthority, CaError> {
        let td = SpiffeId::parse(&format!("spiffe://{trust_domain}"))
            .map_err(|e| CaError::Generate(e.to_string()))?;
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, format!("castellan CA {now}"));
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.subject_alt_names = vec![SanType::URI(td.as_str().try_into().map_err(gen_err)?)];
        p.not_before = at(now - BACKDATE.as_secs() as i64)?;
        p.not_after = at(now.saturating_add(validity.as_secs() as i64))?;
        p.serial_number = Some(SerialNumber::from(random_serial()?));
        let cert = p.self_signed(&key).map_err(gen_err)?;
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_owned(),
            cert: cert.der().clone(),
            key,
        })
    }

    /// A CA from its stored certificate and PKCS#8 private key.
    pub fn from_parts(
        trust_domain: &str,
        cert: CertificateDer<'static>,
        key_pkcs8: &[u8],
    ) -> Result<CertificateAuthority, CaError> {
        let key = KeyPair::try_from(key_pkcs8).map_err(gen_err)?;
        // The key must be the certificate's: a stored row pairing a CA certificate with some
        // other key is refused, not trusted.
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| CaError::Generate(format!("CA certificate: {e}")))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::Generate(
                "the key does not belong to the CA certificate".to_owned(),
            ));
        }
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_owned(),
            cert,
            key,
        })
    }

    /// The CA certificate, for the trust bundle.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The private key, PKCS#8 DER: seal it with [`seal`] before it touches a disk.
    pub fn key_pkcs8(&self) -> Vec<u8> {
        self.key.serialize_der()
    }

    /// Issues an X.509-SVID for `id` from a DER CSR: one URI SAN, digitalSignature, EKU
    /// serverAuth + clientAuth, cA false, valid from `now` (backdated a minute) for `ttl`.
    pub fn issue_svid(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        now: i64,
        ttl: Duration,
    ) -> Result<IssuedSvid, CaError> {
        self.issue_svid_with_names(csr_der, id, &[], &[], now, ttl)
    }

    /// As [`issue_svid`](Self::issue_svid), adding DNS names and IP addresses registered for
    /// the workload (never ones the CSR asks for: the CSR may name only the SPIFFE ID).
    pub fn issue_svid_with_names(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        now: i64,
        ttl: Duration,
    ) -> Result<IssuedSvid, CaError> {
        let checked = check_csr(csr_der, id)?;
        self.issue_serving_cert(&checked.public_key_spki, id, dns_names, ips, now, ttl)
    }

    /// Issues the control plane's own serving certificate: an SVID for `id` (one URI SAN, as
    /// the SPIFFE standard requires) that also names the DNS names and IP addresses clients
    /// dial, for the key whose SubjectPublicKeyInfo DER is `spki`.
    pub fn issue_serving_cert(
        &self,
        spki: &[u8],
        id: &SpiffeId,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        now: i64,
        ttl: Duration,
    ) -> Result<IssuedSvid, CaError> {
        let mut sans = Vec::with_capacity(dns_names.len() + ips.len());
        for d in dns_names {
            sans.push(SanType::DnsName(d.as_str().try_into().map_err(gen_err)?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        self.issue(spki, id, &sans, now, ttl)
    }

    fn issue(
        &self,
        spki: &[u8],
        id: &SpiffeId,
        extra_sans: &[SanType],
        now: i64,
        ttl: Duration,
    ) -> Result<IssuedSvid, CaError> {
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::Generate(format!(
                "{id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        let public_key = SubjectPublicKeyInfo::from_der(spki).map_err(gen_err)?;
        let issuer = Issuer::from_ca_cert_der(&self.cert, &self.key).map_err(gen_err)?;
        let serial = random_serial()?;
        let not_after = now.saturating_add(ttl.as_secs() as i64);
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.trust_domain.as_str());
        if let Some(name) = id.service_name() {
            dn.push(DnType::CommonName, name);
        }
        p.distinguished_name = dn;
        p.subject_alt_names = vec![SanType::URI(id.as_str().try_into().map_err(gen_err)?)];
        p.subject_alt_names.extend_from_slice(extra_sans);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = at(now - BACKDATE.as_secs() as i64)?;
        p.not_after = at(not_after)?;
        p.serial_number = Some(SerialNumber::from(serial.clone()));
        let cert = p.signed_by(&public_key, &issuer).map_err(gen_err)?;
        Ok(IssuedSvid {
            cert: cert.der().clone(),
            serial,
            not_after,
        })
    }
}

/// Seals `secret` with a 32-byte key-encryption key (AES-256-GCM, random nonce); `label` is bound
/// as associated data so a blob sealed for one purpose cannot be opened as another.
pub fn seal(kek: &[u8; 32], label: &str, secret: &[u8]) -> Result<Vec<u8>, CaError> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, kek).map_err(|_| CaError::Unseal)?);
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| CaError::Generate("no randomness".to_owned()))?;
    let mut data = secret.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(label.as_bytes()),
        &mut data,
    )
    .map_err(|_| CaError::Generate("seal failed".to_owned()))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&data);
    Ok(out)
}

/// Opens what [`seal`] sealed with the same key and label.
pub fn open(kek: &[u8; 32], label: &str, sealed: &[u8]) -> Result<Vec<u8>, CaError> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, kek).map_err(|_| CaError::Unseal)?);
    let (nonce, body) = sealed.split_at_checked(NONCE_LEN).ok_or(CaError::Unseal)?;
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CaError::Unseal)?;
    let mut data = body.to_vec();
    let plain = key
        .open_in_place(nonce, Aad::from(label.as_bytes()), &mut data)
        .map_err(|_| CaError::Unseal)?;
    Ok(plain.to_vec())
}
