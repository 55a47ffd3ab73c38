//! Checking a workload's certificate signing request before the CA signs it: the signature proves
//! possession of the key, the key is strong enough, and the only name asked for is the
//! workload's own SPIFFE ID. The CA sets every other field and extension itself.

use crate::spiffe::SpiffeId;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

/// The smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// Why a CSR was refused. All are the requester's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Not a DER PKCS#10 request, or trailing bytes after it.
    #[error("CSR does not parse: {0}")]
    Malformed(String),
    /// The self-signature does not verify.
    #[error("CSR signature does not verify")]
    BadSignature,
    /// RSA under [`MIN_RSA_BITS`], an unknown curve, or an unsupported key type.
    #[error("CSR key is not accepted: {0}")]
    WeakKey(String),
    /// A requested name other than the workload's own SPIFFE ID.
    #[error("CSR asks for a name that is not {expected}: {got}")]
    ForeignName {
        /// The workload's ID.
        expected: String,
        /// What was asked.
        got: String,
    },
}

/// A checked CSR: the public key to certify, as SubjectPublicKeyInfo DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedCsr {
    /// SubjectPublicKeyInfo, DER.
    pub public_key_spki: Vec<u8>,
}

/// Checks a DER CSR for the workload `id`.
pub fn check_csr(der: &[u8], id: &SpiffeId) -> Result<CheckedCsr, CsrError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed("trailing bytes".to_owned()));
    }
    // Key strength first: ring will not even verify a weak RSA signature, and "weak key" is the
    // clearer answer.
    let spki = &csr.certification_request_info.subject_pki;
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_PKCS1_RSAENCRYPTION {
        match spki.parsed() {
            Ok(PublicKey::RSA(k)) if k.key_size() >= MIN_RSA_BITS => {}
            Ok(PublicKey::RSA(k)) => {
                return Err(CsrError::WeakKey(format!("RSA {} bits", k.key_size())));
            }
            _ => return Err(CsrError::WeakKey("unreadable RSA key".to_owned())),
        }
    } else if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        if !curve.is_some_and(|c| c == OID_EC_P256 || c == OID_NIST_EC_P384) {
            return Err(CsrError::WeakKey(
                "EC curve other than P-256 or P-384".to_owned(),
            ));
        }
    } else if *alg != OID_SIG_ED25519 {
        return Err(CsrError::WeakKey(format!("key algorithm {alg}")));
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                match name {
                    GeneralName::URI(u) if *u == id.as_str() => {}
                    other => {
                        return Err(CsrError::ForeignName {
                            expected: id.to_string(),
                            got: other.to_string(),
                        });
                    }
                }
            }
        }
    }
    Ok(CheckedCsr {
        public_key_spki: spki.raw.to_vec(),
    })
}
