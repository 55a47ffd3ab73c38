//! X.509-SVID validation (SPIFFE X.509-SVID standard), shared by every component that accepts a
//! workload certificate: exactly one URI SAN holding a SPIFFE ID of the bundle's trust domain, a
//! leaf that is not a CA, digitalSignature without certificate or CRL signing, the extended key
//! usage the connection needs, a chain to the trust bundle, validity at the given time, and a
//! serial not revoked.

use crate::spiffe::{SpiffeId, SpiffeIdError};
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use std::collections::HashSet;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Which side of a TLS connection the SVID is presented by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvidUsage {
    /// A client certificate: needs EKU clientAuth.
    Client,
    /// A server certificate: needs EKU serverAuth.
    Server,
}

/// Why an SVID was refused. Every variant is the peer's fault except [`SvidError::Bundle`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// No certificate was presented.
    #[error("no certificate presented")]
    Empty,
    /// The leaf does not parse as X.509.
    #[error("certificate does not parse: {0}")]
    Malformed(String),
    /// The leaf has no URI SAN.
    #[error("certificate has no URI SAN")]
    NoUriSan,
    /// The leaf has more than one URI SAN (SPIFFE forbids it).
    #[error("certificate has {0} URI SANs; an SVID has exactly one")]
    MultipleUriSans(usize),
    /// The URI SAN holds a NUL or other control byte.
    #[error("URI SAN contains a control character")]
    ControlCharacter,
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN is not a SPIFFE ID: {0}")]
    NotSpiffe(SpiffeIdError),
    /// The SPIFFE ID is of another trust domain.
    #[error("SPIFFE ID {id} is not in trust domain {expected}")]
    WrongTrustDomain {
        /// The ID presented.
        id: String,
        /// The bundle's trust domain.
        expected: String,
    },
    /// The leaf is a CA (basicConstraints cA true) or may sign certificates or CRLs.
    #[error("leaf certificate is a CA or may sign certificates")]
    CaLeaf,
    /// keyUsage is missing or lacks digitalSignature.
    #[error("leaf certificate lacks keyUsage digitalSignature")]
    NoDigitalSignature,
    /// extendedKeyUsage is missing or lacks the usage this connection needs.
    #[error("leaf certificate lacks extendedKeyUsage {0}")]
    WrongExtendedKeyUsage(&'static str),
    /// Expired at the given time.
    #[error("certificate expired")]
    Expired,
    /// Not valid yet at the given time.
    #[error("certificate is not valid yet")]
    NotYetValid,
    /// The serial number is revoked.
    #[error("certificate serial {0} is revoked")]
    Revoked(String),
    /// The chain does not lead to the trust bundle, or a signature is bad.
    #[error("certificate chain does not verify against the trust bundle: {0}")]
    Chain(String),
    /// The trust bundle itself is unusable (our configuration, not the peer).
    #[error("trust bundle is invalid: {0}")]
    Bundle(String),
}

/// The CA certificates of one trust domain.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    trust_domain: String,
    roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// A bundle for `trust_domain` with the given DER roots (several during a CA rotation).
    pub fn new(
        trust_domain: &str,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<TrustBundle, SvidError> {
        crate::spiffe::validate_trust_domain(trust_domain)
            .map_err(|e| SvidError::Bundle(e.to_string()))?;
        if roots.is_empty() {
            return Err(SvidError::Bundle("no CA certificates".to_owned()));
        }
        for r in &roots {
            webpki::anchor_from_trusted_cert(r).map_err(|e| SvidError::Bundle(format!("{e:?}")))?;
        }
        Ok(TrustBundle {
            trust_domain: trust_domain.to_owned(),
            roots,
        })
    }

    /// A bundle whose trust domain is read from its CA certificates' URI SAN
    /// (`spiffe://<td>`, as Castellan's CA carries): a client given only a bundle file knows
    /// which control plane ID to expect. Every root must name the same trust domain.
    pub fn from_roots(roots: Vec<CertificateDer<'static>>) -> Result<TrustBundle, SvidError> {
        let mut td: Option<String> = None;
        for r in &roots {
            let (_, cert) = X509Certificate::from_der(r.as_ref())
                .map_err(|e| SvidError::Bundle(format!("CA certificate does not parse: {e}")))?;
            let uri = cert
                .subject_alternative_name()
                .ok()
                .flatten()
                .and_then(|san| {
                    san.value.general_names.iter().find_map(|g| match g {
                        GeneralName::URI(u) => Some(u.to_string()),
                        _ => None,
                    })
                })
                .ok_or_else(|| {
                    SvidError::Bundle("CA certificate names no trust domain (URI SAN)".to_owned())
                })?;
            let this = crate::spiffe::split_spiffe_id(&uri)
                .map_err(|e| SvidError::Bundle(format!("CA URI SAN {uri:?}: {e}")))?
                .0
                .to_owned();
            match &td {
                Some(t) if *t != this => {
                    return Err(SvidError::Bundle(format!(
                        "bundle mixes trust domains {t} and {this}"
                    )));
                }
                _ => td = Some(this),
            }
        }
        let td = td.ok_or_else(|| SvidError::Bundle("no CA certificates".to_owned()))?;
        TrustBundle::new(&td, roots)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
}

/// Validates SVIDs against a bundle and a set of revoked serials.
#[derive(Debug, Clone)]
pub struct SvidValidator {
    bundle: TrustBundle,
    revoked: HashSet<Vec<u8>>,
}

const OID_SERVER_AUTH: &str = "serverAuth";
const OID_CLIENT_AUTH: &str = "clientAuth";

impl SvidValidator {
    /// A validator trusting `bundle`.
    pub fn new(bundle: TrustBundle) -> SvidValidator {
        SvidValidator {
            bundle,
            revoked: HashSet::new(),
        }
    }

    /// Marks a serial number (big-endian bytes, as in the certificate) as revoked.
    pub fn revoke(&mut self, serial: &[u8]) {
        self.revoked.insert(strip_leading_zeros(serial).to_vec());
    }

    /// Validates `chain` (leaf first, then intermediates) at `now`; returns the SPIFFE ID.
    pub fn validate(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
        usage: SvidUsage,
    ) -> Result<SpiffeId, SvidError> {
        let leaf_der = chain.first().ok_or(SvidError::Empty)?;
        let (_, leaf) = X509Certificate::from_der(leaf_der.as_ref())
            .map_err(|e| SvidError::Malformed(e.to_string()))?;
        let id = self.check_leaf(&leaf, usage)?;
        let serial = strip_leading_zeros(leaf.raw_serial());
        if self.revoked.contains(serial) {
            return Err(SvidError::Revoked(hex(serial)));
        }
        self.check_chain(leaf_der, chain.get(1..).unwrap_or_default(), now, usage)?;
        Ok(id)
    }

    fn check_leaf(
        &self,
        leaf: &X509Certificate<'_>,
        usage: SvidUsage,
    ) -> Result<SpiffeId, SvidError> {
        let mut uris: Vec<&str> = Vec::new();
        let mut ca = false;
        let mut key_usage = None;
        let mut eku = None;
        for ext in leaf.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        if let GeneralName::URI(u) = name {
                            uris.push(u);
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) => ca |= bc.ca,
                ParsedExtension::KeyUsage(ku) => key_usage = Some(*ku),
                ParsedExtension::ExtendedKeyUsage(e) => eku = Some((e.server_auth, e.client_auth)),
                ParsedExtension::ParseError { error } => {
                    return Err(SvidError::Malformed(error.to_string()));
                }
                _ => {}
            }
        }
        let uri = match uris.as_slice() {
            [] => return Err(SvidError::NoUriSan),
            [one] => *one,
            more => return Err(SvidError::MultipleUriSans(more.len())),
        };
        if uri.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err(SvidError::ControlCharacter);
        }
        let id = SpiffeId::parse(uri).map_err(SvidError::NotSpiffe)?;
        if id.trust_domain() != self.bundle.trust_domain {
            return Err(SvidError::WrongTrustDomain {
                id: id.to_string(),
                expected: self.bundle.trust_domain.clone(),
            });
        }
        let ku = key_usage.ok_or(SvidError::NoDigitalSignature)?;
        if ca || ku.key_cert_sign() || ku.crl_sign() {
            return Err(SvidError::CaLeaf);
        }
        if !ku.digital_signature() {
            return Err(SvidError::NoDigitalSignature);
        }
        let (server, client) = eku.unwrap_or((false, false));
        match usage {
            SvidUsage::Client if !client => {
                return Err(SvidError::WrongExtendedKeyUsage(OID_CLIENT_AUTH));
            }
            SvidUsage::Server if !server => {
                return Err(SvidError::WrongExtendedKeyUsage(OID_SERVER_AUTH));
            }
            _ => {}
        }
        Ok(id)
    }

    fn check_chain(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: SvidUsage,
    ) -> Result<(), SvidError> {
        let anchors: Vec<TrustAnchor<'_>> = self
            .bundle
            .roots
            .iter()
            .map(webpki::anchor_from_trusted_cert)
            .collect::<Result<_, _>>()
            .map_err(|e| SvidError::Bundle(format!("{e:?}")))?;
        let cert = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| SvidError::Malformed(format!("{e:?}")))?;
        let eku = match usage {
            SvidUsage::Client => webpki::KeyUsage::client_auth(),
            SvidUsage::Server => webpki::KeyUsage::server_auth(),
        };
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            now,
            eku,
            None,
            None,
        )
        .map(|_| ())
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. } => SvidError::Expired,
            webpki::Error::CertNotValidYet { .. } => SvidError::NotYetValid,
            other => SvidError::Chain(format!("{other:?}")),
        })
    }
}

fn strip_leading_zeros(serial: &[u8]) -> &[u8] {
    let start = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
    serial.get(start..).unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
