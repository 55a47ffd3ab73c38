//! The proxy registry: every proxy with what it enforces.

use super::Caller;
use crate::api::ProxyInfo;
use crate::problem::Problem;
use crate::{Server, unix_now};
use axum::Json;
use axum::extract::State;
use std::sync::Arc;

pub(super) async fn list_proxies(
    _c: Caller,
    State(s): State<Arc<Server>>,
) -> Result<Json<Vec<ProxyInfo>>, Problem> {
    let now = unix_now();
    let current = s.store.latest_policy_revision().await?.map(|r| r.rev);
    Ok(Json(
        s.store
            .proxies()
            .await?
            .into_iter()
            .map(|p| ProxyInfo {
                up_to_date: Some(p.revision) == current,
                seconds_since_contact: now - p.last_contact,
                proxy_id: p.proxy_id,
                service: p.service,
                mode: p.mode,
                address: p.address,
                revision: p.revision,
                cert_not_after: p.cert_not_after,
                last_contact: p.last_contact,
            })
            .collect(),
    ))
}
