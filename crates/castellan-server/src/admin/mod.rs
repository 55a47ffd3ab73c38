//! The admin REST API (`/v1/…`), authenticated by bearer admin credentials with a role:
//! `admin` may change things, `viewer` may only read. One file per resource; this one holds
//! the routes and the name checks they share.

use crate::Server;
use crate::problem::Problem;
use axum::Router;
use axum::routing::{get, post};
use castellan_identity::SpiffeId;
use std::sync::Arc;

mod apikeys;
pub(crate) mod auth;
mod clients;
mod keys;
mod operators;
mod pki;
mod policy;
mod proxies;
mod services;

pub use apikeys::API_KEY_PREFIX;
pub use auth::{ADMIN_TOKEN_PREFIX, Role, new_admin_token};
pub(crate) use auth::{Body, Caller, admin_token_mac};
pub(crate) use auth::{adopt_admin_tokens, mark_admin_tokens_adopted};
pub use clients::CLIENT_SECRET_PREFIX;
pub(crate) use policy::candidate_set_text;
pub use services::JOIN_TOKEN_PREFIX;

pub(crate) fn routes() -> Router<Arc<Server>> {
    Router::new()
        .route(
            "/v1/services",
            get(services::list_services).post(services::add_service),
        )
        .route(
            "/v1/services/{name}",
            axum::routing::put(services::update_service),
        )
        .route(
            "/v1/services/{name}/join-token",
            post(services::new_join_token),
        )
        .route(
            "/v1/services/{name}/disable",
            post(services::disable_service),
        )
        .route(
            "/v1/services/{name}/spec",
            axum::routing::put(services::set_spec).layer(axum::extract::DefaultBodyLimit::max(
                policy::MAX_POLICY_BYTES,
            )),
        )
        .route(
            "/v1/services/{name}/certificates",
            get(pki::list_certificates),
        )
        .route(
            "/v1/certificates/{serial}/revoke",
            post(pki::revoke_certificate),
        )
        .route("/v1/revocations", get(pki::revocations))
        .route("/v1/bundle", get(pki::bundle))
        .route("/v1/ca/rotate", post(pki::rotate_ca))
        .route(
            "/v1/clients",
            get(clients::list_clients).post(clients::add_client),
        )
        .route("/v1/clients/{id}/disable", post(clients::disable_client))
        .route("/v1/keys", get(keys::list_keys))
        .route("/v1/keys/rotate", post(keys::rotate_keys))
        .route(
            "/v1/admin-tokens",
            get(operators::list_admin_tokens).post(operators::add_admin_token),
        )
        .route(
            "/v1/admin-tokens/{id}/revoke",
            post(operators::revoke_admin_token),
        )
        .route(
            "/v1/policy",
            get(policy::current_policy)
                .post(policy::apply_policy)
                .layer(axum::extract::DefaultBodyLimit::max(
                    policy::MAX_POLICY_BYTES,
                )),
        )
        .route("/v1/access/report", get(policy::access_report))
        .route(
            "/v1/policy/impact",
            post(policy::policy_impact).layer(axum::extract::DefaultBodyLimit::max(
                policy::MAX_POLICY_BYTES,
            )),
        )
        .route(
            "/v1/policy/usage",
            post(policy::policy_usage).layer(axum::extract::DefaultBodyLimit::max(
                policy::MAX_POLICY_BYTES,
            )),
        )
        .route("/v1/policy/history", get(policy::policy_history))
        .route("/v1/policy/rollback/{rev}", post(policy::rollback_policy))
        .route("/v1/proxies", get(proxies::list_proxies))
        .route(
            "/v1/apikeys",
            get(apikeys::list_api_keys).post(apikeys::add_api_key),
        )
        .route("/v1/apikeys/{id}/revoke", post(apikeys::revoke_api_key))
        .route("/v1/audit", get(crate::audit::query))
        .route("/v1/audit/verify", get(crate::audit::verify))
        .route("/v1/audit/export", get(crate::audit::export))
        .route("/v1/audit/heads", get(crate::audit::heads))
        .route("/v1/audit/purge", post(crate::audit::purge))
}

/// A space-separated stored list, as a list.
fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

/// Whether `s` is a service name: 1-63 characters of a-z, 0-9 and '-', not starting with '-'.
fn is_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

/// The SPIFFE ID of service `name` in this trust domain, or 400 when `name` is not a name.
fn service_id(s: &Server, name: &str) -> Result<SpiffeId, Problem> {
    if !is_name(name) {
        return Err(Problem::bad_request(
            "service names are 1-63 characters of a-z, 0-9 and '-'",
        ));
    }
    SpiffeId::for_service(&s.trust_domain, name).map_err(|e| Problem::bad_request(e.to_string()))
}
