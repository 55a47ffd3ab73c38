//! Services: registration, kinds and routes, join tokens, disabling, OpenAPI documents.

use super::{Body, Caller, is_name, service_id, words};
use crate::api::{
    JoinToken, NewService, ServiceAdded, ServiceDisabled, ServiceInfo, ServiceRole, ServiceUpdated,
    SpecSet,
};
use crate::keys::{credential_hash, random_id};
use crate::problem::Problem;
use crate::{Server, unix_now};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::sync::Arc;

/// Prefix of join tokens.
pub const JOIN_TOKEN_PREFIX: &str = "cjt_";

pub(super) async fn list_services(
    _c: Caller,
    State(s): State<Arc<Server>>,
) -> Result<Json<Vec<ServiceInfo>>, Problem> {
    let rows = s.store.services().await?;
    Ok(Json(
        rows.iter()
            .map(|r| ServiceInfo {
                name: r.name.clone(),
                spiffe_id: format!("spiffe://{}/svc/{}", s.trust_domain, r.name),
                created_at: r.created_at,
                disabled_at: r.disabled_at,
                dns_names: words(&r.dns_names),
                kind: r.kind.clone(),
                routes: words(&r.routes),
                upstreams: words(&r.upstreams),
            })
            .collect(),
    ))
}

impl ServiceRole {
    /// Checked (kind, routes, upstreams), space-joined as stored.
    fn checked(&self) -> Result<(String, String, String), Problem> {
        let kind = self.kind.as_deref().unwrap_or("sidecar");
        if !matches!(kind, "sidecar" | "gateway" | "decision") {
            return Err(Problem::bad_request(
                "kind must be sidecar, gateway or decision",
            ));
        }
        for r in &self.routes {
            let ok = r.split_once('=').is_some_and(|(prefix, svc)| {
                prefix.starts_with('/') && !prefix.contains(char::is_whitespace) && is_name(svc)
            });
            if !ok {
                return Err(Problem::bad_request(format!(
                    "route {r:?} must be PREFIX=SERVICE, e.g. /orders=orders"
                )));
            }
        }
        if let Some(bad) = self.upstreams.iter().find(|u| !is_name(u)) {
            return Err(Problem::bad_request(format!(
                "upstream {bad:?} is not a service name"
            )));
        }
        if kind == "sidecar" && !self.routes.is_empty() {
            return Err(Problem::bad_request("a sidecar has no routes"));
        }
        Ok((
            kind.to_owned(),
            self.routes.join(" "),
            self.upstreams.join(" "),
        ))
    }
}

pub(super) async fn update_service(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(name): Path<String>,
    Body(role): Body<ServiceRole>,
) -> Result<Json<ServiceUpdated>, Problem> {
    c.require_admin()?;
    service_id(&s, &name)?;
    let (kind, routes, upstreams) = role.checked()?;
    s.store
        .update_service(&name, &kind, &routes, &upstreams)
        .await?;
    s.changed().await;
    tracing::info!(admin = %c.name, service = %name, %kind, "service registration changed");
    s.record_admin(
        &c.name,
        "service.update",
        &format!("service {name} as {kind}"),
        200,
    )
    .await?;
    Ok(Json(ServiceUpdated {
        name,
        kind,
        routes: words(&routes),
        upstreams: words(&upstreams),
    }))
}

fn is_dns_name_or_ip(n: &str) -> bool {
    n.parse::<std::net::IpAddr>().is_ok()
        || ((1..=253).contains(&n.len())
            && n.split('.').all(|l| {
                (1..=63).contains(&l.len())
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
            }))
}

async fn issue_join_token(s: &Server, name: &str, now: i64) -> Result<(String, i64), Problem> {
    let token = format!("{JOIN_TOKEN_PREFIX}{}", random_id(32)?);
    let expires_at = now + s.cfg.join_token_ttl_secs;
    s.store
        .add_join_token(&credential_hash(&token), name, expires_at)
        .await?;
    Ok((token, expires_at))
}

pub(super) async fn add_service(
    c: Caller,
    State(s): State<Arc<Server>>,
    Body(b): Body<NewService>,
) -> Result<Response, Problem> {
    c.require_admin()?;
    let id = service_id(&s, &b.name)?;
    if let Some(bad) = b.dns_names.iter().find(|n| !is_dns_name_or_ip(n)) {
        return Err(Problem::bad_request(format!(
            "{bad:?} is not a DNS name or IP address"
        )));
    }
    if let Some(own) = b.dns_names.iter().find(|n| s.is_own_name(n)) {
        return Err(Problem::bad_request(format!(
            "{own:?} is a name the control plane serves under; a workload's certificate may not carry it"
        )));
    }
    let (kind, routes, upstreams) = ServiceRole {
        kind: b.kind.clone(),
        routes: b.routes.clone(),
        upstreams: b.upstreams.clone(),
    }
    .checked()?;
    let now = unix_now();
    s.store
        .create_service_full(
            &b.name,
            &b.dns_names.join(" "),
            &kind,
            &routes,
            &upstreams,
            now,
        )
        .await?;
    s.changed().await;
    let (token, expires_at) = issue_join_token(&s, &b.name, now).await?;
    tracing::info!(admin = %c.name, service = %b.name, "service added; join token issued");
    s.record_admin(&c.name, "service.add", &format!("service {}", b.name), 201)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(ServiceAdded {
            name: b.name,
            spiffe_id: id.as_str().to_owned(),
            join_token: token,
            expires_at,
        }),
    )
        .into_response())
}

pub(super) async fn new_join_token(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    c.require_admin()?;
    service_id(&s, &name)?;
    let svc = s.store.service(&name).await?;
    if svc.disabled_at.is_some() {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            format!("service {name:?} is disabled"),
        ));
    }
    let (token, expires_at) = issue_join_token(&s, &name, unix_now()).await?;
    tracing::info!(admin = %c.name, service = %name, "join token issued");
    s.record_admin(
        &c.name,
        "service.join-token",
        &format!("service {name}"),
        201,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(JoinToken {
            name,
            join_token: token,
            expires_at,
        }),
    )
        .into_response())
}

pub(super) async fn disable_service(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(name): Path<String>,
) -> Result<Json<ServiceDisabled>, Problem> {
    c.require_admin()?;
    service_id(&s, &name)?;
    let now = unix_now();
    s.store.disable_service(&name, now).await?;
    s.changed().await;
    tracing::info!(admin = %c.name, service = %name, "service disabled");
    s.record_admin(&c.name, "service.disable", &format!("service {name}"), 200)
        .await?;
    Ok(Json(ServiceDisabled {
        name,
        disabled_at: now,
    }))
}

/// Sets a service's OpenAPI document (YAML or JSON), once the proxies' own compiler accepts it:
/// a document every proxy would refuse (and then not validate against) is refused here.
pub(super) async fn set_spec(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(name): Path<String>,
    body: String,
) -> Result<Json<SpecSet>, Problem> {
    c.require_admin()?;
    service_id(&s, &name)?;
    s.store.service(&name).await?;
    // Parsing and compiling (JSON Schemas, patterns) is CPU work: off the async workers.
    let doc = tokio::task::spawn_blocking(move || -> Result<Value, Problem> {
        let doc = crate::config::yaml_text_to_json(&body)
            .map_err(|e| Problem::bad_request(format!("spec: {e}")))?;
        let version = doc
            .get("openapi")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !version.starts_with("3.") || !doc.get("paths").is_some_and(Value::is_object) {
            return Err(Problem::bad_request(
                "spec: an OpenAPI 3.0/3.1 document with paths is expected",
            ));
        }
        castellan_openapi::ApiSpec::compile(&doc)
            .map_err(|e| Problem::bad_request(format!("spec: {e}")))?;
        Ok(doc)
    })
    .await
    .map_err(Problem::internal)??;
    let paths = doc
        .get("paths")
        .and_then(Value::as_object)
        .map_or(0, serde_json::Map::len);
    s.store
        .set_service_spec(&name, &doc.to_string(), unix_now())
        .await?;
    s.changed().await;
    tracing::info!(admin = %c.name, service = %name, paths, "OpenAPI document set");
    s.record_admin(&c.name, "service.spec", &format!("service {name}"), 200)
        .await?;
    Ok(Json(SpecSet {
        service: name,
        paths,
    }))
}
