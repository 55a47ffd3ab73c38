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
        let id = self
            .state
            .validator()
            .validate(&chain(end, inter), now, SvidUsage::Client)
            .map_err(|e| rustls::Error::General(format!("client SVID refused: {e}")))?;
        if id.service_name().is_some_and(|s| self.state.is_disabled(s)) {
            return Err(rustls::Error::General(format!("{id} is disabled")));
        }
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

/// Outbound mTLS: the server must present the SVID of the service we meant to reach.
#[derive(Debug)]
pub struct SvidServerVerifier {
    pub(crate) state: Arc<State>,
    pub(crate) expected: SpiffeId,
}

impl SvidServerVerifier {
    /// A verifier accepting only `expected`'s SVID, validated with `state`'s bundle and
    /// revocations at handshake time.
    pub fn new(state: Arc<State>, expected: SpiffeId) -> SvidServerVerifier {
        SvidServerVerifier { state, expected }
    }
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
        let id = self
            .state
            .validator()
            .validate(&chain(end, inter), now, SvidUsage::Server)
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

/// Peer SPIFFE ID of an accepted mTLS connection (already verified in the handshake; parsed
/// again through the validator so the caller holds a typed ID).
pub(crate) fn peer_id(
    state: &State,
    certs: Option<&[CertificateDer<'static>]>,
) -> Option<SpiffeId> {
    state
        .validator()
        .validate(certs?, UnixTime::now(), SvidUsage::Client)
        .ok()
}
