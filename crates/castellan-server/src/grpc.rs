//! gRPC for proxies: `Certify` (join token + CSR → SVID) and `Renew` (current SVID over mTLS +
//! CSR → new SVID). The proxy's private key never leaves it.

use crate::keys::credential_hash;
use crate::{Server, unix_now};
use castellan_identity::{CaError, SpiffeId};
use castellan_proto::v1::identity_server::{Identity, IdentityServer};
use castellan_proto::v1::{CertifyRequest, RenewRequest, SvidResponse};
use castellan_store::{CertificateRow, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// Largest gRPC message accepted (a CSR is well under 2 KiB).
const MAX_MESSAGE: usize = 64 * 1024;

pub(crate) fn service(s: Arc<Server>) -> IdentityServer<IdentityService> {
    IdentityServer::new(IdentityService { s }).max_decoding_message_size(MAX_MESSAGE)
}

pub(crate) struct IdentityService {
    s: Arc<Server>,
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal("internal error")
}

impl IdentityService {
    async fn issue(
        &self,
        service: &str,
        csr: &[u8],
        kind: &'static str,
    ) -> Result<SvidResponse, Status> {
        let id = SpiffeId::for_service(&self.s.trust_domain, service).map_err(internal)?;
        let row = self.s.store.service(service).await.map_err(internal)?;
        let (mut dns, mut ips) = (Vec::new(), Vec::new());
        for n in row.dns_names.split_whitespace() {
            // Checked again here, not only at registration: a row written past the API (or
            // before the control plane's names changed) must not yield an impersonating SVID.
            if self.s.is_own_name(n) {
                tracing::error!(%service, name = n, "refusing to issue an SVID naming the control plane's host");
                metrics::counter!("castellan_server_svid_refusals_total", "reason" => "control-plane-name").increment(1);
                return Err(Status::failed_precondition(format!(
                    "service {service:?} is registered with {n:?}, a name the control plane serves under"
                )));
            }
            match n.parse::<std::net::IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => dns.push(n.to_owned()),
            }
        }
        let now = unix_now();
        let ks = self.s.keys.load();
        let issued = ks
            .active_ca
            .ca
            .issue_svid_with_names(
                csr,
                &id,
                &dns,
                &ips,
                now,
                Duration::from_secs(self.s.cfg.svid_ttl_secs as u64),
            )
            .map_err(|e| match e {
                CaError::Csr(e) => Status::invalid_argument(format!("CSR refused: {e}")),
                e => internal(e),
            })?;
        self.s
            .store
            .record_certificate(&CertificateRow {
                serial: issued.serial.clone(),
                service: service.to_owned(),
                issued_at: now,
                not_after: issued.not_after,
                revoked_at: None,
            })
            .await
            .map_err(internal)?;
        metrics::counter!("castellan_server_svids_issued_total", "kind" => kind).increment(1);
        tracing::info!(%service, kind, not_after = issued.not_after, "SVID issued");
        Ok(SvidResponse {
            spiffe_id: id.as_str().to_owned(),
            cert_chain: vec![issued.cert.to_vec()],
            trust_bundle: ks.bundle.iter().map(|c| c.to_vec()).collect(),
            not_after: issued.not_after,
        })
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        req: Request<CertifyRequest>,
    ) -> Result<Response<SvidResponse>, Status> {
        let r = req.into_inner();
        if r.join_token.is_empty() || r.join_token.len() > 256 {
            return Err(Status::unauthenticated("join token required"));
        }
        let service = match self
            .s
            .store
            .consume_join_token(&credential_hash(&r.join_token), unix_now())
            .await
        {
            Ok(s) => s,
            Err(StoreError::NotFound(_)) => {
                metrics::counter!("castellan_server_join_failures_total").increment(1);
                return Err(Status::unauthenticated(
                    "join token unknown, used, expired, or for a disabled service",
                ));
            }
            Err(e) => return Err(internal(e)),
        };
        self.issue(&service, &r.csr_der, "certify")
            .await
            .map(Response::new)
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<SvidResponse>, Status> {
        // The current SVID (TLS client certificate) authenticates; the service must be enabled.
        let service = self.s.grpc_service_caller(&req).await?;
        let csr = req.into_inner().csr_der;
        self.issue(&service, &csr, "renew").await.map(Response::new)
    }
}
