//! One typed client of the control plane's admin API (`/v1/…`): a method per endpoint, with the
//! request and answer types the server itself uses (`castellan_server::api`), over one request
//! helper.

use castellan_server::api::{
    AdminTokenCreated, AdminTokenInfo, AdminTokenRevoked, ApiKeyCreated, ApiKeyInfo, ApiKeyRevoked,
    ApplyPolicy, Bundle, CaRotated, CertificateInfo, CertificateRevoked, ClientDisabled,
    ClientInfo, ImpactRequest, JoinToken, KeysRotated, NewAdminToken, NewApiKey, NewClient,
    NewService, PolicyRevisionInfo, ProxyInfo, RevisionStored, ServiceAdded, ServiceDisabled,
    ServiceInfo, ServiceRole, ServiceUpdated, SigningKeyInfo, SpecSet,
};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// What a request carries.
enum Payload {
    None,
    /// A JSON body.
    Json(Value),
    /// A YAML (or JSON) document, sent as `application/yaml`.
    Yaml(String),
}

/// A client of one control plane, authenticated with one admin credential.
pub(crate) struct AdminClient {
    http: reqwest::Client,
    /// Base URL, without a trailing '/'.
    server: String,
    token: String,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credential.
        f.debug_struct("AdminClient")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// A client of `server` (base URL) sending `token`, over `http` (which pins the server).
    pub(crate) fn new(http: reqwest::Client, server: &str, token: String) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(AdminClient {
            http,
            server: server.trim_end_matches('/').to_owned(),
            token,
            rt,
        })
    }

    /// The one request helper: `method path` with `payload`; the status and the body's text,
    /// or why no answer came.
    fn request(
        &self,
        method: Method,
        path: &str,
        payload: Payload,
    ) -> Result<(StatusCode, String), String> {
        let server = &self.server;
        let mut req = self
            .http
            .request(method, format!("{server}{path}"))
            .bearer_auth(&self.token);
        req = match payload {
            Payload::None => req,
            Payload::Json(b) => req.json(&b),
            Payload::Yaml(t) => req.header("content-type", "application/yaml").body(t),
        };
        self.rt.block_on(async move {
            let resp = req
                .send()
                .await
                .map_err(|e| format!("{server}: {}", castellan_proxy::error_chain(&e)))?;
            let status = resp.status();
            let text = resp.text().await.map_err(|e| e.to_string())?;
            Ok((status, text))
        })
    }

    /// A JSON answer: `T` on success, else `STATUS REASON: detail` (the problem's detail, or
    /// the whole body when it has none).
    fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        payload: Payload,
    ) -> Result<T, String> {
        let (status, text) = self.request(method, path, payload)?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            serde_json::from_value(body).map_err(|e| format!("{path}: unexpected answer: {e}"))
        } else {
            let detail = body
                .get("detail")
                .and_then(Value::as_str)
                .map_or_else(|| body.to_string(), str::to_owned);
            Err(format!(
                "{} {}: {detail}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            ))
        }
    }

    fn body(b: &impl Serialize) -> Result<Payload, String> {
        serde_json::to_value(b)
            .map(Payload::Json)
            .map_err(|e| e.to_string())
    }

    /// `GET path`, answered in JSON.
    pub(crate) fn get(&self, path: &str) -> Result<Value, String> {
        self.json(Method::GET, path, Payload::None)
    }

    /// `POST path` with a JSON body, answered in JSON.
    pub(crate) fn post(&self, path: &str, body: &impl Serialize) -> Result<Value, String> {
        self.json(Method::POST, path, Self::body(body)?)
    }

    /// `GET path`, answered in text (JSON lines); an error is `STATUS: body`.
    pub(crate) fn get_text(&self, path: &str) -> Result<String, String> {
        let (status, text) = self.request(Method::GET, path, Payload::None)?;
        if status.is_success() {
            Ok(text)
        } else {
            Err(format!("{status}: {text}"))
        }
    }

    // ---- services -------------------------------------------------------------------------

    pub(crate) fn services(&self) -> Result<Vec<ServiceInfo>, String> {
        self.json(Method::GET, "/v1/services", Payload::None)
    }

    pub(crate) fn add_service(&self, s: &NewService) -> Result<ServiceAdded, String> {
        self.json(Method::POST, "/v1/services", Self::body(s)?)
    }

    pub(crate) fn update_service(
        &self,
        name: &str,
        role: &ServiceRole,
    ) -> Result<ServiceUpdated, String> {
        self.json(
            Method::PUT,
            &format!("/v1/services/{name}"),
            Self::body(role)?,
        )
    }

    pub(crate) fn join_token(&self, name: &str) -> Result<JoinToken, String> {
        let path = format!("/v1/services/{name}/join-token");
        self.json(Method::POST, &path, Payload::None)
    }

    /// Sets the service's OpenAPI document (YAML or JSON text).
    pub(crate) fn set_spec(&self, name: &str, document: String) -> Result<SpecSet, String> {
        let path = format!("/v1/services/{name}/spec");
        self.json(Method::PUT, &path, Payload::Yaml(document))
    }

    pub(crate) fn disable_service(&self, name: &str) -> Result<ServiceDisabled, String> {
        let path = format!("/v1/services/{name}/disable");
        self.json(Method::POST, &path, Payload::None)
    }

    // ---- certificates and the CA ----------------------------------------------------------

    pub(crate) fn certificates(&self, service: &str) -> Result<Vec<CertificateInfo>, String> {
        let path = format!("/v1/services/{service}/certificates");
        self.json(Method::GET, &path, Payload::None)
    }

    pub(crate) fn revoke_certificate(&self, serial: &str) -> Result<CertificateRevoked, String> {
        let path = format!("/v1/certificates/{serial}/revoke");
        self.json(Method::POST, &path, Payload::None)
    }

    pub(crate) fn rotate_ca(&self) -> Result<CaRotated, String> {
        self.json(Method::POST, "/v1/ca/rotate", Payload::None)
    }

    pub(crate) fn bundle(&self) -> Result<Bundle, String> {
        self.json(Method::GET, "/v1/bundle", Payload::None)
    }

    // ---- OAuth2 clients -------------------------------------------------------------------

    pub(crate) fn clients(&self) -> Result<Vec<ClientInfo>, String> {
        self.json(Method::GET, "/v1/clients", Payload::None)
    }

    pub(crate) fn add_client(&self, c: &NewClient) -> Result<ClientInfo, String> {
        self.json(Method::POST, "/v1/clients", Self::body(c)?)
    }

    pub(crate) fn disable_client(&self, id: &str) -> Result<ClientDisabled, String> {
        let path = format!("/v1/clients/{id}/disable");
        self.json(Method::POST, &path, Payload::None)
    }

    // ---- token-signing keys and admin credentials -----------------------------------------

    pub(crate) fn signing_keys(&self) -> Result<Vec<SigningKeyInfo>, String> {
        self.json(Method::GET, "/v1/keys", Payload::None)
    }

    pub(crate) fn rotate_keys(&self) -> Result<KeysRotated, String> {
        self.json(Method::POST, "/v1/keys/rotate", Payload::None)
    }

    pub(crate) fn admin_tokens(&self) -> Result<Vec<AdminTokenInfo>, String> {
        self.json(Method::GET, "/v1/admin-tokens", Payload::None)
    }

    pub(crate) fn add_admin_token(&self, t: &NewAdminToken) -> Result<AdminTokenCreated, String> {
        self.json(Method::POST, "/v1/admin-tokens", Self::body(t)?)
    }

    pub(crate) fn revoke_admin_token(&self, id: &str) -> Result<AdminTokenRevoked, String> {
        let path = format!("/v1/admin-tokens/{id}/revoke");
        self.json(Method::POST, &path, Payload::None)
    }

    // ---- policy ---------------------------------------------------------------------------

    pub(crate) fn apply_policy(&self, p: &ApplyPolicy) -> Result<RevisionStored, String> {
        self.json(Method::POST, "/v1/policy", Self::body(p)?)
    }

    pub(crate) fn policy_history(&self) -> Result<Vec<PolicyRevisionInfo>, String> {
        self.json(Method::GET, "/v1/policy/history", Payload::None)
    }

    pub(crate) fn rollback_policy(&self, rev: i64) -> Result<RevisionStored, String> {
        let path = format!("/v1/policy/rollback/{rev}");
        self.json(Method::POST, &path, Payload::None)
    }

    /// What a candidate policy would change on the window's traffic (`crate::impact` of the
    /// server; its report as JSON).
    pub(crate) fn policy_impact(&self, r: &ImpactRequest) -> Result<Value, String> {
        self.post("/v1/policy/impact", r)
    }

    /// Which rule of a candidate policy decides each call the window allowed.
    pub(crate) fn policy_usage(&self, r: &ImpactRequest) -> Result<Value, String> {
        self.post("/v1/policy/usage", r)
    }

    /// The policy in force against the traffic since `since_ms`.
    pub(crate) fn access_report(&self, since_ms: i64) -> Result<Value, String> {
        self.get(&format!("/v1/access/report?since_ms={since_ms}"))
    }

    // ---- proxies and API keys -------------------------------------------------------------

    pub(crate) fn proxies(&self) -> Result<Vec<ProxyInfo>, String> {
        self.json(Method::GET, "/v1/proxies", Payload::None)
    }

    pub(crate) fn api_keys(&self) -> Result<Vec<ApiKeyInfo>, String> {
        self.json(Method::GET, "/v1/apikeys", Payload::None)
    }

    pub(crate) fn add_api_key(&self, k: &NewApiKey) -> Result<ApiKeyCreated, String> {
        self.json(Method::POST, "/v1/apikeys", Self::body(k)?)
    }

    pub(crate) fn revoke_api_key(&self, id: &str) -> Result<ApiKeyRevoked, String> {
        let path = format!("/v1/apikeys/{id}/revoke");
        self.json(Method::POST, &path, Payload::None)
    }
}
