//! The control plane's TLS: a serving certificate issued by its own CA (renewed at half-life
//! and after a CA rotation), client certificates optional but, when sent, verified against the
//! trust bundle, and one explicitly chosen crypto provider.

use crate::keys::KeySet;
use crate::{ServerConfig, ServerError};
use castellan_identity::SpiffeId;
use rcgen::{KeyPair, PublicKeyData as _};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Lifetime of the serving certificate; renewed at half of it.
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);

/// The serving certificate in use.
pub(crate) struct ServingState {
    pub(crate) addr: SocketAddr,
    chain_ca: Option<CertificateDer<'static>>,
    issued_at: i64,
    not_after: i64,
    chain: Vec<CertificateDer<'static>>,
    key_pkcs8: Vec<u8>,
}

impl ServingState {
    /// The serving certificate chain and its PKCS#8 key: the control plane's own SVID, which
    /// signs the checkpoints of its admin-action chain.
    pub(crate) fn identity(&self) -> (Vec<CertificateDer<'static>>, Vec<u8>) {
        (self.chain.clone(), self.key_pkcs8.clone())
    }

    /// Whether a new certificate is needed: past half-life, or its CA left the bundle. A CA
    /// rotation alone does not switch it, so clients holding the previous bundle keep
    /// connecting while the new bundle spreads (the overlap SPIRE also gives).
    pub(crate) fn due(&self, ks: &KeySet, now: i64) -> bool {
        let ca_gone = !ks.bundle.iter().any(|c| self.chain_ca.as_ref() == Some(c));
        ca_gone || now >= self.issued_at + (self.not_after - self.issued_at) / 2
    }
}

fn tls_err(e: impl std::fmt::Display) -> ServerError {
    ServerError::Internal(format!("tls: {e}"))
}

/// The process's one rustls crypto provider (aws-lc-rs), passed explicitly so a library user's
/// global default cannot change what the server negotiates.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The IP address the serving certificate names for a listener on `addr`.
fn serving_ip(addr: SocketAddr) -> IpAddr {
    if addr.ip().is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        addr.ip()
    }
}

/// Whether `name` (a DNS name or IP literal) is one the control plane's serving certificate
/// carries: a workload SVID must never name it, or its holder could pass for the control
/// plane with any client that checks only names.
pub(crate) fn is_serving_name(cfg: &ServerConfig, addr: SocketAddr, name: &str) -> bool {
    match name.parse::<IpAddr>() {
        Ok(ip) => ip == serving_ip(addr) || ip == addr.ip(),
        Err(_) => {
            let n = name.trim_end_matches('.');
            cfg.hostnames
                .iter()
                .any(|h| h.trim_end_matches('.').eq_ignore_ascii_case(n))
        }
    }
}

/// Issues a fresh serving certificate and builds the TLS configuration around it.
pub(crate) fn serving_config(
    cfg: &ServerConfig,
    trust_domain: &str,
    addr: SocketAddr,
    ks: &KeySet,
    now: i64,
) -> Result<(ServingState, rustls::ServerConfig), ServerError> {
    let key = KeyPair::generate().map_err(tls_err)?;
    let id =
        SpiffeId::control_plane(trust_domain).map_err(|e| ServerError::Internal(e.to_string()))?;
    let ip = serving_ip(addr);
    let issued = ks
        .active_ca
        .ca
        .issue_serving_cert(
            &key.subject_public_key_info(),
            &id,
            &cfg.hostnames,
            &[ip],
            now,
            SERVING_TTL,
        )
        .map_err(|e| ServerError::Internal(e.to_string()))?;
    let state = ServingState {
        addr,
        chain_ca: Some(ks.active_ca.ca.cert().clone()),
        issued_at: now,
        not_after: issued.not_after,
        chain: vec![issued.cert],
        key_pkcs8: key.serialize_der(),
    };
    let tls = rebuild(&state, ks)?;
    Ok((state, tls))
}

/// The TLS configuration for `state`'s certificate and `ks`'s bundle.
pub(crate) fn rebuild(
    state: &ServingState,
    ks: &KeySet,
) -> Result<rustls::ServerConfig, ServerError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for c in &ks.bundle {
        roots.add(c.clone()).map_err(tls_err)?;
    }
    // Optional: bootstrap (join token), OAuth2 clients with secrets and admins come without a
    // certificate; renewals and `tls_client_auth` come with one, which must chain to the bundle.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(tls_err)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(state.key_pkcs8.clone()));
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(state.chain.clone(), key)
        .map_err(tls_err)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The dashboard's own listener: the operator's certificate and key (PEM files; the key must
/// be readable by its owner only), no client certificates (browsers sign in with a credential).
pub(crate) fn dashboard_config(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    use rustls_pki_types::pem::PemObject as _;
    use std::os::unix::fs::PermissionsExt as _;
    let bad = |f: &std::path::Path, e: String| {
        ServerError::Config(format!("dashboard: {}: {e}", f.display()))
    };
    let mode = std::fs::metadata(key_file)
        .map_err(|e| bad(key_file, e.to_string()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(bad(
            key_file,
            format!(
                "key file mode {:o} lets others read it (chmod 600)",
                mode & 0o777
            ),
        ));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| bad(cert_file, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert_file, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert_file, "no certificate".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| bad(key_file, e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert_file, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| bad(cert_file, e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
