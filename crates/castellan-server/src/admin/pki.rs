//! The CA: issued certificates and their revocation, the revocation stream, the trust bundle
//! and CA rotation.

use super::{Caller, service_id};
use crate::api::{Bundle, CaRotated, CertificateInfo, CertificateRevoked, Revocation};
use crate::keys;
use crate::problem::Problem;
use crate::{Server, unix_now};
use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

pub(super) async fn list_certificates(
    _c: Caller,
    State(s): State<Arc<Server>>,
    Path(name): Path<String>,
) -> Result<Json<Vec<CertificateInfo>>, Problem> {
    service_id(&s, &name)?;
    let rows = s.store.certificates(&name).await?;
    Ok(Json(
        rows.iter()
            .map(|r| CertificateInfo {
                serial: castellan_audit::hex(&r.serial),
                issued_at: r.issued_at,
                not_after: r.not_after,
                revoked_at: r.revoked_at,
            })
            .collect(),
    ))
}

fn parse_serial(s: &str) -> Option<Vec<u8>> {
    let s: String = s.chars().filter(|c| *c != ':').collect();
    if s.is_empty() || s.len() > 64 {
        return None;
    }
    castellan_audit::unhex(&s)
}

pub(super) async fn revoke_certificate(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(serial): Path<String>,
) -> Result<Json<CertificateRevoked>, Problem> {
    c.require_admin()?;
    let bytes = parse_serial(&serial).ok_or_else(|| Problem::bad_request("serial must be hex"))?;
    let now = unix_now();
    s.store.revoke_certificate(&bytes, now).await?;
    s.changed().await;
    tracing::info!(admin = %c.name, serial = %castellan_audit::hex(&bytes), "certificate revoked");
    s.record_admin(
        &c.name,
        "certificate.revoke",
        &format!("certificate {}", castellan_audit::hex(&bytes)),
        200,
    )
    .await?;
    Ok(Json(CertificateRevoked {
        serial: castellan_audit::hex(&bytes),
        revoked_at: now,
    }))
}

#[derive(Deserialize)]
pub(super) struct Since {
    #[serde(default)]
    since: i64,
}

pub(super) async fn revocations(
    _c: Caller,
    State(s): State<Arc<Server>>,
    Query(q): Query<Since>,
) -> Result<Json<Vec<Revocation>>, Problem> {
    let rows = s.store.revocations_since(q.since).await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| Revocation {
                seq: r.seq,
                kind: r.kind,
                subject: r.subject,
                at: r.at,
            })
            .collect(),
    ))
}

pub(super) async fn bundle(_c: Caller, State(s): State<Arc<Server>>) -> Json<Bundle> {
    let certs = s.bundle();
    Json(Bundle {
        trust_domain: s.trust_domain.to_string(),
        pem: keys::pem_bundle(&certs),
        count: certs.len(),
    })
}

pub(super) async fn rotate_ca(
    c: Caller,
    State(s): State<Arc<Server>>,
) -> Result<Json<CaRotated>, Problem> {
    c.require_admin()?;
    let now = unix_now();
    let id = keys::add_ca(
        &s.store,
        &s.kek,
        &s.trust_domain,
        now,
        Duration::from_secs(s.cfg.ca_ttl_secs as u64),
    )
    .await?;
    s.store.retire_ca_keys_except(&id, now).await?;
    s.reload().await?;
    s.changed().await;
    let ks = s.keys.load();
    tracing::info!(admin = %c.name, ca = %id, bundle = ks.bundle.len(), "CA rotated");
    s.record_admin(&c.name, "ca.rotate", &format!("ca {id}"), 201)
        .await?;
    Ok(Json(CaRotated {
        id: id.to_string(),
        not_after: ks.active_ca.not_after,
        bundle_size: ks.bundle.len(),
    }))
}
