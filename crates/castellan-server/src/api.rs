//! The admin API's JSON shapes (`/v1/…`): the request bodies the server takes and the answers it
//! gives, shared with the `castellan` CLI so that both sides read and write the same fields.
//! Plain serde types: no HTTP framework in here. Field order is the order on the wire.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

// ---- services -----------------------------------------------------------------------------

/// `POST /v1/services`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewService {
    /// Service name (a-z, 0-9, '-').
    pub name: String,
    /// DNS names / IP addresses its SVIDs also carry (for an edge listener such as the gateway's).
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// `sidecar` (default), `gateway` or `decision`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Gateways and decision points: `prefix=service` routes.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Sidecars: the services it calls.
    #[serde(default)]
    pub upstreams: Vec<String>,
}

/// `PUT /v1/services/{name}`: what a service's proxies are; the control plane sends each only
/// what that needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRole {
    /// `sidecar` (default), `gateway` or `decision`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Gateways and decision points: `prefix=service` routes.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Sidecars: the services it calls.
    #[serde(default)]
    pub upstreams: Vec<String>,
}

/// One service of `GET /v1/services`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Its name.
    pub name: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// When it was added (Unix seconds).
    pub created_at: i64,
    /// When it was disabled, if it was.
    pub disabled_at: Option<i64>,
    /// DNS names / IP addresses its SVIDs also carry.
    pub dns_names: Vec<String>,
    /// `sidecar`, `gateway` or `decision`.
    pub kind: String,
    /// Gateways and decision points: `prefix=service` routes.
    pub routes: Vec<String>,
    /// Sidecars: the services it calls.
    pub upstreams: Vec<String>,
}

/// The answer to `POST /v1/services`: the new service and its first join token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceAdded {
    /// Its name.
    pub name: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// Single-use join token for its proxy (shown once).
    pub join_token: String,
    /// When the join token expires (Unix seconds).
    pub expires_at: i64,
}

/// The answer to `POST /v1/services/{name}/join-token`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinToken {
    /// The service.
    pub name: String,
    /// Single-use join token (shown once).
    pub join_token: String,
    /// When it expires (Unix seconds).
    pub expires_at: i64,
}

/// The answer to `PUT /v1/services/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceUpdated {
    /// The service.
    pub name: String,
    /// `sidecar`, `gateway` or `decision`.
    pub kind: String,
    /// Its routes.
    pub routes: Vec<String>,
    /// Its upstreams.
    pub upstreams: Vec<String>,
}

/// The answer to `POST /v1/services/{name}/disable`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceDisabled {
    /// The service.
    pub name: String,
    /// When (Unix seconds).
    pub disabled_at: i64,
}

/// The answer to `PUT /v1/services/{name}/spec`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpecSet {
    /// The service.
    pub service: String,
    /// How many paths the document has.
    pub paths: usize,
}

// ---- certificates and the CA --------------------------------------------------------------

/// One certificate of `GET /v1/services/{name}/certificates`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateInfo {
    /// Serial number, hex.
    pub serial: String,
    /// Issue time.
    pub issued_at: i64,
    /// Expiry.
    pub not_after: i64,
    /// Revocation time, if revoked.
    pub revoked_at: Option<i64>,
}

/// The answer to `POST /v1/certificates/{serial}/revoke`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateRevoked {
    /// Serial number, hex.
    pub serial: String,
    /// When (Unix seconds).
    pub revoked_at: i64,
}

/// One event of `GET /v1/revocations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Revocation {
    /// Position in the stream.
    pub seq: i64,
    /// `service` or `certificate`.
    pub kind: String,
    /// The service name or serial (hex).
    pub subject: String,
    /// When.
    pub at: i64,
}

/// The answer to `GET /v1/bundle`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bundle {
    /// The trust domain.
    pub trust_domain: String,
    /// Every CA certificate in force, PEM.
    pub pem: String,
    /// How many.
    pub count: usize,
}

/// The answer to `POST /v1/ca/rotate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaRotated {
    /// The new CA's id.
    pub id: String,
    /// Its certificate's expiry.
    pub not_after: i64,
    /// How many certificates the bundle now holds.
    pub bundle_size: usize,
}

// ---- OAuth2 clients -----------------------------------------------------------------------

/// `POST /v1/clients`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewClient {
    /// Client id.
    pub name: String,
    /// Scopes it may request.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// The SPIFFE ID it authenticates with over mTLS instead of a secret.
    #[serde(default)]
    pub tls_san_uri: Option<String>,
    /// Audiences it may request tokens for (besides the server's default audience).
    #[serde(default)]
    pub audiences: Vec<String>,
}

/// An OAuth2 client, as listed and as created (then with its secret, shown once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientInfo {
    /// Client id.
    pub client_id: String,
    /// Scopes it may request.
    pub scopes: Vec<String>,
    /// Audiences it may request tokens for.
    pub audiences: Vec<String>,
    /// The SPIFFE ID it authenticates with, if certificate-bound.
    pub tls_san_uri: Option<String>,
    /// Disabled time, if disabled.
    pub disabled_at: Option<i64>,
    /// Its secret: only in the answer to its creation, and only when not certificate-bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
}

/// The answer to `POST /v1/clients/{id}/disable`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientDisabled {
    /// Client id.
    pub client_id: String,
    /// When (Unix seconds).
    pub disabled_at: i64,
}

// ---- token-signing keys -------------------------------------------------------------------

/// One key of `GET /v1/keys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SigningKeyInfo {
    /// Key id.
    pub kid: String,
    /// Creation time.
    pub created_at: i64,
    /// Retirement time, if retired.
    pub retired_at: Option<i64>,
    /// Whether tokens are signed with it now.
    pub active: bool,
}

/// The answer to `POST /v1/keys/rotate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeysRotated {
    /// The new key's id.
    pub kid: String,
    /// How many public keys are published.
    pub published: usize,
}

// ---- admin credentials --------------------------------------------------------------------

/// `POST /v1/admin-tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAdminToken {
    /// Who it is for.
    pub name: String,
    /// `admin` or `viewer`.
    pub role: String,
}

/// The answer to `POST /v1/admin-tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminTokenCreated {
    /// Who it is for.
    pub name: String,
    /// `admin` or `viewer`.
    pub role: String,
    /// The credential (shown once).
    pub token: String,
}

/// One credential of `GET /v1/admin-tokens` (never the credential itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminTokenInfo {
    /// Its id: the hex of its hash.
    pub id: String,
    /// Who it is for.
    pub name: String,
    /// `admin` or `viewer`.
    pub role: String,
    /// Creation time.
    pub created_at: i64,
    /// Revocation time, if revoked.
    pub revoked_at: Option<i64>,
}

/// The answer to `POST /v1/admin-tokens/{id}/revoke`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminTokenRevoked {
    /// Its id.
    pub id: String,
    /// Who it was for.
    pub name: String,
    /// When (Unix seconds).
    pub revoked_at: i64,
}

// ---- policy -------------------------------------------------------------------------------

/// `POST /v1/policy`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyPolicy {
    /// Policy files: relative `.yaml` path → text.
    pub files: BTreeMap<String, String>,
    /// Why.
    #[serde(default)]
    pub comment: String,
}

/// `POST /v1/policy/impact` and `POST /v1/policy/usage`: a candidate policy against the
/// stored traffic of a window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImpactRequest {
    /// Candidate policy files: relative `.yaml` path → text.
    pub files: BTreeMap<String, String>,
    /// Window start, Unix milliseconds (0: every stored record).
    #[serde(default)]
    pub since_ms: i64,
    /// Only this destination service (empty: all).
    #[serde(default)]
    pub service: String,
}

/// The answer to `POST /v1/policy` and `POST /v1/policy/rollback/{rev}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevisionStored {
    /// The revision in force.
    pub revision: i64,
    /// SHA-256 of its files, hex.
    pub content_hash: String,
    /// How many rules it has.
    pub rules: usize,
    /// Whether a new revision was created (false: the latest had this content).
    pub changed: bool,
    /// Rollbacks: the revision whose content was restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<i64>,
}

/// The answer to `GET /v1/policy`: the revision in force.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyInForce {
    /// Revision number.
    pub revision: i64,
    /// Who applied it.
    pub author: String,
    /// When.
    pub created_at: i64,
    /// SHA-256 of its files, hex.
    pub content_hash: String,
    /// Why.
    pub comment: String,
    /// Its files: name → YAML text.
    pub files: BTreeMap<String, String>,
}

/// One revision of `GET /v1/policy/history`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyRevisionInfo {
    /// Revision number.
    pub revision: i64,
    /// Who applied it.
    pub author: String,
    /// When.
    pub created_at: i64,
    /// SHA-256 of its files, hex.
    pub content_hash: String,
    /// Why.
    pub comment: String,
}

// ---- proxies ------------------------------------------------------------------------------

/// One proxy of `GET /v1/proxies`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyInfo {
    /// Its id.
    pub proxy_id: String,
    /// The service it fronts.
    pub service: String,
    /// `sidecar`, `gateway` or `decision`.
    pub mode: String,
    /// Its inbound address.
    pub address: String,
    /// The policy revision it enforces.
    pub revision: i64,
    /// Whether that is the revision in force.
    pub up_to_date: bool,
    /// Its certificate's expiry.
    pub cert_not_after: i64,
    /// Last contact (Unix seconds).
    pub last_contact: i64,
    /// Seconds since then.
    pub seconds_since_contact: i64,
}

// ---- API keys -----------------------------------------------------------------------------

/// `POST /v1/apikeys`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    /// The user it authenticates.
    pub user: String,
    /// Roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Extra claims.
    #[serde(default)]
    pub claims: BTreeMap<String, String>,
    /// Services it may be used for (empty: any).
    #[serde(default)]
    pub services: Vec<String>,
    /// Route prefixes it may be used for (empty: any).
    #[serde(default)]
    pub prefixes: Vec<String>,
    /// Lifetime in seconds (none: until revoked).
    #[serde(default)]
    pub ttl_secs: Option<i64>,
}

/// The answer to `POST /v1/apikeys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyCreated {
    /// Its public id.
    pub key_id: String,
    /// The user it authenticates.
    pub user: String,
    /// Roles.
    pub roles: Vec<String>,
    /// Extra claims.
    pub claims: BTreeMap<String, String>,
    /// Services it may be used for (empty: any).
    pub services: Vec<String>,
    /// Route prefixes it may be used for (empty: any).
    pub prefixes: Vec<String>,
    /// Expiry (Unix seconds), if any.
    pub expires_at: Option<i64>,
    /// The key (shown once).
    pub api_key: String,
}

/// One key of `GET /v1/apikeys` (never the key itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyInfo {
    /// Its public id.
    pub key_id: String,
    /// The user it authenticates.
    pub user: String,
    /// Roles (null if the stored value does not read as a list).
    pub roles: Option<Vec<String>>,
    /// Extra claims (null if the stored value does not read as a map).
    pub claims: Option<BTreeMap<String, String>>,
    /// Services it may be used for (empty: any).
    pub services: Vec<String>,
    /// Route prefixes it may be used for (empty: any).
    pub prefixes: Vec<String>,
    /// Expiry (Unix seconds), if any.
    pub expires_at: Option<i64>,
    /// When a gateway last saw it used.
    pub last_used_at: Option<i64>,
}

/// The answer to `POST /v1/apikeys/{id}/revoke`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyRevoked {
    /// Its public id.
    pub key_id: String,
    /// Always true.
    pub revoked: bool,
}
