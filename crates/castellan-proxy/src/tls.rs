//! TLS for the data plane: peers are verified with the SVID validator as it stands right now
//! (pushed bundle and revocations), not with a verifier frozen at start-up.

use crate::state::State;
use castellan_identity::{SpiffeId, SvidUsage};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::Arc;

/// The process's TLS crypto provider (aws-lc-rs), passed explicitly everywhere.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn chain(
    end: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Vec<CertificateDer<'static>> {
    let mut c = vec![end.clone().into_owned()];
    c.extend(intermediates.iter().map(|i| i.clone().into_owned()));
    c
}

fn sig_tls12(
    m: &[u8],
    c: &CertificateDer<'_>,
    d: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls12_signature(m, c, d, &provider().signature_verification_algorithms)
}

fn sig_tls13(
    m: &[u8],
    c: &CertificateDer<'_>,
    d: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(m, c, d, &provider().signature_verification_algorithms)
}

fn schemes() -> Vec<rustls::SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}

/// Whether a client's SVID chain is acceptable now: valid, unrevoked, of an enabled service.
/// Called in the handshake and again for open connections whenever the bundle or the
/// revocations change.
pub(crate) fn check_client(
    state: &State,
    chain: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<SpiffeId, String> {
    let id = state
        .validator()
        .validate(chain, now, SvidUsage::Client)
        .map_err(|e| format!("client SVID refused: {e}"))?;
    if id.service_name().is_some_and(|s| state.is_disabled(s)) {
        return Err(format!("{id} is disabled"));
    }
    Ok(id)
}

/// Inbound mTLS: the client must present a valid, unrevoked SVID of the trust domain.
#[derive(Debug)]
pub(crate) struct SvidClientVerifier {
    pub(crate) state: Arc<State>,
}

impl ClientCertVerifier for SvidClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end: &CertificateDer<'_>,
        inter: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_client(&self.state, &chain(end, inter), now).map_err(rustls::Error::General)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        sig_tls12(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        sig_tls13(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        schemes()
    }
}

/// The gateway's edge: a client certificate is optional and never judged by its issuer — it
/// only proves possession of a key (rustls checks the handshake signature), which is what a
/// certificate-bound token (RFC 8705 `cnf.x5t#S256`) asks for.
#[derive(Debug)]
pub(crate) struct OptionalClientCert;

impl ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end: &CertificateDer<'_>,
        _inter: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        sig_tls12(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        sig_tls13(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        schemes()
    }
}

/// base64url SHA-256 of a certificate's DER: its `x5t#S256`.
pub(crate) fn x5t_s256(cert: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.as_ref());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d.as_ref())
}

/// Where a server verifier gets its SVID validator.
#[derive(Debug)]
enum Validation {
    /// The proxy's enforcement state as it stands at handshake time (pushed bundle and
    /// revocations).
    Live(Arc<State>),
    /// A fixed bundle (the CLI, and a proxy's channel to the control plane before and beside
    /// its first push).
    Fixed(Box<castellan_identity::SvidValidator>),
}

/// Outbound (m)TLS: the server must present a valid SVID carrying exactly the SPIFFE ID we
/// meant to reach. The DNS name or IP the client dialled plays no part: a workload may
/// register DNS names and IPs for its SVID, so a name proves nothing about who answers.
#[derive(Debug)]
pub struct SvidServerVerifier {
    validation: Validation,
    expected: SpiffeId,
}

impl SvidServerVerifier {
    /// A verifier accepting only `expected`'s SVID, validated with `state`'s bundle and
    /// revocations at handshake time.
    pub fn new(state: Arc<State>, expected: SpiffeId) -> SvidServerVerifier {
        SvidServerVerifier {
            validation: Validation::Live(state),
            expected,
        }
    }

    /// A verifier accepting only the control plane (`spiffe://<td>/castellan/server`) of the
    /// trust domain named by `bundle`'s CA certificates.
    pub fn control_plane(
        bundle: Vec<CertificateDer<'static>>,
    ) -> Result<SvidServerVerifier, castellan_identity::SvidError> {
        let bundle = castellan_identity::TrustBundle::from_roots(bundle)?;
        let expected = SpiffeId::control_plane(bundle.trust_domain())
            .map_err(|e| castellan_identity::SvidError::Bundle(e.to_string()))?;
        Ok(SvidServerVerifier {
            validation: Validation::Fixed(Box::new(castellan_identity::SvidValidator::new(bundle))),
            expected,
        })
    }

    /// The SPIFFE ID this verifier accepts.
    pub fn expected(&self) -> &SpiffeId {
        &self.expected
    }
}

/// A client configuration that trusts only the control plane of `bundle`'s trust domain, by
/// SPIFFE ID; `client` adds mTLS with the proxy's SVID (chain, PKCS#8 key).
pub fn control_plane_client_config(
    bundle: Vec<CertificateDer<'static>>,
    client: Option<(Vec<CertificateDer<'static>>, Vec<u8>)>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, String> {
    let verifier = Arc::new(SvidServerVerifier::control_plane(bundle).map_err(|e| e.to_string())?);
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, rustls_pki_types::PrivateKeyDer::Pkcs8(key.into()))
            .map_err(|e| e.to_string())?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

impl ServerCertVerifier for SvidServerVerifier {
    fn verify_server_cert(
        &self,
        end: &CertificateDer<'_>,
        inter: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = chain(end, inter);
        let id = match &self.validation {
            Validation::Live(state) => state.validator().validate(&chain, now, SvidUsage::Server),
            Validation::Fixed(v) => v.validate(&chain, now, SvidUsage::Server),
        }
        .map_err(|e| rustls::Error::General(format!("server SVID refused: {e}")))?;
        if id != self.expected {
            return Err(rustls::Error::General(format!(
                "server is {id}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        sig_tls12(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        sig_tls13(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        schemes()
    }
}

/// Dials TCP (no Nagle delay) and then TLS with a fixed client configuration, for tonic
/// channels whose server is checked by SPIFFE ID rather than by the name in the URL.
#[derive(Debug, Clone)]
pub(crate) struct TlsConnector {
    cfg: Arc<rustls::ClientConfig>,
}

impl TlsConnector {
    pub(crate) fn new(cfg: Arc<rustls::ClientConfig>) -> TlsConnector {
        TlsConnector { cfg }
    }
}

type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower::Service<hyper::Uri> for TlsConnector {
    type Response = TlsIo;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<TlsIo, std::io::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let cfg = self.cfg.clone();
        Box::pin(async move {
            let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_owned());
            let host = uri.host().ok_or_else(|| bad("URL without host"))?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            // SNI only; the certificate is judged by its SPIFFE ID.
            let name = ServerName::try_from(host.clone()).map_err(|_| bad("bad host"))?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}
