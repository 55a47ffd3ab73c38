//! The proxy registry: every proxy with what it enforces.

use super::Caller;
use crate::problem::Problem;
use crate::{Server, unix_now};
use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use std::sync::Arc;

pub(super) async fn list_proxies(
    _c: Caller,
    State(s): State<Arc<Server>>,
) -> Result<Json<Value>, Problem> {
    let now = unix_now();
    let current = s.store.latest_policy_revision().await?.map(|r| r.rev);
    Ok(Json(Value::Array(
        s.store
            .proxies()
            .await?
            .iter()
            .map(|p| json!({"proxy_id": p.proxy_id, "service": p.service, "mode": p.mode, "address": p.address,
                            "revision": p.revision, "up_to_date": Some(p.revision) == current,
                            "cert_not_after": p.cert_not_after, "last_contact": p.last_contact,
                            "seconds_since_contact": now - p.last_contact}))
            .collect(),
    )))
}
