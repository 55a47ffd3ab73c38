//! Castellan workload identity: SPIFFE IDs and, with the `x509` feature, X.509-SVID validation
//! used by every component that accepts a peer certificate. No network, no clock of its own: the
//! caller passes the time.

#[cfg(feature = "x509")]
pub mod ca;
#[cfg(feature = "x509")]
pub mod context;
#[cfg(feature = "x509")]
pub mod csr;
#[cfg(feature = "x509")]
pub mod issue;
pub mod spiffe;
#[cfg(feature = "x509")]
pub mod svid;
#[cfg(feature = "x509")]
pub mod token;

#[cfg(feature = "x509")]
pub use ca::{CaError, CertificateAuthority, IssuedSvid};
#[cfg(feature = "x509")]
pub use context::{
    ContextError, ContextSigner, UserContext, ValidatedSigner, context_header,
    validate_context_signer, verify_context, verify_context_signed_by,
};
#[cfg(feature = "x509")]
pub use csr::{CheckedCsr, CsrError, check_csr};
#[cfg(feature = "x509")]
pub use issue::{IssueError, SigningKey, issue_token, jwks};
pub use spiffe::{SpiffeId, SpiffeIdError, validate_trust_domain};
#[cfg(feature = "x509")]
pub use svid::{SvidError, SvidUsage, SvidValidator, TrustBundle};
#[cfg(feature = "x509")]
pub use token::{TokenError, TokenVerifier, VerifiedToken};
