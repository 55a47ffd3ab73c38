//! What the listener learned about a request's connection, set on every request: the client's
//! certificate chain (if it sent one) and its address. Handlers read these; they do not
//! depend on the listener.

use rustls_pki_types::CertificateDer;
use std::sync::Arc;

/// The client's certificate chain as presented in the TLS handshake (verified by rustls against
/// the bundle; SPIFFE rules and revocation are checked by the handler that relies on it).
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerCerts(pub(crate) Option<Arc<Vec<CertificateDer<'static>>>>);

/// The client's address (the TCP peer).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerAddr(pub(crate) std::net::SocketAddr);
