//! OAuth2 clients: registration (with a secret, or bound to an SVID), listing, disabling.

use super::{Body, Caller, words};
use crate::api::{ClientDisabled, ClientInfo, NewClient};
use crate::keys::{credential_hash, random_id};
use crate::oauth::{is_audience, is_scope_token};
use crate::problem::Problem;
use crate::{Server, unix_now};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use castellan_identity::SpiffeId;
use castellan_store::ClientRow;
use std::sync::Arc;

/// Prefix of OAuth2 client secrets.
pub const CLIENT_SECRET_PREFIX: &str = "ccs_";

fn client_info(r: &ClientRow) -> ClientInfo {
    ClientInfo {
        client_id: r.client_id.clone(),
        scopes: words(&r.scopes),
        audiences: words(&r.audiences),
        tls_san_uri: r.tls_san_uri.clone(),
        disabled_at: r.disabled_at,
        client_secret: None,
    }
}

pub(super) async fn list_clients(
    _c: Caller,
    State(s): State<Arc<Server>>,
) -> Result<Json<Vec<ClientInfo>>, Problem> {
    Ok(Json(
        s.store.clients().await?.iter().map(client_info).collect(),
    ))
}

fn is_client_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

pub(super) async fn add_client(
    c: Caller,
    State(s): State<Arc<Server>>,
    Body(b): Body<NewClient>,
) -> Result<Response, Problem> {
    c.require_admin()?;
    if !is_client_id(&b.name) {
        return Err(Problem::bad_request(
            "client names are 1-64 characters of A-Z, a-z, 0-9, '-', '_', '.'",
        ));
    }
    if let Some(bad) = b.scopes.iter().find(|x| !is_scope_token(x)) {
        return Err(Problem::bad_request(format!("invalid scope {bad:?}")));
    }
    if let Some(bad) = b.audiences.iter().find(|a| !is_audience(a)) {
        return Err(Problem::bad_request(format!("invalid audience {bad:?}")));
    }
    if let Some(uri) = &b.tls_san_uri {
        let id =
            SpiffeId::parse(uri).map_err(|e| Problem::bad_request(format!("tls_san_uri: {e}")))?;
        if id.trust_domain() != s.trust_domain {
            return Err(Problem::bad_request(
                "tls_san_uri must be in this trust domain",
            ));
        }
    }
    // A certificate-bound client gets no secret: its only credential is its SVID.
    let secret = match b.tls_san_uri {
        None => Some(format!("{CLIENT_SECRET_PREFIX}{}", random_id(32)?)),
        Some(_) => None,
    };
    let row = ClientRow {
        client_id: b.name.clone(),
        secret_hash: secret.as_deref().map(credential_hash).unwrap_or_default(),
        scopes: b.scopes.join(" "),
        tls_san_uri: b.tls_san_uri,
        disabled_at: None,
        audiences: b.audiences.join(" "),
    };
    s.store.create_client(&row, unix_now()).await?;
    tracing::info!(admin = %c.name, client = %row.client_id, "OAuth2 client added");
    s.record_admin(
        &c.name,
        "client.add",
        &format!("client {}", row.client_id),
        201,
    )
    .await?;
    let out = ClientInfo {
        client_secret: secret,
        ..client_info(&row)
    };
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

pub(super) async fn disable_client(
    c: Caller,
    State(s): State<Arc<Server>>,
    Path(id): Path<String>,
) -> Result<Json<ClientDisabled>, Problem> {
    c.require_admin()?;
    let now = unix_now();
    s.store.disable_client(&id, now).await?;
    s.forget_client(&id);
    s.changed().await;
    tracing::info!(admin = %c.name, client = %id, "OAuth2 client disabled");
    s.record_admin(&c.name, "client.disable", &format!("client {id}"), 200)
        .await?;
    Ok(Json(ClientDisabled {
        client_id: id,
        disabled_at: now,
    }))
}
