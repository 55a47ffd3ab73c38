//! The proxy's workload identity: bootstrapped once with a join token, persisted in the state
//! directory (the private key never leaves the machine), renewed over mTLS at half-life, and
//! swapped into both TLS sides without dropping open connections.

use crate::{ProxyConfig, ProxyError, unix_now};
use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use castellan_identity::{ContextSigner, SpiffeId};
use castellan_proto::v1::identity_client::IdentityClient;
use castellan_proto::v1::{CertifyRequest, RenewRequest, SvidResponse};
use rcgen::{CertificateParams, KeyPair};
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::Arc;

/// One SVID with its key.
pub struct Identity {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 DER.
    key_pkcs8: Vec<u8>,
    /// `notAfter`, Unix seconds.
    pub not_after: i64,
    /// When it was received (or, loaded from disk, its `notBefore`): half-life counts from here.
    pub issued_at: i64,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The PEM of the chain and of the key, for a tonic client identity.
    pub(crate) fn pem(&self) -> (String, String) {
        let mut cert = String::new();
        for c in &self.chain {
            cert.push_str(&pem("CERTIFICATE", c.as_ref()));
        }
        (cert, pem("PRIVATE KEY", &self.key_pkcs8))
    }

    /// When to renew: half-way through the lifetime.
    pub fn renew_at(&self) -> i64 {
        self.issued_at + (self.not_after - self.issued_at) / 2
    }
}

pub(crate) fn pem(label: &str, der: &[u8]) -> String {
    let mut out = format!("-----BEGIN {label}-----\n");
    let b64 = STANDARD.encode(der);
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The identity in force, for rustls (both sides) and the context signer.
pub struct CurrentIdentity {
    ident: ArcSwap<Identity>,
    certified: ArcSwap<CertifiedKey>,
    signer: ArcSwap<ContextSigner>,
}

impl std::fmt::Debug for CurrentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CurrentIdentity")
            .field("ident", &self.ident.load())
            .finish()
    }
}

fn certified(ident: &Identity) -> Result<CertifiedKey, ProxyError> {
    let provider = crate::tls::provider();
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            ident.key_pkcs8.clone(),
        )))
        .map_err(|e| ProxyError::Identity(format!("key: {e}")))?;
    Ok(CertifiedKey::new(ident.chain.clone(), key))
}

impl CurrentIdentity {
    pub(crate) fn new(ident: Identity) -> Result<CurrentIdentity, ProxyError> {
        let ck = certified(&ident)?;
        let signer = ContextSigner::new(ident.id.clone(), &ident.chain, &ident.key_pkcs8)
            .map_err(|e| ProxyError::Identity(e.to_string()))?;
        Ok(CurrentIdentity {
            ident: ArcSwap::from_pointee(ident),
            certified: ArcSwap::from_pointee(ck),
            signer: ArcSwap::from_pointee(signer),
        })
    }

    /// Swaps in a renewed identity; new handshakes use it, open connections keep theirs.
    pub(crate) fn swap(&self, ident: Identity) -> Result<(), ProxyError> {
        let ck = certified(&ident)?;
        let signer = ContextSigner::new(ident.id.clone(), &ident.chain, &ident.key_pkcs8)
            .map_err(|e| ProxyError::Identity(e.to_string()))?;
        self.certified.store(Arc::new(ck));
        self.signer.store(Arc::new(signer));
        self.ident.store(Arc::new(ident));
        Ok(())
    }

    /// The identity in force.
    pub fn current(&self) -> Arc<Identity> {
        self.ident.load_full()
    }

    /// The context-token signer for the identity in force.
    pub fn signer(&self) -> Arc<ContextSigner> {
        self.signer.load_full()
    }
}

impl ResolvesServerCert for CurrentIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified.load_full())
    }
}

impl ResolvesClientCert for CurrentIdentity {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.certified.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

const CERT_FILE: &str = "svid.pem";
const KEY_FILE: &str = "svid.key";

fn from_response(
    r: SvidResponse,
    key: &KeyPair,
) -> Result<(Identity, Vec<CertificateDer<'static>>), ProxyError> {
    let id = SpiffeId::parse(&r.spiffe_id).map_err(|e| ProxyError::Identity(e.to_string()))?;
    let chain: Vec<CertificateDer<'static>> =
        r.cert_chain.into_iter().map(CertificateDer::from).collect();
    let bundle: Vec<CertificateDer<'static>> = r
        .trust_bundle
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    if chain.is_empty() {
        return Err(ProxyError::Identity("empty chain".to_owned()));
    }
    // The CA backdates notBefore for skewed clocks; half-life counts from receipt.
    let ident = Identity {
        id,
        issued_at: unix_now(),
        not_after: r.not_after,
        key_pkcs8: key.serialize_der(),
        chain,
    };
    Ok((ident, bundle))
}

/// Writes `bytes` to `path` through a temporary file and a rename, readable by the owner only.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    std::fs::rename(&tmp, path)
}

/// Creates the state directory (and parents) for the owner only.
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn persist(dir: &Path, ident: &Identity) -> Result<(), ProxyError> {
    let io = |e: std::io::Error| ProxyError::Identity(format!("{}: {e}", dir.display()));
    private_dir(dir).map_err(io)?;
    let (cert, key) = ident.pem();
    write_private(&dir.join(KEY_FILE), key.as_bytes()).map_err(io)?;
    write_private(&dir.join(CERT_FILE), cert.as_bytes()).map_err(io)?;
    Ok(())
}

fn load_persisted(dir: &Path, now: i64) -> Option<Identity> {
    use rustls_pki_types::pem::PemObject as _;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join(CERT_FILE))
        .ok()?
        .collect::<Result<_, _>>()
        .ok()?;
    let key = PrivatePkcs8KeyDer::from_pem_file(dir.join(KEY_FILE)).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
    let not_after = cert.validity().not_after.timestamp();
    if not_after <= now + 60 {
        return None;
    }
    let uri = cert
        .subject_alternative_name()
        .ok()??
        .value
        .general_names
        .iter()
        .find_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })?;
    Some(Identity {
        id: SpiffeId::parse(&uri).ok()?,
        issued_at: cert.validity().not_before.timestamp(),
        not_after,
        key_pkcs8: key.secret_pkcs8_der().to_vec(),
        chain,
    })
}

fn new_csr() -> Result<(KeyPair, Vec<u8>), ProxyError> {
    let key = KeyPair::generate().map_err(|e| ProxyError::Identity(e.to_string()))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| ProxyError::Identity(e.to_string()))?;
    Ok((key, csr.der().to_vec()))
}

/// A channel to the control plane, accepted only with its SPIFFE ID under `bundle`
/// (never by the DNS name or IP in the URL), optionally authenticating with `ident`.
pub(crate) async fn control_channel(
    cfg: &ProxyConfig,
    bundle: &[CertificateDer<'static>],
    ident: Option<&Identity>,
) -> Result<tonic::transport::Channel, ProxyError> {
    let cp = |e: String| ProxyError::ControlPlane(format!("{}: {e}", cfg.control_plane));
    let tls = crate::tls::control_plane_client_config(
        bundle.to_vec(),
        ident.map(|i| (i.chain.clone(), i.key_pkcs8.clone())),
        &[b"h2"],
    )
    .map_err(cp)?;
    let uri: hyper::Uri = cfg
        .control_plane
        .parse()
        .map_err(|e| ProxyError::Config(format!("control_plane: {e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(ProxyError::Config(format!(
            "control_plane {}: must be https://",
            cfg.control_plane
        )));
    }
    let connector = crate::tls::TlsConnector::new(std::sync::Arc::new(tls));
    // tonic refuses an https:// endpoint unless its own TLS (which checks names) is on; the
    // connector always speaks TLS, so tonic is handed the same authority as http://.
    let mut parts = uri.into_parts();
    parts.scheme = Some(hyper::http::uri::Scheme::HTTP);
    let uri = hyper::Uri::from_parts(parts)
        .map_err(|e| ProxyError::Config(format!("control_plane: {e}")))?;
    tonic::transport::Endpoint::from(uri)
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .map_err(|e| cp(crate::error_chain(&e)))
}

/// The persisted identity if still good, else a new one from the join token. Returns the
/// identity and, when freshly certified, the bundle that came with it.
pub(crate) async fn bootstrap(
    cfg: &ProxyConfig,
    bundle: &[CertificateDer<'static>],
) -> Result<(Identity, Option<Vec<CertificateDer<'static>>>), ProxyError> {
    if let Some(ident) = load_persisted(&cfg.state_dir, unix_now()) {
        tracing::info!(id = %ident.id, not_after = ident.not_after, "using the persisted SVID");
        return Ok((ident, None));
    }
    let token = cfg.join_token.clone().ok_or_else(|| {
        ProxyError::Config("no usable SVID in the state directory and no join token".to_owned())
    })?;
    let (key, csr) = new_csr()?;
    let mut client = IdentityClient::new(control_channel(cfg, bundle, None).await?);
    let r = client
        .certify(CertifyRequest {
            join_token: token,
            csr_der: csr,
        })
        .await
        .map_err(|e| ProxyError::ControlPlane(format!("certify: {}", e.message())))?
        .into_inner();
    let (ident, bundle) = from_response(r, &key)?;
    persist(&cfg.state_dir, &ident)?;
    tracing::info!(id = %ident.id, not_after = ident.not_after, "certified with the join token");
    Ok((ident, Some(bundle)))
}

/// A new SVID for a new key, authenticated with the current one.
pub(crate) async fn renew(
    cfg: &ProxyConfig,
    bundle: &[CertificateDer<'static>],
    current: &Identity,
) -> Result<Identity, ProxyError> {
    let (key, csr) = new_csr()?;
    let mut client = IdentityClient::new(control_channel(cfg, bundle, Some(current)).await?);
    let r = client
        .renew(RenewRequest { csr_der: csr })
        .await
        .map_err(|e| ProxyError::ControlPlane(format!("renew: {}", e.message())))?
        .into_inner();
    let (ident, _) = from_response(r, &key)?;
    persist(&cfg.state_dir, &ident)?;
    Ok(ident)
}
